//! Hostile and odd input against the real broker and ClickHouse, with the aggregator
//! in-process (issue 10, items 1, 3 and 6):
//!
//! * every event is encoded by **fastavro** (PyPI; the venv of `deploy/local/pyenv.sh`), framed
//!   as Avro single-object encoding with fastavro's own CRC-64-AVRO fingerprint: all accepted,
//!   window totals equal an independent reference (a plain sum in this file);
//! * quantities of 1e20 and 4e23 are stored exactly in `usage_events` and `meter_aggregates`,
//!   and a meter's `max_quantity` dead-letters a quantity above it as `quantity_out_of_range`;
//! * one tenant floods a partition with a new `model` value per event: beyond
//!   `--max-open-windows-per-tenant` its events are dead-lettered as `window_limit`, the
//!   partition holds exactly the windows of the accepted events (the gauge says so), and the
//!   other tenants' events, interleaved with the flood, are all counted.
//!
//! Fails (never skips) without `make up` or without the fastavro venv.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions: a failed unwrap is a failed run
#![allow(clippy::expect_used, reason = "an integration test: its helpers' expects are the test's assertions")]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use meterflow_core::decimal::to_ch_i128;
use meterflow_core::records::dimensions_key;
use meterflow_testkit::procs::{parse_with_env, service_env, repo_root};
use meterflow_testkit::TestEnv;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const PER_TENANT: usize = 50;
const MAX_WINDOWS: usize = 10_000;
const FLOOD: usize = 1_500;

const METERS: &str = r#"
[[meter]]
name = "input_tokens"
aggregation = "sum"
group_by = ["model", "region"]
window = "minute"
allowed_lateness = "10s"

[[meter]]
name = "capped_tokens"
aggregation = "sum"
group_by = ["model"]
window = "minute"
allowed_lateness = "10s"
max_quantity = 1000000000000
"#;

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("METERFLOW_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("METERFLOW_CACHE").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").expect("HOME is set")).join(".cache/meterflow")
    });
    let py = cache.join("py-venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run deploy/local/pyenv.sh (make test does) to install fastavro for the Avro interop tests",
        py.display()
    );
    py
}

/// fastavro's single-object encoding of each JSON record (usage_event.v2.avsc).
fn fastavro_encode(records: &[serde_json::Value]) -> anyhow::Result<Vec<Vec<u8>>> {
    let root = repo_root();
    let mut child = Command::new(python())
        .arg(root.join("tests/python/fastavro_codec.py"))
        .arg("encode")
        .arg(root.join("schemas/avro/usage_event.v2.avsc"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Feed stdin from another thread: python writes while it reads, and a full stdout pipe
    // would otherwise block both sides.
    let input: String = records.iter().map(|r| format!("{r}\n")).collect();
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    writer.join().expect("stdin writer")?;
    anyhow::ensure!(out.status.success(), "fastavro encode failed: {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Vec<u8>> = String::from_utf8(out.stdout)?
        .lines()
        .map(|l| (0..l.len()).step_by(2).map(|i| u8::from_str_radix(&l[i..i + 2], 16).expect("hex")).collect())
        .collect();
    anyhow::ensure!(lines.len() == records.len(), "fastavro returned {} of {} records", lines.len(), records.len());
    Ok(lines)
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// (tenant, meter, dimensions_key) → (sum, events): all events fall in one minute.
type Totals = BTreeMap<(String, String, String), (Decimal, u64)>;

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct TotalRow {
    tenant: String,
    meter: String,
    dimensions_key: String,
    value: i128,
    event_count: i64,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct RawRow {
    event_id: String,
    quantity: i128,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct DeadRow {
    reason: String,
    detail: String,
    tenant: String,
}

fn gauge(rendered: &str, name: &str) -> Option<f64> {
    rendered
        .lines()
        .find(|l| l.starts_with(name) && l.contains("partition=\"0\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastavro_events_big_quantities_and_a_window_flood() -> anyhow::Result<()> {
    meterflow_e2e::scenario::init_test_logging();
    let env = TestEnv::with_partitions("adversarial", 1).await?;
    let minute = (meterflow_e2e::scenario::now_ms() - 10 * 60_000).div_euclid(60_000) * 60_000;
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);

    // The input, in offset order, and the reference totals of what must be counted.
    let mut records = Vec::new();
    let mut expected: Totals = BTreeMap::new();
    let count = |tenant: &str, meter: &str, dims: &BTreeMap<String, String>, q: Decimal, exp: &mut Totals| {
        let e = exp.entry((tenant.to_owned(), meter.to_owned(), dimensions_key(dims))).or_insert((Decimal::ZERO, 0));
        e.0 += q;
        e.1 += 1;
    };
    let mut flood_sent = 0;
    for i in 0..3_000 {
        let t = minute + rng.random_range(0..60_000);
        if i % 2 == 1 && flood_sent < FLOOD {
            // The flood: one tenant, a new model each time, so a new window each time.
            let model = format!("rand-{flood_sent}");
            let dims: BTreeMap<String, String> = [("model".to_owned(), model.clone()), ("region".to_owned(), String::new())].into();
            if flood_sent < PER_TENANT {
                count("flood", "input_tokens", &dims, d("1"), &mut expected);
            }
            records.push(json!({"event_id": format!("flood-{flood_sent}"), "tenant": "flood", "meter": "input_tokens",
                "quantity": "1", "event_time": t, "dimensions": {"model": model}, "provider_cost": null, "source": "py"}));
            flood_sent += 1;
            continue;
        }
        let tenant = format!("t{}", rng.random_range(0..5));
        let model = ["small", "large", "vision"][rng.random_range(0..3)];
        let region = ["eu", "us"][rng.random_range(0..2)];
        // Integers and up to 9 fractional digits.
        let q = Decimal::new(rng.random_range(1..10_000_000_000i64), rng.random_range(0..=9)).normalize();
        let dims: BTreeMap<String, String> = [("model".to_owned(), model.to_owned()), ("region".to_owned(), region.to_owned())].into();
        count(&tenant, "input_tokens", &dims, q, &mut expected);
        let rec = json!({"event_id": format!("ev-{i}"), "tenant": tenant, "meter": "input_tokens", "quantity": q.to_string(),
            "event_time": t, "dimensions": {"model": model, "region": region}, "provider_cost": "0.001", "source": "py"});
        records.push(rec.clone());
        if i % 97 == 0 {
            records.push(rec); // a retry: same id, counted once
        }
    }
    // Big quantities: exact without a cap, out of range with one.
    let big = [("big-1", "input_tokens", "100000000000000000000", "a"), ("big-2", "input_tokens", "400000000000000000000000", "b"),
        ("big-3", "capped_tokens", "100000000000000000000", "a"), ("big-4", "capped_tokens", "500000000000", "a")];
    for (id, meter, q, model) in big {
        let mut dims: BTreeMap<String, String> = [("model".to_owned(), model.to_owned())].into();
        if meter == "input_tokens" {
            dims.insert("region".into(), String::new());
        }
        if id != "big-3" {
            count("big", meter, &dims, d(q), &mut expected);
        }
        records.push(json!({"event_id": id, "tenant": "big", "meter": meter, "quantity": q, "event_time": minute + 30_000,
            "dimensions": {"model": model}, "provider_cost": null, "source": "py"}));
    }
    let payloads = fastavro_encode(&records)?;
    assert!(payloads.iter().all(|p| p[..2] == [0xC3, 0x01]));

    let producer: FutureProducer = meterflow_runtime::kafka::producer_config(env.kafka_args())?.create()?;
    for p in &payloads {
        let rec = FutureRecord::<[u8], [u8]>::to(&env.topics().usage_topic).partition(0).payload(p);
        producer.send(rec, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
    }

    let meters_path = repo_root().join(format!("target/e2e-logs/{}-meters.toml", env.name()));
    std::fs::create_dir_all(meters_path.parent().expect("parent"))?;
    std::fs::write(&meters_path, METERS)?;
    let mut vars = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
    for (k, v) in [
        ("METERFLOW_AGGREGATOR_GROUP", "adversarial".to_owned()),
        ("METERFLOW_AGGREGATOR_HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("METERFLOW_METERS", meters_path.display().to_string()),
        ("METERFLOW_IDLE_TIMEOUT", "1s".to_owned()),
        ("METERFLOW_MAX_OPEN_WINDOWS_PER_TENANT", PER_TENANT.to_string()),
        ("METERFLOW_MAX_WINDOWS", MAX_WINDOWS.to_string()),
    ] {
        vars.push((k.to_owned(), v));
    }
    let config = parse_with_env::<meterflow_aggregator::Config>(&vars)?;
    assert_eq!((config.max_open_windows_per_tenant, config.max_windows), (PER_TENANT, MAX_WINDOWS));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(meterflow_aggregator::run(config, shutdown.clone()));

    let ch = env.clickhouse();
    let deadline = Instant::now() + Duration::from_secs(120);
    let found: Totals = loop {
        anyhow::ensure!(!task.is_finished(), "aggregator stopped by itself");
        let rows: Vec<TotalRow> =
            ch.query("SELECT tenant, meter, dimensions_key, value, event_count FROM meter_totals").fetch_all().await?;
        let found: Totals = rows
            .into_iter()
            .map(|r| {
                ((r.tenant, r.meter, r.dimensions_key), (meterflow_core::decimal::from_ch_i128(r.value), r.event_count as u64))
            })
            .collect();
        if found == expected || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let render = meterflow_runtime::http::prometheus().render();
    shutdown.cancel();
    task.await??;

    // 1. Every fastavro-encoded event decoded; totals equal the reference exactly.
    let missing: Vec<_> = expected.iter().filter(|(k, v)| found.get(*k) != Some(v)).take(5).collect();
    let extra: Vec<_> = found.iter().filter(|(k, _)| !expected.contains_key(*k)).take(5).collect();
    assert!(missing.is_empty() && extra.is_empty(), "windows differ: expected {missing:?}; unexpected {extra:?}");
    let undecodable: u64 = env.query_scalar("SELECT count() FROM dead_letters WHERE reason = 'undecodable'").await?;
    assert_eq!(undecodable, 0, "fastavro's single-object bytes must decode");

    // 2. Big quantities exact in usage_events and meter_aggregates; the capped one refused.
    let raw: Vec<RawRow> = ch
        .query("SELECT event_id, quantity FROM usage_events FINAL WHERE tenant = 'big' ORDER BY event_id")
        .fetch_all()
        .await?;
    let raw: Vec<(String, i128)> = raw.into_iter().map(|r| (r.event_id, r.quantity)).collect();
    assert_eq!(
        raw,
        vec![
            ("big-1".to_owned(), 100_000_000_000_000_000_000_000_000_000),
            ("big-2".to_owned(), 400_000_000_000_000_000_000_000_000_000_000),
            ("big-4".to_owned(), 500_000_000_000_000_000_000),
        ]
    );
    let big: Vec<TotalRow> = ch
        .query("SELECT tenant, meter, dimensions_key, value, event_count FROM meter_totals WHERE tenant = 'big' ORDER BY meter, dimensions_key")
        .fetch_all()
        .await?;
    let big: Vec<(String, String, i128)> = big.into_iter().map(|r| (r.meter, r.dimensions_key, r.value)).collect();
    assert_eq!(
        big,
        vec![
            ("capped_tokens".to_owned(), "model=a".to_owned(), 500_000_000_000_000_000_000),
            ("input_tokens".to_owned(), "model=a,region=".to_owned(), 100_000_000_000_000_000_000_000_000_000),
            ("input_tokens".to_owned(), "model=b,region=".to_owned(), 400_000_000_000_000_000_000_000_000_000_000),
        ]
    );
    assert_eq!(big[2].2, to_ch_i128(&d("400000000000000000000000"))?);
    let dead: Vec<DeadRow> = ch
        .query("SELECT reason, detail, tenant FROM dead_letters FINAL ORDER BY source_offset")
        .fetch_all()
        .await?;
    let by_reason = |r: &str| dead.iter().filter(|x| x.reason == r).collect::<Vec<_>>();
    let out_of_range = by_reason("quantity_out_of_range");
    assert_eq!(out_of_range.len(), 1, "{dead:?}");
    assert_eq!(out_of_range[0].tenant, "big");
    assert!(out_of_range[0].detail.contains("max_quantity 1000000000000"), "{}", out_of_range[0].detail);

    // 3. The flood: beyond the per-tenant limit, dead-lettered as window_limit; nothing else.
    let limited = by_reason("window_limit");
    assert_eq!(limited.len(), FLOOD - PER_TENANT);
    assert!(limited.iter().all(|x| x.tenant == "flood" && x.detail.contains("max_open_windows_per_tenant")));
    assert_eq!(dead.len(), 1 + FLOOD - PER_TENANT, "no other dead letters");
    // Memory: the partition holds exactly the windows of accepted events, far below what the
    // flood asked for.
    let windows = gauge(&render, "meterflow_aggregator_windows_in_memory").expect("windows gauge exported");
    assert_eq!(windows as usize, expected.len(), "{render}");
    assert!((windows as usize) < FLOOD, "the flood did not get a window per event");
    assert!(gauge(&render, "meterflow_aggregator_open_windows").is_some(), "open windows gauge exported");
    eprintln!(
        "{} events ({} from the flood), {} windows counted exactly, {} window_limit, 1 quantity_out_of_range",
        records.len(),
        FLOOD,
        expected.len(),
        limited.len()
    );
    env.cleanup().await?;
    Ok(())
}
