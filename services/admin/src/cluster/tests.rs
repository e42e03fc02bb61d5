//! The transformation on every current migration file, checked by independent string
//! inspection of its output (not by re-running the transformation's own parser), plus
//! hand-written expectations for the statement kinds the files do not use yet.

use super::*;
use crate::migrations::{repo_migrations_dir, MigrationSource};

fn target() -> ClusterTarget {
    ClusterTarget::new("meterflow", "db1").unwrap()
}

fn one(sql: &str) -> Vec<String> {
    let m = Migration::parse("001_x.sql", sql).unwrap();
    cluster_migrations(&[m], &target()).unwrap().remove(0).statements
}

fn err(sqls: &[&str]) -> String {
    let ms: Vec<Migration> =
        sqls.iter().enumerate().map(|(i, s)| Migration::parse(&format!("{:03}_x.sql", i + 1), s).unwrap()).collect();
    format!("{:#}", cluster_migrations(&ms, &target()).unwrap_err())
}

/// Collapses whitespace runs, for comparisons that should not depend on line breaks.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The text between the first `(` after `CREATE TABLE <name>` and its matching `)`, found by
/// counting parentheses in the raw text (no lexer).
fn column_list(stmt: &str) -> String {
    let start = stmt.find('(').unwrap();
    let mut depth = 0;
    for (i, ch) in stmt[start..].char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return squash(&stmt[start..=start + i]);
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced: {stmt}")
}

/// `CREATE TABLE [IF NOT EXISTS] name` -> name, by plain word splitting.
fn created_name(stmt: &str) -> Option<String> {
    let words: Vec<&str> = stmt.split_whitespace().collect();
    if words.len() < 3 || !words[0].eq_ignore_ascii_case("CREATE") {
        return None;
    }
    let mut i = 2;
    if words[1].eq_ignore_ascii_case("MATERIALIZED") {
        i = 3;
    }
    if words.get(i).is_some_and(|w| w.eq_ignore_ascii_case("IF")) {
        i += 3;
    }
    Some(words[i].trim_end_matches('(').to_string())
}

#[test]
fn every_current_file_has_a_cluster_form() {
    let source = MigrationSource::Dir(repo_migrations_dir()).load().unwrap();
    let t = target();
    let cluster = cluster_migrations(&source, &t).unwrap();
    assert_eq!(source.len(), cluster.len());

    let mut tables = Vec::new();
    let mut views = Vec::new();
    for (src, out) in source.iter().zip(&cluster) {
        assert_eq!((src.version, &src.name, &src.checksum), (out.version, &out.name, &out.checksum));
        let src_tables: Vec<&String> =
            src.statements.iter().filter(|s| squash(s).to_uppercase().starts_with("CREATE TABLE")).collect();
        let src_views: Vec<&String> =
            src.statements.iter().filter(|s| squash(s).to_uppercase().starts_with("CREATE VIEW")).collect();
        let others = src
            .statements
            .iter()
            .filter(|s| {
                let u = squash(s).to_uppercase();
                u.starts_with("CREATE MATERIALIZED VIEW") || u.starts_with("INSERT") || u.starts_with("DROP")
            })
            .count();
        // Two statements per table, one per view, materialized view and back-fill.
        assert_eq!(out.statements.len(), 2 * src_tables.len() + src_views.len() + others, "{}", src.file);

        assert_replicated_on_cluster(&src.file, &out.statements);
        for st in src_tables {
            let name = created_name(st).unwrap();
            let dist = assert_table_forms(&name, st, &out.statements);
            tables.push((name, dist));
        }
        for sv in src_views {
            views.push((created_name(sv).unwrap(), sv.clone()));
        }
    }

    // Sharding keys: a tenant stays on one shard; tables without a tenant shard by their key.
    let key = |name: &str| {
        let d = &tables.iter().find(|(n, _)| n == name).unwrap().1;
        squash(&d[d.find("Distributed(").unwrap()..])
    };
    for name in ["usage_events", "meter_aggregates", "dead_letters", "charges", "wallet_adjustments", "wallet_alerts"] {
        assert_eq!(key(name), format!("Distributed('meterflow', 'db1', '{name}_local', cityHash64(tenant))"));
    }
    assert_eq!(
        key("checkpoints"),
        "Distributed('meterflow', 'db1', 'checkpoints_local', cityHash64(service, consumer_group, topic, partition))"
    );

    let all_names: Vec<String> = tables.iter().map(|(n, _)| n.clone()).chain(views.iter().map(|(n, _)| n.clone())).collect();
    assert_views_qualified(&cluster, &all_names);
    let total_views: usize = cluster.iter().flat_map(|m| &m.statements).filter(|s| s.starts_with("CREATE VIEW")).count();
    assert_eq!(total_views, views.len());
    // meter_totals groups the Distributed meter_aggregates; wallet_balances reads both sources.
    let body = |v: &str| cluster.iter().flat_map(|m| &m.statements).find(|s| s.contains(&format!("VIEW IF NOT EXISTS db1.{v} "))).unwrap().clone();
    assert!(body("meter_totals").contains("FROM db1.meter_aggregates\nGROUP BY"));
    assert!(body("usage_events_dedup").contains("FROM db1.usage_events\nFINAL"));
    let wb = body("wallet_balances");
    assert!(wb.contains("FROM db1.wallet_adjustments") && wb.contains("FROM db1.charges_dedup"), "{wb}");
}

/// Every CREATE runs ON CLUSTER, qualified, and no single-node engine survives: every ENGINE
/// is replicated or Distributed.
fn assert_replicated_on_cluster(file: &str, statements: &[String]) {
    for s in statements.iter().filter(|s| squash(s).to_uppercase().starts_with("CREATE")) {
        assert!(s.contains(" ON CLUSTER meterflow"), "{file}: not ON CLUSTER: {s}");
        let name = created_name(s).unwrap();
        assert!(name.starts_with("db1."), "{file}: unqualified {name}");
        for (i, _) in s.match_indices("ENGINE = ") {
            let e = &s[i + 9..];
            assert!(e.starts_with("Replicated") || e.starts_with("Distributed("), "{file}: engine {e:.40}");
        }
    }
}

/// The two cluster forms of the single-node table `st` (named `name`) among `out`: a
/// replicated local table and a Distributed one, with its columns. Returns the Distributed one.
fn assert_table_forms(name: &str, st: &str, out: &[String]) -> String {
    let local = out.iter().find(|s| created_name(s).as_deref() == Some(&format!("db1.{name}_local"))).unwrap();
    let dist = out.iter().find(|s| created_name(s).as_deref() == Some(&format!("db1.{name}"))).unwrap();
    // Same columns as the single-node table, in both forms.
    assert_eq!(column_list(local), column_list(st), "{name}");
    assert_eq!(column_list(dist), column_list(st), "{name}");
    // The replicated engine: per-shard path spelling out database and table, replica macro,
    // and the single-node engine's own arguments after them.
    let src_engine = squash(&st[st.find("ENGINE = ").unwrap() + 9..]);
    let (src_engine_name, src_after) = src_engine.split_once(['(', ' ']).unwrap_or((&src_engine, ""));
    let want_prefix = format!("Replicated{src_engine_name}('/clickhouse/tables/{{shard}}/db1/{name}_local', '{{replica}}'");
    let local_engine = squash(&local[local.find("ENGINE = ").unwrap() + 9..]);
    assert!(local_engine.starts_with(&want_prefix), "{name}: {local_engine}");
    // Everything after the engine (PARTITION BY, ORDER BY) is unchanged.
    let src_clauses = &src_after[src_after.find("ORDER BY").or(src_after.find("PARTITION BY")).unwrap()..];
    assert!(local_engine.ends_with(src_clauses), "{name}: {local_engine} vs {src_clauses}");
    dist.clone()
}

/// Views read through the Distributed tables, qualified: no `FROM <bare name>` is left for a
/// name the migrations created (`all_names`), and every one that the source read is now `db1.<name>`.
fn assert_views_qualified(cluster: &[Migration], all_names: &[String]) {
    for out in cluster {
        for s in out.statements.iter().filter(|s| s.starts_with("CREATE VIEW")) {
            let words: Vec<&str> = s.split_whitespace().collect();
            for w in words.windows(2) {
                if w[0].eq_ignore_ascii_case("FROM") || w[0].eq_ignore_ascii_case("JOIN") {
                    let n = w[1].trim_end_matches(')');
                    assert!(!all_names.iter().any(|a| a == n), "bare {n} in {s}");
                }
            }
        }
    }
}

#[test]
fn golden_table_and_view() {
    let out = one(
        "CREATE TABLE IF NOT EXISTS cp (service String, partition Int32, version UInt64, at DateTime DEFAULT now())\n\
         ENGINE = ReplacingMergeTree(version)\nORDER BY (service, partition);\n\
         CREATE VIEW v AS SELECT service, max(version) AS v FROM cp GROUP BY service",
    );
    assert_eq!(
        out,
        vec![
            "CREATE TABLE IF NOT EXISTS db1.cp_local ON CLUSTER meterflow\n\
             (service String, partition Int32, version UInt64, at DateTime DEFAULT now())\n\
             ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/db1/cp_local', '{replica}', version)\n\
             ORDER BY (service, partition)"
                .to_string(),
            "CREATE TABLE IF NOT EXISTS db1.cp ON CLUSTER meterflow\n\
             (service String, partition Int32, version UInt64, at DateTime DEFAULT now())\n\
             ENGINE = Distributed('meterflow', 'db1', 'cp_local', cityHash64(service, partition))"
                .to_string(),
            "CREATE VIEW db1.v ON CLUSTER meterflow AS SELECT service, max(version) AS v FROM db1.cp GROUP BY service".to_string(),
        ]
    );
}

#[test]
fn tenant_wins_over_order_by_and_plain_merge_tree_gets_no_args() {
    let out = one("CREATE TABLE e (id String, tenant String) ENGINE = MergeTree PARTITION BY id ORDER BY id SETTINGS index_granularity = 8192");
    assert!(out[0].contains("ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/db1/e_local', '{replica}') PARTITION BY id ORDER BY id SETTINGS"), "{}", out[0]);
    assert!(out[1].ends_with("Distributed('meterflow', 'db1', 'e_local', cityHash64(tenant))"), "{}", out[1]);
    // ORDER BY a single column, then a SETTINGS clause: only the key is hashed.
    let out = one("CREATE TABLE k (id String) ENGINE = ReplacingMergeTree ORDER BY id SETTINGS index_granularity = 8192");
    assert!(out[1].ends_with("cityHash64(id))"), "{}", out[1]);
}

#[test]
fn strings_and_quoted_names_are_not_rewritten() {
    let out = one("CREATE TABLE t (tenant String) ENGINE = MergeTree ORDER BY tenant;\n\
                   CREATE VIEW v AS SELECT 'FROM t' AS s, x.tenant FROM t AS x JOIN `t` USING tenant WHERE tenant IN (SELECT tenant FROM t)");
    assert_eq!(
        out[2],
        "CREATE VIEW db1.v ON CLUSTER meterflow AS SELECT 'FROM t' AS s, x.tenant FROM db1.t AS x JOIN db1.t USING tenant \
         WHERE tenant IN (SELECT tenant FROM db1.t)"
    );
}

#[test]
fn materialized_view_reads_and_writes_local_tables() {
    let out = one("CREATE TABLE src (tenant String, v UInt64) ENGINE = MergeTree ORDER BY tenant;\n\
                   CREATE TABLE dst (tenant String, v UInt64) ENGINE = SummingMergeTree(v) ORDER BY tenant;\n\
                   CREATE MATERIALIZED VIEW IF NOT EXISTS mv TO dst AS SELECT tenant, sum(v) AS v FROM src GROUP BY tenant");
    assert_eq!(
        out[4],
        "CREATE MATERIALIZED VIEW IF NOT EXISTS db1.mv ON CLUSTER meterflow TO db1.dst_local AS \
         SELECT tenant, sum(v) AS v FROM db1.src_local GROUP BY tenant"
    );
    assert!(out[2].contains("ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/db1/dst_local', '{replica}', v)"));
}

#[test]
fn alter_and_drop() {
    let base = "CREATE TABLE t (tenant String) ENGINE = MergeTree ORDER BY tenant;\nCREATE VIEW v AS SELECT * FROM t;\n";
    let out = one(&format!("{base}ALTER TABLE t ADD COLUMN x UInt8 DEFAULT 0, MODIFY COLUMN tenant String"));
    assert_eq!(out[3], "ALTER TABLE db1.t_local ON CLUSTER meterflow ADD COLUMN x UInt8 DEFAULT 0, MODIFY COLUMN tenant String");
    assert_eq!(out[4], "ALTER TABLE db1.t ON CLUSTER meterflow ADD COLUMN x UInt8 DEFAULT 0, MODIFY COLUMN tenant String");
    // A mutation concerns stored rows only: the local table.
    let out = one(&format!("{base}ALTER TABLE t DELETE WHERE tenant = ''"));
    assert_eq!(out.len(), 4);
    assert_eq!(out[3], "ALTER TABLE db1.t_local ON CLUSTER meterflow DELETE WHERE tenant = ''");
    let out = one(&format!("{base}DROP VIEW IF EXISTS v;\nDROP TABLE t"));
    assert_eq!(
        &out[3..],
        &[
            "DROP VIEW IF EXISTS db1.v ON CLUSTER meterflow".to_string(),
            "DROP TABLE db1.t ON CLUSTER meterflow".to_string(),
            "DROP TABLE db1.t_local ON CLUSTER meterflow".to_string(),
        ]
    );
}

#[test]
fn unsupported_statements_are_refused_by_name() {
    assert!(err(&["CREATE TABLE l (x UInt8) ENGINE = Log"]).contains("engine Log has no cluster form"));
    assert!(err(&["CREATE TABLE r (x UInt8) ENGINE = ReplicatedMergeTree('/p', 'r') ORDER BY x"]).contains("no cluster form"));
    assert!(err(&["CREATE TABLE n (x UInt8) ENGINE = MergeTree ORDER BY tuple()"]).contains("nothing deterministic to shard by"));
    assert!(err(&["CREATE TABLE other.t (tenant String) ENGINE = MergeTree ORDER BY tenant"]).contains("must not name a database"));
    assert!(err(&["CREATE MATERIALIZED VIEW m ENGINE = MergeTree ORDER BY x AS SELECT 1 AS x"]).contains("`TO table` form"));
    assert!(err(&["OPTIMIZE TABLE t FINAL"]).contains("extend services/admin/src/cluster.rs"));
    assert!(err(&["ALTER TABLE missing ADD COLUMN x UInt8"]).contains("not a table created"));
    // The error names the file and statement.
    assert!(err(&["CREATE TABLE ok (tenant String) ENGINE = MergeTree ORDER BY tenant", "RENAME TABLE ok TO ko"])
        .contains("migration 002_x.sql statement 1"));
}

#[test]
fn names_are_validated() {
    assert!(ClusterTarget::new("meterflow", "t_a1").is_ok());
    assert!(ClusterTarget::new("meter flow", "db").is_err());
    assert!(ClusterTarget::new("c", "db;DROP").is_err());
    assert!(ClusterTarget::new("c", "").is_err());
}

#[test]
fn migrations_table_is_replicated_on_every_node() {
    let s = migrations_table(&target(), "schema_migrations");
    assert!(s.contains("db1.schema_migrations ON CLUSTER meterflow"));
    assert!(s.contains("ReplicatedMergeTree('/clickhouse/tables/all/db1/schema_migrations', '{replica}')"));
    assert!(!s.contains("{shard}"));
}
