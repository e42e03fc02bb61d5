//! Compares ClickHouse with the producer's ground-truth file, exactly.

use std::collections::{BTreeMap, BTreeSet};

use clickhouse::Client;
use meterflow_core::decimal::{from_ch_i128, round_amount};
use meterflow_core::pricing::{self, Catalog};
use meterflow_core::records::dimensions_key;
use meterflow_producer::truth::GroundTruth;
use rust_decimal::Decimal;
use serde::Deserialize;

/// The outcome of a comparison; `problems` is empty when everything matched.
#[derive(Debug, Default)]
pub struct Report {
    pub checked: usize,
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, p: String) {
        self.problems.push(p);
    }

    /// Error listing the first problems, for test failures.
    pub fn into_result(self, what: &str) -> anyhow::Result<usize> {
        if self.ok() {
            return Ok(self.checked);
        }
        let shown: Vec<&String> = self.problems.iter().take(15).collect();
        anyhow::bail!("{what}: {} problems of {} checked, first ones:\n{:#?}", self.problems.len(), self.checked, shown)
    }
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct TotalRow {
    tenant: String,
    meter: String,
    dimensions_key: String,
    window_start: u32,
    value: i128,
    event_count: i64,
    provider_cost: i128,
}

/// Every ground-truth window has the exact corrected total in `meter_totals`, and no other
/// window exists.
pub async fn window_totals(ch: &Client, gt: &GroundTruth) -> anyhow::Result<Report> {
    let rows: Vec<TotalRow> = ch
        .query(
            "SELECT tenant, meter, dimensions_key, toUInt32(window_start) AS window_start, value, \
             event_count, provider_cost FROM meter_totals",
        )
        .fetch_all()
        .await?;
    let mut found: BTreeMap<(String, String, String, i64), TotalRow> = BTreeMap::new();
    for r in rows {
        found.insert((r.tenant.clone(), r.meter.clone(), r.dimensions_key.clone(), i64::from(r.window_start) * 1000), r);
    }
    let mut report = Report::default();
    for w in &gt.windows {
        report.checked += 1;
        let key = (w.tenant.clone(), w.meter.clone(), dimensions_key(&w.dimensions), w.window_start);
        match found.remove(&key) {
            None => report.problem(format!("missing window {key:?} (expected value {})", w.value)),
            Some(r) => {
                let (value, cost) = (from_ch_i128(r.value), from_ch_i128(r.provider_cost));
                if value != w.value || r.event_count as u64 != w.event_count || cost != w.provider_cost {
                    report.problem(format!(
                        "window {key:?}: got value {value} events {} cost {cost}, expected value {} events {} cost {}",
                        r.event_count, w.value, w.event_count, w.provider_cost
                    ));
                }
            }
        }
    }
    for key in found.keys() {
        report.problem(format!("unexpected window {key:?}"));
    }
    Ok(report)
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct DeadRow {
    source_partition: i32,
    source_offset: i64,
    reason: String,
}

/// Every malformed message of the ground truth is dead-lettered with its reason, and nothing
/// else is.
pub async fn dead_letters(ch: &Client, gt: &GroundTruth, topic: &str) -> anyhow::Result<Report> {
    let rows: Vec<DeadRow> = ch
        .query(
            "SELECT source_partition, source_offset, any(reason) AS reason FROM dead_letters \
             WHERE source_topic = ? GROUP BY source_partition, source_offset",
        )
        .bind(topic)
        .fetch_all()
        .await?;
    let mut found: BTreeMap<(i32, i64), String> =
        rows.into_iter().map(|r| ((r.source_partition, r.source_offset), r.reason)).collect();
    let mut report = Report::default();
    for m in &gt.malformed {
        report.checked += 1;
        match found.remove(&(m.partition, m.offset)) {
            None => report.problem(format!("malformed {}/{} ({}, {}) not dead-lettered", m.partition, m.offset, m.reason, m.kind)),
            Some(reason) if reason != m.reason => {
                report.problem(format!("{}/{}: reason {reason}, expected {} ({})", m.partition, m.offset, m.reason, m.kind))
            }
            Some(_) => {}
        }
    }
    for (k, reason) in found {
        report.problem(format!("unexpected dead letter at {}/{} ({reason})", k.0, k.1));
    }
    Ok(report)
}

/// Expected revenue and provider cost per tenant, computed from the ground truth and the
/// catalog without the rating state machine: per tenant, billing period, plan and price, the
/// rounded price of the total quantity; per window, the carried provider cost or the
/// catalog's rate.
pub fn expected_money(gt: &GroundTruth, catalog: &Catalog) -> anyhow::Result<BTreeMap<String, (Decimal, Decimal)>> {
    // (tenant, period, plan, price name) -> quantity
    let mut quantities: BTreeMap<(String, i64, String, String), Decimal> = BTreeMap::new();
    let mut out: BTreeMap<String, (Decimal, Decimal)> = BTreeMap::new();
    for w in &gt.windows {
        let plan = catalog
            .plan_for(&w.tenant, w.window_start)
            .ok_or_else(|| anyhow::anyhow!("no plan for {} at {}", w.tenant, w.window_start))?;
        let price = plan
            .price_for(&w.meter, &w.dimensions)
            .ok_or_else(|| anyhow::anyhow!("plan {} has no price for {}", plan.id, w.meter))?;
        *quantities
            .entry((w.tenant.clone(), pricing::period_start(w.window_start), plan.id.clone(), price.name.clone()))
            .or_default() += w.value;
        // Per event: carried costs, plus the rate card for the events without one (sum and
        // count meters); other aggregations keep the window rule.
        let unit = catalog.unit_cost(&w.meter, &w.dimensions);
        let cost = if matches!(w.aggregation.as_str(), "sum" | "count") {
            w.provider_cost + unit.map_or(Decimal::ZERO, |u| round_amount(u * w.uncosted_value))
        } else if w.provider_cost != Decimal::ZERO {
            w.provider_cost
        } else {
            unit.map_or(Decimal::ZERO, |u| round_amount(u * w.value))
        };
        out.entry(w.tenant.clone()).or_default().1 += cost;
    }
    for ((tenant, _, plan, price), q) in quantities {
        let p = catalog
            .plan(&plan)
            .and_then(|p| p.price(&price))
            .ok_or_else(|| anyhow::anyhow!("price {price} vanished from plan {plan}"))?;
        out.entry(tenant).or_default().0 += p.price(q)?;
    }
    Ok(out)
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct MoneyRow {
    tenant: String,
    revenue: i128,
    cost: i128,
}

/// ClickHouse revenue and cost per tenant (usage charges, deduplicated) equal
/// [`expected_money`].
pub async fn charges(ch: &Client, gt: &GroundTruth, catalog: &Catalog) -> anyhow::Result<Report> {
    let expected = expected_money(gt, catalog)?;
    let rows: Vec<MoneyRow> = ch
        .query(
            "SELECT tenant, sum(amount) AS revenue, sum(provider_cost) AS cost FROM charges_dedup \
             WHERE kind = 'usage' GROUP BY tenant",
        )
        .fetch_all()
        .await?;
    let mut found: BTreeMap<String, (Decimal, Decimal)> =
        rows.into_iter().map(|r| (r.tenant, (from_ch_i128(r.revenue), from_ch_i128(r.cost)))).collect();
    let mut report = Report::default();
    let tenants: BTreeSet<String> = expected.keys().chain(found.keys()).cloned().collect();
    for t in tenants {
        report.checked += 1;
        let e = expected.get(&t).copied().unwrap_or_default();
        let f = found.remove(&t).unwrap_or_default();
        if e.0.normalize() != f.0.normalize() || e.1.normalize() != f.1.normalize() {
            report.problem(format!("tenant {t}: revenue {} cost {} in ClickHouse, expected revenue {} cost {}", f.0, f.1, e.0, e.1));
        }
    }
    Ok(report)
}

/// Fails if any charge id appears with different contents (a replay that was not identical).
pub async fn charge_rows_consistent(ch: &Client) -> anyhow::Result<u64> {
    let n: u64 = ch
        .query(
            "SELECT count() FROM (SELECT charge_id, uniqExact(amount, quantity, provider_cost, revision) AS v \
             FROM charges GROUP BY charge_id HAVING v > 1)",
        )
        .fetch_one()
        .await?;
    Ok(n)
}
