//! `meterflow-demo-summary`: the Rust half of `make demo` (deploy/local/demo.sh).
//!
//! ```text
//! meterflow-demo-summary reset    delete the six topics and both consumer groups, drop the database
//! meterflow-demo-summary top-up   publish the demo's prepaid wallet top-ups (--api: through meterflow-api), write them to --credits
//! meterflow-demo-summary api-traffic  send CloudEvents through meterflow-api, write their ground truth
//! meterflow-demo-summary wait     poll ClickHouse until it equals the ground truth (or time out)
//! meterflow-demo-summary report   print the summary read from ClickHouse, with OK/MISMATCH per check
//! ```
//!
//! Connection, topic and database flags are the services' own (`METERFLOW_*` variables), so
//! the defaults are the default names (`meterflow.*`, database `meterflow`). The comparisons
//! are `meterflow_e2e::verify`'s, the same code the end-to-end tests use.

mod demo_api;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use clickhouse::Client;
use meterflow_core::decimal::from_ch_i128;
use meterflow_core::pricing::Catalog;
use meterflow_core::records::{AvroRecord, WalletAdjustment};
use meterflow_e2e::verify;
use meterflow_producer::GroundTruth;
use meterflow_runtime::args::{ClickHouseArgs, KafkaArgs, TopicArgs};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rust_decimal::Decimal;
use serde::Deserialize;

#[derive(Debug, Parser)]
#[command(name = "meterflow-demo-summary", about = "The Rust half of `make demo`: reset, wallet top-ups, waiting for the pipeline, and the summary.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Args)]
struct Conn {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    topics: TopicArgs,
    #[command(flatten)]
    clickhouse: ClickHouseArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Delete the six topics and the consumer groups, and drop the database (a clean slate;
    /// `meterflow-admin init` recreates them).
    Reset {
        #[command(flatten)]
        conn: Conn,
        /// Consumer groups to delete (their committed offsets name the deleted topics).
        #[arg(long = "group", default_values_t = ["meterflow-aggregator".to_string(), "meterflow-rater".to_string()])]
        groups: Vec<String>,
    },
    /// Publish prepaid top-ups for some tenants (each sent twice, as a retried publish would:
    /// the idempotency key makes the second one a no-op) and write the credits as JSON.
    TopUp {
        #[command(flatten)]
        conn: Conn,
        /// Where to write {tenant: credited amount}.
        #[arg(long)]
        credits: PathBuf,
        /// Post the top-ups to this meterflow-api (e.g. http://127.0.0.1:9104) instead of
        /// publishing them to Kafka (an admin key is created for it).
        #[arg(long)]
        api: Option<String>,
    },
    /// Send CloudEvents batches through meterflow-api (per-tenant keys created here) and write
    /// what it accepted as a ground truth for `wait`/`report --api-truth`.
    ApiTraffic {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value = "http://127.0.0.1:9104")]
        api: String,
        /// CloudEvents to send (each feeds three meters).
        #[arg(long, default_value_t = 20_000)]
        events: u64,
        #[arg(long, env = "METERFLOW_METERS", default_value = "config/meters.toml")]
        meters: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Poll ClickHouse until window totals, dead letters, charges and wallets equal the
    /// ground truth; fail after --timeout with the first differences.
    Wait {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        files: Files,
        #[arg(long, default_value = "600", value_name = "SECONDS")]
        timeout: u64,
        /// Fail at once when one of these processes is gone (name=pid, repeatable).
        #[arg(long = "watch-pid", value_parser = parse_watch)]
        watch: Vec<(String, u32)>,
    },
    /// Print the summary read from ClickHouse and whether it agrees with the ground truth;
    /// exits 1 on any mismatch.
    Report {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        files: Files,
        /// The aggregator's and the rater's /metrics (compared when reachable).
        #[arg(long, default_value = "http://127.0.0.1:9101/metrics")]
        aggregator_metrics: String,
        #[arg(long, default_value = "http://127.0.0.1:9102/metrics")]
        rater_metrics: String,
        /// Rows of the per-tenant tables.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
}

#[derive(Debug, Clone, Args)]
struct Files {
    /// The producer's ground-truth file.
    #[arg(long)]
    truth: PathBuf,
    /// The credits written by `top-up`.
    #[arg(long)]
    credits: PathBuf,
    #[arg(long, env = "METERFLOW_CATALOG", default_value = "config/catalog.toml")]
    catalog: PathBuf,
    /// The ground truth of `api-traffic`, merged into --truth.
    #[arg(long)]
    api_truth: Option<PathBuf>,
}

fn load_truth(files: &Files) -> anyhow::Result<GroundTruth> {
    let mut gt = GroundTruth::load(&files.truth)?;
    if let Some(p) = &files.api_truth {
        demo_api::merge(&mut gt, GroundTruth::load(p)?);
    }
    Ok(gt)
}

fn parse_watch(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or_else(|| format!("{s:?} is not name=pid"))?;
    Ok((name.to_owned(), pid.parse().map_err(|e| format!("pid of {name}: {e}"))?))
}

/// The demo's wallets: (tenant, amount in USD). Sized for the default 1M-event run (about
/// USD 2,000 of revenue, a fifth to a quarter of it tenant-000's): most stay healthy, the
/// small ones may fall below the low-balance threshold (USD 10) or below zero, which raises
/// alerts (edge-triggered: a wallet must start above the threshold to alert).
const TOP_UPS: &[(&str, i64)] = &[
    ("tenant-000", 1_000),
    ("tenant-001", 500),
    ("tenant-002", 250),
    ("tenant-003", 200),
    ("tenant-004", 150),
    ("tenant-005", 100),
    ("tenant-007", 50),
    ("tenant-010", 50),
    ("tenant-020", 25),
    ("tenant-030", 15),
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Reset { conn, groups } => reset(&conn, &groups).await.map(|()| true),
        Command::TopUp { conn, credits, api: None } => top_up(&conn, &credits).await.map(|()| true),
        Command::TopUp { conn, credits, api: Some(api) } => top_up_api(&conn, &credits, &api).await.map(|()| true),
        Command::ApiTraffic { conn, api, events, meters, out } => async {
            let gt = demo_api::traffic(&api, &conn.clickhouse, &meters, events, now_ms() as u64).await?;
            gt.save(&out)?;
            println!(
                "sent {events} CloudEvents through {api}: {} usage events accepted ({} sent to Kafka incl. {} from retried batches), 1 rejected item per batch",
                gt.counters.unique_accepted, gt.counters.sent, gt.counters.duplicates
            );
            anyhow::Ok(true)
        }
        .await,
        Command::Wait { conn, files, timeout, watch } => wait(&conn, &files, Duration::from_secs(timeout), &watch).await,
        Command::Report { conn, files, aggregator_metrics, rater_metrics, top } => {
            report(&conn, &files, &aggregator_metrics, &rater_metrics, top).await
        }
    };
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("meterflow-demo-summary: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn ch(conn: &Conn) -> Client {
    meterflow_runtime::clickhouse::client(&conn.clickhouse)
}

// ---------------------------------------------------------------------------------------------
// reset

async fn reset(conn: &Conn, groups: &[String]) -> anyhow::Result<()> {
    let db = &conn.clickhouse.database;
    anyhow::ensure!(
        !db.is_empty() && db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "refusing to drop database {db:?}: not a plain identifier"
    );
    let admin: AdminClient<DefaultClientContext> = meterflow_runtime::kafka::base_config(&conn.kafka)?.create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // Somebody else's aggregator or rater on these topics would lose its input under its feet.
    for g in groups {
        if let Ok(list) = admin.inner().fetch_group_list(Some(g), Duration::from_secs(10)) {
            if let Some(members) = list.groups().iter().find(|x| x.name() == g).map(|x| x.members().len()).filter(|n| *n > 0) {
                anyhow::bail!(
                    "consumer group {g} still has {members} member(s): a meterflow service still consumes these \
                     topics (`make demo-stop` stops only the demo's own); stop it first (the reset deletes \
                     topics {} and drops database {db})",
                    conn.topics.all().join(", ")
                );
            }
        }
    }
    let names = conn.topics.all();
    let mut deleted = Vec::new();
    for r in admin.delete_topics(&names, &opts).await.context("deleting topics")? {
        match r {
            Ok(t) => deleted.push(t),
            Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((t, code)) => anyhow::bail!("deleting topic {t}: {code}"),
        }
    }
    // Deletion is asynchronous in Kafka: wait until the metadata no longer lists them.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let md = admin.inner().fetch_metadata(None, Duration::from_secs(10)).context("listing topics")?;
        let left: Vec<String> =
            md.topics().iter().map(|t| t.name().to_owned()).filter(|n| names.contains(&n.as_str())).collect();
        if left.is_empty() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "topics still listed 60 s after deletion: {left:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("topics: deleted {}", if deleted.is_empty() { "none (none existed)".to_owned() } else { deleted.join(", ") });
    let group_refs: Vec<&str> = groups.iter().map(String::as_str).collect();
    match admin.delete_groups(&group_refs, &opts).await {
        Ok(results) => {
            for r in results {
                match r {
                    Ok(g) => println!("consumer group {g}: deleted"),
                    Err((g, RDKafkaErrorCode::GroupIdNotFound)) => println!("consumer group {g}: none"),
                    // A stale committed offset is harmless anyway: it points past the end of
                    // the new, empty topic, and the services reset to the earliest offset.
                    Err((g, code)) => println!("consumer group {g}: not deleted ({code}); its stale offsets will be reset"),
                }
            }
        }
        Err(e) => println!("consumer groups: not deleted ({e}); stale offsets will be reset"),
    }
    meterflow_runtime::clickhouse::admin_client(&conn.clickhouse)
        .query(&format!("DROP DATABASE IF EXISTS {db}"))
        .execute()
        .await
        .with_context(|| format!("dropping database {db}"))?;
    println!("database {db}: dropped");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// top-up

async fn top_up(conn: &Conn, credits_path: &Path) -> anyhow::Result<()> {
    let producer: FutureProducer = meterflow_runtime::kafka::producer_config(&conn.kafka)?.create()?;
    let run = now_ms();
    let mut credits: BTreeMap<String, String> = BTreeMap::new();
    let adjustments: Vec<WalletAdjustment> = TOP_UPS
        .iter()
        .map(|(tenant, usd)| WalletAdjustment {
            idempotency_key: format!("demo_{run}_{tenant}"),
            tenant: (*tenant).to_owned(),
            currency: "USD".into(),
            amount: Decimal::from(*usd),
            kind: "top_up".into(),
            reason: "make demo: prepaid credit".into(),
            created_at: run,
            expires_at: None,
            priority: 0,
        })
        .collect();
    // Twice: the second publish is what a producer retry looks like; it must not count.
    for _ in 0..2 {
        for a in &adjustments {
            let payload = a.to_avro()?;
            producer
                .send(FutureRecord::to(&conn.topics.wallet_topic).key(&a.tenant).payload(&payload), Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .with_context(|| format!("publishing the top-up of {}", a.tenant))?;
        }
    }
    for a in &adjustments {
        credits.insert(a.tenant.clone(), meterflow_core::decimal::format(&a.amount));
    }
    std::fs::write(credits_path, serde_json::to_string_pretty(&credits)? + "\n")
        .with_context(|| format!("writing {}", credits_path.display()))?;
    let total: i64 = TOP_UPS.iter().map(|(_, a)| a).sum();
    println!(
        "published {} wallet top-ups (USD {total} in total, each sent twice with the same idempotency key) to {}",
        adjustments.len(),
        conn.topics.wallet_topic
    );
    for (t, a) in &credits {
        println!("  {t:<12} USD {a:>8}");
    }
    Ok(())
}

async fn top_up_api(conn: &Conn, credits_path: &Path, api: &str) -> anyhow::Result<()> {
    let credits = demo_api::top_up(api, &conn.clickhouse, TOP_UPS, now_ms()).await?;
    std::fs::write(credits_path, serde_json::to_string_pretty(&credits)? + "\n")
        .with_context(|| format!("writing {}", credits_path.display()))?;
    println!("posted {} wallet top-ups to {api}/v1/wallets/{{tenant}}/adjustments, each twice with one Idempotency-Key (the retry was answered as a replay)", credits.len());
    for (t, a) in &credits {
        println!("  {t:<12} USD {a:>8}");
    }
    Ok(())
}

fn load_credits(path: &Path) -> anyhow::Result<BTreeMap<String, Decimal>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let raw: BTreeMap<String, String> = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    raw.into_iter()
        .map(|(t, a)| Ok((t, meterflow_core::decimal::parse("credit", &a)?)))
        .collect()
}

fn load_catalog(path: &Path) -> anyhow::Result<Catalog> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Catalog::from_toml_str(&text).with_context(|| format!("in {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// checks shared by wait and report

#[derive(Debug, clickhouse::Row, Deserialize)]
struct BalanceRow {
    tenant: String,
    credited: i128,
    charged: i128,
    balance: i128,
}

async fn balances(ch: &Client) -> anyhow::Result<BTreeMap<String, (Decimal, Decimal, Decimal)>> {
    let rows: Vec<BalanceRow> = ch
        .query("SELECT tenant, credited, charged, balance FROM wallet_balances WHERE currency = 'USD'")
        .fetch_all()
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.tenant, (from_ch_i128(r.credited), from_ch_i128(r.charged), from_ch_i128(r.balance))))
        .collect())
}

/// Every wallet's balance is its credits minus the tenant's expected revenue.
async fn wallets(
    ch: &Client,
    credits: &BTreeMap<String, Decimal>,
    expected_money: &BTreeMap<String, (Decimal, Decimal)>,
) -> anyhow::Result<verify::Report> {
    let found = balances(ch).await?;
    let mut report = verify::Report::default();
    for (tenant, credit) in credits {
        report.checked += 1;
        let revenue = expected_money.get(tenant).map_or(Decimal::ZERO, |m| m.0);
        let expected = (credit - revenue).normalize();
        let (got_credit, _, got) = found.get(tenant).copied().unwrap_or_default();
        if got.normalize() != expected || got_credit.normalize() != credit.normalize() {
            report.problems.push(format!(
                "wallet of {tenant}: credited {got_credit} balance {got} in ClickHouse, expected credited {credit} balance {expected}"
            ));
        }
    }
    Ok(report)
}

/// What `wait` polls: window totals, dead letters, charges and wallets.
struct Exactness {
    windows: verify::Report,
    dead: verify::Report,
    charges: verify::Report,
    wallets: verify::Report,
}

impl Exactness {
    fn ok(&self) -> bool {
        self.windows.ok() && self.dead.ok() && self.charges.ok() && self.wallets.ok()
    }

    fn all(&self) -> [(&'static str, &verify::Report); 4] {
        [("window totals", &self.windows), ("dead letters", &self.dead), ("charges", &self.charges), ("wallets", &self.wallets)]
    }
}

async fn exactness(
    ch: &Client,
    gt: &GroundTruth,
    usage_topic: &str,
    catalog: &Catalog,
    credits: &BTreeMap<String, Decimal>,
    expected_money: &BTreeMap<String, (Decimal, Decimal)>,
) -> anyhow::Result<Exactness> {
    Ok(Exactness {
        windows: verify::window_totals(ch, gt).await?,
        dead: verify::dead_letters(ch, gt, usage_topic).await?,
        charges: verify::charges(ch, gt, catalog).await?,
        wallets: wallets(ch, credits, expected_money).await?,
    })
}

fn matched(r: &verify::Report) -> usize {
    // Problems also count unexpected rows; good enough for a progress line.
    r.checked.saturating_sub(r.problems.len())
}

// ---------------------------------------------------------------------------------------------
// wait

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()) != Some("Z"))
}

async fn wait(conn: &Conn, files: &Files, timeout: Duration, watch: &[(String, u32)]) -> anyhow::Result<bool> {
    let gt = load_truth(files)?;
    let catalog = load_catalog(&files.catalog)?;
    let credits = load_credits(&files.credits)?;
    let expected_money = verify::expected_money(&gt, &catalog)?;
    let ch = ch(conn);
    let started = Instant::now();
    let mut last_print: Option<Instant> = None;
    println!(
        "waiting for ClickHouse to equal the ground truth: {} events in {} windows, {} dead letters, revenue of {} tenants, {} wallets (timeout {} s)",
        gt.counters.unique_accepted,
        gt.windows.len(),
        gt.malformed.len(),
        expected_money.len(),
        credits.len(),
        timeout.as_secs()
    );
    loop {
        for (name, pid) in watch {
            anyhow::ensure!(pid_alive(*pid), "the {name} (pid {pid}) is not running any more; see its log");
        }
        let stored: u64 = ch.query("SELECT count() FROM usage_events").fetch_one().await.unwrap_or(0);
        let state = exactness(&ch, &gt, &conn.topics.usage_topic, &catalog, &credits, &expected_money).await;
        let elapsed = started.elapsed().as_secs();
        match &state {
            Ok(s) if s.ok() => {
                println!(
                    "  {elapsed:>4} s  caught up: {} windows, {} dead letters, {} tenants' charges and {} wallets equal the ground truth",
                    s.windows.checked, s.dead.checked, s.charges.checked, s.wallets.checked
                );
                return Ok(true);
            }
            Ok(s) => {
                if last_print.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    last_print = Some(Instant::now());
                    println!(
                        "  {elapsed:>4} s  events stored {stored:>9}/{}  windows exact {:>6}/{}  dead letters {:>6}/{}  tenants rated exactly {:>3}/{}  wallets {:>2}/{}",
                        gt.counters.unique_accepted,
                        matched(&s.windows),
                        s.windows.checked,
                        matched(&s.dead),
                        s.dead.checked,
                        matched(&s.charges),
                        s.charges.checked,
                        matched(&s.wallets),
                        s.wallets.checked
                    );
                }
            }
            Err(e) => {
                if last_print.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    last_print = Some(Instant::now());
                    println!("  {elapsed:>4} s  ClickHouse not answering yet: {e:#}");
                }
            }
        }
        if started.elapsed() >= timeout {
            println!("TIMEOUT after {} s: ClickHouse does not equal the ground truth yet", timeout.as_secs());
            if let Ok(s) = state {
                for (what, r) in s.all() {
                    if !r.ok() {
                        println!("  {what}: {} problems of {} checked, first ones:", r.problems.len(), r.checked);
                        for p in r.problems.iter().take(5) {
                            println!("    {p}");
                        }
                    }
                }
            }
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// report

/// The summary's checks, printed at the end.
#[derive(Default)]
struct Checks(Vec<(bool, String)>);

impl Checks {
    fn add(&mut self, ok: bool, what: impl Into<String>) {
        self.0.push((ok, what.into()));
    }

    fn report(&mut self, r: &verify::Report, what: &str) {
        if r.ok() {
            self.add(true, format!("{what}: {} checked, all exact", r.checked));
        } else {
            let first = r.problems.first().cloned().unwrap_or_default();
            self.add(false, format!("{what}: {} of {} differ, e.g. {first}", r.problems.len(), r.checked));
        }
    }
}

fn ok_word(ok: bool) -> &'static str {
    if ok {
        "OK"
    } else {
        "MISMATCH"
    }
}

/// 1234567 -> "1,234,567"; keeps a fractional part.
fn group(d: Decimal) -> String {
    let s = d.normalize().to_string();
    let (sign, s) = s.strip_prefix('-').map_or(("", s.as_str()), |r| ("-", r));
    let (int, frac) = s.split_once('.').map_or((s, None), |(i, f)| (i, Some(f)));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{out}.{f}"),
        None => format!("{sign}{out}"),
    }
}

fn usd(d: Decimal) -> String {
    let r = d.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven);
    let mut s = group(r.trunc());
    let cents = (r.fract().abs() * Decimal::from(100)).round().to_string();
    if r.is_sign_negative() && r.trunc().is_zero() && !r.is_zero() {
        s = format!("-{s}");
    }
    format!("{s}.{cents:0>2}")
}

fn qty(d: Decimal) -> String {
    group(d.round_dp(1))
}

fn pct(margin: Decimal, revenue: Decimal) -> String {
    meterflow_core::pricing::margin_percent(revenue, margin).map_or_else(|| "n/a".to_owned(), |p| format!("{}%", p.round_dp(1)))
}

fn count_u64(n: u64) -> String {
    group(Decimal::from(n))
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct UsageRow {
    tenant: String,
    meter: String,
    value: i128,
    events: i64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct MoneyRow {
    tenant: String,
    plan: String,
    revenue: i128,
    cost: i128,
    margin: i128,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct ReasonRow {
    reason: String,
    n: u64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct ModelRow {
    model: String,
    revenue: i128,
    cost: i128,
    margin: i128,
}

async fn scrape(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(host)).await??;
    s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await??;
    Ok(body)
}

fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = false;
    let sum = text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .inspect(|_| found = true)
        .sum();
    found.then_some(sum)
}

async fn report(conn: &Conn, files: &Files, agg_metrics: &str, rater_metrics: &str, top: usize) -> anyhow::Result<bool> {
    let gt = load_truth(files)?;
    let catalog = load_catalog(&files.catalog)?;
    let credits = load_credits(&files.credits)?;
    let expected_money = verify::expected_money(&gt, &catalog)?;
    let ch = ch(conn);
    let topic = &conn.topics.usage_topic;
    let c = &gt.counters;
    let mut checks = Checks::default();
    let mut out = String::new();
    let w = &mut out;

    // --- events
    let accepted: u64 = ch.query("SELECT uniqExact(tenant, meter, event_id) FROM usage_events").fetch_one().await?;
    let reasons: Vec<ReasonRow> = ch
        .query("SELECT reason, uniqExact(source_partition, source_offset) AS n FROM dead_letters WHERE source_topic = ? GROUP BY reason ORDER BY n DESC, reason")
        .bind(topic)
        .fetch_all()
        .await?;
    let dead_total: u64 = reasons.iter().map(|r| r.n).sum();
    let duplicates = c.sent.saturating_sub(accepted + dead_total);
    let windows: u64 = ch.query("SELECT count() FROM meter_totals").fetch_one().await?;
    let restated: u64 = ch.query("SELECT count() FROM meter_totals WHERE last_revision > 0").fetch_one().await?;
    // Revisions are consecutive, so the latest one counts the restatements of its window.
    let revisions: u64 = ch.query("SELECT toUInt64(sum(last_revision)) FROM meter_totals").fetch_one().await?;
    let agg_text = scrape(agg_metrics).await.ok();
    let dup_metric = agg_text.as_deref().and_then(|t| metric_sum(t, "meterflow_aggregator_duplicates_total"));

    let _ = writeln!(w, "\n== Events ({topic}, ground truth {})", files.truth.display());
    let _ = writeln!(w, "  sent (acknowledged by the broker)    {:>12}", count_u64(c.sent));
    let _ = writeln!(
        w,
        "  accepted (distinct, in usage_events) {:>12}   expected {:>12}  {}",
        count_u64(accepted),
        count_u64(c.unique_accepted),
        ok_word(accepted == c.unique_accepted)
    );
    checks.add(accepted == c.unique_accepted, format!("accepted events: {accepted} in ClickHouse, {} in the ground truth", c.unique_accepted));
    let _ = writeln!(
        w,
        "  duplicates dropped                   {:>12}   expected {:>12}  {}   (sent - accepted - dead letters{})",
        count_u64(duplicates),
        count_u64(c.duplicates),
        ok_word(duplicates == c.duplicates),
        dup_metric.map_or(String::new(), |d| format!("; aggregator /metrics says {}", d as u64))
    );
    checks.add(duplicates == c.duplicates, format!("duplicates dropped: {duplicates}, ground truth {}", c.duplicates));
    let _ = writeln!(
        w,
        "  dead letters                         {:>12}   expected {:>12}  {}",
        count_u64(dead_total),
        count_u64(c.malformed),
        ok_word(dead_total == c.malformed)
    );
    let mut by_reason_ok = true;
    let found_reasons: BTreeMap<&str, u64> = reasons.iter().map(|r| (r.reason.as_str(), r.n)).collect();
    let all_reasons: BTreeSet<&str> =
        found_reasons.keys().copied().chain(c.malformed_by_reason.iter().filter(|(_, n)| **n > 0).map(|(r, _)| r.as_str())).collect();
    let mut sorted: Vec<&str> = all_reasons.into_iter().collect();
    sorted.sort_by_key(|r| std::cmp::Reverse(found_reasons.get(r).copied().unwrap_or(0)));
    for r in sorted {
        let (got, want) = (found_reasons.get(r).copied().unwrap_or(0), c.malformed_by_reason.get(r).copied().unwrap_or(0));
        by_reason_ok &= got == want;
        let _ = writeln!(w, "    {r:<32} {:>12}   expected {:>12}  {}", count_u64(got), count_u64(want), ok_word(got == want));
    }
    checks.add(by_reason_ok && dead_total == c.malformed, format!("dead letters by reason: {dead_total} in {} reasons", found_reasons.len()));
    let _ = writeln!(
        w,
        "  windows {}, of which {} restated by late events ({} restatements); {} events were late",
        count_u64(windows),
        count_u64(restated),
        count_u64(revisions),
        count_u64(c.late)
    );

    // --- usage
    let usage: Vec<UsageRow> = ch
        .query("SELECT tenant, meter, sum(value) AS value, sum(event_count) AS events FROM meter_totals GROUP BY tenant, meter")
        .fetch_all()
        .await?;
    let mut per_tenant: BTreeMap<String, BTreeMap<String, Decimal>> = BTreeMap::new();
    let mut per_meter: BTreeMap<String, (Decimal, i64)> = BTreeMap::new();
    let mut usage_found: BTreeMap<(String, String), (Decimal, u64)> = BTreeMap::new();
    for r in &usage {
        let v = from_ch_i128(r.value);
        per_tenant.entry(r.tenant.clone()).or_default().insert(r.meter.clone(), v);
        let m = per_meter.entry(r.meter.clone()).or_default();
        m.0 += v;
        m.1 += r.events;
        usage_found.insert((r.tenant.clone(), r.meter.clone()), (v, r.events as u64));
    }
    let mut usage_report = verify::Report::default();
    for t in &gt.totals {
        usage_report.checked += 1;
        match usage_found.remove(&(t.tenant.clone(), t.meter.clone())) {
            Some((v, n)) if v.normalize() == t.value.normalize() && n == t.event_count => {}
            got => usage_report.problems.push(format!("{} {}: {got:?} in ClickHouse, expected {} ({} events)", t.tenant, t.meter, t.value, t.event_count)),
        }
    }
    for k in usage_found.keys() {
        usage_report.problems.push(format!("unexpected usage {k:?}"));
    }
    let meters = ["input_tokens", "output_tokens", "requests", "gpu_seconds"];
    let _ = writeln!(w, "\n== Usage by meter (meter_totals)");
    for (m, (v, n)) in &per_meter {
        let _ = writeln!(w, "  {m:<14} {:>20}   from {:>10} events", qty(*v), group(Decimal::from(*n)));
    }
    let mut tenants: Vec<(&String, Decimal)> = per_tenant
        .iter()
        .map(|(t, m)| (t, m.get("input_tokens").copied().unwrap_or_default() + m.get("output_tokens").copied().unwrap_or_default()))
        .collect();
    tenants.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let _ = writeln!(w, "\n== Usage of the top {top} tenants by tokens ({} tenants in all)", per_tenant.len());
    let _ = writeln!(w, "  {:<12} {:>16} {:>16} {:>12} {:>12}", "tenant", meters[0], meters[1], meters[2], meters[3]);
    for (t, _) in tenants.iter().take(top) {
        let m = &per_tenant[*t];
        let get = |k: &str| m.get(k).copied().map_or_else(|| "-".to_owned(), qty);
        let _ = writeln!(w, "  {t:<12} {:>16} {:>16} {:>12} {:>12}", get(meters[0]), get(meters[1]), get(meters[2]), get(meters[3]));
    }

    // --- money
    let money: Vec<MoneyRow> = ch
        .query(
            "SELECT tenant, arrayStringConcat(groupUniqArray(plan), '+') AS plan, sum(amount) AS revenue, \
             sum(provider_cost) AS cost, sum(margin) AS margin FROM charges_dedup GROUP BY tenant",
        )
        .fetch_all()
        .await?;
    let (mut revenue, mut cost, mut margin) = (Decimal::ZERO, Decimal::ZERO, Decimal::ZERO);
    let mut money_rows: Vec<(String, String, Decimal, Decimal, Decimal)> = money
        .into_iter()
        .map(|r| (r.tenant, r.plan, from_ch_i128(r.revenue), from_ch_i128(r.cost), from_ch_i128(r.margin)))
        .collect();
    for r in &money_rows {
        revenue += r.2;
        cost += r.3;
        margin += r.4;
    }
    let (exp_revenue, exp_cost) = expected_money.values().fold((Decimal::ZERO, Decimal::ZERO), |a, m| (a.0 + m.0, a.1 + m.1));
    money_rows.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    let _ = writeln!(w, "\n== Money (charges_dedup, USD)");
    let _ = writeln!(w, "  revenue        {:>16}   expected {:>16}  {}", usd(revenue), usd(exp_revenue), ok_word(revenue == exp_revenue));
    let _ = writeln!(w, "  provider cost  {:>16}   expected {:>16}  {}", usd(cost), usd(exp_cost), ok_word(cost == exp_cost));
    let _ = writeln!(w, "  margin         {:>16}   ({} of revenue)", usd(margin), pct(margin, revenue));
    checks.add(margin == revenue - cost, format!("margin = revenue - cost, exactly ({margin} = {revenue} - {cost})"));
    let _ = writeln!(w, "\n  top {top} tenants by revenue:");
    let _ = writeln!(w, "  {:<12} {:<18} {:>14} {:>14} {:>14} {:>8}", "tenant", "plan", "revenue", "cost", "margin", "margin%");
    for (t, plan, r, c, m) in money_rows.iter().take(top) {
        let _ = writeln!(w, "  {t:<12} {plan:<18} {:>14} {:>14} {:>14} {:>8}", usd(*r), usd(*c), usd(*m), pct(*m, *r));
    }
    let mut lowest = money_rows.clone();
    lowest.sort_by(|a, b| a.4.cmp(&b.4).then(a.0.cmp(&b.0)));
    if let Some((t, plan, r, c, m)) = lowest.first() {
        let _ = writeln!(w, "  lowest margin: {t} ({plan}) revenue {} cost {} margin {} ({})", usd(*r), usd(*c), usd(*m), pct(*m, *r));
    }
    let models: Vec<ModelRow> = ch
        .query("SELECT model, sum(amount) AS revenue, sum(provider_cost) AS cost, sum(margin) AS margin FROM charges_dedup GROUP BY model ORDER BY revenue DESC")
        .fetch_all()
        .await?;
    let _ = writeln!(w, "\n  by model:");
    for m in &models {
        let (r, c, g) = (from_ch_i128(m.revenue), from_ch_i128(m.cost), from_ch_i128(m.margin));
        let name = if m.model.is_empty() { "(none)" } else { m.model.as_str() };
        let _ = writeln!(w, "  {name:<31} {:>14} {:>14} {:>14} {:>8}", usd(r), usd(c), usd(g), pct(g, r));
    }

    // --- wallets
    let found = balances(&ch).await?;
    let alerts: u64 = ch.query("SELECT uniqExact(alert_id) FROM wallet_alerts").fetch_one().await.unwrap_or(0);
    let _ = writeln!(w, "\n== Prepaid wallets (wallet_balances, USD; {alerts} alerts in wallet_alerts: low_balance below USD 10, exhausted below 0)");
    let _ = writeln!(w, "  {:<12} {:>12} {:>14} {:>14} {:>14}", "tenant", "credited", "charged", "balance", "expected");
    for (tenant, credit) in &credits {
        let (got_credit, charged, balance) = found.get(tenant).copied().unwrap_or_default();
        let expected = credit - expected_money.get(tenant).map_or(Decimal::ZERO, |m| m.0);
        let ok = balance.normalize() == expected.normalize() && got_credit.normalize() == credit.normalize();
        let _ = writeln!(w, "  {tenant:<12} {:>12} {:>14} {:>14} {:>14}  {}", usd(got_credit), usd(charged), usd(balance), usd(expected), ok_word(ok));
    }

    // --- checks
    let exact = exactness(&ch, &gt, topic, &catalog, &credits, &expected_money).await?;
    checks.report(&exact.dead, "dead letters at their exact topic positions, with their reasons");
    checks.report(&exact.windows, "window totals (value, event count, provider cost) per tenant, meter, dimensions and minute");
    checks.report(&usage_report, "usage per tenant and meter");
    checks.report(&exact.charges, "revenue and provider cost per tenant (catalog applied to the ground truth)");
    checks.add(revenue == exp_revenue && cost == exp_cost, format!("total revenue {revenue} and cost {cost}, expected {exp_revenue} and {exp_cost}"));
    checks.report(&exact.wallets, "wallet balances = top-ups - revenue (each top-up published twice, counted once)");
    let inconsistent = verify::charge_rows_consistent(&ch).await?;
    checks.add(inconsistent == 0, format!("charge ids with differing replays: {inconsistent}"));
    match scrape(rater_metrics).await.ok().and_then(|t| Some((metric_sum(&t, "meterflow_rater_revenue")?, metric_sum(&t, "meterflow_rater_margin")?))) {
        Some((r, m)) => {
            let close = |got: f64, want: Decimal| {
                let want: f64 = want.to_string().parse().unwrap_or(f64::NAN);
                (got - want).abs() <= 1e-6 * want.abs().max(1.0)
            };
            checks.add(close(r, revenue) && close(m, margin), format!("rater /metrics revenue {r:.2} and margin {m:.2} = ClickHouse"));
        }
        None => {
            let _ = writeln!(w, "\n(rater /metrics at {rater_metrics} not reachable: its check is skipped)");
        }
    }

    let failed = checks.0.iter().filter(|(ok, _)| !ok).count();
    let _ = writeln!(w, "\n== Agreement with the ground truth");
    for (ok, what) in &checks.0 {
        let _ = writeln!(w, "  {:<8} {what}", ok_word(*ok));
    }
    if failed == 0 {
        let _ = writeln!(w, "\nALL {} CHECKS OK: ClickHouse agrees exactly with the ground truth.", checks.0.len());
    } else {
        let _ = writeln!(w, "\n{failed} of {} CHECKS MISMATCH (see above).", checks.0.len());
    }
    print!("{out}");
    Ok(failed == 0)
}
