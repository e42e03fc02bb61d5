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
                    .query("SELECT max(next_offset) FROM checkpoints WHERE topic = ? AND partition = ?")
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
                 FROM checkpoints GROUP BY partition",
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
        .query("SELECT max(next_offset) FROM checkpoints WHERE service = 'aggregator'")
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
