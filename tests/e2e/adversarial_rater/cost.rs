//! Provider cost per event: exact whatever the window alignment, and after a restatement of a
//! window already evicted from memory.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_cost_is_exact_per_event_whatever_the_alignment() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::with_partitions("adv_cost", PARTITIONS).await?;
    let files = Files::new(&env)?;
    let meters = files.write("meters.toml", METERS)?;
    let cat = files.write("catalog.toml", &catalog(false))?;
    let t0 = (now_ms() / MINUTE - 40) * MINUTE;
    // The same 40 events for two tenants; "shifted" 30 s later, so minute windows split them
    // differently. A third of them carry their provider cost.
    let mut events = Vec::new();
    let mut carried = Decimal::ZERO;
    let mut uncosted = Decimal::ZERO;
    let mut quantity = Decimal::ZERO;
    for i in 0..40i64 {
        let q = Decimal::from(1_000 + 137 * i);
        let cost = (i % 3 == 0).then(|| Decimal::new(50 + i, 3)); // 0.050, 0.053, ...
        quantity += q;
        match cost {
            Some(c) => carried += c,
            None => uncosted += q,
        }
        for (tenant, shift) in [("aligned", 0), ("shifted", 30_000)] {
            let mut e = event(&format!("{tenant}-{i}"), tenant, "m1", &q.to_string(), t0 + i * 25_000 + shift, None);
            e.provider_cost = cost;
            events.push(e);
        }
    }
    send_all(&env, &events).await?;
    let agg = Svc::aggregator(&env, &meters)?;
    let rater = Svc::rater(&env, &meters, &cat, "127.0.0.1:0")?;
    // Independent reference: carried costs + rate card (2 per million) x uncosted quantity.
    let expected_cost = carried + uncosted * d("0.000002");
    let expected_amount = quantity * d("0.000003");
    eventually(Duration::from_secs(120), &[&agg, &rater], || async {
        let got = usage_by_tenant(&env).await?;
        for tenant in ["aligned", "shifted"] {
            match got.get(tenant) {
                Some((_, a, c)) if *a == expected_amount && *c == expected_cost => {}
                other => return Ok(Some(format!("{tenant}: {other:?}, expected amount {expected_amount}, cost {expected_cost}"))),
            }
        }
        Ok(None)
    })
    .await?;
    // Both alignments really did split differently (else the test proves nothing).
    let windows: Vec<u64> = env
        .clickhouse()
        .query("SELECT count() FROM meter_totals WHERE tenant IN ('aligned', 'shifted') GROUP BY tenant ORDER BY tenant")
        .fetch_all()
        .await?;
    assert_eq!(windows.len(), 2);
    let mixed: u64 = env
        .query_scalar("SELECT count() FROM meter_totals WHERE tenant = 'aligned' AND provider_cost > 0 AND event_count > 1")
        .await?;
    assert!(mixed > 0, "some windows mix events with and without a carried cost");
    rater.stop().await?;
    agg.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restatement_of_an_evicted_window_keeps_per_event_cost() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::with_partitions("adv_evict", PARTITIONS).await?;
    let files = Files::new(&env)?;
    let meters = files.write("meters.toml", METERS)?;
    let cat = files.write("catalog.toml", &catalog(false))?;
    let t0 = (now_ms() / MINUTE - 40) * MINUTE;
    // Closed windows leave memory 1 s (of partition time) after closing, so the late event
    // below rebuilds its window from ClickHouse: usage_events, meter_aggregates and the
    // uncosted part of the last revision (aggregate_uncosted).
    let mut agg_env = aggregator_env(&env, &meters);
    agg_env.push(("METERFLOW_RETAIN_CLOSED".into(), "1s".into()));
    let stop = CancellationToken::new();
    let agg = Svc { stop: stop.clone(), task: tokio::spawn(meterflow_aggregator::run(parse_with_env(&agg_env)?, stop)) };
    let rater = Svc::rater(&env, &meters, &cat, "127.0.0.1:0")?;
    send_all(&env, &[
        event("e-1", "ev", "m1", "1000", t0 + 1_000, None),
        event("e-2", "ev", "m1", "500", t0 + 2_000, Some("0.1")),
    ])
    .await?;
    // Revision 0: carried 0.1 + 1000 x 0.000002.
    eventually(Duration::from_secs(60), &[&agg, &rater], || async {
        let got = usage_by_tenant(&env).await?;
        Ok((got.get("ev") != Some(&(1, d("0.0045"), d("0.102")))).then(|| format!("{:?}", got.get("ev"))))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(4)).await; // idle ticks move partition time on: evicted
    send_all(&env, &[event("e-3", "ev", "m1", "200", t0 + 30_000, None)]).await?;
    // Revision 1: carried 0.1 + 1200 x 0.000002 = 0.1024 in total. Had the rebuilt window
    // forgotten the uncosted part of revision 0, the rater would have taken 0.1 (its carried
    // cost) as the previous cost and billed 0.1044.
    eventually(Duration::from_secs(60), &[&agg, &rater], || async {
        let got = usage_by_tenant(&env).await?;
        Ok((got.get("ev") != Some(&(2, d("0.0051"), d("0.1024")))).then(|| format!("{:?}", got.get("ev"))))
    })
    .await?;
    let stored: u64 = env.query_scalar("SELECT count() FROM aggregate_uncosted").await?;
    assert_eq!(stored, 2, "both revisions stored their uncosted part");
    rater.stop().await?;
    agg.stop().await?;
    Ok(())
}
