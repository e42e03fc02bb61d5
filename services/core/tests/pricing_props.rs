//! Pricing, rating and wallet tests: hand-computed examples for every price model, the demo
//! catalog, and properties (256 cases each) for the invariants the bill depends on.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions: a failed unwrap is a failed run

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use meterflow_core::meter::MeterCatalog;
use meterflow_core::pricing::{self, parse_rfc3339_ms, Catalog};
use meterflow_core::rating::{
    AdjustmentOutcome, ParkReason, RateOutcome, RatingConfig, RatingState, WalletConfig, Wallets, ALERT_EXHAUSTED, ALERT_LOW_BALANCE,
    KIND_TRUE_UP, KIND_USAGE,
};
use meterflow_core::records::{Charge, MeterAggregate, WalletAdjustment};
use meterflow_core::Error;
use proptest::prelude::*;
use rust_decimal::Decimal;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// A state through the bytes a checkpoint holds (postcard, as `rating::partition` writes it).
fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(x: &T) -> T {
    postcard::from_bytes(&bytes(x)).unwrap()
}

fn bytes<T: serde::Serialize>(x: &T) -> Vec<u8> {
    postcard::to_allocvec(x).unwrap()
}

fn ts(s: &str) -> i64 {
    parse_rfc3339_ms(s).unwrap()
}

const MINUTE: i64 = 60_000;

fn nov() -> i64 {
    ts("2026-11-01T00:00:00Z")
}

/// A revision of one window's aggregate.
#[allow(clippy::too_many_arguments)]
fn agg(
    tenant: &str,
    meter: &str,
    dims: &[(&str, &str)],
    window_start: i64,
    revision: i32,
    value: Decimal,
    previous_value: Decimal,
    source_partition: i32,
    seq: i64,
) -> MeterAggregate {
    MeterAggregate {
        tenant: tenant.into(),
        meter: meter.into(),
        aggregation: "sum".into(),
        dimensions: dims.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        window_start,
        window_end: window_start + MINUTE,
        revision,
        value,
        previous_value,
        event_count: 1,
        provider_cost: Decimal::ZERO,
        previous_provider_cost: Decimal::ZERO,
        source_partition,
        seq,
        emitted_at: window_start + MINUTE,
        uncosted_value: None,
        previous_uncosted_value: None,
    }
}

fn charged(o: RateOutcome) -> Vec<Charge> {
    match o {
        RateOutcome::Charged(c) => c,
        other => panic!("expected Charged, got {other:?}"),
    }
}

fn sum(charges: &[Charge], kind: &str) -> Decimal {
    charges.iter().filter(|c| c.kind == kind).map(|c| c.amount).sum()
}

/// One plan "p" (default plan) with one price of meter "m".
fn single_price_catalog(price_body: &str, minimum: &str) -> Catalog {
    let text = format!(
        "default_plan = \"p\"\n[[plan]]\nid = \"p\"\ncurrency = \"USD\"\nminimum_commitment = \"{minimum}\"\n[[plan.price]]\nmeter = \"m\"\n{price_body}\n"
    );
    Catalog::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn price_of(c: &Catalog, q: &str) -> Decimal {
    c.plan("p").unwrap().price("m").unwrap().price(d(q)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Price models with hand-computed numbers
// ---------------------------------------------------------------------------------------------

#[test]
fn per_unit_and_free_allowance() {
    let c = single_price_catalog("model = \"per_unit\"\nunit_price = \"0.01\"", "0");
    assert_eq!(price_of(&c, "1234"), d("12.34"));
    assert_eq!(price_of(&c, "0"), d("0"));
    assert_eq!(price_of(&c, "-5"), d("0"));
    let c = single_price_catalog("model = \"per_unit\"\nunit_price = \"0.01\"\nfree_units = \"1000\"", "0");
    assert_eq!(price_of(&c, "999"), d("0"));
    assert_eq!(price_of(&c, "1000"), d("0"));
    assert_eq!(price_of(&c, "1234"), d("2.34"));
}

const TIERS: &str = "tiers = [\n { up_to = \"1000\", unit_price = \"0.01\" },\n { up_to = \"5000\", unit_price = \"0.008\" },\n { unit_price = \"0.005\" },\n]";

#[test]
fn graduated_tiers() {
    let c = single_price_catalog(&format!("model = \"graduated\"\n{TIERS}"), "0");
    assert_eq!(price_of(&c, "500"), d("5"));
    assert_eq!(price_of(&c, "1000"), d("10"));
    // 1000 * 0.01 + 2000 * 0.008
    assert_eq!(price_of(&c, "3000"), d("26"));
    // 1000 * 0.01 + 4000 * 0.008 + 2000 * 0.005
    assert_eq!(price_of(&c, "7000"), d("52"));
    // With 1000 free the same tiers apply to the remaining units: 2000 billable.
    let c = single_price_catalog(&format!("model = \"graduated\"\nfree_units = \"1000\"\n{TIERS}"), "0");
    assert_eq!(price_of(&c, "3000"), d("18"));
    // A tier's flat fee is due as soon as one unit falls in it.
    let c = single_price_catalog(
        "model = \"graduated\"\ntiers = [ { up_to = \"1000\", unit_price = \"0.01\", flat_fee = \"2\" }, { unit_price = \"0.008\", flat_fee = \"5\" } ]",
        "0",
    );
    assert_eq!(price_of(&c, "1"), d("2.01"));
    assert_eq!(price_of(&c, "1000"), d("12"));
    assert_eq!(price_of(&c, "1000.5"), d("17.004"));
}

#[test]
fn volume_tiers() {
    let c = single_price_catalog(&format!("model = \"volume\"\n{TIERS}"), "0");
    assert_eq!(price_of(&c, "1000"), d("10")); // up_to is inclusive
    assert_eq!(price_of(&c, "1001"), d("8.008"));
    assert_eq!(price_of(&c, "3000"), d("24"));
    assert_eq!(price_of(&c, "7000"), d("35"));
    let c = single_price_catalog(&format!("model = \"volume\"\nfree_units = \"2000\"\n{TIERS}"), "0");
    assert_eq!(price_of(&c, "3000"), d("10"));
}

#[test]
fn package_rounds_up() {
    let c = single_price_catalog("model = \"package\"\npackage_size = \"1000\"\npackage_price = \"0.5\"", "0");
    assert_eq!(price_of(&c, "1"), d("0.5"));
    assert_eq!(price_of(&c, "1000"), d("0.5"));
    assert_eq!(price_of(&c, "2500"), d("1.5"));
    let c = single_price_catalog("model = \"package\"\nfree_units = \"100\"\npackage_size = \"1000\"\npackage_price = \"0.5\"", "0");
    assert_eq!(price_of(&c, "100"), d("0"));
    assert_eq!(price_of(&c, "1100"), d("0.5"));
    assert_eq!(price_of(&c, "1100.001"), d("1"));
}

#[test]
fn twelve_digit_prices_round_half_even_once() {
    let c = single_price_catalog("model = \"per_unit\"\nunit_price = \"0.000000000001\"", "0");
    let p = c.plan("p").unwrap().price("m").unwrap();
    assert_eq!(p.exact_price(d("500")).unwrap(), d("0.0000000005"));
    assert_eq!(price_of(&c, "500"), d("0")); // tie -> even (0)
    assert_eq!(price_of(&c, "1500"), d("0.000000002")); // tie -> even (2)
    assert_eq!(price_of(&c, "2500"), d("0.000000002"));
    // 1000 charges of 1 unit each: every single charge rounds to zero or one nano, but the
    // charges telescope to the rounded price of the total.
    let mut state = RatingState::new(0, RatingConfig::default());
    let mut total = Decimal::ZERO;
    for i in 0..2500 {
        let a = agg("t", "m", &[], nov() + i * MINUTE, 0, d("1"), d("0"), 0, i);
        total += sum(&charged(state.rate(&c, &a).unwrap()), KIND_USAGE);
    }
    assert_eq!(total, d("0.000000002"));
}

// ---------------------------------------------------------------------------------------------
// Catalog validation
// ---------------------------------------------------------------------------------------------

#[test]
fn catalog_errors_name_plan_price_and_field() {
    let base = "[[plan]]\nid = \"gold\"\ncurrency = \"USD\"\n";
    let cases: &[(&str, &str, &str, &str)] = &[
        ("[[plan.price]]\nmeter = \"m\"\nmodel = \"per_unit\"\nunit_price = 0.01", "gold", "m", "unit_price"),
        ("[[plan.price]]\nmeter = \"m\"\nmodel = \"per_unit\"\nunit_price = \"0.0000000000001\"", "gold", "m", "unit_price"),
        ("[[plan.price]]\nmeter = \"m\"\nmodel = \"per_unit\"\nunit_price = \"-1\"", "gold", "m", "unit_price"),
        ("[[plan.price]]\nmeter = \"m\"\nmodel = \"per_unit\"\nunit_price = \"1\"\ncolour = \"red\"", "gold", "m", "colour"),
        ("[[plan.price]]\nmeter = \"m\"\nmodel = \"per_unit\"", "gold", "m", "unit_price"),
        ("[[plan.price]]\nmeter = \"m\"\nmodel = \"median\"", "gold", "m", "model"),
        ("[[plan.price]]\nmeter = \"m\"\nmodel = \"per_unit\"\nunit_price = \"1\"\npackage_size = \"10\"", "gold", "m", "package_size"),
        ("[[plan.price]]\nmeter = \"m\"\nmodel = \"package\"\npackage_size = \"0\"\npackage_price = \"1\"", "gold", "m", "package_size"),
        ("[[plan.price]]\nmeter = \"m\"\nmodel = \"graduated\"\ntiers = [ { up_to = \"10\", unit_price = \"1\" } ]", "gold", "m", "tiers[0].up_to"),
        (
            "[[plan.price]]\nmeter = \"m\"\nmodel = \"volume\"\ntiers = [ { up_to = \"10\", unit_price = \"1\" }, { up_to = \"5\", unit_price = \"1\" }, { unit_price = \"1\" } ]",
            "gold",
            "m",
            "tiers[1].up_to",
        ),
        ("[[plan.price]]\nmeter = \"m\"\nmodel = \"volume\"\ntiers = [ { unit_price = \"1\", flat = \"1\" } ]", "gold", "m", "tiers[0].flat"),
        ("[[plan.price]]\nmeter = \"m\"\nmodel = \"graduated\"\ntiers = []", "gold", "m", "tiers"),
        (
            "[[plan.price]]\nmeter = \"m\"\nmodel = \"per_unit\"\nunit_price = \"1\"\n[[plan.price]]\nmeter = \"m\"\nmodel = \"per_unit\"\nunit_price = \"2\"",
            "gold",
            "m",
            "name",
        ),
        (
            "[[plan.price]]\nmeter = \"m\"\nname = \"a\"\nmatch = { model = \"x\" }\nmodel = \"per_unit\"\nunit_price = \"1\"\n[[plan.price]]\nmeter = \"m\"\nname = \"b\"\nmatch = { region = \"eu\" }\nmodel = \"per_unit\"\nunit_price = \"2\"",
            "gold",
            "b",
            "match",
        ),
        ("minimum_commitment = \"1.0000000001\"", "gold", "", "minimum_commitment"),
        ("billing_period = \"week\"", "gold", "", "billing_period"),
        ("tier = 1", "gold", "", "tier"),
    ];
    for (extra, plan, price, field) in cases {
        // Plan-level keys must come before the [[plan.price]] tables.
        let text = if extra.starts_with("[[") { format!("{base}{extra}") } else { format!("{base}{extra}\n") };
        match Catalog::from_toml_str(&text) {
            Err(Error::InvalidCatalog { plan: p, price: pr, field: f, reason }) => {
                assert_eq!((p.as_str(), pr.as_str(), f.as_str()), (*plan, *price, *field), "{text}\nreason: {reason}");
            }
            other => panic!("expected InvalidCatalog for {field}, got {other:?}\n{text}"),
        }
    }
    let others: &[(&str, &str, &str)] = &[
        ("[[plan]]\nid = \"gold\"\ncurrency = \"usd\"", "gold", "currency"),
        ("[[plan]]\nid = \"gold\"\ncurrency = \"USD\"\n[[plan]]\nid = \"gold\"\ncurrency = \"USD\"", "gold", "id"),
        ("default_plan = \"silver\"\n[[plan]]\nid = \"gold\"\ncurrency = \"USD\"", "silver", "default_plan"),
        ("[[plan]]\nid = \"gold\"\ncurrency = \"USD\"\n[[assignment]]\ntenant = \"t\"\nplan = \"gold\"\nfrom = \"2026-02-30T00:00:00Z\"", "gold", "assignment[0].from"),
        ("[[assignment]]\ntenant = \"t\"\nplan = \"nope\"\nfrom = \"2026-01-01T00:00:00Z\"", "nope", "assignment[0].plan"),
        ("[[cost]]\nmeter = \"m\"\nper_unit = \"1\"\nper_million = \"1\"", "", "cost[0].per_unit"),
        ("[[cost]]\nmeter = \"m\"\ndimension = \"model\"\nper_unit = \"1\"", "", "cost[0].value"),
        (
            "[[cost]]\nmeter = \"m\"\ndimension = \"model\"\nvalue = \"a\"\nper_unit = \"1\"\n[[cost]]\nmeter = \"m\"\ndimension = \"gpu\"\nvalue = \"b\"\nper_unit = \"1\"",
            "",
            "cost[1].dimension",
        ),
        ("[[plan]]\nid = \"gold\"\ncurrency = \"USD\"\nunknown = 1", "gold", "unknown"),
    ];
    for (text, plan, field) in others {
        match Catalog::from_toml_str(text) {
            Err(Error::InvalidCatalog { plan: p, field: f, reason, .. }) => {
                assert_eq!((p.as_str(), f.as_str()), (*plan, *field), "{text}\nreason: {reason}");
            }
            other => panic!("expected InvalidCatalog for {field}, got {other:?}\n{text}"),
        }
    }
    assert!(matches!(Catalog::from_toml_str("colour = 1"), Err(Error::InvalidCatalog { field, .. }) if field == "colour"));
    match Catalog::from_toml_str("[[plan]]\nid = \"p\"\ncurrency = \"USD\"\nminimum_commitment = = 1") {
        Err(Error::InvalidCatalog { reason, .. }) => assert!(reason.contains("line 4"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

fn demo_catalog() -> Catalog {
    let c = Catalog::from_toml_str(include_str!("../../../config/catalog.toml")).unwrap();
    let meters = MeterCatalog::from_toml_str(include_str!("../../../config/meters.toml")).unwrap();
    c.validate_meters(&meters).unwrap();
    c
}

#[test]
fn demo_catalog_loads_and_matches_meters() {
    let c = demo_catalog();
    assert_eq!(c.plans().count(), 3);
    assert!(c.plans().all(|p| p.currency == "USD"));
    assert_eq!(c.default_plan().unwrap().id, "starter");
    assert_eq!(c.plan("enterprise").unwrap().minimum_commitment, d("5000"));
    for i in 0..10 {
        assert!(!c.assignments(&format!("tenant-{i:03}")).is_empty());
    }
    assert_eq!(c.plan_for("tenant-001", ts("2026-11-14T23:59:00Z")).unwrap().id, "starter");
    assert_eq!(c.plan_for("tenant-001", ts("2026-11-15T00:00:00Z")).unwrap().id, "growth");
    assert_eq!(c.plan_for("tenant-042", ts("2026-11-15T00:00:00Z")).unwrap().id, "starter");
    let dims = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
    assert_eq!(c.unit_cost("input_tokens", &dims(&[("model", "gpt-4o"), ("region", "eu")])), Some(d("0.0000025")));
    assert_eq!(c.unit_cost("gpu_seconds", &dims(&[("model", "llama-70b"), ("gpu", "h100")])), Some(d("0.001")));
    assert_eq!(c.unit_cost("requests", &dims(&[("model", "gpt-4o")])), None);
    for plan in c.plans() {
        for model in ["gpt-4o", "gpt-4o-mini", "claude-sonnet", "llama-70b", "embed-small"] {
            for meter in ["input_tokens", "output_tokens"] {
                assert!(plan.price_for(meter, &dims(&[("model", model), ("region", "us")])).is_some(), "{} {meter} {model}", plan.id);
            }
            assert!(plan.price_for("requests", &dims(&[("model", model)])).is_some());
        }
        for gpu in ["a100", "h100", "l4"] {
            assert!(plan.price_for("gpu_seconds", &dims(&[("model", "llama-70b"), ("gpu", gpu)])).is_some());
        }
    }
}

#[test]
fn validate_meters_rejects_unknown_meters_and_dimensions() {
    let meters = MeterCatalog::from_toml_str(include_str!("../../../config/meters.toml")).unwrap();
    let c = Catalog::from_toml_str("[[plan]]\nid = \"p\"\ncurrency = \"USD\"\n[[plan.price]]\nmeter = \"tokens\"\nmodel = \"per_unit\"\nunit_price = \"1\"").unwrap();
    assert!(matches!(c.validate_meters(&meters), Err(Error::InvalidCatalog { field, .. }) if field == "meter"));
    let c = Catalog::from_toml_str("[[plan]]\nid = \"p\"\ncurrency = \"USD\"\n[[plan.price]]\nmeter = \"requests\"\nmatch = { region = \"eu\" }\nmodel = \"per_unit\"\nunit_price = \"1\"").unwrap();
    assert!(matches!(c.validate_meters(&meters), Err(Error::InvalidCatalog { field, .. }) if field == "match.region"));
}

// ---------------------------------------------------------------------------------------------
// Rating examples
// ---------------------------------------------------------------------------------------------

#[test]
fn mid_period_plan_change_rates_each_segment_on_its_plan() {
    let c = demo_catalog();
    let gpt = [("model", "gpt-4o"), ("region", "us")];
    let mut s = RatingState::new(0, RatingConfig::default());
    // Starter (before Nov 15): 100k free, then 0.000003 per token.
    let a1 = agg("tenant-001", "input_tokens", &gpt, ts("2026-11-10T12:00:00Z"), 0, d("150000"), d("0"), 0, 1);
    let c1 = charged(s.rate(&c, &a1).unwrap());
    assert_eq!((c1[0].plan.as_str(), c1[0].amount), ("starter", d("0.15")));
    assert_eq!(c1[0].provider_cost, d("0.375"));
    assert_eq!(c1[0].margin, d("-0.225"));
    // Growth (from Nov 15): graduated, first 10M at 0.000003, next at 0.0000027; its own
    // cumulative quantity starts at zero and no free allowance.
    let a2 = agg("tenant-001", "input_tokens", &gpt, ts("2026-11-15T00:00:00Z"), 0, d("9950000"), d("0"), 0, 2);
    let c2 = charged(s.rate(&c, &a2).unwrap());
    assert_eq!((c2[0].plan.as_str(), c2[0].amount), ("growth", d("29.85")));
    let a3 = agg("tenant-001", "input_tokens", &gpt, ts("2026-11-20T00:00:00Z"), 0, d("100000"), d("0"), 0, 3);
    let c3 = charged(s.rate(&c, &a3).unwrap());
    // 50k at 0.000003 + 50k at 0.0000027
    assert_eq!(c3[0].amount, d("0.285"));
    // A late restatement of the starter window stays on starter (its window start decides).
    let a4 = agg("tenant-001", "input_tokens", &gpt, ts("2026-11-10T12:00:00Z"), 1, d("160000"), d("150000"), 1, 1);
    let c4 = charged(s.rate(&c, &a4).unwrap());
    assert_eq!((c4[0].plan.as_str(), c4[0].amount, c4[0].quantity), ("starter", d("0.03"), d("10000")));
    assert_eq!(s.cumulative("tenant-001", nov(), "starter", "input_tokens.gpt-4o"), d("160000"));
    assert_eq!(s.cumulative("tenant-001", nov(), "growth", "input_tokens.gpt-4o"), d("10050000"));
    assert_eq!(s.period_revenue("tenant-001", nov(), "USD"), d("30.315"));
    // Seqs are per output, ids are distinct.
    let all: Vec<Charge> = [c1, c2, c3, c4].concat();
    assert_eq!(all.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(all.iter().map(|c| &c.charge_id).collect::<BTreeSet<_>>().len(), 4);
}

#[test]
fn replays_are_skipped_and_unpriced_rejected() {
    let c = demo_catalog();
    let mut s = RatingState::new(3, RatingConfig::default());
    let a = agg("tenant-002", "requests", &[("model", "gpt-4o")], nov(), 0, d("10"), d("0"), 5, 7);
    assert!(matches!(s.rate(&c, &a).unwrap(), RateOutcome::Charged(_)));
    assert_eq!(s.rate(&c, &a).unwrap(), RateOutcome::Skipped { source_partition: 5, seq: 7, high_water: 7 });
    let older = MeterAggregate { seq: 6, ..a.clone() };
    assert!(matches!(s.rate(&c, &older).unwrap(), RateOutcome::Skipped { .. }));
    // Other source partitions have their own sequence.
    let other = MeterAggregate { source_partition: 4, seq: 1, ..a.clone() };
    assert!(matches!(s.rate(&c, &other).unwrap(), RateOutcome::Charged(_)));
    // No price for an unknown model: parked (not charged), and its seq counts as consumed.
    let unknown = agg("tenant-002", "input_tokens", &[("model", "gpt-9")], nov(), 0, d("10"), d("0"), 5, 8);
    assert!(matches!(
        s.rate(&c, &unknown).unwrap(),
        RateOutcome::Parked { reason: ParkReason::Unpriced, error: Error::Unrateable { .. } }
    ));
    assert!(s.is_parked(5, 8));
    assert!(matches!(s.rate(&c, &unknown).unwrap(), RateOutcome::Skipped { .. }));
    // Without a default plan an unassigned tenant cannot be priced: parked too.
    let no_default = Catalog::from_toml_str("[[plan]]\nid = \"p\"\ncurrency = \"USD\"\n[[plan.price]]\nmeter = \"m\"\nmodel = \"per_unit\"\nunit_price = \"1\"").unwrap();
    let x = agg("nobody", "m", &[], nov(), 0, d("1"), d("0"), 0, 1);
    match s.rate(&no_default, &x).unwrap() {
        RateOutcome::Parked { reason: ParkReason::Unpriced, error: e @ Error::Unrateable { .. } } => {
            assert!(e.to_string().contains("no plan"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.parked_count(), 2);
}

#[test]
fn carried_provider_cost_wins_per_revision() {
    let c = demo_catalog();
    let mut s = RatingState::new(0, RatingConfig::default());
    let dims = [("model", "gpt-4o"), ("region", "us")];
    // Revision 0 carries no cost: catalog rate 2.50 per million.
    let r0 = agg("tenant-002", "input_tokens", &dims, nov(), 0, d("1000000"), d("0"), 0, 1);
    assert_eq!(charged(s.rate(&c, &r0).unwrap())[0].provider_cost, d("2.5"));
    // Revision 1 carries 2.7: the window's cost becomes 2.7, so the delta is 0.2.
    let r1 = MeterAggregate { revision: 1, value: d("1100000"), previous_value: d("1000000"), provider_cost: d("2.7"), seq: 2, ..r0.clone() };
    let ch = charged(s.rate(&c, &r1).unwrap());
    assert_eq!(ch[0].provider_cost, d("0.2"));
    assert_eq!(ch[0].amount, d("0.3"));
    assert_eq!(ch[0].margin, d("0.1"));
    assert_eq!(pricing::margin_percent(ch[0].amount, ch[0].margin), Some(d("33.33")));
}

#[test]
fn minimum_commitment_true_up_and_adjustment() {
    let c = demo_catalog();
    let mut s = RatingState::new(0, RatingConfig { grace_ms: 3_600_000, retention_ms: 62 * 86_400_000 });
    let dims = [("model", "gpt-4o"), ("region", "us")];
    // tenant-000 is enterprise: volume, first tier 2.7 per million input tokens.
    let a = agg("tenant-000", "input_tokens", &dims, ts("2026-11-03T00:00:00Z"), 0, d("100000000"), d("0"), 0, 1);
    assert_eq!(charged(s.rate(&c, &a).unwrap())[0].amount, d("270"));
    // Not yet closed: still within grace.
    assert!(s.advance(&c, ts("2026-12-01T00:30:00Z")).is_empty());
    let t = s.advance(&c, ts("2026-12-01T01:00:00Z"));
    assert_eq!(t.len(), 1);
    assert_eq!((t[0].kind.as_str(), t[0].plan.as_str(), t[0].amount, t[0].revision), (KIND_TRUE_UP, "enterprise", d("4730"), 0));
    assert_eq!(t[0].period_start, nov());
    // Idempotent.
    assert!(s.advance(&c, ts("2026-12-02T00:00:00Z")).is_empty());
    // A late restatement raises usage by 0.5M tokens at... volume: 100.5M total falls in tier 2
    // (0.0000024): 241.2 in total, so the usage charge is -28.8 and the true-up rises by 28.8.
    let r = MeterAggregate { revision: 1, value: d("100500000"), previous_value: d("100000000"), seq: 2, ..a.clone() };
    let out = charged(s.rate(&c, &r).unwrap());
    assert_eq!(out.len(), 2);
    assert_eq!((out[0].kind.as_str(), out[0].amount), (KIND_USAGE, d("-28.8")));
    assert_eq!((out[1].kind.as_str(), out[1].amount, out[1].revision), (KIND_TRUE_UP, d("28.8"), 1));
    assert_ne!(out[1].charge_id, t[0].charge_id);
    assert_eq!(s.period_revenue("tenant-000", nov(), "USD") + s.true_up_total("tenant-000", nov(), "USD"), d("5000"));
    // December had no usage: the whole minimum is owed when it closes.
    let dec = s.advance(&c, ts("2027-01-01T01:00:00Z"));
    assert_eq!(dec.len(), 1);
    assert_eq!((dec[0].amount, dec[0].period_start), (d("5000"), ts("2026-12-01T00:00:00Z")));
    // Explicit close of a tenant never seen.
    let x = s.on_period_close(&c, "tenant-009", ts("2026-12-01T00:00:00Z"));
    assert_eq!(x.len(), 1);
    assert_eq!(x[0].amount, d("5000"));
    assert!(s.on_period_close(&c, "tenant-009", ts("2026-12-01T00:00:00Z")).is_empty());
}

#[test]
fn commitment_is_prorated_across_plan_changes() {
    let text = "[[plan]]\nid = \"small\"\ncurrency = \"USD\"\n[[plan]]\nid = \"big\"\ncurrency = \"USD\"\nminimum_commitment = \"3000\"\n\
        [[assignment]]\ntenant = \"t\"\nplan = \"small\"\nfrom = \"2026-01-01T00:00:00Z\"\n\
        [[assignment]]\ntenant = \"t\"\nplan = \"big\"\nfrom = \"2026-11-21T00:00:00Z\"\n";
    let c = Catalog::from_toml_str(text).unwrap();
    // 10 of November's 30 days on big.
    let m = c.commitments("t", nov());
    assert_eq!(m["USD"].amount, d("1000"));
    assert_eq!(m["USD"].plan, "big");
    assert_eq!(c.commitments("t", ts("2026-12-01T00:00:00Z"))["USD"].amount, d("3000"));
    assert!(c.commitments("t", ts("2026-10-01T00:00:00Z")).is_empty());
}

#[test]
fn finalized_periods_are_rejected() {
    let c = single_price_catalog("model = \"per_unit\"\nunit_price = \"1\"", "0");
    let mut s = RatingState::new(0, RatingConfig { grace_ms: 0, retention_ms: 86_400_000 });
    let a = agg("t", "m", &[], nov(), 0, d("1"), d("0"), 0, 1);
    charged(s.rate(&c, &a).unwrap());
    s.advance(&c, ts("2027-01-05T00:00:00Z"));
    let late = MeterAggregate { revision: 1, value: d("2"), previous_value: d("1"), seq: 2, ..a };
    assert!(matches!(s.rate(&c, &late).unwrap(), RateOutcome::Rejected(Error::Unrateable { .. })));
}

#[test]
fn absurd_times_do_not_overflow() {
    let c = single_price_catalog("model = \"per_unit\"\nunit_price = \"1\"", "100");
    let mut s = RatingState::new(0, RatingConfig::default());
    for (seq, w) in [i64::MIN, -1, i64::MAX - MINUTE, pricing::MAX_TIME_MS].into_iter().enumerate() {
        let a = MeterAggregate { window_end: w.saturating_add(MINUTE), ..agg("t", "m", &[], w, 0, d("1"), d("0"), 0, seq as i64) };
        assert!(matches!(s.rate(&c, &a).unwrap(), RateOutcome::Rejected(Error::Unrateable { .. })), "{w}");
    }
    assert!(s.advance(&c, i64::MIN).is_empty());
    charged(s.rate(&c, &agg("t", "m", &[], ts("9999-12-31T00:00:00Z"), 0, d("1"), d("0"), 1, 1)).unwrap());
    assert!(s.on_period_close(&c, "t", i64::MAX).is_empty());
    s.advance(&c, i64::MAX);
    assert_eq!(s.watermark(), Some(pricing::MAX_TIME_MS));
}

#[test]
fn states_serialize_exactly() {
    let c = single_price_catalog("model = \"per_unit\"\nunit_price = \"0.000000000001\"", "0");
    let mut s = RatingState::new(1, RatingConfig::default());
    charged(s.rate(&c, &agg("t", "m", &[], nov(), 0, d("1500"), d("0"), 0, 1)).unwrap());
    assert_eq!(round_trip(&s), s);
    // Decimals are strings in checkpoints: exact, whatever their scale.
    let b = bytes(&s);
    assert!(b.windows(11).any(|w| w == b"0.000000002"), "{b:?}");
    // (Versions and refusals are the partition's: tests/rater_props.rs.)
}

// ---------------------------------------------------------------------------------------------
// Wallet examples
// ---------------------------------------------------------------------------------------------

fn adj(key: &str, amount: &str) -> WalletAdjustment {
    WalletAdjustment {
        idempotency_key: key.into(),
        tenant: "t".into(),
        currency: "USD".into(),
        amount: d(amount),
        kind: "top_up".into(),
        reason: "test".into(),
        created_at: 0,
        expires_at: None,
        priority: 0,
    }
}

fn charge(id: &str, amount: &str) -> Charge {
    Charge {
        charge_id: id.into(),
        kind: KIND_USAGE.into(),
        tenant: "t".into(),
        plan: "p".into(),
        currency: "USD".into(),
        meter: "m".into(),
        dimensions: BTreeMap::new(),
        period_start: 0,
        window_start: 0,
        window_end: MINUTE,
        revision: 0,
        quantity: Decimal::ONE,
        amount: d(amount),
        provider_cost: Decimal::ZERO,
        margin: d(amount),
        seq: 0,
    }
}

#[test]
fn wallets_dedupe_and_alert_on_edges() {
    let cfg = WalletConfig { low_balance: [("USD".to_string(), d("10"))].into(), ..Default::default() };
    let mut w = Wallets::new(cfg);
    assert!(matches!(w.apply_adjustment(&adj("pay_1", "25")).unwrap(), AdjustmentOutcome::Applied { balance, .. } if balance == d("25")));
    assert_eq!(
        w.apply_adjustment(&adj("pay_1", "25")).unwrap(),
        AdjustmentOutcome::Duplicate { idempotency_key: "pay_1".into(), conflicting: false }
    );
    assert_eq!(
        w.apply_adjustment(&adj("pay_1", "30")).unwrap(),
        AdjustmentOutcome::Duplicate { idempotency_key: "pay_1".into(), conflicting: true }
    );
    assert!(w.apply_charge(&charge("c1", "10")).is_empty()); // 15
    let a = w.apply_charge(&charge("c2", "5")); // 10: crosses low_balance
    assert_eq!(a.len(), 1);
    assert_eq!((a[0].kind.as_str(), a[0].balance, a[0].threshold), (ALERT_LOW_BALANCE, d("10"), d("10")));
    assert!(w.apply_charge(&charge("c3", "1")).is_empty()); // 9: still low, no repeat
    let a = w.apply_charge(&charge("c4", "12")); // -3: exhausted
    assert_eq!(a.iter().map(|x| x.kind.as_str()).collect::<Vec<_>>(), vec![ALERT_EXHAUSTED]);
    // Re-armed by a top-up above both thresholds; one charge then crosses both.
    w.apply_adjustment(&adj("pay_2", "20")).unwrap(); // 17
    let a = w.apply_charge(&charge("c5", "17.5")); // -0.5
    assert_eq!(a.iter().map(|x| x.kind.as_str()).collect::<Vec<_>>(), vec![ALERT_LOW_BALANCE, ALERT_EXHAUSTED]);
    assert_ne!(a[0].alert_id, a[1].alert_id);
    assert_eq!(w.balance("t", "USD"), d("-0.5"));
    assert_eq!(w.duplicates(), 2);
    // A tenant that never had a balance raises no alerts when charged.
    let mut other = charge("c6", "3");
    other.tenant = "postpaid".into();
    assert!(w.apply_charge(&other).is_empty());
    assert_eq!(round_trip(&w), w);
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// A decimal below `max` with exactly `scale` fractional digits (before normalizing).
fn fixed(max: i64, scale: u32) -> impl Strategy<Value = Decimal> {
    (0..max * 10i64.pow(scale)).prop_map(move |m| Decimal::new(m, scale).normalize())
}

/// A decimal below `max` with 0..=`max_scale` fractional digits: short values hit tier
/// boundaries and rounding ties, long ones exercise the 12-digit prices.
fn dec(max: i64, max_scale: u32) -> impl Strategy<Value = Decimal> {
    (0..=max_scale).prop_flat_map(move |s| fixed(max, s))
}

fn price_str(p: Decimal) -> String {
    p.normalize().to_string()
}

/// A price model (TOML body of a `[[plan.price]]`), any model, with or without a free
/// allowance.
fn price_body() -> impl Strategy<Value = String> {
    let free = prop_oneof![Just(None), dec(5_000, 3).prop_map(Some)];
    let tiers = (prop::collection::vec((dec(3_000, 2), dec(10, 12), dec(30, 1)), 1..4), any::<bool>());
    let model = prop_oneof![
        dec(10, 12).prop_map(|p| format!("model = \"per_unit\"\nunit_price = \"{}\"", price_str(p))),
        tiers.prop_map(|(tiers, graduated)| {
            let mut bound = Decimal::ZERO;
            let n = tiers.len();
            let parts: Vec<String> = tiers
                .into_iter()
                .enumerate()
                .map(|(i, (step, unit, flat))| {
                    bound += step + Decimal::ONE;
                    let up = if i + 1 == n { String::new() } else { format!("up_to = \"{}\", ", price_str(bound)) };
                    format!("{{ {up}unit_price = \"{}\", flat_fee = \"{}\" }}", price_str(unit), price_str(flat))
                })
                .collect();
            format!("model = \"{}\"\ntiers = [ {} ]", if graduated { "graduated" } else { "volume" }, parts.join(", "))
        }),
        (dec(50, 3), dec(100, 12)).prop_map(|(size, price)| format!(
            "model = \"package\"\npackage_size = \"{}\"\npackage_price = \"{}\"",
            price_str(size + Decimal::new(1, 3)),
            price_str(price)
        )),
    ];
    (model, free).prop_map(|(m, f)| match f {
        Some(f) => format!("{m}\nfree_units = \"{}\"", price_str(f)),
        None => m,
    })
}

/// Windows of one month, each with 1..4 revisions of its value (up to 9 fractional digits).
fn windows() -> impl Strategy<Value = Vec<(i64, Vec<Decimal>)>> {
    let value = prop_oneof![fixed(3_000, 0), dec(3_000, 9), fixed(2, 9)];
    prop::collection::vec((0..43_000i64, prop::collection::vec(value, 1..4)), 1..12).prop_map(|ws| {
        // Distinct window starts.
        let mut seen = BTreeSet::new();
        ws.into_iter().filter(|(w, _)| seen.insert(*w)).collect()
    })
}

/// One delivery: (index into the aggregate list) — replays repeat an earlier index.
#[derive(Debug, Clone)]
struct Stream {
    aggs: Vec<MeterAggregate>,
    /// Delivery order as indices into `aggs`; an index may appear again later (a replay).
    deliveries: Vec<usize>,
    /// Sum of each window's last revision.
    total: Decimal,
}

/// Any split (windows and revisions), any arrival order (a permutation of all revisions,
/// interleaving source partitions), seqs increasing per source partition in arrival order
/// with gaps, and replays of already delivered aggregates.
fn stream(tenant: &'static str, meter: &'static str, ws: Vec<(i64, Vec<Decimal>)>) -> impl Strategy<Value = Stream> {
    let mut revs = Vec::new();
    let mut total = Decimal::ZERO;
    for (w, values) in &ws {
        let mut prev = Decimal::ZERO;
        for (r, v) in values.iter().enumerate() {
            revs.push((*w, r as i32, *v, prev));
            prev = *v;
        }
        total += prev;
    }
    let n = revs.len();
    (
        Just(revs).prop_shuffle(),
        prop::collection::vec((0..3i32, 1..4i64), n),
        prop::collection::vec((0..=n, any::<prop::sample::Index>()), 0..6),
    )
        .prop_map(move |(revs, sp_gaps, replays)| {
            let mut next: BTreeMap<i32, i64> = BTreeMap::new();
            let aggs: Vec<MeterAggregate> = revs
                .iter()
                .zip(&sp_gaps)
                .map(|(&(w, r, v, p), &(sp, gap))| {
                    let seq = *next.entry(sp).and_modify(|s| *s += gap).or_insert(gap);
                    agg(tenant, meter, &[], nov() + w * MINUTE, r, v, p, sp, seq)
                })
                .collect();
            let mut deliveries = Vec::new();
            for i in 0..=aggs.len() {
                for (at, pick) in &replays {
                    if *at == i && i > 0 {
                        deliveries.push(pick.index(i));
                    }
                }
                if i < aggs.len() {
                    deliveries.push(i);
                }
            }
            Stream { aggs, deliveries, total }
        })
}

fn price_and_stream() -> impl Strategy<Value = (String, Stream)> {
    (price_body(), windows()).prop_flat_map(|(body, ws)| (Just(body), stream("t", "m", ws)))
}

fn run(state: &mut RatingState, catalog: &Catalog, s: &Stream, range: std::ops::Range<usize>) -> (Vec<Charge>, usize) {
    let mut out = Vec::new();
    let mut skipped = 0;
    for &i in &s.deliveries[range] {
        match state.rate(catalog, &s.aggs[i]).unwrap() {
            RateOutcome::Charged(c) => out.extend(c),
            RateOutcome::Skipped { .. } => skipped += 1,
            RateOutcome::Rejected(e) => panic!("rejected: {e}"),
            RateOutcome::Parked { error, .. } => panic!("parked: {error}"),
        }
    }
    (out, skipped)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Charges of any split, order, restatement and replay sum to the rounded price of the
    /// total quantity, exactly; replays add nothing.
    #[test]
    fn charges_sum_to_price_of_total((body, s) in price_and_stream()) {
        let c = single_price_catalog(&body, "0");
        let price = c.plan("p").unwrap().price("m").unwrap().clone();
        let mut state = RatingState::new(0, RatingConfig::default());
        let (charges, skipped) = run(&mut state, &c, &s, 0..s.deliveries.len());
        prop_assert_eq!(charges.len(), s.aggs.len());
        prop_assert_eq!(skipped, s.deliveries.len() - s.aggs.len());
        let total: Decimal = charges.iter().map(|c| c.amount).sum();
        let expected = price.price(s.total).unwrap();
        prop_assert_eq!(total, expected, "body:\n{}\ntotal quantity {}", body, s.total);
        prop_assert!(charges.iter().all(|c| c.amount.scale() <= 9));
        let quantity: Decimal = charges.iter().map(|c| c.quantity).sum();
        prop_assert_eq!(quantity, s.total);
        prop_assert_eq!(state.cumulative("t", nov(), "p", "m"), s.total);
        let ids: BTreeSet<&String> = charges.iter().map(|c| &c.charge_id).collect();
        prop_assert_eq!(ids.len(), charges.len());
        // A full replay of everything changes nothing.
        let before = bytes(&state);
        let (again, _) = run(&mut state, &c, &s, 0..s.deliveries.len());
        prop_assert!(again.is_empty());
        prop_assert_eq!(bytes(&state), before);
    }

    /// Snapshot -> restore -> continue equals the uninterrupted run (charges, ids, seqs and
    /// final state), including true-ups from watermark advances.
    #[test]
    fn snapshot_restore_continue_equals_uninterrupted(
        (body, s) in price_and_stream(),
        cut in any::<prop::sample::Index>(),
        minimum in dec(10_000, 2),
        advance_at in any::<prop::sample::Index>(),
    ) {
        let c = single_price_catalog(&body, &price_str(minimum));
        let n = s.deliveries.len();
        let cut = cut.index(n + 1);
        let adv = advance_at.index(n + 1);
        let wm = ts("2026-12-01T02:00:00Z");
        let drive = |state: &mut RatingState, range: std::ops::Range<usize>| -> Vec<Charge> {
            let mut out = Vec::new();
            for i in range {
                if i == adv {
                    out.extend(state.advance(&c, wm));
                }
                if i < n {
                    out.extend(run(state, &c, &s, i..i + 1).0);
                }
            }
            out
        };
        let mut straight = RatingState::new(2, RatingConfig::default());
        let all = drive(&mut straight, 0..n + 1);
        let mut first = RatingState::new(2, RatingConfig::default());
        let mut resumed_out = drive(&mut first, 0..cut);
        let mut resumed = round_trip(&first);
        prop_assert_eq!(&resumed, &first);
        resumed_out.extend(drive(&mut resumed, cut..n + 1));
        prop_assert_eq!(&resumed_out, &all);
        prop_assert_eq!(bytes(&resumed), bytes(&straight));
        // Usage plus true-ups equal max(minimum, usage) once the period is closed.
        let usage = sum(&all, KIND_USAGE);
        let true_ups = sum(&all, KIND_TRUE_UP);
        prop_assert_eq!(usage + true_ups, usage.max(minimum));
    }

    /// Whatever arrives before or after the period closes (late windows, restatements), the
    /// true-ups keep `usage + true-ups = max(minimum, usage)` exactly, with revisions 0, 1, 2...
    #[test]
    fn true_ups_stay_exact_across_late_restatements(
        (body, s) in price_and_stream(),
        minimum in dec(100_000, 3),
        close_at in any::<prop::sample::Index>(),
    ) {
        let c = single_price_catalog(&body, &price_str(minimum));
        let n = s.deliveries.len();
        let close_at = close_at.index(n + 1);
        let mut state = RatingState::new(0, RatingConfig::default());
        let mut out = run(&mut state, &c, &s, 0..close_at).0;
        out.extend(state.advance(&c, ts("2026-12-01T01:00:00Z")));
        // A tenant not yet seen has nothing to close; its first (late) aggregate closes it.
        prop_assert_eq!(state.is_closed("t", nov()), close_at > 0);
        out.extend(run(&mut state, &c, &s, close_at..n).0);
        prop_assert!(state.is_closed("t", nov()));
        let usage = sum(&out, KIND_USAGE);
        prop_assert_eq!(usage, c.plan("p").unwrap().price("m").unwrap().price(s.total).unwrap());
        prop_assert_eq!(usage + sum(&out, KIND_TRUE_UP), usage.max(minimum));
        let revisions: Vec<i32> = out.iter().filter(|c| c.kind == KIND_TRUE_UP).map(|c| c.revision).collect();
        prop_assert_eq!(revisions.clone(), (0..revisions.len() as i32).collect::<Vec<_>>());
    }

    /// A mid-period plan change: windows before the change are priced on the old plan, the
    /// rest on the new one, each segment telescoping to its own rounded price, in any order.
    #[test]
    fn plan_change_prices_each_segment(
        (a, b, ws) in (price_body(), price_body(), windows()),
        change_day in 1..29i64,
        order in any::<u64>(),
    ) {
        let text = format!(
            "[[plan]]\nid = \"a\"\ncurrency = \"USD\"\n[[plan.price]]\nmeter = \"m\"\n{a}\n\
             [[plan]]\nid = \"b\"\ncurrency = \"USD\"\n[[plan.price]]\nmeter = \"m\"\n{b}\n\
             [[assignment]]\ntenant = \"t\"\nplan = \"a\"\nfrom = \"2026-10-01T00:00:00Z\"\n\
             [[assignment]]\ntenant = \"t\"\nplan = \"b\"\nfrom = \"2026-11-{:02}T00:00:00Z\"\n",
            change_day + 1
        );
        let c = Catalog::from_toml_str(&text).unwrap();
        let change = nov() + change_day * 86_400_000;
        let (mut qa, mut qb) = (Decimal::ZERO, Decimal::ZERO);
        let mut aggs = Vec::new();
        for (i, (w, values)) in ws.iter().enumerate() {
            let start = nov() + w * MINUTE;
            let last = *values.last().unwrap();
            if start < change { qa += last } else { qb += last }
            let mut prev = Decimal::ZERO;
            for (r, v) in values.iter().enumerate() {
                aggs.push(agg("t", "m", &[], start, r as i32, *v, prev, i as i32, r as i64 + 1));
                prev = *v;
            }
        }
        // A deterministic shuffle that keeps each window's revisions in seq order.
        aggs.sort_by_key(|x| (x.revision, (x.window_start as u64).wrapping_mul(order | 1).rotate_left(17)));
        let mut state = RatingState::new(0, RatingConfig::default());
        let mut charges = Vec::new();
        for x in &aggs {
            charges.extend(charged(state.rate(&c, x).unwrap()));
        }
        let on = |plan: &str| charges.iter().filter(|c| c.plan == plan).map(|c| c.amount).sum::<Decimal>();
        prop_assert_eq!(on("a"), c.plan("a").unwrap().price("m").unwrap().price(qa).unwrap());
        prop_assert_eq!(on("b"), c.plan("b").unwrap().price("m").unwrap().price(qb).unwrap());
    }

    /// Wallet balance = first application of each top-up key - charges, exactly; alerts fire
    /// exactly on downward crossings; snapshot/restore mid-way changes nothing.
    #[test]
    fn wallet_balance_is_deduped_top_ups_minus_charges(
        ops in prop::collection::vec(
            prop_oneof![
                (0..6usize, (-2_000i64..10_000, 0..=3u32)).prop_map(|(k, (m, s))| (Some(k), Decimal::new(m, s))),
                (-500i64..3_000, 0..=2u32).prop_map(|(m, s)| (None, Decimal::new(m, s))),
                (-500_000_000_000i64..3_000_000_000_000).prop_map(|m| (None, Decimal::new(m, 9))),
            ],
            0..60,
        ),
        threshold in dec(5_000, 2),
        cut in any::<prop::sample::Index>(),
    ) {
        let cfg = WalletConfig { low_balance: [("USD".to_string(), threshold)].into(), ..Default::default() };
        let cut = cut.index(ops.len() + 1);
        let mut w = Wallets::new(cfg.clone());
        let mut seen = BTreeMap::new();
        let mut expected = Decimal::ZERO;
        let mut expected_alerts = Vec::new();
        for (i, (key, amount)) in ops.iter().enumerate() {
            if i == cut {
                w = round_trip(&w);
            }
            let before = expected;
            let alerts = match key {
                Some(k) => {
                    let key = format!("pay_{k}");
                    let first = !seen.contains_key(&key);
                    let a = adj(&key, &amount.to_string());
                    match w.apply_adjustment(&a).unwrap() {
                        AdjustmentOutcome::Applied { balance, alerts } => {
                            prop_assert!(first);
                            seen.insert(key, *amount);
                            expected += *amount;
                            prop_assert_eq!(balance, expected);
                            alerts
                        }
                        AdjustmentOutcome::Duplicate { conflicting, .. } => {
                            prop_assert!(!first);
                            prop_assert_eq!(conflicting, seen[&key] != *amount);
                            Vec::new()
                        }
                    }
                }
                None => {
                    expected -= *amount;
                    w.apply_charge(&charge(&format!("c{i}"), &amount.to_string()))
                }
            };
            let after = expected;
            if before > threshold && after <= threshold { expected_alerts.push(ALERT_LOW_BALANCE) }
            if before > Decimal::ZERO && after <= Decimal::ZERO { expected_alerts.push(ALERT_EXHAUSTED) }
            for a in &alerts {
                prop_assert_eq!(a.balance, after);
            }
            let got: Vec<&str> = alerts.iter().map(|a| a.kind.as_str()).collect();
            let want: Vec<&str> = std::mem::take(&mut expected_alerts);
            prop_assert_eq!(got, want);
        }
        prop_assert_eq!(w.balance("t", "USD"), expected);
        let top_ups: Decimal = seen.values().copied().sum();
        let charges: Decimal = ops.iter().filter(|(k, _)| k.is_none()).map(|(_, a)| *a).sum();
        prop_assert_eq!(w.balance("t", "USD"), top_ups - charges);
    }
}
