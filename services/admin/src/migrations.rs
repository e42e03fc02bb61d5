//! ClickHouse schema migrations: `NNN_name.sql` files applied in order, each recorded in
//! `schema_migrations` so that re-running is a no-op.
//!
//! A file is split into statements on `;` (comments stripped) and its statements run one by
//! one; the file is recorded only after all of them succeeded, so a file that failed half way
//! is re-run from its start: keep statements idempotent (`IF NOT EXISTS`). The checksum covers
//! the statements, not comments or blank lines: editing a comment is harmless, changing SQL
//! of an applied file is an error (add a new file instead).

use std::collections::BTreeMap;
use std::hash::Hasher as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use meterflow_runtime::args::ClickHouseArgs;
use serde::Deserialize;

use crate::cluster::{self, ClusterTarget};
use crate::sql::{quote_ident, quote_str, split_statements};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_migrations.rs"));
}

/// The table recording applied migrations, in the migrated database.
pub const MIGRATIONS_TABLE: &str = "schema_migrations";

/// The repository's migrations directory as seen at compile time.
pub fn repo_migrations_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas/clickhouse"))
}

/// One migration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// The `NNN` of `NNN_name.sql`.
    pub version: u32,
    /// The `name` of `NNN_name.sql`.
    pub name: String,
    /// The file name.
    pub file: String,
    pub statements: Vec<String>,
    /// Hex checksum of the statements (comments and blank lines excluded).
    pub checksum: String,
}

impl Migration {
    /// Parses a file named `NNN_name.sql` with contents `sql`.
    pub fn parse(file: &str, sql: &str) -> Result<Self> {
        let stem = file
            .strip_suffix(".sql")
            .with_context(|| format!("migration {file:?}: not a .sql file"))?;
        let (digits, name) = stem
            .split_once('_')
            .with_context(|| format!("migration {file:?}: expected NNN_name.sql"))?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || name.is_empty() {
            bail!("migration {file:?}: expected NNN_name.sql");
        }
        let version: u32 = digits.parse().with_context(|| format!("migration {file:?}: bad version"))?;
        let statements = split_statements(sql);
        if statements.is_empty() {
            bail!("migration {file:?} has no statements");
        }
        Ok(Self { version, name: name.to_string(), file: file.to_string(), checksum: checksum(&statements), statements })
    }
}

fn checksum(statements: &[String]) -> String {
    let mut h = siphasher::sip128::SipHasher13::new_with_keys(0x6d65_7465_7266_6c6f, 0x7720_6d69_6772_6174);
    for s in statements {
        h.write(s.as_bytes());
        h.write(b"\0;\0");
    }
    format!("{:032x}", siphasher::sip128::Hasher128::finish128(&h).as_u128())
}

/// Where migrations come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationSource {
    /// `NNN_name.sql` files in a directory.
    Dir(PathBuf),
    /// The repository's files as they were when this binary was compiled.
    Embedded,
}

impl MigrationSource {
    /// `dir` if given; else the repository's `schemas/clickhouse` if it is still where it was at
    /// compile time; else the embedded copy.
    pub fn resolve(dir: Option<&Path>) -> Self {
        match dir {
            Some(d) => Self::Dir(d.to_path_buf()),
            None => {
                let repo = repo_migrations_dir();
                if repo.is_dir() {
                    Self::Dir(repo.canonicalize().unwrap_or(repo))
                } else {
                    Self::Embedded
                }
            }
        }
    }

    /// The migrations, sorted by version.
    pub fn load(&self) -> Result<Vec<Migration>> {
        let mut files = Vec::new();
        match self {
            Self::Dir(dir) => {
                let entries =
                    std::fs::read_dir(dir).with_context(|| format!("reading migrations dir {}", dir.display()))?;
                for entry in entries {
                    let entry = entry?;
                    let file = entry.file_name().to_string_lossy().into_owned();
                    if !file.ends_with(".sql") || !entry.path().is_file() {
                        continue;
                    }
                    let sql = std::fs::read_to_string(entry.path())
                        .with_context(|| format!("reading {}", entry.path().display()))?;
                    files.push((file, sql));
                }
                if files.is_empty() {
                    bail!("no *.sql migrations in {}", dir.display());
                }
            }
            Self::Embedded => {
                files.extend(embedded::EMBEDDED.iter().map(|(f, s)| ((*f).to_string(), (*s).to_string())));
            }
        }
        let mut by_version: BTreeMap<u32, Migration> = BTreeMap::new();
        for (file, sql) in files {
            let m = Migration::parse(&file, &sql)?;
            if let Some(other) = by_version.get(&m.version) {
                bail!("migrations {} and {} have the same version {}", other.file, m.file, m.version);
            }
            by_version.insert(m.version, m);
        }
        Ok(by_version.into_values().collect())
    }
}

impl std::fmt::Display for MigrationSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(d) => write!(f, "{}", d.display()),
            Self::Embedded => write!(f, "embedded copy of {}", embedded::SOURCE_DIR),
        }
    }
}

/// A row of `schema_migrations`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct AppliedMigration {
    pub version: u32,
    pub name: String,
    pub checksum: String,
    /// `applied_at` as `YYYY-MM-DD hh:mm:ss` (UTC on the local server).
    pub applied_at: String,
}

fn check_database_name(db: &str) -> Result<()> {
    if db.is_empty() || !db.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        bail!("database name {db:?} must be non-empty ASCII letters, digits and underscores");
    }
    Ok(())
}

fn describe_ch_error(args: &ClickHouseArgs, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!(
        "ClickHouse at {} failed: {e}\n  (is it running? `make up` starts a local one; `make status` shows it)",
        args.url
    )
}

/// Creates `args.database` if missing and the migrations table in it; with `cluster`, on every
/// node of that cluster (`ON CLUSTER`), the migrations table replicated to all of them. Refuses a
/// database migrated in the other form: its tables would be the wrong kind.
pub async fn ensure_database(args: &ClickHouseArgs, cluster: Option<&ClusterTarget>) -> Result<()> {
    check_database_name(&args.database)?;
    let admin = meterflow_runtime::clickhouse::admin_client(args);
    if database_exists(args).await? {
        let engine: Vec<String> = admin
            .query_raw(&format!(
                "SELECT engine FROM system.tables WHERE database = {} AND name = {}",
                quote_str(&args.database),
                quote_str(MIGRATIONS_TABLE)
            ))
            .fetch_all::<String>()
            .await
            .map_err(|e| describe_ch_error(args, e))?;
        if let Some(engine) = engine.first() {
            let replicated = engine.starts_with("Replicated");
            match (cluster, replicated) {
                (Some(c), false) => bail!(
                    "database {} was migrated in the single-node form; it cannot be migrated --cluster {} \
                     (use a new database)",
                    args.database,
                    c.cluster
                ),
                (None, true) => bail!(
                    "database {} was migrated in the cluster form (replicated tables); use migrate --cluster",
                    args.database
                ),
                _ => {}
            }
        }
    }
    let client = meterflow_runtime::clickhouse::client(args);
    match cluster {
        None => {
            admin
                .query_raw(&format!("CREATE DATABASE IF NOT EXISTS {}", quote_ident(&args.database)))
                .execute()
                .await
                .map_err(|e| describe_ch_error(args, e))?;
            client
                .query_raw(&format!(
                    "CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} \
                     (version UInt32, name String, checksum String, applied_at DateTime DEFAULT now()) \
                     ENGINE = MergeTree ORDER BY version"
                ))
                .execute()
                .await
                .with_context(|| format!("creating {}.{MIGRATIONS_TABLE}", args.database))?;
        }
        Some(c) => {
            admin
                .query_raw(&cluster::create_database(c))
                .execute()
                .await
                .map_err(|e| describe_ch_error(args, e))
                .with_context(|| format!("creating database {} on cluster {}", args.database, c.cluster))?;
            client
                .query_raw(&cluster::migrations_table(c, MIGRATIONS_TABLE))
                .execute()
                .await
                .with_context(|| format!("creating {}.{MIGRATIONS_TABLE} on cluster {}", args.database, c.cluster))?;
        }
    }
    Ok(())
}

/// Whether `args.database` exists.
pub async fn database_exists(args: &ClickHouseArgs) -> Result<bool> {
    let admin = meterflow_runtime::clickhouse::admin_client(args);
    let n: u64 = admin
        .query_raw(&format!("SELECT count() FROM system.databases WHERE name = {}", quote_str(&args.database)))
        .fetch_one()
        .await
        .map_err(|e| describe_ch_error(args, e))?;
    Ok(n > 0)
}

/// The recorded migrations of `args.database`, by version; empty if the database or the table
/// does not exist.
pub async fn applied(args: &ClickHouseArgs) -> Result<Vec<AppliedMigration>> {
    if !database_exists(args).await? {
        return Ok(Vec::new());
    }
    let client = meterflow_runtime::clickhouse::client(args);
    let exists: u64 = client
        .query_raw(&format!(
            "SELECT count() FROM system.tables WHERE database = {} AND name = {}",
            quote_str(&args.database),
            quote_str(MIGRATIONS_TABLE)
        ))
        .fetch_one()
        .await?;
    if exists == 0 {
        return Ok(Vec::new());
    }
    let rows = client
        .query_raw(&format!(
            "SELECT version, name, checksum, toString(applied_at) FROM {MIGRATIONS_TABLE} ORDER BY version"
        ))
        .fetch_all::<AppliedMigration>()
        .await?;
    Ok(rows)
}

/// Checks recorded migrations against the files: an applied file whose SQL changed is an error.
/// Returns the ones still to apply.
pub fn pending<'a>(migrations: &'a [Migration], applied: &[AppliedMigration]) -> Result<Vec<&'a Migration>> {
    let applied: BTreeMap<u32, &AppliedMigration> = applied.iter().map(|a| (a.version, a)).collect();
    let mut todo = Vec::new();
    for m in migrations {
        match applied.get(&m.version) {
            None => todo.push(m),
            Some(a) if a.checksum != m.checksum || a.name != m.name => bail!(
                "migration {} was applied as {:03}_{}.sql with checksum {} on {}, but the file now has checksum {}: \
                 never change an applied migration, add a new one (or drop the database if it is disposable)",
                m.file,
                a.version,
                a.name,
                a.checksum,
                a.applied_at,
                m.checksum
            ),
            Some(_) => {}
        }
    }
    Ok(todo)
}

/// Applies `migrations` not yet recorded in `args.database` (created if missing). Returns how
/// many were applied; 0 when up to date.
pub async fn migrate_with(args: &ClickHouseArgs, migrations: &[Migration]) -> Result<usize> {
    migrate_to(args, migrations, None).await
}

/// Like [`migrate_with`]; with `cluster` (a `remote_servers` name), applies the cluster form
/// of the migrations ([`crate::cluster`]) through the node at `args.url`: replicated shard-local
/// tables, Distributed tables under the original names, views over them, all `ON CLUSTER`.
pub async fn migrate_to(args: &ClickHouseArgs, migrations: &[Migration], cluster: Option<&str>) -> Result<usize> {
    check_database_name(&args.database)?;
    let target = cluster.map(|c| ClusterTarget::new(c, &args.database)).transpose()?;
    let transformed;
    let migrations = match &target {
        Some(t) => {
            transformed = cluster::cluster_migrations(migrations, t)?;
            &transformed[..]
        }
        None => migrations,
    };
    ensure_database(args, target.as_ref()).await?;
    let done = applied(args).await?;
    let known: std::collections::BTreeSet<u32> = migrations.iter().map(|m| m.version).collect();
    for a in done.iter().filter(|a| !known.contains(&a.version)) {
        tracing::warn!(version = a.version, name = %a.name, "database has a migration this binary does not know");
    }
    let todo = pending(migrations, &done)?;
    let client = meterflow_runtime::clickhouse::client(args);
    for m in &todo {
        for (i, statement) in m.statements.iter().enumerate() {
            client.query_raw(statement).execute().await.with_context(|| {
                format!(
                    "migration {} statement {} of {} failed in database {}:\n{statement}",
                    m.file,
                    i + 1,
                    m.statements.len(),
                    args.database
                )
            })?;
        }
        client
            .query_raw(&format!(
                "INSERT INTO {MIGRATIONS_TABLE} (version, name, checksum) VALUES ({}, {}, {})",
                m.version,
                quote_str(&m.name),
                quote_str(&m.checksum)
            ))
            .execute()
            .await
            .with_context(|| format!("recording migration {}", m.file))?;
        tracing::info!(file = %m.file, statements = m.statements.len(), database = %args.database, cluster = ?cluster, "applied migration");
    }
    ensure_record_key(&client).await?;
    Ok(todo.len())
}

/// Puts a random record key (see `meterflow_core::auth`) into `record_keys` when the table
/// exists and is empty. Two `migrate`s racing could both insert one; the services take the
/// oldest (then smallest), so they still agree.
pub async fn ensure_record_key(client: &clickhouse::Client) -> Result<()> {
    let exists: u64 = client
        .query("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name = 'record_keys'")
        .fetch_one()
        .await?;
    if exists == 0 {
        return Ok(());
    }
    let keys: u64 = client.query("SELECT count() FROM record_keys").fetch_one().await?;
    if keys > 0 {
        return Ok(());
    }
    let mut bytes = [0u8; meterflow_core::auth::GENERATED_KEY_LEN];
    // ThreadRng: ChaCha12 seeded from the OS, a CSPRNG.
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    let key = meterflow_core::auth::RecordKey::from_bytes(&bytes)?;
    client
        .query("INSERT INTO record_keys (key_hex) VALUES (?)")
        .bind(key.to_hex())
        .execute()
        .await
        .context("inserting a generated record key")?;
    tracing::info!("generated a random record key into record_keys");
    Ok(())
}

/// Applies the migrations of `dir` (see [`MigrationSource::resolve`] for `None`) to
/// `args.database`, creating it if missing. Returns how many were applied.
pub async fn migrate(args: &ClickHouseArgs, dir: Option<&Path>) -> Result<usize> {
    let source = MigrationSource::resolve(dir);
    let migrations = source.load()?;
    migrate_with(args, &migrations).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        let m = Migration::parse("007_add_x.sql", "-- c\nSELECT 1;").unwrap();
        assert_eq!((m.version, m.name.as_str()), (7, "add_x"));
        assert!(Migration::parse("add_x.sql", "SELECT 1").is_err());
        assert!(Migration::parse("007_.sql", "SELECT 1").is_err());
        assert!(Migration::parse("007_x.sql", "-- nothing").is_err());
    }

    #[test]
    fn checksum_ignores_comments_but_not_sql() {
        let a = Migration::parse("001_a.sql", "-- one\nCREATE TABLE t (x UInt8) ENGINE = Log;").unwrap();
        let b = Migration::parse("001_a.sql", "-- two\n\nCREATE TABLE t (x UInt8) ENGINE = Log;\n").unwrap();
        let c = Migration::parse("001_a.sql", "CREATE TABLE t (x UInt16) ENGINE = Log;").unwrap();
        assert_eq!(a.checksum, b.checksum);
        assert_ne!(a.checksum, c.checksum);
    }

    #[test]
    fn embedded_matches_repo_files() {
        let repo = MigrationSource::Dir(repo_migrations_dir()).load().unwrap();
        let embedded = MigrationSource::Embedded.load().unwrap();
        assert_eq!(repo, embedded);
        assert!(repo.len() >= 6);
        assert!(repo.windows(2).all(|w| w[0].version < w[1].version));
    }

    #[test]
    fn pending_rejects_changed_files() {
        let ms = vec![Migration::parse("001_a.sql", "SELECT 1").unwrap(), Migration::parse("002_b.sql", "SELECT 2").unwrap()];
        let applied = vec![AppliedMigration {
            version: 1,
            name: "a".into(),
            checksum: ms[0].checksum.clone(),
            applied_at: String::new(),
        }];
        let todo = pending(&ms, &applied).unwrap();
        assert_eq!(todo.len(), 1);
        assert_eq!(todo[0].version, 2);
        let changed = vec![AppliedMigration { checksum: "00".into(), ..applied[0].clone() }];
        assert!(pending(&ms, &changed).unwrap_err().to_string().contains("never change an applied migration"));
    }
}
