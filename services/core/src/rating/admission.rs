//! Admission: refusing forged or corrupt aggregates before they change any state.

use super::RatingState;
use crate::records::{MeterAggregate, RaterReason};

/// Bounds of what an aggregate may claim; see [`RatingState::screen`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// How far `window_start` and `emitted_at` may lie ahead of the reference time.
    pub max_future_ms: i64,
    /// How far a `seq` may jump past its source partition's high water (1 = strictly
    /// contiguous).
    pub max_seq_gap: i64,
}

impl Default for Admission {
    fn default() -> Self {
        Self { max_future_ms: 86_400_000, max_seq_gap: 1_000_000 }
    }
}

/// Reasons [`RatingState::screen`] refuses an aggregate (dead-letter reasons).
pub const REASON_FUTURE_WINDOW: &str = RaterReason::FutureWindow.as_str();
pub const REASON_BAD_SEQ: &str = RaterReason::BadSeq.as_str();

impl RatingState {
    /// Refuses (with a dead-letter reason and detail) an aggregate that claims a window or a
    /// watermark more than `limits.max_future_ms` ahead of the reference time (the later of
    /// this state's watermark and `reference_ms`, which the service takes from the broker
    /// timestamp of the record), or a `seq` more than `limits.max_seq_gap` past its source
    /// partition's high water, or not positive. Before the first aggregate of a source
    /// partition there is no high water to compare with (a rater started on a topic whose
    /// head was deleted by retention legitimately starts at a large `seq`), so only the sign
    /// is checked. Without any reference time only the `seq` is checked. Changes nothing;
    /// call it before [`rate`](Self::rate).
    pub fn screen(&self, agg: &MeterAggregate, reference_ms: Option<i64>, limits: &Admission) -> Result<(), (&'static str, String)> {
        if let Some(hw) = self.high_water(agg.source_partition).filter(|&hw| agg.seq > hw && agg.seq - hw > limits.max_seq_gap.max(1)) {
            return Err((
                REASON_BAD_SEQ,
                format!("seq {} of source partition {} is more than {} past its high water {hw}", agg.seq, agg.source_partition, limits.max_seq_gap),
            ));
        }
        if agg.seq < 1 {
            return Err((REASON_BAD_SEQ, format!("seq {} is not positive", agg.seq)));
        }
        let reference = match (self.watermark_ms, reference_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if let Some(r) = reference {
            let bound = r.saturating_add(limits.max_future_ms.max(0));
            if agg.window_start > bound || agg.emitted_at > bound {
                return Err((
                    REASON_FUTURE_WINDOW,
                    format!(
                        "window start {} / emitted at {} ms is more than {} ms past the reference time {r} ms",
                        agg.window_start, agg.emitted_at, limits.max_future_ms
                    ),
                ));
            }
        }
        Ok(())
    }
}
