//! The ingest-ledger checks of the audit: every offset of every source partition accounted for
//! exactly once ([`meterflow_core::ledger::check`]), and the ledger's counts matched against
//! what is actually stored: its accepted records against the usage rows by source offset, its
//! dead-lettered ones against the dead letters of the usage topic.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use clickhouse::Client;
use rust_decimal::Decimal;
use serde::Deserialize;

use meterflow_core::ledger::{self, LedgerEntry};

use super::Finding;

#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
struct EntryRow {
    topic: String,
    partition: i32,
    first_offset: i64,
    last_offset: i64,
    accepted: u64,
    duplicates: u64,
    dead_lettered: u64,
    ticks: u64,
}

impl From<EntryRow> for LedgerEntry {
    fn from(r: EntryRow) -> Self {
        Self {
            topic: r.topic,
            partition: r.partition,
            first_offset: r.first_offset,
            last_offset: r.last_offset,
            accepted: r.accepted,
            duplicates: r.duplicates,
            dead_lettered: r.dead_lettered,
            dead_letter_reasons: Vec::new(),
            dead_letter_counts: Vec::new(),
            ticks: r.ticks,
        }
    }
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct StoredRow {
    partition: i32,
    n: u64,
}

fn subject(topic: &str, partition: i32, from: i64, to: i64) -> String {
    format!("{topic}/{partition} offsets {from}..={to}")
}

/// The conservation law on the entries (pure; see the core module).
pub fn findings(entries: &[LedgerEntry]) -> Vec<Finding> {
    ledger::check(entries)
        .into_iter()
        .map(|f| Finding {
            check: f.check.into(),
            tenant: String::new(),
            subject: subject(&f.topic, f.partition, f.from_offset, f.to_offset),
            expected: Decimal::from(f.expected),
            actual: Decimal::from(f.actual),
            detail: f.detail,
        })
        .collect()
}

/// The latest entry of each partition: the widest prefix the ledger vouches for.
fn latest(entries: &[LedgerEntry]) -> BTreeMap<(String, i32), &LedgerEntry> {
    let mut out: BTreeMap<(String, i32), &LedgerEntry> = BTreeMap::new();
    for e in entries {
        let slot = out.entry((e.topic.clone(), e.partition)).or_insert(e);
        if (e.last_offset, e.first_offset) > (slot.last_offset, slot.first_offset) {
            *slot = e;
        }
    }
    out
}

/// Distinct source offsets per partition of `table` inside each partition's latest range.
async fn stored(client: &Client, table: &str, extra: &str, ranges: &[&LedgerEntry]) -> Result<BTreeMap<i32, u64>> {
    if ranges.is_empty() {
        return Ok(BTreeMap::new());
    }
    let within: Vec<String> = ranges
        .iter()
        .map(|e| format!("(source_partition = {} AND source_offset BETWEEN {} AND {})", e.partition, e.first_offset, e.last_offset))
        .collect();
    let rows: Vec<StoredRow> = client
        .query(&format!(
            "SELECT source_partition AS partition, toUInt64(uniqExact(source_offset)) AS n FROM {table} \
             WHERE {extra} ({}) GROUP BY source_partition",
            within.join(" OR ")
        ))
        .fetch_all()
        .await
        .with_context(|| format!("counting {table} per source partition"))?;
    Ok(rows.into_iter().map(|r| (r.partition, r.n)).collect())
}

/// Reads the ledger and runs every ingest check; returns the findings and the number of
/// entries checked.
pub async fn check(client: &Client) -> Result<(Vec<Finding>, u64)> {
    let rows: Vec<EntryRow> = client
        .query("SELECT topic, partition, first_offset, last_offset, accepted, duplicates, dead_lettered, ticks FROM ingest_ledger_dedup")
        .fetch_all()
        .await
        .context("reading ingest_ledger_dedup")?;
    let entries: Vec<LedgerEntry> = rows.into_iter().map(LedgerEntry::from).collect();
    let mut out = findings(&entries);
    // The usage topic(s) the ledger covers; usage rows carry no topic, so this needs one.
    let latest = latest(&entries);
    let topics: std::collections::BTreeSet<&str> = latest.keys().map(|(t, _)| t.as_str()).collect();
    for topic in topics {
        let ranges: Vec<&LedgerEntry> = latest.values().copied().filter(|e| e.topic == topic).collect();
        let accepted = stored(client, "usage_events", "", &ranges).await?;
        let dead = stored(client, "dead_letters", &format!("source_topic = '{}' AND", topic.replace('\'', "")), &ranges).await?;
        for e in ranges {
            let s = subject(topic, e.partition, e.first_offset, e.last_offset);
            for (check, want, got, what) in [
                ("ingest_accepted", e.accepted, accepted.get(&e.partition).copied().unwrap_or(0), "usage_events rows"),
                ("ingest_dead_letters", e.dead_lettered, dead.get(&e.partition).copied().unwrap_or(0), "dead_letters rows"),
            ] {
                if want != got {
                    out.push(Finding {
                        check: check.into(),
                        tenant: String::new(),
                        subject: s.clone(),
                        expected: Decimal::from(want),
                        actual: Decimal::from(got),
                        detail: format!("the ledger counts {want}, {what} with these source offsets: {got}"),
                    });
                }
            }
        }
    }
    Ok((out, entries.len() as u64))
}
