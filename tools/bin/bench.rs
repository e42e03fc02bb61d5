//! `meterflow-bench`: meterflow against the physical limit and against the usual
//! "raw events into ClickHouse" baseline, in one run. Prints a table and writes it as markdown
//! (`target/bench/bench.md`).
//!
//! Everything runs on a private broker (memory storage) and ClickHouse started on free ports
//! under `target/bench/` (the shared instances on 9092/8123 are not touched):
//!
//! 1. **core**: `cargo bench -p meterflow-core --bench core_bench` (decode + dedup + aggregate on
//!    one thread, CPU time), its table parsed.
//! 2. **workload**: `--events` messages of the issue's workload (10% duplicates, 5% late, 1%
//!    malformed, 0.1% too late) produced into the usage topic, with the producer's ground truth.
//! 3. **raw consume**: a plain rdkafka consumer (the aggregator's consumer settings) reads the
//!    topic and does nothing; best of three passes = the physical limit.
//! 4. **end to end**: the aggregator (release binary, default settings but a 1 s idle timeout)
//!    consumes the same topic: events/s from its first record to its last (its
//!    `events_in_total`), then the time until `meter_totals` and `dead_letters` equal the
//!    ground truth exactly. RSS before the first record and at the end, per remembered id.
//! 5. **baseline**: the same messages, decoded and validated like meterflow does (bad ones
//!    dropped) but not deduplicated, inserted raw into `baseline_events` (ReplacingMergeTree on
//!    the event id) with a SummingMergeTree materialized view per tenant/meter/hour; ingest
//!    rate from first record to last insert.
//! 6. **query**: "usage per tenant and meter this month" on `meter_totals` vs the baseline's
//!    dedup query (GROUP BY event id, and FINAL), results compared with each other and with the
//!    ground truth; the MV's (wrong) answer and how much it over-counts; rows stored.
//! 7. **restart**: a second aggregator group on the same topic (fresh database) is SIGKILLed
//!    halfway and restarted at once: time to resume, to consumer lag 0 and to exact totals.
//! 0. **ingest**: HTTP through meterflow-api (batches of 100 and of 1) vs the direct
//!    producer on the same broker (tools/bin/bench_api.rs; `--api-events`, `--api-only`).
//! 0. **control**: ack -> pending visible in the balance API, and entitlement checks at a
//!    fixed 5,000/s (tools/bin/bench_control.rs; `--control-checks`, `--control-rate`).
//! 8. **freshness**: real-time traffic at `--freshness-rate` events/s for `--freshness-secs`
//!    into a fresh topic; per window, when its revision 0 appears in `meter_aggregates`
//!    (polled every 100 ms) relative to the ack of its last event and to its close time
//!    (window end + allowed lateness).
//! 9. **scaling**: `--scaling-events` on 1, 2 and 4 partitions with as many aggregator
//!    processes; records/s and CPU per record against the capacity model (docs/scaling.md).
//!
//! ```sh
//! make bench                                    # 5M events, ~8 minutes on 2 cores
//! cargo run --release -p meterflow-tools --bin meterflow-bench -- --events 10000000
//! ```

mod bench_aggregator;
mod bench_api;
mod bench_baseline;
mod bench_checkpoints;
mod bench_freshness;
mod bench_queries;
mod bench_control;
mod bench_rater;
mod bench_report;
mod bench_scaling;
mod harness;

use bench_aggregator::*;
use bench_baseline::*;
use bench_freshness::*;
use bench_queries::*;
use bench_report::{fmt_rate, mib, Report};

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Parser;
use harness::{aggregator_env, cpu_secs, loadavg, log_dir, Stack};
use meterflow_core::codec::UsageEventCodec;
use meterflow_core::decimal::{from_ch_i128, to_ch_i128};
use meterflow_core::meter::MeterCatalog;
use meterflow_core::records::dimensions_key;
use meterflow_e2e::scenario::{meters, now_ms, produce, workload};
use meterflow_e2e::verify;
use meterflow_producer::workload::Workload;
use meterflow_producer::{EventProducer, GroundTruth};
use meterflow_runtime::args::{ClickHouseArgs, KafkaArgs, TopicArgs};
use meterflow_testkit::http::{free_port, get_ok, metric_sum};
use meterflow_testkit::procs::{repo_root, ServiceProc};
use meterflow_testkit::TestEnv;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Parser)]
#[command(name = "meterflow-bench", about = "meterflow vs the raw-consume limit and a raw-events-in-ClickHouse baseline; writes target/bench/bench.md")]
struct Args {
    /// Messages of the workload for the throughput, baseline, query and restart phases. The
    /// default takes ~8 minutes on 2 cores; the query and row goals are stated for 10,000,000
    /// (~12 minutes).
    #[arg(long, default_value_t = 5_000_000)]
    events: u64,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Events per workload of the core bench (its EVENTS).
    #[arg(long, default_value_t = 2_000_000)]
    core_events: u64,
    /// Skip the core bench (e.g. when it was just run).
    #[arg(long)]
    skip_core: bool,
    /// Seconds of real-time traffic for the freshness phase (0 = skip). 135 s always contains
    /// two minute boundaries whose windows close while traffic flows.
    #[arg(long, default_value_t = 135)]
    freshness_secs: u64,
    /// Events per second during the freshness phase.
    #[arg(long, default_value_t = 2_000.0)]
    freshness_rate: f64,
    /// Skip the kill -9 / restart phase.
    #[arg(long)]
    skip_restart: bool,
    /// Timed runs of each query (after one warm-up run; fewer, but at least 3, when a query's
    /// runs pass 30 s).
    #[arg(long, default_value_t = 7)]
    query_runs: usize,
    /// Where the markdown table goes (relative to the repository root).
    #[arg(long, default_value = "target/bench/bench.md")]
    out: PathBuf,
    /// Keep the private stack's state dir after the run.
    #[arg(long)]
    keep_state: bool,
    /// Events of the HTTP ingest phase (meterflow-api vs the direct producer; 0 = skip).
    #[arg(long, default_value_t = 200_000)]
    api_events: u64,
    /// Only the HTTP phases, ingest and control (and the core bench unless --skip-core).
    #[arg(long)]
    api_only: bool,
    /// Entitlement checks of the control phase (0 skips the phase; tools/bin/bench_control.rs).
    #[arg(long, default_value_t = 50_000)]
    control_checks: usize,
    /// Entitlement checks per second (fixed schedule).
    #[arg(long, default_value_t = 5_000.0)]
    control_rate: f64,
    /// Events of each run of the scaling phase (0 = skip; tools/bin/bench_scaling.rs).
    #[arg(long, default_value_t = 2_000_000)]
    scaling_events: u64,
    /// Partitions = aggregator instances of the scaling runs.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    scaling_instances: Vec<usize>,
    /// Only the scaling phase (and the core bench unless --skip-core).
    #[arg(long)]
    scaling_only: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let started_at = now_ms();
    let load_start = loadavg();
    println!("meterflow-bench: {} events, load average at start {load_start}", args.events);
    let mut report = Report::default();

    // 1. Core engine, before the services exist (nothing else of ours running).
    if !args.skip_core {
        if let Err(e) = core_bench(&args, &mut report) {
            report.note(format!("core bench failed: {e:#}"));
        }
    }

    let state = repo_root().join("target/bench").join(format!("state-{}", std::process::id()));
    let mut stack = match Stack::start(&state, "memory") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("meterflow-bench: could not start the private broker and ClickHouse: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("private stack: {}", stack.describe());
    stack.export_env();
    // One deployment: every aggregator and rater of the run shares the record key, as the
    // services of a deployment do. (Each phase has its own database, whose `record_keys`
    // would otherwise differ: a later run on the same usage topic would dead-letter an
    // earlier run's idle ticks as `unauthenticated`, and its totals would never be exact.)
    std::env::set_var("METERFLOW_RECORD_KEY", format!("{:032x}{:032x}", rand::random::<u128>(), rand::random::<u128>()));
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("meterflow-bench: cannot start the tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let pids = Pids { clickhouse: stack.pid("clickhouse"), broker: stack.pid("broker") };
    let result = runtime.block_on(run(&args, pids, &mut report));
    drop(runtime);
    stack.keep = args.keep_state || result.is_err();
    drop(stack);
    if let Err(e) = &result {
        report.note(format!("the run stopped early: {e:#}"));
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned()))
        .unwrap_or_default();
    let header = format!(
        "Run of `meterflow-bench --events {}` started {} on {} cores ({cpu}), {} GiB RAM; load average (1/5/15 min) {load_start} at start, {} at the end. \
         Private broker (nisshi, memory storage) and ClickHouse 18.16 on the same machine; the aggregator is the release binary.",
        args.events,
        meterflow_core::time::format_rfc3339_s(started_at),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_gib(),
        loadavg()
    );
    let md = report.markdown(&header);
    let out = repo_root().join(&args.out);
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&out, &md) {
        Ok(()) => println!("\n{md}\nwritten to {}", out.display()),
        Err(e) => eprintln!("could not write {}: {e}", out.display()),
    }
    if result.is_err() {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

fn mem_gib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok()))
        .map_or(0, |kb| (kb + (1 << 19)) >> 20)
}

/// Runs the core bench and parses its table.
fn core_bench(args: &Args, report: &mut Report) -> Result<()> {
    println!("== core engine: cargo bench -p meterflow-core --bench core_bench (EVENTS={})", args.core_events);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["bench", "-q", "-p", "meterflow-core", "--bench", "core_bench"])
        .env("EVENTS", args.core_events.to_string())
        .current_dir(repo_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo bench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "cargo bench failed:\n{text}");
    let mut slowest = f64::MAX;
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | load | phase | events | wall ms | ns/ev | CPU ns/ev | events/s/CPU |
        let measured = ["decode only", "decode + dedup + aggregate (best)", "decode + dedup + aggregate + deltas (best)"];
        if cells.len() < 8 || !measured.iter().any(|m| cells[2].starts_with(m)) {
            continue;
        }
        let rate: f64 = cells[7].parse().unwrap_or(0.0);
        if cells[2].starts_with("decode + dedup") {
            slowest = slowest.min(rate);
        }
        report.row("core", format!("{}: {} ({} events, one thread)", cells[1], cells[2], cells[3]), format!("{} ev/s/core", fmt_rate(rate)), format!("{} CPU ns/event", cells[6]));
    }
    for line in text.lines().filter(|l| l.contains("dedup remembers") || l.contains("delta tracking armed")) {
        report.note(format!("core bench: {}", line.trim()));
    }
    anyhow::ensure!(slowest < f64::MAX, "no result rows in the core bench output:\n{text}");
    report.goal("core >= 1,000,000 events/s per core (decode + dedup + aggregate)", format!("{} ev/s/core (slowest workload, CPU time)", fmt_rate(slowest)), Some(slowest >= 1_000_000.0));
    Ok(())
}

/// The private stack's server processes, for CPU accounting.
#[derive(Debug, Clone, Copy)]
struct Pids {
    clickhouse: Option<u32>,
    broker: Option<u32>,
}

impl Pids {
    /// CPU seconds of (ClickHouse, broker, this process) so far.
    fn cpu(&self) -> (f64, f64, f64) {
        let c = |p: Option<u32>| p.and_then(cpu_secs).unwrap_or(0.0);
        (c(self.clickhouse), c(self.broker), c(Some(std::process::id())))
    }
}

async fn run(args: &Args, pids: Pids, report: &mut Report) -> Result<()> {
    if args.scaling_only {
        return bench_scaling::scaling(args, pids, report).await;
    }
    bench_api::ingest(args, report).await?;
    bench_control::control(args, report).await?;
    if args.api_only {
        return Ok(());
    }
    let env = TestEnv::with_partitions("bench", args.partitions).await?;
    let (kafka, topics) = (env.kafka_args().clone(), env.topics().clone());
    let catalog = Arc::new(meters()?);
    let gt = workload_phase(args, &kafka, &topics.usage_topic, report).await?;
    let raw_best = raw_phase(&kafka, &topics.usage_topic, gt.counters.sent, pids, report).await?;
    let e2e = end_to_end_phase(args, &env, &gt, pids, report).await?;
    let e2e_rate = gt.counters.sent as f64 / e2e.consume_secs;
    baseline_phase(&env, catalog.clone(), &gt, e2e_rate, raw_best, pids, report).await?;

    // 5b. The rater alone, on the aggregates the end-to-end run wrote.
    println!("== rater: the end-to-end run's aggregates");
    bench_rater::rater(&kafka, &topics, env.clickhouse_args(), report).await?;

    // 6. Query latency, equality, rows.
    println!("== usage per tenant and meter this month");
    queries(args, &env.clickhouse(), &gt, report).await?;

    if !args.skip_restart {
        restart_phase(&kafka, &topics, &gt, &e2e, pids, report).await?;
    }

    // 8. Freshness.
    if args.freshness_secs > 0 {
        println!("== freshness: {} s of real-time traffic at {} events/s", args.freshness_secs, args.freshness_rate);
        freshness(args, &catalog, report).await?;
    } else {
        report.goal("freshness p99 <= window close + 2 s", "skipped (--freshness-secs 0)", None);
    }

    // 9. Scaling curve.
    bench_scaling::scaling(args, pids, report).await
}

/// 2. The workload, with the producer's ground truth.
async fn workload_phase(args: &Args, kafka: &KafkaArgs, topic: &str, report: &mut Report) -> Result<GroundTruth> {
    println!("== producing {} messages into {}", args.events, topic);
    let mut cfg = workload(args.events, 42)?;
    cfg.max_in_flight = 100_000;
    let t = Instant::now();
    let gt = produce(kafka, topic, cfg).await?;
    let produce_secs = t.elapsed().as_secs_f64();
    let c = &gt.counters;
    let payload_bytes = topic_bytes(kafka, topic).await.unwrap_or(0);
    report.row(
        "workload",
        "messages produced (10% dup, 5% late, 1% malformed, 0.1% too late)",
        fmt_rate(c.sent as f64),
        format!(
            "{} unique accepted, {} duplicates, {} rejected, {} windows; {} partitions; {:.0} bytes/message; producer {} msg/s",
            c.unique_accepted, c.duplicates, c.malformed, gt.windows.len(), args.partitions,
            payload_bytes as f64 / c.sent.max(1) as f64,
            fmt_rate(c.sent as f64 / produce_secs)
        ),
    );
    Ok(gt)
}

/// 3. Raw consume: the physical limit (best of three passes, messages/s).
async fn raw_phase(kafka: &KafkaArgs, topic: &str, sent: u64, pids: Pids, report: &mut Report) -> Result<f64> {
    println!("== raw consume (3 passes)");
    let mut raw = Vec::new();
    let cpu0 = pids.cpu();
    for _ in 0..3 {
        raw.push(raw_consume(kafka, topic).await?);
    }
    let cpu1 = pids.cpu();
    let per_msg = |a: f64, b: f64| (b - a) / (3.0 * sent as f64) * 1e6;
    raw.sort_by(|a, b| b.total_cmp(a));
    let raw_best = raw[0];
    report.row("limit", "raw consume, plain rdkafka consumer doing nothing (best of 3)", format!("{} msg/s", fmt_rate(raw_best)), format!("passes: {}; CPU per message: consumer {:.2} µs, broker {:.2} µs", raw.iter().map(|r| fmt_rate(*r)).collect::<Vec<_>>().join(", "), per_msg(cpu0.2, cpu1.2), per_msg(cpu0.1, cpu1.1)));
    Ok(raw_best)
}

/// 4. End to end: the aggregator on the pre-filled topic.
async fn end_to_end_phase(args: &Args, env: &TestEnv, gt: &GroundTruth, pids: Pids, report: &mut Report) -> Result<AggRun> {
    let c = &gt.counters;
    println!("== end to end: aggregator on the pre-filled topic");
    let e2e = aggregator_run(env.kafka_args(), env.topics(), env.clickhouse_args(), gt, "bench-agg", None, pids).await?;
    let e2e_rate = c.sent as f64 / e2e.consume_secs;
    report.row(
        "end to end",
        "aggregator throughput, first to last record (dedup, windows, ClickHouse + Kafka outputs, checkpoints)",
        format!("{} ev/s", fmt_rate(e2e_rate)),
        format!("{:.1} s for {} messages; group join + start {:.1} s before the first record", e2e.consume_secs, c.sent, e2e.startup_secs),
    );
    report.row(
        "end to end",
        "time to exact totals (start of the aggregator until meter_totals and dead_letters = ground truth)",
        format!("{:.1} s", e2e.exact_secs),
        format!("{} windows and {} dead letters verified exactly; last windows close by idle tick (1 s)", gt.windows.len(), c.malformed),
    );
    let n = c.sent as f64;
    report.row(
        "end to end",
        "CPU per message while the aggregator consumed",
        format!("{:.2} µs aggregator", e2e.cpu.0 / n * 1e6),
        format!(
            "ClickHouse {:.2} µs, broker {:.2} µs; busy cores: aggregator {:.2}, ClickHouse {:.2}, broker {:.2} (of 2)",
            e2e.cpu.1 / n * 1e6, e2e.cpu.2 / n * 1e6,
            e2e.cpu.0 / e2e.consume_secs, e2e.cpu.1 / e2e.consume_secs, e2e.cpu.2 / e2e.consume_secs
        ),
    );
    let agg_us = e2e.cpu.0 / n * 1e6;
    report.goal("aggregator CPU per message <= 2 µs", format!("{agg_us:.2} µs (CPU time from the first to the last record / messages)"), Some(agg_us <= 2.0));
    let state_bytes: u64 = env
        .clickhouse()
        .query("SELECT toUInt64(sum(l)) FROM (SELECT argMax(length(state), version) AS l FROM checkpoints WHERE consumer_group = 'bench-agg' GROUP BY topic, partition)")
        .fetch_one()
        .await
        .unwrap_or(0);
    report.row(
        "end to end",
        "where the aggregator's wall time went while consuming",
        format!("{:.0}% waiting", (1.0 - e2e.cpu.0 / e2e.consume_secs).max(0.0) * 100.0),
        format!(
            "of {:.1} s: {:.1} s in ClickHouse inserts (summed over concurrent ones) and {:.1} s in {:.0} checkpoints (latest checkpoint state {} for {} partitions); both run beside the consume loop (one batch in flight while the next fills), only a checkpoint's snapshot pauses it",
            e2e.consume_secs, e2e.insert_secs, e2e.checkpoint_secs, e2e.checkpoints, mib(state_bytes), args.partitions
        ),
    );
    let ids = e2e.hot_ids.max(1.0);
    let whole = (e2e.rss_end.saturating_sub(e2e.rss_idle)) as f64 / ids;
    report.row(
        "memory",
        "aggregator RSS per million remembered event ids (RSS growth from 25% to 100% of the input / ids added)",
        match e2e.slope_bytes_per_id {
            Some(b) => format!("{} / 1M ids", mib((b * 1e6) as u64)),
            None => "n/a".into(),
        },
        format!(
            "{} bytes/id; RSS {} before the first record, {} at the end (peak {}), {:.0} ids remembered: {:.0} bytes/id overall, an upper bound incl. librdkafka fetch buffers, the closed windows kept for --retain-closed and allocator slack",
            e2e.slope_bytes_per_id.map_or("?".into(), |b| format!("{b:.0}")),
            mib(e2e.rss_idle), mib(e2e.rss_end), mib(e2e.rss_peak), ids, whole
        ),
    );
    bench_checkpoints::report_checkpoints(report, &e2e.checkpoints_by_size, args.partitions);
    Ok(e2e)
}

/// 5. Baseline ingest: raw events into ClickHouse, judged against the end-to-end rate.
async fn baseline_phase(
    env: &TestEnv,
    catalog: Arc<MeterCatalog>,
    gt: &GroundTruth,
    e2e_rate: f64,
    raw_best: f64,
    pids: Pids,
    report: &mut Report,
) -> Result<()> {
    let (c, n) = (&gt.counters, gt.counters.sent as f64);
    let ch = env.clickhouse();
    println!("== baseline: raw events into ClickHouse");
    create_baseline(&ch).await?;
    let cpu0 = pids.cpu();
    let base = baseline_ingest(env.kafka_args(), &env.topics().usage_topic, &ch, catalog).await?;
    let cpu1 = pids.cpu();
    let base_rate = c.sent as f64 / base.secs;
    report.row(
        "baseline",
        "raw ingest: decode + validate + INSERT every message (ReplacingMergeTree + SummingMergeTree MV)",
        format!("{} ev/s", fmt_rate(base_rate)),
        format!(
            "{:.1} s; {} rows inserted (duplicates included), {} invalid dropped; CPU per message: ingest {:.2} µs, ClickHouse {:.2} µs, broker {:.2} µs",
            base.secs, base.inserted, base.dropped,
            (cpu1.2 - cpu0.2) / n * 1e6, (cpu1.0 - cpu0.0) / n * 1e6, (cpu1.1 - cpu0.1) / n * 1e6
        ),
    );
    report.goal(
        "end to end, totals exact: >= 2x the baseline's raw ingest rate (same run) and >= 300,000 ev/s",
        format!(
            "meterflow {} ev/s vs baseline {} ev/s ({:.2}x); {:.0}% of the raw consume rate {} msg/s; totals exact: yes",
            fmt_rate(e2e_rate),
            fmt_rate(base_rate),
            e2e_rate / base_rate,
            e2e_rate / raw_best * 100.0,
            fmt_rate(raw_best)
        ),
        Some(e2e_rate >= 2.0 * base_rate && e2e_rate >= 300_000.0),
    );
    Ok(())
}

/// 7. kill -9 of the aggregator halfway through the backlog, restart at once.
async fn restart_phase(kafka: &KafkaArgs, topics: &TopicArgs, gt: &GroundTruth, e2e: &AggRun, pids: Pids, report: &mut Report) -> Result<()> {
    println!("== kill -9 of the aggregator halfway, restart");
    let env2 = TestEnv::with_partitions("bench_restart", 1).await?;
    let r = aggregator_run(kafka, topics, env2.clickhouse_args(), gt, "bench-restart", Some(0.5), pids).await?;
    let k = r.kill.as_ref().context("the kill did not happen")?;
    report.row(
        "restart",
        "kill -9 at 50% of the backlog, restart at once: restart -> first record processed",
        format!("{:.1} s", k.resume_secs),
        "static membership (--group-instance-id): the restarted instance takes its partitions back without waiting for the session timeout; then checkpoint load (engine state from ClickHouse)",
    );
    report.goal("kill -9 at half the backlog: first record again <= 3 s after the restart", format!("{:.1} s", k.resume_secs), Some(k.resume_secs <= 3.0));
    report.row(
        "restart",
        "restart -> consumer lag 0 (committed offsets = end of every partition)",
        format!("{:.1} s", k.lag0_secs),
        format!("{} messages behind the last checkpoint at the kill; committed every 5 s (checkpoint interval)", fmt_rate(k.behind as f64)),
    );
    report.row(
        "restart",
        "restart -> totals exact again",
        format!("{:.1} s", k.exact_secs),
        format!("whole run {:.1} s vs {:.1} s without the kill: the crash cost {:.1} s", r.exact_secs, e2e.exact_secs, r.exact_secs - e2e.exact_secs),
    );
    report.goal("kill -9 at half the backlog: totals exact <= 20 s after the restart", format!("{:.1} s", k.exact_secs), Some(k.exact_secs <= 20.0));
    report.row("memory", "aggregator RSS after restart and catch-up (state restored from the checkpoint)", mib(r.rss_end), format!("{:.0} ids remembered", r.hot_ids));
    Ok(())
}

/// Sum of the payload sizes in `topic` is not known to the broker cheaply; one consume pass
/// counts it (also warms the broker's pages for the raw passes).
async fn topic_bytes(kafka: &KafkaArgs, topic: &str) -> Result<u64> {
    let (kafka, topic) = (kafka.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || consume_pass(&kafka, &topic, |_| {}).map(|(_, b, _)| b)).await?
}

/// Reads every message of `topic` from the start, calling `f` on each payload; returns
/// (messages, payload bytes, seconds from assignment to the last message).
fn consume_pass(kafka: &KafkaArgs, topic: &str, mut f: impl FnMut(rdkafka::message::BorrowedMessage<'_>)) -> Result<(u64, u64, f64)> {
    let group = format!("bench-raw-{:08x}", rand::random::<u32>());
    let consumer: BaseConsumer = meterflow_runtime::kafka::consumer_config(kafka, &group)?.create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let parts: Vec<i32> = md.topics().first().context("no topic metadata")?.partitions().iter().map(|p| p.id()).collect();
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        let (low, high) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(10))?;
        if high > low {
            ends.insert(*p, high);
            tpl.add_partition_offset(topic, *p, Offset::Offset(low))?;
        }
    }
    let started = Instant::now();
    consumer.assign(&tpl)?;
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut remaining = ends.len();
    let deadline = Instant::now() + Duration::from_secs(1800);
    while remaining > 0 {
        anyhow::ensure!(Instant::now() < deadline, "consume pass did not finish in 30 minutes");
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => anyhow::bail!("consume: {e}"),
            Some(Ok(m)) => {
                n += 1;
                bytes += m.payload().map_or(0, <[u8]>::len) as u64;
                let (p, o) = (m.partition(), m.offset());
                f(m);
                if ends.get(&p).is_some_and(|end| o + 1 >= *end) {
                    ends.remove(&p);
                    remaining -= 1;
                }
            }
        }
    }
    Ok((n, bytes, started.elapsed().as_secs_f64()))
}

async fn raw_consume(kafka: &KafkaArgs, topic: &str) -> Result<f64> {
    let (kafka, topic) = (kafka.clone(), topic.to_owned());
    let (n, _, secs) = tokio::task::spawn_blocking(move || consume_pass(&kafka, &topic, |m| {
        std::hint::black_box(m.payload());
    }))
    .await??;
    println!("  raw pass: {n} messages in {secs:.2} s");
    Ok(n as f64 / secs)
}
