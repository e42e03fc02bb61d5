//! Deltas are proportional to the change, not to the state.

use super::*;

#[test]
fn a_delta_after_ten_events_on_a_million_ids_is_small() {
    let cat = catalog();
    let mut store = MemoryStore::new(&cat);
    let mut e = PartitionEngine::with_dedup_key(cat.clone(), EngineConfig::default(), 0, 42).unwrap();
    let t0 = 1_800_000_000_000;
    let mut id = String::new();
    let send = |e: &mut PartitionEngine, store: &mut MemoryStore, i: i64, id: &mut String| {
        use std::fmt::Write;
        id.clear();
        write!(id, "e{i}").unwrap();
        let ev = UsageEventRef {
            event_id: id,
            tenant: "acme",
            meter: "requests",
            quantity: "1",
            event_time_ms: t0 + i,
            dimensions: Vec::new(),
            provider_cost: None,
            source: "",
        };
        assert_eq!(e.on_event(i, &ev, store).unwrap(), Outcome::Accepted);
        // As the service does: emitted aggregates go out with every batch.
        e.drain_output().for_each(drop);
    };
    const N: i64 = 1_000_000;
    for i in 0..N {
        send(&mut e, &mut store, i, &mut id);
    }
    let base = e.snapshot_marked();
    assert!(base.len() > 16 * N as usize, "the base holds every id: {} bytes", base.len());
    for i in N..N + 10 {
        send(&mut e, &mut store, i, &mut id);
    }
    let delta = e.checkpoint_delta().unwrap();
    // Ten dedup ids (about 15 bytes each), one window, the header and the meter list.
    assert!(delta.len() < 2_048, "delta of 10 events is {} bytes", delta.len());
    let empty = e.checkpoint_delta().unwrap();
    assert!(empty.len() < delta.len() - 10 * 15, "nothing changed: {} bytes", empty.len());

    let mut back = PartitionEngine::restore(&base, cat, EngineConfig::default()).unwrap();
    back.apply_delta(&delta).unwrap();
    back.apply_delta(&empty).unwrap();
    assert_eq!(back.snapshot(), e.snapshot());
    assert_eq!(back.stats().accepted, N as u64 + 10);
}

#[test]
fn deltas_need_a_marked_checkpoint() {
    let mut h = H::new(immediate());
    h.send(&ev("a", "requests", "1", 1_000));
    assert!(!h.e.tracks_deltas());
    assert!(matches!(h.e.checkpoint_delta(), Err(Error::Snapshot(_))));
    let base = h.e.snapshot_marked();
    assert!(h.e.tracks_deltas());
    h.send(&ev("b", "requests", "1", 2_000));
    let delta = h.e.checkpoint_delta().unwrap();
    assert!(crate::engine::is_delta(&delta) && !crate::engine::is_delta(&base));
}

#[test]
fn varints_round_trip_and_overlong_ones_are_refused() {
    use crate::engine::snapshot::{Reader, Writer};
    let values = [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX - 1, u64::MAX];
    let mut w = Writer::default();
    for v in values {
        w.uvarint(v);
    }
    let bytes = w.into_inner();
    assert_eq!(bytes[0], 0, "zero is one byte");
    let mut r = Reader::new(&bytes);
    for v in values {
        assert_eq!(r.uvarint().unwrap(), v);
    }
    assert_eq!(r.remaining(), 0);
    // 11 continuation bytes, a tenth byte above 1, a truncated one.
    for bad in [&[0xFFu8; 11][..], &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02][..], &[0x80][..]] {
        assert!(matches!(Reader::new(bad).uvarint(), Err(Error::Snapshot(_))), "{bad:?}");
    }
}
