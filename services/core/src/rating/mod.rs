//! Incremental rating: aggregates in, charges out, exactly once per aggregate.
//!
//! The rater service keeps one [`RatingState`] per aggregates-topic partition it owns (inside
//! a [`partition::RaterPartition`]) and checkpoints it together with its consumer offset. The
//! state is a pure function of the aggregates it rated (and the watermarks it was given), so
//! a restored state re-fed the same input produces the same charges with the same ids.
//!
//! # Semantics
//!
//! * **Keying.** Per tenant and calendar-month billing period (UTC) the state keeps, per
//!   *plan segment* and price, the cumulative quantity; and per currency the period's usage
//!   revenue. It relies on all aggregates of one tenant landing on one partition (the
//!   aggregates topic is keyed by tenant), because a minimum commitment is about the tenant's
//!   whole bill.
//! * **Period of a window.** The period holding the window's start. Windows are aligned
//!   minute/hour/day tumbling windows, so they never straddle a month boundary.
//! * **Plan of a window.** The plan in force (see [`Catalog::plan_for`]) at the window's start
//!   prices the whole window, including all its restatements (they share the window start),
//!   so a restatement is always priced by the plan its original was priced by.
//! * **Plan segments.** Cumulative quantities are kept per (period, plan, price): after a
//!   mid-period plan change, the new plan's tiers and free allowance start from zero, and the
//!   old plan's segment keeps its own tiers; if the tenant returns to a plan within the period
//!   its segment continues. Why restart instead of carrying the quantity across: with a
//!   carried quantity the new plan's charges would depend on how much of the old plan's usage
//!   had *arrived* when each window was rated, so late data for the old segment would make
//!   the total depend on arrival order. Per-segment accumulation keeps the period's total
//!   equal to `Σ_segments price_plan(segment quantity)` regardless of order.
//! * **Charges.** Rating an aggregate with `delta = value - previous_value` moves its price's
//!   cumulative quantity from `c` to `c + delta` and charges
//!   `price(c + delta) - price(c)` (rounded prices, see [`crate::pricing`]): the charges of a
//!   price telescope to the rounded price of its total quantity, whatever the split, arrival
//!   order or restatements (a restatement with revision > 0 carries the value it replaces,
//!   so it is rated as the difference). One usage charge is emitted per rated aggregate,
//!   even if its amount is zero, so every aggregate maps to exactly one charge id.
//! * **Replays.** Per source partition (the aggregator's partition) the state remembers the
//!   highest `seq` it rated; an aggregate with `seq <=` that is a re-delivery and is
//!   [`RateOutcome::Skipped`]. This requires each source partition's aggregates to arrive in
//!   `seq` order (the aggregator produces them in order with an idempotent producer); windows
//!   and source partitions may interleave arbitrarily.
//! * **Cost.** Per revision, the provider cost is exact per event: the costs carried by the
//!   window's events (the provider told us what it charged, which beats a rate card) plus the
//!   catalog's rate for the meter and dimension value times the quantity of the events that
//!   carry none (`uncosted_value`, schema v2), rounded to 9 digits (no rate: zero). So the
//!   cost of a set of events does not depend on how window boundaries split it. Aggregates
//!   without `uncosted_value` (v1, or non-additive aggregations) keep the window rule: the
//!   carried cost when non-zero, else rate x value. The charge carries `cost(this revision) - cost(revision replaced)`, so a
//!   window's cost deltas telescope to the cost of its last revision even when a later
//!   revision starts carrying cost. `margin = amount - provider_cost`.
//! * **Minimum commitment.** When a period of a tenant closes (its end plus
//!   [`RatingConfig::grace_ms`] is at or before the watermark given to [`RatingState::advance`],
//!   or explicitly via [`RatingState::on_period_close`]), a `true_up` charge of
//!   `max(0, commitment - period usage revenue)` is emitted per currency (nothing when zero).
//!   The commitment is each committing plan's minimum prorated by the time it was in force
//!   during the period ([`Catalog::commitments`]). If usage of a closed period is rated later
//!   (restatements, late windows), the true-up is recomputed and the difference is emitted
//!   as an adjusting `true_up` charge with `revision + 1`, so usage plus true-ups always equal
//!   `max(commitment, usage)` exactly. A true-up charge has `kind = "true_up"`, an empty
//!   meter and dimensions, quantity 0, no provider cost, and spans the whole period
//!   (`window_start = period_start`, `window_end` = next month); its id hashes (tenant,
//!   currency, period, revision). Every period from the first one a tenant was seen in is
//!   closed, including months without usage (they owe the full minimum); a tenant this state
//!   never saw gets no true-up unless the rater calls `on_period_close` for it.
//! * **Retention.** Period records are dropped [`RatingConfig::retention_ms`] after the period
//!   closes; aggregates for a dropped (finalized) period are rejected, because their
//!   cumulative context is gone and rating them from zero would overcharge.
//! * **Rejections.** An aggregate for a finalized period or with a malformed window is
//!   [`RateOutcome::Rejected`] (the service dead-letters it); its `seq` still counts as rated,
//!   so a re-delivery is skipped instead of dead-lettered twice.
//! * **Parking.** An aggregate that cannot be priced *now* but could be after a catalog fix
//!   is [`RateOutcome::Parked`] with a [`ParkReason`]: `unpriced` (no plan in force and no
//!   default plan, or no price for its meter and dimensions) or `overflow` (a decimal result
//!   that does not fit, e.g. 4e23 tokens). Nothing of it is charged and the state is not
//!   touched except that its `seq` counts as consumed and `(source_partition, seq)` is
//!   remembered as parked: one poison aggregate never stops the billing of anybody else.
//!   [`RatingState::rerate`] later rates a parked aggregate (when the service reads a rerate
//!   request for it, see `meterflow-admin rerate`) exactly as [`RatingState::rate`] would have,
//!   with the same charge id: the usage charges of a price telescope whatever the order, so a
//!   window rated late sums to the same bill. A rerate of something not (or no longer) parked
//!   is [`RerateOutcome::NotParked`]: a second rerate, or a forged one, charges nothing.
//!   Rerates are records at an offset of the aggregates partition, so a replay after a
//!   restart makes the same decisions.
//! * **Admission.** [`RatingState::screen`] refuses, before any state change, an aggregate
//!   whose window or watermark lies further ahead than [`Admission::max_future_ms`] of the
//!   reference time, or whose `seq` jumps more than [`Admission::max_seq_gap`] past the high
//!   water of its source partition: such records are forged or corrupt, and trusting them would
//!   close billing periods early or make the next real aggregates look like re-deliveries.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::decimal;
use crate::pricing::{self, Catalog};
use crate::records::{Charge, ChargeKind, MeterAggregate, RaterReason};
use crate::Error;

pub mod balance;
mod admission;
mod close;
mod ids;
pub mod partition;
pub mod pending;
mod wallet;
pub use admission::{Admission, REASON_BAD_SEQ, REASON_FUTURE_WINDOW};
use close::{close_due, true_up};
pub(crate) use ids::stable_id;
use ids::usage_charge_id;
pub use wallet::{AdjustmentOutcome, Alert, WalletConfig, Wallets, ALERT_EXHAUSTED, ALERT_LOW_BALANCE};
pub use wallet::{
    Account, CreditKind, Grant, LedgerEntry, MOVE_ARREARS, MOVE_DEBIT, MOVE_DRAWDOWN, MOVE_EXPIRY, MOVE_GRANT, MOVE_REFUND,
};

/// Charge kinds as strings, for the records' `kind` field (the set is [`ChargeKind`]).
pub const KIND_USAGE: &str = ChargeKind::Usage.as_str();
pub const KIND_TRUE_UP: &str = ChargeKind::TrueUp.as_str();

/// Largest period revenue magnitude the state accepts: 1e19 still holds 9 fractional digits
/// exactly in a `Decimal`, so revenue and true-ups (commitments are at most 1e15) stay exact.
const MAX_REVENUE: i128 = 10_000_000_000_000_000_000; // 1e19

/// Tunables of one state, stored in its snapshots so a restored state behaves the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatingConfig {
    /// How long after its end a period stays open for late aggregates before the true-up.
    /// Late usage after the close is still rated (with an adjusting true-up); grace only
    /// saves churn on true-ups.
    pub grace_ms: i64,
    /// How long after closing a period its records are kept to rate restatements.
    pub retention_ms: i64,
}

impl Default for RatingConfig {
    fn default() -> Self {
        Self {
            grace_ms: 3_600_000,
            retention_ms: 62 * 86_400_000,
        }
    }
}

/// Why an aggregate was parked instead of charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParkReason {
    /// No plan in force (and no default plan) or no price for the meter and dimensions.
    Unpriced,
    /// A decimal computation (quantity, price, revenue, cost, margin) does not fit.
    Overflow,
}

impl ParkReason {
    pub const ALL: [ParkReason; 2] = [ParkReason::Unpriced, ParkReason::Overflow];

    /// The dead-letter reason and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unpriced => RaterReason::Unpriced.as_str(),
            Self::Overflow => RaterReason::Overflow.as_str(),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// What rating one aggregate did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateOutcome {
    /// The usage charge, followed by any true-ups it caused (a late aggregate for a closed
    /// period adjusts the true-up; an aggregate for a closable period closes it).
    Charged(Vec<Charge>),
    /// A re-delivery: `seq <= high_water` for its source partition. No state change.
    Skipped { source_partition: i32, seq: i64, high_water: i64 },
    /// Not rateable ([`Error::Unrateable`]); dead-letter it. Only the seq was recorded.
    Rejected(Error),
    /// Cannot be priced now; parked for a [`RatingState::rerate`]. Only the seq and the
    /// parking were recorded.
    Parked { reason: ParkReason, error: Error },
}

/// What a rerate request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RerateOutcome {
    /// Priced now: the usage charge (with the id it would have had) and any true-ups.
    Charged(Vec<Charge>),
    /// Not parked (never was, or already re-rated): nothing happened.
    NotParked,
    /// Still cannot be priced; stays parked.
    StillParked { reason: ParkReason, error: Error },
    /// Can never be rated (e.g. its period was finalized meanwhile); no longer parked.
    Rejected(Error),
}

/// Per (tenant, period) record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PeriodState {
    /// plan -> price name -> cumulative quantity.
    #[serde(default)]
    usage: BTreeMap<String, BTreeMap<String, Decimal>>,
    /// currency -> usage revenue (sum of usage charge amounts).
    #[serde(default)]
    revenue: BTreeMap<String, Decimal>,
    #[serde(default)]
    closed: bool,
    /// currency -> true-up emitted so far.
    #[serde(default)]
    true_ups: BTreeMap<String, TrueUp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TrueUp {
    plan: String,
    /// Sum of the true-up charges emitted for the period and currency.
    amount: Decimal,
    /// Revision of the last true-up charge.
    revision: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TenantState {
    /// The earliest period of this tenant not yet walked by the closer.
    next_close: i64,
    periods: BTreeMap<i64, PeriodState>,
}

/// The rating state of one aggregates-topic partition. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatingState {
    partition: i32,
    config: RatingConfig,
    watermark_ms: Option<i64>,
    /// source partition -> highest seq rated.
    high_water: BTreeMap<i32, i64>,
    /// Charges emitted so far; the next charge's `seq` is this plus one.
    charges_emitted: i64,
    /// Periods starting before this are finalized (records dropped).
    finalized_before: Option<i64>,
    tenants: BTreeMap<String, TenantState>,
    /// source partition -> seqs parked (see [`RatingState::rerate`]).
    #[serde(default)]
    parked: BTreeMap<i32, BTreeSet<i64>>,
}

/// The result of pricing an aggregate against the current state, before committing it.
struct Prepared {
    period: i64,
    plan: String,
    currency: String,
    price: String,
    cum_after: Decimal,
    revenue_after: Decimal,
    charge: Charge,
}

enum Prep {
    Reject(Error),
    Park(ParkReason, Error),
    Ready(Box<Prepared>),
}

impl RatingState {
    /// A fresh state for aggregates-topic `partition`.
    pub fn new(partition: i32, config: RatingConfig) -> Self {
        Self {
            partition,
            config,
            watermark_ms: None,
            high_water: BTreeMap::new(),
            charges_emitted: 0,
            finalized_before: None,
            tenants: BTreeMap::new(),
            parked: BTreeMap::new(),
        }
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    pub fn config(&self) -> &RatingConfig {
        &self.config
    }

    /// The highest watermark given to [`advance`](Self::advance).
    pub fn watermark(&self) -> Option<i64> {
        self.watermark_ms
    }

    /// Highest `seq` rated (or rejected) for a source partition.
    pub fn high_water(&self, source_partition: i32) -> Option<i64> {
        self.high_water.get(&source_partition).copied()
    }

    /// Whether `(source_partition, seq)` is parked.
    pub fn is_parked(&self, source_partition: i32, seq: i64) -> bool {
        self.parked.get(&source_partition).is_some_and(|s| s.contains(&seq))
    }

    /// Number of aggregates parked now.
    pub fn parked_count(&self) -> usize {
        self.parked.values().map(BTreeSet::len).sum()
    }

    /// Number of charges emitted; also the `seq` of the last one.
    pub fn charges_emitted(&self) -> i64 {
        self.charges_emitted
    }

    /// Cumulative quantity of one price in one plan segment of a tenant's period.
    pub fn cumulative(&self, tenant: &str, period_start: i64, plan: &str, price: &str) -> Decimal {
        self.period(tenant, period_start)
            .and_then(|p| p.usage.get(plan))
            .and_then(|m| m.get(price))
            .copied()
            .unwrap_or_default()
    }

    /// Usage revenue of a tenant's period in one currency (sum of its usage charges).
    pub fn period_revenue(&self, tenant: &str, period_start: i64, currency: &str) -> Decimal {
        self.period(tenant, period_start)
            .and_then(|p| p.revenue.get(currency))
            .copied()
            .unwrap_or_default()
    }

    /// Sum of the true-up charges emitted for a tenant's period in one currency.
    pub fn true_up_total(&self, tenant: &str, period_start: i64, currency: &str) -> Decimal {
        self.period(tenant, period_start)
            .and_then(|p| p.true_ups.get(currency))
            .map(|t| t.amount)
            .unwrap_or_default()
    }

    /// The tenant's settled periods (cumulative quantities and usage revenue), the base that
    /// pending spend is priced on ([`pending::price_pending`]).
    pub fn settled_usage(&self, tenant: &str) -> pending::SettledUsage {
        self.tenants.get(tenant).map_or_else(Default::default, |t| {
            t.periods
                .iter()
                .map(|(&p, r)| (p, pending::PeriodUsage { usage: r.usage.clone(), revenue: r.revenue.clone() }))
                .collect()
        })
    }

    /// Tenants this state has rated usage for.
    pub fn tenants(&self) -> impl Iterator<Item = &String> {
        self.tenants.keys()
    }

    /// Whether the tenant's period has been closed (true-up computed).
    pub fn is_closed(&self, tenant: &str, period_start: i64) -> bool {
        self.period(tenant, period_start).is_some_and(|p| p.closed)
    }

    fn period(&self, tenant: &str, period_start: i64) -> Option<&PeriodState> {
        self.tenants
            .get(tenant)?
            .periods
            .get(&pricing::period_start(period_start))
    }

    /// Rates one aggregate. See the module docs for what each outcome means.
    pub fn rate(&mut self, catalog: &Catalog, agg: &MeterAggregate) -> Result<RateOutcome, Error> {
        if let Some(&hw) = self.high_water.get(&agg.source_partition) {
            if agg.seq <= hw {
                return Ok(RateOutcome::Skipped {
                    source_partition: agg.source_partition,
                    seq: agg.seq,
                    high_water: hw,
                });
            }
        }
        self.high_water.insert(agg.source_partition, agg.seq);
        Ok(match self.prepare(catalog, agg) {
            Prep::Reject(e) => RateOutcome::Rejected(e),
            Prep::Park(reason, error) => {
                self.parked.entry(agg.source_partition).or_default().insert(agg.seq);
                RateOutcome::Parked { reason, error }
            }
            Prep::Ready(p) => RateOutcome::Charged(self.commit(catalog, agg, *p)),
        })
    }

    /// Rates a parked aggregate (the payload of a rerate request) if it is still parked. See
    /// the module docs.
    pub fn rerate(&mut self, catalog: &Catalog, agg: &MeterAggregate) -> RerateOutcome {
        if !self.is_parked(agg.source_partition, agg.seq) {
            return RerateOutcome::NotParked;
        }
        let outcome = match self.prepare(catalog, agg) {
            Prep::Park(reason, error) => return RerateOutcome::StillParked { reason, error },
            Prep::Reject(e) => RerateOutcome::Rejected(e),
            Prep::Ready(p) => RerateOutcome::Charged(self.commit(catalog, agg, *p)),
        };
        if let Some(set) = self.parked.get_mut(&agg.source_partition) {
            set.remove(&agg.seq);
            if set.is_empty() {
                self.parked.remove(&agg.source_partition);
            }
        }
        outcome
    }

    /// Applies a prepared charge. Nothing here can fail.
    fn commit(&mut self, catalog: &Catalog, agg: &MeterAggregate, prepared: Prepared) -> Vec<Charge> {
        let Prepared { period, plan, currency, price, cum_after, revenue_after, charge } = prepared;
        let ts = self.tenants.entry(agg.tenant.clone()).or_insert_with(|| TenantState {
            next_close: period,
            periods: BTreeMap::new(),
        });
        ts.next_close = ts.next_close.min(period);
        let rec = ts.periods.entry(period).or_default();
        rec.usage.entry(plan).or_default().insert(price, cum_after);
        rec.revenue.insert(currency, revenue_after);
        let mut out = vec![charge];
        if rec.closed {
            out.extend(true_up(catalog, &agg.tenant, period, rec));
        }
        out.extend(close_due(catalog, &agg.tenant, ts, self.watermark_ms, self.config.grace_ms));
        self.stamp(&mut out);
        out
    }

    fn prepare(&self, catalog: &Catalog, agg: &MeterAggregate) -> Prep {
        match self.try_prepare(catalog, agg) {
            Ok(p) => p,
            Err(e) => Prep::Park(ParkReason::Overflow, e),
        }
    }

    fn try_prepare(&self, catalog: &Catalog, agg: &MeterAggregate) -> Result<Prep, Error> {
        let unrateable = |reason: String| Error::Unrateable {
            tenant: agg.tenant.clone(),
            meter: agg.meter.clone(),
            reason,
        };
        let reject = |reason: String| Ok(Prep::Reject(unrateable(reason)));
        let unpriced = |reason: String| Ok(Prep::Park(ParkReason::Unpriced, unrateable(reason)));
        if agg.window_end <= agg.window_start {
            return reject(format!("window end {} is not after its start {}", agg.window_end, agg.window_start));
        }
        if !(pricing::MIN_TIME_MS..pricing::MAX_TIME_MS).contains(&agg.window_start) {
            return reject(format!("window start {} ms is outside 1970..10000", agg.window_start));
        }
        if agg.revision < 0 {
            return reject(format!("negative revision {}", agg.revision));
        }
        let period = pricing::period_start(agg.window_start);
        if self.finalized_before.is_some_and(|f| period < f) {
            return reject(format!("billing period starting at {period} ms is finalized (past retention)"));
        }
        let Some(plan) = catalog.plan_for(&agg.tenant, agg.window_start) else {
            return unpriced(format!("no plan in force at {} ms and no default plan", agg.window_start));
        };
        let Some(price) = plan.price_for(&agg.meter, &agg.dimensions) else {
            return unpriced(format!("plan {:?} has no price for this meter with dimensions {:?}", plan.id, agg.dimensions));
        };
        let overflow = |what: &str| Error::Arithmetic(format!("{what} of tenant {:?} meter {:?} seq {}", agg.tenant, agg.meter, agg.seq));
        let delta = agg.value.checked_sub(agg.previous_value).ok_or_else(|| overflow("quantity delta"))?;
        let rec = self.tenants.get(&agg.tenant).and_then(|t| t.periods.get(&period));
        let before = rec
            .and_then(|r| r.usage.get(&plan.id))
            .and_then(|m| m.get(&price.name))
            .copied()
            .unwrap_or_default();
        let cum_after = before.checked_add(delta).ok_or_else(|| overflow("cumulative quantity"))?;
        let amount = price.charge(before, cum_after)?;
        let revenue_after = rec
            .and_then(|r| r.revenue.get(&plan.currency))
            .copied()
            .unwrap_or_default()
            .checked_add(amount)
            .filter(|r| r.abs() <= Decimal::from_i128_with_scale(MAX_REVENUE, 0))
            .ok_or_else(|| overflow("period revenue"))?;
        let unit_cost = catalog.unit_cost(&agg.meter, &agg.dimensions);
        let cost_now = revision_cost(unit_cost, agg.value, agg.provider_cost, agg.uncosted_value)
            .ok_or_else(|| overflow("provider cost"))?;
        let cost_prev = revision_cost(unit_cost, agg.previous_value, agg.previous_provider_cost, agg.previous_uncosted_value)
            .ok_or_else(|| overflow("provider cost"))?;
        let cost = cost_now.checked_sub(cost_prev).ok_or_else(|| overflow("provider cost"))?;
        let margin = amount.checked_sub(cost).ok_or_else(|| overflow("margin"))?;
        let charge = Charge {
            charge_id: usage_charge_id(agg),
            kind: KIND_USAGE.to_owned(),
            tenant: agg.tenant.clone(),
            plan: plan.id.clone(),
            currency: plan.currency.clone(),
            meter: agg.meter.clone(),
            dimensions: agg.dimensions.clone(),
            period_start: period,
            window_start: agg.window_start,
            window_end: agg.window_end,
            revision: agg.revision,
            quantity: delta,
            amount,
            provider_cost: cost,
            margin,
            seq: 0,
        };
        Ok(Prep::Ready(Box::new(Prepared {
            period,
            plan: plan.id.clone(),
            currency: plan.currency.clone(),
            price: price.name.clone(),
            cum_after,
            revenue_after,
            charge,
        })))
    }

    /// Moves the watermark (never backwards; clamped to 1970..10000) and closes every period
    /// whose end plus grace it passed, returning their true-ups. Also drops records past
    /// retention.
    pub fn advance(&mut self, catalog: &Catalog, watermark_ms: i64) -> Vec<Charge> {
        let wm = watermark_ms.clamp(pricing::MIN_TIME_MS, pricing::MAX_TIME_MS);
        let wm = self.watermark_ms.map_or(wm, |w| w.max(wm));
        self.watermark_ms = Some(wm);
        let mut out = Vec::new();
        for (tenant, ts) in &mut self.tenants {
            out.extend(close_due(catalog, tenant, ts, Some(wm), self.config.grace_ms));
        }
        // Finalize periods that ended more than grace + retention ago.
        let horizon = wm
            .saturating_sub(self.config.grace_ms.max(0))
            .saturating_sub(self.config.retention_ms.max(0))
            .max(pricing::MIN_TIME_MS);
        let cutoff = pricing::period_start(horizon);
        if self.finalized_before.is_none_or(|f| cutoff > f) {
            self.finalized_before = Some(cutoff);
            for ts in self.tenants.values_mut() {
                ts.periods.retain(|&p, _| p >= cutoff);
                ts.next_close = ts.next_close.max(cutoff);
            }
        }
        self.stamp(&mut out);
        out
    }

    /// Closes one tenant's period now, whatever the watermark (for example for a committed
    /// tenant this state has never seen usage for). Idempotent: a closed period yields
    /// nothing. A finalized period yields nothing either.
    pub fn on_period_close(&mut self, catalog: &Catalog, tenant: &str, period_start: i64) -> Vec<Charge> {
        if !(pricing::MIN_TIME_MS..pricing::MAX_TIME_MS).contains(&period_start) {
            return Vec::new();
        }
        let period = pricing::period_start(period_start);
        if self.finalized_before.is_some_and(|f| period < f) {
            return Vec::new();
        }
        let ts = self.tenants.entry(tenant.to_owned()).or_insert_with(|| TenantState {
            next_close: period,
            periods: BTreeMap::new(),
        });
        let rec = ts.periods.entry(period).or_default();
        let mut out = Vec::new();
        if !rec.closed {
            rec.closed = true;
            out = true_up(catalog, tenant, period, rec);
        }
        self.stamp(&mut out);
        out
    }

    fn stamp(&mut self, charges: &mut [Charge]) {
        for c in charges {
            self.charges_emitted += 1;
            c.seq = self.charges_emitted;
        }
    }
}

/// Provider cost of one revision (see the module docs). `None` on overflow.
pub fn revision_cost(unit_cost: Option<Decimal>, value: Decimal, carried: Decimal, uncosted: Option<Decimal>) -> Option<Decimal> {
    if let Some(u) = uncosted {
        let card = match unit_cost {
            Some(rate) => u.checked_mul(rate).map(decimal::round_amount)?,
            None => Decimal::ZERO,
        };
        return carried.checked_add(card);
    }
    if !carried.is_zero() {
        return Some(carried);
    }
    match unit_cost {
        Some(u) => value.checked_mul(u).map(decimal::round_amount),
        None => Some(Decimal::ZERO),
    }
}
