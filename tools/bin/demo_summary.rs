//! `meterflow-demo-summary`: the Rust half of `make demo` (deploy/local/demo.sh).
//!
//! ```text
//! meterflow-demo-summary reset    delete the six topics and both consumer groups, drop the database
//! meterflow-demo-summary start --state DIR aggregator=9101 ...   the services, supervised, left running
//! meterflow-demo-summary stop|status --state DIR ...   SIGTERM them / are they running
//! meterflow-demo-summary top-up   publish the demo's prepaid wallet top-ups (--api: through meterflow-api), write them to --credits
//! meterflow-demo-summary api-traffic  send CloudEvents through meterflow-api, write their ground truth
//! meterflow-demo-summary balance  tenant-000's balance and an entitlement check, from meterflow-api
//! meterflow-demo-summary portal-link  a signed customer-page link for a tenant
//! meterflow-demo-summary wait     poll ClickHouse until it equals the ground truth (or time out)
//! meterflow-demo-summary report   print the summary read from ClickHouse, with OK/MISMATCH per check
//! ```
//!
//! Connection, topic and database flags are the services' own (`METERFLOW_*` variables), so
//! the defaults are the default names (`meterflow.*`, database `meterflow`). The comparisons
//! are `meterflow_e2e::verify`'s, the same code the end-to-end tests use.

mod demo_api;
mod demo_control;
mod demo_format;
mod demo_report;
mod demo_services;
mod demo_setup;
use demo_report::report;
use demo_setup::{reset, top_up, top_up_api};

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
#[command(name = "meterflow-demo-summary", about = "The Rust half of `make demo`: reset, starting the services, wallet top-ups, waiting for the pipeline, and the summary.")]
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
    /// Start meterflow-NAME for each NAME=PORT under the testkit supervisor, wait until each
    /// answers /readyz on PORT, and leave them running (pid files and logs in --state).
    Start {
        /// The demo's state directory (pid files, logs; the marker demo.sh recognises them by).
        #[arg(long)]
        state: PathBuf,
        #[arg(required = true, value_parser = demo_services::parse_service)]
        services: Vec<(String, u16)>,
    },
    /// SIGTERM the demo's services NAME... (found by their pid files and the marker in
    /// their environment); SIGKILL after 40 s.
    Stop {
        #[arg(long)]
        state: PathBuf,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Whether each NAME=PORT of the demo runs; exit 1 if one does not.
    Status {
        #[arg(long)]
        state: PathBuf,
        #[arg(required = true, value_parser = demo_services::parse_service)]
        services: Vec<(String, u16)>,
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
    /// Print tenant-000's balance and an entitlement check as meterflow-api answers them
    /// (from memory), with an admin key created for it.
    Balance {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value = "http://127.0.0.1:9104")]
        api: String,
    },
    /// Print a signed customer-page link (valid 24 h) for --tenant.
    PortalLink {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, default_value = "http://127.0.0.1:9104")]
        api: String,
        #[arg(long, default_value = "tenant-000")]
        tenant: String,
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
        Command::Start { state, services } => demo_services::start(&state, &services).await.map(|()| true),
        Command::Stop { state, names } => demo_services::stop(&state, &names).await.map(|()| true),
        Command::Status { state, services } => Ok(demo_services::status(&state, &services)),
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
        Command::Balance { conn, api } => demo_control::balance(&api, &conn.clickhouse).await.map(|()| true),
        Command::PortalLink { conn, api, tenant } => {
            demo_control::portal_link(&api, &conn.clickhouse, &tenant).await.map(|url| println!("{url}")).map(|()| true)
        }
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
