//! Records on the wrong partition, a partition count change, and a stalled instance fenced
//! by its successor.

use super::*;

/// 11.6: the partitioning contract. librdkafka's partitioner agrees with
/// `partition_for(tenant)`; a record of a tenant on another partition is dead-lettered as
/// `wrong_partition` (never deduplicated against the wrong state); a recreated topic with
/// another partition count stops the aggregator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_partition_and_partition_count_change() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    init_test_logging();
    let env = TestEnv::with_partitions("ops_partitions", 2).await?;
    let topic = env.topics().usage_topic.clone();
    let producer: FutureProducer = meterflow_runtime::kafka::producer_config(env.kafka_args())?.create()?;
    let codec = UsageEventCodec::new();
    let base = (now_ms() - 20 * 60_000).div_euclid(60_000) * 60_000;
    let mut accepted = Vec::new();
    let mut wrong = Vec::new();
    for i in 0..40 {
        let ev = event(&format!("k{i}"), &format!("tenant-{}", i % 10), 10 + i, base + 2_000);
        let mut bytes = Vec::new();
        codec.encode(&ev, Framing::SingleObject, &mut bytes);
        // Even events keyed by tenant (the contract), odd ones by event id (a foreign producer).
        let key = if i % 2 == 0 { ev.tenant.clone() } else { ev.event_id.clone() };
        let delivery = producer
            .send(FutureRecord::to(&topic).key(&key).payload(&bytes), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
        let (p, offset) = (delivery.partition, delivery.offset);
        let home = partition_for(ev.tenant.as_bytes(), 2);
        if i % 2 == 0 {
            assert_eq!(p, home, "librdkafka put tenant {} on {p}, partition_for says {home}", ev.tenant);
        }
        if p == home {
            accepted.push(ev);
        } else {
            wrong.push((p, offset));
        }
    }
    assert!(!wrong.is_empty(), "some records were produced to the wrong partition");
    let (task, shutdown) = start_aggregator(&env, "ops-partitions", &[])?;
    wait_totals(&env, &expected(&accepted), Duration::from_secs(60)).await?;
    let want = wrong.len() as u64;
    wait_for(
        || {
            let env = env.clone();
            async move {
                Ok(env.query_scalar::<u64>("SELECT count() FROM dead_letters WHERE reason = 'wrong_partition'").await? == want)
            }
        },
        Duration::from_secs(30),
    )
    .await?;
    for (p, o) in &wrong {
        let n: u64 = env
            .clickhouse()
            .query("SELECT count() FROM dead_letters WHERE reason = 'wrong_partition' AND source_partition = ? AND source_offset = ?")
            .bind(*p)
            .bind(*o)
            .fetch_one()
            .await?;
        assert_eq!(n, 1, "record {p}/{o} dead-lettered as wrong_partition");
    }
    stop(task, shutdown).await?;

    // The topic is recreated with 4 partitions: the aggregator must refuse, not skip or split.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        meterflow_runtime::kafka::base_config(env.kafka_args())?.create()?;
    let opts = rdkafka::admin::AdminOptions::new();
    admin.delete_topics(&[topic.as_str()], &opts).await?;
    wait_for(
        || {
            let kafka = env.kafka_args().clone();
            let topic = topic.clone();
            async move { Ok(!meterflow_admin::list_topics(&kafka).await?.contains_key(&topic)) }
        },
        Duration::from_secs(30),
    )
    .await?;
    admin
        .create_topics(&[rdkafka::admin::NewTopic::new(&topic, 4, rdkafka::admin::TopicReplication::Fixed(1))], &opts)
        .await?;
    wait_for(
        || {
            let kafka = env.kafka_args().clone();
            let topic = topic.clone();
            async move { Ok(meterflow_admin::list_topics(&kafka).await?.get(&topic) == Some(&4)) }
        },
        Duration::from_secs(30),
    )
    .await?;
    let (task, _shutdown) = start_aggregator(&env, "ops-partitions", &[])?;
    let err = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .map_err(|_| anyhow::anyhow!("the aggregator did not refuse within 60 s"))??
        .expect_err("a changed partition count must stop the aggregator");
    let msg = format!("{err:#}");
    eprintln!("refused as expected: {msg}");
    assert!(msg.contains("partition"), "{msg}");
    assert!(msg.contains("recreated") || msg.contains("partitions"), "{msg}");
    env.cleanup().await?;
    Ok(())
}

/// 11.2: a stalled instance (SIGSTOP) whose partitions moved to a new owner, during a network
/// partition between the new owner and ClickHouse, cannot land a checkpoint after the new
/// owner's: totals stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_instance_is_fenced() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::with_partitions("ops_fence", 2).await?;
    let proxy = TcpProxy::start(env.clickhouse_args().url.trim_start_matches("http://")).await?;
    let group = "ops-fence";
    let mut a = ServiceProc::new("meterflow-aggregator", aggregator_env(&env, group, &[]), log_path(&env, "aggregator-a"))?;
    // B gets the record key up front: without it, B would wait for ClickHouse before even
    // joining the group, and the cut below would test nothing.
    let record_key: String = env.query_scalar("SELECT key_hex FROM record_keys ORDER BY created_at, key_hex LIMIT 1").await?;
    let b_env = aggregator_env(&env, group, &[("METERFLOW_CLICKHOUSE_URL", &proxy.url()), ("METERFLOW_RECORD_KEY", &record_key)]);
    let mut b = ServiceProc::new("meterflow-aggregator", b_env, log_path(&env, "aggregator-b"))?;
    a.start()?;
    let producing = {
        let (kafka, topic) = (env.kafka_args().clone(), env.topics().usage_topic.clone());
        let cfg = workload(30_000, 21)?;
        tokio::spawn(async move { produce(&kafka, &topic, cfg).await })
    };
    // Per partition: the newest checkpoint's epoch and its number within the epoch (0 = the claim).
    let newest = |env: TestEnv| async move {
        #[derive(Debug, clickhouse::Row, Deserialize)]
        struct E {
            partition: i32,
            epoch: u64,
            n: u64,
        }
        let rows: Vec<E> = env
            .clickhouse()
            .query(
                "SELECT partition, intDiv(max(version), 4294967296) AS epoch, bitAnd(max(version), 4294967295) AS n \
                 FROM checkpoint_positions GROUP BY partition",
            )
            .fetch_all()
            .await?;
        anyhow::Ok(rows.into_iter().map(|r| (r.partition, (r.epoch, r.n))).collect::<BTreeMap<i32, (u64, u64)>>())
    };
    let epochs = move |env: TestEnv| async move {
        anyhow::Ok(newest(env).await?.into_iter().map(|(p, (e, _))| (p, e)).collect::<BTreeMap<i32, u64>>())
    };
    // A claimed both partitions and checkpointed past its claims: it is processing.
    let past_claims = move |env: TestEnv| async move { Ok(newest(env).await?.values().filter(|(_, n)| *n >= 1).count() == 2) };
    wait_for(|| past_claims(env.clone()), Duration::from_secs(60)).await?;
    let before = epochs(env.clone()).await?;
    assert!(a.signal(Signal::STOP)?, "SIGSTOP reached the first instance");
    eprintln!("aggregator A stopped; epochs {before:?}");
    proxy.cut();
    b.start()?;
    // After A's session times out B is assigned the partitions and tries to take them over,
    // through the cut proxy.
    let b_log = b.log_path().to_owned();
    wait_for(
        || {
            let (b_log, usage) = (b_log.clone(), env.topics().usage_topic.clone());
            async move {
                let log = std::fs::read_to_string(&b_log).unwrap_or_default();
                Ok(log.lines().any(|l| l.contains("partitions assigned") && l.contains(&usage)))
            }
        },
        Duration::from_secs(60),
    )
    .await?;
    let refused_at_assignment = proxy.refused();
    wait_for(|| std::future::ready(Ok(proxy.refused() > refused_at_assignment + 1)), Duration::from_secs(30)).await?;
    b.check_alive()?;
    assert_eq!(epochs(env.clone()).await?, before, "B cannot claim while cut off from ClickHouse");
    proxy.restore();
    assert!(proxy.refused() > 0, "the fault: B's ClickHouse connections were refused");
    wait_for(
        || {
            let (env, before) = (env.clone(), before.clone());
            async move { Ok(epochs(env).await?.iter().all(|(p, e)| *e > before[p])) }
        },
        Duration::from_secs(60),
    )
    .await?;
    eprintln!("B claimed every partition: {:?}", epochs(env.clone()).await?);
    // B checkpointed past its claims before A wakes up: A's next checkpoint would be stale.
    wait_for(
        || {
            let (env, before) = (env.clone(), before.clone());
            async move { Ok(newest(env).await?.iter().all(|(p, (e, n))| *e > before[p] && *n >= 1)) }
        },
        Duration::from_secs(60),
    )
    .await?;
    assert!(a.signal(Signal::CONT)?, "SIGCONT reached the first instance");
    let gt = producing.await??;
    let ch = env.clickhouse();
    wait_until_exact(&ch, &gt, &env.topics().usage_topic, Duration::from_secs(180), || {
        a.check_alive()?;
        b.check_alive()
    })
    .await?;
    a.terminate()?;
    b.terminate()?;
    let log = std::fs::read_to_string(a.log_path())?;
    assert!(
        log.contains("another instance claimed") || log.contains("partitions revoked"),
        "the stalled instance noticed it lost its partitions (see {})",
        a.log_path().display()
    );
    env.cleanup().await?;
    Ok(())
}
