//! The engine's snapshot format: exact restore, refusal of garbage, and the versions older
//! releases wrote (1, 3) restoring to the state the current format (4) holds.

use super::*;
use crate::engine::snapshot::{checksum, Writer, MAGIC};

/// Snapshot bytes of `version` around `body`, as that release sealed them.
fn sealed(version: u32, body: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(body);
    let sum = checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

#[test]
fn version_1_snapshots_restore_when_their_dedup_state_is_empty() {
    // A partition that has seen only ticks: its dedup section is empty in both formats.
    let mut h = H::new(immediate());
    h.e.on_tick(0, 1_000_000, &mut h.store).unwrap();
    let v2 = h.e.snapshot();
    // v2's empty dedup section: key, bucket, now, cold_below, 6 stats, base, 3 counts, late group.
    let section_v2 = 16 + 8 + 9 + 8 + 6 * 8 + 8 + 3 * 4 + 8 + 8 + 4;
    let body = &v2[12..v2.len() - 8];
    // Version 4 appends first_offset (Some(0): 9 bytes) after the output count.
    let prefix = &body[..body.len() - 9 - 4 - section_v2];
    let mut w = Writer::default();
    w.bytes(prefix);
    w.u128(42);
    w.i64(60_000);
    w.i64(i64::MIN);
    w.opt_i64(Some(1_000_000));
    for _ in 0..5 {
        w.u64(0);
    }
    w.len(0); // no buckets
    w.len(0); // no output
    let body1 = w.into_inner();
    let back = PartitionEngine::restore(&sealed(1, &body1), catalog(), h.e.config().clone()).unwrap();
    assert_eq!(back.snapshot(), v2, "same state as the current snapshot");
    for v in [2, 5] {
        let err = PartitionEngine::restore(&sealed(v, &body1), catalog(), h.e.config().clone()).unwrap_err();
        assert!(err.to_string().contains(&format!("unsupported snapshot version {v}")), "{err}");
    }
}

#[test]
fn snapshot_restores_exactly_and_rejects_garbage() {
    let mut h = H::new(EngineConfig {
        restate_interval_ms: 1_000,
        ..EngineConfig::default()
    });
    for i in 0..50 {
        let m = ["tokens", "requests", "lo", "hi", "mean", "users", "gauge"][i % 7];
        h.send(&ev(&format!("e{i}"), m, &format!("{}.5", i), (i as i64) * 3_000).dim("user", &format!("u{}", i % 3)));
    }
    h.send(&ev("late", "tokens", "1", 0)); // dirty, pending
    let snap = h.e.snapshot();
    let back = PartitionEngine::restore(&snap, catalog(), h.e.config().clone()).unwrap();
    assert_eq!(back.snapshot(), snap, "restore loses nothing");
    assert_eq!(back.next_offset(), h.e.next_offset());
    assert_eq!(back.stats(), h.e.stats());
    assert_eq!(back.output(), h.e.output());
    assert_eq!(back.dedup().key(), 42);

    let cfg = EngineConfig::default();
    for garbage in [&b""[..], b"MFENGSNP", b"hello world, this is not a snapshot"] {
        assert!(matches!(PartitionEngine::restore(garbage, catalog(), cfg.clone()), Err(Error::Snapshot(_))));
    }
    for cut in [snap.len() - 1, snap.len() / 2, 13] {
        assert!(matches!(PartitionEngine::restore(&snap[..cut], catalog(), cfg.clone()), Err(Error::Snapshot(_))));
    }
    for i in (0..snap.len()).step_by(7) {
        let mut bad = snap.clone();
        bad[i] ^= 0x10;
        assert!(matches!(PartitionEngine::restore(&bad, catalog(), cfg.clone()), Err(Error::Snapshot(_))), "flip at {i}");
    }
    // A meter whose definition changed cannot be restored into.
    let changed = Arc::new(MeterCatalog::from_toml_str(&METERS.replacen("group_by = [\"model\"]", "group_by = [\"region\"]", 1)).unwrap());
    assert!(matches!(PartitionEngine::restore(&snap, changed, cfg.clone()), Err(Error::Snapshot(_))));
}

#[test]
fn version_3_snapshots_restore_with_first_offset_derived() {
    let mut h = H::new(EngineConfig { restate_interval_ms: 1_000, ..EngineConfig::default() });
    for i in 0..40 {
        let m = ["tokens", "requests", "lo", "hi", "mean", "users", "gauge"][i % 7];
        h.send(&ev(&format!("e{i}"), m, &format!("{}.25", i), (i as i64) * 2_000).dim("user", &format!("u{}", i % 3)));
    }
    let v4 = h.e.snapshot();
    assert_eq!(h.e.stats().first_offset, Some(0));
    // Version 4 appended `first_offset` (Some(0): 9 bytes) to the version 3 body.
    let body = &v4[12..v4.len() - 8];
    let v3 = sealed(3, &body[..body.len() - 9]);
    let back = PartitionEngine::restore(&v3, catalog(), h.e.config().clone()).unwrap();
    assert_eq!(back.snapshot(), v4, "derived from the record count: the same state as version 4 holds");
}
