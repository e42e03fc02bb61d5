//! Throughput of the aggregator's hot path on one thread: Avro decode + dedup + window
//! aggregation, over ~2M realistic events. Prints a table.
//!
//! `cargo bench -p meterflow-core --bench core_bench` (env `EVENTS=n` to change the count).
//!
//! The input is built like production traffic on one partition: ~1000 tenants with a Zipf
//! (s = 1.1) skew, the four meters of config/meters.toml, 2M events over 4 hours of event time
//! with ±2 s producer jitter, 10% duplicates (retries shortly after the original, same event
//! time), 1% late events (30 s to 10 min, so they restate closed windows), all encoded as Avro
//! single-object bytes by `UsageEventCodec::encode`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use meterflow_core::codec::{Framing, UsageEventCodec};
use meterflow_core::engine::{EngineConfig, MemoryStore, Outcome, PartitionEngine};
use meterflow_core::meter::MeterCatalog;
use meterflow_core::UsageEvent;
use rust_decimal::Decimal;

const METERS_TOML: &str = include_str!("../../../config/meters.toml");
const TENANTS: usize = 1000;
const SPAN_MS: i64 = 4 * 3_600_000;
const START_MS: i64 = 1_767_225_600_000; // 2026-01-01

/// SplitMix64: deterministic and dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Encoded events, back to back.
struct Input {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Input {
    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let s = &self.bytes[start..end];
            start = end;
            s
        })
    }
}

fn generate(n: usize) -> Input {
    let codec = UsageEventCodec::new();
    let mut rng = Rng(0x5eed);
    // Zipf CDF over tenants.
    let weights: Vec<f64> = (1..=TENANTS).map(|r| 1.0 / (r as f64).powf(1.1)).collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(TENANTS);
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cdf.push(acc);
    }
    let tenants: Vec<String> = (0..TENANTS).map(|i| format!("tenant-{i:04}")).collect();
    let models = ["gpt-large", "gpt-small", "embed-3", "vision-2", "code-1"];
    let regions = ["eu-west-1", "us-east-1", "ap-south-1"];
    let gpus = ["a100", "h100", "l4"];

    let mut input = Input {
        bytes: Vec::with_capacity(n * 150),
        ends: Vec::with_capacity(n),
    };
    let mut recent: Vec<(usize, usize)> = Vec::with_capacity(1024); // (start, end) of recent originals
    let mut i = 0u64;
    while input.ends.len() < n {
        let start = input.bytes.len();
        // 10% duplicates: a retry of a recent event, byte for byte.
        if !recent.is_empty() && rng.below(10) == 0 {
            let (s, e) = recent[rng.below(recent.len() as u64) as usize];
            input.bytes.extend_from_within(s..e);
            input.ends.push(input.bytes.len());
            continue;
        }
        i += 1;
        let progress = input.ends.len() as f64 / n as f64;
        let mut t = START_MS + (progress * SPAN_MS as f64) as i64 + rng.below(4_000) as i64 - 2_000;
        if rng.below(100) == 0 {
            t -= 30_000 + rng.below(570_000) as i64; // late: restates a closed window
        }
        let u = rng.unit();
        let tenant = &tenants[cdf.partition_point(|&c| c < u).min(TENANTS - 1)];
        let model = models[rng.below(models.len() as u64) as usize];
        let id = format!("{:016x}{:016x}", rng.next(), i);
        let ev = match rng.below(10) {
            0..=2 => UsageEvent::new(id, tenant.as_str(), "input_tokens", Decimal::from(1 + rng.below(4000)), t)
                .with_dimension("model", model)
                .with_dimension("region", regions[rng.below(3) as usize])
                .with_provider_cost(Decimal::new(1 + rng.below(999_999) as i64, 9)),
            3..=5 => UsageEvent::new(id, tenant.as_str(), "output_tokens", Decimal::from(1 + rng.below(2000)), t)
                .with_dimension("model", model)
                .with_dimension("region", regions[rng.below(3) as usize])
                .with_provider_cost(Decimal::new(1 + rng.below(999_999) as i64, 9)),
            6..=8 => UsageEvent::new(id, tenant.as_str(), "requests", Decimal::ONE, t)
                .with_dimension("model", model)
                .with_dimension("region", regions[rng.below(3) as usize]),
            _ => UsageEvent::new(id, tenant.as_str(), "gpu_seconds", Decimal::new(rng.below(10_000_000) as i64, 6), t)
                .with_dimension("model", model)
                .with_dimension("gpu", gpus[rng.below(3) as usize]),
        }
        .with_source("gateway-7");
        codec.encode(&ev, Framing::SingleObject, &mut input.bytes);
        input.ends.push(input.bytes.len());
        if recent.len() < 1024 {
            recent.push((start, input.bytes.len()));
        } else {
            recent[rng.below(1024) as usize] = (start, input.bytes.len());
        }
    }
    input
}

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[derive(Default)]
struct RunResult {
    secs: f64,
    accepted: u64,
    duplicates: u64,
    rejected: u64,
    aggregates: u64,
    restatements: u64,
    hot_ids: usize,
    bytes_per_id: f64,
    hot_bytes: usize,
    rss_delta: Option<u64>,
    windows: usize,
}

fn run_engine(input: &Input, catalog: &Arc<MeterCatalog>) -> RunResult {
    let codec = UsageEventCodec::new();
    let mut store = MemoryStore::new(catalog);
    let rss_before = rss_bytes();
    let mut engine = PartitionEngine::with_dedup_key(catalog.clone(), EngineConfig::default(), 0, 7).unwrap();
    let mut aggregates = 0u64;
    let started = Instant::now();
    for (offset, bytes) in input.iter().enumerate() {
        match codec.decode(bytes) {
            Ok(ev) => {
                let o = engine.on_event(offset as i64, &ev, &mut store).unwrap();
                black_box(&o);
                debug_assert!(!matches!(o, Outcome::Rejected { .. }));
            }
            Err(_) => {
                engine.on_skipped(offset as i64);
            }
        }
        for a in engine.drain_output() {
            aggregates += 1;
            black_box(a);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let st = *engine.stats();
    let rss_after = rss_bytes();
    RunResult {
        secs,
        accepted: st.accepted,
        duplicates: st.duplicates,
        rejected: st.rejected_total(),
        aggregates,
        restatements: st.restatements,
        hot_ids: engine.dedup().hot_ids(),
        bytes_per_id: engine.dedup().bytes_per_id(),
        hot_bytes: engine.dedup().hot_bytes(),
        rss_delta: rss_before.zip(rss_after).map(|(b, a)| a.saturating_sub(b)),
        windows: engine.windows_in_memory(),
    }
}

fn row(name: &str, events: usize, secs: f64) {
    println!(
        "| {name:<36} | {events:>10} | {:>9.1} | {:>9.1} | {:>12.0} |",
        secs * 1e3,
        secs * 1e9 / events as f64,
        events as f64 / secs
    );
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let n: usize = std::env::var("EVENTS").ok().and_then(|s| s.parse().ok()).unwrap_or(2_000_000);
    let catalog = Arc::new(MeterCatalog::from_toml_str(METERS_TOML).unwrap());
    let t = Instant::now();
    let input = generate(n);
    println!(
        "generated {n} events ({:.0} MB of Avro, {:.0} bytes/event) in {:.1} s",
        input.bytes.len() as f64 / 1e6,
        input.bytes.len() as f64 / n as f64,
        t.elapsed().as_secs_f64()
    );

    let codec = UsageEventCodec::new();
    let mut decode_secs = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        for bytes in input.iter() {
            black_box(codec.decode(black_box(bytes)).unwrap());
        }
        decode_secs = decode_secs.min(started.elapsed().as_secs_f64());
    }

    let mut runs: Vec<RunResult> = (0..3).map(|_| run_engine(&input, &catalog)).collect();
    runs.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    let best = &runs[0];
    let median = &runs[1];

    println!();
    println!("| {:<36} | {:>10} | {:>9} | {:>9} | {:>12} |", "phase (one thread)", "events", "ms", "ns/event", "events/s");
    println!("|{:-<38}|{:-<12}|{:-<11}|{:-<11}|{:-<14}|", "", "", "", "", "");
    row("decode only (best of 3)", n, decode_secs);
    row("decode + dedup + aggregate (best)", n, best.secs);
    row("decode + dedup + aggregate (median)", n, median.secs);
    row("dedup + aggregate only (best - decode)", n, (best.secs - decode_secs).max(1e-9));
    println!();
    println!(
        "outcomes: accepted {}, duplicates {}, rejected {}; aggregates emitted {} (restatements {}); windows in memory at end {}",
        best.accepted, best.duplicates, best.rejected, best.aggregates, best.restatements, best.windows
    );
    println!(
        "dedup: {} ids remembered, {:.1} MiB hot, {:.1} bytes/id (accounting: table allocations + vector capacities + per-bucket overhead)",
        best.hot_ids,
        best.hot_bytes as f64 / (1 << 20) as f64,
        best.bytes_per_id
    );
    if let Some(rss) = median.rss_delta {
        println!(
            "RSS growth during a run: {:.1} MiB = {:.1} bytes per remembered id (upper bound: includes windows and allocator slack; 0 if reused from an earlier run)",
            rss as f64 / (1 << 20) as f64,
            rss as f64 / best.hot_ids.max(1) as f64
        );
    }
    let target = 1_000_000.0;
    let rate = n as f64 / best.secs;
    println!(
        "target ≥ {:.0} events/s/core: {}",
        target,
        if rate >= target { "met" } else { "NOT met" }
    );
}
