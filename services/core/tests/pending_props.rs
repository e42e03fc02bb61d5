//! Pending spend against settlement (256 cases each), for every price model: at every step,
//! settled usage revenue plus pending spend equals the rounded price of everything known so
//! far (settled and provisional quantities), computed independently with `Price::price` of
//! the totals; settling a window moves its amount from pending to settled without changing
//! the sum (provisional + settlement = final); restatements, re-delivered and stale
//! provisional totals change nothing they should not; once everything settled, pending is 0.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions: a failed unwrap is a failed run

use std::collections::BTreeMap;

use meterflow_core::pricing::{self, parse_rfc3339_ms, Catalog};
use meterflow_core::rating::pending::{price_pending, PendingBook, PENDING_HORIZON_MS};
use meterflow_core::rating::{RateOutcome, RatingConfig, RatingState};
use meterflow_core::records::{MeterAggregate, ProvisionalTotal};
use proptest::prelude::*;
use rust_decimal::Decimal;

const MINUTE: i64 = 60_000;
const TENANT: &str = "t";
const METERS: [&str; 2] = ["m", "n"];

/// The five price models (per unit with a free allowance, graduated with flat fees, volume,
/// package, plain per unit).
fn price_body(model: usize) -> &'static str {
    match model {
        0 => "model = \"per_unit\"\nunit_price = \"0.0000037\"\nfree_units = \"7.5\"",
        1 => "model = \"graduated\"\ntiers = [\n { up_to = \"10\", unit_price = \"0.013\", flat_fee = \"0.5\" },\n { up_to = \"40\", unit_price = \"0.0071\" },\n { unit_price = \"0.00033\", flat_fee = \"1\" },\n]",
        2 => "model = \"volume\"\ntiers = [\n { up_to = \"12\", unit_price = \"0.021\" },\n { up_to = \"50\", unit_price = \"0.017\", flat_fee = \"0.25\" },\n { unit_price = \"0.009\" },\n]",
        3 => "model = \"package\"\npackage_size = \"7\"\npackage_price = \"0.333333333333\"",
        _ => "model = \"per_unit\"\nunit_price = \"0.123456789012\"",
    }
}

fn catalog(models: [usize; 2]) -> Catalog {
    let mut text = String::from("default_plan = \"p\"\n[[plan]]\nid = \"p\"\ncurrency = \"USD\"\n");
    for (meter, model) in METERS.iter().zip(models) {
        text.push_str(&format!("[[plan.price]]\nmeter = \"{meter}\"\n{}\n", price_body(model)));
    }
    Catalog::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn nov() -> i64 {
    parse_rfc3339_ms("2026-11-01T00:00:00Z").unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    /// Usage into window `w` (opens it if new), then its provisional total is published.
    Add(usize, Decimal),
    /// Window `w` closes: its final aggregate is rated.
    Close(usize),
    /// A late event restates closed window `w`.
    Restate(usize, Decimal),
    /// An old provisional total of `w` is delivered again.
    Stale(usize),
}

fn qty() -> impl Strategy<Value = Decimal> {
    (0u64..4_000_000, 0u32..4).prop_map(|(m, s)| Decimal::new(m as i64, s))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..6, qty()).prop_map(|(w, q)| Op::Add(w, q)),
        2 => (0usize..6).prop_map(Op::Close),
        1 => (0usize..6, qty()).prop_map(|(w, q)| Op::Restate(w, q)),
        1 => (0usize..6).prop_map(Op::Stale),
    ]
}

#[derive(Debug, Default, Clone)]
struct Win {
    value: Decimal,
    closed: bool,
    revision: i32,
    /// Every provisional total published for it (offset order).
    published: Vec<ProvisionalTotal>,
}

struct World {
    catalog: Catalog,
    rating: RatingState,
    book: PendingBook,
    windows: Vec<Win>,
    offset: i64,
    seq: i64,
}

impl World {
    fn meter(w: usize) -> &'static str {
        METERS[w % 2]
    }
    fn start(w: usize) -> i64 {
        nov() + (w as i64) * MINUTE
    }

    fn provisional(&mut self, w: usize) -> ProvisionalTotal {
        self.offset += 1;
        ProvisionalTotal {
            tenant: TENANT.into(),
            meter: Self::meter(w).into(),
            aggregation: "sum".into(),
            window_start: Self::start(w),
            window_end: Self::start(w) + MINUTE,
            closes_at: Self::start(w) + MINUTE + 10_000,
            value: self.windows[w].value,
            event_count: 1,
            as_of_offset: self.offset,
            ..ProvisionalTotal::default()
        }
    }

    fn rate(&mut self, w: usize, previous: Decimal) {
        self.seq += 1;
        let win = &self.windows[w];
        let agg = MeterAggregate {
            tenant: TENANT.into(),
            meter: Self::meter(w).into(),
            aggregation: "sum".into(),
            window_start: Self::start(w),
            window_end: Self::start(w) + MINUTE,
            revision: win.revision,
            value: win.value,
            previous_value: previous,
            event_count: 1,
            seq: self.seq,
            emitted_at: Self::start(w) + MINUTE,
            ..MeterAggregate::default()
        };
        match self.rating.rate(&self.catalog, &agg).unwrap() {
            RateOutcome::Charged(_) => {}
            other => panic!("{other:?}"),
        }
        self.book.on_settled(&agg, agg.window_end + 10_000);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Add(w, q) if !self.windows[w].closed => {
                self.windows[w].value += q;
                let p = self.provisional(w);
                self.book.on_provisional(&p);
                self.windows[w].published.push(p);
            }
            Op::Add(..) => {}
            Op::Close(w) if !self.windows[w].closed && !self.windows[w].published.is_empty() => {
                self.windows[w].closed = true;
                self.rate(w, Decimal::ZERO);
            }
            Op::Close(_) => {}
            Op::Restate(w, q) if self.windows[w].closed => {
                let previous = self.windows[w].value;
                self.windows[w].value += q;
                self.windows[w].revision += 1;
                self.rate(w, previous);
            }
            Op::Restate(..) => {}
            Op::Stale(w) => {
                if let Some(p) = self.windows[w].published.first().cloned() {
                    assert!(!self.book.on_provisional(&p), "a stale (or settled) total changed the book");
                }
            }
        }
    }

    fn settled_revenue(&self) -> Decimal {
        self.rating.period_revenue(TENANT, nov(), "USD")
    }

    fn pending(&self) -> Decimal {
        let settled = self.rating.settled_usage(TENANT);
        price_pending(&self.catalog, TENANT, self.book.windows(TENANT), &settled).unwrap().total("USD")
    }

    /// Independent: the rounded price of each meter's known total (settled + provisional).
    fn expected_total(&self) -> Decimal {
        let plan = self.catalog.plan("p").unwrap();
        METERS
            .iter()
            .enumerate()
            .map(|(i, meter)| {
                let q: Decimal = self.windows.iter().enumerate().filter(|(w, _)| w % 2 == i).map(|(_, win)| win.value).sum();
                plan.price(meter).unwrap().price(q).unwrap()
            })
            .sum()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn settled_plus_pending_is_the_price_of_everything_known(
        models in (0usize..5, 0usize..5),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let mut world = World {
            catalog: catalog([models.0, models.1]),
            rating: RatingState::new(0, RatingConfig::default()),
            book: PendingBook::new(),
            windows: vec![Win::default(); 6],
            offset: 0,
            seq: 0,
        };
        for op in &ops {
            let before = world.settled_revenue() + world.pending();
            world.apply(op);
            let (settled, pending) = (world.settled_revenue(), world.pending());
            prop_assert_eq!(settled + pending, world.expected_total(), "after {:?}", op);
            if matches!(op, Op::Close(_) | Op::Stale(_)) {
                prop_assert_eq!(settled + pending, before, "settling (or a stale total) moved the sum: {:?}", op);
            }
        }
        // Everything closes: nothing is pending and the settled revenue is the final bill.
        for w in 0..6 {
            world.apply(&Op::Close(w));
        }
        prop_assert_eq!(world.pending(), Decimal::ZERO);
        prop_assert_eq!(world.settled_revenue(), world.expected_total());
        // A settled window's provisional totals, re-delivered, never count again.
        for w in 0..6 {
            for p in world.windows[w].published.clone() {
                prop_assert!(!world.book.on_provisional(&p));
            }
        }
        prop_assert_eq!(world.pending(), Decimal::ZERO);
    }

    #[test]
    fn pending_of_a_window_is_the_price_of_its_newest_total(
        model in 0usize..5,
        values in prop::collection::vec(qty(), 1..12),
        order in any::<prop::sample::Index>(),
    ) {
        let catalog = catalog([model, model]);
        let price = catalog.plan("p").unwrap().price("m").unwrap().clone();
        let mut totals: Vec<ProvisionalTotal> = Vec::new();
        let mut running = Decimal::ZERO;
        for (i, v) in values.iter().enumerate() {
            running += *v;
            totals.push(ProvisionalTotal {
                tenant: TENANT.into(), meter: "m".into(), aggregation: "sum".into(), dimensions: BTreeMap::new(),
                window_start: nov(), window_end: nov() + MINUTE, closes_at: nov() + MINUTE, value: running,
                event_count: i as i64 + 1, source_partition: 3, as_of_offset: i as i64 + 1, published_at: 0,
            });
        }
        // Delivered rotated (out of order), with one re-delivery.
        let k = order.index(totals.len());
        totals.rotate_left(k);
        let again = totals[0].clone();
        totals.push(again);
        let mut book = PendingBook::new();
        for t in &totals {
            book.on_provisional(t);
        }
        let spend = price_pending(&catalog, TENANT, book.windows(TENANT), &Default::default()).unwrap();
        prop_assert_eq!(spend.total("USD"), price.price(running).unwrap());
        prop_assert_eq!(book.len(), 1);
    }
}

#[test]
fn expiry_forgets_missed_settlements_and_tombstones() {
    let mut book = PendingBook::new();
    let p = ProvisionalTotal {
        tenant: TENANT.into(),
        meter: "m".into(),
        aggregation: "sum".into(),
        dimensions: BTreeMap::new(),
        window_start: nov(),
        window_end: nov() + MINUTE,
        closes_at: nov() + MINUTE + 10_000,
        value: Decimal::from(5),
        event_count: 1,
        source_partition: 0,
        as_of_offset: 1,
        published_at: 0,
    };
    assert!(book.on_provisional(&p));
    assert!(book.expire(p.closes_at + PENDING_HORIZON_MS - 1).is_empty());
    assert_eq!(book.expire(p.closes_at + PENDING_HORIZON_MS).into_iter().collect::<Vec<_>>(), vec![TENANT.to_owned()]);
    assert!(book.is_empty());
    // Period of the pending window: the month of its start.
    assert_eq!(pricing::period_start(p.window_start), nov());
}
