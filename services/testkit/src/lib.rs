//! Test support for meterflow: every test gets its own topics and ClickHouse database on the
//! local services (`make up`), so tests never see each other's data and can run in parallel.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use std::time::Duration;
//! let env = meterflow_testkit::TestEnv::new("my_test").await?;
//! // ... run a service with env.kafka_args(), env.topics(), env.clickhouse_args() ...
//! let n: u64 = env.query_scalar("SELECT count() FROM usage_events").await?;
//! let msgs = env.consume_all(&env.topics().aggregates_topic, Duration::from_secs(30)).await?;
//! meterflow_testkit::wait_for(|| async { Ok(env.query_scalar::<u64>("SELECT count() FROM charges").await? > 0) }, Duration::from_secs(60)).await?;
//! # let _ = (n, msgs); Ok(()) }
//! ```
//!
//! Where the services are: `METERFLOW_KAFKA_BROKERS` (default `127.0.0.1:9092`),
//! `METERFLOW_CLICKHOUSE_URL` (default `http://127.0.0.1:8123`), `METERFLOW_CLICKHOUSE_USER`,
//! `METERFLOW_CLICKHOUSE_PASSWORD`, `METERFLOW_KAFKA_PROPERTIES` (as for the services).
//! With `METERFLOW_CLICKHOUSE_CLUSTER=meterflow` (and the URL of a cluster node, e.g.
//! `http://127.0.0.1:18123` from `make up-cluster`) every test database gets the cluster form
//! of the schema (`meterflow-admin migrate --cluster`): replicated, sharded tables.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use meterflow_runtime::args::{ClickHouseArgs, KafkaArgs, TopicArgs};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

pub mod http;
pub mod procs;

pub use meterflow_admin::Partitions;

/// `(partition, offset, key, payload)` of one consumed message; an absent payload (tombstone)
/// is empty.
pub type Record = (i32, i64, Option<Vec<u8>>, Vec<u8>);

/// The hint every "cannot reach" error ends with.
pub const START_SERVICES_HINT: &str =
    "start the local services with `make up` (in the repository root) and re-run; `make status` shows what runs";

/// A test's private slice of the local services: a fresh database with every migration
/// applied and a fresh set of the topics.
#[derive(Debug, Clone)]
pub struct TestEnv {
    name: String,
    prefix: String,
    partitions: Partitions,
    kafka: KafkaArgs,
    topics: TopicArgs,
    clickhouse: ClickHouseArgs,
    /// The ClickHouse cluster the database was created on (`ON CLUSTER`), if any.
    cluster: Option<String>,
}

/// `METERFLOW_CLICKHOUSE_CLUSTER`, if set: tests then migrate the cluster form.
pub fn cluster_from_env() -> Option<String> {
    std::env::var("METERFLOW_CLICKHOUSE_CLUSTER").ok().filter(|v| !v.is_empty())
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string())
}

/// Kafka settings from the environment, as the services read them.
pub fn kafka_args_from_env() -> KafkaArgs {
    KafkaArgs {
        brokers: env_or("METERFLOW_KAFKA_BROKERS", "127.0.0.1:9092"),
        properties: std::env::var("METERFLOW_KAFKA_PROPERTIES")
            .ok()
            .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
            .unwrap_or_default(),
    }
}

/// ClickHouse settings from the environment for `database`.
pub fn clickhouse_args_from_env(database: &str) -> ClickHouseArgs {
    ClickHouseArgs {
        url: env_or("METERFLOW_CLICKHOUSE_URL", "http://127.0.0.1:8123"),
        database: database.to_string(),
        user: env_or("METERFLOW_CLICKHOUSE_USER", "default"),
        password: std::env::var("METERFLOW_CLICKHOUSE_PASSWORD").unwrap_or_default(),
    }
}

/// `name` lower-cased with anything but `[a-z0-9_]` turned into `_`, at most 40 chars.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .take(40)
        .collect();
    if s.is_empty() {
        "test".to_string()
    } else {
        s
    }
}

/// Fails with [`START_SERVICES_HINT`] unless ClickHouse answers `SELECT 1`.
pub async fn check_clickhouse(args: &ClickHouseArgs) -> Result<()> {
    let client = meterflow_runtime::clickhouse::admin_client(args);
    let probe = tokio::time::timeout(Duration::from_secs(10), client.query("SELECT 1").fetch_one::<u8>()).await;
    match probe {
        Ok(Ok(1)) => Ok(()),
        Ok(Ok(other)) => bail!("ClickHouse at {} answered SELECT 1 with {other}", args.url),
        Ok(Err(e)) => bail!("cannot reach ClickHouse at {}: {e}\n  {START_SERVICES_HINT}", args.url),
        Err(_) => bail!("ClickHouse at {} did not answer within 10s\n  {START_SERVICES_HINT}", args.url),
    }
}

/// Fails with [`START_SERVICES_HINT`] unless the broker answers a metadata request.
pub async fn check_kafka(args: &KafkaArgs) -> Result<()> {
    match tokio::time::timeout(Duration::from_secs(15), meterflow_admin::list_topics(args)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => bail!("cannot reach the Kafka broker at {}: {e:#}\n  {START_SERVICES_HINT}", args.brokers),
        Err(_) => bail!("the Kafka broker at {} did not answer within 15s\n  {START_SERVICES_HINT}", args.brokers),
    }
}

impl TestEnv {
    /// A fresh environment with 4 partitions per topic.
    pub async fn new(name: &str) -> Result<Self> {
        Self::with_partitions(name, Partitions::default()).await
    }

    /// A fresh environment: database `t_<name>_<random>` with all migrations applied and the
    /// topics `t.<name>.<random>.*` with `partitions` (an `i32` for all, or a
    /// [`Partitions`]). Fails with a "run `make up`" message when the services are down.
    pub async fn with_partitions(name: &str, partitions: impl Into<Partitions>) -> Result<Self> {
        Self::on_clickhouse(name, partitions, None, cluster_from_env().as_deref()).await
    }

    /// Like [`TestEnv::with_partitions`], on the ClickHouse at `url` (default: from the
    /// environment) and, with `cluster`, with the cluster form of the schema created on every
    /// node of that cluster.
    pub async fn on_clickhouse(
        name: &str,
        partitions: impl Into<Partitions>,
        url: Option<&str>,
        cluster: Option<&str>,
    ) -> Result<Self> {
        let partitions = partitions.into();
        let base = sanitize(name);
        let id = format!("{base}_{:08x}", rand::random::<u32>());
        let kafka = kafka_args_from_env();
        let mut clickhouse = clickhouse_args_from_env(&format!("t_{id}"));
        if let Some(url) = url {
            clickhouse.url = url.to_string();
        }
        let prefix = format!("t.{base}.{:08x}.", rand::random::<u32>());
        let topics = TopicArgs::with_prefix(&prefix);

        let (ch_ok, kafka_ok) = tokio::join!(check_clickhouse(&clickhouse), check_kafka(&kafka));
        match (ch_ok, kafka_ok) {
            (Ok(()), Ok(())) => {}
            (Err(a), Err(b)) => bail!("meterflow-testkit: the local services are not running:\n- {a:#}\n- {b:#}"),
            (Err(e), _) | (_, Err(e)) => bail!("meterflow-testkit: {e:#}"),
        }

        let migrations = meterflow_admin::MigrationSource::resolve(None).load()?;
        let (migrated, created) = tokio::join!(
            meterflow_admin::migrate_to(&clickhouse, &migrations, cluster),
            meterflow_admin::create_topics(&kafka, &topics, partitions),
        );
        migrated.with_context(|| format!("migrating test database {}", clickhouse.database))?;
        created.with_context(|| format!("creating test topics {prefix}*"))?;
        Ok(Self { name: id, prefix, partitions, kafka, topics, clickhouse, cluster: cluster.map(String::from) })
    }

    /// The unique name of this environment (`<name>_<random>`), handy for log file names.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The topic prefix, `t.<name>.<random>.`.
    pub fn topic_prefix(&self) -> &str {
        &self.prefix
    }

    pub fn partitions(&self) -> Partitions {
        self.partitions
    }

    pub fn kafka_args(&self) -> &KafkaArgs {
        &self.kafka
    }

    pub fn topics(&self) -> &TopicArgs {
        &self.topics
    }

    pub fn clickhouse_args(&self) -> &ClickHouseArgs {
        &self.clickhouse
    }

    /// The ClickHouse cluster the database lives on, if created with one.
    pub fn cluster(&self) -> Option<&str> {
        self.cluster.as_deref()
    }

    /// The test database's name, `t_<name>_<random>`.
    pub fn database(&self) -> &str {
        &self.clickhouse.database
    }

    /// A ClickHouse client on the test database.
    pub fn clickhouse(&self) -> clickhouse::Client {
        meterflow_runtime::clickhouse::client(&self.clickhouse)
    }

    /// The single value `sql` returns (first column of the first row), e.g.
    /// `env.query_scalar::<u64>("SELECT count() FROM charges")`. `sql` is sent as is (no `?`
    /// binding).
    pub async fn query_scalar<T>(&self, sql: &str) -> Result<T>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.clickhouse()
            .query_raw(sql)
            .fetch_one::<T>()
            .await
            .with_context(|| format!("query_scalar in {}: {sql}", self.clickhouse.database))
    }

    /// Every message of `topic` from its beginning to its current end (see [`consume_all`]).
    pub async fn consume_all(&self, topic: &str, timeout: Duration) -> Result<Vec<Record>> {
        consume_all(&self.kafka, topic, timeout).await
    }

    /// Environment variables that point a service at this environment (the shared flags of
    /// `meterflow-runtime`: brokers, the topics, ClickHouse).
    pub fn env_vars(&self) -> Vec<(String, String)> {
        let t = &self.topics;
        let mut v = vec![
            ("METERFLOW_KAFKA_BROKERS", self.kafka.brokers.clone()),
            ("METERFLOW_USAGE_TOPIC", t.usage_topic.clone()),
            ("METERFLOW_AGGREGATES_TOPIC", t.aggregates_topic.clone()),
            ("METERFLOW_DEAD_LETTER_TOPIC", t.dead_letter_topic.clone()),
            ("METERFLOW_CHARGES_TOPIC", t.charges_topic.clone()),
            ("METERFLOW_WALLET_TOPIC", t.wallet_topic.clone()),
            ("METERFLOW_ALERTS_TOPIC", t.alerts_topic.clone()),
            ("METERFLOW_PROVISIONAL_TOPIC", t.provisional_topic.clone()),
            ("METERFLOW_BALANCES_TOPIC", t.balances_topic.clone()),
            ("METERFLOW_CLICKHOUSE_URL", self.clickhouse.url.clone()),
            ("METERFLOW_CLICKHOUSE_DATABASE", self.clickhouse.database.clone()),
            ("METERFLOW_CLICKHOUSE_USER", self.clickhouse.user.clone()),
            ("METERFLOW_CLICKHOUSE_PASSWORD", self.clickhouse.password.clone()),
        ];
        if !self.kafka.properties.is_empty() {
            v.push(("METERFLOW_KAFKA_PROPERTIES", self.kafka.properties.join(",")));
        }
        v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// Drops the test database and deletes the topics. Optional: environments are left in
    /// place by default so that a failed test can be inspected.
    pub async fn cleanup(self) -> Result<()> {
        use rdkafka::admin::{AdminClient, AdminOptions};
        let admin_ch = meterflow_runtime::clickhouse::admin_client(&self.clickhouse);
        admin_ch
            .query_raw(&format!(
                "DROP DATABASE IF EXISTS {}{}",
                meterflow_admin::sql::quote_ident(&self.clickhouse.database),
                self.cluster.as_deref().map(|c| format!(" ON CLUSTER {c}")).unwrap_or_default()
            ))
            .execute()
            .await
            .with_context(|| format!("dropping {}", self.clickhouse.database))?;
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            meterflow_runtime::kafka::base_config(&self.kafka)?.create()?;
        let names = self.topics.all();
        admin
            .delete_topics(&names, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))))
            .await
            .context("deleting test topics")?;
        Ok(())
    }
}

/// Reads every message of `topic`, all partitions, from the beginning up to the end the
/// broker reports when the call starts. Fails if that end is not reached within `timeout`.
/// Messages come sorted by partition, then offset. No consumer group offsets are committed.
pub async fn consume_all(kafka: &KafkaArgs, topic: &str, timeout: Duration) -> Result<Vec<Record>> {
    let mut cfg = meterflow_runtime::kafka::base_config(kafka)?;
    cfg.set("group.id", format!("meterflow-testkit-{:016x}", rand::random::<u64>()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest");
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || -> Result<Vec<Record>> {
        let deadline = Instant::now() + timeout;
        let remaining = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        let consumer: BaseConsumer = cfg.create().context("creating a Kafka consumer")?;
        let md = consumer
            .fetch_metadata(Some(&topic), remaining().min(Duration::from_secs(10)))
            .with_context(|| format!("metadata of {topic}; {START_SERVICES_HINT}"))?;
        let t = md.topics().first().ok_or_else(|| anyhow!("no metadata for topic {topic}"))?;
        if let Some(e) = t.error() {
            bail!("topic {topic}: {e:?}");
        }
        let partitions: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        if partitions.is_empty() {
            bail!("topic {topic} has no partitions (does it exist?)");
        }

        // The end to read up to, per partition: [low, high).
        let mut ends: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        for p in &partitions {
            let (low, high) = consumer
                .fetch_watermarks(&topic, *p, remaining().min(Duration::from_secs(10)))
                .with_context(|| format!("watermarks of {topic}/{p}"))?;
            ends.insert(*p, (low, high));
        }
        let mut tpl = TopicPartitionList::new();
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        for (p, (low, high)) in &ends {
            if high > low {
                tpl.add_partition_offset(&topic, *p, Offset::Offset(*low))?;
                next.insert(*p, *low);
            }
        }
        let mut out: Vec<Record> = Vec::new();
        if tpl.count() == 0 {
            return Ok(out);
        }
        consumer.assign(&tpl)?;
        let done = |next: &BTreeMap<i32, i64>| next.iter().all(|(p, n)| *n >= ends[p].1);
        while !done(&next) {
            if Instant::now() >= deadline {
                let behind: Vec<String> = next
                    .iter()
                    .filter(|(p, n)| **n < ends[*p].1)
                    .map(|(p, n)| format!("partition {p} at {n} of {}", ends[p].1))
                    .collect();
                bail!("consume_all({topic}): not at the end after {timeout:?} ({} read; {})", out.len(), behind.join(", "));
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(e)) => bail!("consume_all({topic}): {e}"),
                Some(Ok(m)) => {
                    let (p, o) = (m.partition(), m.offset());
                    let Some(end) = ends.get(&p).map(|e| e.1) else { continue };
                    if o < end {
                        out.push((p, o, m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec).unwrap_or_default()));
                    }
                    if let Some(n) = next.get_mut(&p) {
                        *n = (*n).max(o + 1);
                    }
                }
            }
        }
        out.sort_by_key(|r| (r.0, r.1));
        Ok(out)
    })
    .await
    .context("consume_all task panicked")?
}

/// Polls `predicate` (every 250 ms) until it returns `Ok(true)`; fails after `timeout`. An
/// `Err` from the predicate counts as "not yet" (e.g. ClickHouse briefly down in a chaos test)
/// and the last one is reported on timeout.
pub async fn wait_for<F, Fut>(mut predicate: F, timeout: Duration) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let start = Instant::now();
    let mut last_err: Option<anyhow::Error> = None;
    loop {
        match predicate().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() >= timeout {
            return Err(match last_err {
                Some(e) => e.context(format!("wait_for: condition not met after {timeout:?} (last error below)")),
                None => anyhow!("wait_for: condition not met after {timeout:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The repository root (where `deploy/local/services.sh` is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")))
}

/// Runs `deploy/local/services.sh ACTION COMPONENT` (e.g. `("stop", "clickhouse")`,
/// `("restart", "broker")`) for chaos tests; blocks until it is done (start waits for
/// readiness). Fails with the script's output if it fails.
pub fn services(action: &str, component: &str) -> Result<()> {
    let script = repo_root().join("deploy/local/services.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(action)
        .arg(component)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} {action} {component} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizes_names() {
        assert_eq!(sanitize("Agg-Exact 1"), "agg_exact_1");
        assert_eq!(sanitize(""), "test");
        assert_eq!(sanitize(&"x".repeat(100)).len(), 40);
    }
}
