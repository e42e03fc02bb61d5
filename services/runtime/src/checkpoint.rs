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

use clickhouse::Client;

pub use meterflow_core::checkpoint::{config_hash, Envelope, Meta, OperatorDecision};


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
