//! The ingest rows of `meterflow-bench`: events/s through `meterflow-api` (release binary, a
//! process of its own) in batches of 100 and of 1 over keep-alive connections, request
//! latency p50/p99, against `meterflow-producer`'s library (`EventProducer`, 100k in flight)
//! straight to the same broker in the same run; then p99 at half the batched rate.
//!
//! `--api-events N` (default 200,000; 0 skips), `--api-only` (skip every other phase).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use meterflow_core::UsageEvent;
use meterflow_testkit::procs::{service_env, repo_root};
use meterflow_e2e::scenario::now_ms;
use meterflow_producer::EventProducer;
use meterflow_testkit::TestEnv;
use rust_decimal::Decimal;

use meterflow_testkit::http::free_port;
use meterflow_testkit::procs::ServiceProc;

use crate::harness::log_dir;
use crate::{fmt_rate, percentile, Args, Report};

const TENANTS: u64 = 10;
/// Concurrent HTTP clients (connections).
const CLIENTS: usize = 16;

fn event(i: u64, t: i64) -> UsageEvent {
    UsageEvent::new(format!("e-{i}"), format!("tenant-{:03}", i % TENANTS), "input_tokens", Decimal::from(100 + i % 1000), t)
        .with_dimension("model", if i % 2 == 0 { "gpt-4o" } else { "llama-3-70b" })
        .with_dimension("region", "eu")
}

fn json(e: &UsageEvent) -> serde_json::Value {
    serde_json::json!({"event_id": e.event_id, "meter": e.meter, "quantity": e.quantity.to_string(),
        "event_time": e.event_time_ms, "dimensions": e.dimensions})
}

/// Sends `bodies` (tenant index, body, events) with CLIENTS connections; `pace` is the target
/// requests/s (None: as fast as possible). Returns (seconds, latencies in ms).
async fn blast(url: &str, keys: &Arc<Vec<String>>, bodies: Arc<Vec<(usize, String)>>, pace: Option<f64>) -> Result<(f64, Vec<f64>)> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (next, bodies, keys, url) = (next.clone(), bodies.clone(), keys.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some((tenant, body)) = bodies.get(i) else { break };
                if let Some(rps) = pace {
                    let due = started + Duration::from_secs_f64(i as f64 / rps);
                    tokio::time::sleep_until(due.into()).await;
                }
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .bearer_auth(&keys[*tenant])
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                let status = r.status().as_u16();
                let _ = r.bytes().await?;
                ensure!(status == 202, "meterflow-api answered {status}");
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Ok((secs, lat))
}

pub async fn ingest(args: &Args, report: &mut Report) -> Result<()> {
    let n = args.api_events;
    if n == 0 {
        return Ok(());
    }
    let env = TestEnv::with_partitions("bench_api", args.partitions).await?;
    let (kafka, topics) = (env.kafka_args().clone(), env.topics().clone());
    let t = now_ms() - 60_000;

    // Direct: the producer library, same broker, same events.
    println!("== ingest: {n} events straight to the broker (EventProducer)");
    let producer = EventProducer::new(&kafka, &topics.usage_topic)?;
    let started = Instant::now();
    let mut window = producer.window::<()>(100_000);
    for i in 0..n {
        let e = event(i, t);
        window.send(&e.tenant, &producer.encode(&e), ()).await;
    }
    let sent = window.finish().await;
    let direct_secs = started.elapsed().as_secs_f64();
    ensure!(sent.iter().all(|s| s.result.is_ok()), "direct produce errors");
    let direct = n as f64 / direct_secs;

    // The API, a release process of its own.
    let mut keys = Vec::new();
    for i in 0..TENANTS {
        keys.push(meterflow_admin::keys::create(env.clickhouse_args(), &format!("tenant-{i:03}"), meterflow_api::keys::Scope::Ingest).await?.1);
    }
    let keys = Arc::new(keys);
    let http = format!("127.0.0.1:{}", free_port()?);
    let mut vars = service_env(&kafka, &topics, env.clickhouse_args());
    vars.extend([
        ("METERFLOW_API_HTTP_ADDR".to_owned(), http.clone()),
        ("METERFLOW_METERS".to_owned(), repo_root().join("config/meters.toml").display().to_string()),
        ("METERFLOW_CATALOG".to_owned(), repo_root().join("config/catalog.toml").display().to_string()),
        ("METERFLOW_API_TENANT_RATE".to_owned(), "0".to_owned()),
        ("METERFLOW_API_MAX_IN_FLIGHT".to_owned(), "1000000".to_owned()),
        ("METERFLOW_LOG".to_owned(), "warn".to_owned()),
    ]);
    let mut api = ServiceProc::new("meterflow-api", vars, log_dir("bench")?.join("api.log"))?;
    api.start()?;
    let base = format!("http://{http}");
    api.wait_ready(&format!("{base}/readyz"), Duration::from_secs(60)).await?;
    let url = format!("{base}/v1/events");

    // Batches of 100 (one tenant per batch, as a tenant's service would send).
    let batches: Vec<(usize, String)> = (0..n / 100)
        .map(|b| {
            let tenant = (b % TENANTS) as usize;
            let items: Vec<serde_json::Value> =
                (0..100)
                    .map(|k| {
                        let mut v = json(&event(b * 100 + k, t));
                        v["event_id"] = format!("b100-{b}-{k}").into();
                        v
                    })
                    .collect();
            (tenant, serde_json::Value::Array(items).to_string())
        })
        .collect();
    let batches = Arc::new(batches);
    println!("== ingest: {} requests of 100 events through meterflow-api, {CLIENTS} connections", batches.len());
    let (secs100, lat100) = blast(&url, &keys, batches.clone(), None).await?;
    let rate100 = (batches.len() * 100) as f64 / secs100;

    // Batches of 1 (a tenth of the events: one request per event is the slow path).
    let singles: Vec<(usize, String)> =
        (0..(n / 10).max(100)).map(|i| ((i % TENANTS) as usize, json(&event(10 * n + i, t)).to_string())).collect();
    let singles = Arc::new(singles);
    println!("== ingest: {} requests of 1 event", singles.len());
    let (secs1, lat1) = blast(&url, &keys, singles.clone(), None).await?;
    let rate1 = singles.len() as f64 / secs1;

    // p99 at half the batched rate.
    let half_rps = rate100 / 2.0 / 100.0;
    let paced: Vec<(usize, String)> = (0..((half_rps * 10.0) as usize).max(50))
        .map(|b| {
            let items: Vec<serde_json::Value> = (0..100)
                .map(|k| {
                    let mut v = json(&event(20 * n, t));
                    v["event_id"] = format!("half-{b}-{k}").into();
                    v
                })
                .collect();
            ((b as u64 % TENANTS) as usize, serde_json::Value::Array(items).to_string())
        })
        .collect();
    println!("== ingest: {} requests of 100 paced at {:.0} requests/s (half the batched rate)", paced.len(), half_rps);
    let (_, lat_half) = blast(&url, &keys, Arc::new(paced), Some(half_rps)).await?;
    api.stop()?;

    let p = |l: &[f64], q: f64| percentile(l, q);
    report.row("ingest", "meterflow-producer straight to the broker (EventProducer, 100k in flight)", format!("{} ev/s", fmt_rate(direct)), format!("{n} events in {direct_secs:.1} s, idempotent, acks=all"));
    report.row(
        "ingest",
        format!("HTTP batches of 100 (meterflow-api, {CLIENTS} keep-alive connections)"),
        format!("{} ev/s", fmt_rate(rate100)),
        format!("{} requests; latency p50 {:.1} ms, p99 {:.1} ms; 202 after the broker's ack", batches.len(), p(&lat100, 0.50), p(&lat100, 0.99)),
    );
    report.row(
        "ingest",
        "HTTP batches of 1",
        format!("{} ev/s", fmt_rate(rate1)),
        format!("{} requests; latency p50 {:.1} ms, p99 {:.1} ms", singles.len(), p(&lat1, 0.50), p(&lat1, 0.99)),
    );
    let ratio = rate100 / direct;
    report.goal("batched HTTP ingest >= 80% of the direct producer's rate (same broker)", format!("{:.0}% ({} vs {} ev/s)", ratio * 100.0, fmt_rate(rate100), fmt_rate(direct)), Some(ratio >= 0.8));
    let p99_half = p(&lat_half, 0.99);
    report.goal(
        "HTTP ingest p99 <= 50 ms at half the batched rate",
        format!("p99 {p99_half:.1} ms, p50 {:.1} ms at {:.0} events/s ({} requests of 100)", p(&lat_half, 0.50), half_rps * 100.0, lat_half.len()),
        Some(p99_half <= 50.0),
    );
    Ok(())
}
