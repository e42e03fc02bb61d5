//! `meterflow-admin`'s command line, in the library so that the deployment check
//! (tools/tests/deployment.rs) can ask clap which environment variables each command reads.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use meterflow_runtime::args::{AuthArgs, ClickHouseArgs, Connections, KafkaArgs, LogArgs, TopicArgs};

use crate::checkpoints::Service;
use crate::Partitions;

#[derive(Debug, Parser)]
#[command(name = "meterflow-admin", version, about = "Creates meterflow's Kafka topics and applies its ClickHouse migrations.")]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    Reconcile(crate::reconcile::ReconcileCmd),
    /// Leakage audit: check the conservation laws between tables; exit 1 on a finding.
    Audit(crate::audit::AuditCmd),
    /// API keys for meterflow-api: create (printed once), list, revoke.
    Keys(crate::keys::KeysCmd),
    /// Check the usage rollups against the windows; `--repair` corrects them (after an
    /// aggregator replay re-inserted revisions). Exit 1 on a difference left unrepaired.
    Rollups(crate::rollups::RollupsCmd),
}

#[derive(Debug, Args)]
pub struct RerateCmd {
    #[command(flatten)]
    pub conn: Connections,
    #[command(flatten)]
    pub auth: AuthArgs,
    /// Only this tenant's parked aggregates.
    #[arg(long, env = "METERFLOW_RERATE_TENANT")]
    pub tenant: Option<String>,
    /// Only aggregates parked for this reason.
    #[arg(long, env = "METERFLOW_RERATE_REASON", value_parser = ["unpriced", "overflow"])]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct RedriveCmd {
    #[command(flatten)]
    pub conn: Connections,
    /// Dead-letter reason to redrive (e.g. `unknown_meter`).
    #[arg(long, env = "METERFLOW_REDRIVE_REASON")]
    pub reason: String,
    /// Only dead letters written at or after this time (RFC 3339).
    #[arg(long, env = "METERFLOW_REDRIVE_FROM", value_parser = meterflow_core::time::parse_rfc3339_ms)]
    pub from: Option<i64>,
    /// Only dead letters written before this time (RFC 3339).
    #[arg(long, env = "METERFLOW_REDRIVE_TO", value_parser = meterflow_core::time::parse_rfc3339_ms)]
    pub to: Option<i64>,
}

#[derive(Debug, Subcommand)]
pub enum CheckpointCmd {
    /// The newest checkpoint of every partition, with the group's committed offsets.
    Show(CheckpointTarget),
    /// Fresh state for one partition from the given offset (events from there on are counted
    /// again: use it after deleting their outputs, or when those outputs were lost).
    Replay(CheckpointReplay),
    /// Fresh state for one partition from the beginning of its topics.
    Reset(CheckpointOne),
}

#[derive(Debug, Args)]
pub struct CheckpointTarget {
    #[command(flatten)]
    pub conn: Connections,
    /// Which service's checkpoints.
    #[arg(long, env = "METERFLOW_SERVICE", value_enum)]
    pub service: Service,
    /// Its consumer group [default: meterflow-aggregator / meterflow-rater].
    #[arg(long, env = "METERFLOW_GROUP")]
    pub group: Option<String>,
}

#[derive(Debug, Args)]
pub struct CheckpointOne {
    #[command(flatten)]
    pub target: CheckpointTarget,
    #[arg(long, env = "METERFLOW_PARTITION")]
    pub partition: i32,
    /// Why (kept in the checkpoint and logged by the service).
    #[arg(long, env = "METERFLOW_NOTE", default_value = "")]
    pub note: String,
}

#[derive(Debug, Args)]
pub struct CheckpointReplay {
    #[command(flatten)]
    pub one: CheckpointOne,
    /// First offset of the (first) input topic to process.
    #[arg(long, env = "METERFLOW_FROM_OFFSET")]
    pub from_offset: i64,
    /// Rater only: first offset of the wallet topic [default: 0].
    #[arg(long, env = "METERFLOW_WALLET_FROM_OFFSET", default_value_t = 0)]
    pub wallet_from_offset: i64,
}

#[derive(Debug, Args)]
pub struct ClusterDdlCmd {
    /// The `remote_servers` cluster name.
    #[arg(long = "cluster", env = "METERFLOW_CLICKHOUSE_CLUSTER")]
    pub cluster: String,
    /// The database the statements create objects in.
    #[arg(long = "database", env = "METERFLOW_CLICKHOUSE_DATABASE", default_value = "meterflow")]
    pub database: String,
    #[command(flatten)]
    pub migrations: MigrationsDir,
}

#[derive(Debug, Args)]
pub struct TopicsCmd {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topics: TopicArgs,
    #[command(flatten)]
    pub partitions: Partitions,
}

#[derive(Debug, Args)]
pub struct MigrationsDir {
    /// Directory of NNN_name.sql files [default: the repository's schemas/clickhouse, or the
    /// copy embedded at build time when the repository is not there].
    #[arg(long = "migrations-dir", env = "METERFLOW_MIGRATIONS_DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ClusterArg {
    /// Apply the cluster form of the schema on this ClickHouse cluster (a `remote_servers`
    /// name): replicated shard-local tables, Distributed tables sharded by tenant under the
    /// usual names, views over them, all ON CLUSTER. Without it: the single-node schema.
    #[arg(long = "cluster", env = "METERFLOW_CLICKHOUSE_CLUSTER")]
    pub cluster: Option<String>,
}

#[derive(Debug, Args)]
pub struct MigrateCmd {
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    #[command(flatten)]
    pub migrations: MigrationsDir,
    #[command(flatten)]
    pub cluster: ClusterArg,
}

/// Exactly the flags of `topics` and of `migrate`.
#[derive(Debug, Args)]
pub struct InitCmd {
    #[command(flatten)]
    pub topics: TopicsCmd,
    #[command(flatten)]
    pub migrate: MigrateCmd,
}

#[derive(Debug, Args)]
pub struct StatusCmd {
    #[command(flatten)]
    pub conn: Connections,
    #[command(flatten)]
    pub migrations: MigrationsDir,
}
