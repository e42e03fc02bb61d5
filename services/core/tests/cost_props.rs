//! Provider cost is exact per event (issue 10, item 5): events run through the real engine
//! (windows, late events and restatements), the aggregates through the real rater, and the
//! sum of the charges' provider cost equals an independent computation over the events:
//! the costs they carry plus the rate card times the quantity of those that carry none,
//! whatever the window alignment.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions: a failed unwrap is a failed run

use std::str::FromStr;
use std::sync::Arc;

use meterflow_core::engine::{EngineConfig, MemoryStore, Outcome, PartitionEngine};
use meterflow_core::event::UsageEventRef;
use meterflow_core::meter::MeterCatalog;
use meterflow_core::pricing::{parse_rfc3339_ms, Catalog};
use meterflow_core::rating::{RateOutcome, RatingConfig, RatingState};
use meterflow_core::records::{AvroRecord, MeterAggregate};
use proptest::prelude::*;
use rust_decimal::Decimal;

const METERS: &str = r#"
[[meter]]
name = "tokens"
aggregation = "sum"
group_by = ["model"]
window = "minute"
allowed_lateness = "2s"
max_future = "1h"

[[meter]]
name = "requests"
aggregation = "count"
window = "minute"
allowed_lateness = "2s"
max_future = "1h"
"#;

/// Rate cards: tokens 2.00 per million, requests 0.0003 each; everything priced at zero so
/// only cost matters.
const CATALOG: &str = "default_plan = \"p\"\n[[plan]]\nid = \"p\"\ncurrency = \"USD\"\n\
    [[plan.price]]\nmeter = \"tokens\"\nmodel = \"per_unit\"\nunit_price = \"0\"\n\
    [[plan.price]]\nmeter = \"requests\"\nmodel = \"per_unit\"\nunit_price = \"0\"\n\
    [[cost]]\nmeter = \"tokens\"\nper_million = \"2.00\"\n\
    [[cost]]\nmeter = \"requests\"\nper_unit = \"0.0003\"\n";

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

#[derive(Debug, Clone)]
struct Ev {
    meter: &'static str,
    quantity: String,
    /// Offset from the start, ms.
    at: i64,
    cost: Option<String>,
}

fn events() -> impl Strategy<Value = Vec<Ev>> {
    let ev = (
        prop::bool::weighted(0.7),
        1u32..50_000,
        0i64..600_000,
        prop::option::weighted(0.35, 1u32..100_000),
    )
        .prop_map(|(tokens, q, at, cost)| Ev {
            meter: if tokens { "tokens" } else { "requests" },
            quantity: if tokens { q.to_string() } else { "1".into() },
            at,
            cost: cost.map(|c| Decimal::new(i64::from(c), 6).to_string()),
        });
    prop::collection::vec(ev, 1..80)
}

/// Runs `evs` (in the given order, with `shift` added to every event time) through an engine
/// and a rater; returns the total provider cost of the charges and the aggregates.
fn run(evs: &[Ev], shift: i64) -> (Decimal, Vec<MeterAggregate>) {
    let meters = Arc::new(MeterCatalog::from_toml_str(METERS).unwrap());
    let catalog = Catalog::from_toml_str(CATALOG).unwrap();
    let mut engine = PartitionEngine::new(meters.clone(), EngineConfig::default(), 0).unwrap();
    let mut store = MemoryStore::new(&meters);
    let t0 = parse_rfc3339_ms("2026-11-10T00:00:00Z").unwrap() + shift;
    let mut aggs = Vec::new();
    let ids: Vec<String> = (0..evs.len()).map(|i| format!("e{i}")).collect();
    for (i, e) in evs.iter().enumerate() {
        let r = UsageEventRef {
            event_id: &ids[i],
            tenant: "t",
            meter: e.meter,
            quantity: &e.quantity,
            event_time_ms: t0 + e.at,
            dimensions: if e.meter == "tokens" { vec![("model", "m1")] } else { vec![] },
            provider_cost: e.cost.as_deref(),
            source: "props",
        };
        assert_eq!(engine.on_event(i as i64, &r, &mut store).unwrap(), Outcome::Accepted);
        let out: Vec<MeterAggregate> = engine.drain_output().collect();
        store.record_emitted(&out);
        aggs.extend(out);
    }
    engine.on_tick(evs.len() as i64, t0 + 3_600_000, &mut store).unwrap();
    aggs.extend(engine.drain_output());
    let mut state = RatingState::new(0, RatingConfig::default());
    let mut cost = Decimal::ZERO;
    for a in &aggs {
        // Through the wire format, as the rater reads them.
        let a = MeterAggregate::from_avro(&a.to_avro().unwrap()).unwrap();
        match state.rate(&catalog, &a).unwrap() {
            RateOutcome::Charged(ch) => cost += ch.iter().map(|c| c.provider_cost).sum::<Decimal>(),
            other => panic!("{other:?}"),
        }
    }
    (cost, aggs)
}

/// The reference: carried costs + rate card x quantity of the events without one.
fn reference(evs: &[Ev]) -> Decimal {
    evs.iter()
        .map(|e| match (&e.cost, e.meter) {
            (Some(c), _) => d(c),
            (None, "tokens") => d(&e.quantity) * d("0.000002"),
            (None, _) => d("0.0003"),
        })
        .sum()
}

#[test]
fn a_window_mixing_carried_and_rate_card_costs() {
    // The issue's example: 70,000 tokens without a carried cost and some with one in one
    // window. Rate card 2.00 per million: 0.14 + carried 0.03 = 0.17 (it was 0.03).
    let evs = vec![
        Ev { meter: "tokens", quantity: "40000".into(), at: 1_000, cost: None },
        Ev { meter: "tokens", quantity: "5000".into(), at: 2_000, cost: Some("0.03".into()) },
        Ev { meter: "tokens", quantity: "30000".into(), at: 3_000, cost: None },
    ];
    let (cost, aggs) = run(&evs, 0);
    assert_eq!(cost, d("0.17"));
    assert_eq!(aggs.len(), 1);
    assert_eq!(aggs[0].uncosted_value, Some(d("70000")));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the events, their order (late events restate closed windows) and the window
    /// alignment, the rated cost equals the per-event reference exactly.
    #[test]
    fn rated_cost_is_the_sum_of_per_event_costs(evs in events(), shift in 0i64..60_000) {
        let expected = reference(&evs);
        let (aligned, _) = run(&evs, 0);
        let (shifted, _) = run(&evs, shift);
        prop_assert_eq!(aligned, expected);
        prop_assert_eq!(shifted, expected);
    }
}
