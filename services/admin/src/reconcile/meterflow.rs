//! meterflow's side of the comparison: its charges read from ClickHouse under the catalog's
//! price names, and the result written back.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Deserialize;

use meterflow_core::pricing::Catalog;

use super::{Key, Report, Side, TRUE_UP_PRICE};

/// Inverse of `meterflow_core::records::dimensions_key` (`k=v,k=v` with `\` escapes).
pub fn parse_dimensions_key(key: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let (mut k, mut v, mut in_value, mut esc) = (String::new(), String::new(), false, false);
    for c in key.chars() {
        let cur = if in_value { &mut v } else { &mut k };
        if esc {
            cur.push(c);
            esc = false;
        } else if c == '\\' {
            esc = true;
        } else if c == '=' && !in_value {
            in_value = true;
        } else if c == ',' {
            out.insert(std::mem::take(&mut k), std::mem::take(&mut v));
            in_value = false;
        } else {
            cur.push(c);
        }
    }
    if in_value || !k.is_empty() {
        out.insert(k, v);
    }
    out
}

/// The catalog price a charge was rated by: its plan's price for its meter and dimensions,
/// `true_up` for minimum commitments, else `meter` (+ `{dimensions}`) when the catalog no
/// longer has it.
pub fn price_of(catalog: Option<&Catalog>, kind: &str, plan: &str, meter: &str, dimensions_key: &str) -> String {
    if kind == "true_up" {
        return TRUE_UP_PRICE.into();
    }
    let dims = parse_dimensions_key(dimensions_key);
    if let Some(p) = catalog.and_then(|c| c.plan(plan)).and_then(|p| p.price_for(meter, &dims)) {
        return p.name.clone();
    }
    if dimensions_key.is_empty() {
        meter.to_owned()
    } else {
        format!("{meter}{{{dimensions_key}}}")
    }
}

/// One group of meterflow charges as read from ClickHouse.
#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
pub struct ChargeGroup {
    pub tenant: String,
    pub kind: String,
    pub plan: String,
    pub currency: String,
    pub meter: String,
    pub dimensions_key: String,
    /// Unix seconds.
    pub period_s: u32,
    pub total: i128,
    pub qty: i128,
    pub charges: u64,
}

/// Sums charge groups per key.
pub fn meterflow_sides(groups: &[ChargeGroup], catalog: Option<&Catalog>) -> BTreeMap<Key, Side> {
    let mut out: BTreeMap<Key, Side> = BTreeMap::new();
    for g in groups {
        let key = Key {
            tenant: g.tenant.clone(),
            price: price_of(catalog, &g.kind, &g.plan, &g.meter, &g.dimensions_key),
            period_start: i64::from(g.period_s) * 1000,
            currency: g.currency.clone(),
        };
        let s = out.entry(key).or_default();
        s.amount += meterflow_core::decimal::from_ch_i128(g.total);
        s.quantity += meterflow_core::decimal::from_ch_i128(g.qty);
        s.lines += g.charges;
    }
    out
}

/// meterflow's charges grouped by everything that decides the price (never by a Decimal:
/// ClickHouse 18.16 crashes on that).
pub async fn load_meterflow(client: &clickhouse::Client) -> Result<Vec<ChargeGroup>> {
    client
        .query(
            "SELECT tenant, kind, plan, currency, meter, dimensions_key, toUInt32(period_start) AS period_s, \
             sum(amount) AS total, sum(quantity) AS qty, count() AS charges \
             FROM charges_dedup GROUP BY tenant, kind, plan, currency, meter, dimensions_key, period_start",
        )
        .fetch_all::<ChargeGroup>()
        .await
        .context("reading charges_dedup")
}

#[derive(Debug, Clone, clickhouse::Row, serde::Serialize)]
struct ResultRow {
    run_id: String,
    run_at: u32,
    source: String,
    tenant: String,
    price: String,
    currency: String,
    period_start: u32,
    meterflow_amount: i128,
    external_amount: i128,
    difference: i128,
    meterflow_quantity: i128,
    external_quantity: i128,
    status: String,
    finding: String,
    external_lines: u64,
    meterflow_charges: u64,
}

/// Writes every compared key of a run to `reconciliation_results`.
pub async fn write_results(client: &clickhouse::Client, run_id: &str, run_at_s: u32, source: &str, report: &Report) -> Result<()> {
    use meterflow_core::decimal::to_ch_i128;
    let mut insert = client.insert::<ResultRow>("reconciliation_results").await?;
    for r in &report.rows {
        insert
            .write(&ResultRow {
                run_id: run_id.to_owned(),
                run_at: run_at_s,
                source: source.to_owned(),
                tenant: r.key.tenant.clone(),
                price: r.key.price.clone(),
                currency: r.key.currency.clone(),
                period_start: (r.key.period_start / 1000).clamp(0, i64::from(u32::MAX)) as u32,
                meterflow_amount: to_ch_i128(&r.meterflow.amount)?,
                external_amount: to_ch_i128(&r.external.amount)?,
                difference: to_ch_i128(&r.difference)?,
                meterflow_quantity: to_ch_i128(&r.meterflow.quantity)?,
                external_quantity: to_ch_i128(&r.external.quantity)?,
                status: r.status.as_str().into(),
                finding: r.finding.as_str().into(),
                external_lines: r.external.lines,
                meterflow_charges: r.meterflow.lines,
            })
            .await?;
    }
    insert.end().await.context("writing reconciliation_results")?;
    Ok(())
}
