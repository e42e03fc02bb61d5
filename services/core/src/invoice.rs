//! Invoice preview: a tenant's charges of one billing period as invoice lines, one per price.
//!
//! The amounts are the charges the rater booked, not a re-pricing: a line's exact amount is the
//! sum of its charges, so the preview equals the charges table by construction, and (because a
//! price's charges telescope, see [`crate::pricing`]) it is also `price(quantity)` of the line's
//! total quantity. The catalog only explains the line: which price it is, its free units and
//! the tiers the quantity crossed.
//!
//! # Rounding
//!
//! Charges carry 9 fractional digits. An invoice is in the currency's minor unit (ISO 4217:
//! 2 digits for USD and EUR, 0 for JPY, 3 for KWD, ...), and this is the only place amounts are
//! rounded to it: **each line and each true-up is rounded half-to-even to the minor unit, and
//! the total is the sum of the rounded lines**, so the lines of the invoice add up to its total.
//! The total therefore differs from the exact sum of the charges (`total_exact`, also given) by
//! at most half a minor unit per line.
//!
//! # True-up
//!
//! A minimum commitment is trued up by the rater when the period closes (a `true_up` charge).
//! Until then the preview shows the projected true-up, `max(0, commitment - usage)` with the
//! catalog's prorated commitment ([`Catalog::commitments`]), marked `projected`.

use std::collections::BTreeMap;

use rust_decimal::{Decimal, RoundingStrategy};

use crate::pricing::{self, Catalog, Price, PriceModel};
use crate::rating::{KIND_TRUE_UP, KIND_USAGE};

/// The charges of one (kind, plan, currency, meter, dimension set) of a period, summed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeGroup {
    pub kind: String,
    pub plan: String,
    pub currency: String,
    pub meter: String,
    pub dimensions: BTreeMap<String, String>,
    pub quantity: Decimal,
    pub amount: Decimal,
    pub charges: u64,
}

/// A tier a line's billable quantity reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierUse {
    /// 1-based, in the catalog's order.
    pub tier: usize,
    pub up_to: Option<Decimal>,
    /// Units of the line priced in this tier.
    pub units: Decimal,
    pub unit_price: Decimal,
    pub flat_fee: Decimal,
}

/// One price of one plan in the period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceLine {
    pub plan: String,
    /// The catalog price the charges were rated with; `None` if the catalog no longer has it
    /// (the line still carries the charges' amount).
    pub price: Option<String>,
    pub meter: String,
    pub currency: String,
    pub model: Option<&'static str>,
    pub quantity: Decimal,
    pub free_units: Decimal,
    pub billable_quantity: Decimal,
    pub tiers: Vec<TierUse>,
    pub charges: u64,
    /// Sum of the charges, 9 digits.
    pub amount_exact: Decimal,
    /// `amount_exact` rounded half-to-even to the currency's minor unit.
    pub amount: Decimal,
}

/// Whether a true-up was charged by the rater or is what the catalog projects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum TrueUpStatus {
    Charged,
    Projected,
}

impl TrueUpStatus {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrueUp {
    pub currency: String,
    pub status: TrueUpStatus,
    pub commitment: Option<Decimal>,
    pub amount_exact: Decimal,
    pub amount: Decimal,
}

/// The bottom line in one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrencyTotal {
    pub currency: String,
    /// Sum of the rounded lines.
    pub usage: Decimal,
    pub true_up: Decimal,
    /// `usage + true_up`: what the invoice says.
    pub total: Decimal,
    /// The exact sum of the period's charges (and a projected true-up), 9 digits.
    pub total_exact: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    pub tenant: String,
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    pub lines: Vec<InvoiceLine>,
    pub true_ups: Vec<TrueUp>,
    pub totals: Vec<CurrencyTotal>,
}

/// Digits of the currency's minor unit (ISO 4217); 2 for codes not listed.
pub fn minor_units(currency: &str) -> u32 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX" | "UYI" | "VND" | "VUV" | "XAF"
        | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        "CLF" | "UYW" => 4,
        _ => 2,
    }
}

/// `amount` rounded half-to-even to the currency's minor unit.
pub fn round_minor(amount: Decimal, currency: &str) -> Decimal {
    amount.round_dp_with_strategy(minor_units(currency), RoundingStrategy::MidpointNearestEven)
}

/// The tiers a billable quantity reached under `model` (graduated: every tier it has units in;
/// volume: the one tier that prices all of it; other models: none).
pub fn tiers_crossed(model: &PriceModel, billable: Decimal) -> Vec<TierUse> {
    if billable <= Decimal::ZERO {
        return Vec::new();
    }
    let use_of = |i: usize, t: &pricing::Tier, units: Decimal| TierUse {
        tier: i + 1,
        up_to: t.up_to,
        units,
        unit_price: t.unit_price,
        flat_fee: t.flat_fee,
    };
    match model {
        PriceModel::Graduated { tiers } => {
            let mut out = Vec::new();
            let mut lower = Decimal::ZERO;
            for (i, t) in tiers.iter().enumerate() {
                if billable <= lower {
                    break;
                }
                let upper = t.up_to.map_or(billable, |u| u.min(billable));
                out.push(use_of(i, t, upper - lower));
                match t.up_to {
                    Some(u) => lower = u,
                    None => break,
                }
            }
            out
        }
        PriceModel::Volume { tiers } => tiers
            .iter()
            .enumerate()
            .find(|(_, t)| t.up_to.is_none_or(|u| billable <= u))
            .or_else(|| tiers.iter().enumerate().next_back())
            .map(|(i, t)| vec![use_of(i, t, billable)])
            .unwrap_or_default(),
        PriceModel::PerUnit { .. } | PriceModel::Package { .. } => Vec::new(),
    }
}

/// The preview of `tenant`'s period starting at `period_start_ms` from its charges.
pub fn build(catalog: &Catalog, tenant: &str, period_start_ms: i64, groups: &[ChargeGroup]) -> Invoice {
    let period_start_ms = pricing::period_start(period_start_ms);
    let mut lines: BTreeMap<(String, String, String), InvoiceLine> = BTreeMap::new();
    let mut charged_true_up: BTreeMap<String, Decimal> = BTreeMap::new();
    for g in groups {
        if g.kind == KIND_TRUE_UP {
            *charged_true_up.entry(g.currency.clone()).or_default() += g.amount;
            continue;
        }
        debug_assert_eq!(g.kind, KIND_USAGE);
        let price = catalog.plan(&g.plan).and_then(|p| p.price_for(&g.meter, &g.dimensions));
        let name = price.map_or_else(|| format!("{} (not in the catalog)", g.meter), |p| p.name.clone());
        let line = lines.entry((g.currency.clone(), g.plan.clone(), name)).or_insert_with(|| new_line(g, price));
        line.quantity += g.quantity;
        line.amount_exact += g.amount;
        line.charges += g.charges;
    }
    let mut lines: Vec<InvoiceLine> = lines.into_values().collect();
    for line in &mut lines {
        finish_line(catalog, line);
    }
    let currencies: std::collections::BTreeSet<String> =
        lines.iter().map(|l| l.currency.clone()).chain(charged_true_up.keys().cloned()).collect();
    let commitments = catalog.commitments(tenant, period_start_ms);
    let mut true_ups = Vec::new();
    let mut totals = Vec::new();
    for cur in currencies.iter().chain(commitments.keys().filter(|c| !currencies.contains(*c))) {
        let of_cur = lines.iter().filter(|l| &l.currency == cur);
        let (usage, usage_exact) = of_cur.fold((Decimal::ZERO, Decimal::ZERO), |(r, e), l| (r + l.amount, e + l.amount_exact));
        let commitment = commitments.get(cur).map(|c| c.amount);
        let (status, exact) = match charged_true_up.get(cur) {
            Some(a) => (TrueUpStatus::Charged, *a),
            None => (TrueUpStatus::Projected, commitment.map_or(Decimal::ZERO, |c| (c - usage_exact).max(Decimal::ZERO))),
        };
        let true_up = round_minor(exact, cur);
        if commitment.is_some() || status == TrueUpStatus::Charged {
            true_ups.push(TrueUp { currency: cur.clone(), status, commitment, amount_exact: exact, amount: true_up });
        }
        totals.push(CurrencyTotal {
            currency: cur.clone(),
            usage,
            true_up,
            total: usage + true_up,
            total_exact: usage_exact + exact,
        });
    }
    Invoice { tenant: tenant.to_owned(), period_start_ms, period_end_ms: pricing::period_end(period_start_ms), lines, true_ups, totals }
}

fn new_line(g: &ChargeGroup, price: Option<&Price>) -> InvoiceLine {
    InvoiceLine {
        plan: g.plan.clone(),
        price: price.map(|p| p.name.clone()),
        meter: g.meter.clone(),
        currency: g.currency.clone(),
        model: price.map(|p| p.model.kind()),
        quantity: Decimal::ZERO,
        free_units: price.map_or(Decimal::ZERO, |p| p.free_units),
        billable_quantity: Decimal::ZERO,
        tiers: Vec::new(),
        charges: 0,
        amount_exact: Decimal::ZERO,
        amount: Decimal::ZERO,
    }
}

fn finish_line(catalog: &Catalog, line: &mut InvoiceLine) {
    line.billable_quantity = (line.quantity - line.free_units).max(Decimal::ZERO);
    if let Some(price) = line.price.as_deref().and_then(|n| catalog.plan(&line.plan)?.price(n)) {
        line.tiers = tiers_crossed(&price.model, line.billable_quantity);
    }
    line.amount = round_minor(line.amount_exact, &line.currency);
}

#[cfg(test)]
mod tests;
