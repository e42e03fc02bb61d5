//! librdkafka client configuration with meterflow's defaults.

use rdkafka::ClientConfig;

use crate::args::KafkaArgs;
use crate::Error;

/// Base config: brokers plus the user's extra properties (which win).
pub fn base_config(args: &KafkaArgs) -> Result<ClientConfig, Error> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &args.brokers);
    for kv in &args.properties {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Error::Other(format!("kafka property {kv:?} is not key=value")))?;
        cfg.set(k.trim(), v.trim());
    }
    Ok(cfg)
}

/// An idempotent producer: retries never duplicate or reorder within a partition, which the
/// aggregates' per-partition `seq` relies on. No transactional id: many Kafka-API brokers
/// (the local one included) refuse transactions.
pub fn producer_config(args: &KafkaArgs) -> Result<ClientConfig, Error> {
    let mut cfg = ClientConfig::new();
    cfg.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "300000")
        .set("compression.type", "none")
        // The partitioning contract (meterflow_core::partitioning): key = tenant, crc32.
        // librdkafka's default, set explicitly so that no property file changes it unnoticed.
        .set("partitioner", "consistent_random");
    merge(&mut cfg, base_config(args)?);
    Ok(cfg)
}

/// A consumer in `group` that never commits on its own: offsets are committed only after the
/// state covering them is durable.
pub fn consumer_config(args: &KafkaArgs, group: &str) -> Result<ClientConfig, Error> {
    let mut cfg = ClientConfig::new();
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "range")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "600000")
        .set("fetch.wait.max.ms", "100")
        .set("fetch.min.bytes", "1")
        .set("queued.min.messages", "100000");
    merge(&mut cfg, base_config(args)?);
    Ok(cfg)
}

fn merge(into: &mut ClientConfig, from: ClientConfig) {
    for (k, v) in from.config_map() {
        into.set(k, v);
    }
}

/// Partition ownership changes, recorded by the consumer context and drained by the
/// service's loop before it handles the next message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

/// A consumer context that records rebalances. Services drop a revoked partition's state
/// and reload an assigned one from its checkpoint: another instance may have moved it on.
#[derive(Debug, Clone, Default)]
pub struct RebalanceLog {
    events: std::sync::Arc<std::sync::Mutex<Vec<Ownership>>>,
}

impl RebalanceLog {
    /// True if ownership changes wait to be drained.
    pub fn pending(&self) -> bool {
        !self.events.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    pub fn drain(&self) -> Vec<Ownership> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn push(&self, o: Ownership) {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).push(o);
    }
}

fn list(tpl: &rdkafka::TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl rdkafka::ClientContext for RebalanceLog {}

impl rdkafka::consumer::ConsumerContext for RebalanceLog {
    fn pre_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        if let rdkafka::consumer::Rebalance::Revoke(tpl) = rebalance {
            tracing::info!(partitions = ?list(tpl), "partitions revoked");
            self.push(Ownership::Revoked(list(tpl)));
        }
    }

    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        match rebalance {
            rdkafka::consumer::Rebalance::Assign(tpl) => {
                tracing::info!(partitions = ?list(tpl), "partitions assigned");
                // Nothing is fetched until the loop has restored the state and sought to the
                // checkpoint's offsets (it resumes them): the committed offset is only a hint.
                use rdkafka::consumer::Consumer as _;
                if let Err(e) = _consumer.pause(tpl) {
                    tracing::warn!(error = %e, "pausing newly assigned partitions failed");
                }
                self.push(Ownership::Assigned(list(tpl)));
            }
            rdkafka::consumer::Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            rdkafka::consumer::Rebalance::Revoke(_) => {}
        }
    }
}

/// Commits `offsets` (topic, partition, next offset) without waiting. A failure (e.g. the
/// partition moved to another member) is harmless: the checkpoint is the source of truth
/// and the committed offset is only checked against it.
pub fn commit<C>(consumer: &C, offsets: &[(String, i32, i64)])
where
    C: rdkafka::consumer::Consumer<RebalanceLog>,
{
    if offsets.is_empty() {
        return;
    }
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (t, p, o) in offsets {
        if let Err(e) = tpl.add_partition_offset(t, *p, rdkafka::Offset::Offset(*o)) {
            tracing::warn!(error = %e, "cannot build commit list");
            return;
        }
    }
    if let Err(e) = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Async) {
        tracing::debug!(error = %e, "offset commit failed (checkpoint remains authoritative)");
    }
}

/// Header that marks meterflow's control records (idle ticks) in an input topic.
pub const CONTROL_HEADER: &str = "meterflow-control";
