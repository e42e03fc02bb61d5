//! Golden replay: one fixed, seeded input stream through the window engine and the rater
//! partition, whose outputs (sequence numbers, revisions, charge ids, amounts) and checkpoint
//! bytes are pinned in `tests/golden/`. Each is checked twice, straight through and with a
//! checkpoint → restore in the middle; both must equal the pinned files, so any change that
//! alters a replay (a charge id, a revision, a byte of a checkpoint) fails here and has to be
//! made on purpose:
//!
//! ```text
//! METERFLOW_BLESS=1 cargo test -p meterflow-core --test golden
//! ```
//!
//! rewrites the files; the diff is then part of the change under review. The stream is built
//! by SplitMix64 (`rand_xoshiro`, a fixed algorithm), not `rand`'s `StdRng`, whose sequence
//! may change between releases.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions: a failed unwrap is a failed run

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use meterflow_core::auth::{self, RecordKey};
use meterflow_core::checkpoint::{config_hash, Envelope, Meta};
use meterflow_core::codec::{Framing, UsageEventCodec};
use meterflow_core::engine::{EngineConfig, MemoryStore, PartitionEngine};
use meterflow_core::meter::MeterCatalog;
use meterflow_core::pricing::{parse_rfc3339_ms, Catalog};
use meterflow_core::rating::partition::{AggregateRecord, Emitted, PartitionConfig, RaterPartition};
use meterflow_core::rating::{Admission, RatingConfig, WalletConfig};
use meterflow_core::records::{AvroRecord, MeterAggregate, WalletAdjustment};
use meterflow_core::UsageEvent;
use rand::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;
use rust_decimal::Decimal;

const SEED: u64 = 0x6d65_7465_7266_6c6f;
const RECORDS: usize = 600;

const METERS: &str = r#"
[[meter]]
name = "tokens"
aggregation = "sum"
group_by = ["model"]
window = 60
allowed_lateness = "30s"
max_future = "1h"

[[meter]]
name = "requests"
aggregation = "count"
window = 60
max_future = "1h"
"#;

const CATALOG: &str = r#"
default_plan = "std"

[[plan]]
id = "std"
currency = "USD"
minimum_commitment = "150"

[[plan.price]]
meter = "tokens"
model = "graduated"
tiers = [ { up_to = "5000", unit_price = "0.002" }, { unit_price = "0.0015" } ]

[[plan.price]]
meter = "requests"
model = "per_unit"
unit_price = "0.01"
"#;

/// A number below `n` from SplitMix64 (a fixed sequence for a fixed seed).
fn below(rng: &mut SplitMix64, n: u64) -> u64 {
    rng.next_u64() % n
}

/// One record of the usage topic.
enum Input {
    Event(Vec<u8>),
    Garbage,
    Tick(i64),
}

/// The usage stream: three tenants over the end of November (so the rater closes a billing
/// period), a late event now and then, re-sent events (duplicates), garbage and idle ticks.
fn usage_stream() -> Vec<Input> {
    let mut rng = SplitMix64::seed_from_u64(SEED);
    let codec = UsageEventCodec::new();
    let start = parse_rfc3339_ms("2026-11-30T23:00:00Z").unwrap();
    let mut sent: Vec<UsageEvent> = Vec::new();
    let mut out = Vec::new();
    for i in 0..RECORDS {
        let now = start + i as i64 * 20_000;
        let input = match below(&mut rng, 40) {
            0 => Input::Garbage,
            1 => Input::Tick(now),
            2..=4 if !sent.is_empty() => {
                let again = sent[below(&mut rng, sent.len() as u64) as usize].clone();
                let mut buf = Vec::new();
                codec.encode(&again, Framing::SingleObject, &mut buf);
                Input::Event(buf)
            }
            _ => {
                let tenant = ["acme", "globex", "initech"][below(&mut rng, 3) as usize];
                let late = if below(&mut rng, 10) == 0 { below(&mut rng, 50_000) as i64 } else { 0 };
                let ev = if below(&mut rng, 3) == 0 {
                    UsageEvent::new(format!("ev-{i}"), tenant, "requests", Decimal::ONE, now - late)
                } else {
                    let model = ["small", "large"][below(&mut rng, 2) as usize];
                    let q = Decimal::new(below(&mut rng, 400_000) as i64, 2);
                    UsageEvent::new(format!("ev-{i}"), tenant, "tokens", q, now - late).with_dimension("model", model)
                };
                let mut buf = Vec::new();
                codec.encode(&ev, Framing::SingleObject, &mut buf);
                sent.push(ev);
                Input::Event(buf)
            }
        };
        out.push(input);
    }
    out
}

fn meters() -> Arc<MeterCatalog> {
    Arc::new(MeterCatalog::from_toml_str(METERS).unwrap())
}

/// A checkpoint as the runtime writes it: the state with the offsets it covers.
fn checkpoint(topic: &str, offsets: &[(&str, i64)], config: &str, state: Vec<u8>) -> Vec<u8> {
    Envelope {
        meta: Meta {
            offsets: offsets.iter().map(|(t, o)| (t.to_string(), *o)).collect(),
            partition_counts: [(topic.to_string(), 4)].into(),
            config_hash: config_hash(config),
            config_text: config.to_owned(),
            operator: None,
        },
        state,
    }
    .encode()
}

struct EngineRun {
    aggregates: Vec<MeterAggregate>,
    checkpoints: Vec<Vec<u8>>,
}

/// Runs the engine over `inputs`, checkpointing (and, when `restore`, restoring from the
/// checkpoint's bytes) at `cut`, then closes every window with a far tick.
fn run_engine(inputs: &[Input], cut: usize, restore: bool) -> EngineRun {
    let (cfg, catalog) = (EngineConfig::default(), meters());
    let codec = UsageEventCodec::new();
    let mut engine = PartitionEngine::with_dedup_key(catalog.clone(), cfg.clone(), 0, 0x5eed).unwrap();
    let mut store = MemoryStore::new(&catalog);
    let mut run = EngineRun { aggregates: Vec::new(), checkpoints: Vec::new() };
    for (i, input) in inputs.iter().enumerate() {
        if i == cut {
            let bytes = checkpoint("usage", &[("usage", engine.next_offset())], METERS, engine.snapshot());
            if restore {
                let env = Envelope::decode(&bytes).unwrap();
                engine = PartitionEngine::restore(&env.state, catalog.clone(), cfg.clone()).unwrap();
            }
            run.checkpoints.push(bytes);
        }
        let offset = i as i64;
        match input {
            Input::Event(b) => {
                let ev = codec.decode(b).unwrap();
                let outcome = engine.on_event(offset, &ev, &mut store).unwrap();
                if outcome == meterflow_core::engine::Outcome::Accepted {
                    store.record_accepted(0, offset, &ev).unwrap();
                }
            }
            Input::Garbage => assert!(engine.on_skipped(offset)),
            Input::Tick(t) => engine.on_tick(offset, *t, &mut store).unwrap(),
        }
        let new: Vec<MeterAggregate> = engine.drain_output().collect();
        store.record_emitted(&new);
        run.aggregates.extend(new);
    }
    let end = engine.partition_time().unwrap() + 86_400_000;
    engine.on_tick(inputs.len() as i64, end, &mut store).unwrap();
    run.aggregates.extend(engine.drain_output());
    run.checkpoints.push(checkpoint("usage", &[("usage", engine.next_offset())], METERS, engine.snapshot()));
    run
}

fn key() -> RecordKey {
    RecordKey::from_bytes(b"golden replay record key, 32 b..").unwrap()
}

fn rater_config() -> PartitionConfig {
    PartitionConfig {
        partition: 0,
        aggregates_topic: "aggregates".into(),
        wallet_topic: "wallet".into(),
        record_key: key(),
        admission: Admission::default(),
        rating: RatingConfig::default(),
        wallets: WalletConfig { low_balance: [("USD".to_string(), Decimal::from(20))].into(), ..WalletConfig::default() },
    }
}

/// The rater's input: the engine's aggregates, signed, with a top-up of a prepaid tenant
/// every 25 aggregates (one re-sent) and one forged aggregate. The broker stamps each
/// aggregate when the aggregator emits it.
enum RaterInput {
    Aggregate { offset: i64, payload: Vec<u8>, tag: Option<Vec<u8>>, broker_ms: i64 },
    TopUp { offset: i64, payload: Vec<u8> },
}

fn rater_stream(aggregates: &[MeterAggregate]) -> Vec<RaterInput> {
    let mut out = Vec::new();
    let (mut agg_offset, mut wallet_offset) = (0, 0);
    for (i, a) in aggregates.iter().enumerate() {
        if i % 25 == 0 {
            let adj = WalletAdjustment {
                idempotency_key: format!("top-up-{}", (i / 25).min(3)),
                tenant: "globex".into(),
                currency: "USD".into(),
                amount: Decimal::from(30),
                kind: "paid".into(),
                reason: "golden".into(),
                created_at: a.emitted_at,
                expires_at: None,
                priority: 0,
            };
            out.push(RaterInput::TopUp { offset: wallet_offset, payload: adj.to_avro().unwrap() });
            wallet_offset += 1;
        }
        let payload = a.to_avro().unwrap();
        let tag = (i != 7).then(|| auth::sign(&key(), &[auth::PURPOSE_AGGREGATE, &payload]).to_vec());
        out.push(RaterInput::Aggregate { offset: agg_offset, payload, tag, broker_ms: a.emitted_at });
        agg_offset += 1;
    }
    out
}

struct RaterRun {
    emitted: Emitted,
    checkpoints: Vec<Vec<u8>>,
}

fn run_rater(inputs: &[RaterInput], cut: usize, restore: bool) -> RaterRun {
    let catalog = Catalog::from_toml_str(CATALOG).unwrap();
    let mut p = RaterPartition::new(rater_config());
    let mut run = RaterRun { emitted: Emitted::default(), checkpoints: Vec::new() };
    let snap = |p: &RaterPartition| {
        let offsets = [("aggregates", p.aggregates_next()), ("wallet", p.wallet_next())];
        checkpoint("aggregates", &offsets, CATALOG, p.snapshot())
    };
    for (i, input) in inputs.iter().enumerate() {
        if i == cut {
            let bytes = snap(&p);
            if restore {
                p = RaterPartition::restore(rater_config(), &Envelope::decode(&bytes).unwrap().state).unwrap();
            }
            run.checkpoints.push(bytes);
        }
        let step = match input {
            RaterInput::Aggregate { offset, payload, tag, broker_ms } => {
                let rec = AggregateRecord { offset: *offset, payload, broker_ms: Some(*broker_ms), tag: tag.as_deref(), rerate_tag: None };
                p.on_aggregate(&catalog, rec).unwrap()
            }
            RaterInput::TopUp { offset, payload } => p.on_adjustment(*offset, payload),
        };
        run.emitted.append(step.out);
    }
    run.emitted.append(p.on_tick(&catalog, parse_rfc3339_ms("2026-12-03T00:00:00Z").unwrap()));
    run.checkpoints.push(snap(&p));
    run
}

fn engine_text(run: &EngineRun) -> String {
    let mut s = String::from("# seq revision tenant meter dimensions window_start window_end value previous_value events cost emitted_at\n");
    for a in &run.aggregates {
        s += &format!(
            "{} {} {} {} {:?} {} {} {} {} {} {} {}\n",
            a.seq, a.revision, a.tenant, a.meter, a.dimensions, a.window_start, a.window_end, a.value, a.previous_value,
            a.event_count, a.provider_cost, a.emitted_at
        );
    }
    s
}

fn rater_text(run: &RaterRun) -> String {
    let e = &run.emitted;
    let mut s = String::from("# charges: seq charge_id kind tenant plan period_start window_start revision quantity amount provider_cost margin\n");
    for c in &e.charges {
        s += &format!(
            "{} {} {} {} {} {} {} {} {} {} {} {}\n",
            c.seq, c.charge_id, c.kind, c.tenant, c.plan, c.period_start, c.window_start, c.revision, c.quantity, c.amount,
            c.provider_cost, c.margin
        );
    }
    s += "# alerts: alert_id kind tenant balance threshold at\n";
    for (a, at) in &e.alerts {
        s += &format!("{} {} {} {} {} {}\n", a.alert_id, a.kind, a.tenant, a.balance, a.threshold, at);
    }
    s += "# ledger: entry_id movement tenant credit_kind grant_key source amount at\n";
    for l in &e.ledger {
        s += &format!("{} {} {} {} {} {} {} {}\n", l.entry_id, l.movement, l.tenant, l.credit_kind, l.grant_key, l.source, l.amount, l.at_ms);
    }
    s += "# adjustments: offset idempotency_key amount\n";
    for a in &e.adjustments {
        s += &format!("{} {} {}\n", a.offset, a.adjustment.idempotency_key, a.adjustment.amount);
    }
    s += "# dead letters: topic offset reason\n";
    for d in &e.dead_letters {
        s += &format!("{} {} {}\n", d.source_topic, d.source_offset, d.reason);
    }
    s
}

/// Checkpoint bytes as hex, 64 bytes a line, one checkpoint after another.
fn hex_lines(checkpoints: &[Vec<u8>]) -> String {
    let mut s = String::new();
    for (i, c) in checkpoints.iter().enumerate() {
        s += &format!("# checkpoint {i}: {} bytes\n", c.len());
        for chunk in c.chunks(64) {
            s += &hex::encode(chunk);
            s.push('\n');
        }
    }
    s
}

/// Compares `actual` with the pinned file, or rewrites it under `METERFLOW_BLESS=1`.
fn pinned(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var("METERFLOW_BLESS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (METERFLOW_BLESS=1 writes it)", path.display()));
    if expected != actual {
        let line = expected.lines().zip(actual.lines()).position(|(a, b)| a != b).unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from this build's replay, first at line {} (expected {:?}, got {:?}). If the change is \
             intended, rerun with METERFLOW_BLESS=1 and review the diff.",
            path.display(),
            line + 1,
            expected.lines().nth(line),
            actual.lines().nth(line)
        );
    }
}

#[test]
fn engine_and_rater_replays_match_the_pinned_fixtures() {
    let inputs = usage_stream();
    let cut = inputs.len() / 2;
    let straight = run_engine(&inputs, cut, false);
    let resumed = run_engine(&inputs, cut, true);
    assert_eq!(engine_text(&resumed), engine_text(&straight), "restore in the middle changes the engine's output");
    assert_eq!(resumed.checkpoints, straight.checkpoints, "restore in the middle changes the engine's checkpoints");
    // The fixture is not trivial: restatements, several tenants and meters, a month boundary.
    assert!(straight.aggregates.iter().any(|a| a.revision > 0));
    assert!(straight.aggregates.len() > 100);
    pinned("engine.txt", &engine_text(&straight));
    pinned("engine.checkpoints.hex", &hex_lines(&straight.checkpoints));

    let rater_inputs = rater_stream(&straight.aggregates);
    let cut = rater_inputs.len() / 2;
    let straight = run_rater(&rater_inputs, cut, false);
    let resumed = run_rater(&rater_inputs, cut, true);
    assert_eq!(rater_text(&resumed), rater_text(&straight), "restore in the middle changes the rater's output");
    assert_eq!(resumed.checkpoints, straight.checkpoints, "restore in the middle changes the rater's checkpoints");
    let kinds: BTreeMap<&str, usize> = straight.emitted.charges.iter().fold(BTreeMap::new(), |mut m, c| {
        *m.entry(c.kind.as_str()).or_default() += 1;
        m
    });
    assert!(kinds.get("true_up").is_some_and(|&n| n > 0), "{kinds:?}");
    assert_eq!(straight.emitted.dead_letters.len(), 1, "the forged aggregate");
    pinned("rater.txt", &rater_text(&straight));
    pinned("rater.checkpoints.hex", &hex_lines(&straight.checkpoints));
}
