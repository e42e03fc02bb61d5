//! The ingest ledger: what the aggregator did with every offset of a source partition, and
//! the conservation law the leakage audit checks on it.
//!
//! Each entry is *cumulative*: the engine's counters ([`EngineStats`]) for offsets
//! `first_offset..=last_offset`, where `first_offset` is the first offset the engine ever
//! covered. The aggregator writes one entry per partition with every flush, before the
//! checkpoint that covers the same offsets. Why cumulative rather than one row per
//! checkpointed range: a crash between the ledger insert and the checkpoint insert leaves a
//! row that the replay does not reproduce with the same range (the replay's flush boundary
//! differs), so range rows would overlap after every unlucky crash. A cumulative entry is a
//! true statement about a prefix of the log whichever run wrote it (processing is a pure
//! function of the checkpointed state and the log), and a replay reaching the same offset
//! writes a byte-identical row that `ReplacingMergeTree` folds.
//!
//! The law: `accepted + duplicates + dead_lettered + ticks = last_offset - first_offset + 1`.
//! A skipped offset range shows as a shortfall, offsets processed twice (state lost and the
//! partition reprocessed on top of what was already counted) as an excess or as a restart of
//! `first_offset` below offsets already accounted for.

use std::collections::BTreeMap;

use crate::engine::EngineStats;
use crate::RejectReason;

/// One ledger row (`ingest_ledger`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerEntry {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub accepted: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    /// Reject reasons with a non-zero count, in [`RejectReason::ALL`] order.
    pub dead_letter_reasons: Vec<String>,
    pub dead_letter_counts: Vec<u64>,
    pub ticks: u64,
}

impl LedgerEntry {
    /// The entry for an engine positioned at `next_offset`; `None` before it covered anything.
    pub fn of(topic: &str, partition: i32, stats: &EngineStats, next_offset: i64) -> Option<Self> {
        let first_offset = stats.first_offset?;
        let (reasons, counts) = RejectReason::ALL
            .iter()
            .filter(|r| stats.rejected(**r) > 0)
            .map(|r| (r.as_str().to_owned(), stats.rejected(*r)))
            .unzip();
        Some(Self {
            topic: topic.to_owned(),
            partition,
            first_offset,
            last_offset: next_offset - 1,
            accepted: stats.accepted,
            duplicates: stats.duplicates,
            dead_lettered: stats.rejected_total(),
            dead_letter_reasons: reasons,
            dead_letter_counts: counts,
            ticks: stats.ticks,
        })
    }

    /// Records accounted for.
    pub fn counted(&self) -> i64 {
        (self.accepted + self.duplicates + self.dead_lettered + self.ticks) as i64
    }

    /// Offsets of the range.
    pub fn span(&self) -> i64 {
        self.last_offset - self.first_offset + 1
    }

    fn counters(&self) -> [u64; 4] {
        [self.accepted, self.duplicates, self.dead_lettered, self.ticks]
    }
}

/// What the audit reports about one partition's ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerFinding {
    /// `ingest_gap` (offsets never accounted for), `ingest_overlap` (offsets accounted for
    /// twice) or `ingest_regressed` (a later entry counts less than an earlier one: the
    /// partition's history forked, its state was rolled back).
    pub check: &'static str,
    pub topic: String,
    pub partition: i32,
    /// The offsets the finding is about.
    pub from_offset: i64,
    pub to_offset: i64,
    pub expected: i64,
    pub actual: i64,
    pub detail: String,
}

/// Checks every partition's entries (any order, duplicates allowed). A finding is reported
/// where it first appears, not again for every later entry that still carries it.
pub fn check(entries: &[LedgerEntry]) -> Vec<LedgerFinding> {
    let mut by_partition: BTreeMap<(&str, i32), Vec<&LedgerEntry>> = BTreeMap::new();
    for e in entries {
        by_partition.entry((e.topic.as_str(), e.partition)).or_default().push(e);
    }
    let mut out = Vec::new();
    for ((topic, partition), mut es) in by_partition {
        es.sort_by_key(|e| (e.last_offset, e.first_offset));
        es.dedup();
        let finding = |check, from_offset, to_offset, expected, actual, detail| LedgerFinding {
            check,
            topic: topic.to_owned(),
            partition,
            from_offset,
            to_offset,
            expected,
            actual,
            detail,
        };
        // The imbalance (span - counted) already reported, and the previous entry.
        let mut prev: Option<(&LedgerEntry, i64)> = None;
        for e in es {
            let imbalance = e.span() - e.counted();
            let (from, reported) = match prev {
                Some((p, reported)) if p.first_offset == e.first_offset => {
                    if e.counters().iter().zip(p.counters()).any(|(now, before)| *now < before) {
                        out.push(finding(
                            "ingest_regressed",
                            p.last_offset + 1,
                            e.last_offset,
                            p.counted(),
                            e.counted(),
                            format!(
                                "the entry up to offset {} counts less than the one up to {}: two histories of this partition",
                                e.last_offset, p.last_offset
                            ),
                        ));
                    }
                    (p.last_offset + 1, reported)
                }
                Some((p, _)) => {
                    out.extend(continuity(p, e).map(|f| LedgerFinding { topic: topic.to_owned(), partition, ..f }));
                    (e.first_offset, 0)
                }
                None => (e.first_offset, 0),
            };
            if imbalance != reported {
                let new = imbalance - reported;
                let (check, detail) = if new > 0 {
                    ("ingest_gap", format!("{new} offsets in {from}..={} were never accounted for", e.last_offset))
                } else {
                    ("ingest_overlap", format!("{} records in {from}..={} accounted for twice", -new, e.last_offset))
                };
                out.push(finding(check, from, e.last_offset, e.span() - reported, e.counted(), detail));
            }
            prev = Some((e, imbalance));
        }
    }
    out
}

/// A break between consecutive entries `p` and `e` of different runs: the engine started
/// again from `e.first_offset` without the state that counted the offsets before, so they are
/// counted again (overlap) or skipped (gap). Topic and partition are left for the caller.
fn continuity(p: &LedgerEntry, e: &LedgerEntry) -> Option<LedgerFinding> {
    let finding = |check, from_offset, to_offset, expected, actual, detail| LedgerFinding {
        check,
        topic: String::new(),
        partition: 0,
        from_offset,
        to_offset,
        expected,
        actual,
        detail,
    };
    if e.first_offset <= p.last_offset {
        Some(finding(
            "ingest_overlap",
            e.first_offset,
            p.last_offset,
            0,
            p.last_offset - e.first_offset + 1,
            format!(
                "offsets {}..={} accounted for twice: the partition was processed again from offset {} without its checkpointed state",
                e.first_offset, p.last_offset, e.first_offset
            ),
        ))
    } else if e.first_offset > p.last_offset + 1 {
        Some(finding(
            "ingest_gap",
            p.last_offset + 1,
            e.first_offset - 1,
            e.first_offset - p.last_offset - 1,
            0,
            format!("offsets {}..={} were never accounted for", p.last_offset + 1, e.first_offset - 1),
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(partition: i32, first: i64, last: i64, accepted: u64, duplicates: u64, dead: u64, ticks: u64) -> LedgerEntry {
        LedgerEntry {
            topic: "u".into(),
            partition,
            first_offset: first,
            last_offset: last,
            accepted,
            duplicates,
            dead_lettered: dead,
            dead_letter_reasons: vec![],
            dead_letter_counts: vec![],
            ticks,
        }
    }

    fn checks(f: &[LedgerFinding]) -> Vec<(&str, i32, i64, i64)> {
        f.iter().map(|f| (f.check, f.partition, f.from_offset, f.to_offset)).collect()
    }

    #[test]
    fn balanced_prefixes_and_folded_replays_have_no_finding() {
        let e = [
            entry(0, 0, 9, 7, 2, 1, 0),
            entry(0, 0, 29, 25, 2, 1, 2),
            entry(0, 0, 29, 25, 2, 1, 2), // a replay reaching the same offset
            entry(0, 0, 17, 14, 2, 1, 1), // an orphan of a crash before its checkpoint
            entry(1, 40, 44, 4, 0, 0, 1), // a partition whose log starts at 40
        ];
        assert_eq!(check(&e), vec![]);
    }

    #[test]
    fn a_skipped_range_is_named_once_where_it_happened() {
        // Offsets 10..=29: only 10 of 20 counted; later entries carry the same shortfall.
        let e = [entry(0, 0, 9, 10, 0, 0, 0), entry(0, 0, 29, 20, 0, 0, 0), entry(0, 0, 49, 40, 0, 0, 0)];
        let f = check(&e);
        assert_eq!(checks(&f), vec![("ingest_gap", 0, 10, 29)]);
        assert_eq!((f[0].expected, f[0].actual), (30, 20));
    }

    #[test]
    fn reprocessing_without_state_is_an_overlap_and_a_rollback_a_regression() {
        let restarted = [entry(0, 0, 9, 10, 0, 0, 0), entry(0, 5, 19, 15, 0, 0, 0)];
        assert_eq!(checks(&check(&restarted)), vec![("ingest_overlap", 0, 5, 9)]);
        let forked = [entry(0, 0, 9, 10, 0, 0, 0), entry(0, 0, 19, 8, 12, 0, 0)];
        assert_eq!(checks(&check(&forked)), vec![("ingest_regressed", 0, 10, 19)]);
        let gap_between = [entry(3, 0, 9, 10, 0, 0, 0), entry(3, 15, 19, 5, 0, 0, 0)];
        assert_eq!(checks(&check(&gap_between)), vec![("ingest_gap", 3, 10, 14)]);
        let excess = [entry(0, 0, 9, 12, 0, 0, 0)];
        assert_eq!(checks(&check(&excess)), vec![("ingest_overlap", 0, 0, 9)]);
    }

    #[test]
    fn entries_come_from_the_engine_counters() {
        let mut stats = EngineStats { accepted: 5, duplicates: 1, ticks: 2, first_offset: Some(100), ..EngineStats::default() };
        stats.rejected[RejectReason::TooLate as usize] = 3;
        let e = LedgerEntry::of("u", 2, &stats, 111).unwrap();
        assert_eq!((e.first_offset, e.last_offset, e.dead_lettered, e.counted(), e.span()), (100, 110, 3, 11, 11));
        assert_eq!((e.dead_letter_reasons, e.dead_letter_counts), (vec!["too_late".to_owned()], vec![3]));
        assert!(LedgerEntry::of("u", 2, &EngineStats::default(), 0).is_none());
    }

    proptest! {
        /// Any outcome sequence with one skipped range: the audit finds exactly that range's
        /// size, however the flushes cut the log and whichever orphan entries a crash left.
        #[test]
        fn one_skip_is_found_exactly(
            outcomes in prop::collection::vec(0u8..4, 1..200),
            skip_at in 0usize..200,
            skip_len in 0i64..20,
            cuts in prop::collection::btree_set(0usize..200, 0..10),
        ) {
            let mut stats = EngineStats::default();
            let mut offset = 0i64;
            let mut entries = Vec::new();
            for (i, o) in outcomes.iter().enumerate() {
                if i == skip_at.min(outcomes.len() - 1) && i > 0 {
                    offset += skip_len;
                }
                stats.first_offset.get_or_insert(offset);
                match o {
                    0 => stats.accepted += 1,
                    1 => stats.duplicates += 1,
                    2 => stats.rejected[RejectReason::TooLate as usize] += 1,
                    _ => stats.ticks += 1,
                }
                offset += 1;
                if cuts.contains(&i) || i + 1 == outcomes.len() {
                    entries.push(LedgerEntry::of("u", 0, &stats, offset).unwrap());
                }
            }
            let f = check(&entries);
            let skipped: i64 = f.iter().filter(|f| f.check == "ingest_gap").map(|f| f.expected - f.actual).sum();
            let real = if skip_at.min(outcomes.len() - 1) > 0 { skip_len } else { 0 };
            prop_assert_eq!(skipped, real);
            prop_assert!(f.iter().all(|f| f.check == "ingest_gap"));
        }
    }
}
