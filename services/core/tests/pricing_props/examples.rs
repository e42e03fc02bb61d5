//! Price models, catalogs, plan changes and commitments with hand-computed numbers.

use super::*;

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
    let c = Catalog::from_toml_str(include_str!("../../../../config/catalog.toml")).unwrap();
    let meters = MeterCatalog::from_toml_str(include_str!("../../../../config/meters.toml")).unwrap();
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
    let meters = MeterCatalog::from_toml_str(include_str!("../../../../config/meters.toml")).unwrap();
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
