//! The pricing catalog: plans, price models, tenant assignments and provider costs.
//!
//! Everything here is a pure function of the catalog text, so the rater can reload it and
//! the property tests can generate it.
//!
//! # Format (`config/catalog.toml`)
//!
//! ```toml
//! default_plan = "starter"            # optional: plan of tenants with no assignment in force
//!
//! [[plan]]
//! id = "growth"
//! currency = "USD"                    # ISO 4217 code, 3 upper-case letters
//! billing_period = "month"            # optional; calendar month in UTC is the only period
//! minimum_commitment = "500"          # optional; per period, trued up at period close
//!
//! [[plan.price]]
//! meter = "input_tokens"
//! name = "input_tokens.gpt-4o"        # optional, defaults to the meter; unique in the plan
//! match = { model = "gpt-4o" }        # optional; dimension values the aggregate must carry
//! model = "graduated"                 # per_unit | graduated | volume | package
//! free_units = "1000000"              # optional free allowance per period (and plan segment)
//! tiers = [
//!   { up_to = "10000000", unit_price = "0.0000025" },
//!   { unit_price = "0.000002", flat_fee = "0" },   # last tier: no up_to (or "inf")
//! ]
//! # per_unit: unit_price = "..."      package: package_size = "1000", package_price = "0.5"
//!
//! [[assignment]]
//! tenant = "tenant-001"
//! plan = "growth"
//! from = "2026-11-15T00:00:00Z"       # RFC 3339; in force until the tenant's next assignment
//!
//! [[cost]]
//! meter = "input_tokens"
//! dimension = "model"                 # optional (with value); without it: the meter's default
//! value = "gpt-4o"
//! per_million = "2.50"                # or per_unit = "0.0000025"
//! ```
//!
//! Decimals are written as strings (or integers): TOML floats are binary and would change a
//! price before it is read. Prices carry up to 12 fractional digits (what Stripe allows);
//! quantities (`up_to`, `free_units`, `package_size`) and the minimum commitment carry up to
//! 9, the pipeline's scale. Validation rejects anything else with an
//! [`Error::InvalidCatalog`] naming the plan, the price and the field (and the line of a value
//! that cannot be read), because the person reading it is editing that file; unknown keys are rejected at every level.
//!
//! # Rounding (the only rounding point)
//!
//! A price is a function of the *cumulative* quantity of one price in one billing period:
//! `exact_price(q)` is computed exactly with `rust_decimal` and then rounded half-to-even to 9
//! fractional digits by [`decimal::round_amount`], giving [`Price::price`]. A charge is always
//! the difference `price(cum_after) - price(cum_before)` of two rounded values, so it has at
//! most 9 digits, needs no further rounding, and any sequence of charges telescopes to
//! `price(total)` exactly, whatever the split, order or restatements. Rounding each charge on
//! its own instead would leak up to half a nano-unit per charge, and the leaks would depend on
//! how usage happened to be windowed.
//!
//! Limits: `exact_price` is exact while each product fits `rust_decimal`'s 96-bit mantissa
//! (~28 significant digits). With a 12-digit price and a 9-digit quantity that holds for
//! amounts below ~10^7 (integer token counts at 7-digit token prices: below ~10^21); beyond
//! it rust_decimal drops digits at least ~10 places below the rounding unit, which can only
//! change an exact half-way tie at the 9th digit and never breaks telescoping (the function
//! stays deterministic). A rounded price above [`MAX_AMOUNT`] (1e18) is refused with
//! [`Error::Arithmetic`], because 9 fractional digits of it would no longer fit; arithmetic
//! never wraps or panics.
//!
//! A cumulative quantity at or below the free allowance (including a negative one, which
//! credits can produce) prices as zero.
//!
//! The only other rounding is of a *prorated* minimum commitment
//! ([`Catalog::commitments`]): a plan's minimum times the share of the month it was in force,
//! divided once and rounded half-to-even to 9 digits.
//!
//! A price's `name` is its identity: the rater keeps cumulative quantities per (plan id,
//! price name), so renaming a price (or a plan) in a reloaded catalog restarts its tiers for
//! the rest of the period. Publish a changed price as a new plan and assign tenants to it.
//!
//! # Plans over time
//!
//! A tenant's assignments form a timeline: an assignment is in force from its `from` until
//! the tenant's next assignment. Before the first one (and for tenants without any) the
//! `default_plan` applies, if there is one. See [`crate::rating`] for how windows, segments
//! and minimum commitments use it.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use crate::decimal;
use crate::meter::MeterCatalog;
use crate::Error;

mod calendar;
mod fields;
pub mod limits;
mod load;
pub use calendar::{
    civil_from_days, days_from_civil, days_in_month, parse_rfc3339_ms, period_end, period_start, MAX_TIME_MS, MIN_TIME_MS,
};
pub use limits::{LimitKind, LimitStatus, SpendLimit};
use load::{invalid, parse_file};

/// Fractional digits a price (unit price, flat fee, package price, cost rate) may carry.
pub const PRICE_SCALE: u32 = 12;

/// Largest catalog value accepted. Bounds every product the rater forms from catalog values
/// so true-up arithmetic cannot overflow.
const MAX_CATALOG_VALUE: i64 = 1_000_000_000_000_000; // 1e15

/// Largest price (rounded amount) of one price's cumulative quantity. 1e18 with 9 fractional
/// digits is 27 significant digits, inside `Decimal`'s 28, so every rounded price, charge
/// (difference of two) and running sum of one price's charges is exact.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000_000;

// ---------------------------------------------------------------------------------------------
// Price models
// ---------------------------------------------------------------------------------------------

/// One tier of a graduated or volume price. `up_to` is inclusive (as in Stripe); `None` is
/// the unbounded last tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub up_to: Option<Decimal>,
    pub unit_price: Decimal,
    /// Graduated: charged once as soon as any unit falls in the tier. Volume: added to the
    /// price when the total falls in the tier.
    pub flat_fee: Decimal,
}

/// How a billable quantity (after the free allowance) becomes an exact amount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriceModel {
    /// `q * unit_price`.
    PerUnit { unit_price: Decimal },
    /// Each unit priced by the tier it falls in: the first `up_to_1` units at tier 1, the
    /// next ones at tier 2, ...
    Graduated { tiers: Vec<Tier> },
    /// Every unit priced at the tier the whole quantity falls in.
    Volume { tiers: Vec<Tier> },
    /// `ceil(q / package_size) * package_price`: a started package is a whole package.
    Package { package_size: Decimal, package_price: Decimal },
}

impl PriceModel {
    pub fn kind(&self) -> &'static str {
        match self {
            PriceModel::PerUnit { .. } => "per_unit",
            PriceModel::Graduated { .. } => "graduated",
            PriceModel::Volume { .. } => "volume",
            PriceModel::Package { .. } => "package",
        }
    }

    /// Exact amount for a billable quantity `q > 0`; `None` on overflow.
    fn exact(&self, q: Decimal) -> Option<Decimal> {
        match self {
            PriceModel::PerUnit { unit_price } => q.checked_mul(*unit_price),
            PriceModel::Graduated { tiers } => {
                let mut total = Decimal::ZERO;
                let mut lower = Decimal::ZERO;
                for t in tiers {
                    if q <= lower {
                        break;
                    }
                    let upper = match t.up_to {
                        Some(u) if u < q => u,
                        _ => q,
                    };
                    let units = upper.checked_sub(lower)?;
                    total = total.checked_add(units.checked_mul(t.unit_price)?)?.checked_add(t.flat_fee)?;
                    match t.up_to {
                        Some(u) => lower = u,
                        None => break,
                    }
                }
                Some(total)
            }
            PriceModel::Volume { tiers } => {
                let tier = tiers
                    .iter()
                    .find(|t| t.up_to.is_none_or(|u| q <= u))
                    .or(tiers.last())?;
                q.checked_mul(tier.unit_price)?.checked_add(tier.flat_fee)
            }
            PriceModel::Package { package_size, package_price } => {
                let rem = q.checked_rem(*package_size)?;
                let mut packages = q.checked_sub(rem)?.checked_div(*package_size)?;
                if !rem.is_zero() {
                    packages = packages.checked_add(Decimal::ONE)?;
                }
                packages.checked_mul(*package_price)
            }
        }
    }
}

/// One price of a plan: a meter (optionally narrowed by dimension values), a free allowance
/// and a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    /// Unique within the plan; cumulative quantities are kept per price.
    pub name: String,
    pub meter: String,
    /// Dimension values an aggregate must carry for this price to apply.
    pub matches: BTreeMap<String, String>,
    /// Units free per period (and plan segment) before the model applies.
    pub free_units: Decimal,
    pub model: PriceModel,
}

impl Price {
    /// The exact price of a cumulative quantity, before the one rounding.
    pub fn exact_price(&self, cumulative: Decimal) -> Result<Decimal, Error> {
        let billable = cumulative
            .checked_sub(self.free_units)
            .ok_or_else(|| self.overflow(cumulative))?;
        if billable <= Decimal::ZERO {
            return Ok(Decimal::ZERO);
        }
        self.model.exact(billable).ok_or_else(|| self.overflow(cumulative))
    }

    /// The price of a cumulative quantity, rounded half-to-even to 9 digits: the value charges
    /// are differences of.
    ///
    /// Prices beyond [`MAX_AMOUNT`] are an [`Error::Arithmetic`]: a `Decimal` cannot hold such
    /// a value with 9 fractional digits, so charges would stop telescoping exactly.
    pub fn price(&self, cumulative: Decimal) -> Result<Decimal, Error> {
        let p = decimal::round_amount(self.exact_price(cumulative)?);
        if p > Decimal::from(MAX_AMOUNT) {
            return Err(Error::Arithmetic(format!(
                "price {:?} of cumulative quantity {cumulative} is {p}, beyond {MAX_AMOUNT}",
                self.name
            )));
        }
        Ok(p)
    }

    /// The charge for moving the cumulative quantity from `before` to `after`: a difference of
    /// rounded prices, so consecutive charges telescope exactly.
    pub fn charge(&self, before: Decimal, after: Decimal) -> Result<Decimal, Error> {
        let (b, a) = (self.price(before)?, self.price(after)?);
        a.checked_sub(b).ok_or_else(|| self.overflow(after))
    }

    fn applies_to(&self, meter: &str, dims: &BTreeMap<String, String>) -> bool {
        self.meter == meter && self.matches.iter().all(|(k, v)| dims.get(k) == Some(v))
    }

    fn overflow(&self, q: Decimal) -> Error {
        Error::Arithmetic(format!("price {:?} of cumulative quantity {q} does not fit a decimal", self.name))
    }
}

/// A plan: a currency, an optional minimum commitment per period and its prices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: String,
    pub currency: String,
    /// Owed per calendar month at least; see [`crate::rating`] for the true-up.
    pub minimum_commitment: Decimal,
    pub prices: Vec<Price>,
}

impl Plan {
    /// The price for an aggregate of `meter` with dimensions `dims`: the matching price with
    /// the most `match` entries (validation guarantees that is unique).
    pub fn price_for(&self, meter: &str, dims: &BTreeMap<String, String>) -> Option<&Price> {
        self.prices
            .iter()
            .filter(|p| p.applies_to(meter, dims))
            .max_by_key(|p| p.matches.len())
    }

    pub fn price(&self, name: &str) -> Option<&Price> {
        self.prices.iter().find(|p| p.name == name)
    }
}

/// A tenant's plan from `from_ms` until its next assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub tenant: String,
    pub plan: String,
    pub from_ms: i64,
}

/// A provider cost rate for a meter, optionally for one value of one dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostRule {
    pub meter: String,
    pub dimension: Option<(String, String)>,
    /// Cost per unit of the meter (a `per_million` rate is divided by 10^6, exactly).
    pub per_unit: Decimal,
}

/// The minimum a tenant owes for one period in one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commitment {
    /// Rounded to 9 digits: the sum of each plan's minimum prorated by the milliseconds of the
    /// period it was in force.
    pub amount: Decimal,
    /// The committing plan in force last in the period; the true-up charge carries it.
    pub plan: String,
}

/// The validated catalog.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Catalog {
    plans: BTreeMap<String, Plan>,
    /// Per tenant, sorted by `from_ms`.
    assignments: BTreeMap<String, Vec<Assignment>>,
    default_plan: Option<String>,
    /// Per meter.
    costs: BTreeMap<String, Vec<CostRule>>,
    /// Per tenant, in file order.
    limits: BTreeMap<String, Vec<SpendLimit>>,
}

impl Catalog {
    /// Parses and validates a catalog; see the module docs for the format.
    pub fn from_toml_str(text: &str) -> Result<Self, Error> {
        let file = parse_file(text)?;
        let mut plans = BTreeMap::new();
        for entry in file.plan {
            let plan = entry.into_plan()?;
            if plans.contains_key(&plan.id) {
                return Err(invalid(&plan.id, "", "id", "plan defined twice"));
            }
            plans.insert(plan.id.clone(), plan);
        }
        let default_plan = file.default_plan.map(|t| t.0);
        if let Some(id) = default_plan.as_ref().filter(|id| !plans.contains_key(*id)) {
            return Err(invalid(id, "", "default_plan", "no such plan"));
        }
        let mut assignments: BTreeMap<String, Vec<Assignment>> = BTreeMap::new();
        for (i, entry) in file.assignment.into_iter().enumerate() {
            let a = entry.into_assignment(i, &plans)?;
            let list = assignments.entry(a.tenant.clone()).or_default();
            if list.iter().any(|b| b.from_ms == a.from_ms) {
                return Err(invalid(
                    &a.plan,
                    "",
                    &format!("assignment[{i}].from"),
                    format!("tenant {:?} already has an assignment from the same instant", a.tenant),
                ));
            }
            list.push(a);
        }
        for list in assignments.values_mut() {
            list.sort_by_key(|a| a.from_ms);
        }
        let mut costs: BTreeMap<String, Vec<CostRule>> = BTreeMap::new();
        for (i, entry) in file.cost.into_iter().enumerate() {
            let c = entry.into_rule(i)?;
            let rules = costs.entry(c.meter.clone()).or_default();
            let field = format!("cost[{i}].dimension");
            if let Some(other) = rules.iter().find(|r| r.dimension == c.dimension) {
                return Err(invalid("", "", &field, format!("meter {:?}: same dimension value as another cost ({:?})", c.meter, other.dimension)));
            }
            // One dimension per meter keeps the lookup unambiguous: an aggregate carrying
            // model=a and gpu=b could otherwise match two rules.
            if let (Some((d, _)), Some((e, _))) = (
                &c.dimension,
                rules.iter().find_map(|r| r.dimension.as_ref()),
            ) {
                if d != e {
                    return Err(invalid("", "", &field, format!("meter {:?}: costs of one meter must all use the same dimension ({e:?}), got {d:?}", c.meter)));
                }
            }
            rules.push(c);
        }
        let mut limits: BTreeMap<String, Vec<SpendLimit>> = BTreeMap::new();
        for entry in file.spend_limit {
            let l = SpendLimit::from(entry);
            limits.entry(l.tenant.clone()).or_default().push(l);
        }
        Ok(Self { plans, assignments, default_plan, costs, limits })
    }

    /// Checks the catalog against the meter definitions: every priced or costed meter exists
    /// and every `match`/cost dimension is one the meter groups by (aggregates carry no other
    /// dimensions, so such a price could never apply).
    pub fn validate_meters(&self, meters: &MeterCatalog) -> Result<(), Error> {
        for plan in self.plans.values() {
            for p in &plan.prices {
                let Some(m) = meters.get(&p.meter) else {
                    return Err(invalid(&plan.id, &p.name, "meter", format!("no meter named {:?}", p.meter)));
                };
                if let Some(k) = p.matches.keys().find(|k| !m.group_by.contains(k)) {
                    return Err(invalid(&plan.id, &p.name, &format!("match.{k}"), format!("meter {:?} does not group by {k:?}", p.meter)));
                }
            }
        }
        for (meter, rules) in &self.costs {
            let Some(m) = meters.get(meter) else {
                return Err(invalid("", "", "cost.meter", format!("no meter named {meter:?}")));
            };
            for r in rules {
                if let Some((d, _)) = &r.dimension {
                    if !m.group_by.contains(d) {
                        return Err(invalid("", "", "cost.dimension", format!("meter {meter:?} does not group by {d:?}")));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plans.get(id)
    }

    pub fn plans(&self) -> impl Iterator<Item = &Plan> {
        self.plans.values()
    }

    pub fn default_plan(&self) -> Option<&Plan> {
        self.default_plan.as_deref().and_then(|id| self.plans.get(id))
    }

    /// The tenant's spend limits (see [`limits`]).
    pub fn spend_limits(&self, tenant: &str) -> &[SpendLimit] {
        self.limits.get(tenant).map_or(&[], Vec::as_slice)
    }

    /// The tenant's assignments, sorted by effective date.
    pub fn assignments(&self, tenant: &str) -> &[Assignment] {
        self.assignments.get(tenant).map_or(&[], Vec::as_slice)
    }

    /// The plan in force for `tenant` at `at_ms`: its latest assignment with `from <= at`,
    /// else the default plan, else `None`.
    pub fn plan_for(&self, tenant: &str, at_ms: i64) -> Option<&Plan> {
        let list = self.assignments(tenant);
        let n = list.partition_point(|a| a.from_ms <= at_ms);
        match n {
            0 => self.default_plan(),
            n => self.plans.get(&list[n - 1].plan),
        }
    }

    /// Provider cost per unit of `meter` for an aggregate with `dims`: the rule for the
    /// dimension value it carries, else the meter's rule without a dimension, else `None`.
    pub fn unit_cost(&self, meter: &str, dims: &BTreeMap<String, String>) -> Option<Decimal> {
        let rules = self.costs.get(meter)?;
        rules
            .iter()
            .find(|r| matches!(&r.dimension, Some((d, v)) if dims.get(d) == Some(v)))
            .or_else(|| rules.iter().find(|r| r.dimension.is_none()))
            .map(|r| r.per_unit)
    }

    /// What `tenant` is committed to for the period holding `period` (ms), per currency.
    ///
    /// Why prorated: a tenant moving onto (or off) a committed plan mid-month owes that plan's
    /// minimum for the share of the month it was in force, like a prorated fixed fee, rather
    /// than all of it or none of it. The division happens once, in integer arithmetic on
    /// 9-digit mantissas, rounded half-to-even, so the result is exact and deterministic.
    pub fn commitments(&self, tenant: &str, period: i64) -> BTreeMap<String, Commitment> {
        let start = period_start(period);
        let end = period_end(start);
        let mut cuts: Vec<i64> = vec![start];
        cuts.extend(self.assignments(tenant).iter().map(|a| a.from_ms).filter(|&t| t > start && t < end));
        cuts.push(end);
        let mut acc: BTreeMap<String, (i128, String)> = BTreeMap::new();
        for seg in cuts.windows(2) {
            let Some(plan) = self.plan_for(tenant, seg[0]) else { continue };
            if plan.minimum_commitment.is_zero() {
                continue;
            }
            let e = acc.entry(plan.currency.clone()).or_insert((0, String::new()));
            #[allow(clippy::expect_used, reason = "catalog amounts have at most 9 fractional digits (validated on load)")]
            let fixed = decimal::to_ch_i128(&plan.minimum_commitment)
                .expect("catalog amounts have at most 9 fractional digits (validated on load)");
            e.0 += fixed * i128::from(seg[1] - seg[0]);
            e.1 = plan.id.clone();
        }
        let len = i128::from(end - start);
        acc.into_iter()
            .map(|(cur, (num, plan))| {
                let amount = decimal::from_ch_i128(div_round_half_even(num, len));
                (cur, Commitment { amount, plan })
            })
            .collect()
    }
}

/// `n / d` rounded half-to-even, for `n >= 0`, `d > 0`.
fn div_round_half_even(n: i128, d: i128) -> i128 {
    let (q, r) = (n / d, n % d);
    match (2 * r).cmp(&d) {
        std::cmp::Ordering::Less => q,
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal => q + (q & 1),
    }
}

/// Margin as a percentage of the amount (`margin / amount * 100`, 2 digits, half-even), for
/// display; `None` when the amount is zero.
pub fn margin_percent(amount: Decimal, margin: Decimal) -> Option<Decimal> {
    if amount.is_zero() {
        return None;
    }
    margin
        .checked_mul(Decimal::ONE_HUNDRED)?
        .checked_div(amount)
        .map(|p| p.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven))
}

#[cfg(test)]
mod tests;
