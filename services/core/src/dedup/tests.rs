//! Unit and property tests of the deduplicator. The reference is a plain map
//! `(tenant, meter, id) -> event time of the accepted copy`, with the horizon applied to the
//! copy's event time; the cold store is a list of accepted events, answered like ClickHouse.

use std::collections::HashMap;

use proptest::prelude::*;

use super::cold::search_u32;
use super::table::home;
use super::*;
use crate::engine::snapshot::{Reader, Writer};

/// The accepted raw events, as the aggregator stores them.
#[derive(Default)]
struct Events {
    rows: Vec<(String, String, String, i64, i64)>, // tenant, meter, id, time, offset
    queries: usize,
    evicted_calls: usize,
}

impl ColdStore for Events {
    fn contains(&mut self, q: &ColdQuery<'_>) -> Result<bool> {
        self.queries += 1;
        Ok(self.rows.iter().any(|(t, m, id, time, off)| {
            t == q.tenant && m == q.meter && id == q.event_id && *time >= q.from_ms && *off < q.before.offset
        }))
    }
    fn evicted(&mut self, _cold_before_ms: i64, ids: usize) {
        assert!(ids > 0);
        self.evicted_calls += 1;
    }
}

/// Drives a deduplicator the way the engine does: probe, commit if accepted, record the raw
/// event, advance partition time. Returns true when the event was new.
struct Driver {
    d: Deduplicator,
    store: Events,
    offset: i64,
}

impl Driver {
    fn new(cfg: DedupConfig) -> Self {
        Self {
            d: Deduplicator::with_key(cfg, 0x1234_5678_9abc_def0_0fed_cba9_8765_4321).unwrap(),
            store: Events::default(),
            offset: 0,
        }
    }
    fn pos(&self) -> SourcePos {
        SourcePos {
            partition: 0,
            offset: self.offset,
            next_seq: 1,
        }
    }
    /// `accept = false` models an event rejected after the probe (bad quantity).
    fn send(&mut self, tenant: &str, meter: &str, id: &str, time: i64, accept: bool) -> bool {
        let pos = self.pos();
        self.offset += 1;
        match self.d.probe(tenant, meter, id, time, pos, &mut self.store).unwrap() {
            Probe::Duplicate => false,
            Probe::New(n) => {
                if accept {
                    self.d.commit(n, &mut self.store);
                    self.store.rows.push((tenant.into(), meter.into(), id.into(), time, pos.offset));
                    self.d.advance(time);
                }
                true
            }
        }
    }
    fn see(&mut self, tenant: &str, meter: &str, id: &str, time: i64) -> bool {
        self.send(tenant, meter, id, time, true)
    }
}

const MIN: i64 = 60_000;
const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

#[test]
fn restamped_retry_across_a_minute_is_a_duplicate() {
    for cfg in [
        DedupConfig::default(),
        DedupConfig {
            bucket_ms: MIN,
            horizon_ms: 22 * 86_400_000,
            ..DedupConfig::default()
        },
    ] {
        let mut h = Driver::new(cfg);
        // hh:mm:59.9 then the retry re-stamped hh:(mm+1):00.2.
        assert!(h.see("acme", "requests", "req-1", T0 + 59_900));
        assert!(!h.see("acme", "requests", "req-1", T0 + MIN + 200));
        // Moved 3 minutes, and moved back.
        assert!(h.see("acme", "requests", "req-2", T0 + 10_000));
        assert!(!h.see("acme", "requests", "req-2", T0 + 10_000 + 3 * MIN));
        assert!(!h.see("acme", "requests", "req-2", T0 + 5_000));
        // Moved across the hour and across days, within the horizon.
        assert!(!h.see("acme", "requests", "req-1", T0 + 3_600_000 + 1));
        assert!(!h.see("acme", "requests", "req-1", T0 + 20 * 86_400_000));
        // Other tenants are other ids.
        assert!(h.see("other", "requests", "req-1", T0 + 20 * 86_400_000));
    }
}

#[test]
fn the_meter_is_part_of_the_key() {
    let mut h = Driver::new(DedupConfig::default());
    assert!(h.see("acme", "input_tokens", "req-9", T0));
    assert!(h.see("acme", "output_tokens", "req-9", T0), "a second measurement of one request");
    assert!(!h.see("acme", "input_tokens", "req-9", T0 + 1_000));
    assert!(!h.see("acme", "output_tokens", "req-9", T0 + 2 * MIN));
    // The separators make the concatenation unambiguous.
    let d = &h.d;
    assert_ne!(d.id_hash("a", "b", "c"), d.id_hash("a", "bc", ""));
    assert_ne!(d.id_hash("ab", "c", "d"), d.id_hash("a", "bc", "d"));
}

#[test]
fn hash_paths_agree_and_are_keyed() {
    let d = Deduplicator::with_key(DedupConfig::default(), 7).unwrap();
    let long = "x".repeat(200);
    let mut h = d.sip;
    h.write(long.as_bytes());
    h.write_u8(0xFF);
    h.write(b"m");
    h.write_u8(0xFF);
    h.write(b"id");
    assert_eq!(d.id_hash(&long, "m", "id"), h.finish128().as_u128());
    let mut h = d.sip;
    h.write(b"t\xFFm\xFFid");
    assert_eq!(d.id_hash("t", "m", "id"), h.finish128().as_u128());
    let other = Deduplicator::with_key(DedupConfig::default(), 8).unwrap();
    assert_ne!(d.id_hash("a", "m", "b"), other.id_hash("a", "m", "b"), "keyed");
    assert_ne!(random_key(), random_key());
}

#[test]
fn probe_does_not_remember_until_commit() {
    let mut h = Driver::new(DedupConfig::default());
    assert!(h.send("t", "m", "x", T0, false));
    assert!(h.see("t", "m", "x", T0), "the rejected event did not consume its id");
    assert!(!h.see("t", "m", "x", T0));
}

#[test]
fn ids_are_forgotten_once_their_bucket_leaves_the_horizon() {
    let cfg = DedupConfig {
        bucket_ms: 1_000,
        horizon_ms: 10_000,
        hot_max_ids: 1 << 20,
    };
    let mut h = Driver::new(cfg);
    assert!(h.see("t", "m", "x", 500));
    // Partition time 10,999: floor 999 is in bucket 0, still live.
    h.d.advance(10_999);
    assert!(!h.see("t", "m", "x", 10_999));
    // 11,000: floor 1,000, bucket 0 has left the horizon; the expired copy is not found.
    h.d.advance(11_000);
    assert!(h.see("t", "m", "x", 11_000));
    assert!(!h.see("t", "m", "x", 11_500), "the new copy is remembered");
    assert_eq!(h.d.floor(11_000), 1_000);
    // A long jump purges.
    for i in 0..100 {
        h.see("t", "m", &format!("y{i}"), 12_000);
    }
    h.d.advance(100_000);
    h.see("t", "m", "z", 100_000);
    assert_eq!(h.d.hot_ids(), 1);
    assert!(h.d.stats().expired_ids >= 101);
}

#[test]
fn far_future_ids_use_the_side_map() {
    let cfg = DedupConfig {
        bucket_ms: 1_000,
        horizon_ms: 10_000,
        hot_max_ids: 1 << 20,
    };
    let mut h = Driver::new(cfg.clone());
    assert!(h.see("t", "m", "now", 0));
    let far = 200_000_000; // 200k buckets ahead: beyond the 16-bit range
    let pos = h.pos();
    let Probe::New(n) = h.d.probe("t", "m", "far", far, pos, &mut h.store).unwrap() else {
        panic!("new")
    };
    h.d.commit(n, &mut h.store);
    assert_eq!(h.d.side.len(), 1);
    assert!(!h.send("t", "m", "far", 5, true));
    assert!(!h.send("t", "m", "now", far, true));
    // Snapshot keeps it.
    let mut w = Writer::default();
    h.d.write_snapshot(&mut w);
    let bytes = w.into_inner();
    let mut back = Deduplicator::read_snapshot(cfg, &mut Reader::new(&bytes)).unwrap();
    let mut store = Events::default();
    assert!(matches!(back.probe("t", "m", "far", 7, pos, &mut store).unwrap(), Probe::Duplicate));
    // Once partition time reaches it, a compaction moves it into the table.
    h.d.advance(far);
    h.d.advance(far + 100_000);
    assert!(h.see("t", "m", "far2", far + 100_000));
    assert!(h.d.side.is_empty());
}

#[test]
fn cold_tier_stays_exact_and_asks_only_on_fingerprint_match() {
    let cfg = DedupConfig {
        bucket_ms: 1_000,
        horizon_ms: 1_000_000,
        hot_max_ids: 50,
    };
    let mut h = Driver::new(cfg);
    for i in 0..400i64 {
        assert!(h.see("t", "m", &format!("e{i}"), i * 50));
        assert!(h.d.hot_ids() <= 50);
    }
    assert!(h.d.stats().evicted_ids > 300 && h.store.evicted_calls > 0);
    assert!(h.d.cold_ids() >= 340, "{}", h.d.cold_ids());
    let q0 = h.store.queries;
    // New ids: fingerprints (32 bits) of 350 cold ids almost never match.
    for i in 0..1000 {
        assert!(h.see("t", "m", &format!("new{i}"), 20_000));
    }
    assert!(h.store.queries - q0 <= 2, "{}", h.store.queries - q0);
    // Every old id is still known, re-stamped or not, and only the store could tell.
    let q1 = h.store.queries;
    for i in 0..400i64 {
        assert!(!h.see("t", "m", &format!("e{i}"), 20_000 + i), "{i}");
    }
    assert!(h.store.queries - q1 >= 300);
    // An accepted event in a cold bucket adds a fingerprint.
    assert!(h.see("t", "m", "late", 100));
    assert!(!h.see("t", "m", "late", 25_000));
    assert!(h.d.hot_bytes() > 0 && h.d.cold_bytes() >= 4 * h.d.cold_ids());
}

#[test]
fn table_keeps_order_and_budget() {
    let mut d = Deduplicator::with_key(DedupConfig::default(), 3).unwrap();
    let mut store = Events::default();
    let pos = SourcePos { partition: 0, offset: 0, next_seq: 0 };
    let mut worst: f64 = 0.0;
    for i in 0..300_000u32 {
        let Probe::New(n) = d.probe("t", "m", &i.to_string(), T0, pos, &mut store).unwrap() else {
            panic!("{i}")
        };
        d.commit(n, &mut store);
        if i >= 10_000 {
            worst = worst.max(d.bytes_per_id());
        }
    }
    assert!(worst <= 24.0, "worst {worst} bytes per id");
    let t = &d.table;
    let mut last = 0u128;
    for (i, &e) in t.slots.iter().enumerate() {
        if e != 0 {
            assert!(e > last, "sorted");
            assert!(i >= home(e, t.cap), "at or after home");
            last = e;
        }
    }
    assert_eq!(t.iter().count(), 300_000);
    eprintln!("bytes per id: {:.2} now, {worst:.2} worst after 10k ids", d.bytes_per_id());
}

#[test]
fn interpolation_search_finds_exactly_the_members() {
    let mut v: Vec<u32> = (0..5000u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
    v.sort_unstable();
    for &x in &v {
        assert!(search_u32(&v, x));
        assert!(!search_u32(&v, x.wrapping_add(1)) || v.contains(&x.wrapping_add(1)));
    }
    assert!(!search_u32(&[], 1));
    assert!(search_u32(&[0, 0, 7, u32::MAX], u32::MAX));
}

#[test]
fn snapshot_round_trip_is_byte_identical() {
    let cfg = DedupConfig {
        bucket_ms: 1_000,
        horizon_ms: 100_000,
        hot_max_ids: 30,
    };
    let mut h = Driver::new(cfg.clone());
    for i in 0..200 {
        h.see("t", "m", &format!("e{i}"), i * 700);
    }
    h.see("t", "m", "late", 1_000);
    let mut w = Writer::default();
    h.d.write_snapshot(&mut w);
    let bytes = w.into_inner();
    let back = Deduplicator::read_snapshot(cfg.clone(), &mut Reader::new(&bytes)).unwrap();
    assert_eq!(back.key(), h.d.key());
    assert_eq!(back.hot_ids(), h.d.hot_ids());
    assert_eq!(back.cold_ids(), h.d.cold_ids());
    let mut w2 = Writer::default();
    back.write_snapshot(&mut w2);
    assert_eq!(w2.into_inner(), bytes);
    // Another bucket size is refused.
    let other = DedupConfig { bucket_ms: 2_000, ..cfg };
    assert!(Deduplicator::read_snapshot(other, &mut Reader::new(&bytes)).is_err());
}

fn v1_section(ids: &[u128], cold_below: i64) -> Vec<u8> {
    let mut w = Writer::default();
    w.u128(99);
    w.i64(60_000);
    w.i64(cold_below);
    w.opt_i64(Some(T0));
    for _ in 0..5 {
        w.u64(0);
    }
    w.len(usize::from(!ids.is_empty()));
    if !ids.is_empty() {
        w.i64(T0 / 60_000);
        w.u8(1);
        w.len(ids.len());
        for &id in ids {
            w.u128(id);
        }
    }
    w.into_inner()
}

#[test]
fn version_1_state_is_refused_unless_empty() {
    let cfg = DedupConfig::default();
    let bytes = v1_section(&[1, 2, 3], i64::MIN);
    let err = Deduplicator::read_snapshot_v1(cfg.clone(), &mut Reader::new(&bytes)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("version 1") && msg.contains("3 event ids") && msg.contains("(tenant, meter, event_id)"), "{msg}");
    let bytes = v1_section(&[], 5);
    assert!(Deduplicator::read_snapshot_v1(cfg.clone(), &mut Reader::new(&bytes)).is_err());
    let bytes = v1_section(&[], i64::MIN);
    let mut r = Reader::new(&bytes);
    let d = Deduplicator::read_snapshot_v1(cfg, &mut r).unwrap();
    assert_eq!(r.remaining(), 0);
    assert_eq!((d.key(), d.hot_ids(), d.now), (99, 0, Some(T0)));
}

// ---------------------------------------------------------------------------------------------
// Property test against the reference model.

#[derive(Debug, Clone)]
enum Op {
    /// A new or reused id; `accept = false` is an event rejected after the probe.
    Event { tenant: u8, meter: u8, id: u8, dt: i64, accept: bool },
    /// A retry of the `back`-th most recent event, re-stamped by `shift`.
    Retry { back: usize, shift: i64 },
    Tick(i64),
    SnapshotRestore,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..2, 0u8..2, 0u8..40, -3_000i64..4_000, prop::bool::weighted(0.9))
            .prop_map(|(tenant, meter, id, dt, accept)| Op::Event { tenant, meter, id, dt, accept }),
        4 => (0usize..20, prop_oneof![-2_500i64..2_500, Just(1), Just(-1), Just(180_000), Just(60_000)])
            .prop_map(|(back, shift)| Op::Retry { back, shift }),
        1 => (0i64..30_000).prop_map(Op::Tick),
        1 => Just(Op::SnapshotRestore),
    ]
}

struct Model {
    seen: HashMap<(u8, u8, String), i64>,
    now: Option<i64>,
    cfg: DedupConfig,
}

impl Model {
    fn floor_bucket(&self) -> i64 {
        self.now
            .map_or(i64::MIN, |n| (n - self.cfg.horizon_ms).div_euclid(self.cfg.bucket_ms))
    }
    fn is_dup(&self, k: &(u8, u8, String)) -> bool {
        self.seen
            .get(k)
            .is_some_and(|&t| t.div_euclid(self.cfg.bucket_ms) >= self.floor_bucket())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn matches_the_reference_model(
        ops in prop::collection::vec(op(), 1..400),
        hot_max_ids in prop_oneof![Just(1usize), Just(3), Just(25), Just(1 << 20)],
        bucket_ms in prop_oneof![Just(1_000i64), Just(5_000)],
        horizon_buckets in prop_oneof![Just(2i64), Just(10), Just(100)],
    ) {
        let cfg = DedupConfig { bucket_ms, horizon_ms: horizon_buckets * bucket_ms, hot_max_ids };
        let mut h = Driver::new(cfg.clone());
        let mut m = Model { seen: HashMap::new(), now: None, cfg: cfg.clone() };
        let mut clock = T0;
        let mut history: Vec<(u8, u8, String, i64)> = Vec::new();
        for op in ops {
            let (tenant, meter, id, time, accept) = match op {
                Op::Tick(dt) => {
                    clock += dt;
                    h.d.advance(clock);
                    m.now = Some(m.now.map_or(clock, |n| n.max(clock)));
                    continue;
                }
                Op::SnapshotRestore => {
                    let mut w = Writer::default();
                    h.d.write_snapshot(&mut w);
                    let bytes = w.into_inner();
                    h.d = Deduplicator::read_snapshot(cfg.clone(), &mut Reader::new(&bytes)).unwrap();
                    let mut w2 = Writer::default();
                    h.d.write_snapshot(&mut w2);
                    prop_assert_eq!(w2.into_inner(), bytes);
                    continue;
                }
                Op::Event { tenant, meter, id, dt, accept } => {
                    clock += dt.max(0);
                    (tenant, meter, format!("id{id}"), clock + dt.min(0), accept)
                }
                Op::Retry { back, shift } => {
                    let Some((t, mt, id, time)) = history.iter().rev().nth(back).cloned() else { continue };
                    (t, mt, id, time + shift, true)
                }
            };
            // The engine rejects events older than the horizon before the dedup sees them.
            if m.now.is_some_and(|n| time < n - cfg.horizon_ms) {
                continue;
            }
            let k = (tenant, meter, id.clone());
            let expect_dup = m.is_dup(&k);
            let new = h.send(&format!("t{tenant}"), &format!("m{meter}"), &id, time, accept);
            prop_assert_eq!(new, !expect_dup, "{:?} at {}", k, time);
            if !expect_dup && accept {
                m.seen.insert(k, time);
                m.now = Some(m.now.map_or(time, |n| n.max(time)));
                history.push((tenant, meter, id, time));
            }
            prop_assert!(h.d.hot_ids() <= hot_max_ids);
        }
    }
}

/// The generator does produce what the property is about (duplicates found across buckets,
/// through the cold tier, after expiry).
#[test]
fn property_inputs_cover_the_cases() {
    let cfg = DedupConfig { bucket_ms: 1_000, horizon_ms: 10_000, hot_max_ids: 3 };
    let mut h = Driver::new(cfg);
    let mut cross_bucket_dups = 0;
    for i in 0..200i64 {
        let t = T0 + i * 400;
        h.see("t", "m", &format!("e{i}"), t);
        if i >= 3 && !h.see("t", "m", &format!("e{}", i - 3), t + 1_000) {
            cross_bucket_dups += 1;
        }
    }
    assert!(cross_bucket_dups > 150);
    let st = h.d.stats();
    assert!(st.cold_lookups > 100 && st.evicted_ids > 0, "{st:?}");
}
