//! Real-time economic control end to end (issue 14, items 1, 2 and 6): aggregator, rater and
//! meterflow-api in-process against the real broker and ClickHouse, with a test catalog whose
//! prices the test computes with itself.
//!
//! * Usage acknowledged by `POST /v1/events` shows as pending spend in
//!   `GET /v1/customers/{tenant}/balance` within seconds, while its window is still open
//!   (asserted against the window's close time); once the window closes pending goes back to 0
//!   and the settled balance equals top-up minus the test's own price computation.
//! * `POST /v1/entitlements/check` denies above the available balance of a prepaid tenant
//!   and above a hard spend limit, and allows below them with the exact remaining amount;
//!   crossing a soft limit publishes a `spend_limit_soft` alert.
//! * Key isolation: a tenant's key never reads another tenant's balance or checks for it.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions: a failed unwrap is a failed run

use std::time::{Duration, Instant};

use meterflow_api::keys::Scope;
use meterflow_core::records::{AlertRecord, AvroRecord};
use meterflow_testkit::procs::{parse_with_env, service_env, repo_root};
use meterflow_e2e::scenario::now_ms;
use meterflow_testkit::TestEnv;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Unit prices of the test plan: no free allowance, so every unit shows in the balance.
const INPUT_PRICE: &str = "0.001";
const CATALOG: &str = r#"
default_plan = "rt"

[[plan]]
id = "rt"
currency = "USD"

[[plan.price]]
meter = "input_tokens"
model = "per_unit"
unit_price = "0.001"

[[plan.price]]
meter = "output_tokens"
model = "per_unit"
unit_price = "0.002"

[[spend_limit]]
tenant = "rt-b"
currency = "USD"
amount = "2"
kind = "hard"

[[spend_limit]]
tenant = "rt-b"
currency = "USD"
amount = "1"
kind = "soft"
"#;

const LATENESS_MS: i64 = 10_000; // config/meters.toml: input_tokens allowed_lateness

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

struct Api {
    base: String,
    c: reqwest::Client,
}

impl Api {
    async fn get(&self, path: &str, key: &str) -> anyhow::Result<(u16, Value)> {
        let r = self.c.get(format!("{}{path}", self.base)).bearer_auth(key).send().await?;
        Ok((r.status().as_u16(), r.json().await.unwrap_or(Value::Null)))
    }

    async fn post(&self, path: &str, key: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        let r = self.c.post(format!("{}{path}", self.base)).bearer_auth(key).json(&body).send().await?;
        Ok((r.status().as_u16(), r.json().await.unwrap_or(Value::Null)))
    }

    async fn balance(&self, tenant: &str, key: &str) -> anyhow::Result<Value> {
        let (s, v) = self.get(&format!("/v1/customers/{tenant}/balance"), key).await?;
        anyhow::ensure!(s == 200, "balance of {tenant}: {s} {v}");
        Ok(v)
    }

    /// Polls the balance until `pred` holds (or `timeout`); returns it and when it held.
    async fn wait_balance(&self, tenant: &str, key: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> anyhow::Result<(Value, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.balance(tenant, key).await?;
            if pred(&v) {
                return Ok((v, Instant::now()));
            }
            anyhow::ensure!(Instant::now() < deadline, "balance of {tenant} not as expected after {timeout:?}: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn check(&self, key: &str, quantity: &str) -> anyhow::Result<Value> {
        let (s, v) = self
            .post("/v1/entitlements/check", key, json!({"meter": "input_tokens", "quantity": quantity, "dimensions": {"model": "gpt-4o", "region": "eu"}}))
            .await?;
        anyhow::ensure!(s == 200, "check: {s} {v}");
        Ok(v)
    }
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct RevenueRow {
    tenant: String,
    amount: i128,
}

fn dec(v: &Value, field: &str) -> Decimal {
    v[field].as_str().map_or_else(|| panic!("{field} is not a decimal string in {v}"), d)
}

/// Sends `tokens` input tokens for `tenant` with event time now; returns the ack instant and
/// the close time of the event's window (Unix ms).
async fn send_tokens(api: &Api, key: &str, id: &str, tokens: u64) -> anyhow::Result<(Instant, i64)> {
    let t = now_ms();
    let body = json!([{"event_id": id, "meter": "input_tokens", "quantity": tokens.to_string(), "event_time": t,
        "dimensions": {"model": "gpt-4o", "region": "eu"}}]);
    let (s, v) = api.post("/v1/events", key, body).await?;
    anyhow::ensure!(s == 202 && v["accepted"] == 1, "ingest: {s} {v}");
    Ok((Instant::now(), t.div_euclid(60_000) * 60_000 + 60_000 + LATENESS_MS))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pending_within_seconds_settles_exactly_and_checks_deny() -> anyhow::Result<()> {
    let env = TestEnv::new("realtime").await?;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let catalog_path = std::env::temp_dir().join(format!("meterflow-realtime-{}.toml", env.topic_prefix().trim_end_matches('.')));
    std::fs::write(&catalog_path, CATALOG)?;
    let catalog = catalog_path.display().to_string();
    let meters = repo_root().join("config/meters.toml").display().to_string();
    let env_with = |extra: &[(&str, &str)]| {
        let mut e = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
        e.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        e
    };
    let mk = |tenant: &'static str, scope| meterflow_admin::keys::create(env.clickhouse_args(), tenant, scope);
    let (ingest_a, read_a, ingest_b, read_b, admin) =
        (mk("rt-a", Scope::Ingest).await?.1, mk("rt-a", Scope::Read).await?.1, mk("rt-b", Scope::Ingest).await?.1, mk("rt-b", Scope::Read).await?.1, mk("ops", Scope::Admin).await?.1);

    let agg = tokio::spawn(meterflow_aggregator::run(
        parse_with_env(&env_with(&[("METERFLOW_AGGREGATOR_GROUP", "agg"), ("METERFLOW_AGGREGATOR_HTTP_ADDR", "127.0.0.1:0"), ("METERFLOW_METERS", &meters), ("METERFLOW_IDLE_TIMEOUT", "1s")]))?,
        shutdown.clone(),
    ));
    let rater = tokio::spawn(meterflow_rater::run(
        parse_with_env(&env_with(&[("METERFLOW_RATER_GROUP", "rater"), ("METERFLOW_RATER_HTTP_ADDR", "127.0.0.1:0"), ("METERFLOW_CATALOG", &catalog), ("METERFLOW_METERS", &meters)]))?,
        shutdown.clone(),
    ));
    let cfg: meterflow_api::Config = parse_with_env(&env_with(&[
        ("METERFLOW_API_HTTP_ADDR", "127.0.0.1:0"),
        ("METERFLOW_METERS", &meters),
        ("METERFLOW_CATALOG", &catalog),
        ("METERFLOW_API_KEY_REFRESH", "500ms"),
    ]))?;
    let running = meterflow_api::start(cfg, shutdown.clone()).await?;
    let api = Api { base: format!("http://{}", running.addr), c: reqwest::Client::new() };
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.get("/v1/customers/rt-a/balance", &read_a).await.map(|r| r.0).unwrap_or(0) != 200 {
        anyhow::ensure!(Instant::now() < deadline, "balances not served after 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Key isolation, before anything else: a tenant key sees only its tenant.
    assert_eq!(api.get("/v1/customers/rt-b/balance", &read_a).await?.0, 403);
    let (s, v) = api.post("/v1/entitlements/check", &ingest_a, json!({"meter": "input_tokens", "quantity": "1", "tenant": "rt-b"})).await?;
    assert_eq!(s, 403, "{v}");
    assert_eq!(api.get("/v1/customers/rt-a/balance", &ingest_a).await?.0, 403, "an ingest key does not read balances");
    assert_eq!(api.get("/v1/customers/rt-b/balance", &admin).await?.0, 200);

    // Prepaid tenant A: 10 USD, settled once the rater applied it.
    let (s, v) = api
        .c
        .post(format!("{}/v1/wallets/rt-a/adjustments", api.base))
        .bearer_auth(&admin)
        .header("idempotency-key", "rt-top-up")
        .json(&json!({"amount": "10", "currency": "USD", "reason": "test"}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))?;
    assert_eq!(s, 201, "{:?}", v.text().await);
    api.wait_balance("rt-a", &read_a, Duration::from_secs(60), |v| v["settled"] == "10" && v["prepaid"] == true).await?;

    // Make sure the window has time left: at least 25 s before it closes.
    let into_minute = now_ms().rem_euclid(60_000);
    if into_minute > 40_000 {
        tokio::time::sleep(Duration::from_millis((61_000 - into_minute) as u64)).await;
    }
    let unit = d(INPUT_PRICE);
    let (acked, closes_at) = send_tokens(&api, &ingest_a, "a-1", 1500).await?;
    let want_pending = Decimal::from(1500) * unit; // 1.5
    let (v, seen) = api.wait_balance("rt-a", &read_a, Duration::from_secs(20), |v| v["pending"].as_str().map(d) == Some(want_pending)).await?;
    let visible_after = seen - acked;
    assert!(now_ms() < closes_at, "pending seen only after the window closed ({visible_after:?})");
    assert!(visible_after < Duration::from_secs(5), "pending visible {visible_after:?} after the ack");
    assert_eq!((dec(&v, "settled"), dec(&v, "available")), (d("10"), d("10") - want_pending), "{v}");
    println!("rt-a: pending visible {visible_after:?} after the ack, window still open");

    // Entitlement checks against the available balance (8.5 now).
    let e = api.check(&ingest_a, "9000").await?; // 9 USD > 8.5
    assert_eq!((e["allowed"].as_bool(), e["reason"].as_str()), (Some(false), Some("insufficient_balance")), "{e}");
    let e = api.check(&read_a, "8000").await?; // 8 USD
    assert_eq!((e["allowed"].as_bool(), e["reason"].as_str()), (Some(true), Some("ok")), "{e}");
    assert_eq!((dec(&e, "cost"), dec(&e, "remaining")), (d("8"), d("0.5")), "{e}");

    // Postpaid tenant B: a hard limit of 2 and a soft limit of 1 USD per month.
    let (acked_b, _) = send_tokens(&api, &ingest_b, "b-1", 1200).await?;
    let (v, seen_b) = api.wait_balance("rt-b", &read_b, Duration::from_secs(20), |v| v["pending"] == "1.2").await?;
    assert_eq!(v["period_spend"], "1.2", "{v}");
    let hard = v["limits"].as_array().unwrap().iter().find(|l| l["kind"] == "hard").cloned().unwrap();
    assert_eq!((hard["spent"].as_str(), hard["remaining"].as_str(), hard["exceeded"].as_bool()), (Some("1.2"), Some("0.8"), Some(false)), "{v}");
    println!("rt-b: pending visible {:?} after the ack", seen_b - acked_b);
    let e = api.check(&ingest_b, "900").await?; // 1.2 + 0.9 > 2
    assert_eq!((e["allowed"].as_bool(), e["reason"].as_str()), (Some(false), Some("hard_limit")), "{e}");
    let e = api.check(&ingest_b, "700").await?; // 1.9 <= 2
    assert_eq!((e["allowed"].as_bool(), dec(&e, "remaining")), (Some(true), d("0.1")), "{e}");
    let e = api.post("/v1/entitlements/check", &admin, json!({"meter": "input_tokens", "quantity": "800", "tenant": "rt-b"})).await?.1;
    assert_eq!((e["allowed"].as_bool(), dec(&e, "remaining")), (Some(true), d("0")), "reaching the limit exactly is allowed: {e}");

    // Settlement: the windows close (idle ticks), pending goes to 0 and the settled balance is
    // the top-up minus the test's own price of what was sent.
    let (v, _) = api.wait_balance("rt-a", &read_a, Duration::from_secs(120), |v| v["pending"] == "0" && v["settled"] != "10").await?;
    assert_eq!((dec(&v, "settled"), dec(&v, "available")), (d("10") - want_pending, d("10") - want_pending), "{v}");
    let (v, _) = api.wait_balance("rt-b", &read_b, Duration::from_secs(60), |v| v["pending"] == "0" && v["settled"] != "0").await?;
    assert_eq!((dec(&v, "settled"), dec(&v, "period_spend")), (-d("1.2"), d("1.2")), "postpaid: owed, {v}");
    let ch = env.clickhouse();
    let revenue: Vec<RevenueRow> =
        ch.query("SELECT tenant, sum(amount) AS amount FROM charges_dedup WHERE kind = 'usage' GROUP BY tenant ORDER BY tenant").fetch_all().await?;
    let revenue: Vec<(String, Decimal)> = revenue.into_iter().map(|r| (r.tenant, meterflow_core::decimal::from_ch_i128(r.amount).normalize())).collect();
    assert_eq!(revenue, vec![("rt-a".to_owned(), d("1.5")), ("rt-b".to_owned(), d("1.2"))]);

    // The soft limit was crossed (1.2 >= 1): one alert on the alerts topic.
    let alerts = env.consume_all(&env.topics().alerts_topic, Duration::from_secs(30)).await?;
    // Every record on the alerts topic is an `alert.v1` Avro record.
    let alerts: Vec<AlertRecord> =
        alerts.iter().map(|(_, _, _, payload)| AlertRecord::from_avro(payload)).collect::<Result<_, _>>()?;
    let soft: Vec<&AlertRecord> = alerts.iter().filter(|a| a.kind == "spend_limit_soft").collect();
    assert!(!soft.is_empty() && soft.iter().all(|a| a.tenant == "rt-b" && a.threshold == Some(Decimal::ONE)), "{soft:?}");

    shutdown.cancel();
    agg.await??;
    rater.await??;
    running.task.await?;
    let _ = std::fs::remove_file(&catalog_path);
    Ok(())
}
