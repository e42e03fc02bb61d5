//! `meterflow-demo-summary report`: the summary read from ClickHouse and the services'
//! metrics, checked against the ground truth.

use super::*;
use crate::demo_format::*;
use meterflow_testkit::http::{get_ok, metric};

#[derive(Debug, clickhouse::Row, Deserialize)]
struct UsageRow {
    tenant: String,
    meter: String,
    value: i128,
    events: i64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct MoneyRow {
    tenant: String,
    plan: String,
    revenue: i128,
    cost: i128,
    margin: i128,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct ReasonRow {
    reason: String,
    n: u64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct ModelRow {
    model: String,
    revenue: i128,
    cost: i128,
    margin: i128,
}

pub(crate) async fn report(conn: &Conn, files: &Files, agg_metrics: &str, rater_metrics: &str, top: usize) -> anyhow::Result<bool> {
    let gt = load_truth(files)?;
    let catalog = load_catalog(&files.catalog)?;
    let credits = load_credits(&files.credits)?;
    let expected_money = verify::expected_money(&gt, &catalog)?;
    let ch = ch(conn);
    let topic = &conn.topics.usage_topic;
    let c = &gt.counters;
    let mut checks = Checks::default();
    let mut out = String::new();
    let w = &mut out;

    // --- events
    let accepted: u64 = ch.query("SELECT uniqExact(tenant, meter, event_id) FROM usage_events").fetch_one().await?;
    let reasons: Vec<ReasonRow> = ch
        .query("SELECT reason, uniqExact(source_partition, source_offset) AS n FROM dead_letters WHERE source_topic = ? GROUP BY reason ORDER BY n DESC, reason")
        .bind(topic)
        .fetch_all()
        .await?;
    let dead_total: u64 = reasons.iter().map(|r| r.n).sum();
    let duplicates = c.sent.saturating_sub(accepted + dead_total);
    let windows: u64 = ch.query("SELECT count() FROM meter_totals").fetch_one().await?;
    let restated: u64 = ch.query("SELECT count() FROM meter_totals WHERE last_revision > 0").fetch_one().await?;
    // Revisions are consecutive, so the latest one counts the restatements of its window.
    let revisions: u64 = ch.query("SELECT toUInt64(sum(last_revision)) FROM meter_totals").fetch_one().await?;
    let agg_text = get_ok(agg_metrics).await.ok();
    let dup_metric = agg_text.as_deref().and_then(|t| metric(t, "meterflow_aggregator_duplicates_total"));

    let _ = writeln!(w, "\n== Events ({topic}, ground truth {})", files.truth.display());
    let _ = writeln!(w, "  sent (acknowledged by the broker)    {:>12}", count_u64(c.sent));
    let _ = writeln!(
        w,
        "  accepted (distinct, in usage_events) {:>12}   expected {:>12}  {}",
        count_u64(accepted),
        count_u64(c.unique_accepted),
        ok_word(accepted == c.unique_accepted)
    );
    checks.add(accepted == c.unique_accepted, format!("accepted events: {accepted} in ClickHouse, {} in the ground truth", c.unique_accepted));
    let _ = writeln!(
        w,
        "  duplicates dropped                   {:>12}   expected {:>12}  {}   (sent - accepted - dead letters{})",
        count_u64(duplicates),
        count_u64(c.duplicates),
        ok_word(duplicates == c.duplicates),
        dup_metric.map_or(String::new(), |d| format!("; aggregator /metrics says {}", d as u64))
    );
    checks.add(duplicates == c.duplicates, format!("duplicates dropped: {duplicates}, ground truth {}", c.duplicates));
    let _ = writeln!(
        w,
        "  dead letters                         {:>12}   expected {:>12}  {}",
        count_u64(dead_total),
        count_u64(c.malformed),
        ok_word(dead_total == c.malformed)
    );
    let mut by_reason_ok = true;
    let found_reasons: BTreeMap<&str, u64> = reasons.iter().map(|r| (r.reason.as_str(), r.n)).collect();
    let all_reasons: BTreeSet<&str> =
        found_reasons.keys().copied().chain(c.malformed_by_reason.iter().filter(|(_, n)| **n > 0).map(|(r, _)| r.as_str())).collect();
    let mut sorted: Vec<&str> = all_reasons.into_iter().collect();
    sorted.sort_by_key(|r| std::cmp::Reverse(found_reasons.get(r).copied().unwrap_or(0)));
    for r in sorted {
        let (got, want) = (found_reasons.get(r).copied().unwrap_or(0), c.malformed_by_reason.get(r).copied().unwrap_or(0));
        by_reason_ok &= got == want;
        let _ = writeln!(w, "    {r:<32} {:>12}   expected {:>12}  {}", count_u64(got), count_u64(want), ok_word(got == want));
    }
    checks.add(by_reason_ok && dead_total == c.malformed, format!("dead letters by reason: {dead_total} in {} reasons", found_reasons.len()));
    let _ = writeln!(
        w,
        "  windows {}, of which {} restated by late events ({} restatements); {} events were late",
        count_u64(windows),
        count_u64(restated),
        count_u64(revisions),
        count_u64(c.late)
    );

    // --- usage
    let usage: Vec<UsageRow> = ch
        .query("SELECT tenant, meter, sum(value) AS value, sum(event_count) AS events FROM meter_totals GROUP BY tenant, meter")
        .fetch_all()
        .await?;
    let mut per_tenant: BTreeMap<String, BTreeMap<String, Decimal>> = BTreeMap::new();
    let mut per_meter: BTreeMap<String, (Decimal, i64)> = BTreeMap::new();
    let mut usage_found: BTreeMap<(String, String), (Decimal, u64)> = BTreeMap::new();
    for r in &usage {
        let v = from_ch_i128(r.value);
        per_tenant.entry(r.tenant.clone()).or_default().insert(r.meter.clone(), v);
        let m = per_meter.entry(r.meter.clone()).or_default();
        m.0 += v;
        m.1 += r.events;
        usage_found.insert((r.tenant.clone(), r.meter.clone()), (v, r.events as u64));
    }
    let mut usage_report = verify::Report::default();
    for t in &gt.totals {
        usage_report.checked += 1;
        match usage_found.remove(&(t.tenant.clone(), t.meter.clone())) {
            Some((v, n)) if v.normalize() == t.value.normalize() && n == t.event_count => {}
            got => usage_report.problems.push(format!("{} {}: {got:?} in ClickHouse, expected {} ({} events)", t.tenant, t.meter, t.value, t.event_count)),
        }
    }
    for k in usage_found.keys() {
        usage_report.problems.push(format!("unexpected usage {k:?}"));
    }
    let meters = ["input_tokens", "output_tokens", "requests", "gpu_seconds"];
    let _ = writeln!(w, "\n== Usage by meter (meter_totals)");
    for (m, (v, n)) in &per_meter {
        let _ = writeln!(w, "  {m:<14} {:>20}   from {:>10} events", qty(*v), group(Decimal::from(*n)));
    }
    let mut tenants: Vec<(&String, Decimal)> = per_tenant
        .iter()
        .map(|(t, m)| (t, m.get("input_tokens").copied().unwrap_or_default() + m.get("output_tokens").copied().unwrap_or_default()))
        .collect();
    tenants.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let _ = writeln!(w, "\n== Usage of the top {top} tenants by tokens ({} tenants in all)", per_tenant.len());
    let _ = writeln!(w, "  {:<12} {:>16} {:>16} {:>12} {:>12}", "tenant", meters[0], meters[1], meters[2], meters[3]);
    for (t, _) in tenants.iter().take(top) {
        let m = &per_tenant[*t];
        let get = |k: &str| m.get(k).copied().map_or_else(|| "-".to_owned(), qty);
        let _ = writeln!(w, "  {t:<12} {:>16} {:>16} {:>12} {:>12}", get(meters[0]), get(meters[1]), get(meters[2]), get(meters[3]));
    }

    // --- money
    let money: Vec<MoneyRow> = ch
        .query(
            "SELECT tenant, arrayStringConcat(groupUniqArray(plan), '+') AS plan, sum(amount) AS revenue, \
             sum(provider_cost) AS cost, sum(margin) AS margin FROM charges_dedup GROUP BY tenant",
        )
        .fetch_all()
        .await?;
    let (mut revenue, mut cost, mut margin) = (Decimal::ZERO, Decimal::ZERO, Decimal::ZERO);
    let mut money_rows: Vec<(String, String, Decimal, Decimal, Decimal)> = money
        .into_iter()
        .map(|r| (r.tenant, r.plan, from_ch_i128(r.revenue), from_ch_i128(r.cost), from_ch_i128(r.margin)))
        .collect();
    for r in &money_rows {
        revenue += r.2;
        cost += r.3;
        margin += r.4;
    }
    let (exp_revenue, exp_cost) = expected_money.values().fold((Decimal::ZERO, Decimal::ZERO), |a, m| (a.0 + m.0, a.1 + m.1));
    money_rows.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    let _ = writeln!(w, "\n== Money (charges_dedup, USD)");
    let _ = writeln!(w, "  revenue        {:>16}   expected {:>16}  {}", usd(revenue), usd(exp_revenue), ok_word(revenue == exp_revenue));
    let _ = writeln!(w, "  provider cost  {:>16}   expected {:>16}  {}", usd(cost), usd(exp_cost), ok_word(cost == exp_cost));
    let _ = writeln!(w, "  margin         {:>16}   ({} of revenue)", usd(margin), pct(margin, revenue));
    checks.add(margin == revenue - cost, format!("margin = revenue - cost, exactly ({margin} = {revenue} - {cost})"));
    let _ = writeln!(w, "\n  top {top} tenants by revenue:");
    let _ = writeln!(w, "  {:<12} {:<18} {:>14} {:>14} {:>14} {:>8}", "tenant", "plan", "revenue", "cost", "margin", "margin%");
    for (t, plan, r, c, m) in money_rows.iter().take(top) {
        let _ = writeln!(w, "  {t:<12} {plan:<18} {:>14} {:>14} {:>14} {:>8}", usd(*r), usd(*c), usd(*m), pct(*m, *r));
    }
    let mut lowest = money_rows.clone();
    lowest.sort_by(|a, b| a.4.cmp(&b.4).then(a.0.cmp(&b.0)));
    if let Some((t, plan, r, c, m)) = lowest.first() {
        let _ = writeln!(w, "  lowest margin: {t} ({plan}) revenue {} cost {} margin {} ({})", usd(*r), usd(*c), usd(*m), pct(*m, *r));
    }
    let models: Vec<ModelRow> = ch
        .query("SELECT model, sum(amount) AS revenue, sum(provider_cost) AS cost, sum(margin) AS margin FROM charges_dedup GROUP BY model ORDER BY revenue DESC")
        .fetch_all()
        .await?;
    let _ = writeln!(w, "\n  by model:");
    for m in &models {
        let (r, c, g) = (from_ch_i128(m.revenue), from_ch_i128(m.cost), from_ch_i128(m.margin));
        let name = if m.model.is_empty() { "(none)" } else { m.model.as_str() };
        let _ = writeln!(w, "  {name:<31} {:>14} {:>14} {:>14} {:>8}", usd(r), usd(c), usd(g), pct(g, r));
    }

    // --- wallets
    let found = balances(&ch).await?;
    let alerts: u64 = ch.query("SELECT uniqExact(alert_id) FROM wallet_alerts").fetch_one().await.unwrap_or(0);
    let _ = writeln!(w, "\n== Prepaid wallets (wallet_balances, USD; {alerts} alerts in wallet_alerts: low_balance below USD 10, exhausted below 0)");
    let _ = writeln!(w, "  {:<12} {:>12} {:>14} {:>14} {:>14}", "tenant", "credited", "charged", "balance", "expected");
    for (tenant, credit) in &credits {
        let (got_credit, charged, balance) = found.get(tenant).copied().unwrap_or_default();
        let expected = credit - expected_money.get(tenant).map_or(Decimal::ZERO, |m| m.0);
        let ok = balance.normalize() == expected.normalize() && got_credit.normalize() == credit.normalize();
        let _ = writeln!(w, "  {tenant:<12} {:>12} {:>14} {:>14} {:>14}  {}", usd(got_credit), usd(charged), usd(balance), usd(expected), ok_word(ok));
    }

    // --- checks
    let exact = exactness(&ch, &gt, topic, &catalog, &credits, &expected_money).await?;
    checks.report(&exact.dead, "dead letters at their exact topic positions, with their reasons");
    checks.report(&exact.windows, "window totals (value, event count, provider cost) per tenant, meter, dimensions and minute");
    checks.report(&usage_report, "usage per tenant and meter");
    checks.report(&exact.charges, "revenue and provider cost per tenant (catalog applied to the ground truth)");
    checks.add(revenue == exp_revenue && cost == exp_cost, format!("total revenue {revenue} and cost {cost}, expected {exp_revenue} and {exp_cost}"));
    checks.report(&exact.wallets, "wallet balances = top-ups - revenue (each top-up published twice, counted once)");
    let inconsistent = verify::charge_rows_consistent(&ch).await?;
    checks.add(inconsistent == 0, format!("charge ids with differing replays: {inconsistent}"));
    match get_ok(rater_metrics).await.ok().and_then(|t| Some((metric(&t, "meterflow_rater_revenue")?, metric(&t, "meterflow_rater_margin")?))) {
        Some((r, m)) => {
            let close = |got: f64, want: Decimal| {
                let want: f64 = want.to_string().parse().unwrap_or(f64::NAN);
                (got - want).abs() <= 1e-6 * want.abs().max(1.0)
            };
            checks.add(close(r, revenue) && close(m, margin), format!("rater /metrics revenue {r:.2} and margin {m:.2} = ClickHouse"));
        }
        None => {
            let _ = writeln!(w, "\n(rater /metrics at {rater_metrics} not reachable: its check is skipped)");
        }
    }

    let failed = checks.0.iter().filter(|(ok, _)| !ok).count();
    let _ = writeln!(w, "\n== Agreement with the ground truth");
    for (ok, what) in &checks.0 {
        let _ = writeln!(w, "  {:<8} {what}", ok_word(*ok));
    }
    if failed == 0 {
        let _ = writeln!(w, "\nALL {} CHECKS OK: ClickHouse agrees exactly with the ground truth.", checks.0.len());
    } else {
        let _ = writeln!(w, "\n{failed} of {} CHECKS MISMATCH (see above).", checks.0.len());
    }
    print!("{out}");
    Ok(failed == 0)
}
