//! The freshness phase: from a window's close to its total being queryable.

use super::*;

/// Per window of the freshness phase: what was produced into it.
#[derive(Debug, Default, Clone)]
pub(super) struct FreshWindow {
    pub(super) events: u64,
    pub(super) last_ack_ms: i64,
    pub(super) close_ms: i64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
pub(super) struct SeenRow {
    pub(super) tenant: String,
    pub(super) meter: String,
    pub(super) dimensions_key: String,
    pub(super) window_start: u32,
    pub(super) event_count: i64,
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(super) async fn freshness(args: &Args, catalog: &Arc<MeterCatalog>, report: &mut Report) -> Result<()> {
    let env = TestEnv::with_partitions("bench_fresh", args.partitions).await?;
    let (kafka, topics) = (env.kafka_args().clone(), env.topics().clone());
    let http = format!("127.0.0.1:{}", free_port()?);
    let log = log_dir("bench")?.join(format!("fresh-{}.log", env.database()));
    // Production settings (flush 1 s, idle timeout 5 s): the windows measured close by traffic.
    let mut agg = ServiceProc::new("meterflow-aggregator", aggregator_env(&kafka, &topics, env.clickhouse_args(), "bench-fresh", &http, &[]), log)?;
    agg.start()?;
    // Ready and in the group before traffic starts.
    agg.wait_ready(&format!("http://{http}/readyz"), Duration::from_secs(30)).await?;
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
        let entry = w.get_mut(&sent.tag).context("ack of a window not registered at send")?;
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
        let Some(mut ev) = pending.pop() else { continue };
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
    agg.stop()?;

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
