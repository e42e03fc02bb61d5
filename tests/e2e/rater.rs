//! The rater against the real broker and ClickHouse: charges equal an independent
//! computation over the ground truth, survive SIGKILLs unchanged, wallets are exact, and
//! /metrics agrees with ClickHouse.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meterflow_core::decimal::from_ch_i128;
use meterflow_core::pricing::Catalog;
use meterflow_testkit::http::{free_port, get_ok, metric_sum};
use meterflow_testkit::procs::{parse_with_env, service_env, repo_root, ServiceProc};
use meterflow_e2e::scenario::{produce, wait_until_exact, workload};
use meterflow_e2e::verify;
use meterflow_producer::GroundTruth;
use meterflow_testkit::TestEnv;
use rand::Rng;
use rust_decimal::Decimal;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

static SERIAL: Mutex<()> = Mutex::const_new(());
const EVENTS: u64 = 60_000;
const PARTITIONS: i32 = 4;

fn catalog() -> anyhow::Result<Catalog> {
    Ok(Catalog::from_toml_str(&std::fs::read_to_string(repo_root().join("config/catalog.toml"))?)?)
}

fn env_with(env: &TestEnv, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
    e.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    e
}

fn aggregator_env(env: &TestEnv) -> Vec<(String, String)> {
    let meters_path = repo_root().join("config/meters.toml").display().to_string();
    env_with(env, &[
        ("METERFLOW_AGGREGATOR_GROUP", "agg"),
        ("METERFLOW_AGGREGATOR_HTTP_ADDR", "127.0.0.1:0"),
        ("METERFLOW_METERS", &meters_path),
        ("METERFLOW_IDLE_TIMEOUT", "1s"),
        ("METERFLOW_CHECKPOINT_INTERVAL", "2s"),
    ])
}

fn rater_env(env: &TestEnv, http: &str) -> Vec<(String, String)> {
    let catalog_path = repo_root().join("config/catalog.toml").display().to_string();
    env_with(env, &[
        ("METERFLOW_RATER_GROUP", "rater"),
        ("METERFLOW_RATER_HTTP_ADDR", http),
        ("METERFLOW_CATALOG", &catalog_path),
        ("METERFLOW_CHECKPOINT_INTERVAL", "2s"),
        ("METERFLOW_LOW_BALANCE", "USD=900"),
    ])
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct BalanceRow {
    tenant: String,
    balance: i128,
}

/// Wallet balances in ClickHouse equal credits minus the tenant's expected revenue.
async fn check_wallets(env: &TestEnv, gt: &GroundTruth, credits: &BTreeMap<String, Decimal>) -> anyhow::Result<()> {
    let money = verify::expected_money(gt, &catalog()?)?;
    let rows: Vec<BalanceRow> = env
        .clickhouse()
        .query("SELECT tenant, balance FROM wallet_balances WHERE currency = 'USD'")
        .fetch_all()
        .await?;
    let found: BTreeMap<String, Decimal> = rows.into_iter().map(|r| (r.tenant, from_ch_i128(r.balance))).collect();
    for (tenant, credit) in credits {
        let revenue = money.get(tenant).map_or(Decimal::ZERO, |m| m.0);
        let expected = (credit - revenue).normalize();
        let got = found.get(tenant).copied().unwrap_or_default().normalize();
        anyhow::ensure!(got == expected, "wallet of {tenant}: {got} in ClickHouse, expected {expected}");
    }
    Ok(())
}

async fn wait_for_charges(env: &TestEnv, gt: &GroundTruth, timeout: Duration, mut alive: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let catalog = catalog()?;
    let deadline = Instant::now() + timeout;
    loop {
        alive()?;
        let report = verify::charges(&env.clickhouse(), gt, &catalog).await?;
        if report.ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            report.into_result("charges")?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_wallets_and_metrics_match_ground_truth() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::with_partitions("rater_exact", PARTITIONS).await?;
    let credits = meterflow_e2e::scenario::publish_top_ups(env.kafka_args(), &env.topics().wallet_topic).await?;
    let gt = produce(env.kafka_args(), &env.topics().usage_topic, workload(EVENTS, 21)?).await?;

    let shutdown = CancellationToken::new();
    let agg = tokio::spawn(meterflow_aggregator::run(parse_with_env(&aggregator_env(&env))?, shutdown.clone()));
    let http = format!("127.0.0.1:{}", free_port()?);
    let rater = tokio::spawn(meterflow_rater::run(parse_with_env(&rater_env(&env, &http))?, shutdown.clone()));
    let ch = env.clickhouse();
    let alive = |a: &tokio::task::JoinHandle<anyhow::Result<()>>, r: &tokio::task::JoinHandle<anyhow::Result<()>>| {
        anyhow::ensure!(!a.is_finished() && !r.is_finished(), "a service stopped by itself");
        Ok(())
    };
    wait_until_exact(&ch, &gt, &env.topics().usage_topic, Duration::from_secs(180), || alive(&agg, &rater)).await?;
    wait_for_charges(&env, &gt, Duration::from_secs(120), || alive(&agg, &rater)).await?;
    check_wallets(&env, &gt, &credits).await?;

    // /metrics agrees with ClickHouse (gauges are exported after each flush).
    let revenue: i128 = ch.query("SELECT sum(amount) FROM charges_dedup").fetch_one().await?;
    let cost: i128 = ch.query("SELECT sum(provider_cost) FROM charges_dedup").fetch_one().await?;
    let margin: i128 = ch.query("SELECT sum(margin) FROM charges_dedup").fetch_one().await?;
    let (revenue, cost, margin) = (from_ch_i128(revenue), from_ch_i128(cost), from_ch_i128(margin));
    assert!(revenue > Decimal::ZERO, "the run must produce revenue");
    assert_eq!(revenue - cost, margin, "margin = revenue - cost, exactly");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = get_ok(&format!("http://{http}/metrics")).await?;
        let close = |got: f64, want: Decimal| {
            let want: f64 = want.to_string().parse().unwrap_or(f64::NAN);
            (got - want).abs() <= 1e-6 * want.abs().max(1.0)
        };
        let (r, c, m) = (
            metric_sum(&text, "meterflow_rater_revenue"),
            metric_sum(&text, "meterflow_rater_provider_cost"),
            metric_sum(&text, "meterflow_rater_margin"),
        );
        if close(r, revenue) && close(c, cost) && close(m, margin) {
            break;
        }
        assert!(Instant::now() < deadline, "metrics revenue {r} cost {c} margin {m}, ClickHouse {revenue} {cost} {margin}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    shutdown.cancel();
    agg.await??;
    rater.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_charges_after_three_rater_sigkills() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::with_partitions("rater_kill", PARTITIONS).await?;
    let credits = meterflow_e2e::scenario::publish_top_ups(env.kafka_args(), &env.topics().wallet_topic).await?;
    let log = repo_root().join("target/e2e-logs");
    std::fs::create_dir_all(&log)?;
    let mut agg = ServiceProc::new("meterflow-aggregator", aggregator_env(&env), log.join(format!("{}-aggregator.log", env.name())))?;
    let mut rater = ServiceProc::new("meterflow-rater", rater_env(&env, "127.0.0.1:0"), log.join(format!("{}-rater.log", env.name())))?;
    agg.start()?;
    rater.start()?;
    let producing = {
        let (kafka, topic) = (env.kafka_args().clone(), env.topics().usage_topic.clone());
        let cfg = workload(EVENTS, 22)?;
        tokio::spawn(async move { produce(&kafka, &topic, cfg).await })
    };
    let mut rng = rand::rng();
    for kill in 1..=3 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..4_000))).await;
        rater.check_alive()?;
        rater.kill9()?;
        eprintln!("SIGKILL #{kill} of the rater");
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1_000))).await;
        rater.start()?;
    }
    let gt = producing.await??;
    let ch = env.clickhouse();
    wait_until_exact(&ch, &gt, &env.topics().usage_topic, Duration::from_secs(180), || agg.check_alive()).await?;
    wait_for_charges(&env, &gt, Duration::from_secs(120), || rater.check_alive()).await?;
    check_wallets(&env, &gt, &credits).await?;
    assert_eq!(verify::charge_rows_consistent(&ch).await?, 0, "a replayed charge id must carry identical values");
    let usage_aggregates: u64 = ch.query("SELECT sum(last_revision + 1) FROM meter_totals").fetch_one().await?; // revisions 0..=last; survives merges
    let usage_charges: u64 = ch.query("SELECT count() FROM charges_dedup WHERE kind = 'usage'").fetch_one().await?;
    assert_eq!(usage_charges, usage_aggregates, "one usage charge per aggregate revision, none twice");
    rater.stop()?;
    agg.stop()?;
    Ok(())
}
