//! Incremental checkpoints: a full checkpoint (a *base*, in `checkpoints`) followed by *deltas*
//! (in `checkpoint_deltas`), each the change since the checkpoint before it.
//!
//! * **One chain per base.** A delta row names its base (`base_version`) and the checkpoint it
//!   follows (`prev_version`: the base or the previous delta). Bases are written at every
//!   compaction and by claims that cannot continue the stored chain (a fresh partition, an
//!   operator's decision, a configuration switch, a service without deltas). Any other claim
//!   continues the chain it loaded with a delta in its new epoch (rewriting a 36 MiB state at
//!   every takeover is what made restarts slow), so a chain may cross epochs.
//! * **Load** = the newest base + the path of `prev_version` links from its highest-version
//!   delta back to it. Rows off that path are forks of a lower epoch than the head: a fenced
//!   instance that wrote after the new owner had loaded the chain (the new owner's claim links
//!   to what it loaded). They are ignored. A delta is only staged once the previous checkpoint
//!   of the partition is durable, and a checkpoint that was not saved forces a base next, so a
//!   gap on the path, a fork in the head's own epoch or two different rows of one version mean
//!   the table was damaged: that is an error, not a restart from the base. (Restarting from the
//!   base would resume behind the offsets already committed and outputs already written; the
//!   claim refuses that too.) Identical rows of one version (an insert retried after a lost
//!   answer) are one.
//! * **Fencing** reads the highest version over both tables, so an epoch is above every delta.
//! * **Compaction.** A base is written instead of a delta every `full_every` deltas, or once
//!   the deltas since the base add up to `max_ratio` of its size (counted from the base, also
//!   across claims): restart reads a bounded chain. The deltas of the chains *before* the one
//!   a new base replaces are then deleted (`version <` the replaced chain's base) with one
//!   `ALTER TABLE ... DELETE` per batch of new bases (a mutation, which ClickHouse 18.16 runs in
//!   the background); a failed delete is retried by the next compaction's, which covers it.
//!   The replaced chain itself stays until the next base: a fenced instance compacts too, and
//!   the new owner may have continued the chain it replaced.
//! * **The newest chain** is the one holding the partition's highest version, normally the
//!   newest base's. A fenced instance's base written after the new owner loaded is newer than
//!   the base the new owner's chain continues, but in a lower epoch than its head: a reader
//!   then follows the highest version's delta to its base ([`follows_older_base`]).

use std::collections::BTreeMap;

use crate::checkpoint::{epoch_of, Checkpoint};
use crate::Error;

/// Where a delta sits in its chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaLink {
    /// Version of the full checkpoint the chain starts from.
    pub base_version: u64,
    /// Version of the checkpoint this delta applies to (the base or the previous delta).
    pub prev_version: u64,
}

/// A stored delta: its link and the checkpoint (version, offset, envelope bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDelta {
    pub link: DeltaLink,
    pub checkpoint: Checkpoint,
}

/// The chain from `base_version` out of `rows` (that base's deltas in version order): the path
/// of `prev_version` links from the highest-version delta back to the base, in version order.
/// Rows off that path must be forks in a lower epoch than the head (a fenced instance that
/// wrote after the new owner had loaded the chain) and are ignored. See the module docs for
/// why a gap on the path, or two different rows of one version, are errors.
pub fn contiguous(base_version: u64, rows: Vec<StoredDelta>) -> Result<Vec<StoredDelta>, Error> {
    let mut by_version: BTreeMap<u64, StoredDelta> = BTreeMap::new();
    for row in rows {
        if row.link.base_version != base_version {
            return Err(Error::Other(format!("delta {} belongs to base {}, not {base_version}", row.checkpoint.version, row.link.base_version)));
        }
        match by_version.get(&row.checkpoint.version) {
            Some(known) if known != &row => {
                return Err(Error::Other(format!("two different deltas with version {}", row.checkpoint.version)));
            }
            Some(_) => {} // an insert retried after its answer was lost
            None => {
                by_version.insert(row.checkpoint.version, row);
            }
        }
    }
    let Some(head) = by_version.keys().next_back().copied() else { return Ok(Vec::new()) };
    let mut path = Vec::with_capacity(by_version.len());
    let mut at = head;
    while at != base_version {
        let Some(row) = by_version.remove(&at) else {
            return Err(Error::Other(format!(
                "checkpoint chain of base {base_version} broken: delta {at} is missing on the path to {head} \
                 (checkpoint_deltas damaged?)"
            )));
        };
        if row.link.prev_version >= at || row.link.prev_version < base_version {
            return Err(Error::Other(format!(
                "checkpoint chain of base {base_version} broken: delta {at} follows {} (checkpoint_deltas damaged?)",
                row.link.prev_version
            )));
        }
        at = row.link.prev_version;
        path.push(row);
    }
    if let Some(fork) = by_version.keys().find(|&&v| epoch_of(v) >= epoch_of(head)) {
        return Err(Error::Other(format!(
            "checkpoint chain of base {base_version} forked: delta {fork} is not on the path to {head} in the same \
             epoch (checkpoint_deltas damaged?)"
        )));
    }
    if !by_version.is_empty() {
        let ignored: Vec<u64> = by_version.into_keys().collect();
        tracing::warn!(base_version, head, ?ignored, "ignoring checkpoint deltas a fenced instance wrote off the chain");
    }
    path.reverse();
    Ok(path)
}

/// True if `top`, a partition's highest stored version, is in a later epoch than `head`, the
/// head of its newest base's chain: then `top` is a delta of a chain that a claim continued
/// from an older base, and the newest base is what a fenced instance wrote after that claim's
/// load. The chain of `top` is the partition's.
pub fn follows_older_base(top: u64, head: u64) -> bool {
    epoch_of(top) > epoch_of(head)
}

/// When a partition writes a base instead of a delta.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeltaPolicy {
    /// At most this many deltas after a base; 0: every checkpoint is a base (no deltas).
    pub full_every: u32,
    /// A base once the deltas since the last one add up to this fraction of its size.
    pub max_ratio: f64,
}

impl Default for DeltaPolicy {
    /// No deltas: what a service whose state is small wants.
    fn default() -> Self {
        Self { full_every: 0, max_ratio: 0.0 }
    }
}

/// A held partition's chain, as far as this instance knows it to be durable.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChainState {
    /// Version of the durable base the chain builds on (`None`: the next checkpoint is a base).
    pub base: Option<u64>,
    /// Version of the last durable checkpoint of the chain.
    pub at: u64,
    /// Version of the last checkpoint staged: if it is not `at`, it was never saved, and the
    /// service's state has moved its delta mark past the durable chain.
    pub staged: u64,
    pub deltas: u32,
    pub delta_bytes: u64,
    pub base_bytes: u64,
}

impl ChainState {
    /// The chain of a base just claimed (durable at `version`, `bytes` long).
    pub fn based(version: u64, bytes: usize) -> Self {
        Self { base: Some(version), at: version, staged: version, base_bytes: bytes as u64, ..Self::default() }
    }

    /// The chain loaded at a takeover: the base (`base_bytes` of state) and the states of the
    /// deltas on the path to the head, `head` the last one's version. A claim continuing it
    /// keeps counting towards compaction from the base, not from the claim.
    pub fn loaded(base: u64, base_bytes: usize, head: u64, delta_bytes: impl IntoIterator<Item = usize>) -> Self {
        let mut chain = Self::based(base, base_bytes);
        for bytes in delta_bytes {
            chain.deltas += 1;
            chain.delta_bytes += bytes as u64;
        }
        chain.at = head;
        chain.staged = head;
        chain
    }

    /// The link of the next checkpoint if it may be a delta under `policy`.
    pub fn next_delta(&self, policy: &DeltaPolicy) -> Option<DeltaLink> {
        let base = self.base?;
        let within = self.deltas < policy.full_every && (self.delta_bytes as f64) < policy.max_ratio * self.base_bytes as f64;
        (within && self.staged == self.at).then_some(DeltaLink { base_version: base, prev_version: self.at })
    }

    /// A checkpoint at `version` is being staged.
    pub fn staging(&mut self, version: u64) {
        self.staged = version;
    }

    /// A checkpoint of `bytes` at `version` is durable (`delta`: the chain it extends).
    pub fn saved(&mut self, version: u64, bytes: usize, delta: Option<DeltaLink>) {
        match delta {
            Some(link) if self.base == Some(link.base_version) && self.at == link.prev_version => {
                self.deltas += 1;
                self.delta_bytes += bytes as u64;
                self.at = version;
            }
            // Not the chain this tracks (cannot happen while one batch is in flight): a base next.
            Some(_) => *self = Self::default(),
            None => *self = Self::based(version, bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::version_in;

    fn delta(base: u64, prev: u64, version: u64) -> StoredDelta {
        StoredDelta {
            link: DeltaLink { base_version: base, prev_version: prev },
            checkpoint: Checkpoint { version, next_offset: version as i64 * 10, state: vec![version as u8] },
        }
    }

    #[test]
    fn a_chain_is_contiguous_from_its_base() {
        let rows = vec![delta(5, 5, 6), delta(5, 6, 7), delta(5, 6, 7), delta(5, 7, 8)];
        let chain = contiguous(5, rows).unwrap();
        assert_eq!(chain.iter().map(|d| d.checkpoint.version).collect::<Vec<_>>(), vec![6, 7, 8], "a retried row is one");
        assert!(contiguous(5, vec![]).unwrap().is_empty());
        // A gap, a fork, a foreign base: errors, never a shorter chain.
        assert!(contiguous(5, vec![delta(5, 5, 6), delta(5, 7, 8)]).is_err());
        let mut other = delta(5, 6, 7);
        other.checkpoint.state = vec![99];
        assert!(contiguous(5, vec![delta(5, 5, 6), delta(5, 6, 7), other]).is_err());
        assert!(contiguous(5, vec![delta(4, 5, 6)]).is_err());
        assert!(contiguous(5, vec![delta(5, 4, 6)]).is_err());
        // Two deltas after the same one in one epoch: damage, not a choice.
        assert!(contiguous(5, vec![delta(5, 5, 6), delta(5, 6, 7), delta(5, 6, 8)]).is_err());
    }

    #[test]
    fn a_chain_crosses_epochs_and_ignores_an_older_epochs_fork() {
        let (base, old) = (version_in(1, 0), |n| version_in(1, n));
        let new = |n| version_in(2, n);
        // Epoch 1 wrote two deltas; the new owner loaded them and claimed with a delta after
        // the second; the fenced epoch-1 instance still wrote a third after the claim.
        let rows = vec![
            delta(base, base, old(1)),
            delta(base, old(1), old(2)),
            delta(base, old(2), old(3)),
            delta(base, old(2), new(0)),
            delta(base, new(0), new(1)),
        ];
        let chain = contiguous(base, rows.clone()).unwrap();
        let versions: Vec<u64> = chain.iter().map(|d| d.checkpoint.version).collect();
        assert_eq!(versions, vec![old(1), old(2), new(0), new(1)], "the zombie's delta is off the path");
        // A gap on the path stays an error, also below the claim.
        let gap: Vec<StoredDelta> = rows.iter().filter(|d| d.checkpoint.version != old(1)).cloned().collect();
        assert!(contiguous(base, gap).unwrap_err().to_string().contains("broken"));
        // A fork in the head's epoch is damage.
        let mut forked = rows.clone();
        forked.push(delta(base, new(0), new(2)));
        assert!(contiguous(base, forked).unwrap_err().to_string().contains("forked"));
        // Without the claim the fenced instance's delta is the head (nobody else wrote).
        let chain = contiguous(base, rows[..3].to_vec()).unwrap();
        assert_eq!(chain.last().map(|d| d.checkpoint.version), Some(old(3)));
    }

    #[test]
    fn a_loaded_chain_keeps_counting_from_its_base() {
        let policy = DeltaPolicy { full_every: 3, max_ratio: 0.5 };
        let mut c = ChainState::loaded(10, 1000, 12, [10, 20]);
        assert_eq!((c.deltas, c.delta_bytes, c.base_bytes), (2, 30, 1000));
        // The claim continues the chain: its delta is the third since the base.
        let link = c.next_delta(&policy).expect("a delta");
        assert_eq!(link, DeltaLink { base_version: 10, prev_version: 12 });
        c.staging(version_in(1, 0));
        c.saved(version_in(1, 0), 5, Some(link));
        assert_eq!(c.next_delta(&policy), None, "three deltas since the base: a base is due");
        assert_eq!(ChainState::loaded(10, 1000, 10, []), ChainState::based(10, 1000));
    }

    #[test]
    fn bases_come_every_n_deltas_or_past_the_size_ratio() {
        let policy = DeltaPolicy { full_every: 3, max_ratio: 0.5 };
        let mut c = ChainState::default();
        assert_eq!(c.next_delta(&policy), None, "no base yet");
        c = ChainState::based(10, 1000);
        for v in 11..=13 {
            let link = c.next_delta(&policy).expect("a delta");
            assert_eq!(link, DeltaLink { base_version: 10, prev_version: v - 1 });
            c.staging(v);
            c.saved(v, 10, Some(link));
        }
        assert_eq!(c.next_delta(&policy), None, "three deltas: a base is due");
        c.staging(14);
        c.saved(14, 1000, None);
        let link = c.next_delta(&policy).unwrap();
        c.staging(15);
        c.saved(15, 600, Some(link));
        assert_eq!(c.next_delta(&policy), None, "deltas passed half the base");
        c.staging(16);
        c.saved(16, 1000, None);
        // Staged but never saved (the batch was not written, or fenced): the state's mark is
        // past the durable chain, so the next one is a base.
        c.staging(17);
        assert_eq!(c.next_delta(&policy), None);
        assert!(ChainState::based(16, 1000).next_delta(&DeltaPolicy::default()).is_none(), "the default writes no deltas");
    }
}
