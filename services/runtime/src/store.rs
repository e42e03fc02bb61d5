//! What the partitioned loop needs of a checkpoint store: the ClickHouse table in production
//! ([`CheckpointStore`]), a map in `memory` (the `memory` feature) for tests of the protocol.

use std::collections::BTreeMap;
use std::future::Future;

use crate::chain::StoredDelta;
use crate::checkpoint::{Checkpoint, CheckpointKey, CheckpointStore};
use crate::Error;

/// Checkpoints of partitions, versioned (the highest version of a key wins; see
/// [`crate::checkpoint`] for fencing). Cloned into the task that saves a batch's checkpoints.
pub trait CheckpointStorage: Clone + Send + Sync + 'static {
    /// The newest checkpoint of `key`, if any.
    fn load(&self, key: &CheckpointKey) -> impl Future<Output = Result<Option<Checkpoint>, Error>> + Send;

    /// The newest stored version of every partition of (service, group, topic).
    fn max_versions(
        &self,
        service: &str,
        group: &str,
        topic: &str,
    ) -> impl Future<Output = Result<BTreeMap<i32, u64>, Error>> + Send;

    /// Stores `items` together (all or, on an error, possibly some: each is a complete
    /// checkpoint, so a partial save is an older position, never a wrong one).
    fn save_all(&self, items: &[(CheckpointKey, Checkpoint)]) -> impl Future<Output = Result<(), Error>> + Send;

    /// The stored deltas of `key` that name `base_version` as their base, in version order
    /// (checked by [`crate::chain::contiguous`]).
    fn load_deltas(&self, key: &CheckpointKey, base_version: u64) -> impl Future<Output = Result<Vec<StoredDelta>, Error>> + Send;

    /// The base that the delta `version` of `key` builds on; `None` if there is no such delta
    /// or its base is gone. (The head of a chain that crossed epochs, when a fenced instance
    /// wrote a newer base meanwhile: see [`crate::chain`].)
    fn load_base_of(&self, key: &CheckpointKey, version: u64) -> impl Future<Output = Result<Option<Checkpoint>, Error>> + Send;

    /// Stores deltas together.
    fn save_deltas(&self, items: &[(CheckpointKey, StoredDelta)]) -> impl Future<Output = Result<(), Error>> + Send;

    /// Deletes the deltas below the given version of each partition (`bases`: partition ->
    /// the base of the chain a new base replaced) of (service, group, topic).
    fn drop_superseded(
        &self,
        service: &str,
        group: &str,
        topic: &str,
        bases: &BTreeMap<i32, u64>,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

impl CheckpointStorage for CheckpointStore {
    fn load(&self, key: &CheckpointKey) -> impl Future<Output = Result<Option<Checkpoint>, Error>> + Send {
        CheckpointStore::load(self, key)
    }

    fn max_versions(
        &self,
        service: &str,
        group: &str,
        topic: &str,
    ) -> impl Future<Output = Result<BTreeMap<i32, u64>, Error>> + Send {
        CheckpointStore::max_versions(self, service, group, topic)
    }

    fn save_all(&self, items: &[(CheckpointKey, Checkpoint)]) -> impl Future<Output = Result<(), Error>> + Send {
        CheckpointStore::save_all(self, items)
    }

    fn load_deltas(&self, key: &CheckpointKey, base_version: u64) -> impl Future<Output = Result<Vec<StoredDelta>, Error>> + Send {
        CheckpointStore::load_deltas(self, key, base_version)
    }

    fn load_base_of(&self, key: &CheckpointKey, version: u64) -> impl Future<Output = Result<Option<Checkpoint>, Error>> + Send {
        CheckpointStore::load_base_of(self, key, version)
    }

    fn save_deltas(&self, items: &[(CheckpointKey, StoredDelta)]) -> impl Future<Output = Result<(), Error>> + Send {
        CheckpointStore::save_deltas(self, items)
    }

    fn drop_superseded(
        &self,
        service: &str,
        group: &str,
        topic: &str,
        bases: &BTreeMap<i32, u64>,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        CheckpointStore::drop_superseded(self, service, group, topic, bases)
    }
}
