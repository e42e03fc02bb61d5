//! What the aggregator derives from one input record besides the engine's work: the raw row
//! of an accepted event, dead letters, the tick control records, retries of cold look-ups.

use meterflow_core::engine::Accepted;
use meterflow_core::event::UsageEventRef;
use meterflow_core::records::DeadLetter;
use meterflow_core::{auth, RejectReason};
use meterflow_runtime::kafka::CONTROL_HEADER;
use meterflow_runtime::record::Record;
use meterflow_runtime::retry::Backoff;
use metrics::counter;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics as m;
use crate::rows::{secs, UsageRow};

pub(crate) const TICK: &[u8] = b"tick";

/// The `meterflow-auth` tag of a control record, if any.
pub(crate) fn tick_tag<'a>(record: &Record<'a>) -> Option<&'a [u8]> {
    record.header(auth::HEADER)
}

pub(crate) fn is_tick(record: &Record<'_>) -> bool {
    record.header(CONTROL_HEADER) == Some(TICK)
}

/// Retries a synchronous engine call whose cold-store look-up failed (ClickHouse down): the
/// engine leaves its state unchanged on error, so the call can simply be repeated.
pub(crate) async fn retry_sync<T>(
    mut f: impl FnMut() -> Result<T, meterflow_core::Error>,
    shutdown: &CancellationToken,
) -> anyhow::Result<T> {
    let backoff = Backoff::default();
    let mut delay = backoff.min;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(meterflow_core::Error::Store(e)) => {
                counter!(m::RUNTIME.flush_errors, "sink" => "cold_store").increment(1);
                tracing::warn!(error = %e, "cold store look-up failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => anyhow::bail!("shutdown during a cold-store retry"),
                }
                delay = (delay * 2).min(backoff.max);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

pub(crate) fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The raw row of an accepted event (its dimensions sorted), from the quantities and window
/// the engine parsed (canonical, at most 9 fractional digits, so the conversion is exact; an
/// error here is a bug, and it stops the aggregator rather than store a wrong quantity).
pub(crate) fn usage_row(acc: &Accepted, ev: &UsageEventRef<'_>, partition: i32, offset: i64) -> anyhow::Result<UsageRow> {
    use meterflow_core::decimal::to_ch_i128;
    let quantity = to_ch_i128(&acc.quantity)?;
    let provider_cost = match &acc.provider_cost {
        Some(c) => to_ch_i128(c)?,
        None => 0,
    };
    let dims = &ev.dimensions;
    debug_assert!(dims.is_sorted(), "dimensions sorted by the caller");
    Ok(UsageRow {
        tenant: ev.tenant.to_owned(),
        meter: ev.meter.to_owned(),
        event_id: ev.event_id.to_owned(),
        event_time: secs(ev.event_time_ms),
        event_time_ms: ev.event_time_ms,
        window_start: secs(acc.window_start),
        quantity,
        provider_cost,
        has_provider_cost: u8::from(acc.provider_cost.is_some()),
        dim_keys: dims.iter().map(|(k, _)| (*k).to_owned()).collect(),
        dim_values: dims.iter().map(|(_, v)| (*v).to_owned()).collect(),
        source: ev.source.to_owned(),
        source_partition: partition,
        source_offset: offset,
    })
}

pub(crate) fn dead_letter(
    config: &Config,
    partition: i32,
    offset: i64,
    reason: RejectReason,
    detail: String,
    ev: Option<&UsageEventRef<'_>>,
    payload: &[u8],
) -> DeadLetter {
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    DeadLetter {
        source_topic: config.service.conn.topics.usage_topic.clone(),
        source_partition: partition,
        source_offset: offset,
        reason: reason.as_str().to_owned(),
        detail,
        tenant: ev.and_then(|e| nonempty(e.tenant)),
        event_id: ev.and_then(|e| nonempty(e.event_id)),
        payload: payload.to_vec(),
    }
}
