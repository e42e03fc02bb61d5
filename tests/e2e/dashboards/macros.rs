//! Grafana's macro expansion, as the ClickHouse data source plugin (pkg/macros) and
//! Prometheus do it, for the run's time range.

use anyhow::{bail, ensure};

use crate::SCRAPE_S;

/// The time range and intervals Grafana would use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Range {
    pub(crate) from_s: i64,
    pub(crate) to_s: i64,
}

impl Range {
    /// `$__interval` in seconds: about 1000 points over the range, at least the panel's
    /// minimum interval and the scrape interval.
    pub(crate) fn interval_s(&self, min_interval_s: i64) -> i64 {
        ((self.to_s - self.from_s) / 1000).max(min_interval_s).max(SCRAPE_S as i64).max(1)
    }
}

/// The UTC date (`YYYY-MM-DD`) of Unix seconds, as Grafana's `$__dateFilter` writes it.
pub(crate) fn utc_date(unix_s: i64) -> String {
    let t = meterflow_core::time::format_rfc3339_s(unix_s * 1000);
    t.get(..10).unwrap_or(&t).to_owned()
}

/// The argument list of a macro call whose `(` is at `open`; returns the args and the index
/// after the closing `)`.
pub(crate) fn macro_args(sql: &str, open: usize) -> anyhow::Result<(Vec<String>, usize)> {
    let mut depth = 0;
    let mut cur = String::new();
    let mut args = Vec::new();
    for (i, c) in sql[open..].char_indices() {
        match c {
            '(' => {
                depth += 1;
                if depth > 1 {
                    cur.push(c);
                }
            }
            ')' => {
                depth -= 1;
                if depth == 0 {
                    args.push(cur.trim().to_owned());
                    return Ok((args, open + i + 1));
                }
                cur.push(c);
            }
            ',' if depth == 1 => args.push(std::mem::take(&mut cur).trim().to_owned()),
            _ => cur.push(c),
        }
    }
    bail!("unbalanced parentheses in a macro call")
}

/// Expands the grafana-clickhouse-datasource macros the dashboards use, exactly as the plugin
/// does (pkg/macros): `$__timeFilter(c)`, `$__dateFilter(c)`, `$__fromTime`, `$__toTime`,
/// `$__interval_s`. Anything else starting with `$` is an error.
pub(crate) fn expand_sql(sql: &str, range: Range, interval_s: i64) -> anyhow::Result<String> {
    let (from, to) = (range.from_s, range.to_s);
    let mut out = String::with_capacity(sql.len() + 256);
    let mut i = 0;
    while let Some(off) = sql[i..].find("$__") {
        let start = i + off;
        out.push_str(&sql[i..start]);
        let name_end = sql[start + 3..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(sql.len(), |e| start + 3 + e);
        let name = &sql[start + 3..name_end];
        i = name_end;
        match name {
            "timeFilter" | "dateFilter" => {
                ensure!(sql[name_end..].starts_with('('), "$__{name} without arguments");
                let (args, next) = macro_args(sql, name_end)?;
                ensure!(args.len() == 1, "$__{name} takes one argument, got {}", args.len());
                let c = &args[0];
                if name == "timeFilter" {
                    out.push_str(&format!("{c} >= toDateTime({from}) AND {c} <= toDateTime({to})"));
                } else {
                    out.push_str(&format!("{c} >= toDate('{}') AND {c} <= toDate('{}')", utc_date(from), utc_date(to)));
                }
                i = next;
            }
            "fromTime" => out.push_str(&format!("toDateTime({from})")),
            "toTime" => out.push_str(&format!("toDateTime({to})")),
            "interval_s" => out.push_str(&interval_s.to_string()),
            other => bail!("unsupported ClickHouse macro $__{other}"),
        }
    }
    out.push_str(&sql[i..]);
    ensure!(!out.contains('$'), "unexpanded variable in SQL: {out}");
    Ok(out)
}

/// Grafana's Prometheus variables: `$__rate_interval` = max(`$__interval` + scrape interval,
/// 4 × scrape interval), `$__interval`.
pub(crate) fn expand_promql(expr: &str, interval_s: i64) -> anyhow::Result<String> {
    let scrape = SCRAPE_S as i64;
    let rate = (interval_s + scrape).max(4 * scrape);
    let out = expr.replace("$__rate_interval", &format!("{rate}s")).replace("$__interval", &format!("{interval_s}s"));
    ensure!(!out.contains('$'), "unexpanded variable in PromQL: {out}");
    Ok(out)
}

#[test]
fn sql_macros_expand_like_the_plugin() {
    let r = Range { from_s: 1_795_700_000, to_s: 1_795_703_600 };
    let sql = "SELECT toDateTime(intDiv(toUInt32(t), $__interval_s) * $__interval_s) AS time FROM x \
               WHERE $__timeFilter(toDateTime(intDiv(at_ms, 1000))) AND $__dateFilter(day) AND a < $__toTime AND a > $__fromTime";
    let got = expand_sql(sql, r, 60).unwrap();
    assert_eq!(
        got,
        "SELECT toDateTime(intDiv(toUInt32(t), 60) * 60) AS time FROM x \
         WHERE toDateTime(intDiv(at_ms, 1000)) >= toDateTime(1795700000) AND toDateTime(intDiv(at_ms, 1000)) <= toDateTime(1795703600) \
         AND day >= toDate('2026-11-26') AND day <= toDate('2026-11-26') AND a < toDateTime(1795703600) AND a > toDateTime(1795700000)"
    );
    assert!(expand_sql("SELECT $__timeInterval(t)", r, 60).is_err());
    assert!(expand_sql("SELECT $tenant", r, 60).is_err());
    assert_eq!(expand_promql("rate(x[$__rate_interval])", 3).unwrap(), "rate(x[4s])");
    assert_eq!(expand_promql("rate(x[$__rate_interval])", 10).unwrap(), "rate(x[11s])");
    assert_eq!(utc_date(0), "1970-01-01");
    assert_eq!(utc_date(951_782_400), "2000-02-29");
}
