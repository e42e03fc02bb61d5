//! Memory per window, measured: the resident set growth of this process while one partition
//! engine opens 400,000 windows (one tenant, a new `model` value per event, as in a
//! cardinality flood), divided by the windows. The only test in its binary, so nothing else
//! allocates meanwhile. Prints the figure (docs/design.md "Memory limits" quotes it) and fails if it
//! grows past 512 bytes per window.
#![allow(clippy::expect_used, reason = "an integration test: its helpers' expects are the test's assertions")]

use std::sync::Arc;

use meterflow_core::engine::{EngineConfig, MemoryStore, Outcome, PartitionEngine};
use meterflow_core::meter::MeterCatalog;
use meterflow_core::UsageEventRef;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("statm resident");
    pages * 4096
}

#[test]
fn bytes_per_window() {
    const N: usize = 400_000;
    let cat = Arc::new(
        MeterCatalog::from_toml_str(
            "[[meter]]\nname = \"input_tokens\"\naggregation = \"sum\"\ngroup_by = [\"model\", \"region\"]\nwindow = \"minute\"\nallowed_lateness = \"10s\"\n",
        )
        .unwrap(),
    );
    let cfg = EngineConfig {
        max_windows: usize::MAX,
        max_open_windows_per_tenant: usize::MAX,
        ..EngineConfig::default()
    };
    // A store that forgets (no reloads happen: every window is new and open).
    let mut store = MemoryStore::new(&cat);
    let mut e = PartitionEngine::with_dedup_key(cat, cfg, 0, 7).unwrap();
    let ids: Vec<String> = (0..N).map(|i| format!("event-{i:08}")).collect();
    let models: Vec<String> = (0..N).map(|i| format!("model-{i:08}")).collect();
    let before = rss_bytes();
    let dedup_before = e.dedup().hot_ids();
    for i in 0..N {
        let ev = UsageEventRef {
            event_id: &ids[i],
            tenant: "tenant-0001",
            meter: "input_tokens",
            quantity: "1250",
            event_time_ms: 1_764_000_000_000 + (i % 50_000) as i64,
            dimensions: vec![("model", &models[i]), ("region", "eu-west-1")],
            provider_cost: Some("0.0125"),
            source: "",
        };
        assert_eq!(e.on_event(i as i64, &ev, &mut store).unwrap(), Outcome::Accepted);
    }
    let after = rss_bytes();
    assert_eq!(e.windows_in_memory(), N);
    assert_eq!(e.open_windows(), N);
    // The dedup tier holds the N ids too (~16-20 bytes each, its own figure): subtract it.
    let ids_bytes = (e.dedup().hot_ids() - dedup_before) as u64 * 20;
    let per_window = (after - before).saturating_sub(ids_bytes) as f64 / N as f64;
    eprintln!(
        "RSS +{} MiB for {N} windows and ids: ~{per_window:.0} bytes per window (ids counted at 20 bytes); \
         snapshot {} bytes per window",
        (after - before) >> 20,
        e.snapshot().len() / N
    );
    assert!(per_window < 512.0, "{per_window:.0} bytes per window");
}
