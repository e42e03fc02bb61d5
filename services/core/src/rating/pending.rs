//! Pending spend: the price of open windows' provisional totals, until they settle.
//!
//! # Design (provisional -> pending -> settled)
//!
//! * The aggregator publishes the running total of every open window that changed since its
//!   previous flush ([`ProvisionalTotal`]); [`PendingBook`] keeps, per tenant and window, the
//!   newest one (highest `as_of_offset`), so re-deliveries and reordering cannot go back.
//! * When the window's final aggregate is rated, the rater calls [`PendingBook::on_settled`]:
//!   the window leaves the book and a tombstone keeps a late provisional total of it (a
//!   re-delivery, or an aggregator replaying after a restart) from counting it again.
//! * **Pricing** ([`price_pending`]) uses the settlement's own function: per (period, plan,
//!   price) the pending quantity `P` (sum of the provisional values of the tenant's open
//!   windows of that price) is priced as the marginal charge `price(C + P) - price(C)` given the
//!   settled cumulative quantity `C` of the period ([`super::RatingState::settled_usage`]).
//!   Because charges are differences of rounded prices, settling a window whose provisional
//!   total was its final value moves `C` to `C + v` and `P` to `P - v` and leaves
//!   `settled + pending` unchanged to the last digit, for every price model, free allowances
//!   and restatements included (`tests/pending_props.rs`).
//! * Best effort, bounded: a pending window whose close time is more than
//!   [`PENDING_HORIZON_MS`] behind the clock is dropped (its settlement was missed, e.g. parked
//!   or owned by another rater), and tombstones are dropped at the same horizon.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::pricing::{self, Catalog};
use crate::records::{MeterAggregate, ProvisionalTotal};
use crate::Error;

/// How long after its close time a pending window (or a settled window's tombstone) is kept.
pub const PENDING_HORIZON_MS: i64 = 3_600_000;

/// A window of one tenant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WindowRef {
    pub meter: String,
    pub window_start: i64,
    pub dimensions: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Open {
    value: Decimal,
    closes_at: i64,
    as_of: (i32, i64),
}

/// Per tenant, the newest provisional total of each open window not yet settled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingBook {
    open: BTreeMap<String, BTreeMap<WindowRef, Open>>,
    /// Settled windows, with the time after which they can be forgotten.
    settled: BTreeMap<String, BTreeMap<WindowRef, i64>>,
}

impl PendingBook {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a provisional total; true if the tenant's pending windows changed. Ignored: an
    /// older total than the one held, and any total of a settled window.
    pub fn on_provisional(&mut self, p: &ProvisionalTotal) -> bool {
        let w = WindowRef { meter: p.meter.clone(), window_start: p.window_start, dimensions: p.dimensions.clone() };
        if self.settled.get(&p.tenant).is_some_and(|s| s.contains_key(&w)) {
            return false;
        }
        let open = Open { value: p.value, closes_at: p.closes_at, as_of: (p.source_partition, p.as_of_offset) };
        let windows = self.open.entry(p.tenant.clone()).or_default();
        match windows.get_mut(&w) {
            // Offsets compare only within one source partition; a window moves partitions
            // only if the producers' partitioning changed, and then the newer one wins.
            Some(held) if held.as_of.0 == open.as_of.0 && held.as_of.1 >= open.as_of.1 => false,
            Some(held) if *held == open => false,
            Some(held) => {
                *held = open;
                true
            }
            None => {
                windows.insert(w, open);
                true
            }
        }
    }

    /// The window of `agg` settled (its final aggregate, or a restatement, was rated): it
    /// stops being pending, for good. True if it was pending.
    pub fn on_settled(&mut self, agg: &MeterAggregate, closes_at: i64) -> bool {
        let w = WindowRef { meter: agg.meter.clone(), window_start: agg.window_start, dimensions: agg.dimensions.clone() };
        let forget_at = closes_at.max(agg.window_end).saturating_add(PENDING_HORIZON_MS);
        let was = match self.open.get_mut(&agg.tenant) {
            Some(windows) => {
                let was = windows.remove(&w).is_some();
                if windows.is_empty() {
                    self.open.remove(&agg.tenant);
                }
                was
            }
            None => false,
        };
        let t = self.settled.entry(agg.tenant.clone()).or_default();
        let at = t.entry(w).or_insert(forget_at);
        *at = (*at).max(forget_at);
        was
    }

    /// Drops what is past [`PENDING_HORIZON_MS`] at `now_ms`; returns the tenants whose pending
    /// windows changed.
    pub fn expire(&mut self, now_ms: i64) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        self.open.retain(|tenant, windows| {
            let before = windows.len();
            windows.retain(|_, o| o.closes_at.saturating_add(PENDING_HORIZON_MS) > now_ms);
            if windows.len() != before {
                changed.insert(tenant.clone());
            }
            !windows.is_empty()
        });
        self.settled.retain(|_, t| {
            t.retain(|_, &mut forget_at| forget_at > now_ms);
            !t.is_empty()
        });
        changed
    }

    /// The tenant's pending windows and their provisional values.
    pub fn windows<'a>(&'a self, tenant: &str) -> impl Iterator<Item = (&'a WindowRef, Decimal)> + 'a {
        self.open.get(tenant).into_iter().flat_map(|w| w.iter().map(|(k, o)| (k, o.value)))
    }

    /// Tenants with pending windows.
    pub fn tenants(&self) -> impl Iterator<Item = &String> {
        self.open.keys()
    }

    /// Pending windows, all tenants.
    pub fn len(&self) -> usize {
        self.open.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

/// One billing period of a tenant as settled so far (a copy out of the rating state).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodUsage {
    /// plan -> price name -> settled cumulative quantity.
    pub usage: BTreeMap<String, BTreeMap<String, Decimal>>,
    /// currency -> settled usage revenue.
    pub revenue: BTreeMap<String, Decimal>,
}

/// A tenant's settled periods, by period start.
pub type SettledUsage = BTreeMap<i64, PeriodUsage>;

/// The price of a tenant's pending windows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingSpend {
    /// (period, currency) -> pending amount.
    pub amounts: BTreeMap<(i64, String), Decimal>,
    /// (period, plan, price) -> pending quantity.
    pub quantities: BTreeMap<(i64, String, String), Decimal>,
    /// Pending windows no price applies to (they will park at settlement): not counted.
    pub unpriced: usize,
}

impl PendingSpend {
    /// Pending amount in `currency`, all periods.
    pub fn total(&self, currency: &str) -> Decimal {
        self.amounts.iter().filter(|((_, c), _)| c == currency).map(|(_, a)| *a).sum()
    }

    /// Pending amount in `currency` for one period.
    pub fn in_period(&self, period: i64, currency: &str) -> Decimal {
        self.amounts.get(&(period, currency.to_owned())).copied().unwrap_or_default()
    }
}

/// Prices `windows` (a tenant's pending windows) on top of `settled`; see the module docs.
pub fn price_pending<'a>(
    catalog: &Catalog,
    tenant: &str,
    windows: impl IntoIterator<Item = (&'a WindowRef, Decimal)>,
    settled: &SettledUsage,
) -> Result<PendingSpend, Error> {
    let mut out = PendingSpend::default();
    let mut currency_of: BTreeMap<(i64, String), String> = BTreeMap::new();
    for (w, value) in windows {
        let Some(plan) = catalog.plan_for(tenant, w.window_start) else {
            out.unpriced += 1;
            continue;
        };
        let Some(price) = plan.price_for(&w.meter, &w.dimensions) else {
            out.unpriced += 1;
            continue;
        };
        let period = pricing::period_start(w.window_start);
        let q = out.quantities.entry((period, plan.id.clone(), price.name.clone())).or_default();
        *q = q.checked_add(value).ok_or_else(|| Error::Arithmetic(format!("pending quantity of {tenant:?}")))?;
        currency_of.insert((period, plan.id.clone()), plan.currency.clone());
    }
    for ((period, plan_id, price_name), q) in &out.quantities {
        // Found by the loop above, in the same catalog.
        let price = catalog.plan(plan_id).and_then(|plan| plan.price(price_name)).ok_or_else(|| Error::Unrateable {
            tenant: tenant.to_owned(),
            meter: price_name.clone(),
            reason: format!("price {price_name:?} of plan {plan_id:?} vanished from the catalog"),
        })?;
        let c = settled
            .get(period)
            .and_then(|p| p.usage.get(plan_id))
            .and_then(|m| m.get(price_name))
            .copied()
            .unwrap_or_default();
        let after = c.checked_add(*q).ok_or_else(|| Error::Arithmetic(format!("pending quantity of {tenant:?}")))?;
        let amount = price.charge(c, after)?;
        let currency = currency_of[&(*period, plan_id.clone())].clone();
        *out.amounts.entry((*period, currency)).or_default() += amount;
    }
    Ok(out)
}
