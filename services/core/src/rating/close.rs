//! Closing billing periods: commitment true-ups once a period's end plus grace has passed.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::{stable_id, PeriodState, TenantState, TrueUp, KIND_TRUE_UP};
use crate::pricing::{self, Catalog};
use crate::records::Charge;

/// Walks the tenant's periods from `next_close` and closes each one whose end plus grace is
/// at or before the watermark (creating empty records for months without usage).
pub(super) fn close_due(catalog: &Catalog, tenant: &str, ts: &mut TenantState, watermark: Option<i64>, grace_ms: i64) -> Vec<Charge> {
    let mut out = Vec::new();
    let Some(wm) = watermark else { return out };
    loop {
        let p = ts.next_close;
        let end = pricing::period_end(p);
        if end.saturating_add(grace_ms) > wm {
            break;
        }
        let rec = ts.periods.entry(p).or_default();
        if !rec.closed {
            rec.closed = true;
            out.extend(true_up(catalog, tenant, p, rec));
        }
        ts.next_close = end;
    }
    out
}

/// Brings the period's true-ups in line with `max(0, commitment - revenue)` per currency,
/// returning the (unstamped) charges for the differences.
pub(super) fn true_up(catalog: &Catalog, tenant: &str, period: i64, rec: &mut PeriodState) -> Vec<Charge> {
    let commitments = catalog.commitments(tenant, period);
    let mut currencies: Vec<String> = commitments.keys().cloned().collect();
    currencies.extend(rec.true_ups.keys().filter(|c| !commitments.contains_key(*c)).cloned());
    let mut out = Vec::new();
    for currency in currencies {
        let revenue = rec.revenue.get(&currency).copied().unwrap_or_default();
        let commitment = commitments.get(&currency);
        let owed = commitment.map_or(Decimal::ZERO, |c| (c.amount - revenue).max(Decimal::ZERO));
        let prev = rec.true_ups.get(&currency);
        let already = prev.map_or(Decimal::ZERO, |t| t.amount);
        if owed == already {
            continue;
        }
        let revision = prev.map_or(0, |t| t.revision + 1);
        let plan = commitment.map_or_else(|| prev.map(|t| t.plan.clone()).unwrap_or_default(), |c| c.plan.clone());
        let amount = owed - already;
        out.push(Charge {
            charge_id: stable_id(&[
                KIND_TRUE_UP.as_bytes(),
                tenant.as_bytes(),
                currency.as_bytes(),
                &period.to_le_bytes(),
                &revision.to_le_bytes(),
            ]),
            kind: KIND_TRUE_UP.to_owned(),
            tenant: tenant.to_owned(),
            plan: plan.clone(),
            currency: currency.clone(),
            meter: String::new(),
            dimensions: BTreeMap::new(),
            period_start: period,
            window_start: period,
            window_end: pricing::period_end(period),
            revision,
            quantity: Decimal::ZERO,
            amount,
            provider_cost: Decimal::ZERO,
            margin: amount,
            seq: 0,
        });
        rec.true_ups.insert(currency, TrueUp { plan, amount: owed, revision });
    }
    out
}
