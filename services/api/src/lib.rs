//! meterflow-api: the HTTP front door of the pipeline.
//!
//! * `POST /v1/events`: usage events as meterflow JSON (`application/json`, one object or an
//!   array) or CloudEvents 1.0 as OpenMeter takes them (`application/cloudevents+json`,
//!   `application/cloudevents-batch+json`). Items are checked with the aggregator's rules
//!   ([`meterflow_core::ingest`]) and answered one by one; accepted events are encoded with
//!   the Avro codec and produced to the usage topic keyed by tenant by the idempotent
//!   producer (`acks=all`). The answer (202) comes only after the broker acknowledged every
//!   accepted event; if it cannot, 503, and a retry is safe (the aggregator dedups by id).
//! * `POST /v1/wallets/{tenant}/adjustments` (admin): a top-up from a payment provider with
//!   `Idempotency-Key` semantics, published as a `WalletAdjustment`.
//! * `GET /v1/wallets/{tenant}` (read): the tenant's balances.
//! * `GET /v1/customers/{tenant}/balance`, `POST /v1/entitlements/check`: real-time balance
//!   (settled, pending, available) and spend checks, answered from memory ([`control`]).
//! * `GET /v1/usage` (read): usage over time from the rollups ([`usage`]);
//!   `GET /v1/customers/{tenant}/invoice` (read): the invoice preview ([`invoice`]);
//!   `POST /v1/portal/tokens` (admin) and `GET /portal/{token}`: the customer page ([`portal`]).
//! * `/healthz`, `/readyz`, `/metrics`, `/openapi.json`.
//!
//! The tenant always comes from the API key: an item naming another tenant is rejected
//! (`tenant_mismatch`) unless the key is an admin key.

pub mod access;
pub mod config;
pub mod control;
pub mod events;
pub mod keys;
pub mod invoice;
pub mod metrics;
pub mod portal;
pub mod usage;
pub mod wallets;

mod http;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use meterflow_core::codec::UsageEventCodec;
use meterflow_core::meter::MeterCatalog;
use meterflow_core::pricing::Catalog;
use meterflow_runtime::http::Health;
use rdkafka::producer::FutureProducer;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use http::{openapi, router, ApiDoc};

/// Errors of the API's building blocks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Other(String),
}

/// Everything a handler needs, shared by all requests.
#[derive(Clone)]
pub struct AppState {
    pub meters: Arc<MeterCatalog>,
    /// The rater's pricing catalog (`--catalog`), validated against `meters`.
    pub catalog: Arc<Catalog>,
    /// Newest balance per tenant (fed by the balances topic once [`start`] runs).
    pub balances: control::Balances,
    pub keys: keys::KeyCache,
    pub producer: FutureProducer,
    pub codec: Arc<UsageEventCodec>,
    pub clickhouse: clickhouse::Client,
    pub limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
    pub in_flight: Arc<Semaphore>,
    pub max_in_flight: usize,
    /// Serialises wallet adjustments in this process, so two concurrent requests with one
    /// `Idempotency-Key` cannot both pass the "first use" check.
    pub adjust_lock: Arc<tokio::sync::Mutex<()>>,
    pub health: Health,
    pub usage_topic: String,
    pub wallet_topic: String,
    pub max_body_bytes: usize,
    pub max_batch: usize,
    pub dedup_horizon_ms: i64,
    pub produce_timeout: Duration,
    /// Where the record key comes from, and the key once read: it signs customer-page links.
    pub auth: meterflow_runtime::args::AuthArgs,
    pub portal_key: Arc<tokio::sync::OnceCell<meterflow_core::auth::RecordKey>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("usage_topic", &self.usage_topic).finish_non_exhaustive()
    }
}

impl AppState {
    /// State from the configuration (connects nothing yet: librdkafka connects lazily).
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(&config.meters).with_context(|| format!("reading {}", config.meters.display()))?;
        let meters = Arc::new(MeterCatalog::from_toml_str(&text)?);
        let catalog = Arc::new(load_catalog(&config.catalog, &meters)?);
        let producer: FutureProducer = meterflow_runtime::kafka::producer_config(&config.service.conn.kafka)?.create()?;
        let limiter = NonZeroU32::new(config.tenant_rate).map(|rate| {
            let burst = config.tenant_burst.and_then(NonZeroU32::new).unwrap_or(rate);
            Arc::new(RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)))
        });
        let max_in_flight = config.max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        let portal_key = match &config.service.auth.record_key {
            Some(hex) => Some(meterflow_core::auth::RecordKey::from_hex(hex).context("--record-key / METERFLOW_RECORD_KEY")?),
            None => None,
        };
        Ok(Self {
            meters,
            catalog,
            balances: control::Balances::default(),
            keys: keys::KeyCache::default(),
            producer,
            codec: Arc::new(UsageEventCodec::new()),
            clickhouse: meterflow_runtime::clickhouse::client(&config.service.conn.clickhouse),
            limiter,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            adjust_lock: Arc::default(),
            health: Health::default(),
            usage_topic: config.service.conn.topics.usage_topic.clone(),
            wallet_topic: config.service.conn.topics.wallet_topic.clone(),
            max_body_bytes: config.max_body_bytes,
            max_batch: config.max_batch.max(1),
            dedup_horizon_ms: config.dedup_horizon_ms,
            produce_timeout: Duration::from_millis(config.produce_timeout_ms.max(1) as u64),
            auth: config.service.auth.clone(),
            portal_key: Arc::new(tokio::sync::OnceCell::new_with(portal_key)),
        })
    }
}

/// The catalog at `path`, refused when it prices a meter that `meters` does not define (the
/// rater refuses the same file, so the API would answer with prices nobody charges).
pub fn load_catalog(path: &std::path::Path, meters: &MeterCatalog) -> anyhow::Result<Catalog> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading catalog {}", path.display()))?;
    let catalog = Catalog::from_toml_str(&text).with_context(|| format!("catalog {}", path.display()))?;
    catalog.validate_meters(meters).context("the catalog does not match the meters")?;
    Ok(catalog)
}

/// A running API: where it listens, and its task.
#[derive(Debug)]
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
    pub state: AppState,
}

/// Binds, loads the keys (retrying until ClickHouse answers), and serves until `shutdown`.
/// Returns once listening, so tests learn the port (`--http-addr 127.0.0.1:0`).
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    meterflow_runtime::http::prometheus(); // the recorder must exist before metrics are described
    metrics::describe();
    let state = AppState::from_config(&config)?;
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    let addr = listener.local_addr()?;
    let refresh = Duration::from_millis(config.key_refresh_ms.max(100) as u64);
    // Readiness: keys loaded (the first refresh tick runs at once).
    {
        let st = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            while !shutdown.is_cancelled() {
                match st.keys.refresh(&st.clickhouse).await {
                    Ok(n) => {
                        ::metrics::gauge!(metrics::KEYS).set(n as f64);
                        st.health.set_ready(true);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot load API keys yet; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
    }
    state.keys.spawn_refresh(state.clickhouse.clone(), refresh, shutdown.clone());
    state.balances.spawn_reader(config.service.conn.kafka.clone(), config.service.conn.topics.balances_topic.clone(), shutdown.clone());
    portal::spawn_key_load(&state, shutdown.clone());
    let app = router(state.clone());
    tracing::info!(%addr, "meterflow-api listening");
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
        if let Err(e) = r {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok(Running { addr, task, state })
}

/// Serves until `shutdown`; then waits for in-flight requests and flushes the producer.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let running = start(config, shutdown).await?;
    running.task.await?;
    let producer = running.state.producer.clone();
    tokio::task::spawn_blocking(move || rdkafka::producer::Producer::flush(&producer, rdkafka::util::Timeout::After(Duration::from_secs(30))))
        .await??;
    Ok(())
}
