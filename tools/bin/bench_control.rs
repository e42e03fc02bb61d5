//! The control rows of `meterflow-bench` (issue 14): aggregator and rater in this process,
//! meterflow-api as a release process of its own (so the load generator does not share its
//! threads), on the private stack.
//!
//! 1. **ack -> pending visible**: 10 tenants each send one event at a time through
//!    `POST /v1/events`; from the 202 (the broker's ack) until
//!    `GET /v1/customers/{tenant}/balance` shows the event's spend, polled every 5 ms. The
//!    spend is read from `period_spend` (settled + pending), which only grows, so a window
//!    closing meanwhile cannot hide a sample.
//! 2. **entitlement checks**: `--control-checks` `POST /v1/entitlements/check` on a fixed
//!    schedule of `--control-rate` per second (open loop: request i is due at i / rate),
//!    sent by a bounded pool of keep-alive clients with a per-request and a total timeout.
//!    The goal is judged on the latency from the send, provided the schedule was kept (achieved
//!    rate, and the share of requests sent more than 1 ms after their due time, are reported);
//!    the latency from the scheduled time is reported too (it includes tokio's 1 ms timer
//!    granularity and any stall of the load generator).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use meterflow_api::keys::Scope;
use meterflow_testkit::procs::{parse_with_env, service_env, repo_root};
use meterflow_e2e::scenario::now_ms;
use meterflow_testkit::TestEnv;
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;

use meterflow_testkit::http::free_port;
use meterflow_testkit::procs::ServiceProc;

use crate::harness::log_dir;
use crate::{fmt_rate, percentile, Args, Report};

const TENANTS: usize = 10;
/// Events per tenant in the visibility phase (samples = TENANTS x this).
const ROUNDS: usize = 30;
/// Concurrent HTTP clients of the check phase.
const CHECK_CLIENTS: usize = 16;
/// 1,000 tokens at 0.001 = 1 USD per event, no free allowance.
const CATALOG: &str = "default_plan = \"bench\"\n[[plan]]\nid = \"bench\"\ncurrency = \"USD\"\n\
[[plan.price]]\nmeter = \"input_tokens\"\nmodel = \"per_unit\"\nunit_price = \"0.001\"\n\
[[spend_limit]]\ntenant = \"tenant-001\"\ncurrency = \"USD\"\namount = \"1000000\"\nkind = \"hard\"\n";

/// Keys of the tenants: ingest (to send and check) and read (to read balances).
struct Keys {
    ingest: Vec<String>,
    read: Vec<String>,
}

/// The check phase's latencies (ms, sorted) and counts.
#[derive(Default)]
struct Checks {
    from_due: Vec<f64>,
    from_send: Vec<f64>,
    denied: usize,
    late: usize,
    rate: f64,
}

pub async fn control(args: &Args, report: &mut Report) -> Result<()> {
    if args.control_checks == 0 {
        return Ok(());
    }
    let env = TestEnv::with_partitions("bench_control", args.partitions).await?;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let catalog_path = log_dir("bench")?.join("control-catalog.toml");
    std::fs::write(&catalog_path, CATALOG)?;
    let catalog = catalog_path.display().to_string();
    let meters = repo_root().join("config/meters.toml").display().to_string();
    let with = |extra: &[(&str, &str)]| {
        let mut e = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
        e.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        e.push(("METERFLOW_LOG".to_owned(), "warn".to_owned()));
        e
    };
    let agg = tokio::spawn(meterflow_aggregator::run(
        parse_with_env(&with(&[("METERFLOW_AGGREGATOR_HTTP_ADDR", "127.0.0.1:0"), ("METERFLOW_METERS", &meters), ("METERFLOW_IDLE_TIMEOUT", "1s")]))?,
        shutdown.clone(),
    ));
    let rater = tokio::spawn(meterflow_rater::run(
        parse_with_env(&with(&[("METERFLOW_RATER_HTTP_ADDR", "127.0.0.1:0"), ("METERFLOW_CATALOG", &catalog), ("METERFLOW_METERS", &meters)]))?,
        shutdown.clone(),
    ));
    let http = format!("127.0.0.1:{}", free_port()?);
    let mut api = ServiceProc::new(
        "meterflow-api",
        with(&[("METERFLOW_API_HTTP_ADDR", &http), ("METERFLOW_METERS", &meters), ("METERFLOW_CATALOG", &catalog), ("METERFLOW_API_TENANT_RATE", "0")]),
        log_dir("bench")?.join("control-api.log"),
    )?;
    api.start()?;
    let base = format!("http://{http}");
    let mut keys = Keys { ingest: Vec::new(), read: Vec::new() };
    for i in 0..TENANTS {
        let tenant = format!("tenant-{i:03}");
        keys.ingest.push(meterflow_admin::keys::create(env.clickhouse_args(), &tenant, Scope::Ingest).await?.1);
        keys.read.push(meterflow_admin::keys::create(env.clickhouse_args(), &tenant, Scope::Read).await?.1);
    }
    // Ready: the last key known and the balances loaded (both: 200).
    let deadline = Instant::now() + Duration::from_secs(60);
    let probe = reqwest::Client::new();
    loop {
        let r = probe.get(format!("{base}/v1/customers/tenant-{:03}/balance", TENANTS - 1)).bearer_auth(&keys.read[TENANTS - 1]).send().await;
        if r.is_ok_and(|r| r.status().as_u16() == 200) {
            break;
        }
        api.check_alive()?;
        ensure!(Instant::now() < deadline, "meterflow-api not ready after 60 s");
        ensure!(!agg.is_finished() && !rater.is_finished(), "a service stopped by itself");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let keys = Arc::new(keys);
    let (visible, cold) = visibility(&base, &keys).await?;
    let checks = entitlement_checks(&base, &keys, args.control_checks, args.control_rate).await?;
    api.stop()?;
    shutdown.cancel();
    let _ = agg.await;
    let _ = rater.await;
    report_rows(report, &visible, &cold, &checks, args.control_rate);
    Ok(())
}

/// Phase 1: per tenant, one event at a time; ms from its 202 until the balance shows it.
/// The first event of each tenant is sent right after start-up (the services may still be
/// joining their groups and positioning their readers): reported apart, as the cold start.
async fn visibility(base: &str, keys: &Arc<Keys>) -> Result<(Vec<f64>, Vec<f64>)> {
    println!("== control: ack -> pending visible, {TENANTS} tenants x (1 cold + {ROUNDS}) events");
    let mut tasks = Vec::new();
    for t in 0..TENANTS {
        let (keys, base) = (keys.clone(), base.to_owned());
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            let tenant = format!("tenant-{t:03}");
            let url = format!("{base}/v1/customers/{tenant}/balance");
            let mut lat = Vec::new();
            for r in 0..=ROUNDS {
                let body = serde_json::json!([{"event_id": format!("v-{t}-{r}"), "meter": "input_tokens", "quantity": "1000",
                    "event_time": now_ms(), "dimensions": {"model": "gpt-4o", "region": "eu"}}]);
                let resp = c.post(format!("{base}/v1/events")).bearer_auth(&keys.ingest[t]).json(&body).send().await?;
                ensure!(resp.status().as_u16() == 202, "ingest answered {}", resp.status());
                let acked = Instant::now();
                let acked_wall = now_ms();
                let want = Decimal::from(r as u64 + 1);
                let composed = loop {
                    let v: serde_json::Value = c.get(&url).bearer_auth(&keys.read[t]).send().await?.json().await?;
                    if v["period_spend"].as_str().and_then(|s| s.parse::<Decimal>().ok()).is_some_and(|s| s >= want) {
                        break v["updated_at"].as_i64().unwrap_or(acked_wall);
                    }
                    ensure!(acked.elapsed() < Duration::from_secs(20), "{tenant}: spend {want} not visible after 20 s: {v}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                };
                let total = acked.elapsed().as_secs_f64() * 1e3;
                lat.push(Sample { total, to_rater: (composed - acked_wall) as f64, acked_wall, cold: r == 0 });
                // Spread the tenants' sends over the publication interval.
                tokio::time::sleep(Duration::from_millis(((t * 37 + r * 53) % 300) as u64)).await;
            }
            anyhow::Ok(lat)
        }));
    }
    let (mut samples, mut cold) = (Vec::new(), Vec::new());
    for t in tasks {
        for s in t.await?? {
            if s.cold {
                cold.push(s.total);
            } else {
                samples.push(s);
            }
        }
    }
    cold.sort_by(f64::total_cmp);
    samples.sort_by(|a, b| a.total.total_cmp(&b.total));
    // Where the tail goes: ack -> the rater composed the balance (aggregator, provisional
    // topic, rater) and from there -> the API answered with it (balances topic, API).
    let first = samples.iter().map(|s| s.acked_wall).min().unwrap_or(0);
    for s in samples.iter().rev().take(5) {
        println!(
            "   slow sample at +{:.1} s: {:.0} ms = {:.0} ms to the rater's balance + {:.0} ms to the API",
            (s.acked_wall - first) as f64 / 1e3,
            s.total,
            s.to_rater,
            s.total - s.to_rater
        );
    }
    Ok((samples.iter().map(|s| s.total).collect(), cold))
}

/// One visibility sample (ms).
struct Sample {
    total: f64,
    /// Ack -> the `updated_at` of the first balance showing the event (clocks of one machine).
    to_rater: f64,
    acked_wall: i64,
    /// The tenant's first event after start-up.
    cold: bool,
}

/// Phase 2: `n` checks, request i due at i / `rate`, from a bounded pool of clients.
async fn entitlement_checks(base: &str, keys: &Arc<Keys>, n: usize, rate: f64) -> Result<Checks> {
    println!("== control: {n} entitlement checks at {rate:.0}/s, {CHECK_CLIENTS} keep-alive clients");
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now() + Duration::from_millis(200);
    let mut workers = Vec::new();
    for _ in 0..CHECK_CLIENTS {
        let (next, keys, url) = (next.clone(), keys.clone(), format!("{base}/v1/entitlements/check"));
        workers.push(tokio::spawn(async move {
            let c = reqwest::Client::builder().pool_max_idle_per_host(1).timeout(Duration::from_secs(2)).build()?;
            let mut out = Checks::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(due.into()).await;
                let sent = Instant::now();
                if sent.duration_since(due) > Duration::from_millis(1) {
                    out.late += 1;
                }
                let body = format!(r#"{{"meter":"input_tokens","quantity":"{}","dimensions":{{"model":"gpt-4o","region":"eu"}}}}"#, 100 + i % 900);
                let r = c.post(&url).bearer_auth(&keys.ingest[i % TENANTS]).header("content-type", "application/json").body(body).send().await?;
                ensure!(r.status().as_u16() == 200, "check answered {}", r.status());
                let v: serde_json::Value = r.json().await?;
                if v["allowed"] != true {
                    out.denied += 1;
                }
                out.from_due.push(due.elapsed().as_secs_f64() * 1e3);
                out.from_send.push(sent.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(out)
        }));
    }
    let total = Duration::from_secs_f64(n as f64 / rate + 30.0);
    let results = tokio::time::timeout(total, async {
        let mut out = Vec::new();
        for w in workers {
            out.push(w.await?);
        }
        anyhow::Ok(out)
    })
    .await
    .context("entitlement phase timed out")??;
    let elapsed = started.elapsed().as_secs_f64();
    let mut all = Checks::default();
    for r in results {
        let c = r?;
        all.from_due.extend(c.from_due);
        all.from_send.extend(c.from_send);
        all.denied += c.denied;
        all.late += c.late;
    }
    all.from_due.sort_by(f64::total_cmp);
    all.from_send.sort_by(f64::total_cmp);
    all.rate = all.from_due.len() as f64 / elapsed;
    Ok(all)
}

fn report_rows(report: &mut Report, visible: &[f64], cold: &[f64], c: &Checks, rate: f64) {
    let p = |l: &[f64], q: f64| percentile(l, q);
    report.row(
        "control",
        "cold start: each tenant's first event right after the services started -> pending visible",
        format!("max {:.0} ms", cold.last().copied().unwrap_or(f64::NAN)),
        format!("{} samples, p50 {:.0} ms; not in the goal below (the services are still joining their groups)", cold.len(), p(cold, 0.5)),
    );
    report.row(
        "control",
        "ack -> pending visible in GET /v1/customers/{tenant}/balance (provisional interval 500 ms)",
        format!("p99 {:.0} ms", p(visible, 0.99)),
        format!("{} samples ({TENANTS} tenants); p50 {:.0} ms, max {:.0} ms", visible.len(), p(visible, 0.5), visible.last().copied().unwrap_or(f64::NAN)),
    );
    report.row(
        "control",
        format!("entitlement checks, {CHECK_CLIENTS} keep-alive clients, fixed schedule"),
        format!("{} checks/s", fmt_rate(c.rate)),
        format!(
            "{} checks ({} denied); from the send p50 {:.2} ms, p99 {:.2} ms; from the scheduled time p50 {:.2} ms, p99 {:.2} ms; {:.1}% sent > 1 ms late",
            c.from_due.len(),
            c.denied,
            p(&c.from_send, 0.5),
            p(&c.from_send, 0.99),
            p(&c.from_due, 0.5),
            p(&c.from_due, 0.99),
            c.late as f64 * 100.0 / c.from_due.len().max(1) as f64
        ),
    );
    let p99_visible = p(visible, 0.99);
    report.goal("spend pending in the balance <= 2 s (p99) after the ack", format!("p99 {p99_visible:.0} ms over {} samples", visible.len()), Some(p99_visible <= 2_000.0));
    let p99_check = p(&c.from_send, 0.99);
    report.goal(
        "entitlement check p99 <= 5 ms at 5,000 checks/s",
        format!("p99 {p99_check:.2} ms from the send at {} checks/s (from the scheduled time: p99 {:.2} ms)", fmt_rate(c.rate), p(&c.from_due, 0.99)),
        Some(p99_check <= 5.0 && c.rate >= 0.98 * rate && rate >= 5_000.0),
    );
}
