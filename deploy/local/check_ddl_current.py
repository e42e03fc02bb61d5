"""Applies every ClickHouse migration to current ClickHouse (chDB, in-process) and fails on any
error. Run by check-ddl-current.sh; the local server is ClickHouse 18.16, production is not,
so the DDL has to work on both.

usage: check_ddl_current.py MIGRATIONS_DIR
       check_ddl_current.py --cluster-ddl FILE CLUSTER DATABASE

The second form checks the cluster form of the schema (`meterflow-admin cluster-ddl` output) on
current ClickHouse, as far as one in-process node can: chdb runs with an in-memory Keeper
(testkeeper), {shard}/{replica} macros and a one-shard cluster of itself, so every replicated
table is created (macros expanded in its ZooKeeper path), every Distributed table is created
with its sharding key, and every view is analysed and queried through the Distributed tables.
What it cannot check: ON CLUSTER execution (chdb has no distributed DDL queue; the clause is
stripped here), replication itself (clickhouse-local starts no replication threads, so the
replicated tables stay read-only and take no rows), and reads across shards. Those run on the
real 18.16 cluster in tests/e2e/cluster.rs.
"""

import os
import re
import sys
import tempfile


def split_statements(sql: str) -> list[str]:
    """Same rules as meterflow-admin (services/admin/src/sql.rs): split on ';' outside quotes,
    drop -- and /* */ comments."""
    out, cur, i, n = [], [], 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            j = i + 1
            while j < n:
                if sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:
                        j += 2
                        continue
                    break
                j += 1
            cur.append(sql[i : j + 1])
            i = j + 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
            cur.append(" ")
        elif c == ";":
            out.append("".join(cur))
            cur = []
            i += 1
        else:
            cur.append(c)
            i += 1
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def check_cluster_ddl(path: str, cluster: str, database: str) -> int:
    import chdb  # noqa: E402

    with open(path, encoding="utf-8") as fh:
        statements = split_statements(fh.read())
    if not statements:
        print(f"FAIL: no statements in {path}", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="meterflow-chdb-cluster-")
    cfg = os.path.join(work, "config.xml")
    # A port nothing listens on: the one-shard cluster is this process itself (is_local), so no
    # query ever leaves it.
    port = 29999
    with open(cfg, "w", encoding="utf-8") as f:
        f.write(f"""<clickhouse>
  <tcp_port>{port}</tcp_port>
  <zookeeper><implementation>testkeeper</implementation></zookeeper>
  <macros><shard>1</shard><replica>r1</replica><cluster>{cluster}</cluster></macros>
  <remote_servers><{cluster}><shard><internal_replication>true</internal_replication>
    <replica><host>127.0.0.1</host><port>{port}</port></replica></shard></{cluster}></remote_servers>
</clickhouse>""")
    conn = chdb.connect(f"file:{work}/data?config-file={cfg}")
    version = conn.query("SELECT version()", "CSV").bytes().decode().strip().strip('"')
    print(f"ClickHouse {version} (chdb {chdb.__version__}), cluster form of the schema from {path}")

    def run(sql: str, what: str) -> str:
        try:
            return conn.query(sql, "TSV").bytes().decode()
        except Exception as e:
            print(f"FAIL {what}:\n{sql}\n--> {e}", file=sys.stderr)
            os._exit(1)

    is_local = run(f"SELECT is_local FROM system.clusters WHERE cluster = '{cluster}'", "cluster").strip()
    if is_local != "1":
        print(f"FAIL: the check's one-shard cluster is not local ({is_local!r}): queries would leave the process", file=sys.stderr)
        os._exit(1)
    run(f"CREATE DATABASE IF NOT EXISTS {database}", "create database")
    on_cluster = re.compile(r"\s+ON CLUSTER\s+" + re.escape(cluster) + r"\b")
    for k, st in enumerate(statements, 1):
        # Back-fills (INSERT ... SELECT) run once, on the node migrate talks to, through the
        # Distributed tables; everything else is distributed DDL and idempotent.
        is_insert = st.lstrip().upper().startswith("INSERT")
        if not is_insert and not on_cluster.search(st):
            print(f"FAIL statement {k}: no ON CLUSTER {cluster}:\n{st}", file=sys.stderr)
            os._exit(1)
        local = on_cluster.sub("", st, count=1)
        if is_insert:
            # migrate runs it with the database as the session's default; here, qualify it.
            local = re.sub(r"\b(INTO|FROM)\s+(\w+)\b(?!\.)", lambda m: f"{m.group(1)} {database}.{m.group(2)}", local)
        run(local, f"statement {k}/{len(statements)}")
        if not is_insert:
            run(local, f"statement {k}/{len(statements)} (second time)")
    rows = run(f"SELECT name, engine FROM system.tables WHERE database = '{database}' ORDER BY name", "list tables")
    engines: dict[str, str] = dict(line.split("\t") for line in rows.splitlines())
    counts = {"replicated": 0, "distributed": 0, "views": 0}
    for name, engine in engines.items():
        if engine.startswith("Replicated"):
            counts["replicated"] += 1
            if engines.get(name.removesuffix("_local")) != "Distributed" or not name.endswith("_local"):
                print(f"FAIL: {name} ({engine}) has no Distributed table in front of it", file=sys.stderr)
                os._exit(1)
        elif engine == "Distributed":
            counts["distributed"] += 1
            run(f"SELECT * FROM {database}.{name} FORMAT Null", f"read Distributed {name}")
        elif engine == "View":
            counts["views"] += 1
            run(f"SELECT * FROM {database}.{name} FORMAT Null", f"query view {name}")
        elif engine == "MaterializedView":
            counts["materialized views"] = counts.get("materialized views", 0) + 1
        else:
            print(f"FAIL: {name} has engine {engine}: neither replicated, Distributed nor a view", file=sys.stderr)
            os._exit(1)
    paths = run(f"SELECT zookeeper_path, replica_name FROM system.replicas WHERE database = '{database}'", "replicas")
    for line in paths.splitlines():
        zk, replica = line.split("\t")
        if replica != "r1" or not zk.startswith(f"/clickhouse/tables/1/{database}/"):
            print(f"FAIL: macros not expanded as expected: {zk} {replica}", file=sys.stderr)
            os._exit(1)
    if counts["replicated"] == 0 or counts["replicated"] != counts["distributed"]:
        print(f"FAIL: {counts}", file=sys.stderr)
        os._exit(1)
    print(f"ok   {len(statements)} statements: {counts['replicated']} replicated tables (macros expanded), "
          f"{counts['distributed']} Distributed tables read, {counts['views']} views answer through them")
    sys.stdout.flush()
    # chdb aborts in its own teardown with replicated tables open; the check is complete.
    os._exit(0)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--cluster-ddl":
        return check_cluster_ddl(sys.argv[2], sys.argv[3], sys.argv[4])
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    mig_dir = sys.argv[1]
    files = sorted(f for f in os.listdir(mig_dir) if re.fullmatch(r"\d+_.+\.sql", f))
    if not files:
        print(f"no NNN_name.sql files in {mig_dir}", file=sys.stderr)
        return 1

    import chdb  # noqa: E402  (imported late so --help works without it)

    work = tempfile.mkdtemp(prefix="meterflow-chdb-")
    conn = chdb.connect(work)
    version = conn.query("SELECT version()", "CSV").bytes().decode().strip().strip('"')
    print(f"ClickHouse {version} (chdb {chdb.__version__}), migrations from {mig_dir}")
    # The server's time zone in production is UTC, as in deploy/local's generated config.
    conn.query("CREATE DATABASE IF NOT EXISTS meterflow_ddl_check")

    def run(sql: str, what: str) -> str:
        try:
            return conn.query(sql, "TSV").bytes().decode()
        except Exception as e:  # chdb raises ChdbError with ClickHouse's message
            print(f"FAIL {what}:\n{sql}\n--> {e}", file=sys.stderr)
            raise SystemExit(1)

    # chdb sessions keep USE across queries, but qualify nothing: the migrations are written
    # for "the current database", as meterflow-admin runs them.
    run("USE meterflow_ddl_check", "USE")
    for f in files:
        with open(os.path.join(mig_dir, f), encoding="utf-8") as fh:
            statements = split_statements(fh.read())
        for k, st in enumerate(statements, 1):
            run(st, f"{f} statement {k}/{len(statements)}")
        # Applying twice must be a no-op (IF NOT EXISTS everywhere).
        for k, st in enumerate(statements, 1):
            run(st, f"{f} statement {k}/{len(statements)} (second time)")
        print(f"ok   {f} ({len(statements)} statements)")

    # Every table takes a row of defaults and every view answers a query over it: views are
    # only fully analysed when queried.
    tables = run(
        "SELECT name, engine FROM system.tables WHERE database = 'meterflow_ddl_check' ORDER BY name",
        "list tables",
    )
    n_tables = n_views = 0
    for line in tables.splitlines():
        name, engine = line.split("\t")
        if engine == "View":
            continue
        run(f"INSERT INTO {name} FORMAT JSONEachRow {{}}", f"insert a default row into {name}")
        n_tables += 1
    for line in tables.splitlines():
        name, engine = line.split("\t")
        if engine != "View":
            continue
        run(f"SELECT * FROM {name} FORMAT Null", f"query view {name}")
        n_views += 1
    if n_tables == 0:
        print("FAIL: the migrations created no tables in meterflow_ddl_check", file=sys.stderr)
        return 1
    print(f"ok   {n_tables} tables take rows, {n_views} views answer queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
