//! The aggregator against the real broker and ClickHouse: exact totals with duplicates, late
//! and malformed input, under SIGKILL, rebalancing and a ClickHouse outage.
//!
//! Scenarios run one at a time (a ClickHouse outage would disturb the others) and each gets
//! its own topics, consumer group and database.

use std::time::Duration;

use anyhow::Context as _;

use meterflow_testkit::procs::{parse_with_env, service_env, ServiceProc};
use meterflow_e2e::scenario::{produce, wait_until_exact, workload};
use meterflow_testkit::TestEnv;
use rand::Rng;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

static SERIAL: Mutex<()> = Mutex::const_new(());
const EVENTS: u64 = 200_000;
const PARTITIONS: i32 = 4;

fn aggregator_env(env: &TestEnv, group: &str) -> Vec<(String, String)> {
    let mut e = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
    let meters_path = meterflow_testkit::procs::repo_root().join("config/meters.toml").display().to_string();
    for (k, v) in [
        ("METERFLOW_AGGREGATOR_GROUP", group),
        ("METERFLOW_AGGREGATOR_HTTP_ADDR", "127.0.0.1:0"),
        ("METERFLOW_METERS", &meters_path),
        ("METERFLOW_IDLE_TIMEOUT", "1s"),
        ("METERFLOW_CHECKPOINT_INTERVAL", "2s"),
        ("METERFLOW_LOG", "info"),
    ] {
        e.push((k.to_owned(), v.to_owned()));
    }
    e
}

fn log_path(env: &TestEnv, name: &str) -> std::path::PathBuf {
    let dir = meterflow_testkit::procs::repo_root().join("target/e2e-logs");
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{}-{name}.log", env.name()))
}

/// In-process run (the service's `run`), the straight-through reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_totals_with_duplicates_late_and_malformed() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    meterflow_e2e::scenario::init_test_logging();
    let env = TestEnv::with_partitions("agg_exact", PARTITIONS).await?;
    let gt = produce(env.kafka_args(), &env.topics().usage_topic, workload(EVENTS, 11)?).await?;
    assert!(gt.counters.duplicates > EVENTS / 20, "the workload must contain duplicates");
    assert!(gt.counters.malformed > EVENTS / 200, "the workload must contain malformed events");
    assert!(gt.counters.late > 0, "the workload must contain late events");

    let shutdown = CancellationToken::new();
    let config = parse_with_env::<meterflow_aggregator::Config>(&aggregator_env(&env, "agg-exact"))?;
    let task = tokio::spawn(meterflow_aggregator::run(config, shutdown.clone()));
    let ch = env.clickhouse();
    let result = wait_until_exact(&ch, &gt, &env.topics().usage_topic, Duration::from_secs(180), || {
        anyhow::ensure!(!task.is_finished(), "aggregator stopped by itself");
        Ok(())
    })
    .await;
    shutdown.cancel();
    task.await??;
    result?;

    // Restatements happened (late events landed in closed windows) and are visible as revisions.
    let restated: u64 = ch.query("SELECT count() FROM meter_aggregates WHERE revision > 0").fetch_one().await?;
    assert!(restated > 0, "late events must restate windows");
    // The raw events table holds every accepted event once.
    let raw: u64 = ch.query("SELECT count() FROM usage_events_dedup").fetch_one().await?;
    assert_eq!(raw, gt.counters.unique_accepted);
    Ok(())
}

/// SIGKILL three times at random moments, restart each time: identical totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_after_three_sigkills() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::with_partitions("agg_kill", PARTITIONS).await?;
    let mut agg = ServiceProc::new("meterflow-aggregator", aggregator_env(&env, "agg-kill"), log_path(&env, "aggregator"))?;
    agg.start()?;
    let producing = {
        let (kafka, topic) = (env.kafka_args().clone(), env.topics().usage_topic.clone());
        let cfg = workload(EVENTS, 12)?;
        tokio::spawn(async move { produce(&kafka, &topic, cfg).await })
    };
    let mut rng = rand::rng();
    for kill in 1..=3 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..6_000))).await;
        agg.check_alive()?;
        agg.kill9()?;
        eprintln!("SIGKILL #{kill} of the aggregator");
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1_500))).await;
        agg.start()?;
    }
    let gt = producing.await??;
    let ch = env.clickhouse();
    wait_until_exact(&ch, &gt, &env.topics().usage_topic, Duration::from_secs(240), || agg.check_alive()).await?;
    agg.stop()?;
    assert_eq!(agg.starts, 4);
    Ok(())
}

/// Incremental checkpoints: the aggregator writes deltas after its base, is SIGKILLed after
/// several of them, and the restarted one rebuilds its state from the base plus those deltas
/// (its log says how many it applied): totals exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reads_base_plus_deltas() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::with_partitions("agg_deltas", PARTITIONS).await?;
    let mut vars = aggregator_env(&env, "agg-deltas");
    for (k, v) in [
        ("METERFLOW_CHECKPOINT_INTERVAL", "200ms"),
        // No compaction during the test: the chain only grows.
        ("METERFLOW_CHECKPOINT_FULL_EVERY", "100000"),
        ("METERFLOW_CHECKPOINT_FULL_RATIO", "1000"),
        ("METERFLOW_LOG_FORMAT", "json"),
    ] {
        vars.push((k.to_owned(), v.to_owned()));
    }
    let log = log_path(&env, "aggregator");
    let _ = std::fs::remove_file(&log);
    let mut agg = ServiceProc::new("meterflow-aggregator", vars, log.clone())?;
    agg.start()?;
    let producing = {
        let (kafka, topic) = (env.kafka_args().clone(), env.topics().usage_topic.clone());
        let cfg = workload(EVENTS, 14)?;
        tokio::spawn(async move { produce(&kafka, &topic, cfg).await })
    };
    // Several deltas of one chain stored (the longest chain of any partition).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let stored = loop {
        let n: u64 = env
            .query_scalar("SELECT toUInt64(max(c)) FROM (SELECT count() AS c FROM checkpoint_deltas GROUP BY partition)")
            .await?;
        if n >= 4 {
            break n;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "only {n} deltas stored after 120 s");
        agg.check_alive()?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let pid = agg.pid().context("running")?;
    agg.kill9()?;
    anyhow::ensure!(!agg.running(), "the aggregator survived SIGKILL");
    anyhow::ensure!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} still exists after SIGKILL");
    eprintln!("SIGKILL of the aggregator with a chain of {stored} deltas stored");
    agg.start()?;
    let gt = producing.await??;
    let ch = env.clickhouse();
    wait_until_exact(&ch, &gt, &env.topics().usage_topic, Duration::from_secs(240), || agg.check_alive()).await?;
    // The first run may have caught up before the kill, and then the totals are exact before
    // the second one is even assigned: wait for its claims (both runs log one per partition).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&log)?.matches("\"partition claimed\"").count() < 2 * PARTITIONS as usize {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the restarted aggregator claimed nothing within 60 s");
        agg.check_alive()?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agg.stop()?;
    // The restart read base + deltas: the log of the second run says how many per partition.
    let text = std::fs::read_to_string(&log)?;
    let applied: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("applied checkpoint deltas"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["fields"]["deltas"].as_u64())
        .collect();
    eprintln!("deltas applied per restored partition: {applied:?}");
    anyhow::ensure!(applied.iter().any(|&n| n > 0), "the restart applied no deltas: {applied:?}");
    Ok(())
}

/// Two instances in one group; the second joins mid-run (a rebalance) and the first leaves
/// later (another one): identical totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_across_rebalances() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::with_partitions("agg_rebalance", PARTITIONS).await?;
    let mut a = ServiceProc::new("meterflow-aggregator", aggregator_env(&env, "agg-rebalance"), log_path(&env, "aggregator-a"))?;
    let mut b = ServiceProc::new("meterflow-aggregator", aggregator_env(&env, "agg-rebalance"), log_path(&env, "aggregator-b"))?;
    a.start()?;
    let producing = {
        let (kafka, topic) = (env.kafka_args().clone(), env.topics().usage_topic.clone());
        let cfg = workload(EVENTS, 13)?;
        tokio::spawn(async move { produce(&kafka, &topic, cfg).await })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    b.start()?;
    eprintln!("second aggregator joined the group");
    tokio::time::sleep(Duration::from_secs(6)).await;
    a.stop()?;
    eprintln!("first aggregator left the group");
    let gt = producing.await??;
    let ch = env.clickhouse();
    wait_until_exact(&ch, &gt, &env.topics().usage_topic, Duration::from_secs(240), || b.check_alive()).await?;
    b.stop()?;
    Ok(())
}

/// ClickHouse stopped for 10 seconds mid-run: consumption pauses, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_after_clickhouse_outage() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::with_partitions("agg_chdown", PARTITIONS).await?;
    let mut agg = ServiceProc::new("meterflow-aggregator", aggregator_env(&env, "agg-chdown"), log_path(&env, "aggregator"))?;
    agg.start()?;
    let producing = {
        let (kafka, topic) = (env.kafka_args().clone(), env.topics().usage_topic.clone());
        let cfg = workload(EVENTS, 14)?;
        tokio::spawn(async move { produce(&kafka, &topic, cfg).await })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    meterflow_testkit::services("stop", "clickhouse")?;
    // Whatever happens below, the shared ClickHouse comes back for the tests after this one.
    struct Restart;
    impl Drop for Restart {
        fn drop(&mut self) {
            let _ = meterflow_testkit::services("start", "clickhouse");
        }
    }
    let _restart = Restart;
    eprintln!("ClickHouse stopped");
    tokio::time::sleep(Duration::from_secs(10)).await;
    agg.check_alive()?;
    meterflow_testkit::services("start", "clickhouse")?;
    eprintln!("ClickHouse started again");
    let gt = producing.await??;
    let ch = env.clickhouse();
    wait_until_exact(&ch, &gt, &env.topics().usage_topic, Duration::from_secs(240), || agg.check_alive()).await?;
    agg.terminate()?;
    Ok(())
}
