//! Adversarial dedup against the real broker and ClickHouse (issue 10, item 4): retries that
//! the producer re-stamped with a new event time (59.9 s → 60.2 s of the next minute, and
//! 3 minutes later) are counted once, and one request id carrying `input_tokens` and
//! `output_tokens` counts both. The expected totals are computed here from the list of sent
//! events by a plain map keyed (tenant, meter, event id), first copy wins; not by the
//! aggregator's code.
//!
//! Each scenario runs twice: with the default in-memory budget, and with a budget of one id
//! per partition, so that every earlier copy has been evicted and only the cold tier (32-bit
//! fingerprints confirmed by a `usage_event_ids` query in ClickHouse) can recognise the retry;
//! that run asserts from the aggregator's checkpointed state that the cold look-ups happened.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meterflow_core::decimal::from_ch_i128;
use meterflow_core::engine::{EngineConfig, PartitionEngine};
use meterflow_core::UsageEvent;
use meterflow_testkit::procs::{parse_with_env, service_env};
use meterflow_e2e::scenario::{meters, now_ms};
use meterflow_producer::EventProducer;
use meterflow_runtime::checkpoint::{CheckpointKey, CheckpointStore};
use meterflow_runtime::store::CheckpointStorage as _;
use meterflow_testkit::TestEnv;
use rust_decimal::Decimal;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

static SERIAL: Mutex<()> = Mutex::const_new(());
const PARTITIONS: i32 = 2;
const MINUTE: i64 = 60_000;

/// The events, in send order (each tenant's events go to one partition, in this order).
fn events() -> Vec<UsageEvent> {
    // A minute boundary 40 minutes ago: old enough for idle ticks at wall-clock time to close
    // every window, recent enough for any horizon.
    let m = (now_ms() - 40 * MINUTE).div_euclid(MINUTE) * MINUTE;
    let req = |id: &str, tenant: &str, t: i64| {
        UsageEvent::new(id, tenant, "requests", Decimal::ONE, t).with_dimension("model", "gpt-large")
    };
    let tokens = |id: &str, tenant: &str, meter: &str, q: i64, t: i64| {
        UsageEvent::new(id, tenant, meter, Decimal::from(q), t)
            .with_dimension("model", "gpt-large")
            .with_dimension("region", "eu-west-1")
    };
    let mut v = vec![
        // Re-stamped across a minute boundary: hh:mm:59.9 then hh:(mm+1):00.2.
        req("req-a", "acme", m + 59_900),
        req("req-a", "acme", m + MINUTE + 200),
        // Re-stamped 3 minutes later.
        req("req-b", "acme", m + 10_000),
        req("req-b", "acme", m + 10_000 + 3 * MINUTE),
        // One request id, two meters: both count; their re-stamped retries do not.
        tokens("req-c", "acme", "input_tokens", 1_000, m + 20_000),
        tokens("req-c", "acme", "output_tokens", 250, m + 20_000),
        tokens("req-c", "acme", "input_tokens", 1_000, m + 80_000),
        tokens("req-c", "acme", "output_tokens", 250, m + 20_000 + 3 * MINUTE),
        // The same ids under another tenant are other events.
        req("req-a", "globex", m + 59_900),
        tokens("req-c", "globex", "input_tokens", 7, m + 59_950),
        tokens("req-c", "globex", "output_tokens", 3, m + MINUTE + 100),
        tokens("req-c", "globex", "output_tokens", 3, m + MINUTE + 100), // exact retry
    ];
    // Background traffic with re-stamped retries of its own (up to 5 minutes later).
    for i in 0..60i64 {
        let tenant = if i % 3 == 0 { "globex" } else { "acme" };
        let t = m + 5 * MINUTE + i * 1_700;
        let meter = ["input_tokens", "output_tokens"][(i % 2) as usize];
        v.push(tokens(&format!("bg-{i}"), tenant, meter, 10 + i, t));
        if i % 4 == 0 {
            v.push(tokens(&format!("bg-{i}"), tenant, meter, 10 + i, t + 1_000 + (i % 5) * MINUTE));
        }
    }
    v
}

/// Totals per (tenant, meter) and the number of distinct events, first copy wins.
fn expected(evs: &[UsageEvent]) -> (BTreeMap<(String, String), Decimal>, u64, u64) {
    let mut first: HashMap<(&str, &str, &str), Decimal> = HashMap::new();
    let mut dups = 0;
    for e in evs {
        if first.contains_key(&(e.tenant.as_str(), e.meter.as_str(), e.event_id.as_str())) {
            dups += 1;
        } else {
            first.insert((&e.tenant, &e.meter, &e.event_id), e.quantity);
        }
    }
    let mut totals = BTreeMap::new();
    for ((t, m, _), q) in &first {
        *totals.entry(((*t).to_owned(), (*m).to_owned())).or_insert(Decimal::ZERO) += *q;
    }
    (totals, first.len() as u64, dups)
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct TotalRow {
    tenant: String,
    meter: String,
    value: i128,
}

async fn totals(ch: &clickhouse::Client) -> anyhow::Result<BTreeMap<(String, String), Decimal>> {
    // Summed here, not in ClickHouse: 18.16 must not aggregate by a Decimal key, and one row
    // per window is few.
    let rows: Vec<TotalRow> = ch.query("SELECT tenant, meter, value FROM meter_totals").fetch_all().await?;
    let mut out = BTreeMap::new();
    for r in rows {
        *out.entry((r.tenant, r.meter)).or_insert(Decimal::ZERO) += from_ch_i128(r.value);
    }
    Ok(out)
}

fn aggregator_env(env: &TestEnv, group: &str, hot_max_ids: &str) -> Vec<(String, String)> {
    let mut e = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
    let meters_path = meterflow_testkit::procs::repo_root().join("config/meters.toml").display().to_string();
    for (k, v) in [
        ("METERFLOW_AGGREGATOR_GROUP", group),
        ("METERFLOW_AGGREGATOR_HTTP_ADDR", "127.0.0.1:0"),
        ("METERFLOW_METERS", &meters_path),
        ("METERFLOW_IDLE_TIMEOUT", "1s"),
        ("METERFLOW_CHECKPOINT_INTERVAL", "1s"),
        ("METERFLOW_FLUSH_INTERVAL", "200ms"),
        ("METERFLOW_DEDUP_HOT_MAX_IDS", hot_max_ids),
    ] {
        e.push((k.to_owned(), v.to_owned()));
    }
    e
}

/// Sends every event (awaiting each delivery, so a retry is always behind its original),
/// runs the aggregator in-process until the totals settle, and checks them.
async fn run(name: &str, hot_max_ids: usize) -> anyhow::Result<()> {
    let env = TestEnv::with_partitions(name, PARTITIONS).await?;
    let evs = events();
    let (want, distinct, dups) = expected(&evs);
    assert!(dups >= 20, "the scenario must contain re-stamped retries ({dups})");
    let producer = EventProducer::new(env.kafka_args(), env.topics().usage_topic.clone())?;
    for e in &evs {
        producer.send(e).await.map_err(|e| anyhow::anyhow!("send: {e}"))?;
    }

    let group = format!("{name}-agg");
    let config = parse_with_env::<meterflow_aggregator::Config>(&aggregator_env(&env, &group, &hot_max_ids.to_string()))?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(meterflow_aggregator::run(config, shutdown.clone()));
    let ch = env.clickhouse();
    let deadline = Instant::now() + Duration::from_secs(120);
    let outcome = loop {
        if task.is_finished() {
            break Err(anyhow::anyhow!("aggregator stopped by itself"));
        }
        let got = totals(&ch).await?;
        let raw: u64 = ch.query("SELECT count() FROM usage_events_dedup").fetch_one().await?;
        if got == want && raw == distinct {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "totals did not settle: got {got:?} ({raw} raw events), want {want:?} ({distinct} distinct events)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // A second before stopping: a late double count would show as a restatement meanwhile.
    tokio::time::sleep(Duration::from_secs(2)).await;
    shutdown.cancel();
    task.await??;
    outcome?;
    assert_eq!(totals(&ch).await?, want, "totals after the aggregator stopped");
    let raw: u64 = ch.query("SELECT count() FROM usage_events_dedup").fetch_one().await?;
    assert_eq!(raw, distinct);
    let ids: u64 = ch.query("SELECT uniqExact(tenant, meter, event_id) FROM usage_event_ids").fetch_one().await?;
    assert_eq!(ids, distinct, "the cold tier's index holds every accepted id");

    // What the engines did, from their last checkpoints (base and deltas).
    let store = CheckpointStore::new(ch.clone());
    let cfg = EngineConfig { hot_max_ids, ..EngineConfig::default() };
    let catalog = Arc::new(meters()?);
    let (mut duplicates, mut cold_lookups, mut evicted, mut cold_ids) = (0, 0, 0, 0);
    for partition in 0..PARTITIONS {
        let key = CheckpointKey {
            service: "aggregator".into(),
            consumer_group: group.clone(),
            topic: env.topics().usage_topic.clone(),
            partition,
        };
        let Some((cp, deltas)) = store.load_chain(&key).await? else { continue };
        let state = meterflow_runtime::checkpoint::Envelope::decode(&cp.state)?.state;
        let mut e = PartitionEngine::restore(&state, catalog.clone(), cfg.clone())?;
        for d in deltas {
            e.apply_delta(&meterflow_runtime::checkpoint::Envelope::decode(&d.checkpoint.state)?.state)?;
        }
        duplicates += e.stats().duplicates;
        cold_lookups += e.dedup().stats().cold_lookups;
        evicted += e.dedup().stats().evicted_ids;
        cold_ids += e.dedup().cold_ids() as u64;
        if hot_max_ids == 1 {
            assert!(e.dedup().hot_ids() <= 1);
        }
    }
    assert_eq!(duplicates, dups, "every retry counted as a duplicate, nothing else");
    if hot_max_ids == 1 {
        // With one id of memory nearly every id is cold (evicted, or accepted straight into
        // an evicted hour) and nearly every retry was recognised by ClickHouse.
        assert!(evicted > 0, "nothing was evicted");
        assert!(cold_ids + PARTITIONS as u64 >= distinct, "{cold_ids} cold fingerprints of {distinct} ids");
        assert!(2 * cold_lookups >= dups, "{cold_lookups} cold look-ups for {dups} retries");
    } else {
        assert_eq!((cold_lookups, evicted, cold_ids), (0, 0, 0));
    }
    eprintln!(
        "{name}: {distinct} distinct events, {dups} duplicates, {cold_lookups} cold look-ups, {evicted} ids evicted, {cold_ids} cold fingerprints"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restamped_retries_and_shared_request_ids_in_memory() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    meterflow_e2e::scenario::init_test_logging();
    run("adv_dedup_hot", 20_000_000).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restamped_retries_and_shared_request_ids_from_the_cold_tier() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    meterflow_e2e::scenario::init_test_logging();
    run("adv_dedup_cold", 1).await
}

/// The aggregator's cold store on ClickHouse 18.16 (no broker needed): the look-up by
/// (tenant, meter, event id) through `usage_event_ids` (filled by migration 014's view)
/// answers "as of" the offset, from the horizon floor on, and consults unwritten rows (the
/// buffer and the batch being written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_store_answers_from_usage_event_ids_as_of_the_offset() -> anyhow::Result<()> {
    use meterflow_aggregator::cold::ChStores;
    use meterflow_aggregator::sink::Outputs;
    use meterflow_aggregator::usage_rows::{UsageRows, COLUMNS};
    use meterflow_core::dedup::{ColdQuery, ColdStore, SourcePos};
    use meterflow_core::engine::Accepted;
    use meterflow_core::event::UsageEventRef;

    let args = meterflow_testkit::clickhouse_args_from_env(&format!("t_adv_cold_store_{:08x}", rand::random::<u32>()));
    meterflow_admin::migrate(&args, None).await?;
    let client = meterflow_runtime::clickhouse::client(&args);
    let t0 = 1_767_225_600_000i64;
    let accepted = |t: i64| Accepted { quantity: rust_decimal::Decimal::ONE, provider_cost: None, window_start: t / 60_000 * 60_000 };
    let event = |meter: &'static str, id: &'static str, t: i64| UsageEventRef {
        event_id: id,
        tenant: "acme",
        meter,
        quantity: "1",
        event_time_ms: t,
        dimensions: vec![("model", "m-1")],
        provider_cost: None,
        source: "",
    };
    // Stored through the aggregator's own RowBinary encoding: ClickHouse 18.16 parses it.
    let mut stored = UsageRows::default();
    stored.push(&accepted(t0 + 59_900), &event("requests", "req-a", t0 + 59_900), 0, 10)?;
    stored.push(&accepted(t0), &event("input_tokens", "req-c", t0), 0, 11)?;
    let (first, second) = stored.halves();
    let backoff = meterflow_runtime::retry::Backoff::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let m = meterflow_aggregator::metrics::RUNTIME.write();
    for half in [first, second] {
        assert!(meterflow_runtime::output::insert_row_binary(&client, "usage_events", COLUMNS, half, &backoff, &stop, m).await);
    }
    let back: Vec<(String, String, i64, u32, String)> = client
        .query("SELECT meter, event_id, source_offset, toUInt32(window_start), dim_values[1] FROM usage_events ORDER BY source_offset")
        .fetch_all()
        .await?;
    let minute = |t: i64| (t / 60_000 * 60) as u32;
    assert_eq!(
        back,
        vec![
            ("requests".into(), "req-a".into(), 10, minute(t0 + 59_900), "m-1".into()),
            ("input_tokens".into(), "req-c".into(), 11, minute(t0), "m-1".into()),
        ],
        "rows read back as encoded"
    );
    let mut pending = Outputs::default();
    pending.usage.push(&accepted(t0 + 5_000), &event("output_tokens", "req-c", t0 + 5_000), 0, 12)?;
    // The batch being written: neither in the buffer nor (yet) in ClickHouse.
    let mut writing = Outputs::default();
    writing.usage.push(&accepted(t0 + 6_000), &event("output_tokens", "req-d", t0 + 6_000), 0, 14)?;
    let handle = tokio::runtime::Handle::current();
    let mut stores = ChStores { client: &client, handle: &handle, pending: &pending, writing: Some(&writing) };
    let mut ask = |meter: &str, id: &str, from_ms: i64, offset: i64| {
        let q = ColdQuery {
            tenant: "acme",
            meter,
            event_id: id,
            id_hash: 0,
            from_ms,
            before: SourcePos { partition: 0, offset, next_seq: 1 },
        };
        stores.contains(&q)
    };
    assert!(ask("requests", "req-a", t0, 11)?, "stored before the offset");
    assert!(!ask("requests", "req-a", t0, 10)?, "not as of its own offset (replay)");
    assert!(!ask("requests", "req-a", t0 + 60_000, 11)?, "older than the horizon floor");
    assert!(!ask("output_tokens", "req-a", t0, 11)?, "another meter is another id");
    assert!(ask("input_tokens", "req-c", t0, 100)?);
    assert!(ask("output_tokens", "req-c", t0, 13)?, "buffered, not yet flushed");
    assert!(!ask("output_tokens", "req-c", t0, 12)?);
    assert!(ask("output_tokens", "req-d", t0, 15)?, "in the batch being written");
    assert!(!ask("output_tokens", "req-d", t0, 14)?, "not as of its own offset");
    let ids: u64 = client.query("SELECT count() FROM usage_event_ids").fetch_one().await?;
    assert_eq!(ids, 2, "the materialized view copied the inserted rows");
    client.query(&format!("DROP DATABASE {}", args.database)).execute().await?;
    Ok(())
}
