//! The engine's counters: part of the snapshot, and what the ingest ledger publishes.

use super::codec::{bad, Reader, Writer};
use super::*;

/// Counters of one partition engine (part of the snapshot).
/// Invariant: `accepted + duplicates + rejected_total() == input()` is the number of
/// `on_event` plus `on_skipped` calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub accepted: u64,
    pub duplicates: u64,
    /// Indexed by `RejectReason as usize` (the order of [`RejectReason::ALL`]).
    pub rejected: [u64; RejectReason::ALL.len()],
    pub ticks: u64,
    /// Aggregates emitted (revision 0 and restatements).
    pub aggregates: u64,
    /// Of which restatements (revision > 0).
    pub restatements: u64,
    pub windows_opened: u64,
    pub windows_loaded: u64,
    pub windows_evicted: u64,
    /// The first offset this engine covered (or was positioned at by `start_at`): with
    /// `next_offset` it bounds the range the counters above account for, which is what the
    /// ingest ledger publishes and the leakage audit checks (see [`crate::ledger`]).
    pub first_offset: Option<i64>,
}

impl EngineStats {
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason as usize]
    }
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }
    /// Input records (events and skipped records, not ticks).
    pub fn input(&self) -> u64 {
        self.accepted + self.duplicates + self.rejected_total()
    }
    /// Every record the counters account for: input and ticks.
    pub fn records(&self) -> u64 {
        self.input() + self.ticks
    }
}

/// The counters as a checkpoint section (`first_offset` is written apart: see `codec::Header`).
pub(super) fn write_stats(w: &mut Writer, s: &EngineStats) {
    w.u64(s.accepted);
    w.u64(s.duplicates);
    w.len(s.rejected.len());
    for r in s.rejected {
        w.u64(r);
    }
    for v in [s.ticks, s.aggregates, s.restatements, s.windows_opened, s.windows_loaded, s.windows_evicted] {
        w.u64(v);
    }
}

pub(super) fn read_stats(r: &mut Reader<'_>) -> Result<EngineStats> {
    let mut s = EngineStats {
        accepted: r.u64()?,
        duplicates: r.u64()?,
        ..EngineStats::default()
    };
    // Reasons are only ever appended: a snapshot from before a new reason has fewer counters.
    let n = r.len(8)?;
    if n > s.rejected.len() {
        return Err(bad("reject reasons"));
    }
    for slot in s.rejected.iter_mut().take(n) {
        *slot = r.u64()?;
    }
    s.ticks = r.u64()?;
    s.aggregates = r.u64()?;
    s.restatements = r.u64()?;
    s.windows_opened = r.u64()?;
    s.windows_loaded = r.u64()?;
    s.windows_evicted = r.u64()?;
    Ok(s)
}
