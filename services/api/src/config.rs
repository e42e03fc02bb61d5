//! API configuration: every flag has an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use meterflow_runtime::args::{duration_ms, LogArgs, ServiceArgs};
use meterflow_runtime::service::ServiceConfig;

/// HTTP front door: usage events (meterflow JSON and CloudEvents, OpenMeter-compatible) go to
/// the usage topic, wallet top-ups to the wallet topic, each acknowledged only after the
/// broker stored it. Serves /healthz, /readyz, /metrics and /openapi.json on the same port.
#[derive(Debug, Clone, Parser)]
#[command(name = "meterflow-api", version)]
pub struct Config {
    #[command(flatten)]
    pub service: ServiceArgs,

    /// Listen address (port 0 picks a free one).
    #[arg(long, env = "METERFLOW_API_HTTP_ADDR", default_value = "127.0.0.1:9104")]
    pub http_addr: SocketAddr,

    /// Meter definitions (TOML), including how CloudEvents feed them.
    #[arg(long, env = "METERFLOW_METERS", default_value = "config/meters.toml")]
    pub meters: PathBuf,

    /// Pricing catalog (TOML), the file the rater rates with: entitlement checks price a
    /// requested quantity with it and read the tenants' spend limits from it. Checked against
    /// the meters at start, as the rater does.
    #[arg(long, env = "METERFLOW_CATALOG", default_value = "config/catalog.toml")]
    pub catalog: PathBuf,

    /// Largest accepted request body in bytes (larger: 413).
    #[arg(long, env = "METERFLOW_API_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,

    /// Most events (array items) in one request (more: 413).
    #[arg(long, env = "METERFLOW_API_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,

    /// Per-tenant rate limit in events per second (0: none). Over it: 429 with Retry-After.
    #[arg(long, env = "METERFLOW_API_TENANT_RATE", default_value_t = 50_000)]
    pub tenant_rate: u32,

    /// Per-tenant burst in events (default: one second's worth).
    #[arg(long, env = "METERFLOW_API_TENANT_BURST")]
    pub tenant_burst: Option<u32>,

    /// Events handed to the broker but not yet acknowledged, across all requests; a request
    /// that would exceed it gets 429 with Retry-After (backpressure instead of unbounded memory).
    #[arg(long, env = "METERFLOW_API_MAX_IN_FLIGHT", default_value_t = 200_000)]
    pub max_in_flight: usize,

    /// How often API keys are re-read from ClickHouse: the most a revocation takes.
    #[arg(long = "key-refresh", env = "METERFLOW_API_KEY_REFRESH", default_value = "2s", value_parser = duration_ms)]
    pub key_refresh_ms: i64,

    /// The aggregator's dedup horizon: older events are rejected as too_late, as it would.
    #[arg(long = "dedup-horizon", env = "METERFLOW_DEDUP_HORIZON", default_value = "35d", value_parser = duration_ms)]
    pub dedup_horizon_ms: i64,

    /// How long a request waits for the broker's acknowledgement before answering 503.
    #[arg(long = "produce-timeout", env = "METERFLOW_API_PRODUCE_TIMEOUT", default_value = "30s", value_parser = duration_ms)]
    pub produce_timeout_ms: i64,
}

impl ServiceConfig for Config {
    fn log(&self) -> &LogArgs {
        &self.service.log
    }
}
