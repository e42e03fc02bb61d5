//! `meterflow-admin`: creates meterflow's topics and applies its ClickHouse migrations.
//!
//! ```text
//! meterflow-admin topics  [--partitions 4] [--dead-letter-partitions N] [--alert-partitions N]
//! meterflow-admin migrate [--migrations-dir schemas/clickhouse]
//! meterflow-admin init    (both)
//! meterflow-admin status  (what exists, what is pending; exit 1 if anything is missing)
//! meterflow-admin keys create --tenant T [--scope ingest|read|admin] | list | revoke KEY_ID
//! ```
//! Every flag has an environment variable (`--help` shows it).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use meterflow_admin::migrations::{self, MigrationSource};
use meterflow_admin::{create_topics, list_topics, Partitions, TopicReport};
use meterflow_runtime::args::{ClickHouseArgs, KafkaArgs, LogArgs, TopicArgs};

#[derive(Debug, Parser)]
#[command(name = "meterflow-admin", version, about = "Creates meterflow's Kafka topics and applies its ClickHouse migrations.")]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the six topics (existing topics are left alone).
    Topics(TopicsCmd),
    /// Create the database if missing and apply pending migrations in order.
    Migrate(MigrateCmd),
    /// `topics` then `migrate`.
    Init(InitCmd),
    /// Show which topics exist and which migrations are applied; exit 1 if any is missing.
    Status(StatusCmd),
    /// API keys for meterflow-api: create (printed once), list, revoke.
    Keys(meterflow_admin::keys::KeysCmd),
}

#[derive(Debug, Args)]
struct TopicsCmd {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    topics: TopicArgs,
    #[command(flatten)]
    partitions: Partitions,
}

#[derive(Debug, Args)]
struct MigrationsDir {
    /// Directory of NNN_name.sql files [default: the repository's schemas/clickhouse, or the
    /// copy embedded at build time when the repository is not there].
    #[arg(long = "migrations-dir", env = "METERFLOW_MIGRATIONS_DIR")]
    dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct MigrateCmd {
    #[command(flatten)]
    clickhouse: ClickHouseArgs,
    #[command(flatten)]
    migrations: MigrationsDir,
}

#[derive(Debug, Args)]
struct InitCmd {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    topics: TopicArgs,
    #[command(flatten)]
    partitions: Partitions,
    #[command(flatten)]
    clickhouse: ClickHouseArgs,
    #[command(flatten)]
    migrations: MigrationsDir,
}

#[derive(Debug, Args)]
struct StatusCmd {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    topics: TopicArgs,
    #[command(flatten)]
    clickhouse: ClickHouseArgs,
    #[command(flatten)]
    migrations: MigrationsDir,
}

fn print_topics(kafka: &KafkaArgs, reports: &[TopicReport]) {
    println!("topics on {}:", kafka.brokers);
    for r in reports {
        let what = if r.created { "created" } else { "exists" };
        let note = if r.partitions == r.requested {
            String::new()
        } else {
            format!(" (asked for {}; partitions of an existing topic are not changed)", r.requested)
        };
        println!("  {:<40} {:>3} partitions  {what}{note}", r.name, r.partitions);
    }
}

async fn run_topics(kafka: &KafkaArgs, topics: &TopicArgs, partitions: Partitions) -> Result<()> {
    let reports = create_topics(kafka, topics, partitions).await?;
    print_topics(kafka, &reports);
    Ok(())
}

async fn run_migrate(clickhouse: &ClickHouseArgs, dir: &MigrationsDir) -> Result<()> {
    let source = MigrationSource::resolve(dir.dir.as_deref());
    let all = source.load()?;
    let n = migrations::migrate_with(clickhouse, &all).await?;
    if n == 0 {
        println!(
            "database {} at {}: up to date ({} migrations from {source})",
            clickhouse.database,
            clickhouse.url,
            all.len()
        );
    } else {
        println!(
            "database {} at {}: applied {n} of {} migrations from {source}",
            clickhouse.database,
            clickhouse.url,
            all.len()
        );
    }
    Ok(())
}

async fn run_status(cmd: &StatusCmd) -> Result<bool> {
    let mut ok = true;
    match list_topics(&cmd.kafka).await {
        Ok(existing) => {
            println!("kafka {}: reachable ({} topics)", cmd.kafka.brokers, existing.len());
            for t in cmd.topics.all() {
                match existing.get(t) {
                    Some(p) => println!("  {t:<40} {p:>3} partitions"),
                    None => {
                        ok = false;
                        println!("  {t:<40} MISSING (meterflow-admin topics)");
                    }
                }
            }
        }
        Err(e) => {
            ok = false;
            println!("kafka {}: UNREACHABLE: {e:#}", cmd.kafka.brokers);
        }
    }

    let source = MigrationSource::resolve(cmd.migrations.dir.as_deref());
    let all = source.load()?;
    match migrations::applied(&cmd.clickhouse).await {
        Ok(done) => {
            println!(
                "clickhouse {}: reachable, database {} ({} of {} migrations applied; files: {source})",
                cmd.clickhouse.url,
                cmd.clickhouse.database,
                done.len(),
                all.len()
            );
            let by_version: std::collections::BTreeMap<u32, &migrations::AppliedMigration> =
                done.iter().map(|a| (a.version, a)).collect();
            for m in &all {
                match by_version.get(&m.version) {
                    Some(a) if a.checksum == m.checksum => println!("  {:<40} applied {}", m.file, a.applied_at),
                    Some(a) => {
                        ok = false;
                        println!("  {:<40} CHANGED since it was applied {} (checksum {} -> {})", m.file, a.applied_at, a.checksum, m.checksum);
                    }
                    None => {
                        ok = false;
                        println!("  {:<40} PENDING (meterflow-admin migrate)", m.file);
                    }
                }
            }
        }
        Err(e) => {
            ok = false;
            println!("clickhouse {}: UNREACHABLE: {e:#}", cmd.clickhouse.url);
        }
    }
    Ok(ok)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    meterflow_runtime::telemetry::init_logging(&cli.log);
    let result = match &cli.command {
        Command::Topics(c) => run_topics(&c.kafka, &c.topics, c.partitions).await.map(|()| true),
        Command::Migrate(c) => run_migrate(&c.clickhouse, &c.migrations).await.map(|()| true),
        Command::Init(c) => async {
            run_topics(&c.kafka, &c.topics, c.partitions).await?;
            run_migrate(&c.clickhouse, &c.migrations).await?;
            Ok(true)
        }
        .await,
        Command::Status(c) => run_status(c).await,
        Command::Keys(c) => meterflow_admin::keys::run(c).await.map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("meterflow-admin: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
