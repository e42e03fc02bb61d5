//! What the aggregator derives from one input record besides the engine's work: the raw row
//! of an accepted event, dead letters, the tick control records, retries of cold look-ups.

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
