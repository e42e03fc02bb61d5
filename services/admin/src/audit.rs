//! Leakage audit: the conservation laws between meterflow's tables, checked end to end.
//!
//! | check | law |
//! | --- | --- |
//! | `events_vs_windows` | per tenant and meter, accepted events (`usage_events`, distinct ids) = Σ event counts of the windows' latest revisions (`meter_totals`) |
//! | `window_not_rated` | every window revision (`meter_aggregates`) has its usage charge, is parked by the rater (waiting for a rerate), or was dead-lettered by the rater |
//! | `charge_without_window` | every usage charge has the window revision it prices (a charge nobody metered is forged or corrupt) |
//! | `invoice_vs_charges` | per tenant, period, plan and price, Σ usage charges = the catalog's price of the period's total quantity recomputed from the windows (the invoice preview) |
//! | `wallet_charges` | per tenant and currency, Σ charges = Σ ledger drawdowns + arrears (every charge reached the wallet exactly once) |
//! | `wallet_adjustments` | per tenant and currency, Σ adjustments = Σ ledger grants - refunds - debits |
//! | `ingest_gap` / `ingest_overlap` / `ingest_regressed` | per source partition, the aggregator's cumulative ledger entries (`ingest_ledger`, [`meterflow_core::ledger`]): accepted + duplicates + dead-lettered + ticks = the offsets from the first covered one, every entry consistent with the ones before |
//! | `ingest_accepted` / `ingest_dead_letters` | per source partition, the ledger's accepted and dead-lettered counts = the `usage_events` rows and usage-topic `dead_letters` with those source offsets |
//!
//! The pure checks ([`invoice_findings`], `ingest::findings`, [`diff_findings`]) take rows
//! and return findings; [`run`] reads the rows from ClickHouse and writes the findings to
//! `audit_findings`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use clickhouse::Client;
use rust_decimal::Decimal;
use serde::Deserialize;

use meterflow_core::decimal::{from_ch_i128, to_ch_i128};
use meterflow_core::pricing::{self, Catalog};
use meterflow_core::records::{AvroRecord, MeterAggregate};

use crate::reconcile::{parse_dimensions_key, price_of};

mod ingest;

/// One violated law.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    pub check: String,
    pub tenant: String,
    /// What exactly (meter, window, price, partition ...).
    pub subject: String,
    pub expected: Decimal,
    pub actual: Decimal,
    pub detail: String,
}

#[derive(Debug, Clone, Default)]
pub struct AuditReport {
    pub findings: Vec<Finding>,
    /// Check name -> number of things it compared.
    pub checked: BTreeMap<&'static str, u64>,
}

/// Compares two keyed sums and reports each key whose values differ (a missing side is 0).
pub fn diff_findings<K: Ord + Clone>(
    check: &str,
    expected: &BTreeMap<K, Decimal>,
    actual: &BTreeMap<K, Decimal>,
    describe: impl Fn(&K) -> (String, String),
    detail: &str,
) -> Vec<Finding> {
    let keys: BTreeSet<&K> = expected.keys().chain(actual.keys()).collect();
    let mut out = Vec::new();
    for k in keys {
        let e = expected.get(k).copied().unwrap_or_default();
        let a = actual.get(k).copied().unwrap_or_default();
        if e != a {
            let (tenant, subject) = describe(k);
            out.push(Finding { check: check.into(), tenant, subject, expected: e, actual: a, detail: format!("{detail}: difference {}", a - e) });
        }
    }
    out
}

/// The latest value of one window (from `meter_totals`).
#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
pub struct WindowTotal {
    pub tenant: String,
    pub meter: String,
    pub dimensions_key: String,
    /// Unix seconds.
    pub window_s: u32,
    pub total: i128,
}

/// Σ usage charges of one (tenant, period, plan, meter, dimensions) group.
#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
pub struct UsageCharges {
    pub tenant: String,
    pub plan: String,
    pub meter: String,
    pub dimensions_key: String,
    /// Unix seconds.
    pub period_s: u32,
    pub total: i128,
}

/// The invoice preview recomputed from the windows with the catalog, against the charges.
/// Windows the catalog cannot price (no plan or price) are skipped: the rater dead-letters
/// them and `window_not_rated` accounts for them.
pub fn invoice_findings(catalog: &Catalog, windows: &[WindowTotal], charges: &[UsageCharges]) -> Result<(Vec<Finding>, u64)> {
    type K = (String, i64, String, String); // tenant, period, plan, price
    let mut quantity: BTreeMap<K, Decimal> = BTreeMap::new();
    for w in windows {
        let at = i64::from(w.window_s) * 1000;
        let Some(plan) = catalog.plan_for(&w.tenant, at) else { continue };
        let dims = parse_dimensions_key(&w.dimensions_key);
        let Some(price) = plan.price_for(&w.meter, &dims) else { continue };
        *quantity.entry((w.tenant.clone(), pricing::period_start(at), plan.id.clone(), price.name.clone())).or_default() +=
            from_ch_i128(w.total);
    }
    let mut expected: BTreeMap<K, Decimal> = BTreeMap::new();
    for (k, q) in &quantity {
        let price = catalog.plan(&k.2).and_then(|p| p.price(&k.3)).context("plan and price exist: found above")?;
        expected.insert(k.clone(), price.price(*q).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    let mut actual: BTreeMap<K, Decimal> = BTreeMap::new();
    for c in charges {
        let name = price_of(Some(catalog), "usage", &c.plan, &c.meter, &c.dimensions_key);
        *actual.entry((c.tenant.clone(), i64::from(c.period_s) * 1000, c.plan.clone(), name)).or_default() +=
            from_ch_i128(c.total);
    }
    let n = expected.len() as u64;
    let findings = diff_findings(
        "invoice_vs_charges",
        &expected,
        &actual,
        |k| (k.0.clone(), format!("period={} plan={} price={}", crate::reconcile::month(k.1), k.2, k.3)),
        "usage charges differ from the catalog price of the windows' total quantity",
    );
    Ok((findings, n))
}

/// `meterflow-admin audit`.
#[derive(Debug, clap::Args)]
pub struct AuditCmd {
    #[command(flatten)]
    pub clickhouse: meterflow_runtime::args::ClickHouseArgs,
    /// The aggregates topic, to recognise the rater's dead letters of aggregates.
    #[arg(long, env = "METERFLOW_AGGREGATES_TOPIC", default_value = "meterflow.aggregates")]
    pub aggregates_topic: String,
    /// Pricing catalog for the invoice recomputation.
    #[arg(long, env = "METERFLOW_CATALOG", default_value = "config/catalog.toml")]
    pub catalog: std::path::PathBuf,
    /// Windows starting at or after this (RFC 3339, date or `YYYY-MM`) [default: all].
    #[arg(long, env = "METERFLOW_AUDIT_FROM")]
    pub from: Option<String>,
    /// Windows starting before this [default: one hour ago, so windows still open or being
    /// rated are not reported]. The invoice check covers the whole billing months before
    /// the month holding this (an invoice is exact only for a whole period).
    #[arg(long, env = "METERFLOW_AUDIT_TO")]
    pub to: Option<String>,
    /// Do not write findings to `audit_findings`.
    #[arg(long, env = "METERFLOW_AUDIT_DRY_RUN")]
    pub dry_run: bool,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct CountRow {
    tenant: String,
    meter: String,
    n: i64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct RevisionRow {
    tenant: String,
    meter: String,
    dimensions_key: String,
    window_s: u32,
    revision: u32,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct ChargeKeyRow {
    charge_id: String,
    t: String,
    m: String,
    dk: String,
    window_s: u32,
    rev: u32,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct SumRow {
    tenant: String,
    currency: String,
    total: i128,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct PayloadRow {
    payload: Vec<u8>,
}

async fn table_exists(client: &Client, name: &str) -> Result<bool> {
    let n: u64 = client
        .query("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = ?")
        .bind(name)
        .fetch_one()
        .await?;
    Ok(n > 0)
}

/// Runs every check; findings are returned (and written unless `dry_run`).
pub async fn run(cmd: &AuditCmd) -> Result<AuditReport> {
    let client = meterflow_runtime::clickhouse::client(&cmd.clickhouse);
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let from_s = match &cmd.from {
        Some(f) => crate::reconcile::parse_time(f)? / 1000,
        None => 0,
    };
    let to_s = match &cmd.to {
        Some(t) => crate::reconcile::parse_time(t)? / 1000,
        None => now_s - 3600,
    };
    let catalog = Catalog::from_toml_str(
        &std::fs::read_to_string(&cmd.catalog).with_context(|| format!("reading {}", cmd.catalog.display()))?,
    )
    .with_context(|| format!("catalog {}", cmd.catalog.display()))?;
    let report = audit(&client, &catalog, &cmd.aggregates_topic, from_s, to_s).await?;
    print!("{}", render(&report));
    if !cmd.dry_run {
        let run_id = format!("{now_s}-{}", std::process::id());
        write_findings(&client, &run_id, now_s as u32, &report.findings).await?;
        println!("written to audit_findings as run {run_id}");
    }
    Ok(report)
}

/// All checks over windows starting in `[from_s, to_s)` (Unix seconds).
pub async fn audit(client: &Client, catalog: &Catalog, aggregates_topic: &str, from_s: i64, to_s: i64) -> Result<AuditReport> {
    let mut report = AuditReport::default();
    let range = format!("window_start >= toDateTime({from_s}) AND window_start < toDateTime({to_s})");
    events_vs_windows(client, &range, &mut report).await?;
    let revisions = windows_rated(client, aggregates_topic, &range, &mut report).await?;
    charges_have_windows(client, &range, revisions, &mut report).await?;
    invoice_vs_charges(client, catalog, from_s, to_s, &mut report).await?;
    if table_exists(client, "wallet_ledger").await? {
        wallets(client, &mut report).await?;
    }
    // The aggregator's ingest ledger: every offset accounted for once, and its counts
    // matched against the stored usage rows and dead letters.
    if table_exists(client, "ingest_ledger").await? {
        let (findings, n) = ingest::check(client).await?;
        report.checked.insert("ingest_ledger", n);
        report.findings.extend(findings);
    }
    report.findings.sort();
    Ok(report)
}

/// Accepted events = Σ windows' event counts.
async fn events_vs_windows(client: &Client, range: &str, report: &mut AuditReport) -> Result<()> {
    let events: Vec<CountRow> = client
        .query(&format!(
            "SELECT tenant, meter, toInt64(uniqExact(event_id)) AS n FROM usage_events WHERE {range} GROUP BY tenant, meter"
        ))
        .fetch_all()
        .await
        .context("counting usage_events")?;
    let windows: Vec<CountRow> = client
        .query(&format!("SELECT tenant, meter, toInt64(sum(event_count)) AS n FROM meter_totals WHERE {range} GROUP BY tenant, meter"))
        .fetch_all()
        .await
        .context("summing meter_totals")?;
    let to_map = |rows: &[CountRow]| -> BTreeMap<(String, String), Decimal> {
        rows.iter().map(|r| ((r.tenant.clone(), r.meter.clone()), Decimal::from(r.n))).collect()
    };
    let (ev, win) = (to_map(&events), to_map(&windows));
    report.checked.insert("events_vs_windows", ev.len().max(win.len()) as u64);
    report.findings.extend(diff_findings(
        "events_vs_windows",
        &win,
        &ev,
        |k| (k.0.clone(), format!("meter={}", k.1)),
        "accepted events (actual) differ from the windows' event counts (expected)",
    ));
    Ok(())
}

/// Every window revision rated, parked (waiting for a rerate, listed by
/// `meterflow-admin parked`), or dead-lettered by the rater.
/// Returns the number of window revisions in the range.
async fn windows_rated(client: &Client, aggregates_topic: &str, range: &str, report: &mut AuditReport) -> Result<u64> {
    let parked = if table_exists(client, "parked_current").await? {
        " AND (source_partition, seq) NOT IN (SELECT source_partition, seq FROM parked_current WHERE current_state = 'parked')"
    } else {
        ""
    };
    let unrated: Vec<RevisionRow> = client
        .query(&format!(
            "SELECT tenant, meter, dimensions_key, toUInt32(window_start) AS window_s, revision FROM meter_aggregates \
             WHERE {range} AND (tenant, meter, dimensions_key, window_start, revision) NOT IN \
             (SELECT tenant, meter, dimensions_key, window_start, revision FROM charges WHERE kind = 'usage'){parked} \
             GROUP BY tenant, meter, dimensions_key, window_start, revision"
        ))
        .fetch_all()
        .await
        .context("finding unrated window revisions")?;
    let mut dead: BTreeSet<(String, String, String, u32, u32)> = BTreeSet::new();
    if !unrated.is_empty() {
        let payloads: Vec<PayloadRow> = client
            .query("SELECT payload FROM dead_letters WHERE source_topic = ?")
            .bind(aggregates_topic)
            .fetch_all()
            .await
            .context("reading the rater's dead letters")?;
        for p in payloads {
            if let Ok(a) = MeterAggregate::from_avro(&p.payload) {
                let key = (a.tenant.clone(), a.meter.clone(), a.dimensions_key(), (a.window_start / 1000) as u32, a.revision.max(0) as u32);
                dead.insert(key);
            }
        }
    }
    let revisions: u64 = client
        .query(&format!("SELECT count() FROM (SELECT 1 FROM meter_aggregates WHERE {range} GROUP BY tenant, meter, dimensions_key, window_start, revision)"))
        .fetch_one()
        .await?;
    report.checked.insert("window_not_rated", revisions);
    for r in unrated {
        let key = (r.tenant.clone(), r.meter.clone(), r.dimensions_key.clone(), r.window_s, r.revision);
        if !dead.contains(&key) {
            report.findings.push(Finding {
                check: "window_not_rated".into(),
                tenant: r.tenant,
                subject: format!("meter={} dims={} window_start={} revision={}", r.meter, r.dimensions_key, r.window_s, r.revision),
                expected: Decimal::ONE,
                actual: Decimal::ZERO,
                detail: "a window revision has no usage charge and was not dead-lettered: its usage is not billed".into(),
            });
        }
    }
    Ok(revisions)
}

/// Every usage charge prices a window revision that exists.
async fn charges_have_windows(client: &Client, range: &str, revisions: u64, report: &mut AuditReport) -> Result<()> {
    let orphans: Vec<ChargeKeyRow> = client
        .query(&format!(
            "SELECT charge_id, any(tenant) AS t, any(meter) AS m, any(dimensions_key) AS dk, \
             toUInt32(any(window_start)) AS window_s, any(revision) AS rev FROM charges \
             WHERE kind = 'usage' AND {range} AND (tenant, meter, dimensions_key, window_start, revision) NOT IN \
             (SELECT tenant, meter, dimensions_key, window_start, revision FROM meter_aggregates) GROUP BY charge_id"
        ))
        .fetch_all()
        .await
        .context("finding charges without a window")?;
    report.checked.insert("charge_without_window", revisions);
    for c in orphans {
        report.findings.push(Finding {
            check: "charge_without_window".into(),
            tenant: c.t,
            subject: format!("charge_id={} meter={} dims={} window_start={} revision={}", c.charge_id, c.m, c.dk, c.window_s, c.rev),
            expected: Decimal::ZERO,
            actual: Decimal::ONE,
            detail: "a usage charge prices no metered window revision: forged or corrupt".into(),
        });
    }
    Ok(())
}

/// Invoice preview recomputed from the windows = usage charges, per whole period:
/// charges telescope to the price of a period's total, not of a part of it.
async fn invoice_vs_charges(client: &Client, catalog: &Catalog, from_s: i64, to_s: i64, report: &mut AuditReport) -> Result<()> {
    let (p_from, p_to) = (pricing::period_start(from_s * 1000) / 1000, pricing::period_start(to_s.max(0) * 1000) / 1000);
    let prange = format!("window_start >= toDateTime({p_from}) AND window_start < toDateTime({p_to})");
    let totals: Vec<WindowTotal> = client
        .query(&format!(
            "SELECT tenant, meter, dimensions_key, toUInt32(window_start) AS window_s, value AS total FROM meter_totals WHERE {prange}"
        ))
        .fetch_all()
        .await
        .context("reading meter_totals")?;
    let usage: Vec<UsageCharges> = client
        .query(&format!(
            "SELECT tenant, plan, meter, dimensions_key, toUInt32(period_start) AS period_s, sum(amount) AS total \
             FROM charges_dedup WHERE kind = 'usage' AND {prange} GROUP BY tenant, plan, meter, dimensions_key, period_start"
        ))
        .fetch_all()
        .await
        .context("reading usage charges")?;
    let (inv, n) = invoice_findings(catalog, &totals, &usage)?;
    report.checked.insert("invoice_vs_charges", n);
    report.findings.extend(inv);
    Ok(())
}

/// Wallets: charges reached the ledger exactly once; adjustments likewise.
async fn wallets(client: &Client, report: &mut AuditReport) -> Result<()> {

    let sums = |sql: &str| {
        let q = client.query(sql);
        async move { q.fetch_all::<SumRow>().await }
    };
    let charges = sums("SELECT tenant, currency, sum(amount) AS total FROM charges_dedup GROUP BY tenant, currency").await?;
    let ledger = sums(
        "SELECT tenant, currency, sum(amount) AS total FROM wallet_ledger_dedup \
         WHERE movement IN ('drawdown', 'arrears') GROUP BY tenant, currency",
    )
    .await?;
    let adjustments = sums(
        "SELECT tenant, currency, sum(a) AS total FROM (SELECT tenant, currency, any(amount) AS a FROM wallet_adjustments \
         GROUP BY tenant, currency, idempotency_key) GROUP BY tenant, currency",
    )
    .await?;
    let moved = sums(
        "SELECT tenant, currency, sum(if(movement = 'grant', amount, -amount)) AS total FROM wallet_ledger_dedup \
         WHERE movement IN ('grant', 'refund', 'debit') GROUP BY tenant, currency",
    )
    .await?;
    let m = |rows: &[SumRow]| -> BTreeMap<(String, String), Decimal> {
        rows.iter().map(|r| ((r.tenant.clone(), r.currency.clone()), from_ch_i128(r.total))).collect()
    };
    let describe = |k: &(String, String)| (k.0.clone(), format!("currency={}", k.1));
    report.checked.insert("wallet_charges", charges.len() as u64);
    report.findings.extend(diff_findings("wallet_charges", &m(&charges), &m(&ledger), describe, "charges (expected) differ from what the wallets drew (actual)"));
    report.checked.insert("wallet_adjustments", adjustments.len() as u64);
    report.findings.extend(diff_findings(
        "wallet_adjustments",
        &m(&adjustments),
        &m(&moved),
        describe,
        "adjustments (expected) differ from the ledger's grants - refunds - debits (actual)",
    ));
    Ok(())
}

pub fn render(report: &AuditReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for (check, n) in &report.checked {
        let bad = report
            .findings
            .iter()
            .filter(|f| f.check == *check || (*check == "ingest_ledger" && f.check.starts_with("ingest_")))
            .count();
        let _ = writeln!(s, "  {check:<24} {n:>8} checked  {}", if bad == 0 { "OK".to_string() } else { format!("{bad} FINDINGS") });
    }
    if report.findings.is_empty() {
        let _ = writeln!(s, "audit: no findings");
    } else {
        let _ = writeln!(s, "audit: {} findings", report.findings.len());
        for f in &report.findings {
            let _ = writeln!(s, "  [{}] tenant={} {}: expected {} actual {} ({})", f.check, f.tenant, f.subject, f.expected, f.actual, f.detail);
        }
    }
    s
}

#[derive(Debug, clickhouse::Row, serde::Serialize)]
struct FindingRow {
    run_id: String,
    run_at: u32,
    check_name: String,
    tenant: String,
    subject: String,
    expected: i128,
    actual: i128,
    detail: String,
}

/// Writes the findings of a run (or one `run_ok` row when there are none).
pub async fn write_findings(client: &Client, run_id: &str, run_at: u32, findings: &[Finding]) -> Result<()> {
    let mut insert = client.insert::<FindingRow>("audit_findings").await?;
    let ok = [Finding {
        check: "run_ok".into(),
        tenant: String::new(),
        subject: String::new(),
        expected: Decimal::ZERO,
        actual: Decimal::ZERO,
        detail: "no findings".into(),
    }];
    let rows = if findings.is_empty() { &ok[..] } else { findings };
    for f in rows {
        insert
            .write(&FindingRow {
                run_id: run_id.into(),
                run_at,
                check_name: f.check.clone(),
                tenant: f.tenant.clone(),
                subject: f.subject.clone(),
                expected: to_ch_i128(&f.expected)?,
                actual: to_ch_i128(&f.actual)?,
                detail: f.detail.clone(),
            })
            .await?;
    }
    insert.end().await.context("writing audit_findings")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn invoice_recomputation_finds_a_dropped_and_a_forged_charge() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/catalog.toml")).unwrap();
        let cat = Catalog::from_toml_str(&text).unwrap();
        let march = (crate::reconcile::parse_time("2026-03-02").unwrap() / 1000) as u32;
        let window = |v: &str| WindowTotal {
            tenant: "acme".into(),
            meter: "input_tokens".into(),
            dimensions_key: "model=gpt-4o,region=us".into(),
            window_s: march,
            total: to_ch_i128(&d(v)).unwrap(),
        };
        let plan = cat.plan_for("acme", i64::from(march) * 1000).unwrap();
        assert_eq!(plan.id, "starter", "the expectation below uses starter's list price");
        let price = plan.price_for("input_tokens", &parse_dimensions_key("model=gpt-4o,region=us")).unwrap();
        // Independent expectation: (300000 - free units) * unit price.
        let expected = (d("300000") - price.free_units).max(Decimal::ZERO) * d("0.000003");
        let period = (pricing::period_start(i64::from(march) * 1000) / 1000) as u32;
        let charge = |amount: Decimal| UsageCharges {
            tenant: "acme".into(),
            plan: plan.id.clone(),
            meter: "input_tokens".into(),
            dimensions_key: "model=gpt-4o,region=us".into(),
            period_s: period,
            total: to_ch_i128(&amount).unwrap(),
        };
        let windows = [window("100000"), window("200000")];
        let (f, n) = invoice_findings(&cat, &windows, &[charge(expected)]).unwrap();
        assert_eq!((f.len(), n), (0, 1), "{f:?}");
        let (f, _) = invoice_findings(&cat, &windows, &[charge(expected), charge(d("1.5"))]).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].check.as_str(), f[0].actual - f[0].expected), ("invoice_vs_charges", d("1.5")));
        assert!(f[0].subject.contains("price=input_tokens.gpt-4o"), "{}", f[0].subject);
        let (f, _) = invoice_findings(&cat, &windows, &[]).unwrap();
        assert_eq!(f[0].expected, expected);
    }
}
