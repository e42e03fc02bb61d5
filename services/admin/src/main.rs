//! `meterflow-admin`: creates meterflow's topics and applies its ClickHouse migrations.
//!
//! ```text
//! meterflow-admin topics  [--partitions 4] [--dead-letter-partitions N] [--alert-partitions N]
//! meterflow-admin migrate [--migrations-dir schemas/clickhouse] [--cluster NAME]
//! meterflow-admin init    (both)
//! meterflow-admin cluster-ddl --cluster NAME [--database meterflow]   (print the cluster form)
//! meterflow-admin status  (what exists, what is pending; exit 1 if anything is missing)
//! meterflow-admin checkpoint show|replay|reset --service aggregator|rater ...
//! meterflow-admin rerate  [--tenant T] [--reason unpriced|overflow]   (after a catalog fix)
//! meterflow-admin redrive --reason R [--from RFC3339] [--to RFC3339]  (after a meter fix)
//! meterflow-admin keys create --tenant T [--scope ingest|read|admin] | list | revoke KEY_ID
//! meterflow-admin rollups [--repair] [--from RFC3339] [--to RFC3339] [--tenant T]
//! ```
//! Every flag has an environment variable (`--help` shows it).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use meterflow_admin::checkpoints::{self, Service};
use meterflow_admin::migrations::{self, MigrationSource};
use meterflow_admin::replay::{self, RedriveFilter, RerateFilter};
use meterflow_admin::{create_topics, list_topics, Partitions, TopicReport};
use meterflow_runtime::args::{AuthArgs, ClickHouseArgs, Connections, KafkaArgs, LogArgs, TopicArgs};

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
    /// Create the topics (existing topics are left alone).
    Topics(TopicsCmd),
    /// Create the database if missing and apply pending migrations in order.
    Migrate(MigrateCmd),
    /// `topics` then `migrate`.
    Init(InitCmd),
    /// Show which topics exist and which migrations are applied; exit 1 if any is missing.
    Status(StatusCmd),
    /// Re-rate parked aggregates (table parked_current) after the catalog was fixed and the
    /// rater restarted with it: publishes an authenticated rerate request per aggregate to
    /// the aggregates partition it was parked on. Running it twice charges once.
    Rerate(RerateCmd),
    /// Re-publish the original bytes of the usage topic's dead letters with a reason (e.g.
    /// after a missing meter was added) to the usage topic, keyed by tenant. Dedup counts an
    /// event redriven twice once.
    Redrive(RedriveCmd),
    /// Show what a service resumes from, or decide for a partition whose checkpoint and
    /// outputs disagree (the service refuses to start until then; docs/operations.md).
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// Print the cluster form of the migrations (what `migrate --cluster` runs), without
    /// connecting to anything: for review, and for the DDL check on current ClickHouse.
    ClusterDdl(ClusterDdlCmd),
    /// Shadow mode: compare an external biller's export with meterflow's charges.
    Reconcile(meterflow_admin::reconcile::ReconcileCmd),
    /// Leakage audit: check the conservation laws between tables; exit 1 on a finding.
    Audit(meterflow_admin::audit::AuditCmd),
    /// API keys for meterflow-api: create (printed once), list, revoke.
    Keys(meterflow_admin::keys::KeysCmd),
    /// Check the usage rollups against the windows; `--repair` corrects them (after an
    /// aggregator replay re-inserted revisions). Exit 1 on a difference left unrepaired.
    Rollups(meterflow_admin::rollups::RollupsCmd),
}

#[derive(Debug, Args)]
struct RerateCmd {
    #[command(flatten)]
    conn: Connections,
    #[command(flatten)]
    auth: AuthArgs,
    /// Only this tenant's parked aggregates.
    #[arg(long, env = "METERFLOW_RERATE_TENANT")]
    tenant: Option<String>,
    /// Only aggregates parked for this reason.
    #[arg(long, env = "METERFLOW_RERATE_REASON", value_parser = ["unpriced", "overflow"])]
    reason: Option<String>,
}

#[derive(Debug, Args)]
struct RedriveCmd {
    #[command(flatten)]
    conn: Connections,
    /// Dead-letter reason to redrive (e.g. `unknown_meter`).
    #[arg(long, env = "METERFLOW_REDRIVE_REASON")]
    reason: String,
    /// Only dead letters written at or after this time (RFC 3339).
    #[arg(long, env = "METERFLOW_REDRIVE_FROM", value_parser = meterflow_core::time::parse_rfc3339_ms)]
    from: Option<i64>,
    /// Only dead letters written before this time (RFC 3339).
    #[arg(long, env = "METERFLOW_REDRIVE_TO", value_parser = meterflow_core::time::parse_rfc3339_ms)]
    to: Option<i64>,
}

async fn run_rerate(c: &RerateCmd) -> Result<()> {
    let client = meterflow_runtime::clickhouse::client(&c.conn.clickhouse);
    let key = meterflow_runtime::record_key::resolve(&c.auth, &client).await?;
    let filter = RerateFilter { tenant: c.tenant.clone(), reason: c.reason.clone() };
    let topic = &c.conn.topics.aggregates_topic;
    let n = replay::rerate(&c.conn.kafka, topic, &client, &key, &filter).await?;
    println!("published {n} rerate requests to {topic}");
    Ok(())
}

async fn run_redrive(c: &RedriveCmd) -> Result<()> {
    let client = meterflow_runtime::clickhouse::client(&c.conn.clickhouse);
    let filter = RedriveFilter {
        reason: c.reason.clone(),
        from_s: c.from.map(|ms| ms.div_euclid(1000)),
        to_s: c.to.map(|ms| ms.div_euclid(1000)),
    };
    let topic = &c.conn.topics.usage_topic;
    let n = replay::redrive(&c.conn.kafka, topic, &client, &filter).await?;
    println!("redrove {n} dead-lettered events ({}) to {topic}", c.reason);
    Ok(())
}

#[derive(Debug, Subcommand)]
enum CheckpointCmd {
    /// The newest checkpoint of every partition, with the group's committed offsets.
    Show(CheckpointTarget),
    /// Fresh state for one partition from the given offset (events from there on are counted
    /// again: use it after deleting their outputs, or when those outputs were lost).
    Replay(CheckpointReplay),
    /// Fresh state for one partition from the beginning of its topics.
    Reset(CheckpointOne),
}

#[derive(Debug, Args)]
struct CheckpointTarget {
    #[command(flatten)]
    conn: Connections,
    /// Which service's checkpoints.
    #[arg(long, env = "METERFLOW_SERVICE", value_enum)]
    service: Service,
    /// Its consumer group [default: meterflow-aggregator / meterflow-rater].
    #[arg(long, env = "METERFLOW_GROUP")]
    group: Option<String>,
}

#[derive(Debug, Args)]
struct CheckpointOne {
    #[command(flatten)]
    target: CheckpointTarget,
    #[arg(long, env = "METERFLOW_PARTITION")]
    partition: i32,
    /// Why (kept in the checkpoint and logged by the service).
    #[arg(long, env = "METERFLOW_NOTE", default_value = "")]
    note: String,
}

#[derive(Debug, Args)]
struct CheckpointReplay {
    #[command(flatten)]
    one: CheckpointOne,
    /// First offset of the (first) input topic to process.
    #[arg(long, env = "METERFLOW_FROM_OFFSET")]
    from_offset: i64,
    /// Rater only: first offset of the wallet topic [default: 0].
    #[arg(long, env = "METERFLOW_WALLET_FROM_OFFSET", default_value_t = 0)]
    wallet_from_offset: i64,
}

fn group_of(t: &CheckpointTarget) -> String {
    t.group.clone().unwrap_or_else(|| t.service.default_group().to_owned())
}

async fn run_checkpoint(cmd: &CheckpointCmd) -> Result<bool> {
    let (one, action, offsets) = match cmd {
        CheckpointCmd::Show(t) => {
            let group = group_of(t);
            let shown = checkpoints::show(&t.conn.clickhouse, &t.conn.kafka, &t.conn.topics, t.service, &group).await?;
            println!("{} checkpoints of group {group} (database {}):", t.service.name(), t.conn.clickhouse.database);
            if shown.is_empty() {
                println!("  none");
            }
            for s in shown {
                println!(
                    "  partition {:>3}  epoch {} #{}  offsets {:?}  committed {:?}  config {}  written {}{}",
                    s.partition,
                    s.version >> 32,
                    s.version & 0xFFFF_FFFF,
                    if s.meta.offsets.is_empty() { [(String::from("next_offset"), s.next_offset)].into() } else { s.meta.offsets.clone() },
                    s.committed,
                    if s.meta.config_hash.is_empty() { "-" } else { &s.meta.config_hash },
                    s.written,
                    s.meta.operator.as_ref().map(|o| format!("  OPERATOR {} ({})", o.action, o.note)).unwrap_or_default(),
                );
            }
            return Ok(true);
        }
        CheckpointCmd::Reset(one) => {
            let offsets = one.target.service.topics(&one.target.conn.topics).into_iter().map(|t| (t, 0)).collect();
            (one, "reset", offsets)
        }
        CheckpointCmd::Replay(r) => {
            let names = r.one.target.service.topics(&r.one.target.conn.topics);
            let mut offsets = std::collections::BTreeMap::new();
            offsets.insert(names[0].clone(), r.from_offset);
            if let Some(w) = names.get(1) {
                offsets.insert(w.clone(), r.wallet_from_offset);
            }
            (&r.one, "replay", offsets)
        }
    };
    let t = &one.target;
    let d = checkpoints::Decision {
        service: t.service,
        group: group_of(t),
        partition: one.partition,
        offsets,
        action,
        note: one.note.clone(),
    };
    let v = checkpoints::decide(&t.conn.clickhouse, &t.conn.topics, &d).await?;
    println!(
        "{} partition {} of group {}: {action} from {:?} recorded (checkpoint epoch {}); start the service to apply it",
        t.service.name(),
        one.partition,
        d.group,
        d.offsets,
        v >> 32
    );
    Ok(true)
}

#[derive(Debug, Args)]
struct ClusterDdlCmd {
    /// The `remote_servers` cluster name.
    #[arg(long = "cluster", env = "METERFLOW_CLICKHOUSE_CLUSTER")]
    cluster: String,
    /// The database the statements create objects in.
    #[arg(long = "database", env = "METERFLOW_CLICKHOUSE_DATABASE", default_value = "meterflow")]
    database: String,
    #[command(flatten)]
    migrations: MigrationsDir,
}

fn run_cluster_ddl(cmd: &ClusterDdlCmd) -> Result<()> {
    let all = MigrationSource::resolve(cmd.migrations.dir.as_deref()).load()?;
    let target = meterflow_admin::cluster::ClusterTarget::new(&cmd.cluster, &cmd.database)?;
    for m in meterflow_admin::cluster::cluster_migrations(&all, &target)? {
        println!("-- {} (cluster {}, database {})", m.file, target.cluster, target.database);
        for s in &m.statements {
            println!("{s};\n");
        }
    }
    Ok(())
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
struct ClusterArg {
    /// Apply the cluster form of the schema on this ClickHouse cluster (a `remote_servers`
    /// name): replicated shard-local tables, Distributed tables sharded by tenant under the
    /// usual names, views over them, all ON CLUSTER. Without it: the single-node schema.
    #[arg(long = "cluster", env = "METERFLOW_CLICKHOUSE_CLUSTER")]
    cluster: Option<String>,
}

#[derive(Debug, Args)]
struct MigrateCmd {
    #[command(flatten)]
    clickhouse: ClickHouseArgs,
    #[command(flatten)]
    migrations: MigrationsDir,
    #[command(flatten)]
    cluster: ClusterArg,
}

/// Exactly the flags of `topics` and of `migrate`.
#[derive(Debug, Args)]
struct InitCmd {
    #[command(flatten)]
    topics: TopicsCmd,
    #[command(flatten)]
    migrate: MigrateCmd,
}

#[derive(Debug, Args)]
struct StatusCmd {
    #[command(flatten)]
    conn: Connections,
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

async fn run_topics(c: &TopicsCmd) -> Result<()> {
    let reports = create_topics(&c.kafka, &c.topics, c.partitions).await?;
    print_topics(&c.kafka, &reports);
    Ok(())
}

async fn run_migrate(c: &MigrateCmd) -> Result<()> {
    let (clickhouse, cluster) = (&c.clickhouse, &c.cluster);
    let source = MigrationSource::resolve(c.migrations.dir.as_deref());
    let all = source.load()?;
    let n = migrations::migrate_to(clickhouse, &all, cluster.cluster.as_deref()).await?;
    let source = match &cluster.cluster {
        Some(c) => format!("{source}, cluster form on {c}"),
        None => source.to_string(),
    };
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
    let Connections { kafka, topics, clickhouse } = &cmd.conn;
    match list_topics(kafka).await {
        Ok(existing) => {
            println!("kafka {}: reachable ({} topics)", kafka.brokers, existing.len());
            for t in topics.all() {
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
            println!("kafka {}: UNREACHABLE: {e:#}", kafka.brokers);
        }
    }

    let source = MigrationSource::resolve(cmd.migrations.dir.as_deref());
    let all = source.load()?;
    match migrations::applied(clickhouse).await {
        Ok(done) => {
            println!(
                "clickhouse {}: reachable, database {} ({} of {} migrations applied; files: {source})",
                clickhouse.url,
                clickhouse.database,
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
            println!("clickhouse {}: UNREACHABLE: {e:#}", clickhouse.url);
        }
    }
    Ok(ok)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    meterflow_runtime::telemetry::init_logging(&cli.log);
    let result = match &cli.command {
        Command::Topics(c) => run_topics(c).await.map(|()| true),
        Command::Migrate(c) => run_migrate(c).await.map(|()| true),
        Command::Init(c) => async {
            run_topics(&c.topics).await?;
            run_migrate(&c.migrate).await?;
            Ok(true)
        }
        .await,
        Command::Status(c) => run_status(c).await,
        Command::Checkpoint(c) => run_checkpoint(c).await,
        Command::Rerate(c) => run_rerate(c).await.map(|()| true),
        Command::Redrive(c) => run_redrive(c).await.map(|()| true),
        Command::ClusterDdl(c) => run_cluster_ddl(c).map(|()| true),
        Command::Reconcile(c) => meterflow_admin::reconcile::run(c).await.map(|(ok, _)| ok),
        Command::Audit(c) => meterflow_admin::audit::run(c).await.map(|r| r.findings.is_empty()),
        Command::Keys(c) => meterflow_admin::keys::run(c).await.map(|()| true),
        Command::Rollups(c) => meterflow_admin::rollups::run(c).await,
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
