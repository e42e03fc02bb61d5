//! The query phase: meterflow's totals against the baseline's three ways of answering.

use super::*;

#[derive(Debug, clickhouse::Row, Deserialize)]
pub(super) struct UsageRow {
    pub(super) tenant: String,
    pub(super) meter: String,
    pub(super) usage: i128,
}

pub(super) const Q_METERFLOW: &str = "SELECT tenant, meter, sum(value) AS usage FROM meter_totals \
    WHERE window_start >= toStartOfMonth(now()) GROUP BY tenant, meter ORDER BY tenant, meter";
pub(super) const Q_BASE_GROUP: &str = "SELECT tenant, meter, sum(q) AS usage FROM (SELECT tenant, meter, event_id, any(quantity) AS q \
    FROM baseline_events WHERE event_time >= toDateTime(toStartOfMonth(now())) GROUP BY tenant, meter, event_id) \
    GROUP BY tenant, meter ORDER BY tenant, meter";
pub(super) const Q_BASE_FINAL: &str = "SELECT tenant, meter, sum(quantity) AS usage FROM baseline_events FINAL \
    WHERE event_time >= toDateTime(toStartOfMonth(now())) GROUP BY tenant, meter ORDER BY tenant, meter";
pub(super) const Q_BASE_MV: &str = "SELECT tenant, meter, sum(quantity) AS usage FROM baseline_hourly \
    WHERE hour >= toDateTime(toStartOfMonth(now())) GROUP BY tenant, meter ORDER BY tenant, meter";

/// Median and minimum seconds of `runs` executions after a warm-up, and the result.
pub(super) async fn time_query(ch: &clickhouse::Client, sql: &str, runs: usize) -> Result<(f64, f64, BTreeMap<(String, String), Decimal>)> {
    let mut result = BTreeMap::new();
    let mut times = Vec::new();
    let budget = Instant::now();
    for i in 0..=runs {
        if times.len() >= 3 && budget.elapsed() > Duration::from_secs(30) {
            break;
        }
        let t = Instant::now();
        let rows: Vec<UsageRow> = ch.query(sql).fetch_all().await.with_context(|| format!("query {sql}"))?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        result = rows.into_iter().map(|r| ((r.tenant, r.meter), from_ch_i128(r.usage).normalize())).collect();
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0], result))
}

#[derive(Debug, clickhouse::Row, Deserialize)]
pub(super) struct PartRow {
    pub(super) table: String,
    pub(super) rows: u64,
    pub(super) bytes: u64,
}

pub(super) async fn queries(args: &Args, ch: &clickhouse::Client, gt: &GroundTruth, report: &mut Report) -> Result<()> {
    let month_start: u32 = ch.query("SELECT toUInt32(toDateTime(toStartOfMonth(now())))").fetch_one().await?;
    let mut expected: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    for w in gt.windows.iter().filter(|w| w.window_start >= i64::from(month_start) * 1000) {
        *expected.entry((w.tenant.clone(), w.meter.clone())).or_default() += w.value;
    }
    for v in expected.values_mut() {
        *v = v.normalize();
    }
    let (mf_med, mf_min, mf) = time_query(ch, Q_METERFLOW, args.query_runs).await?;
    let (bg_med, bg_min, bg) = time_query(ch, Q_BASE_GROUP, args.query_runs).await?;
    let (bf_med, bf_min, bf) = time_query(ch, Q_BASE_FINAL, args.query_runs).await?;
    let (mv_med, _, mv) = time_query(ch, Q_BASE_MV, args.query_runs).await?;
    let eq = |a: &BTreeMap<(String, String), Decimal>| if *a == expected { "= ground truth".to_owned() } else { format!("DIFFERS from the ground truth ({} of {} tenant/meter totals)", a.iter().filter(|(k, v)| expected.get(*k) != Some(*v)).count() + expected.keys().filter(|k| !a.contains_key(*k)).count(), expected.len()) };
    let ms = |s: f64| format!("{:.1} ms", s * 1e3);
    report.row("query", "usage per tenant and meter this month: meterflow (meter_totals)", ms(mf_med), format!("median of up to {} runs after a warm-up, min {}; result {}", args.query_runs, ms(mf_min), eq(&mf)));
    report.row("query", "same on the baseline, dedup by GROUP BY event_id", ms(bg_med), format!("min {}; result {}", ms(bg_min), eq(&bg)));
    report.row("query", "same on the baseline, dedup by FINAL", ms(bf_med), format!("min {}; result {}", ms(bf_min), eq(&bf)));
    let over: Decimal = mv.iter().map(|(k, v)| *v - expected.get(k).copied().unwrap_or_default()).sum();
    let total: Decimal = expected.values().copied().sum();
    report.row(
        "query",
        "baseline's SummingMergeTree MV (fast, wrong)",
        ms(mv_med),
        format!(
            "result {}: duplicates are summed in at insert time, over-counting usage by {} ({:.2}% of {})",
            eq(&mv),
            over.round_dp(3),
            if total.is_zero() { 0.0 } else { (over / total).to_string().parse::<f64>().unwrap_or(0.0) * 100.0 },
            total.round_dp(3)
        ),
    );
    let parts: Vec<PartRow> = ch
        .query("SELECT table, sum(rows) AS rows, sum(bytes_on_disk) AS bytes FROM system.parts WHERE database = currentDatabase() AND active GROUP BY table ORDER BY table")
        .fetch_all()
        .await?;
    let part = |t: &str| parts.iter().find(|p| p.table == t).map_or((0, 0), |p| (p.rows, p.bytes));
    let (agg_rows, agg_bytes) = part("meter_aggregates");
    let (raw_rows, raw_bytes) = part("usage_events");
    let (base_rows, base_bytes) = part("baseline_events");
    let (mv_rows, _) = part(".inner.baseline_hourly");
    report.row("rows", "meterflow: meter_aggregates (what the usage query reads)", fmt_rate(agg_rows as f64), format!("{} on disk; window revisions not merged away yet included", mib(agg_bytes)))
        ;
    report.row("rows", "meterflow: usage_events (drill-down and cold dedup tier, not read by the usage query)", fmt_rate(raw_rows as f64), format!("{} on disk; each accepted event once (before merges: replays fold later)", mib(raw_bytes)));
    report.row("rows", "baseline: baseline_events (what the dedup query reads)", fmt_rate(base_rows as f64), format!("{} on disk; duplicates until merged", mib(base_bytes)));
    report.row("rows", "baseline: MV rows (tenant/meter/hour)", fmt_rate(mv_rows as f64), "");
    let speedup = bg_med.min(bf_med) / mf_med;
    let fewer = base_rows as f64 / agg_rows.max(1) as f64;
    let all_equal = mf == expected && bg == expected && bf == expected;
    report.goal(
        "usage query >= 10x faster than the baseline (after 10M events), results equal",
        format!("{:.1}x ({} vs the faster baseline query {}) at {} events; results equal: {}", speedup, ms(mf_med), ms(bg_med.min(bf_med)), fmt_rate(gt.counters.sent as f64), if all_equal { "yes" } else { "NO" }),
        Some(speedup >= 10.0 && all_equal),
    );
    report.goal(
        ">= 100x fewer rows than the baseline (after 10M events)",
        format!("{:.1}x ({} meter_aggregates rows vs {} raw rows) at {} events", fewer, fmt_rate(agg_rows as f64), fmt_rate(base_rows as f64), fmt_rate(gt.counters.sent as f64)),
        Some(fewer >= 100.0),
    );
    if gt.counters.sent < 10_000_000 {
        report.note(format!(
            "the query and row goals are stated for 10M events; this run used {} (--events). Raw rows grow with events, window rows with tenants x meters x dimension values x minutes, so the ratios grow with the event rate per window.",
            fmt_rate(gt.counters.sent as f64)
        ));
    }
    Ok(())
}
