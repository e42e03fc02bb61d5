//! `GET /v1/customers/{tenant}/invoice`: the invoice of a billing period so far, from the
//! charges the rater booked (each charge once, whatever replays inserted), explained with the
//! catalog. Building and rounding are [`meterflow_core::invoice`].

use axum::extract::{Query, State};
use axum::Json;
use meterflow_core::decimal;
use meterflow_core::invoice::{self, ChargeGroup, Invoice};
use meterflow_core::pricing;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::events::now_ms;
use crate::access::{Read, TenantPath};
use crate::http::{ApiError, ErrorBody};
use meterflow_core::time::format_rfc3339_s;
use crate::AppState;

/// The rounding rule, stated in every answer.
pub const ROUNDING: &str = "each line and true-up rounded half-to-even to the currency's minor unit; total = sum of the rounded lines";

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InvoiceParams {
    /// The billing period, `YYYY-MM` (UTC calendar month); default: the current one.
    #[serde(default)]
    pub period: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TierJson {
    pub tier: usize,
    /// Inclusive upper bound; absent for the last tier.
    #[schema(value_type = Option<String>)]
    pub up_to: Option<String>,
    #[schema(value_type = String)]
    pub units: String,
    #[schema(value_type = String)]
    pub unit_price: String,
    #[schema(value_type = String)]
    pub flat_fee: String,
}

/// One price of one plan in the period.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LineJson {
    pub plan: String,
    /// The catalog price; absent if the catalog no longer has it.
    pub price: Option<String>,
    pub meter: String,
    pub currency: String,
    /// `per_unit`, `graduated`, `volume` or `package`.
    pub model: Option<String>,
    pub quantity: String,
    pub free_units: String,
    pub billable_quantity: String,
    /// Tiers the billable quantity reached (graduated: each; volume: the one applied).
    pub tiers: Vec<TierJson>,
    /// Charges summed into the line.
    pub charges: u64,
    /// Rounded to the currency's minor unit (half-to-even).
    pub amount: String,
    /// The exact sum of the line's charges (9 fractional digits).
    pub amount_exact: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TrueUpJson {
    pub currency: String,
    /// `charged` (the rater closed the period) or `projected` (`max(0, commitment - usage)`).
    pub status: String,
    pub commitment: Option<String>,
    pub amount: String,
    pub amount_exact: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TotalJson {
    pub currency: String,
    pub usage: String,
    pub true_up: String,
    pub total: String,
    /// The exact sum of the period's charges plus a projected true-up.
    pub total_exact: String,
}

/// An invoice preview.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct InvoiceResponse {
    pub tenant: String,
    /// `YYYY-MM`.
    pub period: String,
    pub period_start: String,
    pub period_end: String,
    pub rounding: String,
    pub lines: Vec<LineJson>,
    pub true_ups: Vec<TrueUpJson>,
    pub totals: Vec<TotalJson>,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Row {
    kind: String,
    plan: String,
    currency: String,
    meter: String,
    keys: Vec<String>,
    vals: Vec<String>,
    quantity: i128,
    amount: i128,
    charges: u64,
}

/// Each charge once (`any` per charge id, as the charges_dedup view), summed per price's
/// identity. Never grouped by a Decimal column.
const SQL: &str = "SELECT kind, plan, currency, meter, any(dim_keys) AS keys, any(dim_values) AS vals, \
    sum(quantity) AS quantity, sum(amount) AS amount, count() AS charges FROM \
    (SELECT charge_id, any(kind) AS kind, any(plan) AS plan, any(currency) AS currency, any(meter) AS meter, \
     any(dimensions_key) AS dims_key, any(dim_keys) AS dim_keys, any(dim_values) AS dim_values, \
     any(quantity) AS quantity, any(amount) AS amount \
     FROM charges WHERE tenant = ? AND period_start = toDateTime(?) GROUP BY charge_id) \
    GROUP BY kind, plan, currency, meter, dims_key";

/// Start (Unix ms) of the period `YYYY-MM`.
pub fn parse_period(s: &str) -> Result<i64, ApiError> {
    let ok = s.len() == 7 && s.as_bytes()[4] == b'-' && s.bytes().enumerate().all(|(i, b)| i == 4 || b.is_ascii_digit());
    let start = ok.then(|| meterflow_core::time::parse_rfc3339_ms(&format!("{s}-01T00:00:00Z")).ok()).flatten();
    start.ok_or_else(|| ApiError::bad_request(format!("period {s:?} is not a month like 2026-11")))
}

/// `YYYY-MM` of the period starting at `ms`.
pub fn period_name(ms: i64) -> String {
    format_rfc3339_s(ms).chars().take(7).collect()
}

/// The invoice of a billing period so far.
///
/// One line per price (plan and catalog price): quantity, free units, the tiers the quantity
/// crossed, the number of charges, the exact amount (the sum of the charges) and the amount
/// rounded to the currency's minor unit (half-to-even, per line); the minimum-commitment
/// true-up (charged once the period closed, else projected); totals per currency (the sum of
/// the rounded lines, and the exact sum of the charges).
#[utoipa::path(
    get,
    path = "/v1/customers/{tenant}/invoice",
    tag = "billing",
    security(("bearer" = [])),
    params(("tenant" = String, Path, description = "the customer"), InvoiceParams),
    responses(
        (status = 200, description = "the invoice preview", body = InvoiceResponse),
        (status = 400, description = "malformed period", body = ErrorBody),
        TenantPath<Read>,
        (status = 503, description = "ClickHouse unavailable", body = ErrorBody),
    )
)]
pub async fn get_invoice(
    State(state): State<AppState>,
    TenantPath { tenant, .. }: TenantPath<Read>,
    params: Result<Query<InvoiceParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<InvoiceResponse>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let period = match p.period.as_deref() {
        Some(s) => parse_period(s)?,
        None => pricing::period_start(now_ms()),
    };
    Ok(Json(to_json(&preview(&state, &tenant, period).await?)))
}

/// The preview of `tenant`'s period holding `period_ms` (also used by the customer page).
pub async fn preview(state: &AppState, tenant: &str, period_ms: i64) -> Result<Invoice, ApiError> {
    let start = pricing::period_start(period_ms);
    let rows = state
        .clickhouse
        .query(SQL)
        .bind(tenant)
        .bind(start.div_euclid(1000))
        .fetch_all::<Row>()
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot read charges: {e}")))?;
    let groups: Vec<ChargeGroup> = rows
        .into_iter()
        .map(|r| ChargeGroup {
            kind: r.kind,
            plan: r.plan,
            currency: r.currency,
            meter: r.meter,
            dimensions: r.keys.into_iter().zip(r.vals).collect(),
            quantity: decimal::from_ch_i128(r.quantity),
            amount: decimal::from_ch_i128(r.amount),
            charges: r.charges,
        })
        .collect();
    let inv = invoice::build(&state.catalog, tenant, start, &groups);
    let label = inv.true_ups.first().map_or("none", |t| t.status.as_str());
    metrics::counter!(crate::metrics::INVOICE_PREVIEWS, "true_up" => label).increment(1);
    Ok(inv)
}

/// `amount` with exactly the currency's minor-unit digits (`13.30`, `0.00`, `1250`).
pub fn money(amount: Decimal, currency: &str) -> String {
    let mut a = invoice::round_minor(amount, currency);
    a.rescale(invoice::minor_units(currency));
    a.to_string()
}

fn exact(d: Decimal) -> String {
    decimal::format(&d)
}

/// The JSON form of an invoice.
pub fn to_json(inv: &Invoice) -> InvoiceResponse {
    let lines = inv
        .lines
        .iter()
        .map(|l| LineJson {
            plan: l.plan.clone(),
            price: l.price.clone(),
            meter: l.meter.clone(),
            currency: l.currency.clone(),
            model: l.model.map(str::to_owned),
            quantity: exact(l.quantity),
            free_units: exact(l.free_units),
            billable_quantity: exact(l.billable_quantity),
            tiers: l
                .tiers
                .iter()
                .map(|t| TierJson {
                    tier: t.tier,
                    up_to: t.up_to.map(exact),
                    units: exact(t.units),
                    unit_price: exact(t.unit_price),
                    flat_fee: exact(t.flat_fee),
                })
                .collect(),
            charges: l.charges,
            amount: money(l.amount, &l.currency),
            amount_exact: exact(l.amount_exact),
        })
        .collect();
    InvoiceResponse {
        tenant: inv.tenant.clone(),
        period: period_name(inv.period_start_ms),
        period_start: format_rfc3339_s(inv.period_start_ms),
        period_end: format_rfc3339_s(inv.period_end_ms),
        rounding: ROUNDING.to_owned(),
        lines,
        true_ups: inv
            .true_ups
            .iter()
            .map(|t| TrueUpJson {
                currency: t.currency.clone(),
                status: t.status.as_str().to_owned(),
                commitment: t.commitment.map(exact),
                amount: money(t.amount, &t.currency),
                amount_exact: exact(t.amount_exact),
            })
            .collect(),
        totals: inv
            .totals
            .iter()
            .map(|t| TotalJson {
                currency: t.currency.clone(),
                usage: money(t.usage, &t.currency),
                true_up: money(t.true_up, &t.currency),
                total: money(t.total, &t.currency),
                total_exact: exact(t.total_exact),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_and_money() {
        assert_eq!(parse_period("2026-11").unwrap(), 1_793_491_200_000);
        assert_eq!(period_name(1_793_491_200_000), "2026-11");
        for bad in ["2026-13", "2026-1", "26-11-01", "2026/11", "abcd-ef", ""] {
            assert!(parse_period(bad).is_err(), "{bad}");
        }
        assert_eq!(money(Decimal::new(13_345_678_900, 9), "USD"), "13.35");
        assert_eq!(money(Decimal::ZERO, "EUR"), "0.00");
        assert_eq!(money(Decimal::new(12505, 1), "JPY"), "1250");
        assert_eq!(money(Decimal::new(5, 3), "KWD"), "0.005");
    }
}
