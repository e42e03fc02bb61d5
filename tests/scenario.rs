//! Building blocks of the end-to-end scenarios: generate a known workload into a test's
//! topics, then wait until ClickHouse agrees with its ground truth.

use std::time::{Duration, Instant};

use clickhouse::Client;
use meterflow_core::meter::MeterCatalog;
use meterflow_producer::{generate, EventProducer, EventTimeMode, GenerateConfig, GroundTruth, Progress};
use meterflow_runtime::args::KafkaArgs;

use meterflow_testkit::procs::repo_root;
use crate::verify;

/// The project's meters (config/meters.toml).
pub fn meters() -> anyhow::Result<MeterCatalog> {
    let text = std::fs::read_to_string(repo_root().join("config/meters.toml"))?;
    Ok(MeterCatalog::from_toml_str(&text)?)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The workload: `events` messages with 10% duplicates, 5% late, 1% malformed and a
/// few too-late ones, event times spread over the hour that ended 30 minutes ago (so idle
/// ticks at wall-clock time close every window).
pub fn workload(events: u64, seed: u64) -> anyhow::Result<GenerateConfig> {
    let mut cfg = GenerateConfig::new(meters()?);
    cfg.events = Some(events);
    cfg.seed = seed;
    cfg.duplicate_rate = 0.10;
    cfg.late_rate = 0.05;
    cfg.malformed_rate = 0.01;
    cfg.too_late_rate = 0.001;
    let now = now_ms();
    cfg.event_time = EventTimeMode::Simulated { start_ms: now - 90 * 60_000, span_ms: 60 * 60_000 };
    Ok(cfg)
}

/// Sends the workload to `topic` and returns its ground truth.
pub async fn produce(kafka: &KafkaArgs, topic: &str, cfg: GenerateConfig) -> anyhow::Result<GroundTruth> {
    let producer = EventProducer::new(kafka, topic)?;
    let gt = generate(cfg, &producer, Progress::Hidden).await?;
    gt.check_consistency()?;
    anyhow::ensure!(gt.counters.send_errors == 0, "{} send errors while producing", gt.counters.send_errors);
    Ok(gt)
}

/// Polls until window totals and dead letters match the ground truth exactly, or fails
/// after `timeout` with the last differences. `check` runs between polls (e.g. to fail fast
/// when a service died).
pub async fn wait_until_exact(
    ch: &Client,
    gt: &GroundTruth,
    usage_topic: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        check()?;
        let windows = verify::window_totals(ch, gt).await;
        let dead = verify::dead_letters(ch, gt, usage_topic).await;
        match (windows, dead) {
            (Ok(w), Ok(d)) if w.ok() && d.ok() => return Ok(()),
            (w, d) if Instant::now() > deadline => {
                w?.into_result("window totals")?;
                d?.into_result("dead letters")?;
                anyhow::bail!("timed out");
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Logs of in-process services go to stderr (shown for failing tests) at `METERFLOW_LOG`
/// level, default `info`.
pub fn init_test_logging() {
    let level = std::env::var("METERFLOW_LOG").unwrap_or_else(|_| "info".into());
    meterflow_runtime::telemetry::init_logging(&meterflow_runtime::args::LogArgs { format: "text".into(), level });
}

/// Top-ups of 1,000 USD for tenant-000..tenant-009 plus one manual debit of 25.50 for
/// tenant-001, each published twice (a retried publish the rater must ignore). Returns the
/// expected credit per tenant.
pub async fn publish_top_ups(kafka: &KafkaArgs, wallet_topic: &str) -> anyhow::Result<std::collections::BTreeMap<String, rust_decimal::Decimal>> {
    use meterflow_core::records::{AvroRecord, WalletAdjustment};
    use rust_decimal::Decimal;
    let producer: rdkafka::producer::FutureProducer = meterflow_runtime::kafka::producer_config(kafka)?.create()?;
    let mut expected = std::collections::BTreeMap::new();
    let adjustment = |key: String, tenant: &str, amount: Decimal, kind: &str, reason: &str| WalletAdjustment {
        idempotency_key: key,
        tenant: tenant.to_owned(),
        currency: "USD".into(),
        amount,
        kind: kind.into(),
        reason: reason.into(),
        created_at: now_ms(),
        expires_at: None,
        priority: 0,
    };
    let mut adjustments = Vec::new();
    for t in 0..10 {
        let tenant = format!("tenant-{t:03}");
        adjustments.push(adjustment(format!("pay_{t}"), &tenant, Decimal::from(1_000), "top_up", "card payment"));
    }
    adjustments.push(adjustment("adj_goodwill_1".into(), "tenant-001", Decimal::new(-2550, 2), "adjustment", "correction"));
    for a in &adjustments {
        *expected.entry(a.tenant.clone()).or_default() += a.amount;
    }
    for _retry in 0..2 {
        for a in &adjustments {
            let payload = a.to_avro()?;
            let rec = rdkafka::producer::FutureRecord::to(wallet_topic).key(&a.tenant).payload(&payload);
            producer.send(rec, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
        }
    }
    Ok(expected)
}
