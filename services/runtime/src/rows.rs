//! ClickHouse rows more than one service writes.

use meterflow_core::records::DeadLetter;
use serde::Serialize;

#[derive(Debug, Clone, clickhouse::Row, Serialize)]
pub struct DeadLetterRow {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub reason: String,
    pub detail: String,
    pub tenant: String,
    pub event_id: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl From<&DeadLetter> for DeadLetterRow {
    fn from(d: &DeadLetter) -> Self {
        Self {
            source_topic: d.source_topic.clone(),
            source_partition: d.source_partition,
            source_offset: d.source_offset,
            reason: d.reason.clone(),
            detail: d.detail.clone(),
            tenant: d.tenant.clone().unwrap_or_default(),
            event_id: d.event_id.clone().unwrap_or_default(),
            payload: d.payload.clone(),
        }
    }
}

/// Unix milliseconds to ClickHouse `DateTime` seconds, clamped to its range.
pub fn secs(ms: i64) -> u32 {
    ms.div_euclid(1000).clamp(0, i64::from(u32::MAX)) as u32
}

