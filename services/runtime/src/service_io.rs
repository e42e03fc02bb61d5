//! The connections a partitioned service needs, made the same way for every service, and
//! how it serves the shared loop ([`crate::partitioned::run`]) on them.

use rdkafka::consumer::{Consumer as _, StreamConsumer};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::CheckpointStore;
use crate::kafka::{self, RebalanceLog};
use crate::partitioned::{run, LoopConfig, Partitioned};
use crate::source::KafkaSource;

/// The connections a partitioned service needs, made the same way for every service.
pub struct ServiceIo {
    pub health: crate::http::Health,
    pub client: clickhouse::Client,
    pub producer: rdkafka::producer::FutureProducer,
    /// The deployment's record key (see [`crate::record_key`]).
    pub record_key: meterflow_core::auth::RecordKey,
    /// The group's consumer.
    pub source: KafkaSource,
    http_task: tokio::task::JoinHandle<()>,
}

impl ServiceIo {
    /// Serves `/healthz`, `/readyz` and `/metrics` on `http_addr`, connects to ClickHouse and
    /// Kafka, joins `group` (as `membership` says) subscribed to `topics`, and resolves the
    /// record key.
    pub async fn connect(
        service: &crate::args::ServiceArgs,
        group: &str,
        membership: &crate::args::MembershipArgs,
        topics: &[&str],
        http_addr: std::net::SocketAddr,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let health = crate::http::Health::default();
        let (addr, http_task) = crate::http::serve(http_addr, health.clone(), shutdown.clone()).await?;
        tracing::info!(%addr, "serving /healthz, /readyz, /metrics");
        let kafka_args = &service.conn.kafka;
        let mut consumer_config = kafka::consumer_config(kafka_args, group)?;
        if let Some(id) = membership.group_instance_id.as_deref().filter(|id| !id.is_empty()) {
            consumer_config.set("group.instance.id", id);
        }
        let consumer: StreamConsumer<RebalanceLog> = consumer_config.create_with_context(RebalanceLog::default())?;
        consumer.subscribe(topics)?;
        let client = crate::clickhouse::client(&service.conn.clickhouse);
        let record_key = crate::record_key::resolve(&service.auth, &client).await?;
        Ok(Self {
            health,
            client,
            producer: kafka::producer_config(kafka_args)?.create()?,
            record_key,
            source: KafkaSource::new(consumer),
            http_task,
        })
    }

    /// Runs the loop until `shutdown`, then leaves the group promptly (so a successor gets
    /// the partitions without waiting for a session timeout; a static member stays, see
    /// [`crate::args::MembershipArgs`]) and stops the HTTP server.
    pub async fn serve<S: Partitioned>(self, svc: &mut S, cfg: &LoopConfig, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let store = CheckpointStore::new(self.client.clone());
        self.health.set_ready(true);
        let result = run(svc, &self.source, &store, cfg, shutdown).await;
        self.source.consumer().unsubscribe();
        shutdown.cancel();
        let _ = self.http_task.await;
        result
    }
}
