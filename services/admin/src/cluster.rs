//! Cluster DDL *derived* from the single-node migrations, so that every migration file (present
//! and future) gets its replicated, sharded form without a hand-kept second copy.
//!
//! For a cluster `C` (a `remote_servers` entry) and database `D`:
//!
//! - `CREATE TABLE t (...) ENGINE = XMergeTree(args) ...` becomes the shard-local table
//!   `D.t_local ON CLUSTER C` with `ReplicatedXMergeTree('/clickhouse/tables/{shard}/D/t_local',
//!   '{replica}', args)` and the rest of the statement unchanged, plus the `Distributed` table
//!   `D.t ON CLUSTER C` with the same columns under the original name. The services and the
//!   views keep using `t`: inserts go through the Distributed table to one replica of the shard
//!   and replication copies them; reads fan out to one replica per shard.
//! - The sharding key is `cityHash64(tenant)` when the table has a `tenant` column (a tenant's
//!   rows live on one shard, so per-tenant queries touch one shard's data), else
//!   `cityHash64(<the ORDER BY key>)`. Either is a pure function of the row: a replayed,
//!   byte-identical row lands on the shard of the original, where ReplacingMergeTree (and the
//!   views' GROUP BY) fold it. A random key would scatter replays over shards.
//! - Views become `CREATE VIEW D.v ON CLUSTER C`, reading the Distributed tables. Table names
//!   after `FROM`/`JOIN` are qualified with `D.`: ClickHouse 18.16 runs an `ON CLUSTER` view's
//!   query on each host in that host's `default` database otherwise.
//! - `CREATE MATERIALIZED VIEW m TO t AS SELECT ... FROM s` reads `s_local` and writes
//!   `t_local` on every node (a materialized view fires on the node that received the insert;
//!   replication copies its output).
//! - `ALTER TABLE t` applies to `t_local` and, for column changes, to the Distributed `t` too;
//!   `DROP TABLE`/`DROP VIEW` drop both forms.
//!
//! Anything else is refused with the statement named, so a new kind of DDL fails `migrate
//! --cluster` (and this crate's tests) instead of silently producing a single-node object.

use std::collections::BTreeSet;

use anyhow::{bail, Context as _, Result};

use crate::migrations::Migration;
use crate::sql::quote_str;

mod lex;
use lex::{concat, lex, matching_paren, significant, Cursor, Kind, Tok};

/// Suffix of the shard-local replicated table behind each Distributed table.
pub const LOCAL_SUFFIX: &str = "_local";

/// Where the cluster DDL goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTarget {
    /// The `remote_servers` cluster name.
    pub cluster: String,
    /// The database every node gets.
    pub database: String,
}

impl ClusterTarget {
    pub fn new(cluster: &str, database: &str) -> Result<Self> {
        for (what, v) in [("cluster", cluster), ("database", database)] {
            if !is_plain_ident(v) {
                bail!("{what} name {v:?} must be non-empty ASCII letters, digits and underscores");
            }
        }
        Ok(Self { cluster: cluster.to_string(), database: database.to_string() })
    }

    /// The ZooKeeper path of a replicated table: one per shard (`{shard}` macro), replicas
    /// named by the `{replica}` macro. The database and table are spelled out because 18.16
    /// has no `{database}`/`{table}` macros.
    pub fn zk_path(&self, local_table: &str) -> String {
        format!("/clickhouse/tables/{{shard}}/{}/{local_table}", self.database)
    }

    fn q(&self, table: &str) -> String {
        format!("{}.{table}", self.database)
    }
}

fn is_plain_ident(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

/// The migrations in cluster form: same versions, names and checksums (the checksum is the
/// file's, so `schema_migrations` compares like the single-node form), statements transformed.
/// All of `migrations` are transformed in order, applied or not, because a view refers to
/// tables of earlier files.
pub fn cluster_migrations(migrations: &[Migration], target: &ClusterTarget) -> Result<Vec<Migration>> {
    let mut schema = Schema::default();
    migrations
        .iter()
        .map(|m| {
            let mut statements = Vec::new();
            for (i, s) in m.statements.iter().enumerate() {
                let out = transform(s, &mut schema, target).with_context(|| {
                    format!("cluster form of migration {} statement {}:\n{s}", m.file, i + 1)
                })?;
                statements.extend(out);
            }
            Ok(Migration { statements, ..m.clone() })
        })
        .collect()
}

/// What earlier statements created.
#[derive(Debug, Default)]
struct Schema {
    /// Tables with a `_local` replicated table behind a Distributed one.
    tables: BTreeSet<String>,
    views: BTreeSet<String>,
}

// ---------------------------------------------------------------------------------------------
// the transformation

fn transform(stmt: &str, schema: &mut Schema, target: &ClusterTarget) -> Result<Vec<String>> {
    let toks = lex(stmt);
    let mut c = Cursor::new(&toks);
    if c.eat_kw("CREATE") {
        if c.eat_kw("TABLE") {
            return create_table(&toks, c, schema, target);
        }
        if c.eat_kw("VIEW") {
            return create_view(&toks, c, schema, target);
        }
        if c.eat_kws(&["MATERIALIZED", "VIEW"]) {
            return create_materialized_view(&toks, c, schema, target);
        }
        if c.eat_kw("DATABASE") {
            bail!("migrations must not create databases (migrate creates the one it applies to)");
        }
    } else if c.eat_kws(&["ALTER", "TABLE"]) {
        return alter_table(&toks, c, schema, target);
    } else if c.eat_kw("DROP") {
        return drop(c, schema, target);
    } else if c.peek().is_some_and(|t| t.is_kw("INSERT") || t.is_kw("SELECT")) {
        // Runs on the node migrate talks to, in the database; INSERT goes through the
        // Distributed table like the services' inserts.
        return Ok(vec![stmt.to_string()]);
    }
    bail!(
        "no cluster form for this statement (supported: CREATE TABLE with a *MergeTree engine, CREATE VIEW, \
         CREATE MATERIALIZED VIEW ... TO, ALTER TABLE, DROP TABLE/VIEW, INSERT, SELECT); \
         extend services/admin/src/cluster.rs"
    )
}

fn if_not_exists(c: &mut Cursor<'_, '_>) -> &'static str {
    if c.eat_kws(&["IF", "NOT", "EXISTS"]) {
        "IF NOT EXISTS "
    } else {
        ""
    }
}

/// The top-level column names of a column list `( ... )` (indexes and constraints skipped).
fn column_names(toks: &[Tok<'_>]) -> Vec<String> {
    let mut names = Vec::new();
    let mut depth = 0usize;
    let mut expect_name = true;
    for t in toks {
        if t.is("(") {
            depth += 1;
            continue;
        }
        if t.is(")") {
            depth = depth.saturating_sub(1);
            continue;
        }
        if depth == 1 && t.is(",") {
            expect_name = true;
            continue;
        }
        if depth == 1 && expect_name && t.kind != Kind::Space {
            expect_name = false;
            let skip = ["INDEX", "CONSTRAINT", "PROJECTION"].iter().any(|k| t.is_kw(k));
            if !skip {
                if let Some(n) = t.name() {
                    names.push(n);
                }
            }
        }
    }
    names
}

/// `ORDER BY` expression of a table's clauses, outer parentheses removed.
fn order_by(toks: &[Tok<'_>]) -> Option<String> {
    let sig = significant(toks);
    let mut depth = 0usize;
    let mut start = None;
    let mut end = toks.len();
    for (k, &i) in sig.iter().enumerate() {
        let t = toks[i];
        if t.is("(") {
            depth += 1;
        } else if t.is(")") {
            depth = depth.saturating_sub(1);
        } else if depth == 0 {
            if start.is_none() && t.is_kw("ORDER") && sig.get(k + 1).is_some_and(|&j| toks[j].is_kw("BY")) {
                start = Some(sig[k + 1] + 1);
            } else if start.is_some_and(|s| i >= s)
                && ["PARTITION", "PRIMARY", "SAMPLE", "TTL", "SETTINGS"].iter().any(|kw| t.is_kw(kw))
            {
                end = i;
                break;
            }
        }
    }
    let expr = concat(&toks[start?..end]);
    let expr = expr.trim();
    let inner = expr.strip_prefix('(').and_then(|e| e.strip_suffix(')'));
    // Only strip when the parentheses enclose the whole expression.
    let stripped = match inner {
        Some(inner) if matching_paren(&lex(expr), 0).ok() == Some(lex(expr).len() - 1) => inner.trim(),
        _ => expr,
    };
    Some(stripped.to_string())
}

fn create_table(toks: &[Tok<'_>], mut c: Cursor<'_, '_>, schema: &mut Schema, t: &ClusterTarget) -> Result<Vec<String>> {
    let ine = if_not_exists(&mut c);
    let name = c.name()?;
    if !c.peek().is_some_and(|t| t.is("(")) {
        bail!("table {name}: expected a column list (CREATE TABLE ... AS is not supported in cluster mode)");
    }
    let open = c.index();
    let close = matching_paren(toks, open)?;
    let columns_toks = &toks[open..=close];
    let columns = concat(columns_toks);
    c.seek(close + 1);
    c.expect_kw("ENGINE")?;
    if !c.bump().is_some_and(|t| t.is("=")) {
        bail!("table {name}: expected ENGINE =");
    }
    let engine_at = c.index();
    let engine = c.bump().and_then(|t| (t.kind == Kind::Word).then_some(t.text)).context("expected an engine name")?;
    // The clauses after the engine, from right after it (keeping their leading whitespace).
    let mut rest_start = engine_at + 1;
    if !engine.ends_with("MergeTree") || engine.starts_with("Replicated") {
        bail!("table {name}: engine {engine} has no cluster form (only non-replicated *MergeTree engines are derived)");
    }
    let mut args = None;
    if c.peek().is_some_and(|t| t.is("(")) {
        let open = c.index();
        let close = matching_paren(toks, open)?;
        let inner = concat(&toks[open + 1..close]).trim().to_string();
        if !inner.is_empty() {
            args = Some(inner);
        }
        c.seek(close + 1);
        rest_start = close + 1;
    }
    let rest_toks = &toks[rest_start..];
    let rest = concat(rest_toks);
    let cols = column_names(columns_toks);
    let key = if cols.iter().any(|n| n == "tenant") {
        "cityHash64(tenant)".to_string()
    } else {
        let ob = order_by(rest_toks).with_context(|| format!("table {name}: no tenant column and no ORDER BY to shard by"))?;
        if ob.is_empty() || ob == "tuple()" {
            bail!("table {name}: no tenant column and an empty ORDER BY: nothing deterministic to shard by");
        }
        format!("cityHash64({ob})")
    };
    let local = format!("{name}{LOCAL_SUFFIX}");
    let mut engine_args = format!("{}, '{{replica}}'", quote_str(&t.zk_path(&local)));
    if let Some(a) = args {
        engine_args.push_str(", ");
        engine_args.push_str(&a);
    }
    let cl = &t.cluster;
    let local_stmt = format!(
        "CREATE TABLE {ine}{} ON CLUSTER {cl}\n{columns}\nENGINE = Replicated{engine}({engine_args}){rest}",
        t.q(&local)
    );
    let dist_stmt = format!(
        "CREATE TABLE {ine}{} ON CLUSTER {cl}\n{columns}\nENGINE = Distributed({}, {}, {}, {key})",
        t.q(&name),
        quote_str(cl),
        quote_str(&t.database),
        quote_str(&local)
    );
    schema.tables.insert(name);
    Ok(vec![local_stmt, dist_stmt])
}

/// Which form of a table a query should read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// The Distributed table (whole cluster).
    Distributed,
    /// The shard-local table (materialized views: they see the inserts into it).
    Local,
}

/// `select` with the names after FROM/JOIN that earlier statements created qualified with the
/// database (and, for [`Read::Local`], turned into their `_local` tables). Unknown names are
/// left alone: the DDL then fails on the cluster naming them.
fn qualify(toks: &[Tok<'_>], schema: &Schema, t: &ClusterTarget, read: Read) -> Result<String> {
    let sig = significant(toks);
    let mut out = String::new();
    let mut replace: std::collections::BTreeMap<usize, String> = std::collections::BTreeMap::new();
    for (k, &i) in sig.iter().enumerate() {
        if !(toks[i].is_kw("FROM") || toks[i].is_kw("JOIN")) {
            continue;
        }
        let Some(&j) = sig.get(k + 1) else { continue };
        let Some(name) = toks[j].name() else { continue };
        let next = sig.get(k + 2).map(|&n| toks[n]);
        if next.is_some_and(|n| n.is(".") || n.is("(")) {
            continue;
        }
        let new = if schema.tables.contains(&name) {
            match read {
                Read::Distributed => t.q(&name),
                Read::Local => t.q(&format!("{name}{LOCAL_SUFFIX}")),
            }
        } else if schema.views.contains(&name) {
            if read == Read::Local {
                bail!("materialized view reads the view {name}: only tables are supported in cluster mode");
            }
            t.q(&name)
        } else {
            continue;
        };
        replace.insert(j, new);
    }
    for (i, tok) in toks.iter().enumerate() {
        match replace.get(&i) {
            Some(r) => out.push_str(r),
            None => out.push_str(tok.text),
        }
    }
    Ok(out)
}

fn create_view(toks: &[Tok<'_>], mut c: Cursor<'_, '_>, schema: &mut Schema, t: &ClusterTarget) -> Result<Vec<String>> {
    let ine = if_not_exists(&mut c);
    let name = c.name()?;
    c.expect_kw("AS")?;
    let body = qualify(&toks[c.index()..], schema, t, Read::Distributed)?;
    schema.views.insert(name.clone());
    Ok(vec![format!("CREATE VIEW {ine}{} ON CLUSTER {} AS {body}", t.q(&name), t.cluster)])
}

fn create_materialized_view(
    toks: &[Tok<'_>],
    mut c: Cursor<'_, '_>,
    schema: &mut Schema,
    t: &ClusterTarget,
) -> Result<Vec<String>> {
    let ine = if_not_exists(&mut c);
    let name = c.name()?;
    if !c.eat_kw("TO") {
        bail!("materialized view {name}: only the `TO table` form has a cluster form (give it a target table)");
    }
    let to = c.name()?;
    if !schema.tables.contains(&to) {
        bail!("materialized view {name}: target {to} is not a table created by an earlier statement");
    }
    c.expect_kw("AS")?;
    let body = qualify(&toks[c.index()..], schema, t, Read::Local)?;
    schema.views.insert(name.clone());
    Ok(vec![format!(
        "CREATE MATERIALIZED VIEW {ine}{} ON CLUSTER {} TO {} AS {body}",
        t.q(&name),
        t.cluster,
        t.q(&format!("{to}{LOCAL_SUFFIX}"))
    )])
}

fn alter_table(toks: &[Tok<'_>], mut c: Cursor<'_, '_>, schema: &Schema, t: &ClusterTarget) -> Result<Vec<String>> {
    let name = c.name()?;
    if !schema.tables.contains(&name) {
        bail!("ALTER TABLE {name}: not a table created by an earlier statement");
    }
    let ops = concat(&toks[c.index()..]);
    let local = format!("ALTER TABLE {} ON CLUSTER {} {ops}", t.q(&format!("{name}{LOCAL_SUFFIX}")), t.cluster);
    // Column changes must reach the Distributed table too (it has its own column list); other
    // alterations (mutations, TTL, settings) concern the stored data only.
    let column_ops = split_top_level_commas(&toks[c.index()..]).iter().all(|op| {
        let sig: Vec<&Tok<'_>> = op.iter().filter(|t| t.kind != Kind::Space).collect();
        sig.len() >= 2
            && ["ADD", "DROP", "MODIFY", "RENAME", "COMMENT"].iter().any(|k| sig[0].is_kw(k))
            && sig[1].is_kw("COLUMN")
    });
    let mut out = vec![local];
    if column_ops {
        out.push(format!("ALTER TABLE {} ON CLUSTER {} {ops}", t.q(&name), t.cluster));
    }
    Ok(out)
}

fn split_top_level_commas<'t, 'a>(toks: &'t [Tok<'a>]) -> Vec<&'t [Tok<'a>]> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, tok) in toks.iter().enumerate() {
        if tok.is("(") {
            depth += 1;
        } else if tok.is(")") {
            depth = depth.saturating_sub(1);
        } else if depth == 0 && tok.is(",") {
            parts.push(&toks[start..i]);
            start = i + 1;
        }
    }
    parts.push(&toks[start..]);
    parts
}

fn drop(mut c: Cursor<'_, '_>, schema: &mut Schema, t: &ClusterTarget) -> Result<Vec<String>> {
    let is_view = if c.eat_kw("VIEW") {
        true
    } else if c.eat_kw("TABLE") {
        false
    } else {
        bail!("only DROP TABLE and DROP VIEW have a cluster form");
    };
    let ie = if c.eat_kws(&["IF", "EXISTS"]) { "IF EXISTS " } else { "" };
    let name = c.name()?;
    if c.peek().is_some() {
        bail!("DROP {name}: unexpected {:?}", c.peek().map(|t| t.text));
    }
    let cl = &t.cluster;
    if !is_view && schema.tables.remove(&name) {
        return Ok(vec![
            format!("DROP TABLE {ie}{} ON CLUSTER {cl}", t.q(&name)),
            format!("DROP TABLE {ie}{} ON CLUSTER {cl}", t.q(&format!("{name}{LOCAL_SUFFIX}"))),
        ]);
    }
    schema.views.remove(&name);
    let what = if is_view { "VIEW" } else { "TABLE" };
    Ok(vec![format!("DROP {what} {ie}{} ON CLUSTER {cl}", t.q(&name))])
}

/// `CREATE DATABASE` on every node of the cluster.
pub fn create_database(target: &ClusterTarget) -> String {
    format!("CREATE DATABASE IF NOT EXISTS {} ON CLUSTER {}", target.database, target.cluster)
}

/// The migrations table in cluster mode: one replicated table with every node a replica
/// (no `{shard}` in its path), so every node knows what was applied.
pub fn migrations_table(target: &ClusterTarget, table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} ON CLUSTER {} \
         (version UInt32, name String, checksum String, applied_at DateTime DEFAULT now()) \
         ENGINE = ReplicatedMergeTree({}, '{{replica}}') ORDER BY version",
        target.q(table),
        target.cluster,
        quote_str(&format!("/clickhouse/tables/all/{}/{table}", target.database))
    )
}

#[cfg(test)]
mod tests;
