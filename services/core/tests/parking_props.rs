//! Parking and re-rating (issue 10, item 3) and admission screening (item 2): what cannot be
//! priced is parked without stopping anybody else's billing, a rerate after the catalog fix
//! bills it exactly once and deterministically, and forged-looking aggregates are refused
//! before they touch the state.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions: a failed unwrap is a failed run

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use meterflow_core::pricing::{parse_rfc3339_ms, Catalog};
use meterflow_core::rating::{
    Admission, ParkReason, RateOutcome, RatingConfig, RatingState, RerateOutcome, KIND_USAGE, REASON_BAD_SEQ,
    REASON_FUTURE_WINDOW,
};
use meterflow_core::records::{Charge, MeterAggregate};
use proptest::prelude::*;
use rust_decimal::Decimal;

const MINUTE: i64 = 60_000;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// A state through the bytes a checkpoint holds (postcard, as `rating::partition` writes it).
fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(x: &T) -> T {
    postcard::from_bytes(&postcard::to_allocvec(x).unwrap()).unwrap()
}

fn nov() -> i64 {
    parse_rfc3339_ms("2026-11-01T00:00:00Z").unwrap()
}

#[allow(clippy::too_many_arguments)]
fn agg(tenant: &str, meter: &str, window_start: i64, revision: i32, value: Decimal, previous: Decimal, sp: i32, seq: i64) -> MeterAggregate {
    MeterAggregate {
        tenant: tenant.into(),
        meter: meter.into(),
        aggregation: "sum".into(),
        dimensions: BTreeMap::new(),
        window_start,
        window_end: window_start + MINUTE,
        revision,
        value,
        previous_value: previous,
        event_count: 1,
        source_partition: sp,
        seq,
        emitted_at: window_start + MINUTE,
        ..MeterAggregate::default()
    }
}

/// Plan "p" (default) pricing meter "m" graduated, and meter "u" only when `fixed`.
fn catalog(fixed: bool) -> Catalog {
    let mut text = String::from(
        "default_plan = \"p\"\n[[plan]]\nid = \"p\"\ncurrency = \"USD\"\n\
         [[plan.price]]\nmeter = \"m\"\nmodel = \"graduated\"\ntiers = [ { up_to = \"1000\", unit_price = \"0.01\" }, { unit_price = \"0.005\" } ]\n",
    );
    if fixed {
        text.push_str("[[plan.price]]\nmeter = \"u\"\nmodel = \"volume\"\ntiers = [ { up_to = \"500\", unit_price = \"0.03\" }, { unit_price = \"0.02\", flat_fee = \"1\" } ]\n");
    }
    Catalog::from_toml_str(&text).unwrap()
}

fn usage(charges: &[Charge]) -> Vec<&Charge> {
    charges.iter().filter(|c| c.kind == KIND_USAGE).collect()
}

#[test]
fn overflow_parks_and_everyone_else_is_billed() {
    // A per-unit price of 2 on a quantity near Decimal::MAX cannot be computed.
    let c = Catalog::from_toml_str(
        "default_plan = \"p\"\n[[plan]]\nid = \"p\"\ncurrency = \"USD\"\n[[plan.price]]\nmeter = \"m\"\nmodel = \"per_unit\"\nunit_price = \"2\"\n",
    )
    .unwrap();
    let mut s = RatingState::new(0, RatingConfig::default());
    let huge = agg("poison", "m", nov(), 0, d("70000000000000000000000000000"), d("0"), 0, 1);
    match s.rate(&c, &huge).unwrap() {
        RateOutcome::Parked { reason: ParkReason::Overflow, error } => assert!(error.to_string().contains("overflow"), "{error}"),
        other => panic!("{other:?}"),
    }
    assert!(s.is_parked(0, 1));
    assert_eq!(s.period_revenue("poison", nov(), "USD"), Decimal::ZERO, "nothing of it is charged");
    // The next aggregates of the partition, of any tenant, are billed.
    for (i, tenant) in ["a", "b", "poison"].iter().enumerate() {
        let a = agg(tenant, "m", nov() + MINUTE, 0, d("3"), d("0"), 0, 2 + i as i64);
        match s.rate(&c, &a).unwrap() {
            RateOutcome::Charged(ch) => assert_eq!(ch[0].amount, d("6")),
            other => panic!("{other:?}"),
        }
    }
    // A rerate with the same catalog cannot price it either: still parked, nothing charged.
    assert!(matches!(s.rerate(&c, &huge), RerateOutcome::StillParked { reason: ParkReason::Overflow, .. }));
    assert!(s.is_parked(0, 1));
    // Snapshots keep what is parked.
    assert_eq!(round_trip(&s), s);
}

#[test]
fn rerate_bills_once_with_the_original_id() {
    let broken = catalog(false);
    let fixed = catalog(true);
    let mut s = RatingState::new(0, RatingConfig::default());
    let a = agg("t", "u", nov(), 0, d("600"), d("0"), 2, 1);
    assert!(matches!(s.rate(&broken, &a).unwrap(), RateOutcome::Parked { reason: ParkReason::Unpriced, .. }));
    // Never rated: a rerate of something not parked (other seq) is a no-op.
    let not_parked = MeterAggregate { seq: 2, ..a.clone() };
    assert_eq!(s.rerate(&fixed, &not_parked), RerateOutcome::NotParked);
    let RerateOutcome::Charged(ch) = s.rerate(&fixed, &a) else { panic!("not charged") };
    // Volume: 600 units all at tier 2 (0.02) plus its flat fee 1.
    assert_eq!((ch[0].amount, ch[0].quantity), (d("13"), d("600")));
    assert!(!s.is_parked(2, 1));
    assert_eq!(s.rerate(&fixed, &a), RerateOutcome::NotParked, "a second rerate is a no-op");
    // Its id is the one a straight rating of the same aggregate gives.
    let mut straight = RatingState::new(0, RatingConfig::default());
    let RateOutcome::Charged(ch2) = straight.rate(&fixed, &a).unwrap() else { panic!() };
    assert_eq!(ch2[0].charge_id, ch[0].charge_id);
    assert_eq!(ch2[0].amount, ch[0].amount);
}

#[test]
fn screen_refuses_far_future_and_absurd_seqs() {
    let c = catalog(true);
    let lim = Admission { max_future_ms: 86_400_000, max_seq_gap: 100 };
    let mut s = RatingState::new(0, RatingConfig::default());
    let ok = agg("t", "m", nov(), 0, d("1"), d("0"), 0, 1);
    assert_eq!(s.screen(&ok, Some(nov()), &lim), Ok(()));
    // Before the first aggregate of a source partition any positive seq is admitted (the
    // topic's head may have been deleted by retention).
    assert_eq!(s.screen(&MeterAggregate { seq: 1 << 40, ..ok.clone() }, Some(nov()), &lim), Ok(()));
    s.rate(&c, &ok).unwrap();
    s.advance(&c, nov() + MINUTE);
    // A huge seq: refused, and the state (high water) is untouched.
    let forged = MeterAggregate { seq: 1 << 60, ..agg("t", "m", nov() + MINUTE, 0, d("1"), d("0"), 0, 0) };
    assert_eq!(s.screen(&forged, Some(nov()), &lim).unwrap_err().0, REASON_BAD_SEQ);
    assert_eq!(s.screen(&MeterAggregate { seq: 0, ..ok.clone() }, None, &lim).unwrap_err().0, REASON_BAD_SEQ);
    assert_eq!(s.screen(&MeterAggregate { seq: 101, ..ok.clone() }, None, &lim), Ok(()), "gap of 100 allowed");
    assert_eq!(s.screen(&MeterAggregate { seq: 102, ..ok.clone() }, None, &lim).unwrap_err().0, REASON_BAD_SEQ);
    // A window a year ahead of both the watermark and the broker time.
    let year = 365 * 86_400_000;
    let future = agg("t", "m", nov() + year, 0, d("1"), d("0"), 0, 2);
    assert_eq!(s.screen(&future, Some(nov()), &lim).unwrap_err().0, REASON_FUTURE_WINDOW);
    // A forged watermark (emitted_at) is refused the same way.
    let late_wm = MeterAggregate { emitted_at: nov() + year, ..agg("t", "m", nov(), 1, d("2"), d("1"), 0, 2) };
    assert_eq!(s.screen(&late_wm, Some(nov()), &lim).unwrap_err().0, REASON_FUTURE_WINDOW);
    // The broker time can vouch for a real jump after an idle stretch (a later reference).
    assert_eq!(s.screen(&future, Some(nov() + year), &lim), Ok(()));
    // And the next real aggregate is charged.
    let next = agg("t", "m", nov() + 2 * MINUTE, 0, d("5"), d("0"), 0, 2);
    assert_eq!(s.screen(&next, Some(nov()), &lim), Ok(()));
    assert!(matches!(s.rate(&c, &next).unwrap(), RateOutcome::Charged(_)));
}

/// One step of a run: rate aggregate i with the catalog in force, or a rerate request for it.
#[derive(Debug, Clone, Copy)]
enum Step {
    Rate(usize),
    Rerate(usize),
}

#[derive(Debug, Clone)]
struct Scenario {
    aggs: Vec<MeterAggregate>,
    steps: Vec<Step>,
    /// The catalog is fixed before step `fix_at`.
    fix_at: usize,
    /// Final quantity per meter.
    totals: BTreeMap<&'static str, Decimal>,
}

/// Windows of meters "m" (always priced) and "u" (priced only after the fix), 1..4 revisions
/// each, in any order across two source partitions; the catalog is fixed at a random step;
/// then rerate requests for every aggregate (parked or not, some twice) at random later
/// positions.
fn scenario() -> impl Strategy<Value = Scenario> {
    let window = (prop::bool::ANY, 0..40_000i64, prop::collection::vec(1..2_000u32, 1..4));
    prop::collection::vec(window, 1..10)
        .prop_flat_map(|ws| {
            let mut seen = BTreeSet::new();
            let mut revs = Vec::new();
            let mut totals: BTreeMap<&'static str, Decimal> = BTreeMap::new();
            for (is_u, w, values) in ws {
                let meter = if is_u { "u" } else { "m" };
                if !seen.insert((meter, w)) {
                    continue;
                }
                let mut prev = Decimal::ZERO;
                for (r, v) in values.iter().enumerate() {
                    let v = Decimal::from(*v);
                    revs.push((meter, w, r as i32, v, prev));
                    prev = v;
                }
                *totals.entry(meter).or_default() += prev;
            }
            let n = revs.len();
            (
                Just(revs).prop_shuffle(),
                prop::collection::vec(0..2i32, n),
                0..=n,
                prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), n..2 * n + 1),
                Just(totals),
            )
        })
        .prop_map(|(revs, sps, fix_at, rerates, totals)| {
            let mut next: BTreeMap<i32, i64> = BTreeMap::new();
            let aggs: Vec<MeterAggregate> = revs
                .iter()
                .zip(&sps)
                .map(|(&(meter, w, r, v, p), &sp)| {
                    let seq = *next.entry(sp).and_modify(|s| *s += 1).or_insert(1);
                    agg("t", meter, nov() + w * MINUTE, r, v, p, sp, seq)
                })
                .collect();
            let n = aggs.len();
            let mut steps: Vec<Step> = (0..n).map(Step::Rate).collect();
            // Every aggregate gets a rerate request after the fix (and after its own rating);
            // the extra ones are duplicates.
            let mut requests: Vec<(usize, usize)> = Vec::new();
            for (k, (who, at)) in rerates.iter().enumerate() {
                let i = if k < n { k } else { who.index(n) };
                let earliest = (i + 1).max(fix_at);
                let pos = earliest + at.index(n - earliest.min(n) + 1);
                requests.push((pos, i));
            }
            requests.sort();
            let mut out = Vec::new();
            let mut r = requests.into_iter().peekable();
            for (pos, step) in steps.drain(..).enumerate() {
                while r.peek().is_some_and(|(p, _)| *p <= pos) {
                    out.push(Step::Rerate(r.next().unwrap().1));
                }
                out.push(step);
            }
            out.extend(r.map(|(_, i)| Step::Rerate(i)));
            // fix_at counts Rate steps; translate to a position in `out`.
            let mut rates = 0;
            let fix_pos = out
                .iter()
                .position(|s| {
                    let here = rates >= fix_at;
                    if matches!(s, Step::Rate(_)) {
                        rates += 1;
                    }
                    here
                })
                .unwrap_or(out.len());
            Scenario { aggs, steps: out, fix_at: fix_pos, totals }
        })
}

fn drive(state: &mut RatingState, s: &Scenario, range: std::ops::Range<usize>) -> Vec<Charge> {
    let (broken, fixed) = (catalog(false), catalog(true));
    let mut out = Vec::new();
    for k in range {
        let c = if k < s.fix_at { &broken } else { &fixed };
        match s.steps[k] {
            Step::Rate(i) => match state.rate(c, &s.aggs[i]).unwrap() {
                RateOutcome::Charged(ch) => out.extend(ch),
                RateOutcome::Parked { reason, .. } => assert_eq!(reason, ParkReason::Unpriced),
                other => panic!("{other:?}"),
            },
            Step::Rerate(i) => match state.rerate(c, &s.aggs[i]) {
                RerateOutcome::Charged(ch) => out.extend(ch),
                RerateOutcome::NotParked => {}
                RerateOutcome::StillParked { reason, .. } => assert_eq!(reason, ParkReason::Unpriced),
                RerateOutcome::Rejected(e) => panic!("{e}"),
            },
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Parking then re-rating bills exactly what rating with the fixed catalog from the start
    /// bills: each aggregate once, with its own id, and each price's charges sum to the price
    /// of its total quantity.
    #[test]
    fn parked_then_rerated_equals_priced_from_the_start(s in scenario()) {
        let mut state = RatingState::new(0, RatingConfig::default());
        let charges = drive(&mut state, &s, 0..s.steps.len());
        prop_assert_eq!(state.parked_count(), 0, "every parked aggregate got a rerate after the fix");
        let usage = usage(&charges);
        prop_assert_eq!(usage.len(), s.aggs.len(), "one usage charge per aggregate");
        let ids: BTreeSet<&String> = usage.iter().map(|c| &c.charge_id).collect();
        prop_assert_eq!(ids.len(), usage.len());
        let fixed = catalog(true);
        let plan = fixed.plan("p").unwrap();
        for (meter, total) in &s.totals {
            let price = plan.price(meter).unwrap();
            let billed: Decimal = usage.iter().filter(|c| c.meter == *meter).map(|c| c.amount).sum();
            prop_assert_eq!(billed, price.price(*total).unwrap(), "meter {}", meter);
            let q: Decimal = usage.iter().filter(|c| c.meter == *meter).map(|c| c.quantity).sum();
            prop_assert_eq!(q, *total);
        }
        // Reference: the same aggregates rated in the same order with the fixed catalog.
        let mut reference = RatingState::new(0, RatingConfig::default());
        let mut ref_ids = BTreeSet::new();
        for a in &s.aggs {
            if let RateOutcome::Charged(ch) = reference.rate(&fixed, a).unwrap() {
                ref_ids.extend(ch.into_iter().filter(|c| c.kind == KIND_USAGE).map(|c| c.charge_id));
            }
        }
        prop_assert_eq!(ids.into_iter().cloned().collect::<BTreeSet<_>>(), ref_ids);
    }

    /// A run with a snapshot -> restore at any step (parked set included) equals the straight
    /// run: same charges, ids, seqs and final state.
    #[test]
    fn rerate_is_deterministic_across_restarts(s in scenario(), cut in any::<prop::sample::Index>()) {
        let cut = cut.index(s.steps.len() + 1);
        let mut straight = RatingState::new(0, RatingConfig::default());
        let all = drive(&mut straight, &s, 0..s.steps.len());
        let mut first = RatingState::new(0, RatingConfig::default());
        let mut resumed = drive(&mut first, &s, 0..cut);
        let mut second = round_trip(&first);
        resumed.extend(drive(&mut second, &s, cut..s.steps.len()));
        prop_assert_eq!(resumed, all);
        prop_assert_eq!(second, straight);
    }
}
