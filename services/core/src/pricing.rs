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
//! [`Error::InvalidCatalog`] naming the plan, the price and the field, because the person
//! reading it is editing that file; unknown keys are rejected at every level.
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
use serde::Deserialize;

use crate::decimal::{self, MAX_SCALE};
use crate::meter::MeterCatalog;
use crate::Error;

pub mod limits;
pub use limits::{LimitKind, LimitStatus, SpendLimit};

/// Fractional digits a price (unit price, flat fee, package price, cost rate) may carry.
pub const PRICE_SCALE: u32 = 12;

/// Largest catalog value accepted. Bounds every product the rater forms from catalog values
/// so true-up arithmetic cannot overflow.
const MAX_CATALOG_VALUE: i64 = 1_000_000_000_000_000; // 1e15

/// Largest price (rounded amount) of one price's cumulative quantity. 1e18 with 9 fractional
/// digits is 27 significant digits, inside `Decimal`'s 28, so every rounded price, charge
/// (difference of two) and running sum of one price's charges is exact.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000_000;

const DAY_MS: i64 = 86_400_000;

// ---------------------------------------------------------------------------------------------
// Calendar (UTC, proleptic Gregorian). Billing periods are calendar months.
// ---------------------------------------------------------------------------------------------

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil date of a day number since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// First instant the calendar functions are meant for (the Unix epoch).
pub const MIN_TIME_MS: i64 = 0;
/// First instant past the supported range (year 10000). Times outside
/// `MIN_TIME_MS..MAX_TIME_MS` are rejected or clamped by the rater, so calendar arithmetic
/// cannot overflow and a bogus watermark cannot make it walk millions of months.
pub const MAX_TIME_MS: i64 = 253_402_300_800_000;

/// Start (Unix ms, UTC) of the calendar-month billing period holding `ms`.
pub fn period_start(ms: i64) -> i64 {
    let (y, m, _) = civil_from_days(ms.div_euclid(DAY_MS));
    days_from_civil(y, m, 1) * DAY_MS
}

/// End (exclusive) of the billing period holding `ms`: the start of the next month.
pub fn period_end(ms: i64) -> i64 {
    let (y, m, _) = civil_from_days(ms.div_euclid(DAY_MS));
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(y, m, 1) * DAY_MS
}

/// Parses an RFC 3339 timestamp (`2026-01-15T00:00:00Z`, optional fraction, `Z` or `±HH:MM`)
/// into Unix milliseconds. Fractions beyond milliseconds must be zero: an effective date that
/// cannot be represented is an error rather than silently moved.
pub fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    let bad = || format!("{s:?} is not an RFC 3339 timestamp like \"2026-01-15T00:00:00Z\"");
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let part = &b[r];
        if part.iter().all(u8::is_ascii_digit) {
            Ok(part.iter().fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')))
        } else {
            Err(bad())
        }
    };
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || d < 1 || d > i64::from(days_in_month(y, mo as u32)) || h > 23 || mi > 59 || sec > 59 {
        return Err(format!("{s:?}: date or time out of range"));
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = &b[start..i];
        if frac.is_empty() {
            return Err(bad());
        }
        for (k, digit) in frac.iter().enumerate() {
            let v = i64::from(digit - b'0');
            if k < 3 {
                millis += v * 10i64.pow(2 - k as u32);
            } else if v != 0 {
                return Err(format!("{s:?}: sub-millisecond precision is not supported"));
            }
        }
    }
    let offset_ms = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), rest @ ..] if rest.len() == 5 && rest[2] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return Err(format!("{s:?}: offset out of range"));
            }
            let off = (oh * 60 + om) * 60_000;
            if *sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    Ok(days * DAY_MS + ((h * 60 + mi) * 60 + sec) * 1000 + millis - offset_ms)
}

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
        let raw: RawFile = toml::from_str(text).map_err(|e| serde_error("", "", "catalog", &e))?;
        let mut plans = BTreeMap::new();
        for (i, v) in raw.plan.into_iter().enumerate() {
            let plan = parse_plan(i, v)?;
            if plans.contains_key(&plan.id) {
                return Err(invalid(&plan.id, "", "id", "plan defined twice"));
            }
            plans.insert(plan.id.clone(), plan);
        }
        let default_plan = match raw.default_plan {
            None => None,
            Some(v) => {
                let id = as_string(&v).ok_or_else(|| invalid("", "", "default_plan", "must be a string"))?;
                if !plans.contains_key(&id) {
                    return Err(invalid(&id, "", "default_plan", "no such plan"));
                }
                Some(id)
            }
        };
        let mut assignments: BTreeMap<String, Vec<Assignment>> = BTreeMap::new();
        for (i, v) in raw.assignment.into_iter().enumerate() {
            let a = parse_assignment(i, v, &plans)?;
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
        for (i, v) in raw.cost.into_iter().enumerate() {
            let c = parse_cost(i, v)?;
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
        for (i, v) in raw.spend_limit.into_iter().enumerate() {
            let l = limits::parse_spend_limit(i, v)?;
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

// ---------------------------------------------------------------------------------------------
// Loading. Structure is checked by serde (deny_unknown_fields at every level); leaves are
// `toml::Value` and checked here, so that every error can name its plan, price and field.
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    default_plan: Option<toml::Value>,
    #[serde(default)]
    plan: Vec<toml::Value>,
    #[serde(default)]
    assignment: Vec<toml::Value>,
    #[serde(default)]
    cost: Vec<toml::Value>,
    #[serde(default)]
    spend_limit: Vec<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    id: Option<toml::Value>,
    currency: Option<toml::Value>,
    billing_period: Option<toml::Value>,
    minimum_commitment: Option<toml::Value>,
    description: Option<toml::Value>,
    #[serde(default)]
    price: Vec<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    meter: Option<toml::Value>,
    name: Option<toml::Value>,
    #[serde(rename = "match")]
    matches: Option<toml::Value>,
    model: Option<toml::Value>,
    free_units: Option<toml::Value>,
    unit_price: Option<toml::Value>,
    tiers: Option<toml::Value>,
    package_size: Option<toml::Value>,
    package_price: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    up_to: Option<toml::Value>,
    unit_price: Option<toml::Value>,
    flat_fee: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAssignment {
    tenant: Option<toml::Value>,
    plan: Option<toml::Value>,
    from: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCost {
    meter: Option<toml::Value>,
    dimension: Option<toml::Value>,
    value: Option<toml::Value>,
    per_unit: Option<toml::Value>,
    per_million: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpendLimit {
    tenant: Option<toml::Value>,
    currency: Option<toml::Value>,
    amount: Option<toml::Value>,
    kind: Option<toml::Value>,
    period: Option<toml::Value>,
}

fn invalid(plan: &str, price: &str, field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidCatalog {
        plan: plan.to_owned(),
        price: price.to_owned(),
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Turns a serde structure error (unknown key, wrong shape) into an `InvalidCatalog` naming
/// the offending key when serde's message does (`unknown field `x``).
fn serde_error(plan: &str, price: &str, fallback_field: &str, e: &dyn std::fmt::Display) -> Error {
    let msg = e.to_string();
    let field = msg
        .split_once("unknown field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map_or_else(|| fallback_field.to_owned(), |(f, _)| f.to_owned());
    // toml's messages are multi-line: "TOML parse error at line L, column C", a source
    // excerpt, then the cause. Keep the cause and the location.
    let mut lines = msg.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    let reason = match lines.next_back() {
        Some(last) if first.starts_with("TOML parse error") => format!("{last} ({first})"),
        _ => first.to_owned(),
    };
    invalid(plan, price, &field, reason)
}

fn as_string(v: &toml::Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

/// Reads leaf values of one table for one (plan, price), naming them in errors.
struct Ctx<'a> {
    plan: &'a str,
    price: &'a str,
    prefix: String,
}

impl Ctx<'_> {
    fn err(&self, field: &str, reason: impl Into<String>) -> Error {
        invalid(self.plan, self.price, &format!("{}{field}", self.prefix), reason)
    }

    fn string(&self, field: &str, v: Option<toml::Value>) -> Result<Option<String>, Error> {
        match v {
            None => Ok(None),
            Some(toml::Value::String(s)) if s.is_empty() => Err(self.err(field, "must not be empty")),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.err(field, format!("expected a string, got {}", other.type_str()))),
        }
    }

    fn required_string(&self, field: &str, v: Option<toml::Value>) -> Result<String, Error> {
        self.string(field, v)?.ok_or_else(|| self.err(field, "missing"))
    }

    /// A non-negative decimal written as a string or an integer, with at most `max_scale`
    /// fractional digits and at most 1e15.
    fn decimal(&self, field: &str, v: Option<toml::Value>, max_scale: u32) -> Result<Option<Decimal>, Error> {
        let d = match v {
            None => return Ok(None),
            Some(toml::Value::Integer(i)) => Decimal::from(i),
            Some(toml::Value::String(s)) => parse_decimal(&s, max_scale).map_err(|r| self.err(field, r))?,
            Some(toml::Value::Float(f)) => {
                return Err(self.err(field, format!("write decimals as strings (\"{f}\"): TOML floats are binary and inexact")))
            }
            Some(other) => return Err(self.err(field, format!("expected a decimal string, got {}", other.type_str()))),
        };
        if d.is_sign_negative() && !d.is_zero() {
            return Err(self.err(field, "must not be negative"));
        }
        if d > Decimal::from(MAX_CATALOG_VALUE) {
            return Err(self.err(field, "must be at most 1e15"));
        }
        Ok(Some(d.normalize()))
    }

    fn required_decimal(&self, field: &str, v: Option<toml::Value>, max_scale: u32) -> Result<Decimal, Error> {
        self.decimal(field, v, max_scale)?.ok_or_else(|| self.err(field, "missing"))
    }
}

/// Canonical decimal text (`-?[0-9]+(\.[0-9]+)?`) with at most `max_scale` fractional digits.
fn parse_decimal(s: &str, max_scale: u32) -> Result<Decimal, String> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (digits, None),
    };
    let ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !ok(int) || !frac.is_none_or(ok) {
        return Err(format!("{s:?} is not a decimal like \"0.0025\""));
    }
    if frac.is_some_and(|f| f.len() > max_scale as usize) {
        return Err(format!("{s:?} has more than {max_scale} fractional digits"));
    }
    Decimal::from_str_exact(s).map_err(|_| format!("{s:?} is out of range"))
}

fn parse_plan(index: usize, v: toml::Value) -> Result<Plan, Error> {
    let fallback = format!("plan[{index}]");
    let id_guess = v.get("id").and_then(toml::Value::as_str).map_or(fallback, str::to_owned);
    let raw: RawPlan = v.try_into().map_err(|e| serde_error(&id_guess, "", "plan", &e))?;
    let ctx = Ctx { plan: &id_guess, price: "", prefix: String::new() };
    let id = ctx.required_string("id", raw.id)?;
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
        return Err(ctx.err("id", "must be [A-Za-z0-9_.-]"));
    }
    let currency = ctx.required_string("currency", raw.currency)?;
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ctx.err("currency", format!("{currency:?} is not an ISO 4217 code like \"USD\"")));
    }
    if let Some(p) = ctx.string("billing_period", raw.billing_period)? {
        if p != "month" {
            return Err(ctx.err("billing_period", format!("{p:?}: only \"month\" (calendar month, UTC) is supported")));
        }
    }
    ctx.string("description", raw.description)?;
    let minimum_commitment = ctx.decimal("minimum_commitment", raw.minimum_commitment, MAX_SCALE)?.unwrap_or_default();
    let mut prices: Vec<Price> = Vec::with_capacity(raw.price.len());
    for (i, pv) in raw.price.into_iter().enumerate() {
        let p = parse_price(&id, i, pv)?;
        if prices.iter().any(|q| q.name == p.name) {
            return Err(invalid(&id, &p.name, "name", "two prices with the same name (set `name` to tell prices of one meter apart)"));
        }
        // Two prices of one meter with equally specific, compatible matches could both apply
        // to one aggregate; the catalog must say which wins.
        if let Some(q) = prices.iter().find(|q| {
            q.meter == p.meter
                && q.matches.len() == p.matches.len()
                && q.matches.iter().all(|(k, v)| p.matches.get(k).is_none_or(|w| w == v))
        }) {
            return Err(invalid(&id, &p.name, "match", format!("ambiguous with price {:?}: an aggregate could match both", q.name)));
        }
        prices.push(p);
    }
    Ok(Plan { id, currency, minimum_commitment, prices })
}

fn parse_price(plan: &str, index: usize, v: toml::Value) -> Result<Price, Error> {
    let name_guess = v
        .get("name")
        .or_else(|| v.get("meter"))
        .and_then(toml::Value::as_str)
        .map_or_else(|| format!("price[{index}]"), str::to_owned);
    let raw: RawPrice = v.try_into().map_err(|e| serde_error(plan, &name_guess, "price", &e))?;
    let ctx = Ctx { plan, price: &name_guess, prefix: String::new() };
    let meter = ctx.required_string("meter", raw.meter)?;
    let name = ctx.string("name", raw.name)?.unwrap_or_else(|| meter.clone());
    let matches = match raw.matches {
        None => BTreeMap::new(),
        Some(toml::Value::Table(t)) => {
            let mut m = BTreeMap::new();
            for (k, val) in t {
                let val = ctx.required_string(&format!("match.{k}"), Some(val))?;
                m.insert(k, val);
            }
            m
        }
        Some(other) => return Err(ctx.err("match", format!("expected a table like {{ model = \"gpt-4o\" }}, got {}", other.type_str()))),
    };
    let free_units = ctx.decimal("free_units", raw.free_units, MAX_SCALE)?.unwrap_or_default();
    let kind = ctx.required_string("model", raw.model)?;
    // Fields that belong to another model are errors, not silently ignored: a `unit_price` on
    // a package price is almost certainly a mistake in the file.
    let forbid = |field: &str, v: &Option<toml::Value>| -> Result<(), Error> {
        match v {
            Some(_) => Err(ctx.err(field, format!("not used by model {kind:?}"))),
            None => Ok(()),
        }
    };
    let model = match kind.as_str() {
        "per_unit" => {
            forbid("tiers", &raw.tiers)?;
            forbid("package_size", &raw.package_size)?;
            forbid("package_price", &raw.package_price)?;
            PriceModel::PerUnit { unit_price: ctx.required_decimal("unit_price", raw.unit_price, PRICE_SCALE)? }
        }
        "graduated" | "volume" => {
            forbid("unit_price", &raw.unit_price)?;
            forbid("package_size", &raw.package_size)?;
            forbid("package_price", &raw.package_price)?;
            let tiers = parse_tiers(&ctx, raw.tiers)?;
            if kind == "graduated" {
                PriceModel::Graduated { tiers }
            } else {
                PriceModel::Volume { tiers }
            }
        }
        "package" => {
            forbid("unit_price", &raw.unit_price)?;
            forbid("tiers", &raw.tiers)?;
            let package_size = ctx.required_decimal("package_size", raw.package_size, MAX_SCALE)?;
            if package_size.is_zero() {
                return Err(ctx.err("package_size", "must be positive"));
            }
            PriceModel::Package {
                package_size,
                package_price: ctx.required_decimal("package_price", raw.package_price, PRICE_SCALE)?,
            }
        }
        other => return Err(ctx.err("model", format!("{other:?} is not one of per_unit, graduated, volume, package"))),
    };
    Ok(Price { name, meter, matches, free_units, model })
}

fn parse_tiers(ctx: &Ctx<'_>, v: Option<toml::Value>) -> Result<Vec<Tier>, Error> {
    let list = match v {
        None => return Err(ctx.err("tiers", "missing")),
        Some(toml::Value::Array(a)) if a.is_empty() => return Err(ctx.err("tiers", "needs at least one tier")),
        Some(toml::Value::Array(a)) => a,
        Some(other) => return Err(ctx.err("tiers", format!("expected an array of tables, got {}", other.type_str()))),
    };
    let n = list.len();
    let mut tiers: Vec<Tier> = Vec::with_capacity(n);
    for (i, tv) in list.into_iter().enumerate() {
        let tctx = Ctx { plan: ctx.plan, price: ctx.price, prefix: format!("tiers[{i}].") };
        let raw: RawTier = tv.try_into().map_err(|e| match serde_error(ctx.plan, ctx.price, "", &e) {
            Error::InvalidCatalog { plan, price, field, reason } => {
                Error::InvalidCatalog { plan, price, field: format!("tiers[{i}]{}{field}", if field.is_empty() { "" } else { "." }), reason }
            }
            other => other,
        })?;
        let up_to = match raw.up_to {
            Some(toml::Value::String(s)) if s == "inf" => None,
            other => tctx.decimal("up_to", other, MAX_SCALE)?,
        };
        match (up_to, i + 1 == n) {
            (Some(_), true) => return Err(tctx.err("up_to", "the last tier must be unbounded (omit up_to)")),
            (None, false) => return Err(tctx.err("up_to", "only the last tier may be unbounded")),
            (Some(u), false) => {
                let prev = tiers.last().and_then(|t| t.up_to).unwrap_or(Decimal::ZERO);
                if u <= prev {
                    return Err(tctx.err("up_to", format!("must be greater than the previous bound {prev}")));
                }
            }
            (None, true) => {}
        }
        tiers.push(Tier {
            up_to,
            unit_price: tctx.required_decimal("unit_price", raw.unit_price, PRICE_SCALE)?,
            flat_fee: tctx.decimal("flat_fee", raw.flat_fee, PRICE_SCALE)?.unwrap_or_default(),
        });
    }
    Ok(tiers)
}

fn parse_assignment(index: usize, v: toml::Value, plans: &BTreeMap<String, Plan>) -> Result<Assignment, Error> {
    let plan_guess = v.get("plan").and_then(toml::Value::as_str).unwrap_or("").to_owned();
    let field = format!("assignment[{index}]");
    let raw: RawAssignment = v.try_into().map_err(|e| serde_error(&plan_guess, "", &field, &e))?;
    let ctx = Ctx { plan: &plan_guess, price: "", prefix: format!("{field}.") };
    let tenant = ctx.required_string("tenant", raw.tenant)?;
    let plan = ctx.required_string("plan", raw.plan)?;
    if !plans.contains_key(&plan) {
        return Err(ctx.err("plan", format!("tenant {tenant:?}: no such plan")));
    }
    let from = ctx.required_string("from", raw.from.map(|v| match v {
        // A bare TOML datetime is accepted too; its text form is RFC 3339.
        toml::Value::Datetime(d) => toml::Value::String(d.to_string()),
        other => other,
    }))?;
    let from_ms = parse_rfc3339_ms(&from).map_err(|r| ctx.err("from", format!("tenant {tenant:?}: {r}")))?;
    Ok(Assignment { tenant, plan, from_ms })
}

fn parse_cost(index: usize, v: toml::Value) -> Result<CostRule, Error> {
    let field = format!("cost[{index}]");
    let raw: RawCost = v.try_into().map_err(|e| serde_error("", "", &field, &e))?;
    let ctx = Ctx { plan: "", price: "", prefix: format!("{field}.") };
    let meter = ctx.required_string("meter", raw.meter)?;
    let dimension = match (ctx.string("dimension", raw.dimension)?, ctx.string("value", raw.value)?) {
        (Some(d), Some(v)) => Some((d, v)),
        (None, None) => None,
        (Some(_), None) => return Err(ctx.err("value", format!("meter {meter:?}: dimension without value"))),
        (None, Some(_)) => return Err(ctx.err("dimension", format!("meter {meter:?}: value without dimension"))),
    };
    let per_unit = match (
        ctx.decimal("per_unit", raw.per_unit, PRICE_SCALE)?,
        ctx.decimal("per_million", raw.per_million, PRICE_SCALE)?,
    ) {
        (Some(u), None) => u,
        // Exact: dividing by a power of ten only moves the decimal point.
        (None, Some(m)) => m / Decimal::from(1_000_000),
        _ => return Err(ctx.err("per_unit", format!("meter {meter:?}: set exactly one of per_unit, per_million"))),
    };
    Ok(CostRule { meter, dimension, per_unit: per_unit.normalize() })
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
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn calendar_months() {
        let nov15 = parse_rfc3339_ms("2026-11-15T00:00:00Z").unwrap();
        assert_eq!(period_start(nov15), parse_rfc3339_ms("2026-11-01T00:00:00Z").unwrap());
        assert_eq!(period_end(nov15), parse_rfc3339_ms("2026-12-01T00:00:00Z").unwrap());
        let dec31 = parse_rfc3339_ms("2026-12-31T23:59:59.999Z").unwrap();
        assert_eq!(period_end(dec31), parse_rfc3339_ms("2027-01-01T00:00:00Z").unwrap());
        let feb = parse_rfc3339_ms("2028-02-10T00:00:00Z").unwrap();
        assert_eq!(period_end(feb) - period_start(feb), 29 * DAY_MS);
        assert_eq!(period_start(-1), parse_rfc3339_ms("1969-12-01T00:00:00Z").unwrap());
        assert_eq!(parse_rfc3339_ms("1970-01-01T01:00:00+01:00").unwrap(), 0);
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00.250Z").unwrap(), 250);
        for bad in ["2026-13-01T00:00:00Z", "2026-02-30T00:00:00Z", "2026-01-01", "2026-01-01T00:00:00", "2026-01-01T00:00:00.0001Z"] {
            assert!(parse_rfc3339_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn half_even_division() {
        assert_eq!(div_round_half_even(5, 2), 2);
        assert_eq!(div_round_half_even(7, 2), 4);
        assert_eq!(div_round_half_even(7, 3), 2);
        assert_eq!(div_round_half_even(8, 3), 3);
    }

    #[test]
    fn package_rounds_partial_packages_up() {
        let m = PriceModel::Package { package_size: d("1000"), package_price: d("0.5") };
        assert_eq!(m.exact(d("1")), Some(d("0.5")));
        assert_eq!(m.exact(d("1000")), Some(d("0.5")));
        assert_eq!(m.exact(d("1000.000000001")), Some(d("1.0")));
        assert_eq!(m.exact(d("2500")), Some(d("1.5")));
    }

    #[test]
    fn margin_percent_rounds() {
        assert_eq!(margin_percent(d("3"), d("1")), Some(d("33.33")));
        assert_eq!(margin_percent(d("0"), d("1")), None);
    }
}
