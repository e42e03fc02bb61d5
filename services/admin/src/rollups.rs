//! `meterflow-admin rollups [--repair]`: checks the usage rollups (migration 016) against the
//! windows they summarise, and repairs them.
//!
//! A rollup bucket must equal the sum of the latest values of its windows (`meter_totals`).
//! The materialized views keep that true for every revision inserted once; they add a
//! revision's delta again when it is inserted twice (an aggregator replaying after a restart
//! re-inserts revisions it wrote before its last checkpoint: meter_aggregates folds them, the
//! rollups cannot tell), and a revision inserted while migration 016 ran may be counted by
//! both its back-fill and its views. This command recomputes every bucket from the windows
//! and reports each that differs; `--repair` inserts the difference as one more row, which
//! the SummingMergeTree adds: afterwards the check finds nothing (and a second repair inserts
//! nothing). Run it after an aggregator restart, or regularly with `--from` over recent days;
//! revisions arriving while it runs can make it report (and repair) a bucket that was only
//! momentarily behind, so repair ranges whose windows are closed.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use clap::Args;
use clickhouse::Client;
use meterflow_core::decimal::from_ch_i128;
use meterflow_core::usage::{DAY_MS, HOUR_MS};
use meterflow_runtime::args::ClickHouseArgs;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The rollup tables and their bucket lengths.
pub const TABLES: [(&str, i64); 2] = [("usage_rollup_hour", HOUR_MS), ("usage_rollup_day", DAY_MS)];

#[derive(Debug, Args)]
pub struct RollupsCmd {
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    /// Insert the correcting difference for every bucket that differs.
    #[arg(long, env = "METERFLOW_ROLLUPS_REPAIR")]
    pub repair: bool,
    /// Only buckets starting at or after this time (RFC 3339).
    #[arg(long, env = "METERFLOW_ROLLUPS_FROM", value_parser = meterflow_core::time::parse_rfc3339_ms)]
    pub from: Option<i64>,
    /// Only buckets starting before this time (RFC 3339).
    #[arg(long, env = "METERFLOW_ROLLUPS_TO", value_parser = meterflow_core::time::parse_rfc3339_ms)]
    pub to: Option<i64>,
    /// Only this tenant.
    #[arg(long, env = "METERFLOW_ROLLUPS_TENANT")]
    pub tenant: Option<String>,
}

/// A bucket of a rollup, as stored (and as inserted by a repair).
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct RollupRow {
    pub tenant: String,
    pub meter: String,
    pub dimensions_key: String,
    pub bucket_ms: i64,
    pub aggregation: String,
    pub dim_keys: Vec<String>,
    pub dim_values: Vec<String>,
    /// Decimal(38, 9) as its fixed-point integer.
    pub value: i128,
}

/// One bucket that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub table: &'static str,
    /// What the windows say; the row to insert carries `expected - actual`.
    pub correction: RollupRow,
    pub expected: Decimal,
    pub actual: Decimal,
}

type Key = (String, String, String, i64);

fn key(r: &RollupRow) -> Key {
    (r.tenant.clone(), r.meter.clone(), r.dimensions_key.clone(), r.bucket_ms)
}

/// The buckets where `actual` (the rollup) differs from `expected` (recomputed from the
/// windows), each with the row that corrects it. Pure, so it is tested without ClickHouse.
pub fn drifts(table: &'static str, expected: &[RollupRow], actual: &[RollupRow]) -> Vec<Drift> {
    let exp: BTreeMap<Key, &RollupRow> = expected.iter().map(|r| (key(r), r)).collect();
    let act: BTreeMap<Key, &RollupRow> = actual.iter().map(|r| (key(r), r)).collect();
    let keys: BTreeSet<&Key> = exp.keys().chain(act.keys()).collect();
    let mut out = Vec::new();
    for k in keys {
        let (e, a) = (exp.get(k), act.get(k));
        let ev = e.map_or(0, |r| r.value);
        let av = a.map_or(0, |r| r.value);
        if ev != av {
            // Every key comes from one of the sides.
            let Some(template) = e.or(a).copied() else { continue };
            out.push(Drift {
                table,
                correction: RollupRow { value: ev - av, ..template.clone() },
                expected: from_ch_i128(ev),
                actual: from_ch_i128(av),
            });
        }
    }
    out
}

/// `AND ...` selecting whole buckets of length `g` (a `--from`/`--to` inside a bucket widens
/// to it) by `col`, and the tenant (bound as `?`).
fn filters(cmd: &RollupsCmd, col: &str, g: i64) -> String {
    let mut f = String::new();
    if let Some(from) = cmd.from {
        f.push_str(&format!(" AND {col} >= {}", from.div_euclid(g) * g));
    }
    if let Some(to) = cmd.to {
        f.push_str(&format!(" AND {col} < {}", (to + g - 1).div_euclid(g) * g));
    }
    if cmd.tenant.is_some() {
        f.push_str(" AND tenant = ?");
    }
    f
}

async fn fetch(client: &Client, cmd: &RollupsCmd, sql: &str) -> Result<Vec<RollupRow>> {
    let mut q = client.query(sql);
    if let Some(t) = &cmd.tenant {
        q = q.bind(t.as_str());
    }
    Ok(q.fetch_all().await?)
}

/// Every bucket of length `g` recomputed from the latest revision of each window.
async fn expected(client: &Client, cmd: &RollupsCmd, g: i64) -> Result<Vec<RollupRow>> {
    let sql = format!(
        "SELECT tenant, meter, dimensions_key, intDiv(window_start_ms, {g}) * {g} AS b, any(agg), any(keys), any(vals), sum(latest) \
         FROM (SELECT tenant, meter, dimensions_key, window_start_ms, any(aggregation) AS agg, any(dim_keys) AS keys, \
               any(dim_values) AS vals, argMax(value, revision) AS latest \
               FROM meter_aggregates WHERE aggregation IN ('sum', 'count'){} \
               GROUP BY tenant, meter, dimensions_key, window_start_ms) \
         GROUP BY tenant, meter, dimensions_key, b",
        filters(cmd, "window_start_ms", g)
    );
    fetch(client, cmd, &sql).await.context("recomputing rollups from meter_aggregates")
}

async fn actual(client: &Client, cmd: &RollupsCmd, table: &str, g: i64) -> Result<Vec<RollupRow>> {
    let sql = format!(
        "SELECT tenant, meter, dimensions_key, bucket_ms, any(aggregation), any(dim_keys), any(dim_values), sum(value) \
         FROM {table} WHERE 1{} GROUP BY tenant, meter, dimensions_key, bucket_ms",
        filters(cmd, "bucket_ms", g)
    );
    fetch(client, cmd, &sql).await.with_context(|| format!("reading {table}"))
}

/// Checks (and with `--repair` corrects) both rollups; returns the drifts found.
pub async fn check(client: &Client, cmd: &RollupsCmd) -> Result<Vec<Drift>> {
    let mut all = Vec::new();
    for (table, g) in TABLES {
        let found = drifts(table, &expected(client, cmd, g).await?, &actual(client, cmd, table, g).await?);
        if cmd.repair && !found.is_empty() {
            let mut insert = client.insert::<RollupRow>(table).await?;
            for d in &found {
                insert.write(&d.correction).await?;
            }
            insert.end().await.with_context(|| format!("repairing {table}"))?;
        }
        all.extend(found);
    }
    Ok(all)
}

/// The command: prints every drift; true when there was none (or all were repaired).
pub async fn run(cmd: &RollupsCmd) -> Result<bool> {
    let client = meterflow_runtime::clickhouse::client(&cmd.clickhouse);
    let found = check(&client, cmd).await?;
    for d in &found {
        let r = &d.correction;
        println!(
            "{} tenant={} meter={} dimensions={:?} bucket_ms={}: rollup {} != windows {} ({})",
            d.table,
            r.tenant,
            r.meter,
            r.dimensions_key,
            r.bucket_ms,
            d.actual,
            d.expected,
            if cmd.repair { "repaired" } else { "run with --repair to correct" }
        );
    }
    println!("{} rollup buckets differ from the windows{}", found.len(), if cmd.repair && !found.is_empty() { "; repaired" } else { "" });
    Ok(found.is_empty() || cmd.repair)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(meter: &str, bucket_ms: i64, value: i128) -> RollupRow {
        RollupRow {
            tenant: "t".into(),
            meter: meter.into(),
            dimensions_key: "model=a".into(),
            bucket_ms,
            aggregation: "sum".into(),
            dim_keys: vec!["model".into()],
            dim_values: vec!["a".into()],
            value,
        }
    }

    #[test]
    fn drift_rows_correct_exactly_what_differs() {
        let expected = vec![row("m", 0, 5_000_000_000), row("m", 3_600_000, 7), row("n", 0, 1)];
        // m@0 double counted by a replay, m@1h right, n@0 missing, o@0 only in the rollup.
        let actual = vec![row("m", 0, 8_000_000_000), row("m", 3_600_000, 7), row("o", 0, 4)];
        let d = drifts("usage_rollup_hour", &expected, &actual);
        let fixes: Vec<(String, i128)> = d.iter().map(|d| (d.correction.meter.clone(), d.correction.value)).collect();
        assert_eq!(fixes, vec![("m".into(), -3_000_000_000), ("n".into(), 1), ("o".into(), -4)]);
        assert_eq!((d[0].expected, d[0].actual), (Decimal::new(5, 0), Decimal::new(8, 0)));
        // After inserting the corrections the sums agree: nothing left.
        let mut repaired = actual.clone();
        repaired.extend(d.iter().map(|d| d.correction.clone()));
        let mut summed: BTreeMap<Key, RollupRow> = BTreeMap::new();
        for r in repaired {
            summed.entry(key(&r)).and_modify(|s| s.value += r.value).or_insert(r);
        }
        let summed: Vec<RollupRow> = summed.into_values().collect();
        assert!(drifts("usage_rollup_hour", &expected, &summed).is_empty());
    }
}
