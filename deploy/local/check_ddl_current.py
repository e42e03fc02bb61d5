"""Applies every ClickHouse migration to current ClickHouse (chDB, in-process) and fails on any
error. Run by check-ddl-current.sh; the local server is ClickHouse 18.16, production is not,
so the DDL has to work on both.

usage: check_ddl_current.py MIGRATIONS_DIR
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


def main() -> int:
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
