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
        .set("compression.type", "none");
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
