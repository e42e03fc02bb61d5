use std::collections::BTreeMap;
use std::str::FromStr;

use proptest::prelude::*;
use rust_decimal::Decimal;

use super::*;
use crate::rating::{RateOutcome, RatingConfig, RatingState};
use crate::records::{Charge, MeterAggregate};

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// 2025-11-01T00:00:00Z.
const NOV: i64 = 1_761_955_200_000;
const MINUTE: i64 = 60_000;

/// Every price model, a free allowance and a commitment on one plan.
const CATALOG: &str = r#"
default_plan = "p"
[[plan]]
id = "p"
currency = "USD"
minimum_commitment = "50"
[[plan.price]]
meter = "tokens"
name = "tokens.graduated"
match = { model = "g" }
model = "graduated"
free_units = "100"
tiers = [ { up_to = "1000", unit_price = "0.0123456789", flat_fee = "1" }, { up_to = "5000", unit_price = "0.001" }, { unit_price = "0.0005" } ]
[[plan.price]]
meter = "tokens"
name = "tokens.volume"
match = { model = "v" }
model = "volume"
tiers = [ { up_to = "2000", unit_price = "0.002" }, { unit_price = "0.001", flat_fee = "3" } ]
[[plan.price]]
meter = "tokens"
name = "tokens.per_unit"
model = "per_unit"
unit_price = "0.000003333"
[[plan.price]]
meter = "requests"
model = "package"
package_size = "100"
package_price = "0.125"
"#;

fn catalog() -> Catalog {
    Catalog::from_toml_str(CATALOG).unwrap()
}

fn agg(meter: &str, model: &str, minute: i64, revision: i32, value: Decimal, previous: Decimal, seq: i64) -> MeterAggregate {
    let window_start = NOV + minute * MINUTE;
    MeterAggregate {
        tenant: "acme".into(),
        meter: meter.into(),
        aggregation: "sum".into(),
        dimensions: BTreeMap::from([("model".to_owned(), model.to_owned())]),
        window_start,
        window_end: window_start + MINUTE,
        revision,
        value,
        previous_value: previous,
        event_count: 1,
        seq,
        emitted_at: window_start + MINUTE,
        ..MeterAggregate::default()
    }
}

/// What the API's SQL does: the period's charges summed per (kind, plan, currency, meter,
/// dimensions).
type GroupKey = (String, String, String, String, Vec<(String, String)>);

fn group(charges: &[Charge]) -> Vec<ChargeGroup> {
    let mut out: BTreeMap<GroupKey, ChargeGroup> = BTreeMap::new();
    for c in charges {
        let key = (c.kind.clone(), c.plan.clone(), c.currency.clone(), c.meter.clone(), c.dimensions.clone().into_iter().collect());
        let g = out.entry(key).or_insert_with(|| ChargeGroup {
            kind: c.kind.clone(),
            plan: c.plan.clone(),
            currency: c.currency.clone(),
            meter: c.meter.clone(),
            dimensions: c.dimensions.clone(),
            quantity: Decimal::ZERO,
            amount: Decimal::ZERO,
            charges: 0,
        });
        g.quantity += c.quantity;
        g.amount += c.amount;
        g.charges += 1;
    }
    out.into_values().collect()
}

fn rate_all(aggs: &[MeterAggregate]) -> Vec<Charge> {
    let cat = catalog();
    let mut state = RatingState::new(0, RatingConfig::default());
    let mut out = Vec::new();
    for a in aggs {
        match state.rate(&cat, a).unwrap() {
            RateOutcome::Charged(c) => out.extend(c),
            other => panic!("{other:?}"),
        }
    }
    out
}

#[test]
fn minor_units_and_half_even() {
    assert_eq!(round_minor(d("1.005"), "USD"), d("1.00"));
    assert_eq!(round_minor(d("1.015"), "USD"), d("1.02"));
    assert_eq!(round_minor(d("1.0150001"), "EUR"), d("1.02"));
    assert_eq!(round_minor(d("2.5"), "JPY"), d("2"));
    assert_eq!(round_minor(d("3.5"), "JPY"), d("4"));
    assert_eq!(round_minor(d("0.0005"), "KWD"), d("0.000"));
    assert_eq!(round_minor(d("-1.005"), "USD"), d("-1.00"));
}

#[test]
fn graduated_and_volume_tiers_by_hand() {
    let cat = catalog();
    let plan = cat.plan("p").unwrap();
    let grad = &plan.price("tokens.graduated").unwrap().model;
    let t = tiers_crossed(grad, d("6000"));
    let units: Vec<Decimal> = t.iter().map(|u| u.units).collect();
    assert_eq!(units, vec![d("1000"), d("4000"), d("1000")]);
    assert_eq!(t.iter().map(|u| u.tier).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(tiers_crossed(grad, d("1000")).len(), 1, "up_to is inclusive");
    assert!(tiers_crossed(grad, Decimal::ZERO).is_empty());
    let vol = &plan.price("tokens.volume").unwrap().model;
    let t = tiers_crossed(vol, d("2500"));
    assert_eq!((t.len(), t[0].tier, t[0].units, t[0].flat_fee), (1, 2, d("2500"), d("3")));
}

#[test]
fn a_small_invoice_by_hand() {
    // graduated: 1,100 units, 100 free: 1,000 in tier 1 = 12.3456789 + 1 flat = 13.3456789;
    // split over a window and a restatement.
    let charges = rate_all(&[
        agg("tokens", "g", 0, 0, d("600"), Decimal::ZERO, 1),
        agg("tokens", "g", 1, 0, d("400"), Decimal::ZERO, 2),
        agg("tokens", "g", 1, 1, d("500"), d("400"), 3),
        agg("requests", "x", 2, 0, d("201"), Decimal::ZERO, 4),
    ]);
    let inv = build(&catalog(), "acme", NOV + 5 * MINUTE, &group(&charges));
    assert_eq!(inv.period_start_ms, NOV);
    assert_eq!(inv.lines.len(), 2);
    let g = inv.lines.iter().find(|l| l.price.as_deref() == Some("tokens.graduated")).unwrap();
    assert_eq!((g.quantity, g.billable_quantity, g.charges), (d("1100"), d("1000"), 3));
    assert_eq!((g.amount_exact, g.amount), (d("13.345678900"), d("13.35")));
    assert_eq!(g.tiers.len(), 1);
    let r = inv.lines.iter().find(|l| l.meter == "requests").unwrap();
    assert_eq!((r.amount_exact, r.amount, r.model), (d("0.375"), d("0.38"), Some("package")), "3 packages, 0.375 rounds to even");
    // Commitment 50 not reached: projected true-up 50 - 13.7206789.
    assert_eq!(inv.true_ups.len(), 1);
    let t = &inv.true_ups[0];
    assert_eq!((t.status, t.commitment, t.amount_exact, t.amount), (TrueUpStatus::Projected, Some(d("50")), d("36.2793211"), d("36.28")));
    let total = &inv.totals[0];
    assert_eq!((total.usage, total.true_up, total.total, total.total_exact), (d("13.73"), d("36.28"), d("50.01"), d("50")));
}

#[test]
fn charged_true_up_is_taken_from_the_charges() {
    let mut charges = rate_all(&[agg("tokens", "v", 0, 0, d("10"), Decimal::ZERO, 1)]);
    let mut state = RatingState::new(0, RatingConfig::default());
    state.rate(&catalog(), &agg("tokens", "v", 0, 0, d("10"), Decimal::ZERO, 1)).unwrap();
    charges.extend(state.on_period_close(&catalog(), "acme", NOV));
    let inv = build(&catalog(), "acme", NOV, &group(&charges));
    let t = &inv.true_ups[0];
    assert_eq!((t.status, t.amount_exact), (TrueUpStatus::Charged, d("49.98")));
    assert_eq!(inv.totals[0].total_exact, d("50"));
    assert_eq!(inv.totals[0].total_exact, charges.iter().map(|c| c.amount).sum::<Decimal>());
}

#[test]
fn charges_of_prices_no_longer_in_the_catalog_still_count() {
    let charges = rate_all(&[agg("tokens", "g", 0, 0, d("5000"), Decimal::ZERO, 1)]);
    let other = Catalog::from_toml_str("[[plan]]\nid = \"q\"\ncurrency = \"USD\"\n").unwrap();
    let inv = build(&other, "acme", NOV, &group(&charges));
    assert_eq!(inv.lines.len(), 1);
    assert_eq!((inv.lines[0].price.as_deref(), inv.lines[0].model), (None, None));
    assert_eq!(inv.totals[0].total_exact, charges[0].amount);
    assert!(inv.true_ups.is_empty());
}

proptest! {
    /// For random windows and restatements over every model: the exact total is the sum of
    /// the charges, each line is the catalog price of its quantity (charges telescope), the
    /// total is the sum of the half-even rounded lines, within half a cent per line of the
    /// exact total, and the tiers' units add up to the billable quantity.
    #[test]
    fn preview_equals_the_charges_and_the_catalog(
        windows in proptest::collection::vec((0usize..4, 0i64..500, 0i64..4_000_000, proptest::option::of(0i64..4_000_000)), 1..40),
    ) {
        let models = [("tokens", "g"), ("tokens", "v"), ("tokens", "p"), ("requests", "x")];
        let mut aggs = Vec::new();
        let mut seq = 0;
        for &(m, minute, v, restated) in &windows {
            let (meter, model) = models[m];
            seq += 1;
            let v0 = Decimal::new(v, 3);
            aggs.push(agg(meter, model, minute, 0, v0, Decimal::ZERO, seq));
            if let Some(r) = restated {
                seq += 1;
                aggs.push(agg(meter, model, minute, 1, Decimal::new(r, 3), v0, seq));
            }
        }
        let charges = rate_all(&aggs);
        let cat = catalog();
        let inv = build(&cat, "acme", NOV, &group(&charges));
        let usage: Decimal = charges.iter().map(|c| c.amount).sum();
        let total = &inv.totals[0];
        let projected = (d("50") - usage).max(Decimal::ZERO);
        prop_assert_eq!(total.total_exact, usage + projected);
        prop_assert_eq!(total.usage, inv.lines.iter().map(|l| round_minor(l.amount_exact, "USD")).sum::<Decimal>());
        prop_assert_eq!(total.total, total.usage + round_minor(projected, "USD"));
        let slack = Decimal::new(5, 3) * Decimal::from(inv.lines.len() + 1);
        prop_assert!((total.total - total.total_exact).abs() <= slack);
        for l in &inv.lines {
            let price = cat.plan("p").unwrap().price(l.price.as_deref().unwrap()).unwrap();
            prop_assert_eq!(l.amount_exact, price.price(l.quantity).unwrap());
            if !l.tiers.is_empty() {
                prop_assert_eq!(l.tiers.iter().map(|t| t.units).sum::<Decimal>(), l.billable_quantity);
            }
        }
    }
}
