//! Checkpoints an operator truncated, replays after OPTIMIZE FINAL, quiet partitions after a
//! restart.

use super::*;

/// 11.1: a truncated `checkpoints` table (the group has committed offsets, the outputs exist)
/// makes the aggregator refuse to start instead of "starting fresh"; an operator's `replay`
/// decision lets it continue with sequence numbers after the ones already emitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_checkpoints_refuse_until_an_operator_decides() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    init_test_logging();
    let env = TestEnv::with_partitions("ops_truncated", 2).await?;
    let base = (now_ms() - 30 * 60_000).div_euclid(60_000) * 60_000;
    let mut sent: Vec<UsageEvent> = (0..40)
        .map(|i| event(&format!("a{i}"), &format!("tenant-{}", i % 4), 1000 + i, base + (i % 3) * 60_000 + 5_000))
        .collect();
    send_all(&env, &sent).await?;
    let (task, shutdown) = start_aggregator(&env, "ops-truncated", &[])?;
    wait_totals(&env, &expected(&sent), Duration::from_secs(60)).await?;
    stop(task, shutdown).await?;
    let ch = env.clickhouse();
    let aggregates_before: u64 = ch.query("SELECT count() FROM meter_aggregates").fetch_one().await?;
    let max_seq_before = max_seq_by_partition(&env, "SELECT source_partition, max(seq) AS seq FROM meter_aggregates GROUP BY source_partition").await?;

    ch.query("TRUNCATE TABLE checkpoints").execute().await?;
    let left: u64 = ch.query("SELECT count() FROM checkpoints").fetch_one().await?;
    assert_eq!(left, 0, "the fault: checkpoints truncated");

    let (task, _shutdown) = start_aggregator(&env, "ops-truncated", &[])?;
    let err = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .map_err(|_| anyhow::anyhow!("the aggregator did not refuse within 60 s"))??
        .expect_err("a truncated checkpoints table must stop the aggregator");
    let msg = format!("{err:#}");
    eprintln!("refused as expected: {msg}");
    assert!(msg.contains("no checkpoint") && msg.contains("committed offset"), "{msg}");
    assert!(msg.contains("partition"), "the error names the partition: {msg}");
    let aggregates_after: u64 = ch.query("SELECT count() FROM meter_aggregates").fetch_one().await?;
    assert_eq!(aggregates_before, aggregates_after, "nothing was emitted while refusing");

    // The operator decides: fresh state from the end of each partition.
    let consumer: BaseConsumer = meterflow_runtime::kafka::base_config(env.kafka_args())?.create()?;
    for p in 0..2 {
        let (_, high) = consumer.fetch_watermarks(&env.topics().usage_topic, p, Duration::from_secs(10))?;
        let d = meterflow_admin::checkpoints::Decision {
            service: meterflow_admin::checkpoints::Service::Aggregator,
            group: "ops-truncated".into(),
            partition: p,
            offsets: [(env.topics().usage_topic.clone(), high)].into(),
            action: "replay",
            note: "test: checkpoints truncated".into(),
        };
        meterflow_admin::checkpoints::decide(env.clickhouse_args(), env.topics(), &d).await?;
    }
    let (task, shutdown) = start_aggregator(&env, "ops-truncated", &[])?;
    let later: Vec<UsageEvent> = (0..20)
        .map(|i| event(&format!("b{i}"), &format!("tenant-{}", i % 4), 7, base + 10 * 60_000 + 1_000))
        .collect();
    send_all(&env, &later).await?;
    sent.extend(later);
    wait_totals(&env, &expected(&sent), Duration::from_secs(60)).await?;
    assert!(!task.is_finished(), "the aggregator runs after the decision");
    stop(task, shutdown).await?;
    let sql = format!(
        "SELECT source_partition, min(seq) AS seq FROM meter_aggregates WHERE window_start_ms = {} GROUP BY source_partition",
        base + 10 * 60_000
    );
    let min_new = max_seq_by_partition(&env, &sql).await?;
    assert!(!min_new.is_empty(), "new windows were emitted");
    for (p, first) in &min_new {
        let before = max_seq_before.get(p).copied().unwrap_or(0);
        assert!(*first > before, "partition {p}: seq continues after {before} (got {first}); a restart at 1 would be skipped by the rater");
    }
    no_seq_with_two_contents(&env).await?;
    env.cleanup().await?;
    Ok(())
}

/// 11.3: rebuilding an evicted window after a crash does not depend on revisions that
/// ReplacingMergeTree may have folded: `OPTIMIZE ... FINAL` between the crash and the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_optimize_final_is_exact() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    init_test_logging();
    let env = TestEnv::with_partitions("ops_optimize", 1).await?;
    // No checkpoint after the claim: the crash replays everything, including the rebuild.
    let extra = [("METERFLOW_RETAIN_CLOSED", "1s"), ("METERFLOW_CHECKPOINT_INTERVAL", "1h")];
    let w = (now_ms() - 40 * 60_000).div_euclid(60_000) * 60_000;
    let mut sent: Vec<UsageEvent> = (0..50).map(|i| event(&format!("w{i}"), "tenant-1", 1000, w + 1_000 + i)).collect();
    // Closes W (end + 10 s lateness) and evicts it (retention 1 s).
    sent.push(event("next", "tenant-1", 5, w + 60_000 + 13_000));
    // A late event for the evicted W: rebuilt from usage_events, revision 1.
    sent.push(event("late-1", "tenant-1", 1000, w + 30_000));
    send_all(&env, &sent).await?;
    let (task, _shutdown) = start_aggregator(&env, "ops-optimize", &extra)?;
    wait_totals(&env, &expected(&sent), Duration::from_secs(60)).await?;
    let t = totals(&env).await?;
    assert_eq!(t[&("tenant-1".to_owned(), w)].2, 1, "W was restated once (revision 1)");
    let loaded: u64 = env
        .clickhouse()
        .query("SELECT count() FROM meter_aggregates WHERE window_start_ms = ?")
        .bind(w)
        .fetch_one()
        .await?;
    assert_eq!(loaded, 2, "revisions 0 and 1 of W before the merge");
    // Crash: no flush, no checkpoint.
    task.abort();
    let _ = task.await;

    env.clickhouse().query("OPTIMIZE TABLE meter_aggregates FINAL").execute().await?;
    let folded: u64 = env
        .clickhouse()
        .query("SELECT count() FROM meter_aggregates WHERE window_start_ms = ?")
        .bind(w)
        .fetch_one()
        .await?;
    assert_eq!(folded, 1, "the fault: the merge folded revision 0 away");

    let (task, shutdown) = start_aggregator(&env, "ops-optimize", &extra)?;
    let late2 = event("late-2", "tenant-1", 1000, w + 40_000);
    send_all(&env, std::slice::from_ref(&late2)).await?;
    sent.push(late2);
    wait_totals(&env, &expected(&sent), Duration::from_secs(90)).await?;
    stop(task, shutdown).await?;
    let t = totals(&env).await?;
    assert_eq!(t[&("tenant-1".to_owned(), w)], (Decimal::from(52_000), 52, 2), "W: 52 events, revision 2");
    let emissions = no_seq_with_two_contents(&env).await?;
    assert!(emissions >= 4, "emissions recorded: {emissions}");
    env.cleanup().await?;
    Ok(())
}

/// 11.5: after a graceful restart, a partition that receives nothing more still closes its
/// open windows at window end + lateness + at most ~2 s (the restarted instance restores every
/// assigned partition at once and ticks it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_partition_closes_after_restart() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    init_test_logging();
    let env = TestEnv::with_partitions("ops_quiet", 2).await?;
    // Events in the current minute, early enough that the restart happens before it closes.
    while now_ms().rem_euclid(60_000) > 30_000 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let w = now_ms().div_euclid(60_000) * 60_000;
    let close_at = w + 60_000 + 10_000;
    let sent: Vec<UsageEvent> = (0..50).map(|i| event(&format!("q{i}"), "tenant-7", 3, now_ms() - 100 + i)).collect();
    send_all(&env, &sent).await?;
    let (task, shutdown) = start_aggregator(&env, "ops-quiet", &[])?;
    wait_for(
        || {
            let env = env.clone();
            async move { Ok(env.query_scalar::<u64>("SELECT count() FROM usage_events").await? == 50) }
        },
        Duration::from_secs(30),
    )
    .await?;
    // A checkpoint covers them (the restart must not re-read them from the log).
    let (usage_topic, home) = (env.topics().usage_topic.clone(), partition_for(b"tenant-7", 2));
    wait_for(
        || {
            let (env, topic) = (env.clone(), usage_topic.clone());
            async move {
                let next: i64 = env
                    .clickhouse()
                    .query("SELECT max(next_offset) FROM checkpoint_positions WHERE topic = ? AND partition = ?")
                    .bind(&topic)
                    .bind(home)
                    .fetch_one()
                    .await?;
                Ok(next >= 50)
            }
        },
        Duration::from_secs(30),
    )
    .await?;
    stop(task, shutdown).await?;
    assert!(now_ms() < close_at - 5_000, "the restart happens before the window closes");
    let (task, shutdown) = start_aggregator(&env, "ops-quiet", &[])?;
    let mut appeared = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let n: u64 = env
            .clickhouse()
            .query("SELECT count() FROM meter_aggregates WHERE window_start_ms = ? AND revision = 0")
            .bind(w)
            .fetch_one()
            .await?;
        if n > 0 {
            appeared = Some(now_ms());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(task, shutdown).await?;
    let appeared = appeared.ok_or_else(|| anyhow::anyhow!("revision 0 never appeared after the restart"))?;
    let delay = appeared - close_at;
    eprintln!("window closed {delay} ms after end + lateness");
    assert!(delay <= 2_500, "revision 0 appeared {delay} ms after window end + lateness (goal <= 2 s)");
    env.cleanup().await?;
    Ok(())
}

/// The checkpoint tables as a restart reads them when a claim continued a chain across epochs
/// and the fenced owner wrote a delta and a base after that claim had loaded: the reader
/// follows the highest version to the older base (`load_base_of`, a subquery on ClickHouse)
/// and ignores the fenced owner's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_reads_follow_the_highest_version_across_epochs() -> anyhow::Result<()> {
    use meterflow_runtime::chain::{DeltaLink, StoredDelta};
    use meterflow_runtime::checkpoint::{version_in, Checkpoint, CheckpointKey, CheckpointStore};
    use meterflow_runtime::store::CheckpointStorage as _;

    let _serial = SERIAL.lock().await;
    let env = TestEnv::with_partitions("ops_chain_epochs", 1).await?;
    let store = CheckpointStore::new(env.clickhouse());
    let key = CheckpointKey { service: "aggregator".into(), consumer_group: "g".into(), topic: "t".into(), partition: 0 };
    let cp = |version: u64, state: &[u8]| Checkpoint { version, next_offset: version as i64 % 1000, state: state.to_vec() };
    let delta = |prev: u64, version: u64, state: &[u8]| {
        (key.clone(), StoredDelta { link: DeltaLink { base_version: version_in(1, 0), prev_version: prev }, checkpoint: cp(version, state) })
    };
    let (old, new) = (|n| version_in(1, n), |n| version_in(2, n));
    store.save_all(&[(key.clone(), cp(old(0), b"base"))]).await?;
    // Epoch 1's chain, the claim of epoch 2 after it and a delta of epoch 2; the fenced epoch-1
    // owner's delta and base, written after the claim had loaded.
    store
        .save_deltas(&[delta(old(0), old(1), b"d1"), delta(old(1), new(0), b"claim"), delta(new(0), new(1), b"d2"), delta(old(1), old(2), b"fork")])
        .await?;
    store.save_all(&[(key.clone(), cp(old(3), b"stale base"))]).await?;
    assert_eq!(store.load(&key).await?.map(|c| c.version), Some(old(3)), "the fault: the stale base is the newest base");

    assert_eq!(store.load_base_of(&key, new(1)).await?.map(|c| c.state), Some(b"base".to_vec()));
    assert_eq!(store.load_base_of(&key, old(3)).await?, None, "a base is no delta");
    let (base, deltas) = store.load_chain(&key).await?.expect("a chain");
    assert_eq!(base.version, old(0));
    let path: Vec<&[u8]> = deltas.iter().map(|d| d.checkpoint.state.as_slice()).collect();
    assert_eq!(path, [&b"d1"[..], b"claim", b"d2"], "the highest version's chain, without the fork");
    Ok(())
}
