//! Loading the catalog file: typed serde structures (unknown keys rejected at every level,
//! leaves checked by the types in `fields`), then the rules that span several fields. Every
//! error names the plan, the price and the field, because the person reading it is editing
//! that file.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Deserialize;

use super::fields::{Bound, Currency, Dec, Instant, Period, PlanId, Quantity, Rate, Text};
use super::limits::SpendLimitEntry;
use super::*;
use crate::Error;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CatalogFile {
    pub(super) default_plan: Option<Text>,
    #[serde(default)]
    pub(super) plan: Vec<PlanEntry>,
    #[serde(default)]
    pub(super) assignment: Vec<AssignmentEntry>,
    #[serde(default)]
    pub(super) cost: Vec<CostEntry>,
    #[serde(default)]
    pub(super) spend_limit: Vec<SpendLimitEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PlanEntry {
    id: PlanId,
    currency: Currency,
    /// Checked, not kept: the month is the only period.
    #[serde(rename = "billing_period")]
    _billing_period: Option<Period>,
    minimum_commitment: Option<Quantity>,
    #[serde(rename = "description")]
    _description: Option<Text>,
    #[serde(default)]
    price: Vec<PriceEntry>,
}

#[derive(Debug, Clone, Copy, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
enum ModelKind {
    PerUnit,
    Graduated,
    Volume,
    Package,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceEntry {
    meter: Text,
    name: Option<Text>,
    #[serde(rename = "match", default)]
    matches: BTreeMap<String, Text>,
    model: ModelKind,
    free_units: Option<Quantity>,
    unit_price: Option<Rate>,
    tiers: Option<Vec<TierEntry>>,
    package_size: Option<Quantity>,
    package_price: Option<Rate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TierEntry {
    /// Absent or `"inf"`: the unbounded last tier.
    up_to: Option<Bound>,
    unit_price: Rate,
    flat_fee: Option<Rate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AssignmentEntry {
    tenant: Text,
    plan: Text,
    from: Instant,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CostEntry {
    meter: Text,
    dimension: Option<Text>,
    value: Option<Text>,
    per_unit: Option<Rate>,
    per_million: Option<Rate>,
}

pub(super) fn invalid(plan: &str, price: &str, field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidCatalog {
        plan: plan.to_owned(),
        price: price.to_owned(),
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Reads the file's structure and leaves; the first bad key or value is an error at its path.
pub(super) fn parse_file(text: &str) -> Result<CatalogFile, Error> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| located(text, e))
}

/// One step of a path into the file.
#[derive(Debug, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// An error at a path as `InvalidCatalog`: a path through `plan[i]` (and `price[j]`) names
/// that plan by its id (and the price by its name), the rest of the path is the field, and
/// toml's span gives the line.
fn located(text: &str, e: serde_path_to_error::Error<toml::de::Error>) -> Error {
    use serde_path_to_error::Segment;
    let mut path: Vec<Step> = e
        .path()
        .iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(Step::Index(*index)),
            Segment::Map { key } => Some(Step::Key(key.clone())),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect();
    let inner = e.into_inner();
    let mut reason = inner.message().trim().to_owned();
    // serde reports an unknown or missing key at the table that has (or lacks) it.
    for marker in ["unknown field `", "missing field `"] {
        if let Some((key, _)) = reason.split_once(marker).and_then(|(_, rest)| rest.split_once('`')) {
            let key = Step::Key(key.to_owned());
            if path.last() != Some(&key) {
                path.push(key);
            }
        }
    }
    if let Some(span) = inner.span() {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        reason = format!("{reason} (line {line}, column {column})");
    }
    let doc: Option<toml::Table> = text.parse().ok();
    let entry = |table: &str, i: usize| doc.as_ref()?.get(table)?.as_array()?.get(i)?.as_table();
    let text_of = |t: &toml::Table, key: &str| t.get(key).and_then(toml::Value::as_str).map(str::to_owned);
    let key_is = |s: Option<&Step>, k: &str| matches!(s, Some(Step::Key(x)) if x == k);
    let (mut plan, mut price, mut skip) = (String::new(), String::new(), 0);
    if let (true, Some(Step::Index(i))) = (key_is(path.first(), "plan"), path.get(1)) {
        let p = entry("plan", *i);
        plan = p.and_then(|p| text_of(p, "id")).unwrap_or_else(|| format!("plan[{i}]"));
        skip = 2;
        if let (true, Some(Step::Index(j))) = (key_is(path.get(2), "price"), path.get(3)) {
            let q = p.and_then(|p| p.get("price")?.as_array()?.get(*j)?.as_table());
            price = q.and_then(|q| text_of(q, "name").or_else(|| text_of(q, "meter"))).unwrap_or_else(|| format!("price[{j}]"));
            skip = 4;
        }
    } else if let (true, Some(Step::Index(i))) = (key_is(path.first(), "assignment"), path.get(1)) {
        plan = entry("assignment", *i).and_then(|a| text_of(a, "plan")).unwrap_or_default();
    }
    let field = match (skip, &path[skip..]) {
        (0, []) => "catalog".to_owned(),
        (2, []) => "plan".to_owned(),
        (_, []) => "price".to_owned(),
        (_, rest) => display(rest),
    };
    invalid(&plan, &price, &field, reason)
}

/// `tiers[1].up_to`, as serde_path_to_error writes paths.
fn display(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) if out.is_empty() => out.push_str(k),
            Step::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

impl PlanEntry {
    pub(super) fn into_plan(self) -> Result<Plan, Error> {
        let PlanId(id) = self.id;
        let mut prices: Vec<Price> = Vec::with_capacity(self.price.len());
        for entry in self.price {
            let p = entry.into_price(&id)?;
            if prices.iter().any(|q| q.name == p.name) {
                return Err(invalid(&id, &p.name, "name", "two prices with the same name (set `name` to tell prices of one meter apart)"));
            }
            // Two prices of one meter with equally specific, compatible matches could both
            // apply to one aggregate; the catalog must say which wins.
            if let Some(q) = prices.iter().find(|q| {
                q.meter == p.meter
                    && q.matches.len() == p.matches.len()
                    && q.matches.iter().all(|(k, v)| p.matches.get(k).is_none_or(|w| w == v))
            }) {
                return Err(invalid(&id, &p.name, "match", format!("ambiguous with price {:?}: an aggregate could match both", q.name)));
            }
            prices.push(p);
        }
        Ok(Plan { id, currency: self.currency.0, minimum_commitment: Dec::or_zero(self.minimum_commitment), prices })
    }
}

impl PriceEntry {
    fn into_price(self, plan: &str) -> Result<Price, Error> {
        let Text(meter) = self.meter;
        let name = self.name.map_or_else(|| meter.clone(), |n| n.0);
        let err = |field: &str, reason: &str| invalid(plan, &name, field, reason);
        let kind = self.model;
        // Fields that belong to another model are errors, not silently ignored: a
        // `unit_price` on a package price is almost certainly a mistake in the file.
        let forbid = |field: &str, set: bool| match set {
            true => Err(err(field, &format!("not used by model {:?}", <&str>::from(kind)))),
            false => Ok(()),
        };
        let model = match kind {
            ModelKind::PerUnit => {
                forbid("tiers", self.tiers.is_some())?;
                forbid("package_size", self.package_size.is_some())?;
                forbid("package_price", self.package_price.is_some())?;
                PriceModel::PerUnit { unit_price: self.unit_price.ok_or_else(|| err("unit_price", "missing"))?.0 }
            }
            ModelKind::Graduated | ModelKind::Volume => {
                forbid("unit_price", self.unit_price.is_some())?;
                forbid("package_size", self.package_size.is_some())?;
                forbid("package_price", self.package_price.is_some())?;
                let tiers = into_tiers(self.tiers, &err)?;
                match kind {
                    ModelKind::Graduated => PriceModel::Graduated { tiers },
                    _ => PriceModel::Volume { tiers },
                }
            }
            ModelKind::Package => {
                forbid("unit_price", self.unit_price.is_some())?;
                forbid("tiers", self.tiers.is_some())?;
                let package_size = self.package_size.ok_or_else(|| err("package_size", "missing"))?.0;
                if package_size.is_zero() {
                    return Err(err("package_size", "must be positive"));
                }
                let package_price = self.package_price.ok_or_else(|| err("package_price", "missing"))?.0;
                PriceModel::Package { package_size, package_price }
            }
        };
        let matches = self.matches.into_iter().map(|(k, v)| (k, v.0)).collect();
        Ok(Price { name, meter, matches, free_units: Dec::or_zero(self.free_units), model })
    }
}

/// Tiers in order of strictly increasing bounds, only the last one unbounded.
fn into_tiers(entries: Option<Vec<TierEntry>>, err: &dyn Fn(&str, &str) -> Error) -> Result<Vec<Tier>, Error> {
    let entries = entries.ok_or_else(|| err("tiers", "missing"))?;
    if entries.is_empty() {
        return Err(err("tiers", "needs at least one tier"));
    }
    let n = entries.len();
    let mut tiers: Vec<Tier> = Vec::with_capacity(n);
    for (i, t) in entries.into_iter().enumerate() {
        let field = format!("tiers[{i}].up_to");
        let up_to = match t.up_to {
            Some(Bound::Finite(u)) => Some(u),
            None | Some(Bound::Unbounded) => None,
        };
        match (up_to, i + 1 == n) {
            (Some(_), true) => return Err(err(&field, "the last tier must be unbounded (omit up_to)")),
            (None, false) => return Err(err(&field, "only the last tier may be unbounded")),
            (Some(u), false) => {
                let prev = tiers.last().and_then(|t| t.up_to).unwrap_or(Decimal::ZERO);
                if u <= prev {
                    return Err(err(&field, &format!("must be greater than the previous bound {prev}")));
                }
            }
            (None, true) => {}
        }
        tiers.push(Tier { up_to, unit_price: t.unit_price.0, flat_fee: Dec::or_zero(t.flat_fee) });
    }
    Ok(tiers)
}

impl AssignmentEntry {
    pub(super) fn into_assignment(self, index: usize, plans: &BTreeMap<String, Plan>) -> Result<Assignment, Error> {
        let (Text(tenant), Text(plan)) = (self.tenant, self.plan);
        if !plans.contains_key(&plan) {
            return Err(invalid(&plan, "", &format!("assignment[{index}].plan"), format!("tenant {tenant:?}: no such plan")));
        }
        Ok(Assignment { tenant, plan, from_ms: self.from.0 })
    }
}

impl CostEntry {
    pub(super) fn into_rule(self, index: usize) -> Result<CostRule, Error> {
        let Text(meter) = self.meter;
        let err = |field: &str, reason: &str| invalid("", "", &format!("cost[{index}].{field}"), format!("meter {meter:?}: {reason}"));
        let dimension = match (self.dimension, self.value) {
            (Some(d), Some(v)) => Some((d.0, v.0)),
            (None, None) => None,
            (Some(_), None) => return Err(err("value", "dimension without value")),
            (None, Some(_)) => return Err(err("dimension", "value without dimension")),
        };
        let per_unit = match (self.per_unit, self.per_million) {
            (Some(u), None) => u.0,
            // Exact: dividing by a power of ten only moves the decimal point.
            (None, Some(m)) => m.0 / Decimal::from(1_000_000),
            _ => return Err(err("per_unit", "set exactly one of per_unit, per_million")),
        };
        Ok(CostRule { meter, dimension, per_unit: per_unit.normalize() })
    }
}
