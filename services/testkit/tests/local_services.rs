//! The testkit and meterflow-admin against the local services (`make up`).

use std::time::Duration;

use meterflow_testkit::{consume_all, wait_for, Partitions, TestEnv};
use rdkafka::producer::{FutureProducer, FutureRecord};

#[tokio::test]
async fn fresh_env_has_migrated_database_and_topics() -> anyhow::Result<()> {
    let env = TestEnv::with_partitions(
        "testkit-env",
        Partitions { data: 3, dead_letters: Some(1), alerts: Some(2) },
    )
    .await?;
    assert!(env.database().starts_with("t_testkit_env_"), "{}", env.database());
    assert!(env.topic_prefix().starts_with("t.testkit_env."), "{}", env.topic_prefix());

    // Every migration is recorded, and applying again is a no-op.
    let applied: u64 = env.query_scalar("SELECT count() FROM schema_migrations").await?;
    let files = meterflow_admin::MigrationSource::resolve(None).load()?;
    assert_eq!(applied, files.len() as u64);
    assert_eq!(meterflow_admin::migrate(env.clickhouse_args(), None).await?, 0);
    // migrate generated one random record key, and running it again kept that one.
    let keys: u64 = env.query_scalar("SELECT count() FROM record_keys WHERE length(key_hex) = 64").await?;
    assert_eq!(keys, 1);
    for table in ["usage_events", "meter_aggregates", "dead_letters", "checkpoints", "charges", "wallet_adjustments", "wallet_alerts"] {
        let n: u64 = env
            .query_scalar(&format!(
                "SELECT count() FROM system.tables WHERE database = '{}' AND name = '{table}'",
                env.database()
            ))
            .await?;
        assert_eq!(n, 1, "table {table}");
    }
    // The views answer on this server.
    for view in ["usage_events_dedup", "meter_totals", "charges_dedup", "revenue_daily", "wallet_balances"] {
        let n: u64 = env.query_scalar(&format!("SELECT count() FROM {view}")).await?;
        assert_eq!(n, 0, "view {view}");
    }

    // Topics with the asked-for partitions; creating them again is harmless.
    let topics = meterflow_admin::list_topics(env.kafka_args()).await?;
    let t = env.topics();
    assert_eq!(topics[&t.usage_topic], 3);
    assert_eq!(topics[&t.aggregates_topic], 3);
    assert_eq!(topics[&t.wallet_topic], 3);
    assert_eq!(topics[&t.charges_topic], 3);
    assert_eq!(topics[&t.dead_letter_topic], 1);
    assert_eq!(topics[&t.alerts_topic], 2);
    assert_eq!((topics[&t.provisional_topic], topics[&t.balances_topic]), (3, 3));
    let again = meterflow_admin::create_topics(env.kafka_args(), t, 5).await?;
    assert!(again.iter().all(|r| !r.created && r.requested == 5));

    env.cleanup().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_all_reads_every_message_and_wait_for_waits() -> anyhow::Result<()> {
    let env = TestEnv::with_partitions("testkit-consume", 4).await?;
    let topic = env.topics().usage_topic.clone();

    // Empty topic: nothing, at once.
    assert!(env.consume_all(&topic, Duration::from_secs(10)).await?.is_empty());

    let producer: FutureProducer = meterflow_runtime::kafka::producer_config(env.kafka_args())?.create()?;
    let n = 200;
    for i in 0..n {
        let key = format!("k{}", i % 7);
        let payload = format!("m{i}");
        producer
            .send(FutureRecord::to(&topic).key(&key).payload(&payload), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
    }
    let got = consume_all(env.kafka_args(), &topic, Duration::from_secs(30)).await?;
    assert_eq!(got.len(), n);
    let mut payloads: Vec<String> = got.iter().map(|r| String::from_utf8_lossy(&r.3).into_owned()).collect();
    payloads.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    want.sort();
    assert_eq!(payloads, want);
    // Sorted by (partition, offset), and a key's messages stay in one partition.
    assert!(got.windows(2).all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1)));
    for k in 0..7 {
        let key = format!("k{k}").into_bytes();
        let parts: std::collections::BTreeSet<i32> =
            got.iter().filter(|r| r.2.as_deref() == Some(&key[..])).map(|r| r.0).collect();
        assert_eq!(parts.len(), 1, "key k{k} in partitions {parts:?}");
    }

    // wait_for: succeeds once the condition holds, times out with a message otherwise.
    let start = std::time::Instant::now();
    wait_for(|| async { Ok(start.elapsed() > Duration::from_millis(600)) }, Duration::from_secs(5)).await?;
    let err = wait_for(|| async { Ok(false) }, Duration::from_millis(300)).await.unwrap_err();
    assert!(err.to_string().contains("not met"), "{err}");
    let err = wait_for(|| async { anyhow::bail!("boom") }, Duration::from_millis(300)).await.unwrap_err();
    assert!(format!("{err:#}").contains("boom"), "{err:#}");

    env.cleanup().await?;
    Ok(())
}

#[tokio::test]
async fn clear_error_when_services_are_unreachable() {
    // A port nothing listens on (the env vars are per process: use the library directly).
    let ch = meterflow_testkit::clickhouse_args_from_env("x");
    let ch = meterflow_runtime::args::ClickHouseArgs { url: "http://127.0.0.1:1".into(), ..ch };
    let err = meterflow_testkit::check_clickhouse(&ch).await.unwrap_err().to_string();
    assert!(err.contains("make up"), "{err}");
    let kafka = meterflow_runtime::args::KafkaArgs { brokers: "127.0.0.1:1".into(), properties: vec![] };
    let err = meterflow_testkit::check_kafka(&kafka).await.unwrap_err().to_string();
    assert!(err.contains("make up"), "{err}");
}
