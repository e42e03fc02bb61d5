//! Reading every partition of a topic outside any consumer group, for in-memory views that
//! each process keeps whole (the rater's pending spend, the API's balances).
//!
//! No group: partitions are assigned directly, nothing is committed, and a restart starts
//! again from [`Start`]. The fetch wait is short (10 ms) because these views are about
//! latency, and their topics carry little.

use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::args::KafkaArgs;

/// Where reading starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The oldest record kept (a compacted topic: the newest per key).
    Beginning,
    /// Only what is written from now on.
    End,
}

/// A consumer assigned every partition of one topic.
pub struct Tail {
    pub consumer: StreamConsumer,
    pub topic: String,
    /// Per partition, the end offset when the tail was opened ([`Start::Beginning`]: what
    /// must be read to have caught up).
    pub ends: Vec<i64>,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail").field("topic", &self.topic).field("ends", &self.ends).finish_non_exhaustive()
    }
}

/// Opens `topic` from `start`. Fails if the topic does not exist (yet).
pub async fn open(kafka: &KafkaArgs, topic: &str, start: Start) -> anyhow::Result<Tail> {
    let mut cfg = crate::kafka::base_config(kafka)?;
    // librdkafka wants a group id even for assign(); it is never joined or committed to.
    cfg.set("group.id", format!("meterflow-tail-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "10")
        .set("fetch.min.bytes", "1")
        .set("socket.timeout.ms", "10000");
    let meta_cfg = cfg.clone();
    let name = topic.to_owned();
    let ends = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<i64>> {
        let probe: BaseConsumer = meta_cfg.create().context("creating a Kafka client")?;
        let md = probe.fetch_metadata(Some(&name), Duration::from_secs(10)).with_context(|| format!("metadata of {name}"))?;
        let t = md.topics().first().with_context(|| format!("no metadata for {name}"))?;
        if let Some(e) = t.error() {
            anyhow::bail!("topic {name}: {e:?}");
        }
        anyhow::ensure!(!t.partitions().is_empty(), "topic {name} has no partitions");
        (0..t.partitions().len() as i32)
            .map(|p| -> anyhow::Result<i64> { Ok(probe.fetch_watermarks(&name, p, Duration::from_secs(10))?.1) })
            .collect()
    })
    .await
    .context("metadata task panicked")??;
    let consumer: StreamConsumer = cfg.create().context("creating a Kafka consumer")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..ends.len() as i32 {
        let offset = match start {
            Start::Beginning => Offset::Beginning,
            Start::End => Offset::End,
        };
        tpl.add_partition_offset(topic, p, offset)?;
    }
    consumer.assign(&tpl)?;
    Ok(Tail { consumer, topic: topic.to_owned(), ends })
}

/// [`open`], retried every second until it succeeds or `shutdown` (a service may start
/// before `meterflow-admin init` created the topic); `None` on shutdown.
pub async fn open_when_ready(
    kafka: &KafkaArgs,
    topic: &str,
    start: Start,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<Tail> {
    loop {
        match open(kafka, topic, start).await {
            Ok(t) => return Some(t),
            Err(e) => tracing::warn!(topic, error = %e, "cannot read the topic yet; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
