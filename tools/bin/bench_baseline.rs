//! The raw-insert baseline the bench compares meterflow with (its design: docs/benchmarks.md).

use super::*;

pub(super) const BASELINE_DDL: [&str; 2] = [
    // Raw events as they arrive, duplicates included. ReplacingMergeTree folds rows with the
    // same sorting key (the event id within tenant/meter/hour) - eventually, at merge time;
    // exact queries must dedup themselves (GROUP BY event_id, or FINAL).
    "CREATE TABLE baseline_events (
        tenant String, meter String, event_id String, event_time DateTime,
        quantity Decimal(38, 9), provider_cost Decimal(38, 9),
        dim_keys Array(String), dim_values Array(String), source String
    ) ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(event_time)
    ORDER BY (tenant, meter, toStartOfHour(event_time), event_id)",
    // Pre-aggregation per tenant/meter/hour. An MV sees every inserted block, before any
    // merge: duplicates are summed in, and nothing can take them out again.
    "CREATE MATERIALIZED VIEW baseline_hourly
    ENGINE = SummingMergeTree PARTITION BY toYYYYMM(hour) ORDER BY (tenant, meter, hour)
    AS SELECT tenant, meter, toStartOfHour(event_time) AS hour, sum(quantity) AS quantity, count() AS events
    FROM baseline_events GROUP BY tenant, meter, hour",
];

pub(super) async fn create_baseline(ch: &clickhouse::Client) -> Result<()> {
    for sql in BASELINE_DDL {
        ch.query(sql).execute().await.with_context(|| format!("baseline DDL: {sql}"))?;
    }
    Ok(())
}

#[derive(Debug, Clone, clickhouse::Row, Serialize)]
pub(super) struct BaselineRow {
    pub(super) tenant: String,
    pub(super) meter: String,
    pub(super) event_id: String,
    pub(super) event_time: u32,
    pub(super) quantity: i128,
    pub(super) provider_cost: i128,
    pub(super) dim_keys: Vec<String>,
    pub(super) dim_values: Vec<String>,
    pub(super) source: String,
}

pub(super) struct BaselineResult {
    pub(super) secs: f64,
    pub(super) inserted: u64,
    pub(super) dropped: u64,
}

/// The baseline's ingest: one consumer reads the topic, decodes and validates each message
/// like meterflow does (undecodable, unknown meter, missing tenant or id, bad or negative
/// quantity, bad provider cost are dropped), batches are inserted (two concurrent inserts of
/// half a batch, like meterflow's raw rows) while the next batch is read, handed over when
/// the inserter is free or at 1,000,000 rows, like meterflow's. No dedup, no windows.
pub(super) async fn baseline_ingest(kafka: &KafkaArgs, topic: &str, ch: &clickhouse::Client, catalog: Arc<MeterCatalog>) -> Result<BaselineResult> {
    // Batched like meterflow's outputs: one batch being inserted, the next filling; it is
    // handed over as soon as the inserter is free (at least MIN rows), else it grows up to
    // BATCH rows and the reader waits. Larger inserts are much cheaper for ClickHouse.
    const BATCH: usize = 1_000_000;
    const MIN: usize = 10_000;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<BaselineRow>>(1);
    let started = Instant::now();
    let reader = {
        let (kafka, topic) = (kafka.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || -> Result<u64> {
            let codec = UsageEventCodec::new();
            let mut batch = Vec::new();
            let mut dropped = 0u64;
            consume_pass(&kafka, &topic, |m| {
                match baseline_row(&codec, &catalog, m.payload().unwrap_or_default()) {
                    Some(row) => batch.push(row),
                    None => dropped += 1,
                }
                if batch.len() >= BATCH {
                    let full = std::mem::take(&mut batch);
                    let _ = tx.blocking_send(full);
                } else if batch.len() >= MIN && tx.capacity() > 0 {
                    let ready = std::mem::take(&mut batch);
                    if let Err(tokio::sync::mpsc::error::TrySendError::Full(back)) = tx.try_send(ready) {
                        batch = back;
                    }
                }
            })?;
            if !batch.is_empty() {
                let _ = tx.blocking_send(batch);
            }
            Ok(dropped)
        })
    };
    let mut inserted = 0u64;
    while let Some(rows) = rx.recv().await {
        // Two concurrent inserts of half a batch each, as meterflow writes its raw rows.
        let (first, second) = rows.split_at(rows.len() / 2);
        let (a, b) = tokio::join!(insert_baseline(ch, first), insert_baseline(ch, second));
        a?;
        b?;
        inserted += rows.len() as u64;
    }
    let dropped = reader.await??;
    Ok(BaselineResult { secs: started.elapsed().as_secs_f64(), inserted, dropped })
}

pub(super) async fn insert_baseline(ch: &clickhouse::Client, rows: &[BaselineRow]) -> Result<()> {
    let mut insert = ch.insert::<BaselineRow>("baseline_events").await?;
    for r in rows {
        insert.write(r).await?;
    }
    Ok(insert.end().await?)
}

pub(super) fn baseline_row(codec: &UsageEventCodec, catalog: &MeterCatalog, payload: &[u8]) -> Option<BaselineRow> {
    let ev = codec.decode(payload).ok()?;
    let meter = catalog.get(ev.meter)?;
    if ev.tenant.is_empty() || ev.event_id.is_empty() {
        return None;
    }
    let q = meterflow_core::decimal::parse("quantity", ev.quantity).ok()?;
    if q.is_sign_negative() && !q.is_zero() && !meter.allow_negative {
        return None;
    }
    let cost = match ev.provider_cost {
        Some(c) => meterflow_core::decimal::parse("provider_cost", c).ok()?,
        None => Decimal::ZERO,
    };
    let mut dims = ev.dimensions.clone();
    dims.sort_unstable();
    Some(BaselineRow {
        tenant: ev.tenant.to_owned(),
        meter: ev.meter.to_owned(),
        event_id: ev.event_id.to_owned(),
        event_time: (ev.event_time_ms.div_euclid(1000)).clamp(0, i64::from(u32::MAX)) as u32,
        quantity: to_ch_i128(&q).ok()?,
        provider_cost: to_ch_i128(&cost).ok()?,
        dim_keys: dims.iter().map(|(k, _)| (*k).to_owned()).collect(),
        dim_values: dims.iter().map(|(_, v)| (*v).to_owned()).collect(),
        source: ev.source.to_owned(),
    })
}
