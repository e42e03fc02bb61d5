//! Property tests of the rater partition (`rating::partition`), the state machine the rater
//! service drives: random streams of signed aggregates (new windows, late windows and
//! restatements of two tenants over three billing months), forged and undecodable records,
//! and wallet top-ups (some re-sent), through the real Avro codec and record tags.
//!
//! * snapshot → restore → continue, at any point and re-fed from any earlier offset (what a
//!   crash replays), emits exactly what an uninterrupted run emits, and ends in the same bytes;
//! * idle ticks anywhere (on a watermark the partition has seen) change no money: per tenant,
//!   period and currency, charges sum to `max(minimum, unit price × total quantity)` computed
//!   independently from the stream, and the prepaid tenant's wallet is top-ups − charges;
//! * every record is accounted for: refused records are dead-lettered with their offset, and
//!   charge `seq`s are 1, 2, 3, … in emission order.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions: a failed unwrap is a failed run

use std::collections::BTreeMap;
use std::str::FromStr;

use meterflow_core::auth::{self, RecordKey};
use meterflow_core::pricing::{self, parse_rfc3339_ms, Catalog};
use meterflow_core::rating::partition::{AggregateRecord, Emitted, PartitionConfig, RaterPartition, Verdict};
use meterflow_core::rating::{Admission, RatingConfig, WalletConfig};
use meterflow_core::records::{AvroRecord, MeterAggregate, WalletAdjustment};
use proptest::prelude::*;
use rust_decimal::Decimal;

const CASES: u32 = 256;
const MINUTE: i64 = 60_000;
const DAY: i64 = 86_400_000;
const MINIMUM: &str = "5";
const UNIT_PRICE: &str = "0.01";

fn nov() -> i64 {
    parse_rfc3339_ms("2026-11-01T00:00:00Z").unwrap()
}

fn key() -> RecordKey {
    RecordKey::from_bytes(&[7u8; 32]).unwrap()
}

fn catalog() -> Catalog {
    let text = format!(
        "default_plan = \"p\"\n[[plan]]\nid = \"p\"\ncurrency = \"USD\"\nminimum_commitment = \"{MINIMUM}\"\n\
         [[plan.price]]\nmeter = \"m\"\nmodel = \"per_unit\"\nunit_price = \"{UNIT_PRICE}\"\n"
    );
    Catalog::from_toml_str(&text).unwrap()
}

fn config() -> PartitionConfig {
    PartitionConfig {
        partition: 3,
        aggregates_topic: "aggs".into(),
        wallet_topic: "wallet".into(),
        record_key: key(),
        // The streams jump days at a time: nothing is refused for lying in the future.
        admission: Admission { max_future_ms: 400 * DAY, max_seq_gap: 1_000 },
        rating: RatingConfig::default(),
        wallets: WalletConfig::default(),
    }
}

/// One input record, as the service would hand it over.
#[derive(Debug, Clone)]
enum Input {
    Aggregate { offset: i64, payload: Vec<u8>, tag: Option<Vec<u8>> },
    TopUp { offset: i64, payload: Vec<u8> },
    /// An idle tick on the highest `emitted_at` fed so far.
    Tick,
}

/// What the generator knows the stream means: rated quantity per (tenant, period).
#[derive(Debug, Clone, Default)]
struct Truth {
    quantity: BTreeMap<(String, i64), Decimal>,
    top_ups: Decimal,
    /// Aggregates offsets whose record is refused (forged or undecodable).
    refused: Vec<i64>,
}

#[derive(Debug, Clone)]
enum Op {
    /// A new window of a tenant, `late` minutes before the current time, with a quantity.
    Window { tenant: usize, late: i64, cents: i64 },
    /// A restatement of an earlier window of the stream (by index) to a new quantity.
    Restate { which: usize, cents: i64 },
    /// Time moves on (hours).
    Advance { hours: i64 },
    Forged,
    Garbage,
    TopUp { key: usize, cents: i64 },
    Tick,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..2usize, 0..2_000i64, 0..5_000i64).prop_map(|(tenant, late, cents)| Op::Window { tenant, late, cents }),
        2 => (any::<usize>(), 0..5_000i64).prop_map(|(which, cents)| Op::Restate { which, cents }),
        3 => (1..300i64).prop_map(|hours| Op::Advance { hours }),
        1 => Just(Op::Forged),
        1 => Just(Op::Garbage),
        1 => (0..4usize, 1..3_000i64).prop_map(|(key, cents)| Op::TopUp { key, cents }),
        1 => Just(Op::Tick),
    ]
}

/// Builds the records of `ops` (a well-formed aggregator output: `seq` 1, 2, … and a
/// non-decreasing `emitted_at`), and what they mean.
fn build(ops: &[Op], ticks: bool) -> (Vec<Input>, Truth) {
    let tenants = ["prepaid", "postpaid"];
    let (mut inputs, mut truth) = (Vec::new(), Truth::default());
    let (mut now, mut seq, mut agg_offset, mut wallet_offset) = (nov() + 10 * MINUTE, 0i64, 0i64, 0i64);
    let mut windows: Vec<MeterAggregate> = Vec::new();
    let mut top_ups = BTreeMap::new();
    for op in ops {
        let agg = match op {
            Op::Window { tenant, late, cents } => {
                let start = (now - late * MINUTE).max(nov()) / MINUTE * MINUTE;
                Some(aggregate(tenants[*tenant], start, 0, Decimal::new(*cents, 2), Decimal::ZERO))
            }
            Op::Restate { which, cents } if !windows.is_empty() => {
                let w = &windows[which % windows.len()];
                Some(aggregate(&w.tenant, w.window_start, w.revision + 1, Decimal::new(*cents, 2), w.value))
            }
            Op::Restate { .. } => None,
            Op::Advance { hours } => {
                // Stay clear of retention (62 days after a period closes): nothing is finalized.
                now = (now + hours * 3_600_000).min(nov() + 80 * DAY);
                None
            }
            Op::Forged | Op::Garbage => {
                let payload = if matches!(op, Op::Forged) {
                    aggregate("prepaid", now / MINUTE * MINUTE, 0, Decimal::ONE, Decimal::ZERO).to_avro().unwrap()
                } else {
                    b"\xC3\x01not an aggregate".to_vec()
                };
                let tag = matches!(op, Op::Garbage).then(|| auth::sign(&key(), &[auth::PURPOSE_AGGREGATE, &payload]).to_vec());
                truth.refused.push(agg_offset);
                inputs.push(Input::Aggregate { offset: agg_offset, payload, tag });
                agg_offset += 1;
                None
            }
            Op::TopUp { key, cents } => {
                let amount = Decimal::new(*cents, 2);
                let key = format!("top-up-{key}");
                // A re-sent top-up (same key, any amount) is applied once, with its first amount.
                if !top_ups.contains_key(&key) {
                    top_ups.insert(key.clone(), amount);
                    truth.top_ups += amount;
                }
                let adj = WalletAdjustment {
                    idempotency_key: key,
                    tenant: "prepaid".into(),
                    currency: "USD".into(),
                    amount,
                    kind: "paid".into(),
                    reason: String::new(),
                    created_at: now,
                    expires_at: None,
                    priority: 0,
                };
                inputs.push(Input::TopUp { offset: wallet_offset, payload: adj.to_avro().unwrap() });
                wallet_offset += 1;
                None
            }
            Op::Tick => {
                if ticks {
                    inputs.push(Input::Tick);
                }
                None
            }
        };
        if let Some(mut a) = agg {
            seq += 1;
            a.seq = seq;
            a.emitted_at = now.max(a.window_end);
            now = a.emitted_at;
            let period = pricing::period_start(a.window_start);
            *truth.quantity.entry((a.tenant.clone(), period)).or_default() += a.value - a.previous_value;
            let payload = a.to_avro().unwrap();
            let tag = Some(auth::sign(&key(), &[auth::PURPOSE_AGGREGATE, &payload]).to_vec());
            inputs.push(Input::Aggregate { offset: agg_offset, payload, tag });
            agg_offset += 1;
            windows.retain(|w| (&w.tenant, w.window_start) != (&a.tenant, a.window_start));
            windows.push(a);
        }
    }
    (inputs, truth)
}

fn aggregate(tenant: &str, start: i64, revision: i32, value: Decimal, previous: Decimal) -> MeterAggregate {
    MeterAggregate {
        tenant: tenant.into(),
        meter: "m".into(),
        aggregation: "sum".into(),
        dimensions: BTreeMap::new(),
        window_start: start,
        window_end: start + MINUTE,
        revision,
        value,
        previous_value: previous,
        event_count: 1,
        ..MeterAggregate::default()
    }
}

/// Feeds `inputs` to `p`, one [`Emitted`] per input; `seen` is the highest `emitted_at` fed.
fn feed(p: &mut RaterPartition, c: &Catalog, inputs: &[Input], seen: &mut i64) -> Vec<Emitted> {
    inputs
        .iter()
        .map(|input| match input {
            Input::Aggregate { offset, payload, tag } => {
                // Forged records are no clock: only tagged ones move what a tick may use.
                if let (Some(_), Ok(a)) = (tag, MeterAggregate::from_avro(payload)) {
                    *seen = (*seen).max(a.emitted_at);
                }
                let rec = AggregateRecord { offset: *offset, payload, broker_ms: None, tag: tag.as_deref(), rerate_tag: None };
                p.on_aggregate(c, rec).unwrap().out
            }
            Input::TopUp { offset, payload } => p.on_adjustment(*offset, payload).out,
            Input::Tick => p.on_tick(c, *seen),
        })
        .collect()
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 0..120)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn restore_anywhere_and_replay_equals_a_straight_run(ops in ops(), cut in any::<prop::sample::Index>(), back in any::<prop::sample::Index>()) {
        let c = catalog();
        let (inputs, _) = build(&ops, true);
        let mut seen = i64::MIN;
        let mut straight = RaterPartition::new(config());
        let want = feed(&mut straight, &c, &inputs, &mut seen);

        let cut = cut.index(inputs.len() + 1);
        let mut seen = i64::MIN;
        let mut first = RaterPartition::new(config());
        let mut got = feed(&mut first, &c, &inputs[..cut], &mut seen);
        let mut resumed = RaterPartition::restore(config(), &first.snapshot()).unwrap();
        // A crash re-delivers records the snapshot already covers: they change nothing.
        let from = back.index(cut + 1);
        let records: Vec<Input> = inputs[from..cut].iter().filter(|i| !matches!(i, Input::Tick)).cloned().collect();
        let replayed = feed(&mut resumed, &c, &records, &mut seen.clone());
        prop_assert!(replayed.iter().all(Emitted::is_empty));
        got.extend(feed(&mut resumed, &c, &inputs[cut..], &mut seen));
        prop_assert_eq!(got, want);
        prop_assert_eq!(resumed.snapshot(), straight.snapshot());
    }

    #[test]
    fn idle_ticks_change_no_money_and_money_matches_the_stream(ops in ops()) {
        let c = catalog();
        for ticks in [false, true] {
            let (inputs, truth) = build(&ops, ticks);
            let mut p = RaterPartition::new(config());
            let mut seen = i64::MIN;
            let mut out: Vec<Emitted> = feed(&mut p, &c, &inputs, &mut seen);
            // Far past the last period's end: every period closes (nothing is finalized yet).
            out.push(p.on_tick(&c, nov() + 100 * DAY));
            let charges: Vec<_> = out.iter().flat_map(|e| e.charges.iter()).collect();
            let seqs: Vec<i64> = charges.iter().map(|ch| ch.seq).collect();
            prop_assert_eq!(seqs, (1..=charges.len() as i64).collect::<Vec<_>>());
            let mut billed: BTreeMap<(String, i64), Decimal> = BTreeMap::new();
            for ch in &charges {
                *billed.entry((ch.tenant.clone(), ch.period_start)).or_default() += ch.amount;
            }
            // Independently: each tenant owes max(minimum, price × quantity) for every month
            // from its first one on (a month without usage still owes the minimum).
            let mut expected = BTreeMap::new();
            for tenant in ["prepaid", "postpaid"] {
                let Some(first) = truth.quantity.keys().filter(|(t, _)| t == tenant).map(|(_, p)| *p).min() else { continue };
                let mut period = first;
                while period < pricing::period_start(nov() + 100 * DAY - 3_600_000) {
                    let q = truth.quantity.get(&(tenant.to_string(), period)).copied().unwrap_or_default();
                    let usage = q * Decimal::from_str(UNIT_PRICE).unwrap();
                    expected.insert((tenant.to_string(), period), usage.max(Decimal::from_str(MINIMUM).unwrap()));
                    period = pricing::period_start(period + 32 * DAY);
                }
            }
            prop_assert_eq!(billed, expected);
            let prepaid: Decimal = charges.iter().filter(|ch| ch.tenant == "prepaid").map(|ch| ch.amount).sum();
            prop_assert_eq!(p.wallets().balance("prepaid", "USD"), truth.top_ups - prepaid);
            let dead: Vec<i64> = out.iter().flat_map(|e| e.dead_letters.iter().map(|d| d.source_offset)).collect();
            prop_assert_eq!(dead, truth.refused.clone());
        }
    }
}

#[test]
fn verdicts_name_what_happened_to_each_record() {
    let c = catalog();
    let mut p = RaterPartition::new(config());
    let a = MeterAggregate { seq: 1, emitted_at: nov() + MINUTE, ..aggregate("t", nov(), 0, Decimal::TEN, Decimal::ZERO) };
    let payload = a.to_avro().unwrap();
    let tag = auth::sign(&key(), &[auth::PURPOSE_AGGREGATE, &payload]);
    fn rec<'a>(offset: i64, payload: &'a [u8], tag: Option<&'a [u8]>) -> AggregateRecord<'a> {
        AggregateRecord { offset, payload, broker_ms: None, tag, rerate_tag: None }
    }
    let forged = p.on_aggregate(&c, rec(0, &payload, None)).unwrap();
    assert_eq!(forged.verdict, Verdict::Refused("unauthenticated"));
    assert_eq!(forged.out.dead_letters[0].source_topic, "aggs");
    let step = p.on_aggregate(&c, rec(1, &payload, Some(&tag))).unwrap();
    assert_eq!(step.verdict, Verdict::Charged);
    assert_eq!(step.out.charges[0].amount, Decimal::from_str("0.1").unwrap());
    assert_eq!(step.settled.as_ref(), Some(&a));
    assert_eq!(p.on_aggregate(&c, rec(1, &payload, Some(&tag))).unwrap().verdict, Verdict::Replayed);
    assert_eq!(p.on_aggregate(&c, rec(2, &payload, Some(&tag))).unwrap().verdict, Verdict::Skipped, "same seq at a new offset");
    assert_eq!(p.aggregates_next(), 3);
    assert_eq!(p.totals().values().map(|t| t.revenue).sum::<Decimal>(), Decimal::from_str("0.1").unwrap());
}

/// The JSON checkpoint the rater service wrote before the partition moved to core (state
/// version 1, totals keyed `currency\u{1f}meter\u{1f}plan`).
fn legacy_json(p: &RaterPartition, version: u32) -> Vec<u8> {
    let totals: serde_json::Map<String, serde_json::Value> = p
        .totals()
        .iter()
        .map(|(k, t)| (format!("{}\u{1f}{}\u{1f}{}", k.currency, k.meter, k.plan), serde_json::to_value(t).unwrap()))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "version": version,
        "aggregates_next": p.aggregates_next(),
        "wallet_next": p.wallet_next(),
        "rating": p.rating(),
        "wallets": p.wallets(),
        "totals": totals,
        "advanced_to": p.last_tick().unwrap_or(i64::MIN),
    }))
    .unwrap()
}

#[test]
fn json_checkpoints_of_the_old_rater_restore_and_other_versions_are_refused() {
    let c = catalog();
    let ops: Vec<Op> = (0..40)
        .map(|i| match i % 5 {
            0 => Op::TopUp { key: i % 3, cents: 700 },
            1 => Op::Advance { hours: 100 },
            _ => Op::Window { tenant: i % 2, late: 3, cents: 150 * i as i64 },
        })
        .collect();
    let (inputs, _) = build(&ops, false);
    let cut = inputs.len() / 2;
    let mut straight = RaterPartition::new(config());
    let want = feed(&mut straight, &c, &inputs, &mut i64::MIN.clone());

    let mut first = RaterPartition::new(config());
    let mut got = feed(&mut first, &c, &inputs[..cut], &mut i64::MIN.clone());
    let json = legacy_json(&first, 1);
    let mut resumed = RaterPartition::restore(config(), &json).unwrap();
    assert_eq!((resumed.aggregates_next(), resumed.wallet_next()), (first.aggregates_next(), first.wallet_next()));
    assert_eq!(resumed.totals(), first.totals());
    assert_eq!(resumed.rating(), first.rating());
    assert_eq!(resumed.wallets(), first.wallets());
    got.extend(feed(&mut resumed, &c, &inputs[cut..], &mut i64::MIN.clone()));
    let charges = |e: &[Emitted]| e.iter().flat_map(|e| e.charges.clone()).collect::<Vec<_>>();
    assert!(!charges(&want).is_empty());
    assert_eq!(charges(&got), charges(&want), "the JSON state rates on exactly like the one it was taken from");

    let err = RaterPartition::restore(config(), &legacy_json(&first, 2)).unwrap_err().to_string();
    assert!(err.contains("rater JSON state version 2 is not supported"), "{err}");
    let mut newer = first.snapshot();
    newer[8] = 9;
    let err = RaterPartition::restore(config(), &newer).unwrap_err().to_string();
    assert!(err.contains("unsupported snapshot version 9 of MFRATERS"), "{err}");
    let err = RaterPartition::restore(config(), b"MFENGSNP\x04\0\0\0engine state").unwrap_err().to_string();
    assert!(err.contains("not a MFRATERS state"), "{err}");
}

#[test]
fn old_rater_json_with_wallets_from_before_credit_grants_gets_a_paid_grant_or_arrears() {
    // A rater checkpoint whose wallets predate credit grants: balances, no accounts.
    let rating = serde_json::to_value(meterflow_core::rating::RatingState::new(3, RatingConfig::default())).unwrap();
    let old = serde_json::json!({
        "version": 1, "aggregates_next": 7, "wallet_next": 2, "rating": rating, "totals": {}, "advanced_to": i64::MIN,
        "wallets": {
            "config": {"low_balance": {}, "tenant_low_balance": {}},
            "balances": {"a": {"USD": "12.5"}, "b": {"USD": "-3"}},
            "seen": {"a": {"k": {"currency": "USD", "amount": "12.5"}}},
            "duplicates": 0,
        },
    });
    let p = RaterPartition::restore(config(), &serde_json::to_vec(&old).unwrap()).unwrap();
    let w = p.wallets();
    assert_eq!(w.account_of("a", "USD").unwrap().unused(meterflow_core::rating::CreditKind::Paid), Decimal::from_str("12.5").unwrap());
    assert_eq!(w.account_of("b", "USD").unwrap().arrears, Decimal::from(3));
    assert_eq!(w.balance("a", "USD"), Decimal::from_str("12.5").unwrap());
    // Restored once, it snapshots in the current format and restores to itself.
    let again = RaterPartition::restore(config(), &p.snapshot()).unwrap();
    assert_eq!(again.wallets(), p.wallets());
    assert_eq!((again.aggregates_next(), again.wallet_next()), (7, 2));
}
