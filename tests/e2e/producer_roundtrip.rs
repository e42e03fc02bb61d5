//! The producer against the real local broker: what the generator's ground truth claims is
//! exactly what a consumer finds in the topic.
//!
//! The test re-derives everything from the consumed bytes with its own naive code (decode,
//! validate, dedup by (tenant, meter, event_id), sum per window) and compares with the ground truth:
//! totals per window, counters, and the position and reason of every malformed message. If
//! this passes, a pipeline test comparing ClickHouse with the ground truth is comparing with
//! what really went through Kafka.
//!
//! Needs the local services (`make up`); each test gets fresh topics from the testkit.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use meterflow_core::codec::{Framing, UsageEventCodec};
use meterflow_core::meter::{Aggregation, MeterCatalog};
use meterflow_core::{decimal, RejectReason, UsageEvent};
use meterflow_producer::{generate, usage_event, EventProducer, EventTimeMode, GenerateConfig, GroundTruth, Progress, WindowKey};
use meterflow_testkit::{Record, TestEnv};
use rust_decimal::Decimal;

const METERS: &str = include_str!("../../config/meters.toml");

/// Everything in a topic, sorted by (partition, offset).
async fn consume_all(env: &TestEnv, topic: &str) -> anyhow::Result<Vec<Record>> {
    env.consume_all(topic, Duration::from_secs(180)).await
}

/// What the test's own replay finds.
#[derive(Debug, Default)]
struct Replay {
    /// (tenant, meter, group_by dims, window_start) -> (value, event_count, provider_cost)
    windows: BTreeMap<WindowKey, (Decimal, u64, Decimal)>,
    rejected: BTreeMap<(i32, i64), RejectReason>,
    unique: u64,
    duplicates: u64,
}

/// Decodes and validates every message, in partition order, with naive rules written from the
/// schema and meter definitions (not the aggregator's code).
fn replay(records: &[Record], catalog: &MeterCatalog, codec: &UsageEventCodec, horizon_ms: i64) -> anyhow::Result<Replay> {
    let mut out = Replay::default();
    let mut seen: HashMap<(String, String, String), &[u8]> = HashMap::new();
    let mut partition_time: HashMap<i32, i64> = HashMap::new();
    let mut last: Option<(i32, i64)> = None;
    for (partition, offset, key, payload) in records {
        let (partition, offset) = (*partition, *offset);
        ensure!(last < Some((partition, offset)), "records must come in (partition, offset) order");
        last = Some((partition, offset));
        let reject = |out: &mut Replay, reason| {
            out.rejected.insert((partition, offset), reason);
        };
        let Ok(ev) = codec.decode(payload) else {
            reject(&mut out, RejectReason::Undecodable);
            continue;
        };
        if ev.tenant.is_empty() {
            reject(&mut out, RejectReason::MissingTenant);
            continue;
        }
        if ev.event_id.is_empty() {
            reject(&mut out, RejectReason::MissingEventId);
            continue;
        }
        let Some(def) = catalog.get(ev.meter) else {
            reject(&mut out, RejectReason::UnknownMeter);
            continue;
        };
        let Ok(quantity) = decimal::parse("quantity", ev.quantity) else {
            reject(&mut out, RejectReason::BadQuantity);
            continue;
        };
        if quantity.is_sign_negative() && !quantity.is_zero() && !def.allow_negative {
            reject(&mut out, RejectReason::NegativeQuantity);
            continue;
        }
        let cost = match ev.provider_cost.map(|c| decimal::parse("provider_cost", c)).transpose() {
            Ok(c) => c.unwrap_or(Decimal::ZERO),
            Err(_) => {
                reject(&mut out, RejectReason::BadProviderCost);
                continue;
            }
        };
        let pt = partition_time.entry(partition).or_insert(i64::MIN);
        if *pt != i64::MIN && ev.event_time_ms < *pt - horizon_ms {
            reject(&mut out, RejectReason::TooLate);
            continue;
        }
        *pt = (*pt).max(ev.event_time_ms);
        // The producer keys every event by its tenant.
        ensure!(key.as_deref() == Some(ev.tenant.as_bytes()), "message at {partition}/{offset} is not keyed by its tenant");
        if let Some(first) = seen.get(&(ev.tenant.to_owned(), ev.meter.to_owned(), ev.event_id.to_owned())) {
            ensure!(*first == payload.as_slice(), "duplicate of {}/{} at {partition}/{offset} is not byte-identical", ev.tenant, ev.event_id);
            out.duplicates += 1;
            continue;
        }
        seen.insert((ev.tenant.to_owned(), ev.meter.to_owned(), ev.event_id.to_owned()), payload);
        out.unique += 1;
        let dims: BTreeMap<String, String> = def
            .group_by
            .iter()
            .filter_map(|k| ev.dimension(k).map(|v| (k.clone(), v.to_owned())))
            .collect();
        let window_start = ev.event_time_ms.div_euclid(def.window_ms) * def.window_ms;
        let w = out
            .windows
            .entry((ev.tenant.to_owned(), ev.meter.to_owned(), dims, window_start))
            .or_insert((Decimal::ZERO, 0, Decimal::ZERO));
        match def.aggregation {
            Aggregation::Sum => w.0 += quantity,
            Aggregation::Count => w.0 += Decimal::ONE,
            other => bail!("this test only replays sum and count meters, not {}", other.as_str()),
        }
        w.1 += 1;
        w.2 += cost;
    }
    Ok(out)
}

fn compare(gt: &GroundTruth, replay: &Replay, records: usize) -> anyhow::Result<()> {
    let c = &gt.counters;
    ensure!(c.send_errors == 0, "send errors: {}", c.send_errors);
    ensure!(c.sent as usize == records, "ground truth says {} sent, the topic holds {records}", c.sent);
    ensure!(c.unique_accepted == replay.unique, "unique: truth {} vs topic {}", c.unique_accepted, replay.unique);
    ensure!(c.duplicates == replay.duplicates, "duplicates: truth {} vs topic {}", c.duplicates, replay.duplicates);
    ensure!(c.malformed as usize == replay.rejected.len(), "malformed: truth {} vs topic {}", c.malformed, replay.rejected.len());

    // Every malformed position has the expected reason, and nothing else was rejected.
    for m in &gt.malformed {
        let found = replay.rejected.get(&(m.partition, m.offset));
        ensure!(
            found.map(|r| r.as_str()) == Some(m.reason.as_str()),
            "{}/{} ({}): expected {}, replay found {:?}",
            m.partition,
            m.offset,
            m.kind,
            m.reason,
            found
        );
    }

    // Window totals, exactly.
    let truth = gt.window_map();
    ensure!(truth.len() == replay.windows.len(), "windows: truth {} vs topic {}", truth.len(), replay.windows.len());
    for (key, (value, count, cost)) in &replay.windows {
        let w = truth.get(key).with_context(|| format!("window {key:?} is in the topic but not in the ground truth"))?;
        ensure!(
            (w.value, w.event_count, w.provider_cost) == (value.normalize(), *count, cost.normalize()),
            "window {key:?}: truth ({}, {}, {}) vs topic ({value}, {count}, {cost})",
            w.value,
            w.event_count,
            w.provider_cost
        );
    }

    // Per tenant/meter totals add up to the windows (all meters here are sum or count).
    for t in &gt.totals {
        let (v, n, cost) = replay
            .windows
            .iter()
            .filter(|((tenant, meter, _, _), _)| *tenant == t.tenant && *meter == t.meter)
            .fold((Decimal::ZERO, 0, Decimal::ZERO), |acc, (_, w)| (acc.0 + w.0, acc.1 + w.1, acc.2 + w.2));
        ensure!(
            (t.value, t.event_count, t.provider_cost) == (v.normalize(), n, cost.normalize()),
            "totals of {}/{}",
            t.tenant,
            t.meter
        );
    }
    Ok(())
}

fn config(catalog: &MeterCatalog, events: u64, seed: u64) -> GenerateConfig {
    let mut cfg = GenerateConfig::new(catalog.clone());
    cfg.events = Some(events);
    cfg.seed = seed;
    cfg.duplicate_rate = 0.10;
    cfg.late_rate = 0.05;
    cfg.malformed_rate = 0.01;
    cfg.too_late_rate = 0.002;
    // Two hours of event time, ending about now: many windows in a few seconds.
    let start = meterflow_producer::time::now_ms() / 60_000 * 60_000 - 2 * 3_600_000;
    cfg.event_time = EventTimeMode::Simulated { start_ms: start, span_ms: 2 * 3_600_000 };
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_workload_round_trips_through_the_broker() -> anyhow::Result<()> {
    let env = TestEnv::new("producer_roundtrip").await?;
    let topic = env.topics().usage_topic.clone();
    let catalog = MeterCatalog::from_toml_str(METERS)?;
    let producer = EventProducer::new(env.kafka_args(), topic.clone())?;

    let gt = generate(config(&catalog, 100_000, 42), &producer, Progress::Hidden).await?;
    gt.check_consistency()?;
    let c = &gt.counters;
    assert_eq!(c.sent, 100_000);
    assert!(c.duplicates > 8_000 && c.late > 2_000 && c.malformed > 800, "{c:?}");
    for reason in [
        RejectReason::Undecodable,
        RejectReason::UnknownMeter,
        RejectReason::MissingTenant,
        RejectReason::MissingEventId,
        RejectReason::BadQuantity,
        RejectReason::NegativeQuantity,
        RejectReason::BadProviderCost,
        RejectReason::TooLate,
    ] {
        assert!(c.malformed_by_reason.get(reason.as_str()).copied().unwrap_or(0) > 0, "no {reason} in {c:?}");
    }
    // The JSON file round-trips.
    let path = std::env::temp_dir().join(format!("{topic}.truth.json"));
    gt.save(&path)?;
    assert_eq!(GroundTruth::load(&path)?, gt);
    std::fs::remove_file(&path)?;

    let records = consume_all(&env, &topic).await?;
    let replay = replay(&records, &catalog, &UsageEventCodec::new(), gt.run.dedup_horizon_ms)?;
    compare(&gt, &replay, records.len())?;
    env.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_truth_confluent_framing() -> anyhow::Result<()> {
    // Determinism: the same seed (simulated time, event count) gives the same totals and
    // counters; the Confluent framing decodes with the core codec too.
    let catalog = MeterCatalog::from_toml_str(METERS)?;
    let codec = UsageEventCodec::new().with_confluent_ids(11, 12);
    let mut truths = Vec::new();
    for run in 0..2 {
        let env = TestEnv::with_partitions(&format!("producer_seed_{run}"), 2).await?;
        let topic = env.topics().usage_topic.clone();
        let producer = EventProducer::new(env.kafka_args(), topic.clone())?
            .with_codec(codec.clone())
            .with_framing(Framing::Confluent { schema_id: 12 });
        let mut cfg = config(&catalog, 5_000, 7);
        cfg.event_time = EventTimeMode::Simulated { start_ms: 1_767_225_600_000, span_ms: 3_600_000 };
        cfg.too_late_rate = 0.0;
        let gt = generate(cfg, &producer, Progress::Hidden).await?;
        let records = consume_all(&env, &topic).await?;
        let replay = replay(&records, &catalog, &codec, gt.run.dedup_horizon_ms)?;
        compare(&gt, &replay, records.len())?;
        truths.push(gt);
        env.cleanup().await?;
    }
    assert_eq!(truths[0].windows, truths[1].windows);
    assert_eq!(truths[0].counters, truths[1].counters);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_send_raw_report_where_the_message_is() -> anyhow::Result<()> {
    let env = TestEnv::with_partitions("producer_send", 3).await?;
    let topic = env.topics().usage_topic.clone();
    let producer = EventProducer::new(env.kafka_args(), topic.clone())?;
    let mut sent: Vec<(meterflow_producer::Delivery, UsageEvent)> = Vec::new();
    for i in 0..20 {
        let ev = usage_event(format!("tenant-{}", i % 4), "input_tokens", Decimal::from(100 + i))
            .with_dimension("model", "gpt-4o")
            .with_provider_cost(Decimal::new(25 * i, 7));
        sent.push((producer.send(&ev).await?, ev));
    }
    let raw_at = producer.send_raw("tenant-0", b"not avro").await?;
    let records = consume_all(&env, &topic).await?;
    assert_eq!(records.len(), 21);
    let at = |d: meterflow_producer::Delivery| records.iter().find(|r| (r.0, r.1) == (d.partition, d.offset));
    let codec = UsageEventCodec::new();
    for (d, ev) in &sent {
        let (_, _, key, payload) = at(*d).context("delivered message not found at its reported position")?;
        assert_eq!(&codec.decode(payload)?.to_owned_event()?, ev);
        assert_eq!(key.as_deref(), Some(ev.tenant.as_bytes()));
    }
    assert_eq!(at(raw_at).context("raw message")?.3, b"not avro");
    env.cleanup().await
}
