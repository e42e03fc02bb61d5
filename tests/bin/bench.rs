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
//!    producer on the same broker (tests/bin/bench_api.rs; `--api-events`, `--api-only`).
//! 0. **control**: ack -> pending visible in the balance API, and entitlement checks at a
//!    fixed 5,000/s (tests/bin/bench_control.rs; `--control-checks`, `--control-rate`).
//! 8. **freshness**: real-time traffic at `--freshness-rate` events/s for `--freshness-secs`
//!    into a fresh topic; per window, when its revision 0 appears in `meter_aggregates`
//!    (polled every 100 ms) relative to the ack of its last event and to its close time
//!    (window end + allowed lateness).
//!
//! ```sh
//! make bench                                    # 5M events, ~8 minutes on 2 cores
//! cargo run --release -p meterflow-e2e --bin meterflow-bench -- --events 10000000
//! ```

mod bench_api;
mod bench_control;
mod bench_rater;
mod harness;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Parser;
use harness::{aggregator_env, cpu_secs, free_port, http_get, loadavg, log_dir, metric_sum, Proc, Stack};
use meterflow_core::codec::UsageEventCodec;
use meterflow_core::decimal::{from_ch_i128, to_ch_i128};
use meterflow_core::meter::MeterCatalog;
use meterflow_core::records::dimensions_key;
use meterflow_e2e::procs::workspace_root;
use meterflow_e2e::scenario::{meters, now_ms, produce, workload};
use meterflow_e2e::verify;
use meterflow_producer::workload::Workload;
use meterflow_producer::{EventProducer, GroundTruth};
use meterflow_runtime::args::{ClickHouseArgs, KafkaArgs, TopicArgs};
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
    /// Entitlement checks of the control phase (0 skips the phase; tests/bin/bench_control.rs).
    #[arg(long, default_value_t = 50_000)]
    control_checks: usize,
    /// Entitlement checks per second (fixed schedule).
    #[arg(long, default_value_t = 5_000.0)]
    control_rate: f64,
}

/// One line of the result table.
struct Row {
    area: &'static str,
    metric: String,
    value: String,
    note: String,
}

/// One goal of the issue, judged.
struct Goal {
    goal: &'static str,
    measured: String,
    met: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    goals: Vec<Goal>,
    notes: Vec<String>,
}

impl Report {
    fn row(&mut self, area: &'static str, metric: impl Into<String>, value: impl Into<String>, note: impl Into<String>) {
        let r = Row { area, metric: metric.into(), value: value.into(), note: note.into() };
        println!("  [{}] {}: {} {}", r.area, r.metric, r.value, r.note);
        self.rows.push(r);
    }

    fn goal(&mut self, goal: &'static str, measured: impl Into<String>, met: Option<bool>) {
        self.goals.push(Goal { goal, measured: measured.into(), met });
    }

    fn note(&mut self, n: impl Into<String>) {
        let n = n.into();
        println!("  note: {n}");
        self.notes.push(n);
    }

    fn markdown(&self, header: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# meterflow benchmark\n\n{header}\n");
        let _ = writeln!(s, "| area | metric | value | notes |\n| --- | --- | ---: | --- |");
        for r in &self.rows {
            let _ = writeln!(s, "| {} | {} | {} | {} |", r.area, r.metric, r.value, r.note.replace('|', "\\|"));
        }
        let _ = writeln!(s, "\n## Goals\n\n| goal | measured | status |\n| --- | --- | --- |");
        for g in &self.goals {
            let status = match g.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "not measured",
            };
            let _ = writeln!(s, "| {} | {} | {status} |", g.goal, g.measured.replace('|', "\\|"));
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }
}

fn fmt_rate(r: f64) -> String {
    let r = r.round() as u64;
    let s = r.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
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

    let state = workspace_root().join("target/bench").join(format!("state-{}", std::process::id()));
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
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
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
        "Run of `meterflow-bench --events {}` started {} UTC on {} cores ({cpu}), {} GiB RAM; load average (1/5/15 min) {load_start} at start, {} at the end. \
         Private broker (nisshi, memory storage) and ClickHouse 18.16 on the same machine; the aggregator is the release binary.",
        args.events,
        fmt_time(started_at),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_gib(),
        loadavg()
    );
    let md = report.markdown(&header);
    let out = workspace_root().join(&args.out);
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

fn fmt_time(ms: i64) -> String {
    let s = ms / 1000;
    let (days, rem) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", rem / 3600, rem % 3600 / 60)
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
        .current_dir(workspace_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo bench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "cargo bench failed:\n{text}");
    let mut slowest = f64::MAX;
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | load | phase | events | wall ms | ns/ev | CPU ns/ev | events/s/CPU |
        if cells.len() < 8 || !(cells[2].starts_with("decode only") || cells[2].starts_with("decode + dedup + aggregate (best)")) {
            continue;
        }
        let rate: f64 = cells[7].parse().unwrap_or(0.0);
        if cells[2].starts_with("decode + dedup") {
            slowest = slowest.min(rate);
        }
        report.row("core", format!("{}: {} ({} events, one thread)", cells[1], cells[2], cells[3]), format!("{} ev/s/core", fmt_rate(rate)), format!("{} CPU ns/event", cells[6]));
    }
    for line in text.lines().filter(|l| l.contains("dedup remembers")) {
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
    bench_api::ingest(args, report).await?;
    bench_control::control(args, report).await?;
    if args.api_only {
        return Ok(());
    }
    let env = TestEnv::with_partitions("bench", args.partitions).await?;
    let (kafka, topics) = (env.kafka_args().clone(), env.topics().clone());
    let catalog = Arc::new(meters()?);

    // 2. The workload.
    println!("== producing {} messages into {}", args.events, topics.usage_topic);
    let mut cfg = workload(args.events, 42)?;
    cfg.max_in_flight = 100_000;
    let t = Instant::now();
    let gt = produce(&kafka, &topics.usage_topic, cfg).await?;
    let produce_secs = t.elapsed().as_secs_f64();
    let c = &gt.counters;
    let payload_bytes = topic_bytes(&kafka, &topics.usage_topic).await.unwrap_or(0);
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

    // 3. Raw consume: the physical limit.
    println!("== raw consume (3 passes)");
    let mut raw = Vec::new();
    let cpu0 = pids.cpu();
    for _ in 0..3 {
        raw.push(raw_consume(&kafka, &topics.usage_topic).await?);
    }
    let cpu1 = pids.cpu();
    let per_msg = |a: f64, b: f64| (b - a) / (3.0 * c.sent as f64) * 1e6;
    raw.sort_by(|a, b| b.total_cmp(a));
    let raw_best = raw[0];
    report.row("limit", "raw consume, plain rdkafka consumer doing nothing (best of 3)", format!("{} msg/s", fmt_rate(raw_best)), format!("passes: {}; CPU per message: consumer {:.2} µs, broker {:.2} µs", raw.iter().map(|r| fmt_rate(*r)).collect::<Vec<_>>().join(", "), per_msg(cpu0.2, cpu1.2), per_msg(cpu0.1, cpu1.1)));

    // 4. End to end.
    println!("== end to end: aggregator on the pre-filled topic");
    let e2e = aggregator_run(&kafka, &topics, env.clickhouse_args(), &gt, "bench-agg", None, pids).await?;
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
    for (events, secs) in &e2e.checkpoint_at {
        report.row(
            "checkpoint",
            format!("checkpoint time after {} events (snapshot + fencing check + save)", fmt_rate(*events as f64)),
            format!("{:.0} ms", secs * 1e3),
            "the first checkpoint completed after that many records were read",
        );
    }
    match (e2e.checkpoint_at.first(), e2e.checkpoint_at.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => report.goal(
            "checkpoint time independent of state size",
            format!("{:.0} ms at {} events, {:.0} ms at {} events", a.1 * 1e3, fmt_rate(a.0 as f64), b.1 * 1e3, fmt_rate(b.0 as f64)),
            Some(b.1 <= 1.5 * a.1),
        ),
        _ => report.goal("checkpoint time independent of state size", "needs --events >= 5000000 (marks 1M, 5M, 10M)", None),
    }

    // 5. Baseline ingest.
    println!("== baseline: raw events into ClickHouse");
    let ch = env.clickhouse();
    create_baseline(&ch).await?;
    let cpu0 = pids.cpu();
    let base = baseline_ingest(&kafka, &topics.usage_topic, &ch, catalog.clone()).await?;
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

    // 5b. The rater alone, on the aggregates the end-to-end run wrote.
    println!("== rater: the end-to-end run's aggregates");
    bench_rater::rater(&kafka, &topics, env.clickhouse_args(), report).await?;

    // 6. Query latency, equality, rows.
    println!("== usage per tenant and meter this month");
    queries(args, &ch, &gt, report).await?;

    // 7. kill -9 and restart.
    if !args.skip_restart {
        println!("== kill -9 of the aggregator halfway, restart");
        let env2 = TestEnv::with_partitions("bench_restart", 1).await?;
        let r = aggregator_run(&kafka, &topics, env2.clickhouse_args(), &gt, "bench-restart", Some(0.5), pids).await?;
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
    }

    // 8. Freshness.
    if args.freshness_secs > 0 {
        println!("== freshness: {} s of real-time traffic at {} events/s", args.freshness_secs, args.freshness_rate);
        freshness(args, &catalog, report).await?;
    } else {
        report.goal("freshness p99 <= window close + 2 s", "skipped (--freshness-secs 0)", None);
    }
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

#[derive(Debug, Default)]
struct KillResult {
    resume_secs: f64,
    lag0_secs: f64,
    exact_secs: f64,
    behind: i64,
}

#[derive(Debug, Default)]
struct AggRun {
    startup_secs: f64,
    consume_secs: f64,
    exact_secs: f64,
    rss_idle: u64,
    rss_peak: u64,
    rss_end: u64,
    hot_ids: f64,
    /// RSS growth per remembered id between 25% of the input and the end.
    slope_bytes_per_id: Option<f64>,
    /// CPU seconds of (aggregator, ClickHouse, broker) from the first to the last record.
    cpu: (f64, f64, f64),
    /// Seconds the aggregator spent in ClickHouse inserts and in checkpoints (its histograms'
    /// sums) until the last record was read.
    insert_secs: f64,
    checkpoint_secs: f64,
    checkpoints: f64,
    /// Checkpoint time by input size: (events read when it was due, seconds of the first
    /// checkpoint completed after that point).
    checkpoint_at: Vec<(u64, f64)>,
    kill: Option<KillResult>,
}

/// Input sizes at which the checkpoint time is reported (the issue's table).
const CHECKPOINT_MARKS: [u64; 3] = [1_000_000, 5_000_000, 10_000_000];

/// Runs an aggregator process over the pre-filled topic until ClickHouse (`ch`) is exact.
/// With `kill_at`, SIGKILLs it once that fraction of the messages was read and restarts it.
async fn aggregator_run(
    kafka: &KafkaArgs,
    topics: &TopicArgs,
    ch_args: &ClickHouseArgs,
    gt: &GroundTruth,
    group: &str,
    kill_at: Option<f64>,
    pids: Pids,
) -> Result<AggRun> {
    let http = format!("127.0.0.1:{}", free_port()?);
    let log = log_dir("bench")?.join(format!("{group}-{}.log", ch_args.database));
    // Static membership, as a deployment that wants fast recovery runs it: the restarted
    // instance (same id) takes its partitions back without waiting for the session timeout.
    let instance = format!("{group}-0");
    let env = [("METERFLOW_IDLE_TIMEOUT", "1s"), ("METERFLOW_GROUP_INSTANCE_ID", instance.as_str())];
    let mut agg = Proc::new("meterflow-aggregator", aggregator_env(kafka, topics, ch_args, group, &http, &env), log)?;
    let ch = meterflow_runtime::clickhouse::client(ch_args);
    let sent = gt.counters.sent as f64;
    let mut run = AggRun::default();
    agg.start()?;
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    let mut consumed: Option<Instant> = None;
    let mut restarted: Option<Instant> = None;
    let mut kill = KillResult::default();
    let mut last_verify = Instant::now() - Duration::from_secs(10);
    let deadline = started + Duration::from_secs(3600);
    let mut cpu_first = (0.0, 0.0, 0.0);
    let agg_cpu = |agg: &Proc| agg.pid().and_then(cpu_secs).unwrap_or(0.0);
    // (hot ids, RSS) when a quarter of the input had been read.
    let mut quarter: Option<(f64, u64)> = None;
    // Checkpoint histogram at the last scrape (sum, count), and the mark waiting for the next
    // checkpoint to complete.
    let mut ckpt = (0.0, 0.0);
    let mut marks = CHECKPOINT_MARKS.iter().copied().filter(|m| (*m as f64) <= sent).peekable();
    let mut waiting_mark: Option<u64> = None;
    loop {
        agg.check_alive()?;
        anyhow::ensure!(Instant::now() < deadline, "{group}: not exact after an hour");
        let text = http_get(&http, "/metrics").await.unwrap_or_default();
        let events_in = metric_sum(&text, "meterflow_aggregator_events_in_total");
        if restarted.is_none() {
            let now = (
                metric_sum(&text, "meterflow_aggregator_checkpoint_seconds_sum"),
                metric_sum(&text, "meterflow_aggregator_checkpoint_seconds_count"),
            );
            if now.1 > ckpt.1 {
                if let Some(m) = waiting_mark.take() {
                    run.checkpoint_at.push((m, (now.0 - ckpt.0) / (now.1 - ckpt.1)));
                }
            }
            ckpt = now;
            if waiting_mark.is_none() && marks.peek().is_some_and(|m| events_in >= *m as f64) {
                waiting_mark = marks.next();
            }
        }
        let rss = agg.rss_bytes().unwrap_or(0);
        run.rss_peak = run.rss_peak.max(rss);
        if first.is_none() {
            if events_in > 0.0 {
                first = Some(Instant::now());
                run.startup_secs = started.elapsed().as_secs_f64();
                let (ch_cpu, broker_cpu, _) = pids.cpu();
                cpu_first = (agg_cpu(&agg), ch_cpu, broker_cpu);
            } else {
                run.rss_idle = rss;
            }
        }
        if let (Some(at), None) = (kill_at, restarted) {
            if events_in >= at * sent {
                agg.kill9()?;
                kill.behind = group_lag(kafka, &topics.usage_topic, group).await?;
                agg.start()?;
                restarted = Some(Instant::now());
                println!("  SIGKILL at {events_in} of {sent} messages read; {} behind the checkpoint; restarted", kill.behind);
                continue;
            }
        }
        if let Some(r) = restarted {
            if kill.resume_secs == 0.0 && events_in > 0.0 {
                kill.resume_secs = r.elapsed().as_secs_f64();
            }
            if kill.lag0_secs == 0.0 && kill.resume_secs > 0.0 && group_lag(kafka, &topics.usage_topic, group).await? == 0 {
                kill.lag0_secs = r.elapsed().as_secs_f64();
            }
        } else {
            if quarter.is_none() && events_in >= 0.25 * sent {
                quarter = Some((metric_sum(&text, "meterflow_aggregator_dedup_hot_ids"), rss));
            }
            if consumed.is_none() && events_in >= sent {
                consumed = Some(Instant::now());
                run.consume_secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
                let (ch_cpu, broker_cpu, _) = pids.cpu();
                run.cpu = (agg_cpu(&agg) - cpu_first.0, ch_cpu - cpu_first.1, broker_cpu - cpu_first.2);
                run.insert_secs = metric_sum(&text, "meterflow_aggregator_clickhouse_insert_seconds_sum");
                run.checkpoint_secs = metric_sum(&text, "meterflow_aggregator_checkpoint_seconds_sum");
                run.checkpoints = metric_sum(&text, "meterflow_aggregator_checkpoint_seconds_count");
            }
        }
        let reading_done = consumed.is_some() || (restarted.is_some() && kill.resume_secs > 0.0);
        if reading_done && last_verify.elapsed() >= Duration::from_secs(1) {
            last_verify = Instant::now();
            let w = verify::window_totals(&ch, gt).await;
            let d = verify::dead_letters(&ch, gt, &topics.usage_topic).await;
            if matches!((&w, &d), (Ok(w), Ok(d)) if w.ok() && d.ok()) {
                run.exact_secs = started.elapsed().as_secs_f64();
                if let Some(r) = restarted {
                    kill.exact_secs = r.elapsed().as_secs_f64();
                    // Lag 0 needs the checkpoint after the last record (every 5 s).
                    let lag_deadline = Instant::now() + Duration::from_secs(60);
                    while kill.lag0_secs == 0.0 && Instant::now() < lag_deadline {
                        if group_lag(kafka, &topics.usage_topic, group).await? == 0 {
                            kill.lag0_secs = r.elapsed().as_secs_f64();
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = http_get(&http, "/metrics").await.unwrap_or_default();
    run.hot_ids = metric_sum(&text, "meterflow_aggregator_dedup_hot_ids");
    run.rss_end = agg.rss_bytes().unwrap_or(0);
    if let (Some((ids, rss)), None) = (quarter, restarted) {
        if run.hot_ids > ids {
            run.slope_bytes_per_id = Some((run.rss_end as f64 - rss as f64) / (run.hot_ids - ids));
        }
    }
    if restarted.is_some() {
        run.kill = Some(kill);
    }
    agg.terminate()?;
    Ok(run)
}

/// Messages between the committed offsets of `group` and the end of every partition.
async fn group_lag(kafka: &KafkaArgs, topic: &str, group: &str) -> Result<i64> {
    let (kafka, topic, group) = (kafka.clone(), topic.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || -> Result<i64> {
        let consumer: BaseConsumer = meterflow_runtime::kafka::consumer_config(&kafka, &group)?.create()?;
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let parts: Vec<i32> = md.topics().first().context("no topic metadata")?.partitions().iter().map(|p| p.id()).collect();
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            tpl.add_partition(&topic, *p);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
        let mut lag = 0;
        for p in &parts {
            let (low, high) = consumer.fetch_watermarks(&topic, *p, Duration::from_secs(10))?;
            let at = match committed.find_partition(&topic, *p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => low,
            };
            lag += (high - at).max(0);
        }
        Ok(lag)
    })
    .await?
}

const BASELINE_DDL: [&str; 2] = [
    // Raw events as they arrive, duplicates included. ReplacingMergeTree folds rows with the
    // same sorting key (the event id within tenant/meter/hour) - eventually, at merge time;
    // exact queries must dedup themselves (GROUP BY event_id, or FINAL).
    "CREATE TABLE baseline_events (
        tenant String, meter String, event_id String, event_time DateTime,
        quantity Decimal(38, 9), provider_cost Decimal(38, 9),
        dim_keys Array(String), dim_values Array(String), source String
    ) ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(event_time)
    ORDER BY (tenant, meter, toStartOfHour(event_time), event_id)",
    // Pre-aggregation per tenant/meter/hour. An MV sees every inserted block, before any
    // merge: duplicates are summed in, and nothing can take them out again.
    "CREATE MATERIALIZED VIEW baseline_hourly
    ENGINE = SummingMergeTree PARTITION BY toYYYYMM(hour) ORDER BY (tenant, meter, hour)
    AS SELECT tenant, meter, toStartOfHour(event_time) AS hour, sum(quantity) AS quantity, count() AS events
    FROM baseline_events GROUP BY tenant, meter, hour",
];

async fn create_baseline(ch: &clickhouse::Client) -> Result<()> {
    for sql in BASELINE_DDL {
        ch.query(sql).execute().await.with_context(|| format!("baseline DDL: {sql}"))?;
    }
    Ok(())
}

#[derive(Debug, Clone, clickhouse::Row, Serialize)]
struct BaselineRow {
    tenant: String,
    meter: String,
    event_id: String,
    event_time: u32,
    quantity: i128,
    provider_cost: i128,
    dim_keys: Vec<String>,
    dim_values: Vec<String>,
    source: String,
}

struct BaselineResult {
    secs: f64,
    inserted: u64,
    dropped: u64,
}

/// The baseline's ingest: one consumer reads the topic, decodes and validates each message
/// like meterflow does (undecodable, unknown meter, missing tenant or id, bad or negative
/// quantity, bad provider cost are dropped), batches are inserted (two concurrent inserts of
/// half a batch, like meterflow's raw rows) while the next batch is read, handed over when
/// the inserter is free or at 1,000,000 rows, like meterflow's. No dedup, no windows.
async fn baseline_ingest(kafka: &KafkaArgs, topic: &str, ch: &clickhouse::Client, catalog: Arc<MeterCatalog>) -> Result<BaselineResult> {
    // Batched like meterflow's outputs: one batch being inserted, the next filling; it is
    // handed over as soon as the inserter is free (at least MIN rows), else it grows up to
    // BATCH rows and the reader waits. Larger inserts are much cheaper for ClickHouse.
    const BATCH: usize = 1_000_000;
    const MIN: usize = 10_000;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<BaselineRow>>(1);
    let started = Instant::now();
    let reader = {
        let (kafka, topic) = (kafka.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || -> Result<u64> {
            let codec = UsageEventCodec::new();
            let mut batch = Vec::new();
            let mut dropped = 0u64;
            consume_pass(&kafka, &topic, |m| {
                match baseline_row(&codec, &catalog, m.payload().unwrap_or_default()) {
                    Some(row) => batch.push(row),
                    None => dropped += 1,
                }
                if batch.len() >= BATCH {
                    let full = std::mem::take(&mut batch);
                    let _ = tx.blocking_send(full);
                } else if batch.len() >= MIN && tx.capacity() > 0 {
                    let ready = std::mem::take(&mut batch);
                    if let Err(tokio::sync::mpsc::error::TrySendError::Full(back)) = tx.try_send(ready) {
                        batch = back;
                    }
                }
            })?;
            if !batch.is_empty() {
                let _ = tx.blocking_send(batch);
            }
            Ok(dropped)
        })
    };
    let mut inserted = 0u64;
    while let Some(rows) = rx.recv().await {
        // Two concurrent inserts of half a batch each, as meterflow writes its raw rows.
        let (first, second) = rows.split_at(rows.len() / 2);
        let (a, b) = tokio::join!(insert_baseline(ch, first), insert_baseline(ch, second));
        a?;
        b?;
        inserted += rows.len() as u64;
    }
    let dropped = reader.await??;
    Ok(BaselineResult { secs: started.elapsed().as_secs_f64(), inserted, dropped })
}

async fn insert_baseline(ch: &clickhouse::Client, rows: &[BaselineRow]) -> Result<()> {
    let mut insert = ch.insert::<BaselineRow>("baseline_events").await?;
    for r in rows {
        insert.write(r).await?;
    }
    Ok(insert.end().await?)
}

fn baseline_row(codec: &UsageEventCodec, catalog: &MeterCatalog, payload: &[u8]) -> Option<BaselineRow> {
    let ev = codec.decode(payload).ok()?;
    let meter = catalog.get(ev.meter)?;
    if ev.tenant.is_empty() || ev.event_id.is_empty() {
        return None;
    }
    let q = meterflow_core::decimal::parse("quantity", ev.quantity).ok()?;
    if q.is_sign_negative() && !q.is_zero() && !meter.allow_negative {
        return None;
    }
    let cost = match ev.provider_cost {
        Some(c) => meterflow_core::decimal::parse("provider_cost", c).ok()?,
        None => Decimal::ZERO,
    };
    let mut dims = ev.dimensions.clone();
    dims.sort_unstable();
    Some(BaselineRow {
        tenant: ev.tenant.to_owned(),
        meter: ev.meter.to_owned(),
        event_id: ev.event_id.to_owned(),
        event_time: (ev.event_time_ms.div_euclid(1000)).clamp(0, i64::from(u32::MAX)) as u32,
        quantity: to_ch_i128(&q).ok()?,
        provider_cost: to_ch_i128(&cost).ok()?,
        dim_keys: dims.iter().map(|(k, _)| (*k).to_owned()).collect(),
        dim_values: dims.iter().map(|(_, v)| (*v).to_owned()).collect(),
        source: ev.source.to_owned(),
    })
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct UsageRow {
    tenant: String,
    meter: String,
    usage: i128,
}

const Q_METERFLOW: &str = "SELECT tenant, meter, sum(value) AS usage FROM meter_totals \
    WHERE window_start >= toStartOfMonth(now()) GROUP BY tenant, meter ORDER BY tenant, meter";
const Q_BASE_GROUP: &str = "SELECT tenant, meter, sum(q) AS usage FROM (SELECT tenant, meter, event_id, any(quantity) AS q \
    FROM baseline_events WHERE event_time >= toDateTime(toStartOfMonth(now())) GROUP BY tenant, meter, event_id) \
    GROUP BY tenant, meter ORDER BY tenant, meter";
const Q_BASE_FINAL: &str = "SELECT tenant, meter, sum(quantity) AS usage FROM baseline_events FINAL \
    WHERE event_time >= toDateTime(toStartOfMonth(now())) GROUP BY tenant, meter ORDER BY tenant, meter";
const Q_BASE_MV: &str = "SELECT tenant, meter, sum(quantity) AS usage FROM baseline_hourly \
    WHERE hour >= toDateTime(toStartOfMonth(now())) GROUP BY tenant, meter ORDER BY tenant, meter";

/// Median and minimum seconds of `runs` executions after a warm-up, and the result.
async fn time_query(ch: &clickhouse::Client, sql: &str, runs: usize) -> Result<(f64, f64, BTreeMap<(String, String), Decimal>)> {
    let mut result = BTreeMap::new();
    let mut times = Vec::new();
    let budget = Instant::now();
    for i in 0..=runs {
        if times.len() >= 3 && budget.elapsed() > Duration::from_secs(30) {
            break;
        }
        let t = Instant::now();
        let rows: Vec<UsageRow> = ch.query(sql).fetch_all().await.with_context(|| format!("query {sql}"))?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        result = rows.into_iter().map(|r| ((r.tenant, r.meter), from_ch_i128(r.usage).normalize())).collect();
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0], result))
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct PartRow {
    table: String,
    rows: u64,
    bytes: u64,
}

async fn queries(args: &Args, ch: &clickhouse::Client, gt: &GroundTruth, report: &mut Report) -> Result<()> {
    let month_start: u32 = ch.query("SELECT toUInt32(toDateTime(toStartOfMonth(now())))").fetch_one().await?;
    let mut expected: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    for w in gt.windows.iter().filter(|w| w.window_start >= i64::from(month_start) * 1000) {
        *expected.entry((w.tenant.clone(), w.meter.clone())).or_default() += w.value;
    }
    for v in expected.values_mut() {
        *v = v.normalize();
    }
    let (mf_med, mf_min, mf) = time_query(ch, Q_METERFLOW, args.query_runs).await?;
    let (bg_med, bg_min, bg) = time_query(ch, Q_BASE_GROUP, args.query_runs).await?;
    let (bf_med, bf_min, bf) = time_query(ch, Q_BASE_FINAL, args.query_runs).await?;
    let (mv_med, _, mv) = time_query(ch, Q_BASE_MV, args.query_runs).await?;
    let eq = |a: &BTreeMap<(String, String), Decimal>| if *a == expected { "= ground truth".to_owned() } else { format!("DIFFERS from the ground truth ({} of {} tenant/meter totals)", a.iter().filter(|(k, v)| expected.get(*k) != Some(*v)).count() + expected.keys().filter(|k| !a.contains_key(*k)).count(), expected.len()) };
    let ms = |s: f64| format!("{:.1} ms", s * 1e3);
    report.row("query", "usage per tenant and meter this month: meterflow (meter_totals)", ms(mf_med), format!("median of up to {} runs after a warm-up, min {}; result {}", args.query_runs, ms(mf_min), eq(&mf)));
    report.row("query", "same on the baseline, dedup by GROUP BY event_id", ms(bg_med), format!("min {}; result {}", ms(bg_min), eq(&bg)));
    report.row("query", "same on the baseline, dedup by FINAL", ms(bf_med), format!("min {}; result {}", ms(bf_min), eq(&bf)));
    let over: Decimal = mv.iter().map(|(k, v)| *v - expected.get(k).copied().unwrap_or_default()).sum();
    let total: Decimal = expected.values().copied().sum();
    report.row(
        "query",
        "baseline's SummingMergeTree MV (fast, wrong)",
        ms(mv_med),
        format!(
            "result {}: duplicates are summed in at insert time, over-counting usage by {} ({:.2}% of {})",
            eq(&mv),
            over.round_dp(3),
            if total.is_zero() { 0.0 } else { (over / total).to_string().parse::<f64>().unwrap_or(0.0) * 100.0 },
            total.round_dp(3)
        ),
    );
    let parts: Vec<PartRow> = ch
        .query("SELECT table, sum(rows) AS rows, sum(bytes_on_disk) AS bytes FROM system.parts WHERE database = currentDatabase() AND active GROUP BY table ORDER BY table")
        .fetch_all()
        .await?;
    let part = |t: &str| parts.iter().find(|p| p.table == t).map_or((0, 0), |p| (p.rows, p.bytes));
    let (agg_rows, agg_bytes) = part("meter_aggregates");
    let (raw_rows, raw_bytes) = part("usage_events");
    let (base_rows, base_bytes) = part("baseline_events");
    let (mv_rows, _) = part(".inner.baseline_hourly");
    report.row("rows", "meterflow: meter_aggregates (what the usage query reads)", fmt_rate(agg_rows as f64), format!("{} on disk; window revisions not merged away yet included", mib(agg_bytes)))
        ;
    report.row("rows", "meterflow: usage_events (drill-down and cold dedup tier, not read by the usage query)", fmt_rate(raw_rows as f64), format!("{} on disk; each accepted event once (before merges: replays fold later)", mib(raw_bytes)));
    report.row("rows", "baseline: baseline_events (what the dedup query reads)", fmt_rate(base_rows as f64), format!("{} on disk; duplicates until merged", mib(base_bytes)));
    report.row("rows", "baseline: MV rows (tenant/meter/hour)", fmt_rate(mv_rows as f64), "");
    let speedup = bg_med.min(bf_med) / mf_med;
    let fewer = base_rows as f64 / agg_rows.max(1) as f64;
    let all_equal = mf == expected && bg == expected && bf == expected;
    report.goal(
        "usage query >= 10x faster than the baseline (after 10M events), results equal",
        format!("{:.1}x ({} vs the faster baseline query {}) at {} events; results equal: {}", speedup, ms(mf_med), ms(bg_med.min(bf_med)), fmt_rate(gt.counters.sent as f64), if all_equal { "yes" } else { "NO" }),
        Some(speedup >= 10.0 && all_equal),
    );
    report.goal(
        ">= 100x fewer rows than the baseline (after 10M events)",
        format!("{:.1}x ({} meter_aggregates rows vs {} raw rows) at {} events", fewer, fmt_rate(agg_rows as f64), fmt_rate(base_rows as f64), fmt_rate(gt.counters.sent as f64)),
        Some(fewer >= 100.0),
    );
    if gt.counters.sent < 10_000_000 {
        report.note(format!(
            "the query and row goals are stated for 10M events; this run used {} (--events). Raw rows grow with events, window rows with tenants x meters x dimension values x minutes, so the ratios grow with the event rate per window.",
            fmt_rate(gt.counters.sent as f64)
        ));
    }
    Ok(())
}

/// Per window of the freshness phase: what was produced into it.
#[derive(Debug, Default, Clone)]
struct FreshWindow {
    events: u64,
    last_ack_ms: i64,
    close_ms: i64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct SeenRow {
    tenant: String,
    meter: String,
    dimensions_key: String,
    window_start: u32,
    event_count: i64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn freshness(args: &Args, catalog: &Arc<MeterCatalog>, report: &mut Report) -> Result<()> {
    let env = TestEnv::with_partitions("bench_fresh", args.partitions).await?;
    let (kafka, topics) = (env.kafka_args().clone(), env.topics().clone());
    let http = format!("127.0.0.1:{}", free_port()?);
    let log = log_dir("bench")?.join(format!("fresh-{}.log", env.database()));
    // Production settings (flush 1 s, idle timeout 5 s): the windows measured close by traffic.
    let mut agg = Proc::new("meterflow-aggregator", aggregator_env(&kafka, &topics, env.clickhouse_args(), "bench-fresh", &http, &[]), log)?;
    agg.start()?;
    // Ready and in the group before traffic starts.
    let ready = Instant::now();
    while http_get(&http, "/readyz").await.is_err() {
        anyhow::ensure!(ready.elapsed() < Duration::from_secs(30), "aggregator not ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;

    type Key = (String, String, String, i64);
    let windows: Arc<std::sync::Mutex<HashMap<Key, FreshWindow>>> = Arc::default();
    let seen: Arc<std::sync::Mutex<HashMap<Key, (i64, i64)>>> = Arc::default();
    let stop_polling = tokio_util::sync::CancellationToken::new();
    let poller = {
        let (ch, seen, stop) = (env.clickhouse(), seen.clone(), stop_polling.clone());
        tokio::spawn(async move {
            let mut polls = 0u64;
            while !stop.is_cancelled() {
                let rows: Result<Vec<SeenRow>, _> = ch
                    .query("SELECT tenant, meter, dimensions_key, toUInt32(window_start) AS window_start, event_count \
                            FROM meter_aggregates WHERE revision = 0 AND inserted_at >= now() - 30")
                    .fetch_all()
                    .await;
                let at = now_ms();
                if let Ok(rows) = rows {
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    for r in rows {
                        s.entry((r.tenant, r.meter, r.dimensions_key, i64::from(r.window_start) * 1000)).or_insert((at, r.event_count));
                    }
                }
                polls += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            polls
        })
    };

    let producer = EventProducer::new(&kafka, &topics.usage_topic)?;
    let mut rng = StdRng::seed_from_u64(7);
    let workload = Workload::new(catalog, 50, 1.1, "bench", &mut rng)?;
    let mut window = producer.window::<Key>(20_000);
    let started = Instant::now();
    let duration = Duration::from_secs(args.freshness_secs);
    let mut i = 0u64;
    let mut pending = Vec::new();
    let apply = |sent: meterflow_producer::Sent<Key>, windows: &std::sync::Mutex<HashMap<Key, FreshWindow>>| -> Result<()> {
        let at = now_ms();
        sent.result.map_err(|e| anyhow::anyhow!("send failed: {e}"))?;
        let mut w = windows.lock().unwrap_or_else(|e| e.into_inner());
        let entry = w.get_mut(&sent.tag).expect("window registered at send");
        entry.events += 1;
        entry.last_ack_ms = entry.last_ack_ms.max(at);
        Ok(())
    };
    while started.elapsed() < duration {
        let due = started + Duration::from_secs_f64(i as f64 / args.freshness_rate);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        if pending.is_empty() {
            let tenant = workload.pick_tenant(&mut rng);
            let req = workload.request(tenant, &mut rng);
            let id = meterflow_producer::random_event_id();
            workload.gen_events(&req, &id, now_ms(), &mut pending);
            pending.reverse();
        }
        let mut ev = pending.pop().expect("a request has events");
        ev.event_time_ms = now_ms();
        let def = catalog.get(ev.meter).context("workload meter not in the catalog")?;
        let dims: BTreeMap<String, String> = ev
            .dimensions()
            .filter(|(k, _)| def.group_by.iter().any(|g| g == k))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let ws = def.window_start(ev.event_time_ms);
        let key: Key = (workload.tenant_name(ev.tenant).to_owned(), ev.meter.to_owned(), dimensions_key(&dims), ws);
        windows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_insert_with(|| FreshWindow { close_ms: ws + def.window_ms + def.allowed_lateness_ms, ..Default::default() });
        let payload = producer.encode(&ev.to_usage_event(&workload));
        window.send(workload.tenant_name(ev.tenant), &payload, key).await;
        for sent in window.drain_completed() {
            apply(sent, &windows)?;
        }
        i += 1;
    }
    for sent in window.finish().await {
        apply(sent, &windows)?;
    }
    let stopped_ms = now_ms();
    let produced_secs = started.elapsed().as_secs_f64();
    // Windows that closed by traffic are in; give the rest (closed by idle ticks) time too.
    tokio::time::sleep(Duration::from_secs(15)).await;
    stop_polling.cancel();
    let polls = poller.await?;
    agg.check_alive()?;
    agg.terminate()?;

    let windows = windows.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (mut abs, mut rel) = (Vec::new(), Vec::new());
    let (mut missing, mut wrong) = (0, 0);
    for (key, w) in &windows {
        // Only windows whose close time passed while traffic was flowing (a later one closes
        // by idle tick, which is another measurement).
        if w.close_ms > stopped_ms - 1_000 {
            continue;
        }
        match seen.get(key) {
            None => missing += 1,
            Some((at, count)) => {
                if *count as u64 != w.events {
                    wrong += 1;
                }
                abs.push((at - w.last_ack_ms) as f64 / 1000.0);
                rel.push((at - w.close_ms) as f64 / 1000.0);
            }
        }
    }
    abs.sort_by(f64::total_cmp);
    rel.sort_by(f64::total_cmp);
    let n = rel.len();
    report.row(
        "freshness",
        "last event acked -> its window queryable (meter_aggregates), p50 / p99",
        format!("{:.2} s / {:.2} s", percentile(&abs, 0.5), percentile(&abs, 0.99)),
        format!("{n} windows closed by live traffic; {} events in {:.0} s at {} ev/s, real-time event times; minute windows + 10 s allowed lateness are in this figure", i, produced_secs, args.freshness_rate),
    );
    report.row(
        "freshness",
        "window close (end + allowed lateness) -> queryable, p50 / p99 / max",
        format!("{:.2} s / {:.2} s / {:.2} s", percentile(&rel, 0.5), percentile(&rel, 0.99), rel.last().copied().unwrap_or(f64::NAN)),
        format!("polled every 100 ms ({polls} polls); flush interval 1 s; {missing} windows not seen, {wrong} with a wrong event count"),
    );
    let p99 = percentile(&rel, 0.99);
    report.goal(
        "freshness p99 <= window close + 2 s",
        format!("p99 {:.2} s after close ({n} windows{})", p99, if missing + wrong > 0 { format!("; {missing} missing, {wrong} wrong") } else { String::new() }),
        Some(n > 0 && p99 <= 2.0 && missing == 0 && wrong == 0),
    );
    Ok(())
}
