//! `meterflow-bench-usage`: "usage per tenant and meter this month" through `GET /v1/usage` at
//! 10M events' worth of windows: p50/p99 latency, equality with `meter_totals`, and rows read
//! by ClickHouse vs the raw events. Prints a table with a goal column and writes it to
//! `target/bench/bench-usage.md`.
//!
//! To reach 10M events quickly it **inserts synthetic window revisions straight into
//! `meter_aggregates`** (the aggregator's own row type), as the aggregator would have written
//! them for `--events` events: `--tenants` tenants, `input_tokens` (sum, 4 dimension sets) and
//! `requests` (count, 2), minute windows spread over the current month up to now, `--per-window`
//! events each, and a restatement (revision 1 carrying the previous value) for every 10th
//! window. The rollups are filled by migration 016's materialized views from those inserts,
//! exactly as in production. The API runs in-process with the shared local ClickHouse
//! (`make up`) in a database of its own; one keep-alive client sends the queries one by one.
//!
//! ```sh
//! make bench-usage     # cargo run --release -p meterflow-tools --bin meterflow-bench-usage
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use clap::Parser;
use meterflow_aggregator::rows::AggregateRow;
use meterflow_api::keys::Scope;
use meterflow_core::decimal::from_ch_i128;
use meterflow_core::pricing;
use meterflow_core::records::MeterAggregate;
use meterflow_testkit::procs::{parse_with_env, service_env, repo_root};
use meterflow_e2e::scenario::now_ms;
use meterflow_testkit::TestEnv;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "meterflow-bench-usage", about = "GET /v1/usage at 10M events: p99, equality with meter_totals, rows read")]
struct Args {
    /// Events the synthetic windows stand for.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    #[arg(long, default_value_t = 50)]
    tenants: u64,
    /// Events per window.
    #[arg(long, default_value_t = 100)]
    per_window: u64,
    /// Timed queries (after 200 warm-up ones).
    #[arg(long, default_value_t = 3_000)]
    queries: usize,
}

const MINUTE: i64 = 60_000;
/// The dimension values of one series.
type Dims = &'static [(&'static str, &'static str)];

/// (meter, aggregation, dimension sets).
const SERIES: [(&str, &str, &[Dims]); 2] = [
    ("input_tokens", "sum", &[&[("model", "gpt-4o"), ("region", "eu")], &[("model", "gpt-4o"), ("region", "us")], &[("model", "llama-70b"), ("region", "eu")], &[("model", "llama-70b"), ("region", "us")]]),
    ("requests", "count", &[&[("model", "gpt-4o")], &[("model", "llama-70b")]]),
];

/// The window revisions `args` stands for, as the aggregator would have inserted them.
fn windows(args: &Args, month: i64, now: i64) -> Result<Vec<AggregateRow>> {
    let series: u64 = args.tenants * SERIES.iter().map(|s| s.2.len() as u64).sum::<u64>();
    let per_series = (args.events / args.per_window).div_ceil(series);
    let minutes = ((now - month) / MINUTE - 60).max(1);
    ensure!(per_series as i64 <= minutes, "{per_series} windows per series do not fit {minutes} minutes of this month: fewer --events or more --per-window");
    let mut rng = StdRng::seed_from_u64(14);
    let mut rows = Vec::new();
    let mut seq = 0;
    for t in 0..args.tenants {
        for (meter, aggregation, dim_sets) in SERIES {
            for dims in dim_sets {
                let step = minutes / per_series as i64;
                for w in 0..per_series as i64 {
                    let start = month + (w * step + rng.random_range(0..step.max(1))) * MINUTE;
                    let value = |n: u64, rng: &mut StdRng| match aggregation {
                        "count" => Decimal::from(n),
                        _ => Decimal::new(rng.random_range(100..50_000) * n as i64, rng.random_range(0..3)),
                    };
                    let v0 = value(args.per_window, &mut rng);
                    seq += 1;
                    let mut agg = MeterAggregate {
                        tenant: format!("tenant-{t:03}"),
                        meter: meter.into(),
                        aggregation: aggregation.into(),
                        dimensions: dims.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                        window_start: start,
                        window_end: start + MINUTE,
                        revision: 0,
                        value: v0,
                        previous_value: Decimal::ZERO,
                        event_count: args.per_window as i64,
                        provider_cost: Decimal::ZERO,
                        previous_provider_cost: Decimal::ZERO,
                        source_partition: (t % 4) as i32,
                        seq,
                        emitted_at: start + MINUTE,
                        uncosted_value: None,
                        previous_uncosted_value: None,
                    };
                    rows.push(AggregateRow::try_from(&agg)?);
                    if w % 10 == 0 {
                        // A late event restated the window: the revision carries what it replaces.
                        seq += 1;
                        agg.revision = 1;
                        agg.previous_value = v0;
                        agg.value = v0 + value(1, &mut rng);
                        agg.seq = seq;
                        rows.push(AggregateRow::try_from(&agg)?);
                    }
                }
            }
        }
    }
    Ok(rows)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Total {
    tenant: String,
    meter: String,
    total: i128,
}

/// The API in-process on `env`, ready, with an admin key: (base URL, key).
async fn start_api(env: &TestEnv, shutdown: &CancellationToken) -> Result<(String, String)> {
    let admin = meterflow_admin::keys::create(env.clickhouse_args(), "ops", Scope::Admin).await?.1;
    let mut vars = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
    let root = repo_root();
    for (k, v) in [
        ("METERFLOW_API_HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("METERFLOW_METERS", root.join("config/meters.toml").display().to_string()),
        ("METERFLOW_CATALOG", root.join("config/catalog.toml").display().to_string()),
        ("METERFLOW_LOG", "warn".to_owned()),
    ] {
        vars.push((k.to_owned(), v));
    }
    let running = meterflow_api::start(parse_with_env(&vars)?, shutdown.clone()).await?;
    let base = format!("http://{}", running.addr);
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{base}/readyz")).await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        ensure!(Instant::now() < deadline, "meterflow-api not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((base, admin))
}

/// Every tenant and meter through the API against `meter_totals`: (pairs compared, source).
async fn check_equal(ch: &clickhouse::Client, client: &reqwest::Client, admin: &str, url: &impl Fn(u64, &str) -> String, args: &Args, month: i64) -> Result<(usize, String)> {
    let truth: Vec<Total> = ch
        .query("SELECT tenant, meter, sum(value) AS total FROM meter_totals WHERE window_start >= toDateTime(?) GROUP BY tenant, meter")
        .bind(month / 1000)
        .fetch_all()
        .await?;
    let truth: BTreeMap<(String, String), Decimal> = truth.into_iter().map(|r| ((r.tenant, r.meter), from_ch_i128(r.total))).collect();
    let (mut equal, mut source) = (0, String::new());
    for t in 0..args.tenants {
        for (meter, _, _) in SERIES {
            let v: serde_json::Value = client.get(url(t, meter)).bearer_auth(admin).send().await?.json().await?;
            let got: Decimal = v["data"][0]["value"].as_str().context("no value")?.parse()?;
            let want = truth[&(format!("tenant-{t:03}"), meter.to_owned())];
            ensure!(got == want, "tenant-{t:03} {meter}: API {got} != meter_totals {want}");
            source = v["source"].as_str().unwrap_or_default().to_owned();
            equal += 1;
        }
    }
    Ok((equal, source))
}

/// Latencies (ms, sorted) of `args.queries` queries after 200 warm-up ones, one at a time.
async fn measure(client: &reqwest::Client, admin: &str, url: &impl Fn(u64, &str) -> String, args: &Args) -> Result<Vec<f64>> {
    let mut lat = Vec::with_capacity(args.queries);
    for i in 0..args.queries + 200 {
        let (t, meter) = (i as u64 % args.tenants, SERIES[i % 2].0);
        let t0 = Instant::now();
        let r = client.get(url(t, meter)).bearer_auth(admin).send().await?;
        ensure!(r.status().is_success(), "{}", r.status());
        r.bytes().await?;
        if i >= 200 {
            lat.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let env = TestEnv::new("bench_usage").await?;
    let ch = env.clickhouse();
    let now = now_ms();
    let month = pricing::period_start(now);
    let rows = windows(&args, month, now)?;
    let started = Instant::now();
    for chunk in rows.chunks(50_000) {
        let mut insert = ch.insert::<AggregateRow>("meter_aggregates").await?;
        for r in chunk {
            insert.write(r).await?;
        }
        insert.end().await?;
    }
    let events: i64 = ch.query("SELECT sum(event_count) FROM meter_totals").fetch_one().await?;
    println!("inserted {} window revisions ({events} events) in {:.1} s", rows.len(), started.elapsed().as_secs_f64());

    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let (base, admin) = start_api(&env, &shutdown).await?;
    let client = reqwest::Client::new();
    let range = format!("from={}&to={}", meterflow_api::usage::rfc3339(month), meterflow_api::usage::rfc3339(pricing::period_end(month)));
    let url = |t: u64, meter: &str| format!("{base}/v1/usage?meter={meter}&tenant=tenant-{t:03}&{range}&window_size=month");
    let (equal, source) = check_equal(&ch, &client, &admin, &url, &args, month).await?;
    let lat = measure(&client, &admin, &url, &args).await?;
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));

    // Rows read by ClickHouse for the API's query (its plan's SQL, logged under a query id).
    let req = meterflow_core::usage::UsageRequest {
        tenant: "tenant-000".into(),
        meter: "input_tokens".into(),
        from_ms: month,
        to_ms: pricing::period_end(month),
        window_size: meterflow_core::usage::WindowSize::Month,
        group_by: vec![],
    };
    let meters = meterflow_e2e::scenario::meters()?;
    let plan = meterflow_core::usage::plan(meters.get("input_tokens").context("meter")?, &req)?;
    let read_rows = rows_read(&ch, &plan).await?;
    let ratio = events as f64 / read_rows.max(1) as f64;
    shutdown.cancel();

    let mut md = String::new();
    writeln!(md, "| {} events ({} window revisions, synthetic) | value | goal |\n| --- | ---: | --- |", events, rows.len())?;
    writeln!(md, "| usage per tenant and meter this month, p50 | {p50:.2} ms | |")?;
    writeln!(md, "| usage per tenant and meter this month, p99 ({} queries) | {p99:.2} ms | <= 20 ms: {} |", args.queries, if p99 <= 20.0 { "met" } else { "**not met**" })?;
    writeln!(md, "| equal to meter_totals ({equal} tenant x meter) | yes | equal: met |")?;
    writeln!(md, "| answered from | {source} | |")?;
    writeln!(md, "| rows read by ClickHouse for one query | {read_rows} | |")?;
    writeln!(md, "| raw events / rows read | {ratio:.0}x | >= 1000x: {} |", if ratio >= 1000.0 { "met" } else { "**not met**" })?;
    print!("\n{md}");
    let out = repo_root().join("target/bench/bench-usage.md");
    std::fs::create_dir_all(out.parent().context("target/bench")?)?;
    std::fs::write(&out, &md)?;
    println!("\nwritten to {}", out.display());
    Ok(())
}

/// `read_rows` of `plan`'s SQL from `system.query_log`.
async fn rows_read(ch: &clickhouse::Client, plan: &meterflow_core::usage::UsagePlan) -> Result<u64> {
    let id = format!("bench-usage-{}", now_ms());
    let mut q = ch.query(&plan.sql).with_setting("query_id", &id).with_setting("log_queries", "1");
    for b in &plan.binds {
        q = match b {
            meterflow_core::usage::Bind::Str(s) => q.bind(s.as_str()),
            meterflow_core::usage::Bind::Int(i) => q.bind(*i),
        };
    }
    q.execute().await?;
    // The log is flushed asynchronously: ask until the query's entry is there.
    for _ in 0..50 {
        ch.query("SYSTEM FLUSH LOGS").execute().await?;
        let (found, n): (u64, u64) = ch
            .query("SELECT count(), max(read_rows) FROM system.query_log WHERE query_id = ? AND type = 2")
            .bind(&id)
            .fetch_one()
            .await?;
        if found > 0 {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("query {id} never appeared in system.query_log")
}
