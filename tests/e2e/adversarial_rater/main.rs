//! The rater half of issue 10 against the real broker and ClickHouse, services in-process:
//!
//! * a poison aggregate (4e23 tokens) and an unpriced one are parked while every other tenant
//!   keeps being billed exactly; after a catalog fix `meterflow-admin rerate` bills them once,
//!   however often it runs;
//! * forged aggregates (no tag, a bad tag, another key's tag; with the real key a huge `seq`
//!   or a far-future window) are dead-lettered with their reason and the next real window of
//!   the tenant is charged;
//! * `meterflow-admin redrive` of dead-lettered events after the missing meter was added,
//!   run twice, counts them once;
//! * provider cost is exact per event whatever the window alignment.
//!
//! Expected amounts are computed here from the events sent, independently of the rater.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions: a failed unwrap is a failed run

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use meterflow_admin::replay::{self, RedriveFilter, RerateFilter};
use meterflow_core::auth::{self, RecordKey};
use meterflow_core::decimal::from_ch_i128;
use meterflow_core::records::{AvroRecord, MeterAggregate};
use meterflow_core::UsageEvent;
use meterflow_testkit::http::{free_port, get_ok, metric_sum};
use meterflow_testkit::procs::{parse_with_env, repo_root, service_env};
use meterflow_e2e::scenario::now_ms;
use meterflow_producer::EventProducer;
use meterflow_testkit::TestEnv;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod cost;

static SERIAL: Mutex<()> = Mutex::const_new(());
const PARTITIONS: i32 = 2;
const MINUTE: i64 = 60_000;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

const METERS: &str = "[[meter]]\nname = \"tokens\"\naggregation = \"sum\"\ngroup_by = [\"model\"]\nwindow = \"minute\"\nallowed_lateness = \"1s\"\n";
const WIDGETS: &str = "[[meter]]\nname = \"widgets\"\naggregation = \"sum\"\ngroup_by = []\nwindow = \"minute\"\nallowed_lateness = \"1s\"\n";

/// Plan p: tokens of model m1 at 0.000003; m2 has no price (unpriced) until `fixed`, which
/// also moves tenant "whale" to plan bulk (0.000000001 per token), where 4e23 tokens fit.
fn catalog(fixed: bool) -> String {
    let mut c = String::from(
        "default_plan = \"p\"\n\
         [[plan]]\nid = \"p\"\ncurrency = \"USD\"\nbilling_period = \"month\"\n\
         [[plan.price]]\nmeter = \"tokens\"\nname = \"tokens.m1\"\nmatch = { model = \"m1\" }\nmodel = \"per_unit\"\nunit_price = \"0.000003\"\n",
    );
    if fixed {
        c.push_str(
            "[[plan.price]]\nmeter = \"tokens\"\nname = \"tokens.m2\"\nmatch = { model = \"m2\" }\nmodel = \"per_unit\"\nunit_price = \"0.000002\"\n\
             [[plan]]\nid = \"bulk\"\ncurrency = \"USD\"\nbilling_period = \"month\"\n\
             [[plan.price]]\nmeter = \"tokens\"\nname = \"tokens.any\"\nmodel = \"per_unit\"\nunit_price = \"0.000000001\"\n\
             [[assignment]]\ntenant = \"whale\"\nplan = \"bulk\"\nfrom = \"2020-01-01T00:00:00Z\"\n",
        );
    }
    c.push_str("[[cost]]\nmeter = \"tokens\"\ndimension = \"model\"\nvalue = \"m1\"\nper_million = \"2.00\"\n");
    c
}

struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(env: &TestEnv) -> anyhow::Result<Self> {
        let dir = repo_root().join("target/e2e-adversarial").join(env.name());
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }
    fn write(&self, name: &str, text: &str) -> anyhow::Result<String> {
        let p = self.dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p.display().to_string())
    }
}

fn aggregator_env(env: &TestEnv, meters: &str) -> Vec<(String, String)> {
    let mut e = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
    for (k, v) in [
        ("METERFLOW_AGGREGATOR_GROUP", "agg"),
        ("METERFLOW_AGGREGATOR_HTTP_ADDR", "127.0.0.1:0"),
        ("METERFLOW_METERS", meters),
        ("METERFLOW_IDLE_TIMEOUT", "1s"),
        ("METERFLOW_CHECKPOINT_INTERVAL", "1s"),
    ] {
        e.push((k.into(), v.into()));
    }
    e
}

fn rater_env(env: &TestEnv, meters: &str, catalog: &str, http: &str) -> Vec<(String, String)> {
    let mut e = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
    for (k, v) in [
        ("METERFLOW_RATER_GROUP", "rater"),
        ("METERFLOW_RATER_HTTP_ADDR", http),
        ("METERFLOW_METERS", meters),
        ("METERFLOW_CATALOG", catalog),
        ("METERFLOW_CHECKPOINT_INTERVAL", "1s"),
    ] {
        e.push((k.into(), v.into()));
    }
    e
}

/// A running in-process service.
struct Svc {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

/// A failing test returns early: stop the services then, or the runtime waits for them.
impl Drop for Svc {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Svc {
    fn aggregator(env: &TestEnv, meters: &str) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let task = tokio::spawn(meterflow_aggregator::run(parse_with_env(&aggregator_env(env, meters))?, stop.clone()));
        Ok(Self { stop, task })
    }
    fn rater(env: &TestEnv, meters: &str, catalog: &str, http: &str) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let task = tokio::spawn(meterflow_rater::run(parse_with_env(&rater_env(env, meters, catalog, http))?, stop.clone()));
        Ok(Self { stop, task })
    }
    fn alive(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.task.is_finished(), "a service stopped by itself");
        Ok(())
    }
    async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        (&mut self.task).await?
    }
}

fn event(id: &str, tenant: &str, model: &str, quantity: &str, at: i64, cost: Option<&str>) -> UsageEvent {
    let mut e = UsageEvent::new(id, tenant, "tokens", d(quantity), at);
    if !model.is_empty() {
        e.dimensions.insert("model".into(), model.into());
    }
    e.provider_cost = cost.map(d);
    e
}

async fn send_all(env: &TestEnv, events: &[UsageEvent]) -> anyhow::Result<()> {
    let p = EventProducer::new(env.kafka_args(), &env.topics().usage_topic)?;
    for e in events {
        p.send(e).await.map_err(|e| anyhow::anyhow!("send: {e:?}"))?;
    }
    Ok(())
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Money {
    tenant: String,
    n: u64,
    amount: i128,
    cost: i128,
}

/// Usage charges per tenant from ClickHouse: (count, amount, provider cost).
async fn usage_by_tenant(env: &TestEnv) -> anyhow::Result<BTreeMap<String, (u64, Decimal, Decimal)>> {
    let rows: Vec<Money> = env
        .clickhouse()
        .query("SELECT tenant, count() AS n, sum(amount) AS amount, sum(provider_cost) AS cost FROM charges_dedup WHERE kind = 'usage' GROUP BY tenant")
        .fetch_all()
        .await?;
    Ok(rows.into_iter().map(|r| (r.tenant, (r.n, from_ch_i128(r.amount), from_ch_i128(r.cost)))).collect())
}

/// Polls until `check` passes (Ok(None)) or fails after `timeout` with its last complaint.
async fn eventually<F, Fut>(timeout: Duration, alive: &[&Svc], mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<String>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        for s in alive {
            s.alive()?;
        }
        let last = match check().await {
            Ok(None) => return Ok(()),
            Ok(Some(why)) => why,
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            anyhow::bail!("timed out: {last}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Expected usage amount and rate-card cost of plan p, model m1: per-unit prices telescope to
/// price x total, and these quantities are integers, so every value is exact.
fn m1_money(quantity: Decimal) -> (Decimal, Decimal) {
    (quantity * d("0.000003"), quantity * d("0.000002"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_unpriced_are_parked_others_billed_and_rerate_bills_once() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::with_partitions("adv_park", PARTITIONS).await?;
    let files = Files::new(&env)?;
    let meters = files.write("meters.toml", METERS)?;
    let broken = files.write("catalog-broken.toml", &catalog(false))?;
    let fixed = files.write("catalog-fixed.toml", &catalog(true))?;
    let t0 = (now_ms() / MINUTE - 30) * MINUTE;

    // Tenants a, b: m1 in three minutes. whale: m1 normally, plus 4e23 tokens in minute 1.
    // d: m2, which has no price until the fix.
    let mut events = Vec::new();
    let mut expected: BTreeMap<&str, Decimal> = BTreeMap::new();
    for (i, minute) in [0i64, 2, 4].iter().enumerate() {
        for (tenant, q) in [("a", 1000 + i as i64), ("b", 7 * (i as i64 + 1)), ("whale", 500)] {
            events.push(event(&format!("{tenant}-{minute}"), tenant, "m1", &q.to_string(), t0 + minute * MINUTE + 1_000, None));
            *expected.entry(tenant).or_default() += Decimal::from(q);
        }
    }
    events.push(event("poison", "whale", "m1", "400000000000000000000000", t0 + MINUTE + 5_000, None));
    events.push(event("d-1", "d", "m2", "1000", t0 + 2 * MINUTE + 5_000, None));
    send_all(&env, &events).await?;

    let agg = Svc::aggregator(&env, &meters)?;
    let http = format!("127.0.0.1:{}", free_port()?);
    let rater = Svc::rater(&env, &meters, &broken, &http)?;
    // Everyone else is billed exactly, the poison and the unpriced window are parked.
    eventually(Duration::from_secs(120), &[&agg, &rater], || async {
        let got = usage_by_tenant(&env).await?;
        for (tenant, q) in &expected {
            let (amount, cost) = m1_money(*q);
            match got.get(*tenant) {
                Some((3, a, c)) if *a == amount && *c == cost => {}
                other => return Ok(Some(format!("{tenant}: {other:?}, expected 3 charges, {amount}, {cost}"))),
            }
        }
        let parked: u64 = env.query_scalar("SELECT count() FROM parked_current WHERE current_state = 'parked'").await?;
        Ok((parked != 2).then(|| format!("{parked} parked, expected 2")))
    })
    .await?;
    assert!(!usage_by_tenant(&env).await?.contains_key("d"), "unpriced usage is not charged");
    let reasons: Vec<String> = env
        .clickhouse()
        .query("SELECT current_reason FROM parked_current ORDER BY current_reason")
        .fetch_all()
        .await?;
    assert_eq!(reasons, ["overflow", "unpriced"]);
    let dl: u64 = env
        .query_scalar(&format!(
            "SELECT uniqExact(source_partition, source_offset) FROM dead_letters WHERE source_topic = '{}' AND reason IN ('overflow', 'unpriced')",
            env.topics().aggregates_topic
        ))
        .await?;
    assert_eq!(dl, 2, "one dead letter per parked aggregate");
    // Counters count processing: a replay after a rebalance counts again, hence >= 1.
    eventually(Duration::from_secs(10), &[&agg, &rater], || async {
        let text = get_ok(&format!("http://{http}/metrics")).await?;
        let (o, u, now) = (
            metric_sum(&text, "meterflow_rater_aggregates_parked_total{reason=\"overflow\"}"),
            metric_sum(&text, "meterflow_rater_aggregates_parked_total{reason=\"unpriced\"}"),
            metric_sum(&text, "meterflow_rater_parked_aggregates"),
        );
        Ok((o < 1.0 || u < 1.0 || now != 2.0).then(|| format!("parked overflow {o} unpriced {u}, parked now {now}")))
    })
    .await?;

    // Fix the catalog, restart the rater with it, rerate twice.
    rater.stop().await?;
    let http = format!("127.0.0.1:{}", free_port()?);
    let rater = Svc::rater(&env, &meters, &fixed, &http)?;
    let key = meterflow_runtime::record_key::resolve(&meterflow_runtime::args::AuthArgs { record_key: None }, &env.clickhouse()).await?;
    let all = RerateFilter::default();
    let n = replay::rerate(env.kafka_args(), &env.topics().aggregates_topic, &env.clickhouse(), &key, &all).await?;
    assert_eq!(n, 2);
    let whale_poison = (d("400000000000000000000000") * d("0.000000001"), d("400000000000000000000000") * d("0.000002"));
    let d_money = (d("1000") * d("0.000002"), Decimal::ZERO); // no rate card for m2
    let check_rerated = || async {
        let got = usage_by_tenant(&env).await?;
        let (wa, wc) = m1_money(expected["whale"]);
        let want_whale = (4, wa + whale_poison.0, wc + whale_poison.1);
        if got.get("whale") != Some(&want_whale) {
            return Ok(Some(format!("whale {:?}, expected {want_whale:?}", got.get("whale"))));
        }
        if got.get("d") != Some(&(1, d_money.0, d_money.1)) {
            return Ok(Some(format!("d {:?}, expected {d_money:?}", got.get("d"))));
        }
        let parked: u64 = env.query_scalar("SELECT count() FROM parked_current WHERE current_state = 'parked'").await?;
        Ok((parked != 0).then(|| format!("{parked} still parked")))
    };
    eventually(Duration::from_secs(60), &[&agg, &rater], check_rerated).await?;
    // A second rerate (of what is no longer parked, per the state) charges nothing: publish
    // the same requests again by hand, since parked_current now says rerated.
    let payloads: Vec<(i32, Vec<u8>)> = {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct P {
            aggregates_partition: i32,
            #[serde(with = "serde_bytes")]
            original_payload: Vec<u8>,
        }
        let rows: Vec<P> = env.clickhouse().query("SELECT aggregates_partition, original_payload FROM parked_current").fetch_all().await?;
        rows.into_iter().map(|r| (r.aggregates_partition, r.original_payload)).collect()
    };
    assert_eq!(payloads.len(), 2);
    let producer: FutureProducer = meterflow_runtime::kafka::producer_config(env.kafka_args())?.create()?;
    for (p, bytes) in &payloads {
        let tag = auth::sign(&key, &[auth::PURPOSE_RERATE, bytes]);
        let rec = FutureRecord::to(&env.topics().aggregates_topic)
            .partition(*p)
            .key("again")
            .payload(bytes)
            .headers(OwnedHeaders::new().insert(Header { key: auth::RERATE_HEADER, value: Some(&tag[..]) }));
        producer.send(rec, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    }
    assert_eq!(replay::rerate(env.kafka_args(), &env.topics().aggregates_topic, &env.clickhouse(), &key, &all).await?, 0);
    // The rater read both duplicate requests (counted as not parked), and nothing changed.
    eventually(Duration::from_secs(30), &[&agg, &rater], || async {
        let text = get_ok(&format!("http://{http}/metrics")).await?;
        let n = metric_sum(&text, "meterflow_rater_rerates_total{outcome=\"not_parked\"}");
        Ok((n < 2.0).then(|| format!("{n} not_parked rerates")))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // past a flush
    assert_eq!(check_rerated().await?, None, "a second rerate must not charge again");
    rater.stop().await?;
    agg.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_aggregates_are_refused_and_the_next_real_window_is_charged() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::with_partitions("adv_forge", PARTITIONS).await?;
    let files = Files::new(&env)?;
    let meters = files.write("meters.toml", METERS)?;
    let cat = files.write("catalog.toml", &catalog(false))?;
    let t0 = (now_ms() / MINUTE - 30) * MINUTE;

    send_all(&env, &[event("v-0", "victim", "m1", "1000", t0 + 1_000, None)]).await?;
    let agg = Svc::aggregator(&env, &meters)?;
    let rater = Svc::rater(&env, &meters, &cat, "127.0.0.1:0")?;
    eventually(Duration::from_secs(90), &[&agg, &rater], || async {
        let got = usage_by_tenant(&env).await?;
        Ok((got.get("victim").map(|v| v.0) != Some(1)).then(|| format!("{got:?}")))
    })
    .await?;

    // The real aggregate, as a template for forgeries.
    let records = env.consume_all(&env.topics().aggregates_topic, Duration::from_secs(30)).await?;
    let (partition, _, _, bytes) = records.first().context("no aggregate on the topic")?.clone();
    let real = MeterAggregate::from_avro(&bytes)?;
    let key = meterflow_runtime::record_key::resolve(&meterflow_runtime::args::AuthArgs { record_key: None }, &env.clickhouse()).await?;
    let other_key = RecordKey::from_bytes(&[42u8; 32])?;
    let huge = MeterAggregate { seq: 1 << 50, window_start: t0 + 2 * MINUTE, window_end: t0 + 3 * MINUTE, value: d("99999999"), ..real.clone() };
    let future = MeterAggregate {
        seq: real.seq + 1,
        window_start: t0 + 400 * 86_400_000,
        window_end: t0 + 400 * 86_400_000 + MINUTE,
        emitted_at: t0 + 400 * 86_400_000 + MINUTE,
        value: d("5"),
        ..real.clone()
    };
    // (expected dead-letter reason, bytes, tag header)
    type Forgery = (&'static str, Vec<u8>, Option<[u8; auth::TAG_LEN]>);
    let forged: Vec<Forgery> = {
        let h = huge.to_avro()?;
        let f = future.to_avro()?;
        vec![
            ("unauthenticated", h.clone(), None),
            ("unauthenticated", h.clone(), Some([7u8; auth::TAG_LEN])),
            ("unauthenticated", h.clone(), Some(auth::sign(&other_key, &[auth::PURPOSE_AGGREGATE, &h]))),
            // A rerate-purpose tag is not an aggregate tag.
            ("unauthenticated", h.clone(), Some(auth::sign(&key, &[auth::PURPOSE_RERATE, &h]))),
            // With the real key (a leaked key, or a bug upstream): still refused.
            ("bad_seq", h.clone(), Some(auth::sign(&key, &[auth::PURPOSE_AGGREGATE, &h]))),
            ("future_window", f.clone(), Some(auth::sign(&key, &[auth::PURPOSE_AGGREGATE, &f]))),
        ]
    };
    let producer: FutureProducer = meterflow_runtime::kafka::producer_config(env.kafka_args())?.create()?;
    for (_, bytes, tag) in &forged {
        let mut rec = FutureRecord::to(&env.topics().aggregates_topic).partition(partition).key("victim").payload(bytes);
        if let Some(t) = tag {
            rec = rec.headers(OwnedHeaders::new().insert(Header { key: auth::HEADER, value: Some(&t[..]) }));
        }
        producer.send(rec, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    }
    // The next real windows of the tenant.
    send_all(&env, &[event("v-2", "victim", "m1", "300", t0 + 2 * MINUTE + 1_000, None), event("v-4", "victim", "m1", "20", t0 + 4 * MINUTE, None)]).await?;
    let (amount, cost) = m1_money(d("1320"));
    let aggregates_topic = env.topics().aggregates_topic.clone();
    eventually(Duration::from_secs(90), &[&agg, &rater], || async {
        let got = usage_by_tenant(&env).await?;
        if got.get("victim") != Some(&(3, amount, cost)) {
            return Ok(Some(format!("victim {:?}, expected (3, {amount}, {cost})", got.get("victim"))));
        }
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct R {
            reason: String,
            n: u64,
        }
        let rows: Vec<R> = env
            .clickhouse()
            .query("SELECT reason, uniqExact(source_offset) AS n FROM dead_letters WHERE source_topic = ? GROUP BY reason ORDER BY reason")
            .bind(&aggregates_topic)
            .fetch_all()
            .await?;
        let got: Vec<(String, u64)> = rows.into_iter().map(|r| (r.reason, r.n)).collect();
        let want = vec![("bad_seq".to_string(), 1), ("future_window".to_string(), 1), ("unauthenticated".to_string(), 4)];
        Ok((got != want).then(|| format!("dead letters {got:?}, expected {want:?}")))
    })
    .await?;
    // Nothing beyond the real windows was charged, and nothing to anyone else.
    let all = usage_by_tenant(&env).await?;
    assert_eq!(all.len(), 1, "{all:?}");
    rater.stop().await?;
    agg.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_after_adding_the_meter_counts_once_even_twice() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::with_partitions("adv_redrive", PARTITIONS).await?;
    let files = Files::new(&env)?;
    let meters_without = files.write("meters-without.toml", METERS)?;
    let meters_with = files.write("meters-with.toml", &format!("{METERS}\n{WIDGETS}"))?;
    let t0 = (now_ms() / MINUTE - 30) * MINUTE;
    let widgets: Vec<UsageEvent> = (0..5)
        .map(|i| {
            let mut e = UsageEvent::new(format!("w-{i}"), "acme", "widgets", Decimal::from(10 + i), t0 + i * 7_000);
            e.dimensions.clear();
            e
        })
        .collect();
    send_all(&env, &widgets).await?;
    send_all(&env, &[event("tok-0", "acme", "m1", "5", t0 + 1_000, None)]).await?;
    let agg = Svc::aggregator(&env, &meters_without)?;
    eventually(Duration::from_secs(60), &[&agg], || async {
        let n: u64 = env.query_scalar("SELECT count() FROM dead_letters WHERE reason = 'unknown_meter'").await?;
        Ok((n != 5).then(|| format!("{n} unknown_meter dead letters")))
    })
    .await?;
    agg.stop().await?;

    let agg = Svc::aggregator(&env, &meters_with)?;
    let filter = RedriveFilter { reason: "unknown_meter".into(), from_s: None, to_s: None };
    assert_eq!(replay::redrive(env.kafka_args(), &env.topics().usage_topic, &env.clickhouse(), &filter).await?, 5);
    assert_eq!(replay::redrive(env.kafka_args(), &env.topics().usage_topic, &env.clickhouse(), &filter).await?, 5);
    // A later event of the same tenant (same partition): once its window is out, every
    // redriven copy before it has been processed.
    send_all(&env, &[event("tok-late", "acme", "m1", "1", t0 + 5 * MINUTE, None)]).await?;
    eventually(Duration::from_secs(90), &[&agg], || async {
        let sentinel: u64 = env
            .query_scalar(&format!("SELECT count() FROM meter_totals WHERE meter = 'tokens' AND window_start = toDateTime({})", (t0 + 5 * MINUTE) / 1000))
            .await?;
        Ok((sentinel != 1).then(|| "sentinel window not out yet".to_string()))
    })
    .await?;
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct V {
        value: i128,
        event_count: i64,
    }
    let rows: Vec<V> = env.clickhouse().query("SELECT value, event_count FROM meter_totals WHERE meter = 'widgets'").fetch_all().await?;
    let sum: Decimal = rows.iter().map(|r| from_ch_i128(r.value)).sum();
    let events: i64 = rows.iter().map(|r| r.event_count).sum();
    let expected: Decimal = widgets.iter().map(|e| e.quantity).sum();
    assert_eq!((sum, events), (expected, 5), "each redriven event counted once");
    let accepted: u64 = env.query_scalar("SELECT count() FROM usage_events_dedup WHERE meter = 'widgets'").await?;
    assert_eq!(accepted, 5);
    // The redrive did run twice: each original is on the usage topic three times.
    let originals: Vec<Vec<u8>> = {
        let p = EventProducer::new(env.kafka_args(), &env.topics().usage_topic)?;
        widgets.iter().map(|e| p.encode(e)).collect()
    };
    let copies = env
        .consume_all(&env.topics().usage_topic, Duration::from_secs(30))
        .await?
        .into_iter()
        .filter(|r| originals.contains(&r.3))
        .count();
    assert_eq!(copies, 15, "5 originals + 2 x 5 redriven");
    agg.stop().await?;
    Ok(())
}
