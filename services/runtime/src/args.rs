//! Configuration shared by every service. Each flag has an environment variable so that the
//! same names work in compose files, systemd units and tests.

use clap::Args;

/// What a long-running service connects to and how it logs: each service's `Config` flattens
/// it, so the flags and their environment variables are the same everywhere.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub conn: Connections,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
}

/// The broker, the topic names and ClickHouse: what the services and most `meterflow-admin`
/// commands reach.
#[derive(Debug, Clone, Args)]
pub struct Connections {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topics: TopicArgs,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
}

/// clap value parser of duration flags, in milliseconds: `500ms`, `90s`, `5m`, `2h`, `35d`,
/// `1h 30m` (humantime) or a bare number of seconds.
pub fn duration_ms(s: &str) -> Result<i64, String> {
    meterflow_core::meter::parse_duration(s)
}

/// Where the Kafka-API broker is.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Bootstrap servers, comma separated.
    #[arg(long = "kafka-brokers", env = "METERFLOW_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Extra librdkafka properties, `key=value` comma separated (e.g. `security.protocol=ssl`).
    #[arg(long = "kafka-property", env = "METERFLOW_KAFKA_PROPERTIES", value_delimiter = ',')]
    pub properties: Vec<String>,
}

/// How a partitioned service's consumer is a member of its group.
#[derive(Debug, Clone, Default, Args)]
pub struct MembershipArgs {
    /// Static membership (Kafka's `group.instance.id`, KIP-345): an instance restarted with
    /// the same id (after a crash, an upgrade) takes its partitions back at once, without a
    /// rebalance and without waiting for the session timeout. Unique per instance of a group
    /// (e.g. the host or pod name). Unset: dynamic membership. A static member that stops
    /// does not leave the group: its partitions move to the others only after the session
    /// timeout (10 s), unless it comes back first.
    #[arg(long, env = "METERFLOW_GROUP_INSTANCE_ID")]
    pub group_instance_id: Option<String>,
}

/// Topic names. Keep them identical across services (they are in docker-compose too).
#[derive(Debug, Clone, Args)]
pub struct TopicArgs {
    #[arg(long, env = "METERFLOW_USAGE_TOPIC", default_value = "meterflow.usage-events")]
    pub usage_topic: String,
    #[arg(long, env = "METERFLOW_AGGREGATES_TOPIC", default_value = "meterflow.aggregates")]
    pub aggregates_topic: String,
    #[arg(long, env = "METERFLOW_DEAD_LETTER_TOPIC", default_value = "meterflow.dead-letters")]
    pub dead_letter_topic: String,
    #[arg(long, env = "METERFLOW_CHARGES_TOPIC", default_value = "meterflow.charges")]
    pub charges_topic: String,
    #[arg(long, env = "METERFLOW_WALLET_TOPIC", default_value = "meterflow.wallet-adjustments")]
    pub wallet_topic: String,
    #[arg(long, env = "METERFLOW_ALERTS_TOPIC", default_value = "meterflow.alerts")]
    pub alerts_topic: String,
    /// Running totals of open windows (aggregator -> rater; best effort).
    #[arg(long, env = "METERFLOW_PROVISIONAL_TOPIC", default_value = "meterflow.provisional")]
    pub provisional_topic: String,
    /// Per-tenant balances, JSON keyed by tenant, compacted (rater -> API).
    #[arg(long, env = "METERFLOW_BALANCES_TOPIC", default_value = "meterflow.balances")]
    pub balances_topic: String,
}

impl TopicArgs {
    /// All topics with a prefix in front of the defaults' names; tests use it for isolation.
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            usage_topic: format!("{prefix}usage-events"),
            aggregates_topic: format!("{prefix}aggregates"),
            dead_letter_topic: format!("{prefix}dead-letters"),
            charges_topic: format!("{prefix}charges"),
            wallet_topic: format!("{prefix}wallet-adjustments"),
            alerts_topic: format!("{prefix}alerts"),
            provisional_topic: format!("{prefix}provisional"),
            balances_topic: format!("{prefix}balances"),
        }
    }

    pub fn all(&self) -> [&str; 8] {
        [
            &self.usage_topic,
            &self.aggregates_topic,
            &self.dead_letter_topic,
            &self.charges_topic,
            &self.wallet_topic,
            &self.alerts_topic,
            &self.provisional_topic,
            &self.balances_topic,
        ]
    }
}

impl Default for TopicArgs {
    fn default() -> Self {
        Self::with_prefix("meterflow.")
    }
}

/// Where ClickHouse is.
#[derive(Debug, Clone, Args)]
pub struct ClickHouseArgs {
    /// HTTP interface URL.
    #[arg(long = "clickhouse-url", env = "METERFLOW_CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    pub url: String,
    #[arg(long = "clickhouse-database", env = "METERFLOW_CLICKHOUSE_DATABASE", default_value = "meterflow")]
    pub database: String,
    #[arg(long = "clickhouse-user", env = "METERFLOW_CLICKHOUSE_USER", default_value = "default")]
    pub user: String,
    #[arg(long = "clickhouse-password", env = "METERFLOW_CLICKHOUSE_PASSWORD", default_value = "", hide_env_values = true)]
    pub password: String,
}

/// Logging.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// `text` or `json`.
    #[arg(long = "log-format", env = "METERFLOW_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
    /// tracing filter, e.g. `info,meterflow_aggregator=debug`.
    #[arg(long = "log-level", env = "METERFLOW_LOG", default_value = "info")]
    pub level: String,
}

/// The deployment's record key (see `meterflow_core::auth`); the API also signs customer-page
/// links (`POST /v1/portal/tokens`) with it.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// Hex key (at least 16 bytes) that authenticates meterflow's own records (aggregates,
    /// rerate requests) to each other. Every service of a deployment needs the same one.
    /// Default: the key in the ClickHouse table `record_keys`, which `meterflow-admin migrate`
    /// creates at random; keep that table readable by the services' user only.
    #[arg(long = "record-key", env = "METERFLOW_RECORD_KEY", hide_env_values = true)]
    pub record_key: Option<String>,
}
