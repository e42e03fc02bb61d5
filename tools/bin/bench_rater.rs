//! The rater phase of `meterflow-bench`: the rater alone on the aggregates the end-to-end run
//! wrote (a pre-filled aggregates topic), from its first to its last aggregate.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use meterflow_runtime::args::{ClickHouseArgs, KafkaArgs, TopicArgs};
use rdkafka::consumer::{BaseConsumer, Consumer as _};

use meterflow_testkit::http::{free_port, get_ok, metric_sum};
use meterflow_testkit::procs::ServiceProc;

use crate::harness::{cpu_secs, log_dir, rater_env};
use crate::{fmt_rate, Report};

/// Runs a rater over every aggregate in `topics.aggregates_topic` and reports aggregates/s.
pub async fn rater(kafka: &KafkaArgs, topics: &TopicArgs, ch: &ClickHouseArgs, report: &mut Report) -> Result<()> {
    let total = topic_records(kafka, &topics.aggregates_topic).await?;
    anyhow::ensure!(total > 0, "the end-to-end run wrote no aggregates");
    let http = format!("127.0.0.1:{}", free_port()?);
    let log = log_dir("bench")?.join(format!("rater-{}.log", ch.database));
    let mut rater = ServiceProc::new("meterflow-rater", rater_env(kafka, topics, ch, "bench-rater", &http, &[]), log)?;
    rater.start()?;
    let started = Instant::now();
    let (mut first, mut cpu_first) = (None, 0.0);
    let deadline = started + Duration::from_secs(600);
    let (secs, cpu) = loop {
        rater.check_alive()?;
        anyhow::ensure!(Instant::now() < deadline, "the rater did not read {total} aggregates in 10 minutes");
        let text = get_ok(&format!("http://{http}/metrics")).await.unwrap_or_default();
        let read = metric_sum(&text, "meterflow_rater_aggregates_in_total");
        let cpu = rater.pid().and_then(cpu_secs).unwrap_or(0.0);
        if first.is_none() && read > 0.0 {
            first = Some(Instant::now());
            cpu_first = cpu;
        }
        if read >= total as f64 {
            let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
            break (secs, cpu - cpu_first);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    rater.stop()?;
    let rate = total as f64 / secs.max(1e-3);
    report.row(
        "rater",
        "rater alone: aggregates rated per second, first to last (rating, wallets, charges to ClickHouse + Kafka, checkpoints)",
        format!("{} agg/s", fmt_rate(rate)),
        format!(
            "{total} aggregates (windows and restatements of the end-to-end run) in {secs:.2} s (polled every 50 ms); CPU {:.1} µs per aggregate; outputs written by a task beside the consume loop",
            cpu / total as f64 * 1e6
        ),
    );
    Ok(())
}

/// Records in `topic` (sum of the partitions' high minus low watermarks).
async fn topic_records(kafka: &KafkaArgs, topic: &str) -> Result<u64> {
    let (kafka, topic) = (kafka.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || -> Result<u64> {
        let consumer: BaseConsumer = meterflow_runtime::kafka::base_config(&kafka)?.create()?;
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let parts = md.topics().first().context("no topic metadata")?.partitions().len() as i32;
        let mut n = 0;
        for p in 0..parts {
            let (low, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
            n += (high - low).max(0) as u64;
        }
        Ok(n)
    })
    .await?
}
