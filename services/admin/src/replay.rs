//! Second chances: `rerate` re-publishes parked aggregates (after a catalog fix) as rerate
//! requests on their aggregates partition, `redrive` re-publishes dead-lettered usage events
//! (after a missing meter was added) to the usage topic.
//!
//! Both are safe to run twice. A rerate request is rated only while its aggregate is still
//! parked in the rater's state (a second request finds it rated: no-op); a redriven event
//! keeps its (tenant, event id), so dedup counts it once however often it is redriven.

use anyhow::{Context as _, Result};
use clickhouse::Client;
use meterflow_core::auth::{self, RecordKey};
use meterflow_runtime::args::KafkaArgs;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;


#[derive(Debug, clickhouse::Row, Deserialize)]
struct ParkedRow {
    aggregates_partition: i32,
    tenant_id: String,
    #[serde(with = "serde_bytes")]
    original_payload: Vec<u8>,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct DeadRow {
    tenant: String,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

/// What to rerate.
#[derive(Debug, Clone, Default)]
pub struct RerateFilter {
    pub tenant: Option<String>,
    /// `unpriced` or `overflow`.
    pub reason: Option<String>,
}

/// Publishes a rerate request for every aggregate parked now (per `parked_current`) that
/// matches `filter`, to the aggregates partition it was parked on. Returns how many.
pub async fn rerate(kafka: &KafkaArgs, aggregates_topic: &str, client: &Client, key: &RecordKey, filter: &RerateFilter) -> Result<usize> {
    let rows: Vec<ParkedRow> = client
        .query(
            "SELECT aggregates_partition, tenant_id, original_payload FROM parked_current \
             WHERE current_state = 'parked' AND (? = '' OR tenant_id = ?) AND (? = '' OR current_reason = ?) \
             ORDER BY source_partition, seq",
        )
        .bind(filter.tenant.as_deref().unwrap_or(""))
        .bind(filter.tenant.as_deref().unwrap_or(""))
        .bind(filter.reason.as_deref().unwrap_or(""))
        .bind(filter.reason.as_deref().unwrap_or(""))
        .fetch_all()
        .await
        .context("reading parked_current")?;
    send_all(
        kafka,
        rows.iter().map(|r| {
            let tag = auth::sign(key, &[auth::PURPOSE_RERATE, &r.original_payload]);
            FutureRecord::to(aggregates_topic)
                .partition(r.aggregates_partition)
                .key(r.tenant_id.as_str())
                .payload(r.original_payload.as_slice())
                .headers(OwnedHeaders::new().insert(Header { key: auth::RERATE_HEADER, value: Some(&tag[..]) }))
        }),
    )
    .await
}

/// Which dead letters to redrive.
#[derive(Debug, Clone)]
pub struct RedriveFilter {
    pub reason: String,
    /// `dead_lettered_at >= from` (Unix seconds), if given.
    pub from_s: Option<i64>,
    /// `dead_lettered_at < to` (Unix seconds), if given.
    pub to_s: Option<i64>,
}

/// Re-publishes the original bytes of the usage topic's dead letters with `filter.reason`
/// (each source position once) to the usage topic, keyed by tenant like every producer.
/// Returns how many.
pub async fn redrive(kafka: &KafkaArgs, usage_topic: &str, client: &Client, filter: &RedriveFilter) -> Result<usize> {
    // The table folds replays of the same position only at merges: one row per position here.
    let rows: Vec<DeadRow> = client
        .query(
            "SELECT any(tenant) AS tenant, any(payload) AS payload FROM dead_letters \
             WHERE source_topic = ? AND reason = ? \
               AND toUInt32(dead_lettered_at) >= ? AND toUInt32(dead_lettered_at) < ? \
             GROUP BY source_partition, source_offset ORDER BY source_partition, source_offset",
        )
        .bind(usage_topic)
        .bind(&filter.reason)
        .bind(filter.from_s.unwrap_or(0).clamp(0, i64::from(u32::MAX)))
        .bind(filter.to_s.unwrap_or(i64::from(u32::MAX)).clamp(0, i64::from(u32::MAX)))
        .fetch_all()
        .await
        .context("reading dead_letters")?;
    send_all(kafka, rows.iter().map(|r| FutureRecord::to(usage_topic).key(r.tenant.as_str()).payload(r.payload.as_slice()))).await
}

/// Sends every record with one producer, all in flight before the first acknowledgement is
/// awaited, and fails on the first the broker refuses (running the command again is safe).
/// Returns how many were acknowledged.
async fn send_all<'a>(kafka: &KafkaArgs, records: impl Iterator<Item = FutureRecord<'a, str, [u8]>>) -> Result<usize> {
    let producer: FutureProducer = meterflow_runtime::kafka::producer_config(kafka)?.create()?;
    let mut pending = Vec::new();
    for rec in records {
        pending.push(producer.send_result(rec).map_err(|(e, _)| e)?);
    }
    let n = pending.len();
    for p in pending {
        p.await.context("delivery cancelled")?.map_err(|(e, _)| e)?;
    }
    Ok(n)
}
