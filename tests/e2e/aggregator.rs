//! The aggregator against the real broker and ClickHouse: exact totals with duplicates, late
//! and malformed input, under SIGKILL, rebalancing and a ClickHouse outage.
//!
//! Scenarios run one at a time (a ClickHouse outage would disturb the others) and each gets
//! its own topics, consumer group and database.

use std::time::Duration;

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
