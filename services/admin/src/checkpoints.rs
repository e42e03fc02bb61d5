//! `meterflow-admin checkpoint show|replay|reset`: what a service will resume from, and the
//! operator's decision when a service refuses to start because its checkpoint and its outputs
//! (or the consumer group's offsets, or the topic) disagree. See `docs/operations.md`.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};
use meterflow_runtime::args::{ClickHouseArgs, KafkaArgs, TopicArgs};
use meterflow_runtime::checkpoint::{
    epoch_of, version_in, Checkpoint, CheckpointKey, CheckpointStore, Envelope, Meta, OperatorDecision,
};
use meterflow_runtime::store::CheckpointStorage as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;

/// The services that keep checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    Aggregator,
    Rater,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Self::Aggregator => "aggregator",
            Self::Rater => "rater",
        }
    }

    /// Input topics (partition N of each belongs to state N); the first names the checkpoint.
    pub fn topics(self, t: &TopicArgs) -> Vec<String> {
        match self {
            Self::Aggregator => vec![t.usage_topic.clone()],
            Self::Rater => vec![t.aggregates_topic.clone(), t.wallet_topic.clone()],
        }
    }

    pub fn default_group(self) -> &'static str {
        match self {
            Self::Aggregator => "meterflow-aggregator",
            Self::Rater => "meterflow-rater",
        }
    }
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Row {
    partition: i32,
    version: u64,
    next_offset: i64,
    #[serde(with = "serde_bytes")]
    state: Vec<u8>,
    written: String,
}

/// One partition's newest checkpoint, as `show` prints it.
#[derive(Debug, Clone)]
pub struct Shown {
    pub partition: i32,
    pub version: u64,
    pub next_offset: i64,
    pub meta: Meta,
    pub written: String,
    pub committed: BTreeMap<String, Option<i64>>,
}

fn client(ch: &ClickHouseArgs) -> clickhouse::Client {
    meterflow_runtime::clickhouse::client(ch)
}

/// The newest checkpoint (a base or a delta) of every partition of `service`/`group`, with
/// the group's committed offsets next to it.
pub async fn show(
    ch: &ClickHouseArgs,
    kafka: &KafkaArgs,
    topics: &TopicArgs,
    service: Service,
    group: &str,
) -> Result<Vec<Shown>> {
    let names = service.topics(topics);
    let rows: Vec<Row> = client(ch)
        .query(
            // The newest checkpoint, a base or a delta (its envelope carries the offsets).
            // (`v`, not `version`: ClickHouse 18.16 resolves an alias named like an argument of
            // its own aggregate as a nested aggregate.)
            "SELECT partition, max(v) AS version, argMax(next_offset, v) AS next_offset, \
             argMax(state, v) AS state, toString(argMax(written_at, v)) AS written FROM ( \
             SELECT partition, version AS v, next_offset, state, written_at FROM checkpoints \
             WHERE service = ? AND consumer_group = ? AND topic = ? UNION ALL \
             SELECT partition, version AS v, next_offset, state, written_at FROM checkpoint_deltas \
             WHERE service = ? AND consumer_group = ? AND topic = ?) \
             GROUP BY partition ORDER BY partition",
        )
        .bind(service.name())
        .bind(group)
        .bind(&names[0])
        .bind(service.name())
        .bind(group)
        .bind(&names[0])
        .fetch_all()
        .await
        .context("reading checkpoints")?;
    let consumer: BaseConsumer = meterflow_runtime::kafka::consumer_config(kafka, group)?.create()?;
    let mut out = Vec::new();
    for r in rows {
        let env = Envelope::decode(&r.state).with_context(|| format!("partition {}", r.partition))?;
        let mut committed = BTreeMap::new();
        for t in &names {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(t, r.partition);
            let got = consumer.committed_offsets(tpl, std::time::Duration::from_secs(10))?;
            let o = got.elements().first().and_then(|e| match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            });
            committed.insert(t.clone(), o);
        }
        out.push(Shown {
            partition: r.partition,
            version: r.version,
            next_offset: r.next_offset,
            meta: env.meta,
            written: r.written,
            committed,
        });
    }
    Ok(out)
}

/// What `replay` and `reset` write.
#[derive(Debug, Clone)]
pub struct Decision {
    pub service: Service,
    pub group: String,
    pub partition: i32,
    /// Offsets per input topic the fresh state starts from.
    pub offsets: BTreeMap<String, i64>,
    pub action: &'static str,
    pub note: String,
}

/// Writes an operator checkpoint: the service will start `partition` with fresh state at the
/// given offsets (instead of refusing), numbering aggregates after the highest `seq` already
/// in `meter_aggregates` so that the rater does not skip them. Returns the version written.
pub async fn decide(ch: &ClickHouseArgs, topics: &TopicArgs, d: &Decision) -> Result<u64> {
    let names = d.service.topics(topics);
    for t in d.offsets.keys() {
        if !names.contains(t) {
            bail!("topic {t} is not an input of the {}", d.service.name());
        }
    }
    let c = client(ch);
    let store = CheckpointStore::new(c.clone());
    let stored = store.max_versions(d.service.name(), &d.group, &names[0]).await?;
    let top = stored.get(&d.partition).copied().unwrap_or(0);
    let next_seq = match d.service {
        Service::Aggregator => {
            let max: i64 = c
                .query("SELECT max(seq) FROM meter_aggregates WHERE source_partition = ?")
                .bind(d.partition)
                .fetch_one()
                .await
                .context("reading the highest seq in meter_aggregates")?;
            Some(max + 1)
        }
        Service::Rater => None,
    };
    let version = version_in(epoch_of(top) + 1, 0);
    let env = Envelope {
        meta: Meta {
            offsets: d.offsets.clone(),
            operator: Some(OperatorDecision { action: d.action.to_owned(), next_seq, note: d.note.clone() }),
            ..Meta::default()
        },
        state: Vec::new(),
    };
    let key = CheckpointKey {
        service: d.service.name().to_owned(),
        consumer_group: d.group.clone(),
        topic: names[0].clone(),
        partition: d.partition,
    };
    let next_offset = d.offsets.get(&names[0]).copied().unwrap_or(0);
    store
        .save_all(&[(key, Checkpoint { version, next_offset, state: env.encode() })])
        .await
        .context("writing the operator checkpoint")?;
    Ok(version)
}
