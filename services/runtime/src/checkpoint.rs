//! Durable service state next to the source offsets it covers, in ClickHouse.
//!
//! Kafka transactions are not available on every Kafka-API broker (the local one refuses
//! them), so effectively-once rests on this table instead: a service flushes its outputs,
//! then writes its state with the offsets up to which the state is complete, then commits
//! those offsets to the consumer group. On assignment the newest checkpoint decides where
//! consumption resumes (committed offsets are only a hint, and are checked against it).
//!
//! **Fencing.** `version` is `epoch << 32 | n`. Every instance that takes a partition over
//! claims it by writing a checkpoint in a new epoch (higher than any stored one) before it
//! processes a record; before each later checkpoint it re-reads the newest stored version and
//! gives the partition up if someone else's is higher. A stale instance (paused, partitioned
//! away, stuck in a ClickHouse outage) can therefore never have its checkpoint chosen over the
//! new owner's, because every reader takes the highest version. See `docs/operations.md`.
//!
//! The state is wrapped in an [`Envelope`] that also records what it was computed against
//! (partition counts, configuration hash) and the offsets per topic, so that a changed topic
//! or an operator's decision is recognised at start.

use std::collections::BTreeMap;

use clickhouse::Client;
use serde::{Deserialize, Serialize};

use crate::Error;

/// Identifies one input partition of one service deployment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckpointKey {
    pub service: String,
    pub consumer_group: String,
    pub topic: String,
    pub partition: i32,
}

/// A stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// `epoch << 32 | n`: the newest (highest) wins.
    pub version: u64,
    /// First offset of the key's topic/partition the state does not cover.
    pub next_offset: i64,
    /// The [`Envelope`] bytes (older checkpoints: the bare service state).
    pub state: Vec<u8>,
}

/// The epoch part of a checkpoint version.
pub fn epoch_of(version: u64) -> u64 {
    version >> 32
}

/// A version in `epoch`.
pub fn version_in(epoch: u64, n: u64) -> u64 {
    (epoch << 32) | (n & 0xFFFF_FFFF)
}

const MAGIC: &[u8; 4] = b"MFCP";
const ENVELOPE_VERSION: u8 = 1;

/// What a checkpoint was computed against, next to the service's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Next offset per input topic (partition N of each).
    #[serde(default)]
    pub offsets: BTreeMap<String, i64>,
    /// Partition count of each input topic when the state was written: records are routed by
    /// tenant, so a changed count moves tenants between states.
    #[serde(default)]
    pub partition_counts: BTreeMap<String, i32>,
    /// Hash of the configuration the state depends on (meters, catalog).
    #[serde(default)]
    pub config_hash: String,
    /// That configuration itself, so that a restart with a changed one can first replay what
    /// was already output under the old one (docs/operations.md, "Changing configuration").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub config_text: String,
    /// Set by `meterflow-admin checkpoint replay|reset`: an operator's decision, which the
    /// service follows instead of refusing to start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<OperatorDecision>,
}

/// An operator's explicit decision about a partition whose checkpoint and outputs disagree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorDecision {
    /// `replay` (fresh state from the given offsets) or `reset` (fresh state from the
    /// beginning of the topics).
    pub action: String,
    /// The `seq` the first aggregate emitted after the decision gets (the aggregator), so
    /// that consumers that already rated lower ones do not skip new output.
    #[serde(default)]
    pub next_seq: Option<i64>,
    #[serde(default)]
    pub note: String,
}

/// The hash recorded for a configuration text.
pub fn config_hash(text: &str) -> String {
    format!("{:08x}", crc32fast::hash(text.as_bytes()))
}

/// A decoded checkpoint state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    pub meta: Meta,
    pub state: Vec<u8>,
}

impl Envelope {
    /// `MFCP`, version byte, meta length (u32 LE), meta JSON, state, CRC-32 of all before it.
    pub fn encode(&self) -> Vec<u8> {
        // Plain data: serialising it cannot fail.
        let meta = serde_json::to_vec(&self.meta).unwrap_or_default();
        let mut out = Vec::with_capacity(13 + meta.len() + self.state.len());
        out.extend_from_slice(MAGIC);
        out.push(ENVELOPE_VERSION);
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&self.state);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes an envelope; bytes without the magic are a checkpoint from before envelopes
    /// (the bare state, no meta).
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        if !bytes.starts_with(MAGIC) {
            return Ok(Self { meta: Meta::default(), state: bytes.to_vec() });
        }
        let bad = |m: &str| Error::Other(format!("checkpoint envelope: {m}"));
        if bytes.len() < 13 {
            return Err(bad("truncated"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(body) != crc {
            return Err(bad("checksum mismatch (corrupted checkpoint)"));
        }
        if body[4] != ENVELOPE_VERSION {
            return Err(bad(&format!("unknown envelope version {}", body[4])));
        }
        let len = u32::from_le_bytes([body[5], body[6], body[7], body[8]]) as usize;
        let meta_bytes = body.get(9..9 + len).ok_or_else(|| bad("meta length beyond the end"))?;
        let meta: Meta = serde_json::from_slice(meta_bytes).map_err(|e| bad(&format!("meta: {e}")))?;
        Ok(Self { meta, state: body[9 + len..].to_vec() })
    }
}

#[derive(Debug, clickhouse::Row, Serialize)]
struct CheckpointRow<'a> {
    service: &'a str,
    consumer_group: &'a str,
    topic: &'a str,
    partition: i32,
    version: u64,
    next_offset: i64,
    #[serde(with = "serde_bytes")]
    state: &'a [u8],
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct LoadedRow {
    version: u64,
    next_offset: i64,
    #[serde(with = "serde_bytes")]
    state: Vec<u8>,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct MaxRow {
    partition: i32,
    version: u64,
}

/// Reads and writes checkpoints.
#[derive(Clone)]
pub struct CheckpointStore {
    client: Client,
}

impl std::fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CheckpointStore")
    }
}

impl CheckpointStore {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// The newest checkpoint of `key`, if any.
    pub async fn load(&self, key: &CheckpointKey) -> Result<Option<Checkpoint>, Error> {
        let rows = self
            .client
            .query(
                "SELECT version, next_offset, state FROM checkpoints \
                 WHERE service = ? AND consumer_group = ? AND topic = ? AND partition = ? \
                 ORDER BY version DESC LIMIT 1",
            )
            .bind(&key.service)
            .bind(&key.consumer_group)
            .bind(&key.topic)
            .bind(key.partition)
            .fetch_all::<LoadedRow>()
            .await?;
        Ok(rows.into_iter().next().map(|r| Checkpoint {
            version: r.version,
            next_offset: r.next_offset,
            state: r.state,
        }))
    }

    /// The newest stored version of every partition of (service, group, topic): the fencing
    /// check before a checkpoint is written.
    pub async fn max_versions(&self, service: &str, group: &str, topic: &str) -> Result<BTreeMap<i32, u64>, Error> {
        let rows = self
            .client
            .query(
                "SELECT partition, max(version) AS version FROM checkpoints \
                 WHERE service = ? AND consumer_group = ? AND topic = ? GROUP BY partition",
            )
            .bind(service)
            .bind(group)
            .bind(topic)
            .fetch_all::<MaxRow>()
            .await?;
        Ok(rows.into_iter().map(|r| (r.partition, r.version)).collect())
    }

    /// Writes several checkpoints in one insert (one per partition a service owns).
    pub async fn save_all(&self, items: &[(CheckpointKey, Checkpoint)]) -> Result<(), Error> {
        if items.is_empty() {
            return Ok(());
        }
        let mut insert = self.client.insert::<CheckpointRow<'_>>("checkpoints").await?;
        for (k, c) in items {
            insert
                .write(&CheckpointRow {
                    service: &k.service,
                    consumer_group: &k.consumer_group,
                    topic: &k.topic,
                    partition: k.partition,
                    version: c.version,
                    next_offset: c.next_offset,
                    state: &c.state,
                })
                .await?;
        }
        insert.end().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip_and_corruption() {
        let e = Envelope {
            meta: Meta {
                offsets: [("t".to_string(), 42)].into(),
                partition_counts: [("t".to_string(), 2)].into(),
                config_hash: "abc".into(),
                config_text: "x = 1".into(),
                operator: None,
            },
            state: b"state bytes".to_vec(),
        };
        let bytes = e.encode();
        assert_eq!(Envelope::decode(&bytes).unwrap(), e);
        let mut bad = bytes.clone();
        bad[14] ^= 1;
        assert!(Envelope::decode(&bad).is_err());
        // A checkpoint from before envelopes is the bare state.
        let legacy = Envelope::decode(b"{\"version\":1}").unwrap();
        assert_eq!(legacy.state, b"{\"version\":1}");
        assert_eq!(legacy.meta, Meta::default());
    }

    #[test]
    fn versions_order_by_epoch_first() {
        assert!(version_in(2, 0) > version_in(1, u32::MAX as u64));
        assert_eq!(epoch_of(version_in(7, 9)), 7);
        // Checkpoints written before epochs (small plain versions) are epoch 0.
        assert_eq!(epoch_of(12), 0);
    }
}
