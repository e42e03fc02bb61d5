//! Reading the external biller's export (see the parent module docs for the formats).

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use rust_decimal::Decimal;

use meterflow_core::pricing;

use super::{ExternalLine, Key, Mapping};

/// Normalised column name: lower case, ` (utc)` and surrounding blanks dropped, spaces to `_`.
fn norm(h: &str) -> String {
    h.trim().to_lowercase().replace("(utc)", "").trim().replace([' ', '-'], "_")
}

struct Columns {
    index: BTreeMap<String, usize>,
}

impl Columns {
    fn new(headers: &csv::StringRecord) -> Self {
        Self { index: headers.iter().enumerate().map(|(i, h)| (norm(h), i)).collect() }
    }

    fn find(&self, names: &[&str]) -> Option<usize> {
        names.iter().find_map(|n| self.index.get(*n).copied())
    }

    fn require(&self, names: &[&str]) -> Result<usize> {
        self.find(names).with_context(|| format!("the export has no column {}", names.join(" / ")))
    }
}

/// `YYYY-MM`, `YYYY-MM-DD`, `YYYY-MM-DD HH:MM[:SS]`, RFC 3339, or Unix seconds -> Unix ms.
pub fn parse_time(s: &str) -> Result<i64> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: i64 = s.parse().with_context(|| format!("time {s:?}"))?;
        return secs.checked_mul(1000).with_context(|| format!("time {s:?} out of range"));
    }
    let rfc = match s.len() {
        7 => format!("{s}-01T00:00:00Z"),
        10 => format!("{s}T00:00:00Z"),
        16 => format!("{}T{}:00Z", &s[..10], &s[11..]),
        19 if s.as_bytes()[10] == b' ' => format!("{}T{}Z", &s[..10], &s[11..]),
        _ => s.to_owned(),
    };
    meterflow_core::time::parse_rfc3339_ms(&rfc).map_err(|e| anyhow::anyhow!("time {s:?}: {e}"))
}

fn decimal(field: &'static str, s: &str) -> Result<Decimal> {
    meterflow_core::decimal::parse(field, s.trim()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Reads an export in the mapping's format and translates it to meterflow's names.
pub fn parse_external(csv_text: &str, mapping: &Mapping) -> Result<Vec<ExternalLine>> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(csv_text.as_bytes());
    let cols = Columns::new(reader.headers().context("reading the CSV header")?);
    let stripe = mapping.format == "stripe";
    let (tenant_c, price_c, period_c, currency_c, amount_c) = if stripe {
        (
            cols.require(&["customer", "customer_id"])?,
            cols.require(&["price", "price_id", "price.id", "plan_id", "plan"])?,
            cols.require(&["period_start", "period.start", "line_item_period_start"])?,
            cols.require(&["currency"])?,
            cols.require(&["amount", "invoice_line_item_amount"])?,
        )
    } else {
        (
            cols.require(&["tenant"])?,
            cols.require(&["price"])?,
            cols.require(&["period_start", "period"])?,
            cols.require(&["currency"])?,
            cols.require(&["amount"])?,
        )
    };
    let quantity_c = cols.find(&["quantity"]);
    let id_c = if stripe { cols.find(&["id", "invoice_line_item_id", "line_id"]) } else { cols.find(&["line_id", "id"]) };
    let mut out = Vec::new();
    for (n, rec) in reader.records().enumerate() {
        let line = n + 2;
        let rec = rec.with_context(|| format!("CSV line {line}"))?;
        let get = |i: usize| rec.get(i).unwrap_or("").trim();
        let ctx = || format!("CSV line {line}");
        let currency = get(currency_c).to_uppercase();
        if currency.is_empty() {
            bail!("{}: empty currency", ctx());
        }
        let raw_amount = get(amount_c);
        let amount = if stripe {
            let minor: i64 = raw_amount
                .parse()
                .with_context(|| format!("{}: Stripe amount {raw_amount:?} is not an integer of minor units", ctx()))?;
            Decimal::new(minor, mapping.exponent(&currency))
        } else {
            decimal("amount", raw_amount).with_context(ctx)?
        };
        let quantity = match quantity_c.map(get) {
            Some(q) if !q.is_empty() => decimal("quantity", q).with_context(ctx)?,
            _ => Decimal::ZERO,
        };
        let ext_tenant = get(tenant_c);
        let ext_price = get(price_c);
        if ext_tenant.is_empty() || ext_price.is_empty() {
            bail!("{}: empty customer/tenant or price", ctx());
        }
        let tenant = mapping.customers.get(ext_tenant).cloned().unwrap_or_else(|| ext_tenant.to_owned());
        let price = mapping.prices.get(ext_price).cloned().unwrap_or_else(|| ext_price.to_owned());
        let at = parse_time(get(period_c)).with_context(ctx)?;
        if !(pricing::MIN_TIME_MS..pricing::MAX_TIME_MS).contains(&at) {
            bail!("{}: period start out of range", ctx());
        }
        out.push(ExternalLine {
            key: Key { tenant, price, period_start: pricing::period_start(at), currency },
            amount,
            quantity,
            line_id: id_c.map(get).unwrap_or_default().to_owned(),
        });
    }
    Ok(out)
}
