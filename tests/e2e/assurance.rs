//! Revenue assurance against the real broker and ClickHouse, on one pipeline run (producer ->
//! aggregator -> rater):
//! * shadow mode: a Stripe-format export generated from the ground truth (independently of
//!   the rater) with three injected differences is reconciled, and exactly those are found;
//! * the credit ledger: the daily roll-forward holds in ClickHouse, recognised revenue plus
//!   arrears equals the independently computed charges, and a grant past its expiry is
//!   breakage, announced on the alerts topic;
//! * the leakage audit: clean data has no finding; a deleted usage row, a dropped charge and
//!   a forged charge are each named.
#![allow(clippy::expect_used, reason = "an integration test: its helpers' expects are the test's assertions")]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use meterflow_admin::audit;
use meterflow_admin::reconcile::{self, Finding as ReconFinding, ReconcileCmd, Status};
use meterflow_core::decimal::{from_ch_i128, round_amount};
use meterflow_core::pricing::{self, Catalog};
use meterflow_core::records::{AlertRecord, AvroRecord, WalletAdjustment};
use meterflow_testkit::procs::{parse_with_env, service_env, repo_root};
use meterflow_e2e::scenario::{now_ms, produce, publish_top_ups, wait_until_exact, workload};
use meterflow_e2e::verify;
use meterflow_producer::GroundTruth;
use meterflow_testkit::TestEnv;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;

const EVENTS: u64 = 8_000;
const PARTITIONS: i32 = 2;
const EXPIRING: &str = "tenant-002";

fn catalog_path() -> std::path::PathBuf {
    repo_root().join("config/catalog.toml")
}

fn catalog() -> anyhow::Result<Catalog> {
    Ok(Catalog::from_toml_str(&std::fs::read_to_string(catalog_path())?)?)
}

fn env_with(env: &TestEnv, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e = service_env(env.kafka_args(), env.topics(), env.clickhouse_args());
    e.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    e
}

/// Per (tenant, period, price name): the rounded catalog price of the period's total quantity,
/// from the ground truth (not from the rater).
/// (tenant, period start ms, price name).
type LineKey = (String, i64, String);

fn expected_lines(gt: &GroundTruth, cat: &Catalog) -> anyhow::Result<BTreeMap<LineKey, (Decimal, Decimal)>> {
    let mut q: BTreeMap<(String, i64, String, String), Decimal> = BTreeMap::new();
    for w in &gt.windows {
        let plan = cat.plan_for(&w.tenant, w.window_start).context("plan")?;
        let price = plan.price_for(&w.meter, &w.dimensions).context("price")?;
        *q.entry((w.tenant.clone(), pricing::period_start(w.window_start), plan.id.clone(), price.name.clone())).or_default() += w.value;
    }
    let mut out = BTreeMap::new();
    for ((tenant, period, plan, price), quantity) in q {
        let p = cat.plan(&plan).and_then(|p| p.price(&price)).context("price")?;
        let e = out.entry((tenant, period, price)).or_insert((Decimal::ZERO, Decimal::ZERO));
        e.0 += p.price(quantity)?;
        e.1 += quantity;
    }
    Ok(out)
}

fn cents(d: Decimal) -> i64 {
    let c = (d * Decimal::from(100)).round_dp_with_strategy(0, rust_decimal::RoundingStrategy::MidpointNearestEven);
    c.to_string().parse().expect("cents fit an i64")
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct DayRow {
    tenant: String,
    day: u16,
    opening_deferred: i128,
    paid_topups: i128,
    recognised: i128,
    refunds: i128,
    breakage: i128,
    closing_deferred: i128,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct EventRow {
    event_id: String,
    meter: String,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct MoveRow {
    tenant: String,
    movement: String,
    credit_kind: String,
    total: i128,
}

async fn wait_settled(ch: &clickhouse::Client, alive: impl Fn() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut last = (u64::MAX, Instant::now());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        alive()?;
        let n: u64 = ch.query("SELECT count() FROM wallet_ledger").fetch_one().await?;
        let c: u64 = ch.query("SELECT count() FROM charges").fetch_one().await?;
        if n + c != last.0 {
            last = (n + c, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(4) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "charges and ledger did not settle");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn mutate_and_wait(ch: &clickhouse::Client, sql: &str, count_sql: &str, want: u64) -> anyhow::Result<()> {
    ch.query(sql).execute().await.with_context(|| sql.to_owned())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: u64 = ch.query(count_sql).fetch_one().await?;
        if n == want {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "mutation not applied: {sql} ({count_sql} = {n})");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_ledger_and_audit() -> anyhow::Result<()> {
    // No init_test_logging: its panic hook would hide an assertion message behind the log filter.
    let started = Instant::now();
    let env = TestEnv::with_partitions("assurance", PARTITIONS).await?;
    let cat = catalog()?;
    let credits = publish_top_ups(env.kafka_args(), &env.topics().wallet_topic).await?;
    // A high-priority paid grant that expired three hours ago: the rater's event-time
    // watermark passes it at the first charge, so all of it is breakage.
    let expiring = WalletAdjustment {
        idempotency_key: "expiring_1".into(),
        tenant: EXPIRING.into(),
        currency: "USD".into(),
        amount: Decimal::new(500, 2),
        kind: "paid".into(),
        reason: "expiring credit".into(),
        created_at: now_ms() - 4 * 3_600_000,
        expires_at: Some(now_ms() - 3 * 3_600_000),
        priority: 10,
    };
    let producer: FutureProducer = meterflow_runtime::kafka::producer_config(env.kafka_args())?.create()?;
    producer
        .send(FutureRecord::to(&env.topics().wallet_topic).key(EXPIRING).payload(&expiring.to_avro()?), Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)?;
    let gt = produce(env.kafka_args(), &env.topics().usage_topic, workload(EVENTS, 15)?).await?;
    eprintln!("assurance: produced ({:?})", started.elapsed());

    let shutdown = CancellationToken::new();
    // An early error return must stop the services, or the runtime waits for them forever.
    let _stop_on_return = shutdown.clone().drop_guard();
    let meters = repo_root().join("config/meters.toml").display().to_string();
    let catalog_s = catalog_path().display().to_string();
    let agg_env = env_with(&env, &[
        ("METERFLOW_AGGREGATOR_GROUP", "agg"),
        ("METERFLOW_AGGREGATOR_HTTP_ADDR", "127.0.0.1:0"),
        ("METERFLOW_METERS", &meters),
        ("METERFLOW_IDLE_TIMEOUT", "1s"),
        ("METERFLOW_CHECKPOINT_INTERVAL", "2s"),
    ]);
    let rater_env = env_with(&env, &[
        ("METERFLOW_RATER_GROUP", "rater"),
        ("METERFLOW_RATER_HTTP_ADDR", "127.0.0.1:0"),
        ("METERFLOW_CATALOG", &catalog_s),
        ("METERFLOW_CHECKPOINT_INTERVAL", "2s"),
    ]);
    let agg = tokio::spawn(meterflow_aggregator::run(parse_with_env(&agg_env)?, shutdown.clone()));
    let rater = tokio::spawn(meterflow_rater::run(parse_with_env(&rater_env)?, shutdown.clone()));
    let ch = env.clickhouse();
    let alive = || {
        ensure!(!agg.is_finished() && !rater.is_finished(), "a service stopped by itself");
        Ok(())
    };
    wait_until_exact(&ch, &gt, &env.topics().usage_topic, Duration::from_secs(240), alive).await?;
    eprintln!("assurance: windows exact ({:?})", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        alive()?;
        if verify::charges(&ch, &gt, &cat).await?.ok() {
            break;
        }
        if Instant::now() > deadline {
            verify::charges(&ch, &gt, &cat).await?.into_result("charges")?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_settled(&ch, alive).await?;
    eprintln!("assurance: settled ({:?})", started.elapsed());

    // ---------------------------------------------------------------- credit ledger
    let true_ups: i128 = ch.query("SELECT sum(amount) FROM charges_dedup WHERE kind = 'true_up'").fetch_one().await?;
    ensure!(true_ups == 0, "no period closes in this run");
    let money = verify::expected_money(&gt, &cat)?;
    let moves: Vec<MoveRow> = ch
        .query("SELECT tenant, movement, credit_kind, sum(amount) AS total FROM wallet_ledger_dedup GROUP BY tenant, movement, credit_kind")
        .fetch_all()
        .await?;
    let mv = |t: &str, m: &str, k: &str| -> Decimal {
        moves.iter().filter(|r| r.tenant == t && r.movement == m && r.credit_kind == k).map(|r| from_ch_i128(r.total)).sum()
    };
    for (tenant, (revenue, _)) in &money {
        // Every charge drew paid credit or went to arrears (whatever the order in which
        // top-ups and charges reached the rater), and never more paid credit than was bought.
        let paid = mv(tenant, "drawdown", "paid");
        assert_eq!(paid + mv(tenant, "arrears", ""), *revenue, "drawdowns + arrears = charges for {tenant}");
        assert_eq!(mv(tenant, "drawdown", "promotional") + mv(tenant, "drawdown", "manual"), Decimal::ZERO);
        let bought = if credits.contains_key(tenant) { Decimal::from(1_000) } else { Decimal::ZERO };
        assert!(paid >= Decimal::ZERO && paid <= bought, "{tenant} drew {paid} of {bought} paid credit");
    }
    assert_eq!(mv(EXPIRING, "expiry", "paid"), Decimal::new(500, 2), "breakage of the expired grant");
    assert_eq!(mv("tenant-001", "debit", ""), Decimal::new(2550, 2), "the manual debit with no non-paid credit is arrears");
    let days: Vec<DayRow> = ch
        .query(
            "SELECT tenant, toUInt16(day) AS day, opening_deferred, paid_topups, recognised, refunds, breakage, closing_deferred \
             FROM revenue_recognition_daily ORDER BY tenant, day",
        )
        .fetch_all()
        .await?;
    ensure!(!days.is_empty(), "revenue_recognition_daily is empty");
    let mut last_closing: BTreeMap<String, (u16, Decimal)> = BTreeMap::new();
    for r in &days {
        let f = from_ch_i128;
        assert_eq!(
            f(r.opening_deferred) + f(r.paid_topups) - f(r.recognised) - f(r.refunds) - f(r.breakage),
            f(r.closing_deferred),
            "roll-forward of {} on day {}",
            r.tenant,
            r.day
        );
        if let Some((_, prev)) = last_closing.get(&r.tenant) {
            assert_eq!(*prev, f(r.opening_deferred), "opening = previous closing for {}", r.tenant);
        }
        last_closing.insert(r.tenant.clone(), (r.day, f(r.closing_deferred)));
    }
    for tenant in credits.keys() {
        // Closing deferred revenue = the paid top-up (publish_top_ups: 1,000 each; the
        // expiring 5 are breakage) - what the ledger says charges drew from it.
        let want = Decimal::from(1_000) - mv(tenant, "drawdown", "paid");
        assert_eq!(last_closing.get(tenant).map(|x| x.1), Some(want), "closing deferred revenue of {tenant}");
    }
    let alerts = env.consume_all(&env.topics().alerts_topic, Duration::from_secs(30)).await?;
    eprintln!("assurance: alerts read ({:?})", started.elapsed());
    // Every record on the alerts topic is an `alert.v1` Avro record.
    let alerts: Vec<AlertRecord> = alerts.iter().map(|(_, _, _, v)| AlertRecord::from_avro(v)).collect::<Result<_, _>>()?;
    let expired: Vec<&AlertRecord> = alerts.iter().filter(|a| a.kind == "credit_expired").collect();
    assert_eq!(expired.len(), 1, "one expiry event: {expired:?}");
    assert_eq!((expired[0].tenant.as_str(), expired[0].amount), (EXPIRING, Some(Decimal::from(5))));

    // ---------------------------------------------------------------- shadow mode
    let lines = expected_lines(&gt, &cat)?;
    let mut keys: Vec<&LineKey> = lines.keys().filter(|k| lines[k].0 >= Decimal::new(2, 2)).collect();
    keys.sort();
    ensure!(keys.len() >= 2, "need two priced lines above 2 cents, have {}", keys.len());
    let missing = keys[0].clone();
    // "Wrong tier": the biller priced the largest line at a higher tier's unit price
    // (1.5x the catalog's), which is more than the tolerance above.
    let wrong: LineKey = keys.iter().copied().filter(|k| **k != missing).max_by_key(|k| lines[*k].0).context("a second line")?.clone();
    ensure!(lines[&wrong].0 >= Decimal::new(5, 2), "the largest line is only {}", lines[&wrong].0);
    let extra_tenant = "tenant-004".to_owned();
    let mut csv = String::from("id,invoice,Customer,Price ID,Amount,Currency,Period Start (UTC),Quantity\n");
    let mut n = 0;
    for (k, (amount, quantity)) in &lines {
        if *k == missing {
            continue;
        }
        let amount = if *k == wrong {
            round_amount(*amount * Decimal::new(15, 1))
        } else {
            *amount
        };
        n += 1;
        csv.push_str(&format!("il_{n},in_{},cus_{},price_{},{},usd,{},{}\n", k.0, k.0, k.2, cents(amount), k.1 / 1000, quantity));
    }
    let period = lines.keys().next().context("lines")?.1;
    csv.push_str(&format!("il_x,in_x,cus_{extra_tenant},price_support,4900,usd,{},1\n", period / 1000));
    let mut mapping = String::from("format = \"stripe\"\ntolerance = \"0.01\"\n[customers]\n");
    for t in lines.keys().map(|k| &k.0).collect::<BTreeSet<_>>() {
        mapping.push_str(&format!("\"cus_{t}\" = \"{t}\"\n"));
    }
    mapping.push_str("[prices]\n");
    for p in lines.keys().map(|k| &k.2).collect::<BTreeSet<_>>() {
        mapping.push_str(&format!("\"price_{p}\" = \"{p}\"\n"));
    }
    let dir = std::env::temp_dir().join(format!("meterflow-assurance-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("export.csv"), &csv)?;
    std::fs::write(dir.join("mapping.toml"), &mapping)?;
    let cmd = ReconcileCmd {
        clickhouse: env.clickhouse_args().clone(),
        external: dir.join("export.csv"),
        mapping: dir.join("mapping.toml"),
        catalog: catalog_path(),
        periods: Vec::new(),
        dry_run: false,
    };
    let (ok, report) = reconcile::run(&cmd).await?;
    eprintln!("assurance: reconciled ({:?})", started.elapsed());
    assert!(!ok, "differences exist");
    let found: BTreeSet<(String, String, ReconFinding, Status)> =
        report.mismatches().map(|r| (r.key.tenant.clone(), r.key.price.clone(), r.finding, r.status)).collect();
    let want: BTreeSet<(String, String, ReconFinding, Status)> = [
        (missing.0.clone(), missing.2.clone(), ReconFinding::MissingExternal, Status::UnderBilled),
        (wrong.0.clone(), wrong.2.clone(), ReconFinding::AmountMismatch, Status::OverBilled),
        (extra_tenant.clone(), "price_support".into(), ReconFinding::ExtraExternal, Status::OverBilled),
    ]
    .into();
    assert_eq!(found, want, "exactly the injected differences\n{}", reconcile::render(&report));
    assert_eq!(report.rows.len(), lines.len() + 1, "every metered line and the extra one are compared");
    let usd = &report.total["USD"];
    assert_eq!(usd.under_billed, lines[&missing].0, "under-billing = the missing line");
    let stored: u64 = ch.query("SELECT count() FROM reconciliation_results WHERE status != 'match'").fetch_one().await?;
    assert_eq!(stored, 3, "the three differences are in reconciliation_results");

    // ---------------------------------------------------------------- leakage audit
    // The end of this billing month: the invoice check covers whole periods before `to`.
    let to = pricing::period_end(now_ms()) / 1000;
    let clean = audit::audit(&ch, &cat, &env.topics().aggregates_topic, 0, to).await?;
    eprintln!("assurance: clean audit ({:?})", started.elapsed());
    assert!(clean.findings.is_empty(), "clean pipeline, no finding:\n{}", audit::render(&clean));
    for check in ["events_vs_windows", "window_not_rated", "charge_without_window", "invoice_vs_charges", "wallet_charges", "wallet_adjustments", "ingest_ledger"] {
        assert!(clean.checked.get(check).is_some_and(|n| *n > 0), "{check} compared nothing: {:?}", clean.checked);
    }

    // The aggregator wrote the ledger itself, and it reaches every partition's checkpoint.
    let covered: Vec<(i32, i64)> = ch
        .query("SELECT partition, max(last_offset) + 1 FROM ingest_ledger GROUP BY partition ORDER BY partition")
        .fetch_all()
        .await?;
    let checkpointed: Vec<(i32, i64)> = ch
        .query(
            "SELECT partition, argMax(next_offset, version) FROM checkpoint_positions \
             WHERE service = 'aggregator' AND topic = ? GROUP BY partition ORDER BY partition",
        )
        .bind(&env.topics().usage_topic)
        .fetch_all()
        .await?;
    assert!(!checkpointed.is_empty(), "no aggregator checkpoint");
    assert_eq!(covered, checkpointed, "ledger entries (partition, next offset) vs checkpoints");

    // Leak 1: a usage row deleted (tenant-005).
    let ev: EventRow =
        ch.query("SELECT event_id, meter FROM usage_events WHERE tenant = 'tenant-005' LIMIT 1").fetch_one().await?;
    let (ev_id, ev_meter) = (ev.event_id, ev.meter);
    mutate_and_wait(
        &ch,
        &format!("ALTER TABLE usage_events DELETE WHERE tenant = 'tenant-005' AND event_id = '{ev_id}'"),
        &format!("SELECT count() FROM usage_events WHERE event_id = '{ev_id}' AND tenant = 'tenant-005'"),
        0,
    )
    .await?;
    // Leak 2: a priced usage charge dropped (tenant-006).
    let dropped: String = ch
        .query("SELECT any(charge_id) FROM charges_dedup WHERE tenant = 'tenant-006' AND kind = 'usage' AND amount > 0")
        .fetch_one()
        .await?;
    mutate_and_wait(
        &ch,
        &format!("ALTER TABLE charges DELETE WHERE charge_id = '{dropped}'"),
        &format!("SELECT count() FROM charges WHERE charge_id = '{dropped}'"),
        0,
    )
    .await?;
    // Leak 3: a forged charge for a window nobody metered (tenant-007).
    ch.query(
        "INSERT INTO charges (charge_id, kind, tenant, plan, currency, meter, model, dimensions_key, dim_keys, dim_values, \
         period_start, window_start, window_end, revision, quantity, amount, provider_cost, margin, seq) \
         SELECT 'forged-1', 'usage', 'tenant-007', 'starter', 'USD', 'input_tokens', 'gpt-4o', 'model=gpt-4o,region=us-east', \
         ['model', 'region'], ['gpt-4o', 'us-east'], toDateTime(toStartOfMonth(now() - 3600)), toStartOfMinute(now() - 3600), \
         toStartOfMinute(now() - 3600) + 60, 0, toDecimal128(1000, 9), toDecimal128(12.5, 9), toDecimal128(0, 9), toDecimal128(12.5, 9), 1",
    )
    .execute()
    .await?;
    // Leak 4: a skipped offset range: an entry claiming 20 more offsets of partition 0 than
    // the aggregator's latest one, with none of them counted (what a seek past a range
    // would leave).
    let last: i64 = ch.query("SELECT max(last_offset) FROM ingest_ledger WHERE partition = 0").fetch_one().await?;
    ch.query(
        "INSERT INTO ingest_ledger (topic, partition, first_offset, last_offset, accepted, duplicates, dead_lettered, \
         dead_letter_reasons, dead_letter_counts, ticks, checkpoint_version) \
         SELECT topic, partition, first_offset, last_offset + 20, accepted, duplicates, dead_lettered, \
         dead_letter_reasons, dead_letter_counts, ticks, checkpoint_version \
         FROM ingest_ledger WHERE partition = 0 AND last_offset = ? LIMIT 1",
    )
    .bind(last)
    .execute()
    .await?;
    let leaky = audit::audit(&ch, &cat, &env.topics().aggregates_topic, 0, to).await?;
    eprintln!("assurance: leaky audit ({:?})", started.elapsed());
    let named: BTreeSet<(String, String)> = leaky.findings.iter().map(|f| (f.check.clone(), f.tenant.clone())).collect();
    let want: BTreeSet<(String, String)> = [
        ("events_vs_windows", "tenant-005"),
        ("window_not_rated", "tenant-006"),
        ("invoice_vs_charges", "tenant-006"),
        ("wallet_charges", "tenant-006"),
        ("charge_without_window", "tenant-007"),
        ("invoice_vs_charges", "tenant-007"),
        ("wallet_charges", "tenant-007"),
        ("ingest_gap", ""),
        ("ingest_accepted", ""),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(named, want, "\n{}", audit::render(&leaky));
    let gap = leaky.findings.iter().find(|f| f.check == "ingest_gap").expect("named above");
    assert_eq!(gap.detail, format!("20 offsets in {}..={} were never accounted for", last + 1, last + 20), "{gap:?}");
    let acc = leaky.findings.iter().find(|f| f.check == "ingest_accepted").expect("named above");
    assert_eq!(acc.expected - acc.actual, Decimal::ONE, "the deleted usage row: {acc:?}");
    let f = leaky.findings.iter().find(|f| f.check == "events_vs_windows").expect("named above");
    assert!(f.subject.contains(&ev_meter), "{f:?}");
    assert_eq!(f.expected - f.actual, Decimal::ONE, "one event missing");
    assert!(leaky.findings.iter().any(|f| f.check == "charge_without_window" && f.subject.contains("forged-1")));
    let forged_wallet = leaky.findings.iter().find(|f| f.check == "wallet_charges" && f.tenant == "tenant-007").expect("named above");
    assert_eq!(forged_wallet.expected - forged_wallet.actual, Decimal::new(125, 1), "the forged 12.5 never reached the wallet");
    audit::write_findings(&ch, "e2e", (now_ms() / 1000) as u32, &leaky.findings).await?;
    let rows: u64 = ch.query("SELECT count() FROM audit_findings WHERE run_id = 'e2e'").fetch_one().await?;
    assert_eq!(rows, leaky.findings.len() as u64);

    shutdown.cancel();
    agg.await??;
    rater.await??;
    let _ = std::fs::remove_dir_all(&dir);
    env.cleanup().await?;
    Ok(())
}
