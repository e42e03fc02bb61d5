#!/usr/bin/env python3
"""Writes meterflow's Grafana dashboards (deploy/grafana/dashboards/*.json) from the panel
definitions below, so that layout, ids and data source references stay consistent.

usage: build_dashboards.py           rewrite the JSON files
       build_dashboards.py --check   exit 1 if a JSON file differs from what this script writes

Rules for the SQL (checked by deploy/check-compose.sh, run by tests/e2e/dashboards.rs against
ClickHouse 18.16 and by deploy/grafana/check_sql.py against current ClickHouse):
  * macros of grafana-clickhouse-datasource: only $__timeFilter(col) on DateTime columns,
    $__dateFilter(col) on Date columns and $__interval_s; time buckets are
    toDateTime(intDiv(toUInt32(col), $__interval_s) * $__interval_s) because 18.16 has no
    toStartOfInterval (which $__timeInterval expands to);
  * no DateTime64, LowCardinality, JSON, window functions or WITH FILL;
  * aggregates are computed in an inner query with short names and presented by an outer
    query, so that no alias shadows a column (alias rules differ between 18.16 and the new
    analyzer);
  * every ClickHouse panel reads the data source's default database (meterflow).
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "dashboards")

CH = {"type": "grafana-clickhouse-datasource", "uid": "clickhouse"}
PROM = {"type": "prometheus", "uid": "prometheus"}


def bucket(col: str) -> str:
    """The start of the $__interval_s bucket of a DateTime column."""
    return f"toDateTime(intDiv(toUInt32({col}), $__interval_s) * $__interval_s)"


def sql(text: str) -> str:
    lines = [l.rstrip() for l in text.strip("\n").splitlines()]
    indent = min(len(l) - len(l.lstrip()) for l in lines if l.strip())
    return "\n".join(l[indent:] for l in lines)


def ch_target(ref: str, raw: str, table: bool) -> dict:
    return {
        "refId": ref,
        "datasource": CH,
        "editorType": "sql",
        "queryType": "table" if table else "timeseries",
        "format": 1 if table else 0,
        "rawSql": sql(raw),
    }


def prom_target(ref: str, expr: str, legend: str) -> dict:
    return {
        "refId": ref,
        "datasource": PROM,
        "editorType": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": True,
        "instant": False,
    }


class Board:
    def __init__(self, uid: str, title: str, description: str, tags: list[str]):
        self.uid, self.title, self.description, self.tags = uid, title, description, tags
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1

    def _place(self, w: int, h: int) -> dict:
        if self.x + w > 24:
            self.y += self.row_h
            self.x, self.row_h = 0, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title: str):
        if self.x:
            self.y += self.row_h
            self.x, self.row_h = 0, 0
        self.panels.append(
            {"id": self.next_id, "type": "row", "title": title, "collapsed": False, "panels": [],
             "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}}
        )
        self.next_id += 1
        self.y += 1

    def panel(self, kind: str, title: str, description: str, targets: list[dict], *, w=12, h=8,
              unit=None, interval=None, options=None, decimals=None):
        ds = targets[0]["datasource"]
        assert all(t["datasource"] == ds for t in targets), title
        defaults: dict = {}
        if unit:
            defaults["unit"] = unit
        if decimals is not None:
            defaults["decimals"] = decimals
        if kind == "timeseries":
            defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                                  "showPoints": "never", "spanNulls": True}
        p = {
            "id": self.next_id,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": ds,
            "gridPos": self._place(w, h),
            "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": options or default_options(kind),
        }
        if interval:
            p["interval"] = interval
        self.next_id += 1
        self.panels.append(p)

    def json(self) -> dict:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": self.tags,
            "timezone": "utc",
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "10s",
            "time": {"from": "now-1h", "to": "now"},
            "timepicker": {},
            "templating": {"list": []},
            "annotations": {"list": []},
            "links": [{"type": "dashboards", "tags": ["meterflow"], "asDropdown": False,
                       "title": "meterflow", "includeVars": False, "keepTime": True}],
            "panels": self.panels,
        }


def default_options(kind: str) -> dict:
    if kind == "timeseries":
        return {"legend": {"displayMode": "table", "placement": "right", "showLegend": True,
                           "calcs": ["lastNotNull", "max"]},
                "tooltip": {"mode": "multi", "sort": "desc"}}
    if kind == "stat":
        return {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "value", "graphMode": "none", "justifyMode": "auto",
                "orientation": "auto", "textMode": "value_and_name"}
    if kind == "table":
        return {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    if kind == "bargauge":
        return {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": True},
                "orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True}
    raise ValueError(kind)


RI = "$__rate_interval"


# ---------------------------------------------------------------------------------------------
# Cost vs revenue

def cost_vs_revenue() -> Board:
    b = Board("meterflow-cost-revenue", "meterflow / Cost vs revenue",
              "Revenue, provider cost and margin from the rater: exact, from ClickHouse "
              "(charges_dedup, revenue_daily, wallet_*), and live from the rater's gauges.",
              ["meterflow", "billing"])
    b.row("Totals (ClickHouse, exact)")
    b.panel("stat", "Revenue, provider cost and margin in range",
            "Sums over charges_dedup whose window starts in the time range (every currency "
            "together: the demo catalog is USD only).",
            [ch_target("A", """
                SELECT
                    toFloat64(r) AS revenue,
                    toFloat64(c) AS provider_cost,
                    toFloat64(m) AS margin,
                    if(r = 0, 0, 100 * toFloat64(m) / toFloat64(r)) AS margin_pct
                FROM
                (
                    SELECT sum(amount) AS r, sum(provider_cost) AS c, sum(margin) AS m
                    FROM charges_dedup
                    WHERE $__timeFilter(window_start)
                )
                """, table=True)], w=24, h=4, decimals=2)
    b.panel("timeseries", "Revenue, provider cost and margin",
            "Per time bucket of the charged windows (charges_dedup).",
            [ch_target("A", f"""
                SELECT time, toFloat64(r) AS revenue, toFloat64(c) AS provider_cost, toFloat64(m) AS margin
                FROM
                (
                    SELECT {bucket('window_start')} AS time,
                        sum(amount) AS r, sum(provider_cost) AS c, sum(margin) AS m
                    FROM charges_dedup
                    WHERE $__timeFilter(window_start)
                    GROUP BY time
                )
                ORDER BY time
                """, table=False)], interval="1m", decimals=4)
    b.panel("timeseries", "Margin %",
            "Margin / revenue per time bucket (0 where there is no revenue).",
            [ch_target("A", f"""
                SELECT time, if(r = 0, 0, 100 * toFloat64(m) / toFloat64(r)) AS margin_pct
                FROM
                (
                    SELECT {bucket('window_start')} AS time, sum(amount) AS r, sum(margin) AS m
                    FROM charges_dedup
                    WHERE $__timeFilter(window_start)
                    GROUP BY time
                )
                ORDER BY time
                """, table=False)], interval="1m", unit="percent", decimals=1)

    b.row("Live (rater gauges, Prometheus)")
    b.panel("timeseries", "Revenue, provider cost and margin (cumulative)",
            "meterflow_rater_revenue / _provider_cost / _margin: cumulative totals of the "
            "partitions each rater owns, summed over instances.",
            [prom_target("A", "sum by (currency) (meterflow_rater_revenue)", "revenue {{currency}}"),
             prom_target("B", "sum by (currency) (meterflow_rater_provider_cost)", "provider cost {{currency}}"),
             prom_target("C", "sum by (currency) (meterflow_rater_margin)", "margin {{currency}}")],
            w=8, decimals=2)
    b.panel("timeseries", "Margin % by meter",
            "100 * margin / revenue per meter (meters without revenue are left out).",
            [prom_target("A", "100 * sum by (meter) (meterflow_rater_margin)"
                              " / (sum by (meter) (meterflow_rater_revenue) > 0)", "{{meter}}")],
            w=8, unit="percent", decimals=1)
    b.panel("timeseries", "Revenue by plan and meter",
            "meterflow_rater_revenue by plan and meter.",
            [prom_target("A", "sum by (plan, meter) (meterflow_rater_revenue)", "{{plan}} {{meter}}")],
            w=8, decimals=2)

    b.row("Tenants (ClickHouse, whole UTC days of the range)")
    tenant_sql = """
        SELECT tenant, currency, plans, toFloat64(r) AS revenue, toFloat64(c) AS provider_cost,
            toFloat64(m) AS margin, if(r = 0, 0, 100 * toFloat64(m) / toFloat64(r)) AS margin_pct
        FROM
        (
            SELECT tenant, currency, arrayStringConcat(groupUniqArray(plan), ', ') AS plans,
                sum(revenue) AS r, sum(cost) AS c, sum(margin) AS m
            FROM revenue_daily
            WHERE $__dateFilter(day)
            GROUP BY tenant, currency
        )
        ORDER BY {order}
        LIMIT 10
        """
    b.panel("table", "Top tenants by revenue", "revenue_daily, largest revenue first.",
            [ch_target("A", tenant_sql.format(order="r DESC, tenant"), table=True)], decimals=2)
    b.panel("table", "Lowest margins (negative = loss)",
            "revenue_daily, smallest margin first: tenants whose provider cost exceeds what "
            "they pay (free allowances, discounts) come first.",
            [ch_target("A", tenant_sql.format(order="m ASC, tenant"), table=True)], decimals=2)

    b.row("Models and meters (ClickHouse)")
    dim_sql = """
        SELECT {dim}, currency, toFloat64(q) AS quantity, toFloat64(r) AS revenue,
            toFloat64(c) AS provider_cost, toFloat64(m) AS margin,
            if(r = 0, 0, 100 * toFloat64(m) / toFloat64(r)) AS margin_pct
        FROM
        (
            SELECT {dim}, currency, sum(quantity) AS q, sum(revenue) AS r, sum(cost) AS c, sum(margin) AS m
            FROM revenue_daily
            WHERE $__dateFilter(day)
            GROUP BY {dim}, currency
        )
        ORDER BY r DESC, {dim}
        """
    b.panel("table", "By model", "revenue_daily by model (quantity mixes the model's meters' units).",
            [ch_target("A", dim_sql.format(dim="model"), table=True)], w=8, decimals=2)
    b.panel("table", "By meter", "revenue_daily by meter.",
            [ch_target("A", dim_sql.format(dim="meter"), table=True)], w=8, decimals=2)
    b.panel("timeseries", "Margin by model", "charges_dedup margin per time bucket and model.",
            [ch_target("A", f"""
                SELECT time, model, toFloat64(m) AS margin
                FROM
                (
                    SELECT {bucket('window_start')} AS time, model, sum(margin) AS m
                    FROM charges_dedup
                    WHERE $__timeFilter(window_start)
                    GROUP BY time, model
                )
                ORDER BY time, model
                """, table=False)], w=8, interval="1m", decimals=4)

    b.row("Prepaid wallets")
    b.panel("table", "Wallet balances (ClickHouse)",
            "wallet_balances of tenants with a wallet (any adjustment): credits minus every "
            "charge, lowest first.",
            [ch_target("A", """
                SELECT tenant, currency, toFloat64(cr) AS credited, toFloat64(ch) AS charged, toFloat64(bal) AS balance
                FROM
                (
                    SELECT tenant, currency, credited AS cr, charged AS ch, balance AS bal
                    FROM wallet_balances
                    WHERE tenant IN (SELECT tenant FROM wallet_adjustments)
                )
                ORDER BY bal ASC, tenant
                LIMIT 50
                """, table=True)], w=8, decimals=2)
    b.panel("timeseries", "Lowest wallet balances (rater gauge)",
            "meterflow_rater_wallet_balance, the 10 lowest tenants.",
            [prom_target("A", "bottomk(10, sum by (tenant, currency) (meterflow_rater_wallet_balance))",
                         "{{tenant}} {{currency}}")], w=8, decimals=2)
    b.panel("timeseries", "Wallet alerts by kind (rater)",
            "meterflow_rater_wallet_alerts_total: low_balance and exhausted crossings "
            "(0 when none fired).",
            [prom_target("A", f"sum by (kind) (increase(meterflow_rater_wallet_alerts_total[{RI}])) or on() vector(0)",
                         "{{kind}}")], w=8, decimals=0)
    b.panel("table", "Wallet alerts (ClickHouse)",
            "wallet_alerts in the time range, newest first.",
            [ch_target("A", """
                SELECT alerted_at, tenant, kind, currency, toFloat64(bal) AS balance, toFloat64(thr) AS threshold
                FROM
                (
                    SELECT toDateTime(intDiv(at_ms, 1000)) AS alerted_at, tenant, kind, currency,
                        balance AS bal, threshold AS thr
                    FROM wallet_alerts FINAL
                )
                WHERE $__timeFilter(alerted_at)
                ORDER BY alerted_at DESC, tenant, kind
                LIMIT 100
                """, table=True)], w=24, decimals=2)
    return b


# ---------------------------------------------------------------------------------------------
# Usage

def usage() -> Board:
    b = Board("meterflow-usage", "meterflow / Usage",
              "Metered usage per meter and tenant (meter_totals: latest revision of every "
              "window), accepted events, windows closed and restated.",
              ["meterflow", "usage"])
    b.row("Usage (ClickHouse, corrected window totals)")
    b.panel("timeseries", "Usage by meter",
            "meter_totals.value per time bucket (each meter in its own unit).",
            [ch_target("A", f"""
                SELECT time, meter, toFloat64(v) AS usage
                FROM
                (
                    SELECT {bucket('window_start')} AS time, meter, sum(value) AS v
                    FROM meter_totals
                    WHERE $__timeFilter(window_start)
                    GROUP BY time, meter
                )
                ORDER BY time, meter
                """, table=False)], interval="1m")
    b.panel("timeseries", "Tokens by tenant (top 10)",
            "input_tokens + output_tokens of the 10 tenants with most tokens in the range.",
            [ch_target("A", f"""
                SELECT time, tenant, toFloat64(v) AS tokens
                FROM
                (
                    SELECT {bucket('window_start')} AS time, tenant, sum(value) AS v
                    FROM meter_totals
                    WHERE $__timeFilter(window_start)
                        AND meter IN ('input_tokens', 'output_tokens')
                        AND tenant IN
                        (
                            SELECT tenant
                            FROM meter_totals
                            WHERE $__timeFilter(window_start) AND meter IN ('input_tokens', 'output_tokens')
                            GROUP BY tenant
                            ORDER BY sum(value) DESC, tenant
                            LIMIT 10
                        )
                    GROUP BY time, tenant
                )
                ORDER BY time, tenant
                """, table=False)], interval="1m")
    b.panel("timeseries", "Events counted",
            "meter_totals.event_count per time bucket and meter: deduplicated events in "
            "windows, restatements included.",
            [ch_target("A", f"""
                SELECT time, meter, n AS events
                FROM
                (
                    SELECT {bucket('window_start')} AS time, meter, sum(event_count) AS n
                    FROM meter_totals
                    WHERE $__timeFilter(window_start)
                    GROUP BY time, meter
                )
                ORDER BY time, meter
                """, table=False)], interval="1m")
    b.panel("timeseries", "Accepted events stored (usage_events)",
            "Distinct (tenant, event id) in usage_events per event-time bucket and meter.",
            [ch_target("A", f"""
                SELECT time, meter, n AS events
                FROM
                (
                    SELECT {bucket('event_time')} AS time, meter, uniqExact(tenant, event_id) AS n
                    FROM usage_events
                    WHERE $__timeFilter(event_time)
                    GROUP BY time, meter
                )
                ORDER BY time, meter
                """, table=False)], interval="1m")
    b.panel("table", "Usage by tenant and meter",
            "meter_totals in the range: usage, events, windows and how many were restated.",
            [ch_target("A", """
                SELECT tenant, meter, toFloat64(v) AS usage, n AS events, w AS windows_total, rw AS windows_restated
                FROM
                (
                    SELECT tenant, meter, sum(value) AS v, sum(event_count) AS n, count() AS w,
                        countIf(last_revision > 0) AS rw
                    FROM meter_totals
                    WHERE $__timeFilter(window_start)
                    GROUP BY tenant, meter
                )
                ORDER BY v DESC, tenant, meter
                LIMIT 200
                """, table=True)], w=24, h=9)

    b.row("Windows and restatements")
    b.panel("timeseries", "Restatements (meter_aggregates revision > 0)",
            "Emitted restatement rows per time bucket of the restated window, by meter.",
            [ch_target("A", f"""
                SELECT time, meter, n AS restatements
                FROM
                (
                    SELECT {bucket('window_start')} AS time, meter, count() AS n
                    FROM meter_aggregates
                    WHERE $__timeFilter(window_start) AND revision > 0
                    GROUP BY time, meter
                )
                ORDER BY time, meter
                """, table=False)], w=8, interval="1m")
    b.panel("stat", "Windows restated",
            "Windows in the range, and how many have a revision > 0 (meter_totals).",
            [ch_target("A", """
                SELECT w AS windows_total, rw AS windows_restated, if(w = 0, 0, 100 * rw / w) AS restated_pct
                FROM
                (
                    SELECT count() AS w, countIf(last_revision > 0) AS rw
                    FROM meter_totals
                    WHERE $__timeFilter(window_start)
                )
                """, table=True)], w=8, decimals=1)
    b.panel("timeseries", "Windows closed and restatements per second (aggregator)",
            "meterflow_aggregator_windows_closed_total and _restatements_total.",
            [prom_target("A", f"sum(rate(meterflow_aggregator_windows_closed_total[{RI}]))", "windows closed"),
             prom_target("B", f"sum(rate(meterflow_aggregator_restatements_total[{RI}]))", "restatements")],
            w=8, unit="ops")

    b.row("Event counts (Prometheus)")
    b.panel("timeseries", "Events in, accepted, duplicates (per second)",
            "meterflow_aggregator_events_in_total, _events_accepted_total, _duplicates_total.",
            [prom_target("A", f"sum(rate(meterflow_aggregator_events_in_total[{RI}]))", "in"),
             prom_target("B", f"sum(rate(meterflow_aggregator_events_accepted_total[{RI}]))", "accepted"),
             prom_target("C", f"sum(rate(meterflow_aggregator_duplicates_total[{RI}]))", "duplicates")],
            unit="ops")
    b.panel("timeseries", "Producer: messages sent by kind (per second)",
            "meterflow_producer_events_sent_total by kind (valid, late, duplicate, malformed, too_late).",
            [prom_target("A", f"sum by (kind) (rate(meterflow_producer_events_sent_total[{RI}]))", "{{kind}}")],
            unit="ops")
    return b


# ---------------------------------------------------------------------------------------------
# Pipeline health

def pipeline_health() -> Board:
    b = Board("meterflow-pipeline-health", "meterflow / Pipeline health",
              "Throughput, lag, ClickHouse latency, checkpoints, dead letters and errors of "
              "the aggregator and the rater.",
              ["meterflow", "health"])
    b.row("Throughput")
    b.panel("timeseries", "Ingest rate",
            "Records read from the usage-events topic and events counted, per second.",
            [prom_target("A", f"sum(rate(meterflow_aggregator_events_in_total[{RI}]))", "read"),
             prom_target("B", f"sum(rate(meterflow_aggregator_events_accepted_total[{RI}]))", "accepted")],
            w=8, unit="ops")
    b.panel("timeseries", "Duplicates dropped",
            "Events dropped because their (tenant, event id) was seen before, per second.",
            [prom_target("A", f"sum(rate(meterflow_aggregator_duplicates_total[{RI}]))", "duplicates")],
            w=8, unit="ops")
    b.panel("timeseries", "Dead letters by reason (aggregator)",
            "meterflow_aggregator_dead_letters_total by reason, per second.",
            [prom_target("A", f"sum by (reason) (rate(meterflow_aggregator_dead_letters_total[{RI}]))", "{{reason}}")],
            w=8, unit="ops")
    b.panel("timeseries", "Charges per second",
            "meterflow_rater_charges_total by kind (usage, true_up).",
            [prom_target("A", f"sum by (kind) (rate(meterflow_rater_charges_total[{RI}]))", "{{kind}}")],
            w=8, unit="ops")
    b.panel("timeseries", "Rater input",
            "Aggregates read, skipped as re-deliveries and rejected, per second (skipped and "
            "rejected are 0 until the first one).",
            [prom_target("A", f"sum(rate(meterflow_rater_aggregates_in_total[{RI}]))", "in"),
             prom_target("B", f"sum(rate(meterflow_rater_aggregates_skipped_total[{RI}])) or on() vector(0)", "skipped"),
             prom_target("C", f"sum(rate(meterflow_rater_aggregates_rejected_total[{RI}])) or on() vector(0)", "rejected")],
            w=8, unit="ops")
    b.panel("timeseries", "Producer send rate and errors",
            "meterflow_producer_events_sent_total (all kinds) and _send_errors_total, per second.",
            [prom_target("A", f"sum(rate(meterflow_producer_events_sent_total[{RI}]))", "sent"),
             prom_target("B", f"sum(rate(meterflow_producer_send_errors_total[{RI}]))", "errors")],
            w=8, unit="ops")

    b.row("Lag")
    b.panel("timeseries", "Consumer lag (aggregator)",
            "Messages between the committed position and the end of each usage-events partition.",
            [prom_target("A", "sum by (partition) (meterflow_aggregator_consumer_lag_messages)", "partition {{partition}}")],
            w=8, unit="short")
    b.panel("timeseries", "Watermark lag (aggregator)",
            "Wall clock minus each partition's event-time watermark.",
            [prom_target("A", "max by (partition) (meterflow_aggregator_watermark_lag_seconds)", "partition {{partition}}")],
            w=8, unit="s")
    b.panel("timeseries", "Rating lag (rater)",
            "Wall clock minus the time the last rated aggregate was produced.",
            [prom_target("A", "max(meterflow_rater_rating_lag_seconds)", "rating lag")],
            w=8, unit="s")
    b.panel("stat", "Data freshness (ClickHouse)",
            "Seconds since the newest meter_aggregates and charges rows were inserted.",
            [ch_target("A", """
                SELECT
                    (SELECT toInt64(toUInt32(now())) - toInt64(toUInt32(max(inserted_at))) FROM meter_aggregates) AS aggregates_age,
                    (SELECT toInt64(toUInt32(now())) - toInt64(toUInt32(max(inserted_at))) FROM charges) AS charges_age
                """, table=True)], w=8, h=6, unit="s")
    b.panel("timeseries", "Rows written to ClickHouse",
            "meter_aggregates and charges rows per insert-time bucket.",
            [ch_target("A", f"""
                SELECT time, tbl, n AS rows_written
                FROM
                (
                    SELECT {bucket('inserted_at')} AS time, 'meter_aggregates' AS tbl, count() AS n
                    FROM meter_aggregates
                    WHERE $__timeFilter(inserted_at)
                    GROUP BY time
                    UNION ALL
                    SELECT {bucket('inserted_at')} AS time, 'charges' AS tbl, count() AS n
                    FROM charges
                    WHERE $__timeFilter(inserted_at)
                    GROUP BY time
                )
                ORDER BY time, tbl
                """, table=False)], w=16, h=6, interval="1m")

    b.row("ClickHouse, checkpoints, errors")
    for svc in ("aggregator", "rater"):
        b.panel("timeseries", f"ClickHouse insert latency ({svc})",
                f"histogram_quantile over meterflow_{svc}_clickhouse_insert_seconds_bucket, by table.",
                [prom_target("A", "histogram_quantile(0.99, sum by (le, table) "
                                  f"(rate(meterflow_{svc}_clickhouse_insert_seconds_bucket[{RI}])))", "p99 {{table}}"),
                 prom_target("B", "histogram_quantile(0.5, sum by (le, table) "
                                  f"(rate(meterflow_{svc}_clickhouse_insert_seconds_bucket[{RI}])))", "p50 {{table}}")],
                w=8, unit="s")
    b.panel("timeseries", "Checkpoint duration p99",
            "Time to write a checkpoint and commit offsets (histogram_quantile over "
            "*_checkpoint_seconds_bucket).",
            [prom_target("A", "histogram_quantile(0.99, sum by (le) "
                              f"(rate(meterflow_aggregator_checkpoint_seconds_bucket[{RI}])))", "aggregator"),
             prom_target("B", "histogram_quantile(0.99, sum by (le) "
                              f"(rate(meterflow_rater_checkpoint_seconds_bucket[{RI}])))", "rater")],
            w=8, unit="s")
    b.panel("timeseries", "Flush errors by sink",
            "Failed (retried) flush attempts per second by sink; 0 when there were none.",
            [prom_target("A", f"sum by (sink) (rate(meterflow_aggregator_flush_errors_total[{RI}])) or on() vector(0)",
                         "aggregator {{sink}}"),
             prom_target("B", f"sum by (sink) (rate(meterflow_rater_flush_errors_total[{RI}])) or on() vector(0)",
                         "rater {{sink}}")],
            w=8, unit="ops")
    b.panel("timeseries", "Aggregator buffers",
            "Output rows waiting to be flushed, and event ids remembered in memory.",
            [prom_target("A", "sum(meterflow_aggregator_buffered_rows)", "buffered rows"),
             prom_target("B", "sum(meterflow_aggregator_dedup_hot_ids)", "dedup ids in memory")],
            w=8, unit="short")
    b.panel("table", "Checkpoints (ClickHouse)",
            "Newest checkpoint per service, group and partition.",
            [ch_target("A", """
                SELECT service, consumer_group, topic, p AS partition, v AS version, o AS next_offset, wa AS written_at,
                    toInt64(toUInt32(now())) - toInt64(toUInt32(wa)) AS age_seconds
                FROM
                (
                    SELECT service, consumer_group, topic, partition AS p, max(version) AS v,
                        argMax(next_offset, version) AS o, max(written_at) AS wa
                    FROM checkpoint_positions
                    GROUP BY service, consumer_group, topic, partition
                )
                ORDER BY service, consumer_group, topic, p
                """, table=True)], w=8)

    b.row("Parked aggregates (rater)")
    b.panel("timeseries", "Aggregates parked",
            "Aggregates the rater could not price, by reason (unpriced: no plan or price; "
            "overflow: a decimal result that does not fit), per second, and how many are parked "
            "now. Billing of everything else continues; `meterflow-admin rerate` re-rates them "
            "after a catalog fix.",
            [prom_target("A", f"sum by (reason) (rate(meterflow_rater_aggregates_parked_total[{RI}]))", "{{reason}}"),
             prom_target("B", "sum(meterflow_rater_parked_aggregates)", "parked now"),
             prom_target("C", f"sum by (outcome) (rate(meterflow_rater_rerates_total[{RI}])) or on() vector(0)",
                         "rerate {{outcome}}")],
            w=12, unit="short")
    b.panel("table", "Parked aggregates by state (ClickHouse)",
            "parked_current: aggregates parked now, re-rated (charged) and rejected for good.",
            [ch_target("A", """
                SELECT st AS state, n AS aggregates
                FROM
                (
                    SELECT 'parked' AS st, (SELECT count() FROM parked_current WHERE current_state = 'parked') AS n
                    UNION ALL
                    SELECT 'rerated' AS st, (SELECT count() FROM parked_current WHERE current_state = 'rerated') AS n
                    UNION ALL
                    SELECT 'rejected' AS st, (SELECT count() FROM parked_current WHERE current_state = 'rejected') AS n
                )
                ORDER BY st
                """, table=True)], w=12)

    b.row("Dead letters (ClickHouse)")
    b.panel("timeseries", "Dead letters by reason",
            "dead_letters rows per time bucket and reason.",
            [ch_target("A", f"""
                SELECT time, reason, n AS messages
                FROM
                (
                    SELECT {bucket('dead_lettered_at')} AS time, reason, count() AS n
                    FROM dead_letters
                    WHERE $__timeFilter(dead_lettered_at)
                    GROUP BY time, reason
                )
                ORDER BY time, reason
                """, table=False)], w=8, interval="1m")
    b.panel("table", "Latest dead letters",
            "The newest 100 dead letters in the range, with where they came from and why.",
            [ch_target("A", """
                SELECT dead_lettered_at, source_topic, source_partition, source_offset, reason, detail, tenant, event_id
                FROM dead_letters FINAL
                WHERE $__timeFilter(dead_lettered_at)
                ORDER BY dead_lettered_at DESC, source_topic, source_partition, source_offset
                LIMIT 100
                """, table=True)], w=16)
    b.row("Leakage audit")
    b.panel("table", "Leakage audit findings (latest run)",
            "meterflow-admin audit's latest run: each violated conservation law (events vs "
            "windows, unrated windows, charges without a window, invoice vs charges, wallets, "
            "ingest offsets); a single run_ok row when it found nothing.",
            [ch_target("A", """
                SELECT run_at, check_name, tenant, subject, expected, actual, detail
                FROM audit_findings
                WHERE run_id IN (SELECT argMax(run_id, run_at) FROM audit_findings)
                ORDER BY check_name, tenant, subject
                LIMIT 200
                """, table=True)], w=24)
    return b


# ---------------------------------------------------------------------------------------------
# Revenue recognition (ASC 606 credit ledger) and shadow billing

PAID_NET = ("if(credit_kind = 'paid', if(movement = 'grant', amount, -amount), toDecimal128(0, 9))")


def revenue_recognition() -> Board:
    b = Board("meterflow-revenue-recognition", "meterflow / Revenue recognition",
              "Prepaid credit under ASC 606 / IFRS 15 from the rater's wallet_ledger: paid credit is "
              "deferred revenue until consumed (recognised), refunded or expired (breakage); "
              "promotional and manual credit is never revenue. And shadow billing: meterflow "
              "against the external biller (meterflow-admin reconcile). docs/revenue-assurance.md.",
              ["meterflow", "finance"])
    b.row("Deferred revenue")
    b.panel("stat", "Deferred revenue now",
            "Unused paid credit of all tenants: paid top-ups - recognised - refunds - breakage, "
            "over all time (the liability on the balance sheet).",
            [ch_target("A", f"""
                SELECT currency, deferred
                FROM
                (
                    SELECT currency, sum({PAID_NET}) AS deferred
                    FROM wallet_ledger_dedup
                    WHERE credit_kind = 'paid'
                    GROUP BY currency
                )
                ORDER BY currency
                """, table=True)], w=6, unit="currencyUSD", decimals=2)
    b.panel("timeseries", "Recognised revenue, breakage and promotional consumption",
            "Per time bucket (by movement time): paid credit consumed by charges (recognised), "
            "expired paid credit (breakage), promotional/manual credit consumed (a discount, not "
            "revenue), and usage no credit covered (billed in arrears).",
            [ch_target("A", f"""
                SELECT t AS time, recognised, breakage, promotional_consumed, billed_in_arrears
                FROM
                (
                    SELECT
                        {bucket('at')} AS t,
                        sumIf(amount, movement = 'drawdown' AND credit_kind = 'paid') AS recognised,
                        sumIf(amount, movement = 'expiry' AND credit_kind = 'paid') AS breakage,
                        sumIf(amount, movement = 'drawdown' AND credit_kind != 'paid') AS promotional_consumed,
                        sumIf(amount, movement = 'arrears') AS billed_in_arrears
                    FROM wallet_ledger_dedup
                    WHERE $__timeFilter(at)
                    GROUP BY t
                )
                ORDER BY time
                """, table=False)], w=18, unit="currencyUSD")
    b.panel("table", "Deferred revenue roll-forward per tenant and day",
            "opening + paid top-ups - recognised - refunds - breakage = closing, per tenant, "
            "currency and day (view revenue_recognition_daily).",
            [ch_target("A", """
                SELECT day, tenant, currency, opening_deferred, paid_topups, recognised, refunds, breakage, closing_deferred
                FROM revenue_recognition_daily
                WHERE $__dateFilter(day)
                ORDER BY day DESC, tenant, currency
                LIMIT 500
                """, table=True)], w=24, h=10)
    b.panel("table", "Promotional and manual credit (not revenue)",
            "Per tenant: non-revenue credit granted, consumed by charges, expired, debited, and "
            "unused now.",
            [ch_target("A", """
                SELECT tenant, currency, granted, consumed, expired, debited, granted - consumed - expired - debited AS unused
                FROM
                (
                    SELECT
                        tenant,
                        currency,
                        sumIf(amount, movement = 'grant') AS granted,
                        sumIf(amount, movement = 'drawdown') AS consumed,
                        sumIf(amount, movement = 'expiry') AS expired,
                        sumIf(amount, movement = 'debit') AS debited
                    FROM wallet_ledger_dedup
                    WHERE credit_kind IN ('promotional', 'manual')
                    GROUP BY tenant, currency
                )
                ORDER BY tenant, currency
                """, table=True)], w=24)
    b.row("Shadow billing")
    b.panel("table", "Over- and under-billing by tenant (latest reconciliation)",
            "The latest meterflow-admin reconcile run: per tenant and currency, what meterflow "
            "charged, what the external biller invoiced, and the differences beyond tolerance "
            "(over-billed: external > meterflow; under-billed: revenue leak).",
            [ch_target("A", """
                SELECT tenant, currency, meterflow, external, over_billed, under_billed, differing_keys
                FROM
                (
                    SELECT
                        tenant,
                        currency,
                        sum(meterflow_amount) AS meterflow,
                        sum(external_amount) AS external,
                        sumIf(difference, status = 'over_billed') AS over_billed,
                        -sumIf(difference, status = 'under_billed') AS under_billed,
                        countIf(status != 'match') AS differing_keys
                    FROM reconciliation_results
                    WHERE run_id IN (SELECT argMax(run_id, run_at) FROM reconciliation_results)
                    GROUP BY tenant, currency
                )
                ORDER BY differing_keys DESC, tenant, currency
                """, table=True)], w=12, h=9)
    b.panel("table", "Differences (latest reconciliation)",
            "Every (tenant, price, period) of the latest run that differs beyond tolerance, with "
            "why: missing_external (usage not invoiced), extra_external (invoiced, never "
            "metered), amount_mismatch.",
            [ch_target("A", """
                SELECT tenant, price, period_start, currency, meterflow_amount, external_amount, difference, status, finding
                FROM reconciliation_results
                WHERE run_id IN (SELECT argMax(run_id, run_at) FROM reconciliation_results)
                    AND status != 'match'
                ORDER BY tenant, price, period_start
                LIMIT 200
                """, table=True)], w=12, h=9)
    return b


BOARDS = {
    "cost-vs-revenue.json": cost_vs_revenue,
    "usage.json": usage,
    "pipeline-health.json": pipeline_health,
    "revenue-recognition.json": revenue_recognition,
}


def render(fn) -> str:
    return json.dumps(fn().json(), indent=2) + "\n"


def main() -> int:
    check = sys.argv[1:] == ["--check"]
    if sys.argv[1:] and not check:
        print(__doc__, file=sys.stderr)
        return 2
    stale = []
    for name, fn in BOARDS.items():
        path = os.path.join(OUT, name)
        text = render(fn)
        try:
            with open(path, encoding="utf-8") as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current == text:
            continue
        if check:
            stale.append(path)
        else:
            os.makedirs(OUT, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"wrote {path}")
    extra = sorted(set(f for f in os.listdir(OUT) if f.endswith(".json")) - set(BOARDS)) if os.path.isdir(OUT) else []
    if check and (stale or extra):
        for p in stale:
            print(f"{p} is not what build_dashboards.py writes: run python3 deploy/grafana/build_dashboards.py", file=sys.stderr)
        for p in extra:
            print(f"deploy/grafana/dashboards/{p} is not written by build_dashboards.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
