//! Real-time balances and entitlement checks: settled state plus pending spend.
//!
//! The rater composes a [`Balance`] per tenant from its settled state (wallet balance, the
//! period's cumulative quantities and usage revenue) and the tenant's pending spend
//! ([`super::pending`]), and publishes it (JSON, compacted topic keyed by tenant). The API
//! keeps the newest per tenant in memory and answers entitlement checks from it with
//! [`check`]: the same price function, the same cumulative quantities, no query.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::pending::{price_pending, PendingBook, SettledUsage};
use super::{stable_id, Alert};
use crate::pricing::{self, Catalog, LimitKind, LimitStatus};
use crate::Error;

/// Currency reported for a tenant without a plan (nothing can be charged to it anyway).
const FALLBACK_CURRENCY: &str = "USD";

/// What the rater knows of a tenant once its charges are written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantSettled {
    pub usage: SettledUsage,
    /// currency -> wallet balance (credit minus settled charges; negative: arrears).
    pub wallet: BTreeMap<String, Decimal>,
    /// Has a prepaid wallet: its balance bounds what it may spend.
    pub prepaid: bool,
}

/// A tenant's balance in the currency of its current plan. Decimals are strings in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    pub tenant: String,
    pub currency: String,
    /// Wallet balance after every settled charge.
    #[serde(with = "rust_decimal::serde::str")]
    pub settled: Decimal,
    /// Price of the open windows' provisional totals, not settled yet.
    #[serde(with = "rust_decimal::serde::str")]
    pub pending: Decimal,
    /// `settled - pending`.
    #[serde(with = "rust_decimal::serde::str")]
    pub available: Decimal,
    pub prepaid: bool,
    /// The billing period the quantities and spend are of (Unix ms).
    pub period_start: i64,
    /// Usage spend of the period, settled plus pending.
    #[serde(with = "rust_decimal::serde::str")]
    pub period_spend: Decimal,
    /// plan -> price -> settled plus pending quantity of the period: where the next unit
    /// falls in the tiers.
    pub quantities: BTreeMap<String, BTreeMap<String, Decimal>>,
    pub limits: Vec<LimitStatus>,
    /// Rater wall clock when composed.
    pub updated_at: i64,
}

/// Composes the tenant's balance at `now_ms`.
pub fn compose(catalog: &Catalog, tenant: &str, now_ms: i64, settled: &TenantSettled, book: &PendingBook) -> Result<Balance, Error> {
    let spend = price_pending(catalog, tenant, book.windows(tenant), &settled.usage)?;
    let currency = catalog.plan_for(tenant, now_ms).map_or(FALLBACK_CURRENCY, |p| p.currency.as_str()).to_owned();
    let period = pricing::period_start(now_ms);
    let wallet = settled.wallet.get(&currency).copied().unwrap_or_default();
    let pending = spend.total(&currency);
    let settled_period = settled.usage.get(&period);
    let spent_in = |cur: &str| {
        settled_period.and_then(|p| p.revenue.get(cur)).copied().unwrap_or_default() + spend.in_period(period, cur)
    };
    let mut quantities = settled_period.map(|p| p.usage.clone()).unwrap_or_default();
    for ((p, plan, price), q) in &spend.quantities {
        if *p == period {
            *quantities.entry(plan.clone()).or_default().entry(price.clone()).or_default() += *q;
        }
    }
    let limits = catalog.spend_limits(tenant).iter().map(|l| l.status(spent_in(&l.currency))).collect();
    Ok(Balance {
        tenant: tenant.to_owned(),
        period_spend: spent_in(&currency),
        currency,
        settled: wallet,
        pending,
        available: wallet - pending,
        prepaid: settled.prepaid,
        period_start: period,
        quantities,
        limits,
        updated_at: now_ms,
    })
}

/// Alerts for the limits `after` crossed since `before` (the tenant's previous balance, if
/// any, in the same period). Ids hash (tenant, period, kind, currency, amount): one alert per
/// limit and period however often the balance is recomputed or the rater restarts.
pub fn limit_alerts(before: Option<&Balance>, after: &Balance) -> Vec<Alert> {
    let mut out = Vec::new();
    for l in &after.limits {
        let prev = before
            .filter(|b| b.period_start == after.period_start)
            .and_then(|b| b.limits.iter().find(|x| x.kind == l.kind && x.currency == l.currency && x.amount == l.amount))
            .map_or(Decimal::ZERO, |x| x.spent);
        if !(prev < l.amount && l.spent >= l.amount) {
            continue;
        }
        let kind = l.kind;
        let period = after.period_start.to_string();
        let amount = l.amount.normalize().to_string();
        out.push(Alert {
            alert_id: stable_id(&[b"spend_limit", after.tenant.as_bytes(), period.as_bytes(), kind.as_str().as_bytes(), l.currency.as_bytes(), amount.as_bytes()]),
            tenant: after.tenant.clone(),
            currency: l.currency.clone(),
            kind: kind.alert_kind().to_owned(),
            balance: l.spent,
            threshold: l.amount,
            trigger: format!("period:{period}"),
        });
    }
    out
}

/// Why an entitlement check answered as it did.
pub const REASON_OK: &str = "ok";
pub const REASON_NO_PRICE: &str = "no_price";
pub const REASON_INSUFFICIENT_BALANCE: &str = "insufficient_balance";
pub const REASON_HARD_LIMIT: &str = "hard_limit";

/// The answer to "may this tenant use `quantity` of `meter` now?".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entitlement {
    pub allowed: bool,
    /// Money left under the tightest constraint (available balance of a prepaid tenant, hard
    /// limits) after this request; `None` when nothing constrains the tenant.
    #[serde(with = "rust_decimal::serde::str_option")]
    pub remaining: Option<Decimal>,
    /// [`REASON_OK`], [`REASON_NO_PRICE`] (allowed: nothing would be charged),
    /// [`REASON_INSUFFICIENT_BALANCE`] or [`REASON_HARD_LIMIT`].
    pub reason: &'static str,
    /// What the request would be charged (marginal price at the period's quantity so far).
    #[serde(with = "rust_decimal::serde::str")]
    pub cost: Decimal,
    pub currency: String,
}

/// Prices `quantity` of `meter` for `tenant` at `now_ms` on top of `balance` (its latest
/// published balance, if any) and checks it against the available balance (prepaid tenants)
/// and the hard spend limits.
pub fn check(
    catalog: &Catalog,
    tenant: &str,
    balance: Option<&Balance>,
    meter: &str,
    dimensions: &BTreeMap<String, String>,
    quantity: Decimal,
    now_ms: i64,
) -> Result<Entitlement, Error> {
    let period = pricing::period_start(now_ms);
    let current = balance.filter(|b| b.period_start == period);
    let plan = catalog.plan_for(tenant, now_ms);
    let currency = plan.map_or(FALLBACK_CURRENCY, |p| p.currency.as_str()).to_owned();
    let Some((plan, price)) = plan.and_then(|p| p.price_for(meter, dimensions).map(|pr| (p, pr))) else {
        return Ok(Entitlement { allowed: true, remaining: None, reason: REASON_NO_PRICE, cost: Decimal::ZERO, currency });
    };
    let q = current.and_then(|b| b.quantities.get(&plan.id)).and_then(|m| m.get(&price.name)).copied().unwrap_or_default();
    let after = q.checked_add(quantity).ok_or_else(|| Error::Arithmetic("requested quantity".into()))?;
    let cost = price.charge(q, after)?;
    let mut remaining: Option<Decimal> = None;
    let mut reason = REASON_OK;
    let mut tighten = |left: Decimal, why: &'static str| {
        remaining = Some(remaining.map_or(left, |r| r.min(left)));
        if left < Decimal::ZERO && reason == REASON_OK {
            reason = why;
        }
    };
    if let Some(b) = balance.filter(|b| b.prepaid && b.currency == currency) {
        tighten(b.available - cost, REASON_INSUFFICIENT_BALANCE);
    }
    for l in catalog.spend_limits(tenant).iter().filter(|l| l.kind == LimitKind::Hard && l.currency == currency) {
        let spent = current
            .and_then(|b| b.limits.iter().find(|x| x.kind == LimitKind::Hard && x.currency == l.currency && x.amount == l.amount))
            .map_or(Decimal::ZERO, |x| x.spent);
        tighten(l.amount - spent - cost, REASON_HARD_LIMIT);
    }
    Ok(Entitlement { allowed: reason == REASON_OK, remaining, reason, cost, currency })
}
