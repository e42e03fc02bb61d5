//! Trust under operations (issue 11): what operators do besides crashing the services.
//!
//! Each case ran against the pipeline before the change and lost or doubled usage (the
//! closing note of the session that added this file says how); each test asserts that its
//! fault actually happened (the table was truncated, the rows were folded, the instance was
//! stopped and its successor claimed the partitions, the connections were cut).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meterflow_core::codec::{Framing, UsageEventCodec};
use meterflow_core::decimal::from_ch_i128;
use meterflow_core::partitioning::partition_for;
use meterflow_core::UsageEvent;
use meterflow_e2e::faults::TcpProxy;
use meterflow_testkit::procs::{parse_with_env, repo_root, service_env, ServiceProc, Signal};
use meterflow_e2e::scenario::{init_test_logging, now_ms, produce, wait_until_exact, workload};
use meterflow_producer::EventProducer;
use meterflow_testkit::{wait_for, TestEnv};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

static SERIAL: Mutex<()> = Mutex::const_new(());

fn aggregator_env(env: &TestEnv, group: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
    let meters = repo_root().join("config/meters.toml").display().to_string();
    for (k, v) in [
        ("METERFLOW_AGGREGATOR_GROUP", group),
        ("METERFLOW_AGGREGATOR_HTTP_ADDR", "127.0.0.1:0"),
        ("METERFLOW_METERS", meters.as_str()),
        ("METERFLOW_IDLE_TIMEOUT", "1s"),
        ("METERFLOW_CHECKPOINT_INTERVAL", "1s"),
        ("METERFLOW_LOG", "info"),
    ] {
        e.push((k.to_owned(), v.to_owned()));
    }
    for (k, v) in extra {
        e.retain(|(x, _)| x != k);
        e.push(((*k).to_owned(), (*v).to_owned()));
    }
    e
}

fn log_path(env: &TestEnv, name: &str) -> std::path::PathBuf {
    let dir = repo_root().join("target/e2e-logs");
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{}-{name}.log", env.name()))
}

type Task = tokio::task::JoinHandle<anyhow::Result<()>>;

fn start_aggregator(env: &TestEnv, group: &str, extra: &[(&str, &str)]) -> anyhow::Result<(Task, CancellationToken)> {
    let shutdown = CancellationToken::new();
    let config = parse_with_env::<meterflow_aggregator::Config>(&aggregator_env(env, group, extra))?;
    Ok((tokio::spawn(meterflow_aggregator::run(config, shutdown.clone())), shutdown))
}

async fn stop(task: Task, shutdown: CancellationToken) -> anyhow::Result<()> {
    shutdown.cancel();
    task.await?
}

fn event(id: &str, tenant: &str, qty: i64, t: i64) -> UsageEvent {
    UsageEvent::new(id, tenant, "input_tokens", Decimal::from(qty), t)
        .with_dimension("model", "gpt-x")
        .with_dimension("region", "eu")
}

async fn send_all(env: &TestEnv, events: &[UsageEvent]) -> anyhow::Result<()> {
    let p = EventProducer::new(env.kafka_args(), &env.topics().usage_topic)?;
    for ev in events {
        p.send(ev).await?;
    }
    Ok(())
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Total {
    tenant: String,
    window_start_ms: i64,
    value: i128,
    event_count: i64,
    last_revision: u32,
}

/// meter_totals by (tenant, window start ms).
async fn totals(env: &TestEnv) -> anyhow::Result<BTreeMap<(String, i64), (Decimal, i64, u32)>> {
    let rows: Vec<Total> = env
        .clickhouse()
        .query(
            "SELECT tenant, toInt64(toUInt32(window_start)) * 1000 AS window_start_ms, value, event_count, last_revision \
             FROM meter_totals WHERE meter = 'input_tokens'",
        )
        .fetch_all()
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.tenant, r.window_start_ms), (from_ch_i128(r.value), r.event_count, r.last_revision)))
        .collect())
}

/// The independent reference: sum and count per (tenant, minute) of the events sent.
fn expected(events: &[UsageEvent]) -> BTreeMap<(String, i64), (Decimal, i64)> {
    let mut m: BTreeMap<(String, i64), (Decimal, i64)> = BTreeMap::new();
    for e in events {
        let w = e.event_time_ms.div_euclid(60_000) * 60_000;
        let slot = m.entry((e.tenant.clone(), w)).or_default();
        slot.0 += e.quantity;
        slot.1 += 1;
    }
    m
}

async fn wait_totals(env: &TestEnv, want: &BTreeMap<(String, i64), (Decimal, i64)>, timeout: Duration) -> anyhow::Result<()> {
    let res = wait_for(
        || {
            let env = env.clone();
            async move {
                let got: BTreeMap<(String, i64), (Decimal, i64)> =
                    totals(&env).await?.into_iter().map(|(k, (v, n, _))| (k, (v, n))).collect();
                Ok(got == *want)
            }
        },
        timeout,
    )
    .await;
    if let Err(e) = res {
        let got = totals(env).await?;
        anyhow::bail!("window totals never matched ({e:#}).\nexpected {want:?}\ngot {got:?}");
    }
    Ok(())
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct Emission {
    source_partition: i32,
    seq: i64,
    revision: u32,
    value: i128,
}

/// No `(partition, seq)` was ever emitted with two different contents.
async fn no_seq_with_two_contents(env: &TestEnv) -> anyhow::Result<usize> {
    let rows: Vec<Emission> = env
        .clickhouse()
        .query("SELECT source_partition, seq, revision, value FROM meter_revisions")
        .fetch_all()
        .await?;
    let mut seen: BTreeMap<(i32, i64), (u32, i128)> = BTreeMap::new();
    for r in &rows {
        if let Some(prev) = seen.insert((r.source_partition, r.seq), (r.revision, r.value)) {
            anyhow::ensure!(
                prev == (r.revision, r.value),
                "partition {} seq {} emitted twice with different content: {prev:?} and {:?}",
                r.source_partition,
                r.seq,
                (r.revision, r.value)
            );
        }
    }
    Ok(seen.len())
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct PartitionSeq {
    source_partition: i32,
    seq: i64,
}

async fn max_seq_by_partition(env: &TestEnv, sql: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let rows: Vec<PartitionSeq> = env.clickhouse().query(sql).fetch_all().await?;
    Ok(rows.into_iter().map(|r| (r.source_partition, r.seq)).collect())
}

mod partitions;
mod rater;
mod restarts;
