//! Loading the catalog file. Structure is checked by serde (deny_unknown_fields at every
//! level); leaves are `toml::Value` and checked here, so that every error can name its plan,
//! price and field.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Deserialize;

use super::*;
use crate::decimal::MAX_SCALE;
use crate::Error;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) default_plan: Option<toml::Value>,
    #[serde(default)]
    pub(super) plan: Vec<toml::Value>,
    #[serde(default)]
    pub(super) assignment: Vec<toml::Value>,
    #[serde(default)]
    pub(super) cost: Vec<toml::Value>,
    #[serde(default)]
    pub(super) spend_limit: Vec<toml::Value>,
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
pub(super) struct RawSpendLimit {
    pub(super) tenant: Option<toml::Value>,
    pub(super) currency: Option<toml::Value>,
    pub(super) amount: Option<toml::Value>,
    pub(super) kind: Option<toml::Value>,
    pub(super) period: Option<toml::Value>,
}

pub(super) fn invalid(plan: &str, price: &str, field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidCatalog {
        plan: plan.to_owned(),
        price: price.to_owned(),
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Turns a serde structure error (unknown key, wrong shape) into an `InvalidCatalog` naming
/// the offending key when serde's message does (`unknown field `x``).
pub(super) fn serde_error(plan: &str, price: &str, fallback_field: &str, e: &dyn std::fmt::Display) -> Error {
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

pub(super) fn as_string(v: &toml::Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

/// Reads leaf values of one table for one (plan, price), naming them in errors.
pub(super) struct Ctx<'a> {
    pub(super) plan: &'a str,
    pub(super) price: &'a str,
    pub(super) prefix: String,
}

impl Ctx<'_> {
    pub(super) fn err(&self, field: &str, reason: impl Into<String>) -> Error {
        invalid(self.plan, self.price, &format!("{}{field}", self.prefix), reason)
    }

    pub(super) fn string(&self, field: &str, v: Option<toml::Value>) -> Result<Option<String>, Error> {
        match v {
            None => Ok(None),
            Some(toml::Value::String(s)) if s.is_empty() => Err(self.err(field, "must not be empty")),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.err(field, format!("expected a string, got {}", other.type_str()))),
        }
    }

    pub(super) fn required_string(&self, field: &str, v: Option<toml::Value>) -> Result<String, Error> {
        self.string(field, v)?.ok_or_else(|| self.err(field, "missing"))
    }

    /// A non-negative decimal written as a string or an integer, with at most `max_scale`
    /// fractional digits and at most 1e15.
    pub(super) fn decimal(&self, field: &str, v: Option<toml::Value>, max_scale: u32) -> Result<Option<Decimal>, Error> {
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

    pub(super) fn required_decimal(&self, field: &str, v: Option<toml::Value>, max_scale: u32) -> Result<Decimal, Error> {
        self.decimal(field, v, max_scale)?.ok_or_else(|| self.err(field, "missing"))
    }
}

/// Canonical decimal text (`-?[0-9]+(\.[0-9]+)?`) with at most `max_scale` fractional digits.
pub(super) fn parse_decimal(s: &str, max_scale: u32) -> Result<Decimal, String> {
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

pub(super) fn parse_plan(index: usize, v: toml::Value) -> Result<Plan, Error> {
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

pub(super) fn parse_assignment(index: usize, v: toml::Value, plans: &BTreeMap<String, Plan>) -> Result<Assignment, Error> {
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

pub(super) fn parse_cost(index: usize, v: toml::Value) -> Result<CostRule, Error> {
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
