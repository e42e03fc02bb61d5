//! meterflow-api against the real broker and ClickHouse, with a real HTTP client:
//! * events sent through the API (meterflow JSON batches, CloudEvents single and batch, a
//!   retried batch, invalid items mixed in) end as exactly the window totals and charges the
//!   test computes itself from what it sent, and top-ups through the API as exactly the
//!   expected wallets (a retry credits once, a conflicting reuse is 409);
//! * every error path: 401, 403, 400, 413, 415, 429 (rate limit and backpressure), with
//!   JSON bodies and Retry-After; revocation takes effect within the refresh interval;
//! * key isolation: tenant A's key cannot write B's usage, read B's wallet or top it up, and
//!   nothing of B reaches the usage topic.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meterflow_api::keys::Scope;
use meterflow_core::codec::UsageEventCodec;
use meterflow_core::decimal::from_ch_i128;
use meterflow_core::pricing::Catalog;
use meterflow_testkit::procs::{parse_with_env, service_env, repo_root};
use meterflow_e2e::scenario::now_ms;
use meterflow_e2e::verify;
use meterflow_producer::truth::{Counters, GroundTruth, RunInfo, WindowKey, WindowTotal};
use meterflow_testkit::TestEnv;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

static SERIAL: Mutex<()> = Mutex::const_new(());

fn env_with(env: &TestEnv, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
    e.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    e
}

fn meters_path() -> String {
    repo_root().join("config/meters.toml").display().to_string()
}

async fn start_api(env: &TestEnv, extra: &[(&str, &str)], shutdown: &CancellationToken) -> anyhow::Result<String> {
    let (meters, catalog) = (meters_path(), repo_root().join("config/catalog.toml").display().to_string());
    let mut vars = vec![
        ("METERFLOW_API_HTTP_ADDR", "127.0.0.1:0"),
        ("METERFLOW_METERS", meters.as_str()),
        ("METERFLOW_CATALOG", catalog.as_str()),
        ("METERFLOW_API_KEY_REFRESH", "500ms"),
    ];
    vars.extend_from_slice(extra);
    let cfg: meterflow_api::Config = parse_with_env(&env_with(env, &vars))?;
    let running = meterflow_api::start(cfg, shutdown.clone()).await?;
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(format!("{base}/readyz")).send().await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        anyhow::ensure!(Instant::now() < deadline, "meterflow-api not ready after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(base)
}

async fn key(env: &TestEnv, tenant: &str, scope: Scope) -> anyhow::Result<String> {
    Ok(meterflow_admin::keys::create(env.clickhouse_args(), tenant, scope).await?.1)
}

/// Sends `body` with `content_type`; returns (status, JSON body, Retry-After).
async fn post(c: &reqwest::Client, url: &str, key: Option<&str>, content_type: &str, body: String) -> anyhow::Result<(u16, Value, Option<String>)> {
    let mut req = c.post(url).header("content-type", content_type).body(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let text = resp.text().await?;
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, v, retry))
}

/// The test's own expectation: window totals folded from the events it sent.
#[derive(Default)]
struct Expect {
    /// (value, events, carried provider cost, what events without a carried cost contributed).
    windows: BTreeMap<WindowKey, (Decimal, u64, Decimal, Decimal)>,
}

impl Expect {
    fn add(&mut self, tenant: &str, meter: &str, dims: &[(&str, &str)], t: i64, value: Decimal, cost: Option<Decimal>) {
        let dims: BTreeMap<String, String> = dims.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let w = self.windows.entry((tenant.to_owned(), meter.to_owned(), dims, t.div_euclid(60_000) * 60_000)).or_default();
        w.0 += value;
        w.1 += 1;
        match cost {
            Some(c) => w.2 += c,
            None => w.3 += value,
        }
    }

    fn ground_truth(&self, topic: &str) -> GroundTruth {
        let aggregation = |m: &str| if m == "requests" { "count" } else { "sum" };
        GroundTruth {
            version: meterflow_producer::truth::FORMAT_VERSION,
            run: RunInfo {
                topic: topic.to_owned(),
                seed: 0,
                framing: "single-object".into(),
                event_time_mode: "api".into(),
                dedup_horizon_ms: 35 * 86_400_000,
                started_at_ms: now_ms(),
                elapsed_ms: 0,
                min_event_time_ms: None,
                max_event_time_ms: None,
                interrupted: false,
            },
            meters: vec![],
            counters: Counters::default(),
            windows: self
                .windows
                .iter()
                .map(|((tenant, meter, dims, start), (value, n, cost, uncosted))| WindowTotal {
                    tenant: tenant.clone(),
                    meter: meter.clone(),
                    aggregation: aggregation(meter).into(),
                    dimensions: dims.clone(),
                    window_start: *start,
                    window_end: start + 60_000,
                    value: *value,
                    event_count: *n,
                    provider_cost: *cost,
                    uncosted_value: *uncosted,
                    late_events: 0,
                })
                .collect(),
            totals: vec![],
            malformed: vec![],
        }
    }
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct BalanceRow {
    tenant: String,
    balance: i128,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_through_the_api_gives_exact_totals_charges_and_wallets() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    meterflow_e2e::scenario::init_test_logging();
    let env = TestEnv::new("api_exact").await?;
    let shutdown = CancellationToken::new();
    // Stops the in-process services however the test ends (a failed assertion included).
    let _stop = shutdown.clone().drop_guard();
    let tenants = ["tenant-000", "tenant-001", "tenant-002"];
    let mut keys = BTreeMap::new();
    for t in tenants {
        keys.insert(t, key(&env, t, Scope::Ingest).await?);
    }
    let admin = key(&env, "ops", Scope::Admin).await?;
    let reader = key(&env, "tenant-000", Scope::Read).await?;
    let base = start_api(&env, &[], &shutdown).await?;
    let c = reqwest::Client::new();
    let events_url = format!("{base}/v1/events");
    let mut expect = Expect::default();
    // Event times in a closed past: 40 minutes ago, spread over 5 minutes.
    let t0 = (now_ms() - 40 * 60_000).div_euclid(60_000) * 60_000;
    // Models and GPUs the pricing catalog (config/catalog.toml) prices.
    let models = ["gpt-4o", "llama-70b"];
    let regions = ["eu", "us"];

    // 1. meterflow JSON, batches of 100, one invalid item in each.
    let mut sent_batches = Vec::new();
    for (ti, tenant) in tenants.iter().enumerate() {
        for b in 0..4 {
            let mut items = Vec::new();
            for i in 0..99 {
                let n = b * 100 + i;
                let t = t0 + (n as i64 * 2_999) % 300_000;
                let (model, region) = (models[n % 2], regions[(n / 2) % 2]);
                let q = Decimal::new((n as i64 * 37 + ti as i64) % 5_000 + 1, if n % 3 == 0 { 3 } else { 0 });
                let cost = Decimal::new(n as i64 % 7, 6);
                items.push(json!({"event_id": format!("j-{b}-{i}"), "meter": "input_tokens", "quantity": q.to_string(),
                    "event_time": t, "dimensions": {"model": model, "region": region}, "provider_cost": cost.to_string()}));
                expect.add(tenant, "input_tokens", &[("model", model), ("region", region)], t, q, Some(cost));
            }
            items.push(json!({"event_id": format!("bad-{b}"), "meter": "input_tokens", "quantity": "1.5e3"}));
            let body = Value::Array(items).to_string();
            let (status, v, _) = post(&c, &events_url, Some(&keys[tenant]), "application/json", body.clone()).await?;
            assert_eq!(status, 202, "{v}");
            assert_eq!((v["accepted"].as_u64(), v["rejected"].as_u64()), (Some(99), Some(1)), "{v}");
            assert_eq!(v["results"][99]["reason"], "bad_quantity", "{v}");
            assert_eq!(v["results"][99]["index"], 99);
            sent_batches.push((tenant, body));
        }
    }
    // A client retry of a whole batch: accepted again, counted once by the aggregator.
    let (tenant, body) = &sent_batches[1];
    let (status, _, _) = post(&c, &events_url, Some(&keys[*tenant]), "application/json", body.clone()).await?;
    assert_eq!(status, 202);

    // 2. CloudEvents: one `llm.completion` feeds input_tokens, output_tokens and requests.
    let mut ces = Vec::new();
    for i in 0..150 {
        let tenant = tenants[i % 3];
        let t = t0 + 60_000 + (i as i64) * 1_001;
        let (model, region) = (models[i % 2], regions[i % 2]);
        let (input, output) = (100 + i as i64, Decimal::new(5 * i as i64 + 1, 1));
        let time = chrono_like(t);
        ces.push((tenant, json!({"specversion": "1.0", "id": format!("ce-{i}"), "source": "chat-svc", "type": "llm.completion",
            "subject": tenant, "time": time, "data": {"model": model, "region": region,
            "usage": {"input_tokens": input, "output_tokens": output.to_string()}}})));
        expect.add(tenant, "input_tokens", &[("model", model), ("region", region)], t, Decimal::from(input), None);
        expect.add(tenant, "output_tokens", &[("model", model), ("region", region)], t, output, None);
        expect.add(tenant, "requests", &[("model", model)], t, Decimal::ONE, None);
    }
    for (tenant, ce) in &ces[..10] {
        let (status, v, _) = post(&c, &events_url, Some(&keys[*tenant]), "application/cloudevents+json", ce.to_string()).await?;
        assert_eq!(status, 202, "{v}");
        assert_eq!(v["events"], 3, "one CloudEvent, three meters: {v}");
    }
    for tenant in tenants {
        let batch: Vec<&Value> = ces[10..].iter().filter(|(t, _)| *t == tenant).map(|(_, v)| v).collect();
        let (status, v, _) = post(&c, &events_url, Some(&keys[tenant]), "application/cloudevents-batch+json", json!(batch).to_string()).await?;
        assert_eq!(status, 202, "{v}");
        assert_eq!(v["accepted"].as_u64(), Some(batch.len() as u64));
    }
    // gpu_seconds through an admin key on behalf of tenant-002 (subject names the tenant).
    let t = t0 + 120_000;
    let gpu = json!({"specversion": "1.0", "id": "g-1", "source": "scheduler", "type": "gpu.usage", "subject": "tenant-002",
        "time": chrono_like(t), "data": {"model": "llama-70b", "gpu": "h100", "seconds": 12.25}});
    let (status, v, _) = post(&c, &events_url, Some(&admin), "application/cloudevents+json", gpu.to_string()).await?;
    assert_eq!(status, 202, "{v}");
    expect.add("tenant-002", "gpu_seconds", &[("gpu", "h100"), ("model", "llama-70b")], t, Decimal::new(1225, 2), None);

    // 3. Top-ups: one retried (same body: same answer, credited once), one conflicting reuse.
    let adj = |tenant: &str| format!("{base}/v1/wallets/{tenant}/adjustments");
    let top_up = |amount: &str, r: &str| json!({"amount": amount, "currency": "USD", "reason": "card payment", "payment_reference": r}).to_string();
    let send_adj = |tenant: String, idem: &'static str, body: String| {
        let c = c.clone();
        let admin = admin.clone();
        let url = adj(&tenant);
        async move {
            let resp = c.post(url).bearer_auth(admin).header("idempotency-key", idem).header("content-type", "application/json").body(body).send().await?;
            let replayed = resp.headers().contains_key("idempotent-replayed");
            let status = resp.status().as_u16();
            let v: Value = resp.json_or_text().await?;
            anyhow::Ok((status, v, replayed))
        }
    };
    let (s1, v1, r1) = send_adj("tenant-000".into(), "pay_1", top_up("1000", "pi_1")).await?;
    let (s2, v2, r2) = send_adj("tenant-000".into(), "pay_1", top_up("1000.00", "pi_1")).await?;
    assert_eq!((s1, r1, s2, r2), (201, false, 201, true), "{v1} {v2}");
    assert_eq!(v1, v2, "a retry gets the same answer");
    let (s3, v3, _) = send_adj("tenant-000".into(), "pay_1", top_up("999", "pi_1")).await?;
    assert_eq!((s3, v3["error"]["code"].as_str()), (409, Some("conflict")), "{v3}");
    let (s4, v4, _) = send_adj("tenant-001".into(), "pay_2", top_up("500.5", "pi_2")).await?;
    assert_eq!(s4, 201, "{v4}");
    let credits: BTreeMap<&str, Decimal> = [("tenant-000", Decimal::from(1000)), ("tenant-001", Decimal::new(5005, 1))].into();

    // 4. The pipeline, in-process.
    let agg_env = env_with(&env, &[
        ("METERFLOW_AGGREGATOR_GROUP", "agg"),
        ("METERFLOW_AGGREGATOR_HTTP_ADDR", "127.0.0.1:0"),
        ("METERFLOW_METERS", &meters_path()),
        ("METERFLOW_IDLE_TIMEOUT", "1s"),
    ]);
    let catalog_path = repo_root().join("config/catalog.toml").display().to_string();
    let rater_env = env_with(&env, &[
        ("METERFLOW_RATER_GROUP", "rater"),
        ("METERFLOW_RATER_HTTP_ADDR", "127.0.0.1:0"),
        ("METERFLOW_CATALOG", &catalog_path),
    ]);
    let agg = tokio::spawn(meterflow_aggregator::run(parse_with_env(&agg_env)?, shutdown.clone()));
    let rater = tokio::spawn(meterflow_rater::run(parse_with_env(&rater_env)?, shutdown.clone()));
    let gt = expect.ground_truth(&env.topics().usage_topic);
    let ch = env.clickhouse();
    // Window totals exact and no dead letter at all (rejected items never reach the topic).
    meterflow_e2e::scenario::wait_until_exact(&ch, &gt, &env.topics().usage_topic, Duration::from_secs(180), || {
        anyhow::ensure!(!agg.is_finished() && !rater.is_finished(), "a service stopped by itself");
        Ok(())
    })
    .await?;
    let catalog = Catalog::from_toml_str(&std::fs::read_to_string(&catalog_path)?)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let report = verify::charges(&ch, &gt, &catalog).await?;
        if report.ok() {
            break;
        }
        if Instant::now() > deadline {
            report.into_result("charges")?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Wallets: credit (once) minus the tenant's revenue; and the read endpoint says the same.
    let money = verify::expected_money(&gt, &catalog)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows: Vec<BalanceRow> = ch.query("SELECT tenant, balance FROM wallet_balances WHERE currency = 'USD'").fetch_all().await?;
        let found: BTreeMap<String, Decimal> = rows.into_iter().map(|r| (r.tenant, from_ch_i128(r.balance).normalize())).collect();
        let wrong: Vec<String> = credits
            .iter()
            .filter_map(|(t, credit)| {
                let want = (credit - money.get(*t).map_or(Decimal::ZERO, |m| m.0)).normalize();
                let got = found.get(*t).copied().unwrap_or_default();
                (got != want).then(|| format!("{t}: {got} != {want}"))
            })
            .collect();
        if wrong.is_empty() {
            let api: Value = c.get(format!("{base}/v1/wallets/tenant-000")).bearer_auth(&reader).send().await?.json_or_text().await?;
            assert_eq!(api[0]["balance"].as_str().map(|s| s.parse::<Decimal>().unwrap().normalize()), found.get("tenant-000").copied(), "{api}");
            break;
        }
        assert!(Instant::now() < deadline, "wallets: {wrong:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    shutdown.cancel();
    agg.await??;
    rater.await??;
    Ok(())
}

/// RFC 3339 of Unix ms, UTC, without a date crate in the test: days from civil (Howard Hinnant).
fn chrono_like(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, ms.rem_euclid(1000))
}

trait JsonOrText {
    async fn json_or_text(self) -> anyhow::Result<Value>;
}

impl JsonOrText for reqwest::Response {
    async fn json_or_text(self) -> anyhow::Result<Value> {
        let text = self.text().await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_path_and_key_isolation() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::with_partitions("api_errors", 2).await?;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let a = key(&env, "tenant-a", Scope::Ingest).await?;
    let (b_id, b) = meterflow_admin::keys::create(env.clickhouse_args(), "tenant-b", Scope::Ingest).await?;
    let c_key = key(&env, "tenant-c", Scope::Ingest).await?;
    let a_read = key(&env, "tenant-a", Scope::Read).await?;
    let admin = key(&env, "ops", Scope::Admin).await?;
    let base = start_api(&env, &[
        ("METERFLOW_API_MAX_BODY_BYTES", "4096"),
        ("METERFLOW_API_MAX_BATCH", "10"),
        ("METERFLOW_API_TENANT_RATE", "5"),
        ("METERFLOW_API_MAX_IN_FLIGHT", "3"),
    ], &shutdown)
    .await?;
    let c = reqwest::Client::new();
    let url = format!("{base}/v1/events");
    let ev = |id: &str| json!({"event_id": id, "meter": "requests", "quantity": "1", "dimensions": {"model": "m"}});
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or_default().to_owned();

    // 401: no key, a malformed header, an unknown key.
    let (s, v, _) = post(&c, &url, None, "application/json", ev("x").to_string()).await?;
    assert_eq!((s, code(&v).as_str()), (401, "unauthorized"), "{v}");
    let r = c.post(&url).header("authorization", "Basic Zm9vOmJhcg==").header("content-type", "application/json").body(ev("x").to_string()).send().await?;
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.headers().get("www-authenticate").and_then(|h| h.to_str().ok()), Some("Bearer"));
    let (s, _, _) = post(&c, &url, Some("mf_000000000000_ffff"), "application/json", ev("x").to_string()).await?;
    assert_eq!(s, 401);
    // 403: a read key cannot ingest; an ingest key cannot top up; A's read key cannot read B.
    let (s, v, _) = post(&c, &url, Some(&a_read), "application/json", ev("x").to_string()).await?;
    assert_eq!((s, code(&v).as_str()), (403, "forbidden"), "{v}");
    let adj = json!({"amount": "10", "currency": "USD"}).to_string();
    let r = c.post(format!("{base}/v1/wallets/tenant-a/adjustments")).bearer_auth(&a).header("idempotency-key", "k").header("content-type", "application/json").body(adj.clone()).send().await?;
    assert_eq!(r.status().as_u16(), 403, "tenant A's ingest key cannot top up even its own wallet");
    let r = c.post(format!("{base}/v1/wallets/tenant-b/adjustments")).bearer_auth(&a).header("idempotency-key", "k").header("content-type", "application/json").body(adj.clone()).send().await?;
    assert_eq!(r.status().as_u16(), 403, "nor B's");
    let r = c.get(format!("{base}/v1/wallets/tenant-b")).bearer_auth(&a_read).send().await?;
    assert_eq!(r.status().as_u16(), 403);
    // Adjustment input errors (admin): missing Idempotency-Key 400, bad amount 400, 415.
    let r = c.post(format!("{base}/v1/wallets/tenant-a/adjustments")).bearer_auth(&admin).header("content-type", "application/json").body(adj.clone()).send().await?;
    assert_eq!(r.status().as_u16(), 400);
    let r = c.post(format!("{base}/v1/wallets/tenant-a/adjustments")).bearer_auth(&admin).header("idempotency-key", "k2").header("content-type", "application/json").body(r#"{"amount":"1e3","currency":"USD"}"#).send().await?;
    assert_eq!(r.status().as_u16(), 400);
    let r = c.post(format!("{base}/v1/wallets/tenant-a/adjustments")).bearer_auth(&admin).header("idempotency-key", "k3").header("content-type", "text/plain").body(adj.clone()).send().await?;
    assert_eq!(r.status().as_u16(), 415);

    // 415, 400, 413.
    let (s, v, _) = post(&c, &url, Some(&a), "text/plain", ev("x").to_string()).await?;
    assert_eq!((s, code(&v).as_str()), (415, "unsupported_media_type"), "{v}");
    let (s, v, _) = post(&c, &url, Some(&a), "application/json", "{not json".into()).await?;
    assert_eq!((s, code(&v).as_str()), (400, "bad_request"), "{v}");
    let (s, v, _) = post(&c, &url, Some(&a), "application/json", json!({"event_id": "u", "meter": "nope", "quantity": "1"}).to_string()).await?;
    assert_eq!((s, v["results"][0]["reason"].as_str()), (400, Some("unknown_meter")), "{v}");
    let big = json!([{"event_id": "big", "meter": "requests", "quantity": "1", "source": "x".repeat(5000)}]).to_string();
    let (s, v, _) = post(&c, &url, Some(&a), "application/json", big).await?;
    assert_eq!((s, code(&v).as_str()), (413, "payload_too_large"), "{v}");
    let eleven: Vec<Value> = (0..11).map(|i| ev(&format!("e{i}"))).collect();
    let (s, v, _) = post(&c, &url, Some(&a), "application/json", json!(eleven).to_string()).await?;
    assert_eq!((s, code(&v).as_str()), (413, "payload_too_large"), "{v}");

    // Key isolation on writes: A's key naming B is rejected per item; A's own item passes.
    let data = json!({"model": "m", "region": "eu", "usage": {"input_tokens": 1, "output_tokens": 1}});
    let mixed = json!([
        {"specversion": "1.0", "id": "iso-1", "source": "s", "type": "llm.completion", "subject": "tenant-b", "data": data},
        {"specversion": "1.0", "id": "iso-2", "source": "s", "type": "llm.completion", "subject": "tenant-a", "data": data},
    ]);
    let (s, v, _) = post(&c, &url, Some(&a), "application/cloudevents-batch+json", mixed.to_string()).await?;
    assert_eq!(s, 202, "{v}");
    assert_eq!((v["results"][0]["reason"].as_str(), v["results"][1]["status"].as_str()), (Some("tenant_mismatch"), Some("accepted")), "{v}");
    let (s, v, _) = post(&c, &url, Some(&a), "application/json", json!({"event_id": "iso-3", "tenant": "tenant-b", "meter": "requests", "quantity": "1"}).to_string()).await?;
    assert_eq!((s, v["results"][0]["reason"].as_str()), (400, Some("tenant_mismatch")), "{v}");

    // 429 backpressure: 4 events > 3 in flight. 429 rate limit: tenant-c's 5/s.
    let four: Vec<Value> = (0..4).map(|i| ev(&format!("f{i}"))).collect();
    let (s, v, retry) = post(&c, &url, Some(&c_key), "application/json", json!(four).to_string()).await?;
    assert_eq!((s, code(&v).as_str(), retry.as_deref()), (429, "overloaded", Some("1")), "{v}");
    let mut statuses = Vec::new();
    for i in 0..3 {
        let two = json!([ev(&format!("r{i}a")), ev(&format!("r{i}b"))]);
        let (s, v, retry) = post(&c, &url, Some(&c_key), "application/json", two.to_string()).await?;
        if s == 429 {
            assert_eq!(code(&v), "rate_limited", "{v}");
            assert!(retry.as_deref().and_then(|r| r.parse::<u64>().ok()).is_some_and(|r| r >= 1), "Retry-After {retry:?}");
        }
        statuses.push(s);
    }
    // 4 tokens were spent by the overloaded request, so the burst of 5 allows at most one
    // more pair within the first second: at least one 429.
    assert!(statuses.contains(&429), "rate limit never hit: {statuses:?}");

    // Revocation: B's key works, is revoked, and is refused within the refresh (500 ms) + slack.
    let (s, _, _) = post(&c, &url, Some(&b), "application/json", ev("b-1").to_string()).await?;
    assert_eq!(s, 202);
    meterflow_admin::keys::revoke(env.clickhouse_args(), &b_id).await?;
    let revoked_at = Instant::now();
    loop {
        let (s, _, _) = post(&c, &url, Some(&b), "application/json", ev("b-2").to_string()).await?;
        if s == 401 {
            break;
        }
        assert!(s == 202 || s == 429, "status {s}");
        assert!(revoked_at.elapsed() < Duration::from_secs(3), "revoked key still accepted after {:?}", revoked_at.elapsed());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("revocation took effect after {:?}", revoked_at.elapsed());

    // The usage topic: every record is keyed by its tenant, and tenant-b only has what B's key
    // sent itself before revocation (b-1, maybe b-2), never A's attempts.
    let records = env.consume_all(&env.topics().usage_topic, Duration::from_secs(20)).await?;
    let codec = UsageEventCodec::new();
    let mut by_tenant: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, _, key, payload) in &records {
        let ev = codec.decode(payload)?;
        assert_eq!(key.as_deref(), Some(ev.tenant.as_bytes()), "record keyed by its tenant");
        by_tenant.entry(ev.tenant.to_owned()).or_default().push(ev.event_id.to_owned());
    }
    assert!(by_tenant["tenant-b"].iter().all(|id| id.starts_with("b-")), "{by_tenant:?}");
    assert_eq!(by_tenant["tenant-a"].len(), 3, "only iso-2, for its three meters: {by_tenant:?}");
    assert!(by_tenant["tenant-a"].iter().all(|id| id.ends_with(":iso-2")), "{by_tenant:?}");
    assert!(!by_tenant.contains_key("tenant-c") || by_tenant["tenant-c"].iter().all(|id| id.starts_with('r')), "{by_tenant:?}");
    shutdown.cancel();
    Ok(())
}
