//! ClickHouse rows written by the aggregator (RowBinary; `Decimal(38, 9)` travels as i128).
//! The raw `usage_events` rows are encoded directly, see [`crate::usage_rows`].

use meterflow_core::decimal::to_ch_i128;
use meterflow_core::ledger::LedgerEntry;
use meterflow_core::records::MeterAggregate;
pub use meterflow_runtime::rows::{secs, DeadLetterRow};
use serde::Serialize;

#[derive(Debug, Clone, clickhouse::Row, Serialize)]
pub struct AggregateRow {
    pub tenant: String,
    pub meter: String,
    pub aggregation: String,
    pub dimensions_key: String,
    pub dim_keys: Vec<String>,
    pub dim_values: Vec<String>,
    pub window_start: u32,
    pub window_end: u32,
    pub window_start_ms: i64,
    pub revision: u32,
    pub value: i128,
    pub previous_value: i128,
    pub event_count: i64,
    pub provider_cost: i128,
    pub source_partition: i32,
    pub seq: i64,
    pub emitted_at_ms: i64,
}

/// `aggregate_uncosted`: the uncosted part of an additive aggregate's value.
#[derive(Debug, Clone, clickhouse::Row, Serialize)]
pub struct UncostedRow {
    pub source_partition: i32,
    pub seq: i64,
    pub uncosted_value: i128,
}

impl UncostedRow {
    pub fn of(a: &MeterAggregate) -> Result<Option<Self>, meterflow_core::Error> {
        let Some(u) = a.uncosted_value else { return Ok(None) };
        Ok(Some(Self { source_partition: a.source_partition, seq: a.seq, uncosted_value: to_ch_i128(&u)? }))
    }
}

impl TryFrom<&MeterAggregate> for AggregateRow {
    type Error = meterflow_core::Error;

    /// Refuses a value ClickHouse cannot store exactly (the engine only emits ones it can).
    fn try_from(a: &MeterAggregate) -> Result<Self, Self::Error> {
        Ok(Self {
            tenant: a.tenant.clone(),
            meter: a.meter.clone(),
            aggregation: a.aggregation.clone(),
            dimensions_key: a.dimensions_key(),
            dim_keys: a.dimensions.keys().cloned().collect(),
            dim_values: a.dimensions.values().cloned().collect(),
            window_start: secs(a.window_start),
            window_end: secs(a.window_end),
            window_start_ms: a.window_start,
            revision: a.revision.max(0) as u32,
            value: to_ch_i128(&a.value)?,
            previous_value: to_ch_i128(&a.previous_value)?,
            event_count: a.event_count,
            provider_cost: to_ch_i128(&a.provider_cost)?,
            source_partition: a.source_partition,
            seq: a.seq,
            emitted_at_ms: a.emitted_at,
        })
    }
}

/// `ingest_ledger`: one cumulative entry (`meterflow_core::ledger`); `inserted_at` is left to
/// its default so a replayed entry is byte-identical.
#[derive(Debug, Clone, clickhouse::Row, Serialize)]
pub struct LedgerRow {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub accepted: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    pub dead_letter_reasons: Vec<String>,
    pub dead_letter_counts: Vec<u64>,
    pub ticks: u64,
    /// Unused since entries became cumulative (kept for the table's layout).
    pub checkpoint_version: u64,
}

impl From<LedgerEntry> for LedgerRow {
    fn from(e: LedgerEntry) -> Self {
        Self {
            topic: e.topic,
            partition: e.partition,
            first_offset: e.first_offset,
            last_offset: e.last_offset,
            accepted: e.accepted,
            duplicates: e.duplicates,
            dead_lettered: e.dead_lettered,
            dead_letter_reasons: e.dead_letter_reasons,
            dead_letter_counts: e.dead_letter_counts,
            ticks: e.ticks,
            checkpoint_version: 0,
        }
    }
}
