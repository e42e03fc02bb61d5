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
//! processes a record: a delta continuing the chain it loaded, or a full base (see
//! [`crate::chain`]); before each later checkpoint it re-reads the newest stored version and
//! gives the partition up if someone else's is higher. A stale instance (paused, partitioned
//! away, stuck in a ClickHouse outage) can therefore never have its checkpoint chosen over the
//! new owner's: every reader follows the chain of the highest version, and what the stale one
//! wrote after the new owner loaded is a fork in a lower epoch, off that chain. See
//! `docs/operations.md`.
//!
//! The state is wrapped in an [`Envelope`] (`meterflow_core::checkpoint`, the one format of
//! both services) that also records what it was computed against (partition counts,
//! configuration hash) and the offsets per topic, so that a changed topic or an operator's
//! decision is recognised at start.

use std::collections::BTreeMap;

use clickhouse::Client;
use serde::{Deserialize, Serialize};

pub use meterflow_core::checkpoint::{config_hash, Envelope, Meta, OperatorDecision};

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

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The newest checkpoint of `key`, if any.
    pub async fn load(&self, key: &CheckpointKey) -> Result<Option<Checkpoint>, Error> {
        let rows = self
            .client
            .query(
                // The newest version first, then only its row: until ReplacingMergeTree merges,
                // every older state (tens of MiB each) is still stored, and ORDER BY .. LIMIT 1
                // would read all of them.
                "SELECT version, next_offset, state FROM checkpoints \
                 WHERE service = ? AND consumer_group = ? AND topic = ? AND partition = ? \
                 AND version = (SELECT max(version) FROM checkpoints \
                 WHERE service = ? AND consumer_group = ? AND topic = ? AND partition = ?) \
                 LIMIT 1",
            )
            .bind(&key.service)
            .bind(&key.consumer_group)
            .bind(&key.topic)
            .bind(key.partition)
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

    /// The newest stored version of every partition of (service, group, topic), bases and
    /// deltas: the fencing check before a checkpoint is written, and the epoch a claim beats.
    pub async fn max_versions(&self, service: &str, group: &str, topic: &str) -> Result<BTreeMap<i32, u64>, Error> {
        let rows = self
            .client
            .query(
                "SELECT partition, max(version) AS version FROM (\
                 SELECT partition, version FROM checkpoints WHERE service = ? AND consumer_group = ? AND topic = ? \
                 UNION ALL \
                 SELECT partition, version FROM checkpoint_deltas WHERE service = ? AND consumer_group = ? AND topic = ?\
                 ) GROUP BY partition",
            )
            .bind(service)
            .bind(group)
            .bind(topic)
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
    fn versions_order_by_epoch_first() {
        assert!(version_in(2, 0) > version_in(1, u32::MAX as u64));
        assert_eq!(epoch_of(version_in(7, 9)), 7);
        // Checkpoints written before epochs (small plain versions) are epoch 0.
        assert_eq!(epoch_of(12), 0);
    }
}
