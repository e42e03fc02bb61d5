//! The aggregator phase: one release aggregator over the pre-filled topic until ClickHouse is
//! exact, optionally SIGKILLed and restarted part-way, with its CPU, waits and checkpoints.

use super::*;

#[derive(Debug, Default)]
pub(super) struct KillResult {
    pub(super) resume_secs: f64,
    pub(super) lag0_secs: f64,
    pub(super) exact_secs: f64,
    pub(super) behind: i64,
}

#[derive(Debug, Default)]
pub(super) struct AggRun {
    pub(super) startup_secs: f64,
    pub(super) consume_secs: f64,
    pub(super) exact_secs: f64,
    pub(super) rss_idle: u64,
    pub(super) rss_peak: u64,
    pub(super) rss_end: u64,
    pub(super) hot_ids: f64,
    /// RSS growth per remembered id between 25% of the input and the end.
    pub(super) slope_bytes_per_id: Option<f64>,
    /// CPU seconds of (aggregator, ClickHouse, broker) from the first to the last record.
    pub(super) cpu: (f64, f64, f64),
    /// Seconds the aggregator spent in ClickHouse inserts and in checkpoints (its histograms'
    /// sums) until the last record was read.
    pub(super) insert_secs: f64,
    pub(super) checkpoint_secs: f64,
    pub(super) checkpoints: f64,
    /// Checkpoint time and size by input size, delta and full.
    pub(super) checkpoints_by_size: bench_checkpoints::Tracker,
    pub(super) kill: Option<KillResult>,
}

/// Input sizes at which the checkpoint time is reported (the table).
pub(super) const CHECKPOINT_MARKS: [u64; 3] = [1_000_000, 5_000_000, 10_000_000];

/// Runs an aggregator process over the pre-filled topic until ClickHouse (`ch`) is exact.
/// With `kill_at`, SIGKILLs it once that fraction of the messages was read and restarts it.
pub(super) async fn aggregator_run(
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
    let mut agg = ServiceProc::new("meterflow-aggregator", aggregator_env(kafka, topics, ch_args, group, &http, &env), log)?;
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
    let agg_cpu = |agg: &ServiceProc| agg.pid().and_then(cpu_secs).unwrap_or(0.0);
    // (hot ids, RSS) when a quarter of the input had been read.
    let mut quarter: Option<(f64, u64)> = None;
    let mut marks = CHECKPOINT_MARKS.iter().copied().filter(|m| (*m as f64) <= sent).peekable();
    loop {
        agg.check_alive()?;
        anyhow::ensure!(Instant::now() < deadline, "{group}: not exact after an hour");
        let text = get_ok(&format!("http://{http}/metrics")).await.unwrap_or_default();
        let events_in = metric_sum(&text, "meterflow_aggregator_events_in_total");
        if restarted.is_none() {
            let reached = marks.next_if(|m| events_in >= *m as f64);
            run.checkpoints_by_size.scrape(&text, reached);
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
    let text = get_ok(&format!("http://{http}/metrics")).await.unwrap_or_default();
    run.hot_ids = metric_sum(&text, "meterflow_aggregator_dedup_hot_ids");
    run.rss_end = agg.rss_bytes().unwrap_or(0);
    if let (Some((ids, rss)), None) = (quarter, restarted) {
        if run.hot_ids > ids {
            run.slope_bytes_per_id = Some((run.rss_end as f64 - rss as f64) / (run.hot_ids - ids));
        }
    }
    run.checkpoints_by_size.finish();
    if restarted.is_some() {
        run.kill = Some(kill);
    }
    agg.stop()?;
    Ok(run)
}

/// Messages between the committed offsets of `group` and the end of every partition.
pub(super) async fn group_lag(kafka: &KafkaArgs, topic: &str, group: &str) -> Result<i64> {
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
