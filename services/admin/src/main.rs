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

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser as _;
use meterflow_admin::checkpoints;
use meterflow_admin::cli::*;
use meterflow_admin::migrations::{self, MigrationSource};
use meterflow_admin::replay::{self, RedriveFilter, RerateFilter};
use meterflow_admin::{create_topics, list_topics, TopicReport};
use meterflow_runtime::args::{Connections, KafkaArgs};

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
