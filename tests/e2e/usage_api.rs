//! Usage API, invoice preview and customer page against the real broker and ClickHouse, with
//! the pipeline in-process and Debian's `chromium` in headless mode:
//! * events sent through the API, then more events into the same (closed) windows, which
//!   restates them: `GET /v1/usage` from the day and hour rollups and from the windows equals
//!   both `meter_totals` (independent SQL) and the test's own sums of the events it sent;
//! * the invoice preview equals the charges table (independent SQL), plus the projected
//!   minimum-commitment true-up, and each line is its exact amount rounded half-to-even;
//! * key isolation: a tenant's key never sees another tenant's usage or invoice and cannot
//!   create portal links; forged and expired links get the 401 page;
//! * the customer page, loaded by headless Chromium, shows the numbers the API returns (usage,
//!   invoice total, settled / pending / available balance), and a
//!   screenshot is saved to target/portal/portal.png.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions: a failed unwrap is a failed run

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meterflow_api::keys::Scope;
use meterflow_core::decimal::from_ch_i128;
use meterflow_core::pricing::{self, Catalog};
use meterflow_testkit::procs::{parse_with_env, service_env, repo_root};
use meterflow_e2e::scenario::now_ms;
use meterflow_e2e::verify;
use meterflow_producer::truth::{Counters, GroundTruth, RunInfo, WindowKey, WindowTotal};
use meterflow_testkit::TestEnv;
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const TENANTS: [&str; 2] = ["tenant-000", "tenant-001"];
const MODELS: [&str; 2] = ["gpt-4o", "llama-70b"];
const REGIONS: [&str; 2] = ["eu", "us"];

/// The events the test sent, folded into windows the way the aggregator must.
#[derive(Default)]
struct Sent {
    windows: BTreeMap<WindowKey, (Decimal, u64)>,
}

impl Sent {
    fn add(&mut self, tenant: &str, meter: &str, dims: &[(&str, &str)], t: i64, value: Decimal) {
        let dims = dims.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let w = self.windows.entry((tenant.to_owned(), meter.to_owned(), dims, t.div_euclid(60_000) * 60_000)).or_default();
        w.0 += value;
        w.1 += 1;
    }

    /// Σ over the windows of `tenant`'s `meter` in `[from, to)` whose dimensions include `filter`.
    fn total(&self, tenant: &str, meter: &str, from: i64, to: i64, filter: &[(&str, &str)]) -> Decimal {
        self.windows
            .iter()
            .filter(|((t, m, _, start), _)| t == tenant && m == meter && (from..to).contains(start))
            .filter(|((_, _, dims, _), _)| filter.iter().all(|(k, v)| dims.get(*k).map(String::as_str) == Some(*v)))
            .map(|(_, (v, _))| *v)
            .sum()
    }

    fn ground_truth(&self, topic: &str) -> GroundTruth {
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
                .map(|((tenant, meter, dims, start), (value, n))| WindowTotal {
                    tenant: tenant.clone(),
                    meter: meter.clone(),
                    aggregation: if meter == "requests" { "count" } else { "sum" }.into(),
                    dimensions: dims.clone(),
                    window_start: *start,
                    window_end: start + 60_000,
                    value: *value,
                    event_count: *n,
                    provider_cost: Decimal::ZERO,
                    uncosted_value: *value,
                    late_events: 0,
                })
                .collect(),
            totals: vec![],
            malformed: vec![],
        }
    }
}

/// A batch of `n` meterflow JSON events for `tenant` (input_tokens and requests), spread over
/// `[t0, t0 + 4 min)`, recorded in `sent`.
fn batch(sent: &mut Sent, tenant: &str, tag: &str, n: usize, t0: i64) -> Value {
    let mut items = Vec::new();
    for i in 0..n {
        let t = t0 + (i as i64 * 7_919) % 240_000;
        let (model, region) = (MODELS[i % 2], REGIONS[(i / 2) % 2]);
        let q = Decimal::new((i as i64 * 131 + tag.len() as i64) % 9_000 + 1, if i % 4 == 0 { 2 } else { 0 });
        items.push(json!({"event_id": format!("{tag}-{i}"), "meter": "input_tokens", "quantity": q.to_string(), "event_time": t,
            "dimensions": {"model": model, "region": region}}));
        sent.add(tenant, "input_tokens", &[("model", model), ("region", region)], t, q);
        items.push(json!({"event_id": format!("{tag}-r{i}"), "meter": "requests", "quantity": "1", "event_time": t, "dimensions": {"model": model}}));
        sent.add(tenant, "requests", &[("model", model)], t, Decimal::ONE);
    }
    Value::Array(items)
}

struct Api {
    base: String,
    c: reqwest::Client,
}

impl Api {
    async fn get(&self, path: &str, key: &str) -> anyhow::Result<(u16, Value)> {
        let r = self.c.get(format!("{}{path}", self.base)).bearer_auth(key).send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    async fn post(&self, path: &str, key: &str, body: Value, idem: Option<&str>) -> anyhow::Result<(u16, Value)> {
        let mut r = self.c.post(format!("{}{path}", self.base)).bearer_auth(key).header("content-type", "application/json");
        if let Some(i) = idem {
            r = r.header("idempotency-key", i);
        }
        let r = r.body(body.to_string()).send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    async fn usage(&self, key: &str, query: &str) -> anyhow::Result<Value> {
        let (s, v) = self.get(&format!("/v1/usage?{query}"), key).await?;
        anyhow::ensure!(s == 200, "usage {query}: {s} {v}");
        Ok(v)
    }
}

fn dec(v: &Value) -> Decimal {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a decimal string: {v}"))
}

fn rfc(ms: i64) -> String {
    meterflow_api::usage::rfc3339(ms)
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct TotalRow {
    total: i128,
}

/// `meter_totals`, read with plain SQL: Σ of the windows' latest values.
async fn meter_totals(ch: &clickhouse::Client, tenant: &str, meter: &str, from: i64, to: i64) -> anyhow::Result<Decimal> {
    let r: TotalRow = ch
        .query("SELECT sum(value) AS total FROM meter_totals WHERE tenant = ? AND meter = ? AND window_start >= toDateTime(?) AND window_start < toDateTime(?)")
        .bind(tenant)
        .bind(meter)
        .bind(from / 1000)
        .bind(to / 1000)
        .fetch_one()
        .await?;
    Ok(from_ch_i128(r.total))
}

/// The API, the aggregator and the rater in-process on one test environment, and the keys.
struct World {
    env: TestEnv,
    ch: clickhouse::Client,
    api: Api,
    ingest: BTreeMap<&'static str, String>,
    read: BTreeMap<&'static str, String>,
    admin: String,
    services: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    shutdown: CancellationToken,
}

impl World {
    async fn start(shutdown: CancellationToken) -> anyhow::Result<Self> {
        let env = TestEnv::new("usage_api").await?;
        let root = repo_root();
        let meters = root.join("config/meters.toml").display().to_string();
        let catalog = root.join("config/catalog.toml").display().to_string();
        let (mut ingest, mut read) = (BTreeMap::new(), BTreeMap::new());
        for t in TENANTS {
            ingest.insert(t, meterflow_admin::keys::create(env.clickhouse_args(), t, Scope::Ingest).await?.1);
            read.insert(t, meterflow_admin::keys::create(env.clickhouse_args(), t, Scope::Read).await?.1);
        }
        let admin = meterflow_admin::keys::create(env.clickhouse_args(), "ops", Scope::Admin).await?.1;
        let with = |extra: &[(&str, &str)]| {
            let mut e = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
            e.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
            e
        };
        let api_cfg: meterflow_api::Config = parse_with_env(&with(&[
            ("METERFLOW_API_HTTP_ADDR", "127.0.0.1:0"),
            ("METERFLOW_METERS", &meters),
            ("METERFLOW_CATALOG", &catalog),
            ("METERFLOW_API_KEY_REFRESH", "500ms"),
        ]))?;
        let running = meterflow_api::start(api_cfg, shutdown.clone()).await?;
        let api = Api { base: format!("http://{}", running.addr), c: reqwest::Client::new() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while api.c.get(format!("{}/readyz", api.base)).send().await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
            anyhow::ensure!(Instant::now() < deadline, "meterflow-api not ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let agg = parse_with_env(&with(&[
            ("METERFLOW_AGGREGATOR_GROUP", "agg"),
            ("METERFLOW_AGGREGATOR_HTTP_ADDR", "127.0.0.1:0"),
            ("METERFLOW_METERS", &meters),
            ("METERFLOW_IDLE_TIMEOUT", "1s"),
        ]))?;
        let rater = parse_with_env(&with(&[("METERFLOW_RATER_GROUP", "rater"), ("METERFLOW_RATER_HTTP_ADDR", "127.0.0.1:0"), ("METERFLOW_CATALOG", &catalog)]))?;
        let services = vec![tokio::spawn(meterflow_aggregator::run(agg, shutdown.clone())), tokio::spawn(meterflow_rater::run(rater, shutdown.clone()))];
        let ch = env.clickhouse();
        Ok(Self { env, ch, api, ingest, read, admin, services, shutdown })
    }

    fn alive(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.services.iter().all(|s| !s.is_finished()), "a service stopped by itself");
        Ok(())
    }

    /// Events 40 minutes back, then more into the same windows once they closed
    /// (restatements), each round waited for until the windows are exact.
    async fn send_two_rounds(&self, t0: i64) -> anyhow::Result<Sent> {
        let mut sent = Sent::default();
        let topic = &self.env.topics().usage_topic;
        for round in ["a", "b"] {
            for (i, t) in TENANTS.iter().enumerate() {
                let body = batch(&mut sent, t, &format!("{round}{i}"), 150 + 50 * i, t0);
                let (s, v) = self.api.post("/v1/events", &self.ingest[t], body, None).await?;
                anyhow::ensure!(s == 202 && v["rejected"] == 0, "ingest: {s} {v}");
            }
            meterflow_e2e::scenario::wait_until_exact(&self.ch, &sent.ground_truth(topic), topic, Duration::from_secs(180), || self.alive()).await?;
        }
        let restated: u64 = self.ch.query("SELECT count() FROM meter_aggregates WHERE revision > 0").fetch_one().await?;
        anyhow::ensure!(restated > 0, "the second round must restate closed windows");
        Ok(sent)
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for s in self.services {
            s.await??;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_invoice_and_customer_page_are_exact_and_isolated() -> anyhow::Result<()> {
    meterflow_e2e::scenario::init_test_logging();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let w = World::start(shutdown).await?;
    let t0 = (now_ms() - 40 * 60_000).div_euclid(60_000) * 60_000;
    let sent = w.send_two_rounds(t0).await?;
    let (from, to) = (pricing::period_start(t0), pricing::period_end(t0));
    check_usage(&w, &sent, t0, from, to).await?;

    // Invoice preview = the charges table, once the rater priced every window.
    let catalog_path = repo_root().join("config/catalog.toml");
    let catalog = Catalog::from_toml_str(&std::fs::read_to_string(&catalog_path)?)?;
    let gt = sent.ground_truth(&w.env.topics().usage_topic);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !verify::charges(&w.ch, &gt, &catalog).await?.ok() {
        anyhow::ensure!(Instant::now() < deadline, "charges did not match the windows");
        w.alive()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let period = &rfc(from)[..7];
    let mut invoices = BTreeMap::new();
    for t in TENANTS {
        let (s, inv) = w.api.get(&format!("/v1/customers/{t}/invoice?period={period}"), &w.read[t]).await?;
        assert_eq!(s, 200, "{inv}");
        check_invoice(&w.ch, &catalog, t, from, &inv).await?;
        invoices.insert(t, inv);
    }
    check_isolation(&w, from, to).await?;
    let balance = top_up_and_wait(&w, from).await?;
    let total = (pricing::period_start(now_ms()) == from).then(|| invoices["tenant-000"]["totals"][0]["total"].clone());
    check_page(&w, &balance, total).await?;
    w.stop().await
}

/// `GET /v1/usage` from the day rollup, the hour rollup and the windows, against
/// `meter_totals` and the test's own sums of the events it sent.
async fn check_usage(w: &World, sent: &Sent, t0: i64, from: i64, to: i64) -> anyhow::Result<()> {
    let range = format!("from={}&to={}", rfc(from), rfc(to));
    for t in TENANTS {
        for meter in ["input_tokens", "requests"] {
            let v = w.api.usage(&w.read[t], &format!("meter={meter}&{range}&window_size=month")).await?;
            assert_eq!(v["source"], "usage_rollup_day", "{v}");
            assert_eq!(v["data"].as_array().map(Vec::len), Some(1), "{v}");
            let got = dec(&v["data"][0]["value"]);
            assert_eq!(got, meter_totals(&w.ch, t, meter, from, to).await?, "{t} {meter} vs meter_totals");
            assert_eq!(got, sent.total(t, meter, from, to, &[]), "{t} {meter} vs the events sent");
        }
        let v = w.api.usage(&w.read[t], &format!("meter=input_tokens&{range}&window_size=hour&group_by=model")).await?;
        assert_eq!(v["source"], "usage_rollup_hour");
        for p in v["data"].as_array().unwrap() {
            let start = pricing::parse_rfc3339_ms(p["window_start"].as_str().unwrap()).unwrap();
            let model = p["dimensions"]["model"].as_str().unwrap();
            assert_eq!(dec(&p["value"]), sent.total(t, "input_tokens", start, start + 3_600_000, &[("model", model)]), "{p}");
        }
        let minutes = format!("from={}&to={}", rfc(t0), rfc(t0 + 5 * 60_000));
        let v = w.api.usage(&w.read[t], &format!("meter=input_tokens&{minutes}&window_size=minute&group_by=region,model")).await?;
        assert_eq!(v["source"], "meter_totals");
        let points = v["data"].as_array().unwrap();
        assert_eq!(points.len(), sent.windows.keys().filter(|(tt, m, _, _)| tt == t && m == "input_tokens").count());
        for p in points {
            let start = pricing::parse_rfc3339_ms(p["window_start"].as_str().unwrap()).unwrap();
            let dims = [("model", p["dimensions"]["model"].as_str().unwrap()), ("region", p["dimensions"]["region"].as_str().unwrap())];
            assert_eq!(dec(&p["value"]), sent.total(t, "input_tokens", start, start + 60_000, &dims), "{p}");
        }
    }
    let (s, v) = w.api.get(&format!("/v1/usage?meter=input_tokens&{range}&group_by=gpu"), &w.read["tenant-000"]).await?;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_request")), "{v}");
    Ok(())
}

/// A tenant's key never sees another tenant's usage or invoice and creates no portal link;
/// an admin key names the tenant.
async fn check_isolation(w: &World, from: i64, to: i64) -> anyhow::Result<()> {
    let range = format!("from={}&to={}", rfc(from), rfc(to));
    let mine = &w.read["tenant-000"];
    let (s, _) = w.api.get(&format!("/v1/usage?meter=requests&{range}&tenant=tenant-001"), mine).await?;
    assert_eq!(s, 403);
    let (s, _) = w.api.get(&format!("/v1/customers/tenant-001/invoice?period={}", &rfc(from)[..7]), mine).await?;
    assert_eq!(s, 403);
    let own = w.api.usage(mine, &format!("meter=requests&{range}&window_size=month")).await?;
    assert_eq!(own["tenant"], "tenant-000", "a tenant key without tenant= sees its own");
    for key in [mine, &w.ingest["tenant-000"]] {
        let (s, _) = w.api.post("/v1/portal/tokens", key, json!({"tenant": "tenant-000"}), None).await?;
        assert_eq!(s, 403, "only admin keys create portal links");
    }
    let (s, _) = w.api.get(&format!("/v1/usage?meter=requests&{range}"), &w.admin).await?;
    assert_eq!(s, 400, "an admin key must name the tenant");
    let (s, _) = w.api.get(&format!("/v1/usage?meter=requests&{range}&tenant=tenant-001"), &w.admin).await?;
    assert_eq!(s, 200);
    Ok(())
}

/// Tops tenant-000 up by 250 and waits until its wallet and its real-time balance saw every
/// charge; returns `GET /v1/customers/tenant-000/balance` then.
async fn top_up_and_wait(w: &World, period: i64) -> anyhow::Result<Value> {
    let (s, v) = w.api.post("/v1/wallets/tenant-000/adjustments", &w.admin, json!({"amount": "250", "currency": "USD"}), Some("portal-top-up")).await?;
    assert_eq!(s, 201, "{v}");
    let charged = charges_sum(&w.ch, "tenant-000", period).await?;
    let want = (Decimal::from(250) - charged).normalize();
    let num = |v: &Value| v.as_str().and_then(|s| s.parse::<Decimal>().ok()).map(|d| d.normalize());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, wallet) = w.api.get("/v1/wallets/tenant-000", &w.read["tenant-000"]).await?;
        let (_, b) = w.api.get("/v1/customers/tenant-000/balance", &w.read["tenant-000"]).await?;
        if num(&wallet[0]["balance"]) == Some(want) && num(&b["settled"]) == Some(want) && num(&b["pending"]) == Some(Decimal::ZERO) {
            return Ok(b);
        }
        anyhow::ensure!(Instant::now() < deadline, "wallet {wallet} / balance {b}: settled != 250 - {charged} or pending left");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The customer page: links (plain HTTP, forged, expired), then headless Chromium: the DOM
/// shows the API's numbers, and a screenshot is saved.
async fn check_page(w: &World, balance: &Value, invoice_total: Option<Value>) -> anyhow::Result<()> {
    let (s, tok) = w.api.post("/v1/portal/tokens", &w.admin, json!({"tenant": "tenant-000", "ttl": "10m"}), None).await?;
    assert_eq!(s, 201, "{tok}");
    let url = format!("{}{}", w.api.base, tok["url"].as_str().unwrap());
    check_links(&w.api, &w.admin, &url).await?;
    let dom = chromium(&["--dump-dom", &url]).await?;
    let month = pricing::period_start(now_ms());
    for meter in ["input_tokens", "requests"] {
        let q = format!("meter={meter}&from={}&to={}&window_size=month", rfc(month), rfc(pricing::period_end(month)));
        let v = w.api.usage(&w.read["tenant-000"], &q).await?;
        let want = v["data"].get(0).map_or_else(|| "0".to_owned(), |p| p["value"].as_str().unwrap().to_owned());
        assert_eq!(attr(&dom, &format!("data-usage-total=\"{meter}\"")), Some(want.as_str()), "usage of {meter} on the page");
    }
    if let Some(total) = invoice_total {
        assert_eq!(attr(&dom, "data-invoice-total=\"USD\""), total.as_str(), "invoice total on the page");
    }
    for (field, attribute) in [("settled", "data-balance"), ("pending", "data-pending"), ("available", "data-available")] {
        let on_page = attr(&dom, &format!("{attribute}=\"USD\"")).map(|b| dec(&json!(b)));
        assert_eq!(on_page, Some(dec(&balance[field])), "{field} on the page: {balance}");
    }
    assert!(dom.contains("<svg") && dom.contains("class=\"bar\""), "the chart is rendered");
    assert!(!dom.contains("tenant-001"), "nothing of another tenant on the page");
    let png = repo_root().join("target/portal/portal.png");
    std::fs::create_dir_all(png.parent().unwrap())?;
    let _ = std::fs::remove_file(&png);
    chromium(&[&format!("--screenshot={}", png.display()), "--window-size=1000,1600", "--hide-scrollbars", &url]).await?;
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(size > 20_000, "screenshot {} has {size} bytes", png.display());
    Ok(())
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct SumRow {
    kind: String,
    total: i128,
}

/// Σ of the tenant's charges in the period, by kind, straight from the charges table.
async fn charges_by_kind(ch: &clickhouse::Client, tenant: &str, period: i64) -> anyhow::Result<BTreeMap<String, Decimal>> {
    let rows: Vec<SumRow> = ch
        .query("SELECT kind, sum(amount) AS total FROM charges_dedup WHERE tenant = ? AND period_start = toDateTime(?) GROUP BY kind")
        .bind(tenant)
        .bind(period / 1000)
        .fetch_all()
        .await?;
    Ok(rows.into_iter().map(|r| (r.kind, from_ch_i128(r.total))).collect())
}

async fn charges_sum(ch: &clickhouse::Client, tenant: &str, period: i64) -> anyhow::Result<Decimal> {
    Ok(charges_by_kind(ch, tenant, period).await?.values().copied().sum())
}

/// The preview against the charges table: exact total = Σ charges (+ the projected true-up
/// of an unclosed period), lines = their exact amounts rounded half-to-even, total = Σ lines.
async fn check_invoice(ch: &clickhouse::Client, catalog: &Catalog, tenant: &str, period: i64, inv: &Value) -> anyhow::Result<()> {
    let by_kind = charges_by_kind(ch, tenant, period).await?;
    let usage = by_kind.get("usage").copied().unwrap_or_default();
    assert!(usage > Decimal::ZERO, "{tenant} was charged");
    let commitment = catalog.commitments(tenant, period).get("USD").map(|c| c.amount);
    let projected = match by_kind.get("true_up") {
        Some(_) => Decimal::ZERO,
        None => commitment.map_or(Decimal::ZERO, |c| (c - usage).max(Decimal::ZERO)),
    };
    let total = &inv["totals"][0];
    assert_eq!(dec(&total["total_exact"]), by_kind.values().copied().sum::<Decimal>() + projected, "{tenant}: {inv}");
    let half_even = |d: Decimal| d.round_dp_with_strategy(2, RoundingStrategy::MidpointNearestEven);
    let mut lines = Decimal::ZERO;
    let mut exact = Decimal::ZERO;
    for l in inv["lines"].as_array().unwrap() {
        assert_eq!(dec(&l["amount"]), half_even(dec(&l["amount_exact"])), "{l}");
        lines += dec(&l["amount"]);
        exact += dec(&l["amount_exact"]);
        assert!(l["price"].is_string() && l["quantity"].is_string(), "{l}");
    }
    assert_eq!(exact, usage, "{tenant}: lines = the usage charges");
    assert_eq!(dec(&total["usage"]), lines);
    assert_eq!(dec(&total["total"]), lines + dec(&total["true_up"]));
    if commitment.is_some() && !by_kind.contains_key("true_up") {
        assert_eq!(inv["true_ups"][0]["status"], "projected", "{inv}");
        assert_eq!(dec(&total["true_up"]), half_even(projected));
    }
    Ok(())
}

/// The page over plain HTTP, and forged and expired links.
async fn check_links(api: &Api, admin: &str, url: &str) -> anyhow::Result<()> {
    let r = api.c.get(url).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-security-policy"].to_str()?.contains("default-src 'none'"));
    assert!(r.text().await?.contains("data-tenant"));
    // Another tenant's name under this token's tag.
    let forged = url.replace("74656e616e742d303030", "74656e616e742d303031");
    assert_ne!(forged, url);
    let r = api.c.get(&forged).send().await?;
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.text().await?.contains("not valid"));
    let (s, short) = api.post("/v1/portal/tokens", admin, json!({"tenant": "tenant-000", "ttl": "1s"}), None).await?;
    assert_eq!(s, 201);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let r = api.c.get(format!("{}{}", api.base, short["url"].as_str().unwrap())).send().await?;
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.text().await?.contains("expired"));
    let (s, _) = api.post("/v1/portal/tokens", admin, json!({"tenant": "tenant-000", "ttl": "48h"}), None).await?;
    assert_eq!(s, 400, "links live 24 h at most");
    Ok(())
}

/// The text right after `attr` (`...attr>TEXT<`) in the DOM.
fn attr<'a>(dom: &'a str, attr: &str) -> Option<&'a str> {
    let rest = &dom[dom.find(attr)? + attr.len()..];
    let rest = &rest[rest.find('>')? + 1..];
    Some(&rest[..rest.find('<')?])
}

/// Runs headless Chromium (`METERFLOW_CHROMIUM`, default `chromium`) and returns its stdout.
async fn chromium(args: &[&str]) -> anyhow::Result<String> {
    let bin = std::env::var("METERFLOW_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let profile = std::env::temp_dir().join(format!("meterflow-chromium-{}", std::process::id()));
    let mut cmd = tokio::process::Command::new(&bin);
    // --no-sandbox: CI runs as root, where Chromium refuses its sandbox.
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("{bin} did not finish in 90 s"))?
        .map_err(|e| anyhow::anyhow!("cannot run {bin} ({e}): install Debian's chromium (deploy/local/install.sh)"))?;
    anyhow::ensure!(out.status.success(), "{bin} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A window revision of `tenant`'s `requests` (count by model) as the aggregator writes it.
fn revision(tenant: &str, start: i64, revision: i32, value: i64, previous: i64, seq: i64) -> anyhow::Result<meterflow_aggregator::rows::AggregateRow> {
    let agg = meterflow_core::records::MeterAggregate {
        tenant: tenant.into(),
        meter: "requests".into(),
        aggregation: "count".into(),
        dimensions: BTreeMap::from([("model".to_owned(), "gpt-4o".to_owned())]),
        window_start: start,
        window_end: start + 60_000,
        revision,
        value: Decimal::from(value),
        previous_value: Decimal::from(previous),
        event_count: value,
        provider_cost: Decimal::ZERO,
        previous_provider_cost: Decimal::ZERO,
        source_partition: 0,
        seq,
        emitted_at: start + 60_000,
        uncosted_value: None,
        previous_uncosted_value: None,
    };
    Ok(meterflow_aggregator::rows::AggregateRow::try_from(&agg)?)
}

/// What an aggregator replay does to the rollups (the same revisions inserted again: folded by
/// meter_aggregates, added again by the views), and that `meterflow-admin rollups --repair`
/// puts them back to the windows' latest values, after which a check finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_revisions_overcount_rollups_until_repaired() -> anyhow::Result<()> {
    use meterflow_admin::rollups::{self, RollupsCmd};
    let env = TestEnv::new("usage_repair").await?;
    let ch = env.clickhouse();
    let t0 = pricing::period_start(now_ms()) + 3_600_000;
    // Two windows, the second restated (4 -> 6); then the replay re-inserts all three rows.
    let rows = vec![revision("acme", t0, 0, 5, 0, 1)?, revision("acme", t0 + 60_000, 0, 4, 0, 2)?, revision("acme", t0 + 60_000, 1, 6, 4, 3)?];
    for _ in 0..2 {
        let mut insert = ch.insert::<meterflow_aggregator::rows::AggregateRow>("meter_aggregates").await?;
        for r in &rows {
            insert.write(r).await?;
        }
        insert.end().await?;
    }
    let (from, to) = (pricing::period_start(t0), pricing::period_end(t0));
    assert_eq!(meter_totals(&ch, "acme", "requests", from, to).await?, Decimal::from(11), "meter_aggregates folds the replay");
    let cmd = |repair| RollupsCmd { clickhouse: env.clickhouse_args().clone(), repair, from: None, to: None, tenant: Some("acme".into()) };
    let drifts = rollups::check(&ch, &cmd(false)).await?;
    // One hour bucket and one day bucket, each counted twice: 22 instead of 11.
    assert_eq!(drifts.len(), 2, "{drifts:?}");
    for d in &drifts {
        assert_eq!((d.expected, d.actual), (Decimal::from(11), Decimal::from(22)), "{d:?}");
    }
    assert_eq!(rollups::check(&ch, &cmd(true)).await?.len(), 2, "repair reports what it corrects");
    assert!(rollups::check(&ch, &cmd(false)).await?.is_empty(), "nothing left after the repair");
    assert!(rollups::check(&ch, &cmd(true)).await?.is_empty(), "a second repair inserts nothing");
    #[derive(Debug, clickhouse::Row, serde::Deserialize)]
    struct Sum {
        v: i128,
    }
    for table in ["usage_rollup_hour", "usage_rollup_day"] {
        let s: Sum = ch.query(&format!("SELECT sum(value) AS v FROM {table} WHERE tenant = 'acme'")).fetch_one().await?;
        assert_eq!(from_ch_i128(s.v), Decimal::from(11), "{table}");
    }
    Ok(())
}
