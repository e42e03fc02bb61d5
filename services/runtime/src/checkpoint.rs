//! Durable service state next to the source offsets it covers, in ClickHouse.
//!
//! Kafka transactions are not available on every Kafka-API broker (the local one refuses
//! them), so effectively-once rests on this table instead: a service flushes its outputs,
//! then writes its state with the offset up to which the state is complete, then commits
//! that offset to the consumer group. A restart reads the newest checkpoint and skips input
//! below its offset; outputs are deterministic, so whatever was re-emitted is identical.

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
    /// Monotonic per key: the newest wins.
    pub version: u64,
    /// First offset of `topic`/`partition` the state does not cover.
    pub next_offset: i64,
    pub state: Vec<u8>,
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
