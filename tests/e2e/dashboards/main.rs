//! Every panel of every Grafana dashboard (deploy/grafana/dashboards/*.json) returns data for a
//! real pipeline run: a short workload goes through the aggregator and the rater in-process,
//! Debian's Prometheus scrapes them every second, and then each ClickHouse panel query (Grafana
//! macros expanded for the run's time range, on the test's database) and each PromQL panel
//! query (`/api/v1/query_range`) must succeed with a non-empty result. Failures name the
//! dashboard, the panel and the query.
//!
//! Needs `make up` (broker, ClickHouse) and the `prometheus` binary (`deploy/local/install.sh
//! prometheus`); the test starts its own Prometheus on a free port.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use meterflow_core::records::{AvroRecord, WalletAdjustment};
use meterflow_testkit::http::{free_port, get, get_ok};
use meterflow_testkit::procs::{parse_with_env, repo_root, service_env, ServiceProc};
use meterflow_e2e::scenario::{meters, now_ms, produce};
use meterflow_producer::{EventTimeMode, GenerateConfig};
use meterflow_testkit::TestEnv;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

mod macros;
use macros::{expand_promql, expand_sql, Range};

const EVENTS: u64 = 4_000;
const TENANTS: usize = 20;
/// Event times are spread over the half hour before the test starts.
const SPAN_MS: i64 = 30 * 60_000;
/// Prometheus scrape interval (also Grafana's `timeInterval` for the data source).
pub(crate) const SCRAPE_S: u64 = 1;
const CH_TYPE: &str = "grafana-clickhouse-datasource";
const PROM_TYPE: &str = "prometheus";

fn now_s() -> i64 {
    now_ms() / 1000
}

// ---------------------------------------------------------------------------------------------
// dashboards

/// One query of one panel.
#[derive(Debug, Clone)]
struct Target {
    dashboard: String,
    panel: String,
    ref_id: String,
    kind: Kind,
    /// rawSql or expr, as in the JSON.
    query: String,
    /// The panel's minimum interval in seconds (`interval`, e.g. "1m"), 0 if none.
    min_interval_s: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ClickHouse,
    Prometheus,
}

impl Target {
    fn name(&self) -> String {
        format!("dashboard {:?}, panel {:?}, query {}", self.dashboard, self.panel, self.ref_id)
    }
}

fn parse_interval(s: &str) -> anyhow::Result<i64> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n.parse().with_context(|| format!("interval {s:?}"))?;
    Ok(n * match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        _ => bail!("interval {s:?}: unknown unit"),
    })
}

fn dashboards_dir() -> PathBuf {
    repo_root().join("deploy/grafana/dashboards")
}

/// Every query target of every panel of every dashboard.
fn load_targets() -> anyhow::Result<(Vec<Target>, usize)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_dir())
        .with_context(|| format!("reading {}", dashboards_dir().display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "no dashboards in {}", dashboards_dir().display());
    let mut targets = Vec::new();
    let mut panels = 0;
    for file in &files {
        let board: Value = serde_json::from_str(&std::fs::read_to_string(file)?).with_context(|| format!("parsing {}", file.display()))?;
        let title = board["title"].as_str().unwrap_or_default().to_owned();
        let all = board["panels"].as_array().with_context(|| format!("{}: no panels", file.display()))?;
        // Rows are expanded: a collapsed row would keep its panels in `panels` of the row.
        let nested = all.iter().flat_map(|p| p["panels"].as_array().cloned().unwrap_or_default());
        for panel in all.iter().cloned().chain(nested) {
            if panel["type"] == "row" {
                continue;
            }
            panels += 1;
            let ptitle = panel["title"].as_str().unwrap_or_default().to_owned();
            let ts = panel["targets"].as_array().cloned().unwrap_or_default();
            ensure!(!ts.is_empty(), "dashboard {title:?}, panel {ptitle:?}: no queries");
            let min_interval_s = match panel["interval"].as_str() {
                Some(s) => parse_interval(s)?,
                None => 0,
            };
            for t in ts {
                let ds = if t["datasource"].is_object() { &t["datasource"] } else { &panel["datasource"] };
                let (kind, query) = match ds["type"].as_str() {
                    Some(CH_TYPE) => (Kind::ClickHouse, t["rawSql"].as_str()),
                    Some(PROM_TYPE) => (Kind::Prometheus, t["expr"].as_str()),
                    other => bail!("dashboard {title:?}, panel {ptitle:?}: unknown data source type {other:?}"),
                };
                targets.push(Target {
                    dashboard: title.clone(),
                    panel: ptitle.clone(),
                    ref_id: t["refId"].as_str().unwrap_or("?").to_owned(),
                    kind,
                    query: query.with_context(|| format!("dashboard {title:?}, panel {ptitle:?}: target without a query"))?.to_owned(),
                    min_interval_s,
                });
            }
        }
    }
    Ok((targets, panels))
}

/// Metric names the services declare (services/*/src/metrics.rs): a PromQL typo would
/// otherwise hide behind `or on() vector(0)`.
fn declared_metrics() -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for svc in std::fs::read_dir(repo_root().join("services"))? {
        let path = svc?.path().join("src/metrics.rs");
        if let Ok(text) = std::fs::read_to_string(&path) {
            for part in text.split('"').skip(1).step_by(2) {
                if part.starts_with("meterflow_") && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
                    names.insert(part.to_owned());
                }
            }
        }
    }
    Ok(names)
}

fn metric_names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(off) = expr[i..].find("meterflow_") {
        let start = i + off;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_') {
            out.push(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Prometheus

/// Debian's Prometheus in a temporary directory, killed on drop.
struct Prometheus {
    proc: ServiceProc,
    dir: PathBuf,
    port: u16,
}

impl Prometheus {
    fn start(targets: &[(&str, u16)]) -> anyhow::Result<Self> {
        let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("no prometheus binary (/usr/bin/prometheus); install it with `deploy/local/install.sh prometheus`")?;
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("meterflow-dashboards-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(dir.join("data"))?;
        let mut cfg = format!("global:\n  scrape_interval: {SCRAPE_S}s\n  scrape_timeout: {SCRAPE_S}s\n  evaluation_interval: {SCRAPE_S}s\nscrape_configs:\n");
        for (job, p) in targets {
            cfg.push_str(&format!("  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{p}']\n"));
        }
        std::fs::write(dir.join("prometheus.yml"), cfg)?;
        let args = vec![
            format!("--config.file={}", dir.join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--storage.tsdb.retention.time=1h".to_owned(),
        ];
        let mut proc = ServiceProc::program("prometheus", bin, args, dir.clone(), dir.join("prometheus.log"));
        proc.start()?;
        Ok(Self { proc, dir, port })
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<String> {
        Ok(reqwest::Url::parse_with_params(&format!("http://127.0.0.1:{}{path}", self.port), query)?.into())
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let url = self.url("/-/ready", &[])?;
        self.proc.wait_ready(&url, timeout).await
    }

    /// `/api/v1/query_range`; returns the `data.result` array.
    async fn query_range(&self, expr: &str, range: Range, step_s: i64) -> anyhow::Result<Vec<Value>> {
        let (from, to, step) = (range.from_s.to_string(), range.to_s.to_string(), step_s.to_string());
        let url = self.url("/api/v1/query_range", &[("query", expr), ("start", &from), ("end", &to), ("step", &step)])?;
        let (status, body) = get(&url).await?;
        let v: Value = serde_json::from_str(&body).with_context(|| format!("HTTP {status}, not JSON: {body}"))?;
        ensure!(v["status"] == "success", "HTTP {status}: {} {}", v["errorType"], v["error"]);
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Completed scrapes of `job` so far.
    async fn scrapes(&self, job: &str) -> anyhow::Result<usize> {
        let url = self.url("/api/v1/query", &[("query", &format!("count_over_time(up{{job=\"{job}\"}}[1h])"))])?;
        let v: Value = serde_json::from_str(&get_ok(&url).await?)?;
        Ok(v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0) as usize)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.proc.kill9();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// result checks

fn is_meaningful(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0 && f.is_finite()),
        Value::String(s) => !s.is_empty() && s != "0" && s != "nan" && s != "0000-00-00 00:00:00" && !s.starts_with("1970-01-01"),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Runs one ClickHouse query (JSONCompact); returns the rows.
async fn clickhouse_rows(ch: &clickhouse::Client, sql: &str) -> anyhow::Result<Vec<Value>> {
    let bytes = ch.query_raw(sql).fetch_bytes("JSONCompact")?.collect().await?;
    let v: Value = serde_json::from_slice(&bytes).with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&bytes)))?;
    Ok(v["data"].as_array().cloned().unwrap_or_default())
}

async fn run_target(t: &Target, range: Range, ch: &clickhouse::Client, prom: &Prometheus) -> Result<(), String> {
    let interval_s = range.interval_s(t.min_interval_s);
    match t.kind {
        Kind::ClickHouse => {
            let sql = expand_sql(&t.query, range, interval_s).map_err(|e| format!("{e:#}\n{}", t.query))?;
            let rows = clickhouse_rows(ch, &sql).await.map_err(|e| format!("ClickHouse error: {e:#}\n{sql}"))?;
            if rows.is_empty() {
                return Err(format!("empty result\n{sql}"));
            }
            if !rows.iter().any(|r| r.as_array().is_some_and(|cells| cells.iter().any(is_meaningful))) {
                return Err(format!("only zeros/empty values in {} row(s): {}\n{sql}", rows.len(), Value::Array(rows)));
            }
            Ok(())
        }
        Kind::Prometheus => {
            let expr = expand_promql(&t.query, interval_s).map_err(|e| format!("{e:#}"))?;
            let series = prom.query_range(&expr, range, interval_s).await.map_err(|e| format!("Prometheus error: {e:#}\n{expr}"))?;
            if series.is_empty() {
                return Err(format!("empty result\n{expr}"));
            }
            let finite = series.iter().flat_map(|s| s["values"].as_array().cloned().unwrap_or_default()).any(|p| {
                p[1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(f64::is_finite)
            });
            if !finite {
                return Err(format!("{} series, but no finite sample\n{expr}", series.len()));
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the pipeline run

/// Wallets for every tenant, each topped up to just above the low-balance threshold (1 USD):
/// the first priced charge crosses it, so low_balance alerts (and the alerts metric) appear.
async fn publish_wallets(env: &TestEnv) -> anyhow::Result<usize> {
    let producer: FutureProducer = meterflow_runtime::kafka::producer_config(env.kafka_args())?.create()?;
    for t in 0..TENANTS {
        let a = WalletAdjustment {
            idempotency_key: format!("dash_top_up_{t}"),
            tenant: format!("tenant-{t:03}"),
            currency: "USD".into(),
            amount: Decimal::new(1_000_000_001, 9),
            kind: "top_up".into(),
            reason: "dashboard test".into(),
            created_at: now_ms(),
            expires_at: None,
            priority: 0,
        };
        let payload = a.to_avro()?;
        producer
            .send(FutureRecord::to(&env.topics().wallet_topic).key(&a.tenant).payload(&payload), Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
    }
    // Promotional credit (burned first: priority 1), for the revenue-recognition panels.
    let promo = WalletAdjustment {
        idempotency_key: "dash_promo_0".into(),
        tenant: "tenant-000".into(),
        currency: "USD".into(),
        amount: Decimal::new(5, 0),
        kind: "promotional".into(),
        reason: "dashboard test".into(),
        created_at: now_ms(),
        expires_at: None,
        priority: 1,
    };
    producer
        .send(FutureRecord::to(&env.topics().wallet_topic).key(&promo.tenant).payload(&promo.to_avro()?), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)?;
    Ok(TENANTS + 1)
}

fn workload(start_ms: i64) -> anyhow::Result<GenerateConfig> {
    let mut cfg = GenerateConfig::new(meters()?);
    cfg.events = Some(EVENTS);
    cfg.seed = 20_261_126;
    cfg.tenants = TENANTS;
    cfg.duplicate_rate = 0.10;
    cfg.late_rate = 0.05;
    cfg.malformed_rate = 0.02;
    cfg.too_late_rate = 0.005;
    cfg.event_time = EventTimeMode::Simulated { start_ms, span_ms: SPAN_MS };
    // Spread over ~10 s of wall clock, so that the services flush, insert and checkpoint
    // across many scrapes (rates and quantiles need increments between two samples).
    cfg.rate = EVENTS as f64 / 10.0;
    Ok(cfg)
}

async fn scalar(ch: &clickhouse::Client, sql: &str) -> anyhow::Result<u64> {
    ch.query_raw(sql).fetch_one::<u64>().await.with_context(|| sql.to_owned())
}

async fn wait_for<F>(what: &str, timeout: Duration, mut alive: impl FnMut() -> anyhow::Result<()>, mut ok: F) -> anyhow::Result<()>
where
    F: AsyncFnMut() -> anyhow::Result<bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        alive()?;
        if ok().await? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn env_with(env: &TestEnv, extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut e = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
    e.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    e
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_returns_data() -> anyhow::Result<()> {
    // The dashboards first: a broken JSON file fails before any service starts.
    let (targets, panels) = load_targets()?;
    let metrics = declared_metrics()?;
    for t in targets.iter().filter(|t| t.kind == Kind::Prometheus) {
        for m in metric_names_in(&t.query) {
            let base = m.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            ensure!(metrics.contains(&m) || metrics.contains(base), "{}: metric {m} is not declared in services/*/src/metrics.rs", t.name());
        }
    }

    let env = TestEnv::with_partitions("dashboards", 2).await?;
    let root = repo_root();
    let (agg_port, rater_port) = (free_port()?, free_port()?);
    let mut prom = Prometheus::start(&[("aggregator", agg_port), ("rater", rater_port)])?;
    prom.wait_ready(Duration::from_secs(60)).await?;

    let shutdown = CancellationToken::new();
    let rater_cfg = parse_with_env(&env_with(&env, &[
        ("METERFLOW_RATER_GROUP", "dash-rater".into()),
        ("METERFLOW_RATER_HTTP_ADDR", format!("127.0.0.1:{rater_port}")),
        ("METERFLOW_CATALOG", path_str(&root.join("config/catalog.toml"))),
        ("METERFLOW_LOW_BALANCE", "USD=1".into()),
        ("METERFLOW_CHECKPOINT_INTERVAL", "2s".into()),
    ]))?;
    let agg_cfg = parse_with_env(&env_with(&env, &[
        ("METERFLOW_AGGREGATOR_GROUP", "dash-agg".into()),
        ("METERFLOW_AGGREGATOR_HTTP_ADDR", format!("127.0.0.1:{agg_port}")),
        ("METERFLOW_METERS", path_str(&root.join("config/meters.toml"))),
        ("METERFLOW_IDLE_TIMEOUT", "1s".into()),
        ("METERFLOW_CHECKPOINT_INTERVAL", "2s".into()),
    ]))?;
    let ch = env.clickhouse();

    // Wallets first, and the rater has applied them before any aggregate exists.
    let wallets = publish_wallets(&env).await?;
    let rater = tokio::spawn(meterflow_rater::run(rater_cfg, shutdown.clone()));
    let alive_r = |r: &tokio::task::JoinHandle<anyhow::Result<()>>| {
        ensure!(!r.is_finished(), "the rater stopped by itself");
        Ok(())
    };
    wait_for("the rater to apply the wallet top-ups", Duration::from_secs(90), || alive_r(&rater), async || {
        Ok(scalar(&ch, "SELECT count() FROM wallet_adjustments").await? >= wallets as u64)
    })
    .await?;

    let agg = tokio::spawn(meterflow_aggregator::run(agg_cfg, shutdown.clone()));
    let alive = |a: &tokio::task::JoinHandle<anyhow::Result<()>>, r: &tokio::task::JoinHandle<anyhow::Result<()>>| {
        ensure!(!a.is_finished(), "the aggregator stopped by itself");
        ensure!(!r.is_finished(), "the rater stopped by itself");
        Ok(())
    };
    // /metrics answers: the process-wide recorder exists before the producer registers its
    // metrics (they then show up on the services' /metrics, which Prometheus scrapes).
    wait_for("the services' /metrics", Duration::from_secs(30), || alive(&agg, &rater), async || {
        let a = get(&format!("http://127.0.0.1:{agg_port}/metrics")).await;
        let r = get(&format!("http://127.0.0.1:{rater_port}/metrics")).await;
        Ok(matches!((a, r), (Ok((200, _)), Ok((200, _)))))
    })
    .await?;

    let started_s = now_s();
    let start_ms = now_ms() - SPAN_MS;
    let gt = produce(env.kafka_args(), &env.topics().usage_topic, workload(start_ms)?).await?;
    ensure!(gt.counters.late > 0 && gt.counters.malformed > 0, "the workload must contain late and malformed events");

    // Everything every panel shows exists: charges (with revenue), restatements, dead
    // letters, wallet alerts, checkpoints of both services.
    wait_for("charges, restatements, dead letters, alerts and checkpoints", Duration::from_secs(240), || alive(&agg, &rater), async || {
        Ok(scalar(&ch, "SELECT count() FROM charges WHERE amount > 0").await? > 0
            && scalar(&ch, "SELECT count() FROM meter_aggregates WHERE revision > 0").await? > 0
            && scalar(&ch, "SELECT count() FROM dead_letters").await? > 0
            && scalar(&ch, "SELECT count() FROM wallet_alerts").await? > 0
            && scalar(&ch, "SELECT uniqExact(service) FROM checkpoints").await? >= 2)
    })
    .await?;
    // The rater has caught up: the number of charges stays the same for 3 s.
    let mut last = (0u64, Instant::now());
    wait_for("the charges to settle", Duration::from_secs(120), || alive(&agg, &rater), async || {
        let n = scalar(&ch, "SELECT count() FROM charges").await?;
        if n != last.0 {
            last = (n, Instant::now());
        }
        Ok(last.1.elapsed() >= Duration::from_secs(3))
    })
    .await?;
    // The revenue-assurance panels read the latest leakage audit and reconciliation runs:
    // audit this run, and reconcile meterflow against a copy of itself with one line a
    // dollar higher.
    let catalog = meterflow_core::pricing::Catalog::from_toml_str(&std::fs::read_to_string(root.join("config/catalog.toml"))?)?;
    let audit = meterflow_admin::audit::audit(&ch, &catalog, &env.topics().aggregates_topic, 0, meterflow_core::pricing::period_end(now_ms()) / 1000).await?;
    meterflow_admin::audit::write_findings(&ch, "dashboards", now_s() as u32, &audit.findings).await?;
    let mine = meterflow_admin::reconcile::meterflow_sides(&meterflow_admin::reconcile::load_meterflow(&ch).await?, Some(&catalog));
    let mut theirs = mine.clone();
    if let Some(side) = theirs.values_mut().next() {
        side.amount += Decimal::ONE;
    }
    let recon = meterflow_admin::reconcile::compare(&mine, &theirs, None, Decimal::new(1, 2), Decimal::ZERO);
    ensure!(recon.mismatches().count() == 1, "the self-reconciliation differs in exactly the changed line");
    meterflow_admin::reconcile::write_results(&ch, "dashboards", now_s() as u32, "self", &recon).await?;

    // A few scrapes after the data is complete, so that rates and quantiles have points.
    let scraped_from = prom.scrapes("rater").await?;
    wait_for("5 more Prometheus scrapes", Duration::from_secs(60), || alive(&agg, &rater), async || {
        Ok(prom.scrapes("rater").await? >= scraped_from + 5 && prom.scrapes("aggregator").await? >= 5)
    })
    .await?;

    // The run's real time range: from before the earliest (late) event time to now.
    let range = Range { from_s: (start_ms / 1000) - 15 * 60, to_s: now_s() + 1 };
    ensure!(range.from_s < started_s);
    let mut failures = Vec::new();
    let mut executed = 0usize;
    for t in &targets {
        let r = run_target(t, range, &ch, &prom).await;
        executed += 1;
        if let Err(e) = r {
            failures.push(format!("{}: {e}", t.name()));
        }
    }

    shutdown.cancel();
    let (a, r) = (agg.await, rater.await);
    a.context("aggregator task")?.context("aggregator")?;
    r.context("rater task")?.context("rater")?;

    let n_ch = targets.iter().filter(|t| t.kind == Kind::ClickHouse).count();
    eprintln!(
        "dashboards: {panels} panels, {} queries ({n_ch} ClickHouse on {}, {} PromQL), range {}..{}, {} failed",
        targets.len(),
        env.database(),
        targets.len() - n_ch,
        range.from_s,
        range.to_s,
        failures.len()
    );
    if !failures.is_empty() {
        bail!("{} of {} dashboard queries failed:\n\n{}", failures.len(), targets.len(), failures.join("\n\n"));
    }
    assert_eq!(executed, targets.len(), "every panel target must be executed");
    drop(prom);
    env.cleanup().await?;
    Ok(())
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(metric_names_in("sum(rate(meterflow_a_total[1m])) / x_meterflow_b + meterflow_c_bucket"), ["meterflow_a_total", "meterflow_c_bucket"]);
}

#[test]
fn every_dashboard_parses_and_every_panel_has_queries() {
    let (targets, panels) = load_targets().unwrap();
    assert!(panels >= 30, "{panels} panels");
    assert_eq!(targets.iter().map(|t| (t.dashboard.clone(), t.panel.clone())).collect::<BTreeSet<_>>().len(), panels);
    for t in &targets {
        if t.kind == Kind::ClickHouse {
            expand_sql(&t.query, Range { from_s: 0, to_s: 3600 }, 60).unwrap_or_else(|e| panic!("{}: {e:#}", t.name()));
        } else {
            expand_promql(&t.query, 5).unwrap_or_else(|e| panic!("{}: {e:#}", t.name()));
        }
    }
}
