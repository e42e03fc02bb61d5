//! Building blocks of the end-to-end scenarios: generate a known workload into a test's
//! topics, then wait until ClickHouse agrees with its ground truth.

use std::time::{Duration, Instant};

use clickhouse::Client;
use meterflow_core::meter::MeterCatalog;
use meterflow_producer::{generate, EventProducer, EventTimeMode, GenerateConfig, GroundTruth, Progress};
use meterflow_runtime::args::KafkaArgs;

use crate::procs::workspace_root;
use crate::verify;

/// The project's meters (config/meters.toml).
pub fn meters() -> anyhow::Result<MeterCatalog> {
    let text = std::fs::read_to_string(workspace_root().join("config/meters.toml"))?;
    Ok(MeterCatalog::from_toml_str(&text)?)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The workload: `events` messages with 10% duplicates, 5% late, 1% malformed and a
/// few too-late ones, event times spread over the hour that ended 30 minutes ago (so idle
/// ticks at wall-clock time close every window).
pub fn workload(events: u64, seed: u64) -> anyhow::Result<GenerateConfig> {
    let mut cfg = GenerateConfig::new(meters()?);
    cfg.events = Some(events);
    cfg.seed = seed;
    cfg.duplicate_rate = 0.10;
    cfg.late_rate = 0.05;
    cfg.malformed_rate = 0.01;
    cfg.too_late_rate = 0.001;
    let now = now_ms();
    cfg.event_time = EventTimeMode::Simulated { start_ms: now - 90 * 60_000, span_ms: 60 * 60_000 };
    Ok(cfg)
}

/// Sends the workload to `topic` and returns its ground truth.
pub async fn produce(kafka: &KafkaArgs, topic: &str, cfg: GenerateConfig) -> anyhow::Result<GroundTruth> {
    let producer = EventProducer::new(kafka, topic)?;
    let gt = generate(cfg, &producer, Progress::Hidden).await?;
    gt.check_consistency()?;
    anyhow::ensure!(gt.counters.send_errors == 0, "{} send errors while producing", gt.counters.send_errors);
    Ok(gt)
}

/// Polls until window totals and dead letters match the ground truth exactly, or fails
/// after `timeout` with the last differences. `check` runs between polls (e.g. to fail fast
/// when a service died).
pub async fn wait_until_exact(
    ch: &Client,
    gt: &GroundTruth,
    usage_topic: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        check()?;
        let windows = verify::window_totals(ch, gt).await;
        let dead = verify::dead_letters(ch, gt, usage_topic).await;
        match (windows, dead) {
            (Ok(w), Ok(d)) if w.ok() && d.ok() => return Ok(()),
            (w, d) if Instant::now() > deadline => {
                w?.into_result("window totals")?;
                d?.into_result("dead letters")?;
                anyhow::bail!("timed out");
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Logs of in-process services go to stderr (shown for failing tests) at `METERFLOW_LOG`
/// level, default `info`.
pub fn init_test_logging() {
    let level = std::env::var("METERFLOW_LOG").unwrap_or_else(|_| "info".into());
    meterflow_runtime::telemetry::init_logging(&meterflow_runtime::args::LogArgs { format: "text".into(), level });
}
