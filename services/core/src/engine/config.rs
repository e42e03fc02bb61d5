//! The engine's configuration (the same for every partition).

use super::*;

/// Configuration of a [`PartitionEngine`] (the same for every partition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// See [`DedupConfig::horizon_ms`] (default 35 days).
    pub dedup_horizon_ms: i64,
    /// See [`DedupConfig::bucket_ms`] (default 1 hour).
    pub dedup_bucket_ms: i64,
    /// See [`DedupConfig::hot_max_ids`] (default 16 Mi ids, 18-22 bytes each).
    pub hot_max_ids: usize,
    /// How long (in partition time, after closing) a closed window stays in memory; later
    /// events for it reload it from the [`WindowStore`] (default 1 hour).
    pub retain_closed_ms: i64,
    /// Restatements are emitted when partition time crosses a multiple of this; 0 emits them
    /// from the `on_event` that caused them (default 1 second).
    pub restate_interval_ms: i64,
    /// Most windows (open and retained closed) one partition holds in memory; an event that
    /// would create one more is rejected `WindowLimit`. Bounds memory under a cardinality
    /// flood (default [`DEFAULT_MAX_WINDOWS`]).
    pub max_windows: usize,
    /// Most open windows of one tenant in one partition; beyond it that tenant's events for
    /// new windows are rejected `WindowLimit`, so one tenant's flood leaves room for the
    /// others (default [`DEFAULT_MAX_OPEN_WINDOWS_PER_TENANT`]).
    pub max_open_windows_per_tenant: usize,
}

/// Default of [`EngineConfig::max_windows`]: 2 Mi windows, about 0.4 GiB per partition at
/// the measured ~190 bytes per window (README, "Memory limits").
pub const DEFAULT_MAX_WINDOWS: usize = 2 << 20;
/// Default of [`EngineConfig::max_open_windows_per_tenant`].
pub const DEFAULT_MAX_OPEN_WINDOWS_PER_TENANT: usize = 100_000;

impl Default for EngineConfig {
    fn default() -> Self {
        let d = DedupConfig::default();
        Self {
            dedup_horizon_ms: d.horizon_ms,
            dedup_bucket_ms: d.bucket_ms,
            hot_max_ids: d.hot_max_ids,
            retain_closed_ms: 3_600_000,
            restate_interval_ms: 1_000,
            max_windows: DEFAULT_MAX_WINDOWS,
            max_open_windows_per_tenant: DEFAULT_MAX_OPEN_WINDOWS_PER_TENANT,
        }
    }
}

impl EngineConfig {
    pub fn dedup_config(&self) -> DedupConfig {
        DedupConfig {
            horizon_ms: self.dedup_horizon_ms,
            bucket_ms: self.dedup_bucket_ms,
            hot_max_ids: self.hot_max_ids,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.dedup_config().validate()?;
        if !(0..=MAX_ABS_EVENT_TIME_MS).contains(&self.retain_closed_ms) {
            return Err(Error::Config("engine: retain_closed_ms must be in [0, 2^50]".into()));
        }
        if self.restate_interval_ms < 0 {
            return Err(Error::Config("engine: restate_interval_ms must not be negative".into()));
        }
        if self.max_windows == 0 || self.max_open_windows_per_tenant == 0 {
            return Err(Error::Config("engine: max_windows and max_open_windows_per_tenant must be positive".into()));
        }
        Ok(())
    }
}
