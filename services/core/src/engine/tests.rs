//! Unit tests of the engine's edge cases (properties are in tests/engine_props.rs).

use std::str::FromStr;
use std::sync::Arc;

use rust_decimal::Decimal;

use super::*;
use crate::meter::MeterCatalog;

/// Snapshot format: exact restore, corruption, and the versions older releases wrote.
mod snapshot;
/// Incremental checkpoints: size and arming.
mod delta;

const METERS: &str = r#"
[[meter]]
name = "tokens"
aggregation = "sum"
group_by = ["model"]
window = 60
allowed_lateness = "10s"
max_future = "1h"

[[meter]]
name = "requests"
aggregation = "count"
window = 60
allowed_lateness = "10s"
max_future = "1h"

[[meter]]
name = "lo"
aggregation = "min"
window = 60
allow_negative = true
max_future = "1h"

[[meter]]
name = "hi"
aggregation = "max"
window = 60
max_future = "1h"

[[meter]]
name = "mean"
aggregation = "avg"
window = 60
max_future = "1h"

[[meter]]
name = "users"
aggregation = "unique_count"
unique_dimension = "user"
window = 60
max_future = "1h"

[[meter]]
name = "gauge"
aggregation = "latest"
window = 60
max_future = "1h"
"#;

fn catalog() -> Arc<MeterCatalog> {
    Arc::new(MeterCatalog::from_toml_str(METERS).unwrap())
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

#[derive(Clone, Debug)]
struct Ev {
    id: String,
    tenant: String,
    meter: String,
    quantity: String,
    time: i64,
    dims: Vec<(String, String)>,
    cost: Option<String>,
}

fn ev(id: &str, meter: &str, q: &str, time: i64) -> Ev {
    Ev {
        id: id.into(),
        tenant: "acme".into(),
        meter: meter.into(),
        quantity: q.into(),
        time,
        dims: vec![("model".into(), "m1".into())],
        cost: None,
    }
}

impl Ev {
    fn r(&self) -> UsageEventRef<'_> {
        UsageEventRef {
            event_id: &self.id,
            tenant: &self.tenant,
            meter: &self.meter,
            quantity: &self.quantity,
            event_time_ms: self.time,
            dimensions: self.dims.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            provider_cost: self.cost.as_deref(),
            source: "",
        }
    }
    fn dim(mut self, k: &str, v: &str) -> Self {
        self.dims.push((k.into(), v.into()));
        self
    }
    fn cost(mut self, c: &str) -> Self {
        self.cost = Some(c.into());
        self
    }
    fn tenant(mut self, t: &str) -> Self {
        self.tenant = t.into();
        self
    }
}

struct H {
    e: PartitionEngine,
    store: MemoryStore,
    out: Vec<MeterAggregate>,
    offset: i64,
}

impl H {
    fn new(cfg: EngineConfig) -> Self {
        let cat = catalog();
        Self {
            store: MemoryStore::new(&cat),
            e: PartitionEngine::with_dedup_key(cat, cfg, 0, 42).unwrap(),
            out: Vec::new(),
            offset: 0,
        }
    }
    fn drain(&mut self) -> Vec<MeterAggregate> {
        let new: Vec<_> = self.e.drain_output().collect();
        self.store.record_emitted(&new);
        self.out.extend(new.iter().cloned());
        new
    }
    fn send(&mut self, ev: &Ev) -> Outcome {
        let o = self.e.on_event(self.offset, &ev.r(), &mut self.store).unwrap();
        if o == Outcome::Accepted {
            self.store.record_accepted(0, self.offset, &ev.r()).unwrap();
        }
        self.offset += 1;
        o
    }
    fn tick(&mut self, t: i64) -> Vec<MeterAggregate> {
        self.e.on_tick(self.offset, t, &mut self.store).unwrap();
        self.offset += 1;
        self.drain()
    }
}

fn immediate() -> EngineConfig {
    EngineConfig {
        restate_interval_ms: 0,
        ..EngineConfig::default()
    }
}

fn rejected(o: &Outcome) -> Option<RejectReason> {
    match o {
        Outcome::Rejected { reason, .. } => Some(*reason),
        _ => None,
    }
}

#[test]
fn window_closes_at_watermark_then_restates() {
    let mut h = H::new(immediate());
    assert_eq!(h.send(&ev("a", "tokens", "10", 1_000)), Outcome::Accepted);
    assert_eq!(h.send(&ev("b", "tokens", "5", 59_999)), Outcome::Accepted);
    // Window [0, 60s) closes when partition time reaches 60s + 10s lateness.
    assert_eq!(h.send(&ev("c", "tokens", "1", 69_999)), Outcome::Accepted);
    assert!(h.drain().is_empty());
    assert_eq!(h.send(&ev("d", "tokens", "1", 70_000)), Outcome::Accepted);
    let out = h.drain();
    assert_eq!(out.len(), 1);
    let a = &out[0];
    assert_eq!((a.window_start, a.window_end, a.revision), (0, 60_000, 0));
    assert_eq!((a.value, a.previous_value, a.event_count), (d("15"), d("0"), 2));
    assert_eq!(a.seq, 1);
    assert_eq!(a.emitted_at, 60_000);
    assert_eq!(a.dimensions.get("model").map(String::as_str), Some("m1"));
    assert_eq!(a.aggregation, "sum");
    // A late event restates immediately (interval 0) with the full value.
    assert_eq!(h.send(&ev("late", "tokens", "2.5", 30_000)), Outcome::Accepted);
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].revision, out[0].value, out[0].previous_value), (1, d("17.5"), d("15")));
    assert_eq!(out[0].seq, 2);
    // A duplicate of it changes nothing.
    assert_eq!(h.send(&ev("late", "tokens", "2.5", 30_000)), Outcome::Duplicate);
    assert!(h.drain().is_empty());
    let s = h.e.stats();
    assert_eq!((s.accepted, s.duplicates, s.rejected_total(), s.input()), (5, 1, 0, 6));
}

#[test]
fn restatements_are_coalesced_per_interval() {
    let mut h = H::new(EngineConfig {
        restate_interval_ms: 1_000,
        ..EngineConfig::default()
    });
    h.send(&ev("a", "tokens", "1", 0));
    h.send(&ev("b", "tokens", "1", 70_000));
    assert_eq!(h.drain().len(), 1);
    for i in 0..5 {
        h.send(&ev(&format!("late{i}"), "tokens", "1", 10 + i));
    }
    assert!(h.drain().is_empty(), "pending until the next interval boundary");
    h.send(&ev("c", "tokens", "1", 70_500));
    assert!(h.drain().is_empty());
    h.send(&ev("d", "tokens", "1", 71_000));
    let out = h.drain();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].revision, out[0].value, out[0].previous_value), (1, d("6"), d("1")));
    // A tick flushes whatever is pending.
    h.send(&ev("late9", "tokens", "1", 10));
    let out = h.tick(71_001);
    assert_eq!((out[0].revision, out[0].value), (2, d("7")));
}

#[test]
fn validation_rejects_with_typed_reasons() {
    let mut h = H::new(immediate());
    let cases = [
        (ev("x", "tokens", "1", 0).tenant(""), RejectReason::MissingTenant),
        (ev("", "tokens", "1", 0), RejectReason::MissingEventId),
        (ev("x", "nope", "1", 0), RejectReason::UnknownMeter),
        (ev("x", "tokens", "1e3", 0), RejectReason::BadQuantity),
        (ev("x", "tokens", "NaN", 0), RejectReason::BadQuantity),
        (ev("x", "tokens", "0.0000000001", 0), RejectReason::BadQuantity),
        (ev("x", "tokens", "-1", 0), RejectReason::NegativeQuantity),
        (ev("x", "tokens", "1", 0).cost("free"), RejectReason::BadProviderCost),
    ];
    for (e, want) in &cases {
        assert_eq!(rejected(&h.send(e)), Some(*want), "{e:?}");
    }
    // None of them consumed the id "x".
    assert_eq!(h.send(&ev("x", "tokens", "1", 0)), Outcome::Accepted);
    // Negative is fine where allowed; "-0" is not negative.
    assert_eq!(h.send(&ev("n", "lo", "-3", 0)), Outcome::Accepted);
    assert_eq!(h.send(&ev("z", "tokens", "-0", 0)), Outcome::Accepted);
    let s = h.e.stats();
    assert_eq!(s.rejected(RejectReason::BadQuantity), 3);
    assert_eq!(s.input(), cases.len() as u64 + 3);
}

#[test]
fn too_late_and_too_early() {
    let mut h = H::new(EngineConfig {
        dedup_horizon_ms: 86_400_000,
        ..immediate()
    });
    // The first event of a partition is always accepted, whatever its time.
    assert_eq!(h.send(&ev("a", "tokens", "1", 10 * 86_400_000)), Outcome::Accepted);
    // max_future is 1h for tokens.
    assert_eq!(h.send(&ev("b", "tokens", "1", 10 * 86_400_000 + 3_600_000)), Outcome::Accepted);
    assert_eq!(
        rejected(&h.send(&ev("c", "tokens", "1", 10 * 86_400_000 + 2 * 3_600_000 + 1))),
        Some(RejectReason::TooEarly)
    );
    // Horizon: one day behind partition time.
    let now = 10 * 86_400_000 + 3_600_000;
    assert_eq!(h.send(&ev("d", "tokens", "1", now - 86_400_000)), Outcome::Accepted);
    assert_eq!(rejected(&h.send(&ev("e", "tokens", "1", now - 86_400_000 - 1))), Some(RejectReason::TooLate));
    // Absurd times are rejected even on a fresh partition.
    let mut h = H::new(immediate());
    assert_eq!(rejected(&h.send(&ev("f", "tokens", "1", i64::MAX))), Some(RejectReason::TooEarly));
    assert_eq!(rejected(&h.send(&ev("g", "tokens", "1", i64::MIN))), Some(RejectReason::TooLate));
    // A tick establishes partition time, so max_future applies from the first event on.
    h.tick(1_000_000);
    assert_eq!(rejected(&h.send(&ev("h", "tokens", "1", 1_000_000 + 3_600_001))), Some(RejectReason::TooEarly));
    // A tick far ahead does not overflow anything.
    h.tick(i64::MAX);
    assert_eq!(h.e.partition_time(), Some(MAX_ABS_EVENT_TIME_MS));
}

#[test]
fn offsets_must_not_go_backwards() {
    let mut h = H::new(immediate());
    h.e.on_event(5, &ev("a", "tokens", "1", 0).r(), &mut h.store).unwrap();
    assert_eq!(h.e.next_offset(), 6);
    let err = h.e.on_event(5, &ev("b", "tokens", "1", 0).r(), &mut h.store).unwrap_err();
    assert!(matches!(err, Error::OffsetRegression { offset: 5, next_offset: 6, .. }));
    assert!(!h.e.on_skipped(3));
    assert!(h.e.on_skipped(9));
    assert_eq!(h.e.next_offset(), 10);
    assert_eq!(h.e.stats().rejected(RejectReason::Undecodable), 1);
    assert!(h.e.on_tick(9, 0, &mut h.store).is_err());
    assert_eq!(h.e.stats().input(), 2);
}

#[test]
fn only_group_by_dimensions_split_windows_and_missing_is_empty() {
    let mut h = H::new(immediate());
    h.send(&ev("a", "tokens", "1", 0).dim("region", "eu"));
    h.send(&ev("b", "tokens", "2", 0).dim("region", "us"));
    let mut no_model = ev("c", "tokens", "4", 0);
    no_model.dims.clear();
    h.send(&no_model);
    let out = h.tick(100_000);
    assert_eq!(out.len(), 2);
    // Windows closing together come out in the order they were opened.
    assert_eq!(out[0].dimensions.get("model").map(String::as_str), Some("m1"));
    assert_eq!(out[0].value, d("3"));
    assert_eq!(out[0].dimensions.len(), 1);
    assert_eq!(out[1].dimensions.get("model").map(String::as_str), Some(""));
    assert_eq!(out[1].value, d("4"));
}

/// Every aggregation restates exactly after its window was evicted from memory: the store's
/// raw events are folded again.
#[test]
fn evicted_windows_restate_exactly_for_every_aggregation() {
    for meter in ["tokens", "requests", "lo", "hi", "mean", "users", "gauge"] {
        let mut h = H::new(EngineConfig {
            retain_closed_ms: 0,
            ..immediate()
        });
        let base = [("a", "5", 1_000, "u1"), ("b", "1.5", 2_000, "u2"), ("c", "9", 500, "u1")];
        for (id, q, t, u) in base {
            h.send(&ev(id, meter, q, t).dim("user", u).cost("0.1"));
        }
        h.tick(1_000_000);
        assert_eq!(h.e.windows_in_memory(), 0, "{meter}: evicted");
        assert_eq!(h.store.stats.evicted_windows, 1);
        let late = ev("late", meter, "7", 59_000).dim("user", "u3").cost("0.2");
        assert_eq!(h.send(&late), Outcome::Accepted);
        assert_eq!(h.store.stats.window_loads, 1);
        let out = h.drain();
        assert_eq!(out.len(), 1, "{meter}");
        let a = &out[0];
        let (before, after) = match meter {
            "tokens" => ("15.5", "22.5"),
            "requests" => ("3", "4"),
            "lo" => ("1.5", "1.5"),
            "hi" => ("9", "9"),
            "mean" => ("5.166666667", "5.625"),
            "users" => ("2", "3"),
            "gauge" => ("1.5", "7"),
            _ => unreachable!(),
        };
        assert_eq!((a.revision, a.previous_value, a.value), (1, d(before), d(after)), "{meter}");
        assert_eq!((a.event_count, a.provider_cost, a.previous_provider_cost), (4, d("0.5"), d("0.3")));
        // And once more, after another eviction.
        h.tick(2_000_000);
        h.send(&ev("later", meter, "1", 59_500).dim("user", "u3"));
        let out = h.drain();
        assert_eq!((out[0].revision, out[0].previous_value), (2, d(after)), "{meter}");
        assert_eq!(out[0].event_count, 5);
    }
}

#[test]
fn late_event_for_a_window_that_never_existed_is_revision_zero() {
    let mut h = H::new(immediate());
    h.send(&ev("a", "tokens", "1", 1_000_000));
    let late = ev("b", "tokens", "3", 0);
    assert_eq!(h.send(&late), Outcome::Accepted);
    let out = h.drain();
    assert_eq!((out[0].revision, out[0].value, out[0].window_start), (0, d("3"), 0));
    assert_eq!(h.store.stats.window_loads, 0, "within retention nothing is loaded");
}

#[test]
fn overflow_is_rejected_without_consuming_the_id() {
    let mut h = H::new(immediate());
    let big = "79228162514264337593543950335";
    assert_eq!(h.send(&ev("a", "tokens", big, 0)), Outcome::Accepted);
    assert_eq!(rejected(&h.send(&ev("b", "tokens", "1", 0))), Some(RejectReason::BadQuantity));
    assert_eq!(rejected(&h.send(&ev("c", "tokens", "0.5", 0))), Some(RejectReason::BadQuantity));
    // The same id in another window (same bucket) is still accepted: it was never committed.
    assert_eq!(h.send(&ev("b", "tokens", "1", 60_000)), Outcome::Accepted);
}

#[test]
fn dedup_key_is_tenant_meter_and_id_over_the_horizon() {
    let mut h = H::new(immediate());
    assert_eq!(h.send(&ev("a", "tokens", "1", 0)), Outcome::Accepted);
    assert_eq!(h.send(&ev("a", "tokens", "1", 0).tenant("other")), Outcome::Accepted);
    assert_eq!(h.send(&ev("a", "requests", "1", 0)), Outcome::Accepted, "one request id, two meters");
    assert_eq!(h.send(&ev("a", "requests", "1", 5)), Outcome::Duplicate);
    // Retries re-stamped by the producer: 59.9 s -> 60.2 s, and 3 minutes later.
    assert_eq!(h.send(&ev("r", "tokens", "1", 59_900)), Outcome::Accepted);
    assert_eq!(h.send(&ev("r", "tokens", "1", 60_200)), Outcome::Duplicate);
    assert_eq!(h.send(&ev("r", "tokens", "1", 59_900 + 180_000)), Outcome::Duplicate);
}

#[test]
fn fast_decimal_parse_matches_slow_path() {
    let cases = [
        "0", "-0", "1", "-1", "007", "1.5", "1.50", "-0.000000001", "123456789012345678", "12345678901234567.8",
        "999999999.999999999", "1234567890123456789", "-123456789012345678", "1.", ".5", "1e5", "", "-", "--1",
        "1.0000000001", "+1", "1.2.3", "١",
    ];
    for s in cases {
        let fast = parse_decimal("q", s);
        let slow = crate::decimal::parse("q", s);
        assert_eq!(fast, slow, "{s:?}");
        if let (Ok(f), Ok(sl)) = (fast, slow) {
            assert_eq!(f.scale(), sl.scale(), "{s:?}");
            assert_eq!(f.to_string(), sl.to_string(), "{s:?}");
        }
    }
}

#[test]
fn on_watermark_is_pure_and_never_moves_time_back() {
    let mut h = H::new(immediate());
    h.send(&ev("a", "tokens", "1", 0));
    h.e.on_watermark(100_000, &mut h.store);
    assert_eq!(h.drain().len(), 1);
    h.e.on_watermark(50_000, &mut h.store);
    assert_eq!(h.e.partition_time(), Some(100_000));
    assert_eq!(h.e.watermark(), Some(90_000));
    assert_eq!(h.e.meter_watermark("hi"), Some(100_000));
    assert!(h.drain().is_empty());
}

#[test]
fn record_time_bounds_a_fresh_partition() {
    let day = 86_400_000;
    let mut h = H::new(EngineConfig { dedup_horizon_ms: day, ..immediate() });
    let now = 10 * day;
    let send_at = |h: &mut H, e: &Ev, ts: i64| {
        let o = h.e.on_event_at(h.offset, Some(ts), &e.r(), &mut h.store).unwrap();
        if o == Outcome::Accepted {
            h.store.record_accepted(0, h.offset, &e.r()).unwrap();
        }
        h.offset += 1;
        o
    };
    // A first event older than the horizon (by its record's time) is too late, not accepted.
    assert_eq!(rejected(&send_at(&mut h, &ev("old", "tokens", "1", now - day - 1), now)), Some(RejectReason::TooLate));
    // A first event that is merely late does not make the next, current events "too early".
    assert_eq!(send_at(&mut h, &ev("late", "tokens", "1", now - 600_000), now), Outcome::Accepted);
    assert_eq!(send_at(&mut h, &ev("current", "tokens", "1", now), now), Outcome::Accepted);
    // Too early is judged against the record's time (max_future is 1h for tokens).
    assert_eq!(rejected(&send_at(&mut h, &ev("future", "tokens", "1", now + 3_600_001), now)), Some(RejectReason::TooEarly));
    assert_eq!(send_at(&mut h, &ev("soon", "tokens", "1", now + 3_600_000), now), Outcome::Accepted);
}

fn detail(o: &Outcome) -> &str {
    match o {
        Outcome::Rejected { detail, .. } => detail,
        _ => "",
    }
}

#[test]
fn max_quantity_rejects_out_of_range_without_consuming_the_id() {
    let cat = Arc::new(
        MeterCatalog::from_toml_str(
            "[[meter]]\nname = \"tokens\"\naggregation = \"sum\"\nwindow = 60\nallow_negative = true\nmax_quantity = 1000000000\n",
        )
        .unwrap(),
    );
    let mut store = MemoryStore::new(&cat);
    let mut e = PartitionEngine::with_dedup_key(cat, immediate(), 0, 1).unwrap();
    let mut send = |off: i64, id: &str, q: &str| {
        let v = ev(id, "tokens", q, 1_000);
        e.on_event(off, &v.r(), &mut store).unwrap()
    };
    assert_eq!(send(0, "a", "1000000000"), Outcome::Accepted);
    assert_eq!(send(1, "b", "-1000000000"), Outcome::Accepted);
    let o = send(2, "c", "400000000000000000000000");
    assert_eq!(rejected(&o), Some(RejectReason::QuantityOutOfRange));
    assert!(detail(&o).contains("max_quantity 1000000000"), "{}", detail(&o));
    assert_eq!(rejected(&send(3, "d", "-1000000000.000000001")), Some(RejectReason::QuantityOutOfRange));
    // The refused id is not consumed: a corrected retry counts.
    assert_eq!(send(4, "c", "4"), Outcome::Accepted);
}

#[test]
fn large_quantities_without_max_are_exact() {
    // No max_quantity: 1e20 and 4e23 are counted exactly (the window total stays exact).
    let mut h = H::new(immediate());
    assert_eq!(h.send(&ev("a", "tokens", "100000000000000000000", 1_000)), Outcome::Accepted);
    assert_eq!(h.send(&ev("b", "tokens", "400000000000000000000000", 2_000)), Outcome::Accepted);
    h.tick(200_000);
    let a = &h.out[0];
    assert_eq!(a.value, d("400100000000000000000000"));
    assert_eq!(crate::decimal::to_ch_i128(&a.value).unwrap(), 400_100_000_000_000_000_000_000_000_000_000);
}

#[test]
fn per_tenant_open_window_limit_leaves_room_for_others() {
    let mut h = H::new(EngineConfig { max_open_windows_per_tenant: 3, ..immediate() });
    // One tenant, a new `model` value per event: a new window each.
    let flood = |i: usize| {
        let mut e = ev(&format!("f{i}"), "tokens", "1", 1_000);
        e.dims = vec![("model".into(), format!("m{i}"))];
        e
    };
    for i in 0..3 {
        assert_eq!(h.send(&flood(i)), Outcome::Accepted);
    }
    let o = h.send(&flood(3));
    assert_eq!(rejected(&o), Some(RejectReason::WindowLimit));
    assert!(detail(&o).contains("max_open_windows_per_tenant") && detail(&o).contains("\"acme\""), "{}", detail(&o));
    assert_eq!(h.e.open_windows_of("acme"), 3);
    // Its existing windows still count; other tenants open theirs.
    assert_eq!(h.send(&ev("again", "tokens", "5", 2_000)), Outcome::Accepted);
    for i in 0..3 {
        assert_eq!(h.send(&flood(10 + i).tenant("other")), Outcome::Accepted);
    }
    assert_eq!(h.e.open_windows_of("other"), 3);
    // Once its windows close, the tenant opens new ones again, and the refused id was not used.
    h.tick(71_000);
    assert_eq!(h.e.open_windows_of("acme"), 0);
    assert_eq!(h.send(&ev("new", "tokens", "1", 80_000).tenant("acme")), Outcome::Accepted);
    // The refused event's id was not consumed: its retry counts (now a late, closed window,
    // which is not an open one).
    assert_eq!(h.send(&flood(3)), Outcome::Accepted);
    assert_eq!(h.e.stats().rejected(RejectReason::WindowLimit), 1);
}

#[test]
fn partition_window_limit_counts_retained_windows_until_evicted() {
    let mut h = H::new(EngineConfig { max_windows: 4, retain_closed_ms: 60_000, ..immediate() });
    for (i, t) in ["a", "b", "c", "d"].iter().enumerate() {
        assert_eq!(h.send(&ev(&format!("e{i}"), "requests", "1", 1_000).tenant(t)), Outcome::Accepted);
    }
    let o = h.send(&ev("e5", "requests", "1", 1_000).tenant("e"));
    assert_eq!(rejected(&o), Some(RejectReason::WindowLimit));
    assert!(detail(&o).contains("max_windows"), "{}", detail(&o));
    // Closed but retained: still in memory, still counted.
    h.tick(70_000);
    assert_eq!((h.e.open_windows(), h.e.windows_in_memory()), (0, 4));
    assert_eq!(rejected(&h.send(&ev("e6", "requests", "1", 75_000).tenant("e"))), Some(RejectReason::WindowLimit));
    // Evicted after retention: room again.
    h.tick(130_000);
    assert_eq!(h.e.windows_in_memory(), 0);
    assert_eq!(h.send(&ev("e7", "requests", "1", 125_000).tenant("e")), Outcome::Accepted);
    assert!(h.e.windows_in_memory() <= 4);
}

#[test]
fn limits_must_be_positive() {
    let cfg = EngineConfig { max_windows: 0, ..EngineConfig::default() };
    assert!(cfg.validate().is_err());
    let cfg = EngineConfig { max_open_windows_per_tenant: 0, ..EngineConfig::default() };
    assert!(cfg.validate().is_err());
}

/// What one window costs in memory, measured with a counting allocator would need a global
/// allocator; instead this states the inline sizes the README figure is built from.
#[test]
fn window_state_size() {
    let slot = std::mem::size_of::<Option<Window>>();
    eprintln!("Option<Window> {slot} bytes, WindowKey {} bytes", std::mem::size_of::<crate::window::WindowKey>());
    assert!(slot <= 256, "window slot grew to {slot} bytes");
}
