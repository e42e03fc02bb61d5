//! The batch being written while the loop keeps consuming (double buffering).
//!
//! At most one batch is in flight; the loop fills the next one meanwhile and pauses consuming
//! only when that one is full too, so memory stays bounded during an outage (two batches at
//! most) while, in normal operation, processing and writing overlap instead of adding up.
//!
//! A checkpoint travels with the batch that was taken at the same moment as its snapshot: the
//! snapshot's offsets are covered exactly by the outputs of that batch and of the batches
//! before it, all written before it (one batch in flight at a time). So the checkpoint is
//! saved only after its batch is written, and the consumer's offsets are committed only after
//! the checkpoint is durable: the protocol of `docs/design.md` (flush, then checkpoint, then
//! commit) holds per batch.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Instant;

use metrics::counter;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::chain::{DeltaLink, StoredDelta};
use crate::checkpoint::{Checkpoint, CheckpointKey, Envelope};
use crate::retry::{until_ok, Backoff};
use crate::store::CheckpointStorage;

/// A checkpoint waiting for its batch to be written.
#[derive(Debug, Clone)]
pub(crate) struct Staged {
    pub partition: i32,
    pub key: CheckpointKey,
    pub version: u64,
    pub envelope: Envelope,
    pub offsets: BTreeMap<String, i64>,
    /// Version of the loop's claim when the snapshot was taken: the checkpoint applies (its
    /// offsets are committed) only if the partition is still held under that version.
    pub base_version: u64,
    /// Seconds the snapshot took (the loop was paused for them).
    pub snapshot_secs: f64,
    /// `Some`: the state is a delta on this chain (saved to `checkpoint_deltas`); `None`: a
    /// full checkpoint, a new base.
    pub delta: Option<DeltaLink>,
    /// The base of the chain this checkpoint extends or, as a new base, replaces.
    pub replaces: Option<u64>,
}

impl Staged {
    fn checkpoint(&self) -> Checkpoint {
        let next_offset = self.offsets.get(&self.key.topic).copied().unwrap_or(0);
        Checkpoint { version: self.version, next_offset, state: self.envelope.encode() }
    }
}

/// What became of a batch and the checkpoints that travelled with it.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    /// False: the writes were stopped (the final drain ran out of time); nothing after the
    /// batch happened.
    pub written: bool,
    /// Checkpoints now durable.
    pub saved: Vec<Staged>,
    /// Partitions another instance claimed meanwhile (fencing), with their stored version:
    /// their checkpoints were not written.
    pub fenced: Vec<(Staged, u64)>,
    /// Seconds of the fencing check and the save (after the batch was written).
    pub save_secs: f64,
    /// The writer failed (a panic: a bug). Its rows are lost from memory, so nothing after
    /// them may be checkpointed: the loop stops, and a restart re-derives them.
    pub failed: Option<String>,
}

/// Metric names the writer reports under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Names {
    pub errors: &'static str,
}

/// The batch in flight. Dropping it (the loop was dropped, as an aborted task is) aborts the
/// write: nothing of a dead loop keeps writing in the background.
pub(crate) struct InFlight {
    handle: JoinHandle<Settled>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl InFlight {
    /// Spawns `write`, then the fencing check and the save of `staged`.
    pub fn spawn<F, St>(write: F, staged: Vec<Staged>, store: St, stop: CancellationToken, names: Names) -> Self
    where
        F: Future<Output = bool> + Send + 'static,
        St: CheckpointStorage,
    {
        let handle = tokio::spawn(async move {
            if !write.await {
                return Settled::default();
            }
            if staged.is_empty() {
                return Settled { written: true, ..Settled::default() };
            }
            match save(staged, &store, &stop, names).await {
                Some(settled) => settled,
                // Stopped before the checkpoints were durable: the batch is written, which
                // is all a successor needs (it re-derives the rest).
                None => Settled { written: true, ..Settled::default() },
            }
        });
        Self { handle }
    }

    /// Waits until the batch (and its checkpoints) settled. Cancel safe: polling it again
    /// later resumes the same wait.
    pub async fn wait(&mut self) -> Settled {
        match (&mut self.handle).await {
            Ok(s) => s,
            Err(e) => Settled { failed: Some(e.to_string()), ..Settled::default() },
        }
    }
}

/// Fencing check, then the checkpoints of every partition nobody else claimed meanwhile.
/// `None` if `stop` fired first.
async fn save<St: CheckpointStorage>(staged: Vec<Staged>, store: &St, stop: &CancellationToken, names: Names) -> Option<Settled> {
    let errors = names.errors;
    let started = Instant::now();
    let key0 = staged[0].key.clone();
    let stored = until_ok(
        "read checkpoint versions",
        &Backoff::default(),
        stop,
        |_| counter!(errors, "sink" => "checkpoint").increment(1),
        || store.max_versions(&key0.service, &key0.consumer_group, &key0.topic),
    )
    .await?;
    let (mut keep, mut fenced) = (Vec::new(), Vec::new());
    for s in staged {
        match stored.get(&s.partition) {
            Some(&v) if v > s.base_version => fenced.push((s, v)),
            _ => keep.push(s),
        }
    }
    let (mut bases, mut deltas) = (Vec::new(), Vec::new());
    for s in &keep {
        match s.delta {
            None => bases.push((s.key.clone(), s.checkpoint())),
            Some(link) => deltas.push((s.key.clone(), StoredDelta { link, checkpoint: s.checkpoint() })),
        }
    }
    let on_error = |_: &crate::Error| counter!(errors, "sink" => "checkpoint").increment(1);
    if !bases.is_empty() {
        until_ok("write checkpoint", &Backoff::default(), stop, on_error, || store.save_all(&bases)).await?;
    }
    if !deltas.is_empty() {
        until_ok("write checkpoint delta", &Backoff::default(), stop, on_error, || store.save_deltas(&deltas)).await?;
    }
    // The chains before the one each new base replaces are superseded; the replaced one stays
    // until the next base, since an instance that claimed meanwhile may continue it (see
    // `crate::chain`). Not retried: the next compaction's delete covers whatever this leaves.
    let superseded: BTreeMap<i32, u64> =
        keep.iter().filter(|s| s.delta.is_none()).filter_map(|s| Some((s.partition, s.replaces?))).collect();
    if !superseded.is_empty() {
        if let Err(e) = store.drop_superseded(&key0.service, &key0.consumer_group, &key0.topic, &superseded).await {
            on_error(&e);
            tracing::warn!(error = %e, "deleting superseded checkpoint deltas failed; the next base retries");
        }
    }
    Some(Settled { written: true, saved: keep, fenced, save_secs: started.elapsed().as_secs_f64(), failed: None })
}
