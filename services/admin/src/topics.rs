//! Creating meterflow's topics.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use meterflow_runtime::args::{KafkaArgs, TopicArgs};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::types::RDKafkaErrorCode;

/// Partition counts of the topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args)]
pub struct Partitions {
    /// Partitions of the usage-events, aggregates, charges and wallet-adjustments topics.
    /// Aggregates and wallet adjustments always get the same count: the rater reads them
    /// co-partitioned (partition p of both by one instance).
    #[arg(long = "partitions", env = "METERFLOW_PARTITIONS", default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub data: i32,
    /// Partitions of the dead-letters topic [default: --partitions].
    #[arg(long = "dead-letter-partitions", env = "METERFLOW_DEAD_LETTER_PARTITIONS", value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub dead_letters: Option<i32>,
    /// Partitions of the alerts topic [default: --partitions].
    #[arg(long = "alert-partitions", env = "METERFLOW_ALERT_PARTITIONS", value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub alerts: Option<i32>,
}

impl Partitions {
    /// `n` partitions for every topic.
    pub fn uniform(n: i32) -> Self {
        Self { data: n, dead_letters: None, alerts: None }
    }

    /// `(topic, partitions)` for each topic.
    pub fn plan(&self, topics: &TopicArgs) -> Vec<(String, i32)> {
        vec![
            (topics.usage_topic.clone(), self.data),
            (topics.aggregates_topic.clone(), self.data),
            (topics.dead_letter_topic.clone(), self.dead_letters.unwrap_or(self.data)),
            (topics.charges_topic.clone(), self.data),
            (topics.wallet_topic.clone(), self.data),
            (topics.alerts_topic.clone(), self.alerts.unwrap_or(self.data)),
            (topics.provisional_topic.clone(), self.data),
            (topics.balances_topic.clone(), self.data),
        ]
    }
}

impl Default for Partitions {
    fn default() -> Self {
        Self::uniform(4)
    }
}

impl From<i32> for Partitions {
    fn from(n: i32) -> Self {
        Self::uniform(n)
    }
}

/// What `create_topics` found or did for one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicReport {
    pub name: String,
    /// Partitions the topic has now.
    pub partitions: i32,
    /// Partitions asked for; differs from `partitions` for a topic that existed before.
    pub requested: i32,
    /// Created by this call (false: it existed).
    pub created: bool,
}

const TIMEOUT: Duration = Duration::from_secs(30);

fn validate_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 249
        || name == "."
        || name == ".."
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        bail!("invalid topic name {name:?}: use 1-249 of [a-zA-Z0-9._-]");
    }
    Ok(())
}

fn kafka_hint(kafka: &KafkaArgs) -> String {
    format!(
        "is the broker at {} running? `make up` starts a local one; `make status` shows it",
        kafka.brokers
    )
}

/// Partition counts of every topic on the broker.
pub async fn list_topics(kafka: &KafkaArgs) -> Result<BTreeMap<String, i32>> {
    let mut cfg = meterflow_runtime::kafka::base_config(kafka)?;
    cfg.set("socket.timeout.ms", "10000");
    let hint = kafka_hint(kafka);
    tokio::task::spawn_blocking(move || -> Result<BTreeMap<String, i32>> {
        let consumer: BaseConsumer = cfg.create().context("creating a Kafka client")?;
        let md = consumer.fetch_metadata(None, Duration::from_secs(10)).with_context(|| hint.clone())?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| (t.name().to_string(), i32::try_from(t.partitions().len()).unwrap_or(i32::MAX)))
            .collect())
    })
    .await
    .context("metadata task panicked")?
}

/// Creates the topics of `topics` with `partitions` (see [`Partitions`]). Topics that exist
/// already are left as they are (a different partition count is reported, not changed), so
/// calling it again is harmless. Waits until the broker's metadata shows every topic. Fails if
/// the aggregates and wallet-adjustments topics end up with different partition counts.
pub async fn create_topics(
    kafka: &KafkaArgs,
    topics: &TopicArgs,
    partitions: impl Into<Partitions>,
) -> Result<Vec<TopicReport>> {
    let plan = partitions.into().plan(topics);
    for (name, _) in &plan {
        validate_name(name)?;
    }
    let existing = list_topics(kafka).await?;
    let missing: Vec<&(String, i32)> = plan.iter().filter(|(n, _)| !existing.contains_key(n)).collect();

    let mut created = std::collections::BTreeSet::new();
    if !missing.is_empty() {
        let admin: AdminClient<DefaultClientContext> =
            meterflow_runtime::kafka::base_config(kafka)?.create().context("creating a Kafka admin client")?;
        // The usage topic is stamped by the broker's clock (LogAppendTime): event times are
        // bounded by the record time, which a producer then cannot move (docs/operations.md).
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|(n, p)| {
                let t = NewTopic::new(n, *p, TopicReplication::Fixed(1));
                if *n == topics.usage_topic {
                    t.set("message.timestamp.type", "LogAppendTime")
                } else if *n == topics.balances_topic {
                    // The newest balance per tenant is all a reader needs.
                    t.set("cleanup.policy", "compact")
                } else {
                    t
                }
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT)).request_timeout(Some(TIMEOUT));
        let results = admin.create_topics(&new, &opts).await.with_context(|| kafka_hint(kafka))?;
        for r in results {
            match r {
                Ok(name) => {
                    created.insert(name);
                }
                // Created concurrently by somebody else: fine.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => bail!("creating topic {name}: {code}"),
            }
        }
    }

    // Wait until the metadata shows them all (a producer started right after must find them).
    let deadline = Instant::now() + TIMEOUT;
    let now = loop {
        let now = list_topics(kafka).await?;
        if plan.iter().all(|(n, _)| now.get(n).is_some_and(|p| *p > 0)) {
            break now;
        }
        if Instant::now() > deadline {
            let absent: Vec<&str> = plan.iter().filter(|(n, _)| !now.contains_key(n)).map(|(n, _)| n.as_str()).collect();
            bail!("topics not visible in the broker's metadata after {TIMEOUT:?}: {absent:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let reports: Vec<TopicReport> = plan
        .iter()
        .map(|(n, p)| TopicReport { name: n.clone(), partitions: now[n], requested: *p, created: created.contains(n) })
        .collect();
    let agg = now[&topics.aggregates_topic];
    let wallet = now[&topics.wallet_topic];
    if agg != wallet {
        bail!(
            "topic {} has {agg} partitions but {} has {wallet}: the rater needs them co-partitioned (same count)",
            topics.aggregates_topic,
            topics.wallet_topic
        );
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_keeps_aggregates_and_wallet_equal() {
        let t = TopicArgs::with_prefix("x.");
        let p = Partitions { data: 8, dead_letters: Some(1), alerts: Some(2) }.plan(&t);
        let get = |n: &str| p.iter().find(|(t, _)| t == n).unwrap().1;
        assert_eq!(get("x.aggregates"), get("x.wallet-adjustments"));
        assert_eq!(get("x.usage-events"), 8);
        assert_eq!(get("x.dead-letters"), 1);
        assert_eq!(get("x.alerts"), 2);
        assert_eq!(Partitions::from(3).plan(&t).iter().map(|x| x.1).collect::<Vec<_>>(), vec![3; 8]);
    }

    #[test]
    fn names() {
        assert!(validate_name("t.a-b_c.usage-events").is_ok());
        assert!(validate_name("bad name").is_err());
        assert!(validate_name("").is_err());
    }
}
