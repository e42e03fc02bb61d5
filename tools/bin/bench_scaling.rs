//! The scaling phase (issue 17): the same workload on 1, 2 and 4 partitions, each consumed by
//! as many aggregator processes of one group (static members), until ClickHouse is exact.
//!
//! The capacity model (docs/scaling.md) assumes partitions share nothing but the broker and
//! ClickHouse: the CPU per event of the whole pipeline (aggregators + ClickHouse + broker)
//! must not grow with the number of instances, and throughput must grow with them until the
//! machine's cores are busy. Its prediction for `k` instances on this machine is
//! `min(k · r1, cores / c1)`, with `r1` the one-instance rate and `c1` the CPU seconds per event
//! of every process involved in the one-instance run; the table puts it beside the measurement.
//!
//! The rate is taken only while every instance owns a partition (from the moment all of them
//! have read a record until the input is read), so a late join does not count as slowness;
//! records re-read after a rebalance count as work (they are reported).

use super::*;

/// One point of the curve.
struct Point {
    instances: usize,
    /// Records processed per second while all instances consumed (all of them, re-reads too).
    rate: f64,
    /// CPU seconds per record in that interval: (aggregators, ClickHouse, broker).
    cpu: (f64, f64, f64),
    /// Cores busy with everything else on the machine meanwhile (other processes, this
    /// bench's own polling): what the pipeline could not use.
    others: f64,
    /// Records read more than once (a rebalance moved a partition mid-run).
    reread: f64,
    /// Start of the instances -> totals exact.
    exact_secs: f64,
    secs: f64,
}

impl Point {
    fn cpu_total(&self) -> f64 {
        self.cpu.0 + self.cpu.1 + self.cpu.2
    }
}

pub(super) async fn scaling(args: &Args, pids: Pids, report: &mut Report) -> Result<()> {
    if args.scaling_events == 0 {
        return Ok(());
    }
    let mut points = Vec::new();
    for &k in &args.scaling_instances {
        println!("== scaling: {} events on {k} partitions, {k} aggregator instances", args.scaling_events);
        points.push(point(args.scaling_events, k, pids).await?);
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
    let Some(one) = points.iter().find(|p| p.instances == 1) else {
        report.note("scaling: no one-instance run (--scaling-instances must contain 1) to predict from");
        return Ok(());
    };
    let (r1, c1) = (one.rate, one.cpu_total());
    for p in &points {
        let free = (cores - p.others).max(0.1);
        let predicted = (p.instances as f64 * r1).min(free / c1);
        report.row(
            "scaling",
            format!("{k} partition(s), {k} aggregator instance(s): records/s while all consume", k = p.instances),
            format!("{} rec/s", fmt_rate(p.rate)),
            format!(
                "model min(k·r1, free cores/c1) = {} rec/s ({:+.0}%), free = {cores:.0} - {:.2} cores busy with other work; CPU per record: aggregators {:.2} µs, ClickHouse {:.2} µs, broker {:.2} µs, total {:.2} µs ({:.2} busy cores); {:.1} s consuming, exact {:.1} s after the start; {} records re-read",
                fmt_rate(predicted),
                (p.rate / predicted - 1.0) * 100.0,
                p.others,
                p.cpu.0 * 1e6,
                p.cpu.1 * 1e6,
                p.cpu.2 * 1e6,
                p.cpu_total() * 1e6,
                p.cpu_total() * p.rate,
                p.secs,
                p.exact_secs,
                fmt_rate(p.reread)
            ),
        );
    }
    if let Some(last) = points.iter().max_by_key(|p| p.instances).filter(|p| p.instances > 1) {
        let growth = last.cpu_total() / c1;
        report.goal(
            "scaling: CPU per record independent of the instance count (the capacity model's assumption)",
            format!("{:.2} µs with {} instances vs {:.2} µs with 1 ({:+.0}%)", last.cpu_total() * 1e6, last.instances, c1 * 1e6, (growth - 1.0) * 100.0),
            Some(growth <= 1.25),
        );
    }
    Ok(())
}

/// (instant, records read, CPU seconds of the aggregators / ClickHouse / the broker, the
/// machine's busy seconds) at one moment of a scaling run.
type Sample = (Instant, f64, (f64, f64, f64), f64);

/// One run: `events` into a fresh `k`-partition topic, `k` aggregators, until exact.
async fn point(events: u64, k: usize, pids: Pids) -> Result<Point> {
    let env = TestEnv::with_partitions(&format!("bench_scale{k}"), k as i32).await?;
    let (kafka, topics) = (env.kafka_args().clone(), env.topics().clone());
    let mut cfg = workload(events, 42)?;
    cfg.max_in_flight = 100_000;
    let gt = produce(&kafka, &topics.usage_topic, cfg).await?;
    let sent = gt.counters.sent as f64;
    let group = format!("bench-scale-{k}");
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..k {
        let http = format!("127.0.0.1:{}", free_port()?);
        let instance = format!("{group}-{i}");
        let extra = [("METERFLOW_IDLE_TIMEOUT", "1s"), ("METERFLOW_GROUP_INSTANCE_ID", instance.as_str())];
        let log = log_dir("bench")?.join(format!("{group}-{i}-{}.log", env.clickhouse_args().database));
        procs.push(ServiceProc::new("meterflow-aggregator", aggregator_env(&kafka, &topics, env.clickhouse_args(), &group, &http, &extra), log)?);
        addrs.push(http);
    }
    let started = Instant::now();
    for p in &mut procs {
        p.start()?;
    }
    let ch = meterflow_runtime::clickhouse::client(env.clickhouse_args());
    let agg_cpu = |procs: &[ServiceProc]| procs.iter().filter_map(|p| p.pid().and_then(cpu_secs)).sum::<f64>();
    // When all consume, and when the input is read.
    let mut from: Option<Sample> = None;
    let mut to: Option<Sample> = None;
    let mut last_verify = Instant::now() - Duration::from_secs(10);
    let deadline = started + Duration::from_secs(1800);
    let exact_secs = loop {
        anyhow::ensure!(Instant::now() < deadline, "{group}: not exact after 30 minutes");
        let mut read = Vec::with_capacity(k);
        for (p, addr) in procs.iter_mut().zip(&addrs) {
            p.check_alive()?;
            let text = get_ok(&format!("http://{addr}/metrics")).await.unwrap_or_default();
            read.push(metric_sum(&text, "meterflow_aggregator_events_in_total"));
        }
        let total: f64 = read.iter().sum();
        let cpu = || {
            let (ch_cpu, broker_cpu, _) = pids.cpu();
            (agg_cpu(&procs), ch_cpu, broker_cpu)
        };
        if from.is_none() && read.iter().all(|r| *r > 0.0) {
            from = Some((Instant::now(), total, cpu(), machine_busy_secs()));
        }
        if from.is_some() && to.is_none() && total >= sent {
            to = Some((Instant::now(), total, cpu(), machine_busy_secs()));
        }
        if to.is_some() && last_verify.elapsed() >= Duration::from_secs(1) {
            last_verify = Instant::now();
            let w = verify::window_totals(&ch, &gt).await;
            let d = verify::dead_letters(&ch, &gt, &topics.usage_topic).await;
            if matches!((&w, &d), (Ok(w), Ok(d)) if w.ok() && d.ok()) {
                break started.elapsed().as_secs_f64();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut reread = 0.0;
    for (p, addr) in procs.iter_mut().zip(&addrs) {
        let text = get_ok(&format!("http://{addr}/metrics")).await.unwrap_or_default();
        reread += metric_sum(&text, "meterflow_aggregator_events_in_total");
        p.terminate()?;
    }
    let ((t0, n0, c0, b0), (t1, n1, c1, b1)) = (from.context("never all consuming")?, to.context("input never read")?);
    let (secs, n) = (t1.duration_since(t0).as_secs_f64(), (n1 - n0).max(1.0));
    let ours = (c1.0 - c0.0) + (c1.1 - c0.1) + (c1.2 - c0.2);
    anyhow::ensure!(secs > 0.5, "{group}: all instances consumed together for only {secs:.2} s; use more --scaling-events");
    Ok(Point {
        instances: k,
        rate: n / secs,
        cpu: ((c1.0 - c0.0) / n, (c1.1 - c0.1) / n, (c1.2 - c0.2) / n),
        others: ((b1 - b0) - ours).max(0.0) / secs,
        reread: (reread - sent).max(0.0),
        exact_secs,
        secs,
    })
}

/// CPU seconds all cores spent busy since boot (`/proc/stat`, clock ticks of 1/100 s).
fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy: f64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    busy / 100.0
}
