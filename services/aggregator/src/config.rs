//! Aggregator configuration: every flag has an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use meterflow_runtime::args::{duration_ms, LogArgs, ServiceArgs, MembershipArgs};
use meterflow_runtime::service::ServiceConfig;

/// Consumes usage events, drops duplicates, totals them in event-time windows and writes the
/// totals (and restatements of late windows) to ClickHouse and the aggregates topic. Bad
/// input goes to the dead-letter topic and table with a reason.
#[derive(Debug, Clone, Parser)]
#[command(name = "meterflow-aggregator", version)]
pub struct Config {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub membership: MembershipArgs,

    /// Consumer group; partitions of the usage topic are shared among its members.
    #[arg(long, env = "METERFLOW_AGGREGATOR_GROUP", default_value = "meterflow-aggregator")]
    pub group: String,

    /// Meter definitions (TOML).
    #[arg(long, env = "METERFLOW_METERS", default_value = "config/meters.toml")]
    pub meters: PathBuf,

    /// Address of /healthz, /readyz and /metrics (port 0 picks a free one).
    #[arg(long, env = "METERFLOW_AGGREGATOR_HTTP_ADDR", default_value = "127.0.0.1:9101")]
    pub http_addr: SocketAddr,

    /// How far back (event time) a duplicate is still recognised, and the oldest event
    /// accepted; older events are dead-lettered as too_late.
    #[arg(long = "dedup-horizon", env = "METERFLOW_DEDUP_HORIZON", default_value = "35d", value_parser = duration_ms)]
    pub dedup_horizon_ms: i64,

    /// Upper bound of event ids kept in memory per partition (18-22 bytes each); the oldest
    /// hours beyond it keep a 4-byte fingerprint per id, and a matching fingerprint is
    /// confirmed in ClickHouse's usage_event_ids.
    #[arg(long, env = "METERFLOW_DEDUP_HOT_MAX_IDS", default_value_t = 20_000_000)]
    pub dedup_hot_max_ids: usize,

    /// How long (event time) closed windows stay in memory for cheap restatements; older
    /// ones are rebuilt from usage_events when a late event arrives.
    #[arg(long = "retain-closed", env = "METERFLOW_RETAIN_CLOSED", default_value = "2h", value_parser = duration_ms)]
    pub retain_closed_ms: i64,

    /// Most windows (open and retained closed) one partition keeps in memory; an event that
    /// needs one more is dead-lettered as window_limit. The default (2 Mi) is ~0.4 GiB of
    /// engine state per partition at the measured ~190 bytes per window; 4 partitions at the
    /// limit stay within 24 GiB even at ~2.5 KB of whole-process memory per window.
    #[arg(long, env = "METERFLOW_MAX_WINDOWS", default_value_t = meterflow_core::engine::DEFAULT_MAX_WINDOWS)]
    pub max_windows: usize,

    /// Most open windows one tenant may have in one partition; beyond it that tenant's events
    /// for new windows are dead-lettered as window_limit, so a flood of new dimension values
    /// from one tenant leaves room for the others.
    #[arg(
        long,
        env = "METERFLOW_MAX_OPEN_WINDOWS_PER_TENANT",
        default_value_t = meterflow_core::engine::DEFAULT_MAX_OPEN_WINDOWS_PER_TENANT
    )]
    pub max_open_windows_per_tenant: usize,

    /// Outputs are flushed at least this often.
    #[arg(long = "flush-interval", env = "METERFLOW_FLUSH_INTERVAL", default_value = "1s", value_parser = duration_ms)]
    pub flush_interval_ms: i64,

    /// How often the running totals of the open windows that changed are published to the
    /// provisional topic, for real-time balances: the most it adds to "usage acknowledged ->
    /// pending spend visible", against one record per active window per interval.
    #[arg(long = "provisional-interval", env = "METERFLOW_PROVISIONAL_INTERVAL", default_value = "500ms", value_parser = duration_ms)]
    pub provisional_interval_ms: i64,

    /// State is checkpointed (and offsets committed) at least this often: the most input a
    /// restart re-reads.
    #[arg(long = "checkpoint-interval", env = "METERFLOW_CHECKPOINT_INTERVAL", default_value = "5s", value_parser = duration_ms)]
    pub checkpoint_interval_ms: i64,

    /// Checkpoints are deltas (the windows and dedup ids changed since the previous one, so
    /// their cost follows the traffic, not the state); every this many deltas a full one is
    /// written instead, which bounds what a restart reads. 0: every checkpoint is full.
    #[arg(long, env = "METERFLOW_CHECKPOINT_FULL_EVERY", default_value_t = 20)]
    pub checkpoint_full_every: u32,

    /// A full checkpoint is also written once the deltas since the last one add up to this
    /// fraction of its size (a burst of new ids would otherwise make restarts read more than
    /// a full state).
    #[arg(long, env = "METERFLOW_CHECKPOINT_FULL_RATIO", default_value_t = 0.5)]
    pub checkpoint_full_ratio: f64,

    /// Buffered output rows that start a write at once. One batch is written while the next
    /// fills; consumption pauses while that one is full too, so at most twice this many rows
    /// wait in memory while ClickHouse or the broker is down. Batches are written every
    /// flush interval, so this only matters when ClickHouse is slower than the input: then
    /// batches grow up to it, and fewer, larger inserts cost ClickHouse about half the CPU
    /// per row of 200,000-row ones (docs/benchmarks.md).
    #[arg(long, env = "METERFLOW_MAX_BUFFERED_ROWS", default_value_t = 1_000_000)]
    pub max_buffered_rows: usize,

    /// The same bound in estimated bytes of buffered output (dead letters carry whole
    /// payloads): at most twice this much waits in memory during an outage.
    #[arg(long, env = "METERFLOW_MAX_BUFFERED_BYTES", default_value_t = 256 << 20)]
    pub max_buffered_bytes: usize,

    /// A partition with no input for this long gets a tick record, so its windows close
    /// without new events.
    #[arg(long = "idle-timeout", env = "METERFLOW_IDLE_TIMEOUT", default_value = "5s", value_parser = duration_ms)]
    pub idle_timeout_ms: i64,
}

impl Config {
    /// When checkpoints are deltas (see `meterflow_runtime::chain`).
    pub fn delta_policy(&self) -> meterflow_runtime::chain::DeltaPolicy {
        meterflow_runtime::chain::DeltaPolicy { full_every: self.checkpoint_full_every, max_ratio: self.checkpoint_full_ratio }
    }
}

impl ServiceConfig for Config {
    fn log(&self) -> &LogArgs {
        &self.service.log
    }
}
