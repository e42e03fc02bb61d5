//! Catalog and lateness changes after a crash, and forged ticks.

use super::*;

fn rater_env(env: &TestEnv, catalog: &std::path::Path) -> Vec<(String, String)> {
    let mut e = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
    for (k, v) in [
        ("METERFLOW_RATER_GROUP", "ops-rater"),
        ("METERFLOW_RATER_HTTP_ADDR", "127.0.0.1:0"),
        ("METERFLOW_CATALOG", &catalog.display().to_string()),
        // Only the claim on assignment: a crash replays everything rated so far.
        ("METERFLOW_CHECKPOINT_INTERVAL", "1h"),
    ] {
        e.push((k.to_owned(), v.to_owned()));
    }
    e
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct ChargeAmount {
    charge_id: String,
    kind: String,
    amount: i128,
}

async fn charges(env: &TestEnv) -> anyhow::Result<Vec<ChargeAmount>> {
    Ok(env
        .clickhouse()
        .query("SELECT charge_id, kind, amount FROM charges WHERE tenant = 'tenant-price'")
        .fetch_all()
        .await?)
}

/// 11.4: a price edited between a crash past the last checkpoint and the restart. The rater
/// re-derives what it had already charged with the checkpoint's catalog, switches, and only
/// later charges use the new price: no charge id ever has two contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn price_change_after_a_crash_never_rewrites_a_charge() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    init_test_logging();
    let env = TestEnv::with_partitions("ops_price", 1).await?;
    let old_text = std::fs::read_to_string(repo_root().join("config/catalog.toml"))?;
    let needle = "free_units = \"100000\"\nunit_price = \"0.000003\"";
    anyhow::ensure!(old_text.matches(needle).count() == 1, "the gpt-4o input price is unique in the catalog");
    let new_catalog = log_path(&env, "catalog-b.toml");
    std::fs::write(&new_catalog, old_text.replace(needle, "free_units = \"100000\"\nunit_price = \"0.000004\""))?;
    let old_catalog = repo_root().join("config/catalog.toml");

    let base = (now_ms() - 40 * 60_000).div_euclid(60_000) * 60_000;
    let window = |w: i64| -> Vec<UsageEvent> {
        (0..5)
            .map(|i| {
                UsageEvent::new(format!("p{w}-{i}"), "tenant-price", "input_tokens", Decimal::from(100_000), base + w * 60_000 + 1_000 + i)
                    .with_dimension("model", "gpt-4o")
                    .with_dimension("region", "eu")
            })
            .collect()
    };
    let (agg, agg_stop) = start_aggregator(&env, "ops-price-agg", &[])?;
    let first: Vec<UsageEvent> = (0..5).flat_map(window).collect();
    send_all(&env, &first).await?;
    let shutdown = CancellationToken::new();
    let cfg = parse_with_env::<meterflow_rater::Config>(&rater_env(&env, &old_catalog))?;
    let rater = tokio::spawn(meterflow_rater::run(cfg, shutdown.clone()));
    wait_for(|| { let env = env.clone(); async move { Ok(charges(&env).await?.len() == 5) } }, Duration::from_secs(90)).await?;
    let before: BTreeMap<String, i128> = charges(&env).await?.into_iter().map(|c| (c.charge_id, c.amount)).collect();
    let covered: i64 = env
        .clickhouse()
        .query("SELECT max(next_offset) FROM checkpoints WHERE service = 'rater'")
        .fetch_one()
        .await?;
    assert_eq!(covered, 0, "the fault: the newest rater checkpoint is the claim at offset 0, so the restart replays");
    rater.abort(); // crash: nothing more flushed or checkpointed
    let _ = rater.await;

    let shutdown = CancellationToken::new();
    let cfg = parse_with_env::<meterflow_rater::Config>(&rater_env(&env, &new_catalog))?;
    let rater = tokio::spawn(meterflow_rater::run(cfg, shutdown.clone()));
    let second: Vec<UsageEvent> = (5..10).flat_map(window).collect();
    send_all(&env, &second).await?;
    wait_for(
        || {
            let env = env.clone();
            async move {
                let ids: std::collections::BTreeSet<String> = charges(&env).await?.into_iter().map(|c| c.charge_id).collect();
                Ok(ids.len() == 10)
            }
        },
        Duration::from_secs(90),
    )
    .await?;
    shutdown.cancel();
    rater.await??;
    stop(agg, agg_stop).await?;

    let all = charges(&env).await?;
    let mut by_id: BTreeMap<String, i128> = BTreeMap::new();
    for c in &all {
        assert_eq!(c.kind, "usage");
        if let Some(prev) = by_id.insert(c.charge_id.clone(), c.amount) {
            assert_eq!(prev, c.amount, "charge {} has two contents", c.charge_id);
        }
    }
    for (id, amount) in &before {
        assert_eq!(by_id.get(id), Some(amount), "charge {id} written before the crash changed");
    }
    // Independent arithmetic: 100,000 free tokens a month, 500,000 tokens a window.
    let old_price = Decimal::new(3, 6);
    let new_price = Decimal::new(4, 6);
    let expected_total = Decimal::from(400_000) * old_price + Decimal::from(4 * 500_000) * old_price + Decimal::from(5 * 500_000) * new_price;
    let total: Decimal = by_id.values().map(|a| from_ch_i128(*a)).sum();
    assert_eq!(total, expected_total, "revenue under the rule: charged before the switch at the old price, after at the new");
    let newest: Vec<u8> = env
        .clickhouse()
        .query("SELECT state FROM checkpoints WHERE service = 'rater' ORDER BY version DESC LIMIT 1")
        .fetch_one::<ChkState>()
        .await?
        .state;
    let meta = meterflow_runtime::checkpoint::Envelope::decode(&newest)?.meta;
    assert!(meta.config_text.contains("0.000004"), "the switch was checkpointed with the new catalog");
    env.cleanup().await?;
    Ok(())
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct ChkState {
    #[serde(with = "serde_bytes")]
    state: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
struct AggContent {
    seq: i64,
    revision: u32,
    value: i128,
    event_count: i64,
    emitted_at_ms: i64,
}

async fn aggregate_contents(env: &TestEnv) -> anyhow::Result<Vec<AggContent>> {
    Ok(env
        .clickhouse()
        .query("SELECT seq, revision, value, event_count, emitted_at_ms FROM meter_aggregates ORDER BY seq")
        .fetch_all()
        .await?)
}

/// 11.4: allowed lateness 10 s -> 60 s between a crash past the last checkpoint and the
/// restart. Under 60 s the same records would put the late event into revision 0; the
/// aggregator replays what it had already emitted with the recorded meters, so every `seq`
/// keeps its content, and switches afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lateness_change_after_a_crash_never_rewrites_a_seq() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    init_test_logging();
    let env = TestEnv::with_partitions("ops_lateness", 1).await?;
    let meters_a = std::fs::read_to_string(repo_root().join("config/meters.toml"))?;
    let needle = "allowed_lateness = \"10s\"";
    anyhow::ensure!(meters_a.contains(needle), "input_tokens has 10 s lateness");
    let meters_b_path = log_path(&env, "meters-b.toml");
    std::fs::write(&meters_b_path, meters_a.replacen(needle, "allowed_lateness = \"60s\"", 1))?;
    let extra_a = [("METERFLOW_CHECKPOINT_INTERVAL", "1h")];
    let meters_b = meters_b_path.display().to_string();
    let extra_b = [("METERFLOW_CHECKPOINT_INTERVAL", "1h"), ("METERFLOW_METERS", meters_b.as_str())];

    let w = (now_ms() - 30 * 60_000).div_euclid(60_000) * 60_000;
    let mut sent: Vec<UsageEvent> = (0..10).map(|i| event(&format!("l{i}"), "tenant-l", 100, w + 1_000 + i)).collect();
    sent.push(event("closer", "tenant-l", 1, w + 60_000 + 20_000)); // closes W under 10 s, not under 60 s
    sent.push(event("late", "tenant-l", 100, w + 50_000)); // a restatement under 10 s, part of revision 0 under 60 s
    send_all(&env, &sent).await?;
    let (task, _stop) = start_aggregator(&env, "ops-lateness", &extra_a)?;
    wait_totals(&env, &expected(&sent), Duration::from_secs(60)).await?;
    wait_for(
        || {
            let env = env.clone();
            async move { Ok(totals(&env).await?.get(&("tenant-l".to_owned(), w)).is_some_and(|t| t.2 == 1)) }
        },
        Duration::from_secs(30),
    )
    .await?;
    let before = aggregate_contents(&env).await?;
    let covered: i64 = env
        .clickhouse()
        .query("SELECT max(next_offset) FROM checkpoint_positions WHERE service = 'aggregator'")
        .fetch_one()
        .await?;
    assert_eq!(covered, 0, "the fault: only the claim checkpoint exists, the restart replays every record");
    task.abort(); // crash
    let _ = task.await;

    let (task, stop_b) = start_aggregator(&env, "ops-lateness", &extra_b)?;
    let later: Vec<UsageEvent> = (0..5).map(|i| event(&format!("m{i}"), "tenant-l", 7, w + 5 * 60_000 + 1_000 + i)).collect();
    send_all(&env, &later).await?;
    sent.extend(later);
    wait_totals(&env, &expected(&sent), Duration::from_secs(60)).await?;
    stop(task, stop_b).await?;
    let after = aggregate_contents(&env).await?;
    for b in &before {
        let same_seq: Vec<&AggContent> = after.iter().filter(|a| a.seq == b.seq).collect();
        assert!(!same_seq.is_empty(), "seq {} disappeared", b.seq);
        for a in same_seq {
            assert_eq!(a, b, "seq {} was emitted again with other content", b.seq);
        }
    }
    let t = totals(&env).await?;
    assert_eq!(t[&("tenant-l".to_owned(), w)], (Decimal::from(1_100), 11, 1), "W keeps revision 0 + one restatement");
    #[derive(Debug, clickhouse::Row, Deserialize)]
    struct State {
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
    }
    let newest: State = env
        .clickhouse()
        .query("SELECT state FROM checkpoints WHERE service = 'aggregator' ORDER BY version DESC LIMIT 1")
        .fetch_one()
        .await?;
    let meta = meterflow_runtime::checkpoint::Envelope::decode(&newest.state)?.meta;
    assert!(meta.config_text.contains("allowed_lateness = \"60s\""), "the switch to the new meters was checkpointed");
    env.cleanup().await?;
    Ok(())
}

/// Issue 10, item 2: a producer writes a control record that looks like an idle tick, with a
/// time weeks ahead. Without the deployment's tag it is dead-lettered `unauthenticated`, and
/// the events after it are counted (before, every later event was `too_late`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tick_cannot_move_time() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    init_test_logging();
    let env = TestEnv::with_partitions("ops_forged_tick", 1).await?;
    let topic = env.topics().usage_topic.clone();
    let producer: FutureProducer = meterflow_runtime::kafka::producer_config(env.kafka_args())?.create()?;
    let far = (now_ms() + 40 * 86_400_000).to_be_bytes();
    let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
        key: meterflow_runtime::kafka::CONTROL_HEADER,
        value: Some(&b"tick"[..]),
    });
    let forged = producer
        .send(FutureRecord::<[u8], [u8]>::to(&topic).partition(0).payload(&far[..]).headers(headers), Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)?;
    let base = (now_ms() - 20 * 60_000).div_euclid(60_000) * 60_000;
    let sent: Vec<UsageEvent> = (0..20).map(|i| event(&format!("f{i}"), "tenant-f", 10, base + 1_000 + i)).collect();
    send_all(&env, &sent).await?;
    let (task, shutdown) = start_aggregator(&env, "ops-forged", &[])?;
    wait_totals(&env, &expected(&sent), Duration::from_secs(60)).await?;
    stop(task, shutdown).await?;
    let rows: Vec<(String, i64)> = env
        .clickhouse()
        .query("SELECT reason, source_offset FROM dead_letters")
        .fetch_all::<DeadRow>()
        .await?
        .into_iter()
        .map(|r| (r.reason, r.source_offset))
        .collect();
    assert_eq!(rows, vec![("unauthenticated".to_owned(), forged.offset)], "only the forged tick is dead-lettered");
    env.cleanup().await?;
    Ok(())
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct DeadRow {
    reason: String,
    source_offset: i64,
}
