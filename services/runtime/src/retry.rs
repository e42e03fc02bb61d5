//! Retrying I/O that must not give up: an output that was not written is revenue lost.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Exponential backoff from `min` to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

/// Runs `op` until it succeeds. Between failures it waits with backoff, logging each failure
/// with `what`, and calls `on_error` (for metrics). Returns `None` only if `shutdown` fires
/// while waiting, so callers can stop without losing track of what was not written.
pub async fn until_ok<T, E, F, Fut>(
    what: &str,
    backoff: &Backoff,
    shutdown: &CancellationToken,
    mut on_error: impl FnMut(&E),
    mut op: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = backoff.min;
    let mut attempt = 0u32;
    loop {
        match op().await {
            Ok(v) => {
                if attempt > 0 {
                    tracing::info!(what, attempt, "recovered");
                }
                return Some(v);
            }
            Err(e) => {
                attempt += 1;
                on_error(&e);
                tracing::warn!(what, attempt, error = %e, retry_in_ms = delay.as_millis() as u64, "failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return None,
                }
                delay = (delay * 2).min(backoff.max);
            }
        }
    }
}
