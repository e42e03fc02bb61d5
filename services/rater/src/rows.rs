//! ClickHouse rows written by the rater.

use meterflow_core::decimal::to_ch_i128;
use meterflow_core::rating::partition::ParkedChange;
use meterflow_core::rating::{Alert, LedgerEntry};
use meterflow_core::records::{Charge, WalletAdjustment};
use serde::Serialize;

pub use meterflow_runtime::rows::{secs, DeadLetterRow};

#[derive(Debug, Clone, clickhouse::Row, Serialize)]
pub struct ChargeRow {
    pub charge_id: String,
    pub kind: String,
    pub tenant: String,
    pub plan: String,
    pub currency: String,
    pub meter: String,
    pub model: String,
    pub dimensions_key: String,
    pub dim_keys: Vec<String>,
    pub dim_values: Vec<String>,
    pub period_start: u32,
    pub window_start: u32,
    pub window_end: u32,
    pub revision: u32,
    pub quantity: i128,
    pub amount: i128,
    pub provider_cost: i128,
    pub margin: i128,
    pub seq: i64,
}

/// Rows refuse a value ClickHouse cannot store exactly, never round it. Unreachable in
/// practice: decoded records are checked for at most 9 fractional digits
/// (`AvroRecord::check_decimals`) and computed amounts are rounded to 9.
impl TryFrom<&Charge> for ChargeRow {
    type Error = meterflow_core::Error;

    fn try_from(c: &Charge) -> Result<Self, Self::Error> {
        Ok(Self {
            charge_id: c.charge_id.clone(),
            kind: c.kind.clone(),
            tenant: c.tenant.clone(),
            plan: c.plan.clone(),
            currency: c.currency.clone(),
            meter: c.meter.clone(),
            model: c.dimensions.get("model").cloned().unwrap_or_default(),
            dimensions_key: meterflow_core::records::dimensions_key(&c.dimensions),
            dim_keys: c.dimensions.keys().cloned().collect(),
            dim_values: c.dimensions.values().cloned().collect(),
            period_start: secs(c.period_start),
            window_start: secs(c.window_start),
            window_end: secs(c.window_end),
            revision: c.revision.max(0) as u32,
            quantity: to_ch_i128(&c.quantity)?,
            amount: to_ch_i128(&c.amount)?,
            provider_cost: to_ch_i128(&c.provider_cost)?,
            margin: to_ch_i128(&c.margin)?,
            seq: c.seq,
        })
    }
}

#[derive(Debug, Clone, clickhouse::Row, Serialize)]
pub struct AdjustmentRow {
    pub idempotency_key: String,
    pub tenant: String,
    pub currency: String,
    pub amount: i128,
    pub kind: String,
    pub reason: String,
    pub created_at: u32,
    pub source_partition: i32,
    pub source_offset: i64,
}

impl AdjustmentRow {
    pub fn new(a: &WalletAdjustment, partition: i32, offset: i64) -> Result<Self, meterflow_core::Error> {
        Ok(Self {
            idempotency_key: a.idempotency_key.clone(),
            tenant: a.tenant.clone(),
            currency: a.currency.clone(),
            amount: to_ch_i128(&a.amount)?,
            kind: a.kind.clone(),
            reason: a.reason.clone(),
            created_at: secs(a.created_at),
            source_partition: partition,
            source_offset: offset,
        })
    }
}

#[derive(Debug, Clone, clickhouse::Row, Serialize)]
pub struct AlertRow {
    pub alert_id: String,
    pub tenant: String,
    pub kind: String,
    pub currency: String,
    pub balance: i128,
    pub threshold: i128,
    pub at_ms: i64,
}

impl AlertRow {
    pub fn new(a: &Alert, at_ms: i64) -> Result<Self, meterflow_core::Error> {
        Ok(Self {
            alert_id: a.alert_id.clone(),
            tenant: a.tenant.clone(),
            kind: a.kind.clone(),
            currency: a.currency.clone(),
            balance: to_ch_i128(&a.balance)?,
            threshold: to_ch_i128(&a.threshold)?,
            at_ms,
        })
    }
}

/// One movement of prepaid credit (`wallet_ledger`, migration 012).
#[derive(Debug, Clone, clickhouse::Row, Serialize)]
pub struct LedgerRow {
    pub entry_id: String,
    pub tenant: String,
    pub currency: String,
    pub at: u32,
    pub movement: String,
    pub credit_kind: String,
    pub grant_key: String,
    pub source: String,
    pub amount: i128,
    pub source_partition: i32,
}

impl LedgerRow {
    pub fn new(e: &LedgerEntry, partition: i32) -> Result<Self, meterflow_core::Error> {
        Ok(Self {
            entry_id: e.entry_id.clone(),
            tenant: e.tenant.clone(),
            currency: e.currency.clone(),
            at: secs(e.at_ms),
            movement: e.movement.clone(),
            credit_kind: e.credit_kind.clone(),
            grant_key: e.grant_key.clone(),
            source: e.source.clone(),
            amount: to_ch_i128(&e.amount)?,
            source_partition: partition,
        })
    }
}

/// A state change of a parked aggregate (table `parked_aggregates`).
#[derive(Debug, Clone, clickhouse::Row, Serialize)]
pub struct ParkedRow {
    pub source_partition: i32,
    pub seq: i64,
    pub aggregates_partition: i32,
    pub aggregates_offset: i64,
    pub state: String,
    pub state_version: u64,
    pub reason: String,
    pub detail: String,
    pub tenant: String,
    pub meter: String,
    pub dimensions_key: String,
    pub window_start: u32,
    pub revision: u32,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl ParkedRow {
    /// A parked aggregate's change, decided by a record of aggregates partition `partition`.
    pub fn new(p: &ParkedChange, partition: i32) -> Self {
        let agg = &p.aggregate;
        Self {
            source_partition: agg.source_partition,
            seq: agg.seq,
            aggregates_partition: partition,
            aggregates_offset: p.offset,
            state: p.state.to_owned(),
            state_version: p.offset.max(0) as u64,
            reason: p.reason.to_owned(),
            detail: p.detail.clone(),
            tenant: agg.tenant.clone(),
            meter: agg.meter.clone(),
            dimensions_key: agg.dimensions_key(),
            window_start: secs(agg.window_start),
            revision: agg.revision.max(0) as u32,
            payload: p.payload.clone(),
        }
    }
}
