//! Incremental checkpoints: a full checkpoint (a *base*, in `checkpoints`) followed by *deltas*
//! (in `checkpoint_deltas`), each the change since the checkpoint before it.
//!
//! * **One chain per base.** A delta row names its base (`base_version`) and the checkpoint it
//!   follows (`prev_version`: the base or the previous delta). Bases are written at every claim
//!   (a new epoch) and at every compaction, so a chain never crosses an epoch.
//! * **Load** = the newest base + its deltas in version order, contiguous from the base. A
//!   delta is only staged once the previous checkpoint of the partition is durable, and a
//!   checkpoint that was not saved forces a base next, so a gap means the table was damaged:
//!   that is an error, not a restart from the base. (Restarting from the base would resume
//!   behind the offsets already committed and outputs already written; the claim refuses
//!   that too.) Identical rows of one version (an insert retried after a lost answer) are one.
//! * **Fencing** reads the highest version over both tables, so an epoch is above every delta.
//! * **Compaction.** A base is written instead of a delta every `full_every` deltas, or once
//!   the deltas since the base add up to `max_ratio` of its size: restart reads a bounded
//!   chain. Deltas below the newest durable base are then deleted with one `ALTER TABLE ...
//!   DELETE` per batch of new bases (a mutation, which ClickHouse 18.16 runs in the
//!   background); a failed delete is retried by the next compaction's, which covers it.

use crate::checkpoint::Checkpoint;
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

/// The contiguous chain from `base_version` out of `rows` (that base's deltas in version
/// order). See the module docs for why a gap is an error.
pub fn contiguous(base_version: u64, rows: Vec<StoredDelta>) -> Result<Vec<StoredDelta>, Error> {
    let mut chain: Vec<StoredDelta> = Vec::with_capacity(rows.len());
    let mut at = base_version;
    for row in rows {
        if row.link.base_version != base_version {
            return Err(Error::Other(format!("delta {} belongs to base {}, not {base_version}", row.checkpoint.version, row.link.base_version)));
        }
        if let Some(last) = chain.last().filter(|l| l.checkpoint.version == row.checkpoint.version) {
            if last != &row {
                return Err(Error::Other(format!("two different deltas with version {}", row.checkpoint.version)));
            }
            continue;
        }
        if row.link.prev_version != at || row.checkpoint.version <= at {
            return Err(Error::Other(format!(
                "checkpoint chain of base {base_version} broken: delta {} follows {}, but the chain is at {at} \
                 (checkpoint_deltas damaged?)",
                row.checkpoint.version, row.link.prev_version
            )));
        }
        at = row.checkpoint.version;
        chain.push(row);
    }
    Ok(chain)
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
