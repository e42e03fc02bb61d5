//! Rater configuration: every flag has an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use meterflow_runtime::args::{duration_ms, AuthArgs, ClickHouseArgs, KafkaArgs, LogArgs, MembershipArgs, TopicArgs};
use meterflow_runtime::service::ServiceConfig;

/// Prices meter aggregates (per-unit, graduated, volume, package, free allowances, minimum
/// commitments), computes provider cost and margin, draws prepaid wallets down, and writes
/// charges to Kafka and ClickHouse.
#[derive(Debug, Clone, Parser)]
#[command(name = "meterflow-rater", version)]
pub struct Config {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topics: TopicArgs,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub membership: MembershipArgs,

    /// Consumer group. The aggregates and wallet topics must have the same partition count:
    /// the range assignor then gives partition N of both to one member.
    #[arg(long, env = "METERFLOW_RATER_GROUP", default_value = "meterflow-rater")]
    pub group: String,

    /// Pricing catalog (TOML).
    #[arg(long, env = "METERFLOW_CATALOG", default_value = "config/catalog.toml")]
    pub catalog: PathBuf,

    /// Meter definitions; when the file exists, the catalog is checked against them at start
    /// (a price for a meter that does not exist is a typo that would never bill).
    #[arg(long, env = "METERFLOW_METERS", default_value = "config/meters.toml")]
    pub meters: PathBuf,

    /// Address of /healthz, /readyz and /metrics (port 0 picks a free one).
    #[arg(long, env = "METERFLOW_RATER_HTTP_ADDR", default_value = "127.0.0.1:9102")]
    pub http_addr: SocketAddr,

    /// Low-balance alert thresholds per currency, e.g. `USD=10,EUR=10`.
    #[arg(long, env = "METERFLOW_LOW_BALANCE", value_delimiter = ',', default_value = "USD=10")]
    pub low_balance: Vec<String>,

    /// How long after a billing period ends late usage is awaited before its true-up.
    #[arg(long = "period-grace", env = "METERFLOW_PERIOD_GRACE", default_value = "1h", value_parser = duration_ms)]
    pub period_grace_ms: i64,

    /// How far ahead of the rater's watermark (or of the record's broker timestamp, if
    /// later) an aggregate's window or watermark may lie; further is dead-lettered as
    /// `future_window` (forged or corrupt: trusting it would close billing periods early).
    #[arg(long = "max-future", env = "METERFLOW_MAX_FUTURE", default_value = "1d", value_parser = duration_ms)]
    pub max_future_ms: i64,

    /// How far an aggregate's `seq` may jump past the highest rated for its source partition
    /// (no bound before the first); further is dead-lettered as `bad_seq`. The aggregator emits 1, 2, 3, ... per source
    /// partition; gaps are legitimate only when the producers' partitioner differs from
    /// librdkafka's (aggregates of one usage partition then spread over several aggregates
    /// partitions), and are counted in `meterflow_rater_seq_gaps_total`.
    #[arg(long, env = "METERFLOW_MAX_SEQ_GAP", default_value_t = 1_000_000)]
    pub max_seq_gap: i64,

    #[arg(long = "flush-interval", env = "METERFLOW_FLUSH_INTERVAL", default_value = "1s", value_parser = duration_ms)]
    pub flush_interval_ms: i64,

    #[arg(long = "checkpoint-interval", env = "METERFLOW_CHECKPOINT_INTERVAL", default_value = "5s", value_parser = duration_ms)]
    pub checkpoint_interval_ms: i64,

    /// Buffered output rows that start a write at once; consumption pauses while one batch is
    /// written and the next is this full too.
    #[arg(long, env = "METERFLOW_MAX_BUFFERED_ROWS", default_value_t = 100_000)]
    pub max_buffered_rows: usize,

    /// The same bound in estimated bytes of buffered output.
    #[arg(long, env = "METERFLOW_MAX_BUFFERED_BYTES", default_value_t = 64 << 20)]
    pub max_buffered_bytes: usize,

    /// Export a wallet-balance gauge per tenant. Cardinality is the number of tenants with a
    /// wallet; turn it off for very many prepaid tenants.
    #[arg(long, env = "METERFLOW_WALLET_GAUGES", default_value_t = true, action = clap::ArgAction::Set)]
    pub wallet_gauges: bool,
}

impl ServiceConfig for Config {
    fn log(&self) -> &LogArgs {
        &self.log
    }
}
