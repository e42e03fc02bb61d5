//! The demo's HTTP half (`make demo` through meterflow-api): top-ups posted as a payment
//! provider's backend would (each twice with the same `Idempotency-Key`), and part of the usage
//! traffic as CloudEvents batches, with its own ground truth merged into the producer's.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use meterflow_api::keys::Scope;
use meterflow_producer::truth::{Counters, RunInfo, WindowKey, WindowTotal};
use meterflow_producer::GroundTruth;
use meterflow_runtime::args::ClickHouseArgs;
use rand::{Rng as _, SeedableRng as _};
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// Keys are picked up within the API's `--key-refresh` (2 s by default): waits until `key` is
/// no longer answered 401 (a key of another scope gets 403, which also means it is known).
pub async fn wait_until_known(client: &reqwest::Client, api: &str, key: &str, tenant: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = client.get(format!("{api}/v1/wallets/{tenant}")).bearer_auth(key).send().await?;
        if r.status().as_u16() != 401 {
            return Ok(());
        }
        ensure!(std::time::Instant::now() < deadline, "meterflow-api did not pick up a new key within 30 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Posts every top-up twice with one Idempotency-Key; the second answer must be the replay of
/// the first. Returns {tenant: amount}.
pub async fn top_up(api: &str, ch: &ClickHouseArgs, top_ups: &[(&str, i64)], run: i64) -> Result<BTreeMap<String, String>> {
    let (_, admin) = meterflow_admin::keys::create(ch, "demo-payments", Scope::Admin).await?;
    let client = reqwest::Client::new();
    wait_until_known(&client, api, &admin, top_ups.first().map_or("tenant-000", |t| t.0)).await?;
    let mut credits = BTreeMap::new();
    for (tenant, usd) in top_ups {
        let body = json!({"amount": usd.to_string(), "currency": "USD", "reason": "make demo: prepaid credit",
            "payment_reference": format!("demo_pi_{run}_{tenant}")});
        let mut answers = Vec::new();
        for _ in 0..2 {
            let r = client
                .post(format!("{api}/v1/wallets/{tenant}/adjustments"))
                .bearer_auth(&admin)
                .header("idempotency-key", format!("demo_{run}_{tenant}"))
                .json(&body)
                .send()
                .await
                .with_context(|| format!("POST the top-up of {tenant} to {api}"))?;
            let status = r.status().as_u16();
            let replayed = r.headers().contains_key("idempotent-replayed");
            let text = r.text().await?;
            ensure!(status == 201, "top-up of {tenant}: {status} {text}");
            answers.push((replayed, text));
        }
        ensure!(!answers[0].0 && answers[1].0 && answers[0].1 == answers[1].1, "the retried top-up of {tenant} was not a replay: {answers:?}");
        credits.insert((*tenant).to_owned(), usd.to_string());
    }
    Ok(credits)
}

/// Sends about `events` CloudEvents (`llm.completion`: one input_tokens, one output_tokens
/// and one requests event each) in batches of 100 for 20 tenants, through per-tenant ingest
/// keys. Every 20th batch is sent twice (a client retry: duplicates the aggregator drops), and
/// every batch carries one event of an unknown type (rejected by the API, never written).
/// Returns the ground truth of what the API accepted.
pub async fn traffic(api: &str, ch: &ClickHouseArgs, meters_file: &std::path::Path, events: u64, seed: u64) -> Result<GroundTruth> {
    let meters = meterflow_core::meter::MeterCatalog::from_toml_str(&std::fs::read_to_string(meters_file)?)?;
    let targets = meters.ingest().meters_for("llm.completion").to_vec();
    ensure!(!targets.is_empty(), "no meter reads llm.completion events in {}", meters_file.display());
    let tenants: Vec<String> = (0..20).map(|i| format!("tenant-{i:03}")).collect();
    let mut keys = Vec::new();
    for t in &tenants {
        keys.push(meterflow_admin::keys::create(ch, t, Scope::Ingest).await?.1);
    }
    let client = reqwest::Client::new();
    for (t, k) in tenants.iter().zip(&keys) {
        wait_until_known(&client, api, k, t).await?;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Models the pricing catalog prices.
    let models = ["gpt-4o", "gpt-4o-mini", "llama-70b", "claude-sonnet"];
    let regions = ["eu-west", "us-east"];
    let run = now_ms();
    let mut windows: BTreeMap<WindowKey, (Decimal, u64)> = BTreeMap::new();
    let mut counters = Counters::default();
    let batches = events.div_ceil(100);
    for b in 0..batches {
        let ti = (b % tenants.len() as u64) as usize;
        let tenant = &tenants[ti];
        let now = now_ms();
        let mut items = Vec::with_capacity(101);
        let mut accepted = Vec::new();
        for k in 0..100 {
            let t = now - rng.random_range(0..20_000);
            let (model, region) = (models[rng.random_range(0..models.len())], regions[rng.random_range(0..regions.len())]);
            let (input, output) = (rng.random_range(50..4_000i64), rng.random_range(10..1_500i64));
            let time = meterflow_core::time::format_rfc3339_ms(t);
            items.push(json!({"specversion": "1.0", "id": format!("{run}-{b}-{k}"), "source": "demo-chat", "type": "llm.completion",
                "subject": tenant, "time": time,
                "data": {"model": model, "region": region, "usage": {"input_tokens": input, "output_tokens": output}}}));
            accepted.push((t, model, region, input, output));
        }
        items.push(json!({"specversion": "1.0", "id": format!("{run}-{b}-bad"), "source": "demo-chat", "type": "chat.unknown"}));
        let body = Value::Array(items).to_string();
        let sends = if b % 20 == 19 { 2 } else { 1 };
        for _ in 0..sends {
            let r = client
                .post(format!("{api}/v1/events"))
                .bearer_auth(&keys[ti])
                .header("content-type", "application/cloudevents-batch+json")
                .body(body.clone())
                .send()
                .await?;
            let status = r.status().as_u16();
            let v: Value = r.json().await?;
            ensure!(status == 202 && v["accepted"] == 100 && v["results"][100]["reason"] == "unknown_meter", "batch {b}: {status} {v}");
            counters.sent += v["events"].as_u64().unwrap_or(0);
        }
        for (t, model, region, input, output) in accepted {
            for m in &targets {
                let def = meters.get(&m.meter).context("meter")?;
                let dims: BTreeMap<String, String> = def
                    .group_by
                    .iter()
                    .filter_map(|d| match d.as_str() {
                        "model" => Some((d.clone(), model.to_owned())),
                        "region" => Some((d.clone(), region.to_owned())),
                        _ => None,
                    })
                    .collect();
                let value = match m.meter.as_str() {
                    "input_tokens" => Decimal::from(input),
                    "output_tokens" => Decimal::from(output),
                    _ => Decimal::ONE,
                };
                let w = windows.entry((tenant.clone(), m.meter.clone(), dims, def.window_start(t))).or_default();
                w.0 += value;
                w.1 += 1;
                counters.unique_accepted += 1;
            }
        }
    }
    counters.duplicates = counters.sent - counters.unique_accepted;
    let window_ms = |m: &str| meters.get(m).map_or(60_000, |d| d.window_ms);
    let aggregation = |m: &str| meters.get(m).map_or("sum", |d| d.aggregation.as_str());
    Ok(GroundTruth {
        version: meterflow_producer::truth::FORMAT_VERSION,
        run: RunInfo {
            topic: "meterflow-api".into(),
            seed,
            framing: "single-object".into(),
            event_time_mode: "realtime (HTTP)".into(),
            dedup_horizon_ms: 35 * 86_400_000,
            started_at_ms: run,
            elapsed_ms: (now_ms() - run) as u64,
            min_event_time_ms: None,
            max_event_time_ms: None,
            interrupted: false,
        },
        meters: vec![],
        counters,
        windows: windows
            .into_iter()
            .map(|((tenant, meter, dimensions, start), (value, n))| WindowTotal {
                aggregation: aggregation(&meter).into(),
                window_end: start + window_ms(&meter),
                tenant,
                meter,
                dimensions,
                window_start: start,
                value,
                event_count: n,
                provider_cost: Decimal::ZERO,
                // No API demo event carries a provider cost: the whole value is costed at the
                // rate card.
                uncosted_value: value,
                late_events: 0,
            })
            .collect(),
        totals: vec![],
        malformed: vec![],
    })
}

/// Adds `extra` (sum and count meters only: values, counts and costs add up) to `gt`.
pub fn merge(gt: &mut GroundTruth, extra: GroundTruth) {
    let mut by_key: BTreeMap<WindowKey, WindowTotal> =
        std::mem::take(&mut gt.windows).into_iter().map(|w| ((w.tenant.clone(), w.meter.clone(), w.dimensions.clone(), w.window_start), w)).collect();
    // Per tenant and meter totals too (the API's meters are sums and counts: totals add up).
    for w in &extra.windows {
        match gt.totals.iter_mut().find(|t| t.tenant == w.tenant && t.meter == w.meter) {
            Some(t) => {
                t.value += w.value;
                t.event_count += w.event_count;
                t.provider_cost += w.provider_cost;
            }
            None => gt.totals.push(meterflow_producer::truth::MeterTotal {
                tenant: w.tenant.clone(),
                meter: w.meter.clone(),
                aggregation: w.aggregation.clone(),
                value: w.value,
                event_count: w.event_count,
                provider_cost: w.provider_cost,
            }),
        }
    }
    for w in extra.windows {
        match by_key.entry((w.tenant.clone(), w.meter.clone(), w.dimensions.clone(), w.window_start)) {
            std::collections::btree_map::Entry::Occupied(mut o) => {
                let have = o.get_mut();
                have.value += w.value;
                have.event_count += w.event_count;
                have.provider_cost += w.provider_cost;
                have.uncosted_value += w.uncosted_value;
            }
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(w);
            }
        }
    }
    gt.windows = by_key.into_values().collect();
    gt.counters.sent += extra.counters.sent;
    gt.counters.unique_accepted += extra.counters.unique_accepted;
    gt.counters.duplicates += extra.counters.duplicates;
}
