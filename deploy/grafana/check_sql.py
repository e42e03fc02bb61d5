#!/usr/bin/env python3
"""Runs the SQL of every ClickHouse panel of deploy/grafana/dashboards/*.json on a database
created from schemas/clickhouse and filled with a small synthetic workload, with the Grafana
macros expanded as grafana-clickhouse-datasource does. Fails on any error or empty result,
naming the dashboard, panel and query.

usage: check_sql.py --chdb                  current ClickHouse, in-process (pip chdb-core)
       check_sql.py --http http://127.0.0.1:8123   a ClickHouse server (e.g. the local 18.16)

With --http a scratch database `dashcheck_<random>` is created and dropped afterwards.
tests/e2e/dashboards.rs does the same against real pipeline output on the local server; this
script exists to run the same SQL on *current* ClickHouse, which is not available locally.
"""

import json
import os
import random
import re
import sys
import time
import urllib.parse
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DASHBOARDS = os.path.join(REPO, "deploy", "grafana", "dashboards")
MIGRATIONS = os.path.join(REPO, "schemas", "clickhouse")

CH_TYPE = "grafana-clickhouse-datasource"


# --- Grafana macro expansion (grafana-clickhouse-datasource pkg/macros) ------------------------

def _macro_args(text: str, start: int) -> tuple[list[str], int]:
    """Arguments of a macro call whose '(' is at text[start]; returns (args, index after ')')."""
    depth, i, cur, args = 0, start, [], []
    while i < len(text):
        c = text[i]
        if c == "(":
            depth += 1
            if depth > 1:
                cur.append(c)
        elif c == ")":
            depth -= 1
            if depth == 0:
                args.append("".join(cur).strip())
                return args, i + 1
            cur.append(c)
        elif c == "," and depth == 1:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    raise ValueError("unbalanced parentheses in a macro call")


def expand(sql: str, frm: int, to: int, interval_s: int) -> str:
    """frm/to in Unix seconds."""
    date = lambda t: time.strftime("%Y-%m-%d", time.gmtime(t))  # noqa: E731
    out, i = [], 0
    pat = re.compile(r"\$__(timeFilter|dateFilter|fromTime|toTime|interval_s)\b")
    while True:
        m = pat.search(sql, i)
        if not m:
            out.append(sql[i:])
            break
        out.append(sql[i:m.start()])
        name, j = m.group(1), m.end()
        if name in ("timeFilter", "dateFilter"):
            if j >= len(sql) or sql[j] != "(":
                raise ValueError(f"$__{name} without arguments")
            args, j = _macro_args(sql, j)
            if len(args) != 1:
                raise ValueError(f"$__{name} takes one argument, got {len(args)}")
            col = args[0]
            if name == "timeFilter":
                out.append(f"{col} >= toDateTime({frm}) AND {col} <= toDateTime({to})")
            else:
                out.append(f"{col} >= toDate('{date(frm)}') AND {col} <= toDate('{date(to)}')")
        elif name == "fromTime":
            out.append(f"toDateTime({frm})")
        elif name == "toTime":
            out.append(f"toDateTime({to})")
        else:
            out.append(str(interval_s))
        i = j
    text = "".join(out)
    left = re.search(r"\$\{?\w+", text)
    if left:
        raise ValueError(f"unsupported macro or variable {left.group(0)!r}")
    return text


def min_interval_s(panel: dict) -> int:
    m = re.fullmatch(r"(\d+)([smh])", panel.get("interval", "1s"))
    if not m:
        raise ValueError(f"panel interval {panel.get('interval')!r} is not <n>s|m|h")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def clickhouse_targets():
    """(dashboard title, panel title, refId, panel, rawSql) of every ClickHouse target."""
    for name in sorted(os.listdir(DASHBOARDS)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(DASHBOARDS, name), encoding="utf-8") as f:
            board = json.load(f)
        for panel in board.get("panels", []):
            for t in panel.get("targets", []):
                ds = t.get("datasource") or panel.get("datasource") or {}
                if ds.get("type") == CH_TYPE:
                    yield board["title"], panel["title"], t["refId"], panel, t["rawSql"]


# --- schema and synthetic data -------------------------------------------------------------

def statements(sql: str) -> list[str]:
    sql = re.sub(r"--[^\n]*", "", sql)
    return [s.strip() for s in sql.split(";") if s.strip()]


def seed_sql(now: int) -> list[str]:
    """A small workload over the 30 minutes before `now`: events, windows (some restated),
    dead letters, checkpoints, charges (some at a loss), wallets and alerts."""
    w = f"toDateTime(intDiv({now} - 1800 + number * 60, 60) * 60)"
    dims = "['model', 'region'], [arrayElement(['gpt-4o', 'llama-70b', 'embed-small'], number % 3 + 1), 'eu-west']"
    meter = "arrayElement(['input_tokens', 'output_tokens', 'requests', 'gpu_seconds'], number % 4 + 1)"
    tenant = "concat('tenant-00', toString(number % 5))"
    return [
        f"""INSERT INTO usage_events (tenant, meter, event_id, event_time, event_time_ms, window_start, quantity,
                provider_cost, has_provider_cost, dim_keys, dim_values, source, source_partition, source_offset)
            SELECT {tenant}, {meter}, concat('ev-', toString(number)), toDateTime({now} - 1800 + number),
                toInt64({now} - 1800 + number) * 1000, toDateTime(intDiv({now} - 1800 + number, 60) * 60),
                toDecimal128(number % 100 + 1, 9), toDecimal128(0.001, 9), 1, {dims}, 'check', 0, toInt64(number)
            FROM numbers(1800)""",
        f"""INSERT INTO meter_aggregates (tenant, meter, aggregation, dimensions_key, dim_keys, dim_values, window_start,
                window_end, window_start_ms, revision, value, previous_value, event_count, provider_cost,
                source_partition, seq, emitted_at_ms)
            SELECT {tenant}, {meter}, 'sum', 'model=gpt-4o', {dims}, {w}, {w} + 60, toInt64(toUInt32({w})) * 1000,
                toUInt32(number % 3 = 0), toDecimal128(number * 10 + 5, 9), toDecimal128(0, 9), toInt64(number % 7 + 1),
                toDecimal128(0.5, 9), 0, toInt64(number), toInt64({now}) * 1000
            FROM numbers(30)""",
        """INSERT INTO dead_letters (source_topic, source_partition, source_offset, reason, detail, tenant, event_id, payload)
            SELECT 'meterflow.usage-events', 0, toInt64(number), arrayElement(['undecodable', 'unknown_meter', 'too_late'], number % 3 + 1),
                'synthetic', 'tenant-000', concat('bad-', toString(number)), 'xx'
            FROM numbers(12)""",
        """INSERT INTO checkpoints (service, consumer_group, topic, partition, version, next_offset, state)
            SELECT arrayElement(['aggregator', 'rater'], number % 2 + 1), 'g', 'meterflow.usage-events',
                toInt32(number % 4), toUInt64(number), toInt64(number * 100), '{}'
            FROM numbers(16)""",
        f"""INSERT INTO charges (charge_id, kind, tenant, plan, currency, meter, model, dimensions_key, dim_keys, dim_values,
                period_start, window_start, window_end, revision, quantity, amount, provider_cost, margin, seq)
            SELECT concat('ch-', toString(number)), 'usage', {tenant}, 'starter', 'USD', {meter},
                arrayElement(['gpt-4o', 'llama-70b', 'embed-small'], number % 3 + 1), 'model=gpt-4o', {dims},
                toDateTime(toStartOfMonth(toDate({now}))), {w}, {w} + 60, toUInt32(0), toDecimal128(number + 1, 9),
                toDecimal128((number % 5) * 0.25, 9), toDecimal128(0.5, 9), toDecimal128((number % 5) * 0.25 - 0.5, 9),
                toInt64(number)
            FROM numbers(30)""",
        f"""INSERT INTO wallet_adjustments (idempotency_key, tenant, currency, amount, kind, reason, created_at,
                source_partition, source_offset)
            SELECT concat('pay-', toString(number)), {tenant}, 'USD', toDecimal128(20, 9), 'top_up', 'card',
                toDateTime({now} - 1700), 0, toInt64(number)
            FROM numbers(3)""",
        f"""INSERT INTO wallet_alerts (alert_id, tenant, kind, currency, balance, threshold, at_ms)
            SELECT concat('al-', toString(number)), {tenant}, 'low_balance', 'USD', toDecimal128(9.5, 9),
                toDecimal128(10, 9), toInt64({now} - 600) * 1000
            FROM numbers(2)""",
        f"""INSERT INTO wallet_ledger (entry_id, tenant, currency, at, movement, credit_kind, grant_key, source, amount,
                source_partition)
            SELECT concat('le-', toString(number)), {tenant}, 'USD', toDateTime({now} - 1700 + number * 60),
                arrayElement(['grant', 'drawdown', 'expiry', 'refund', 'arrears', 'grant', 'drawdown', 'debit'], number % 8 + 1),
                arrayElement(['paid', 'paid', 'paid', 'paid', '', 'promotional', 'promotional', 'manual'], number % 8 + 1),
                concat('g-', toString(number % 3)), concat('src-', toString(number)),
                toDecimal128(if(number % 8 = 0, 20, 1.5), 9), 0
            FROM numbers(24)""",
        f"""INSERT INTO reconciliation_results (run_id, run_at, source, tenant, price, currency, period_start,
                meterflow_amount, external_amount, difference, meterflow_quantity, external_quantity, status, finding,
                external_lines, meterflow_charges)
            SELECT 'run-1', toDateTime({now} - 300), 'export.csv', {tenant}, concat('price-', toString(number % 2)), 'USD',
                toDateTime(toStartOfMonth(toDate({now}))), toDecimal128(10, 9), toDecimal128(10 + number % 3 - 1, 9),
                toDecimal128(number % 3 - 1, 9), toDecimal128(0, 9), toDecimal128(0, 9),
                arrayElement(['under_billed', 'match', 'over_billed'], number % 3 + 1),
                arrayElement(['missing_external', 'match', 'extra_external'], number % 3 + 1), toUInt64(1), toUInt64(2)
            FROM numbers(6)""",
        f"""INSERT INTO audit_findings (run_id, run_at, check_name, tenant, subject, expected, actual, detail)
            SELECT 'audit-1', toDateTime({now} - 200), arrayElement(['window_not_rated', 'invoice_vs_charges'], number % 2 + 1),
                {tenant}, concat('subject-', toString(number)), toDecimal128(1, 9), toDecimal128(0, 9), 'synthetic'
            FROM numbers(3)""",
    ]


# --- back ends -----------------------------------------------------------------------------

class Chdb:
    name = "current ClickHouse (chdb)"

    def __init__(self):
        import tempfile

        from chdb import session  # noqa: PLC0415

        self.tmp = tempfile.TemporaryDirectory(prefix="dashcheck-")
        self.s = session.Session(self.tmp.name)
        self.version = self.query("SELECT version()")[0][0]
        self.execute("CREATE DATABASE meterflow")
        self.execute("USE meterflow")

    def execute(self, sql: str):
        self.s.query(sql)

    def query(self, sql: str) -> list:
        res = self.s.query(sql, "JSONCompact")
        err = getattr(res, "error_message", None)
        if callable(err):
            err = err()
        if err:
            raise RuntimeError(err)
        body = res.bytes() if hasattr(res, "bytes") else bytes(res)
        return json.loads(body)["data"] if body.strip() else []

    def close(self):
        self.tmp.cleanup()


class Http:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.db = f"dashcheck_{random.getrandbits(32):08x}"
        self._post("CREATE DATABASE " + self.db, db=None)
        self.version = self.query("SELECT version()")[0][0]
        self.name = f"ClickHouse {self.version} at {self.url}"

    def _post(self, sql: str, db):
        params = {"database": db} if db else {}
        req = urllib.request.Request(f"{self.url}/?{urllib.parse.urlencode(params)}", data=sql.encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:
            raise RuntimeError(e.read().decode(errors="replace").strip()) from None

    def execute(self, sql: str):
        self._post(sql, self.db)

    def query(self, sql: str) -> list:
        return json.loads(self._post(sql + "\nFORMAT JSONCompact", self.db))["data"]

    def close(self):
        self._post("DROP DATABASE IF EXISTS " + self.db, db=None)


def main() -> int:
    if sys.argv[1:] == ["--chdb"]:
        backend = Chdb()
    elif len(sys.argv) == 3 and sys.argv[1] == "--http":
        backend = Http(sys.argv[2])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    failures, ran = [], 0
    try:
        for f in sorted(os.listdir(MIGRATIONS)):
            if re.fullmatch(r"\d+_.+\.sql", f):
                with open(os.path.join(MIGRATIONS, f), encoding="utf-8") as fh:
                    for st in statements(fh.read()):
                        backend.execute(st)
        now = int(time.time())
        for st in seed_sql(now):
            backend.execute(st)
        frm, to = now - 3600, now + 60
        for board, panel_title, ref, panel, raw in clickhouse_targets():
            where = f"{board} / {panel_title} / {ref}"
            try:
                interval = max(min_interval_s(panel), (to - frm) // 1000)
                q = expand(raw, frm, to, interval)
                rows = backend.query(q)
                ran += 1
                if not rows:
                    failures.append(f"{where}: empty result\n{q}")
            except Exception as e:  # noqa: BLE001
                failures.append(f"{where}: {str(e).strip()[:800]}\n{raw}")
    finally:
        backend.close()
    for f in failures:
        print(f"FAIL {f}\n", file=sys.stderr)
    print(f"check_sql: {ran} ClickHouse panel queries ran on {backend.name}, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
