//! What the partitioned loop needs of a checkpoint store: the ClickHouse table in production
//! ([`CheckpointStore`]), a map in [`crate::memory`] for tests of the protocol.

use std::collections::BTreeMap;
use std::future::Future;

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
}
