//! The consume loop both services share: records in, outputs flushed, state checkpointed with
//! the offsets it covers, offsets committed — in that order (see the aggregator's crate docs
//! for why this gives effectively-once without Kafka transactions).

use std::future::Future;
use std::time::{Duration, Instant};

use metrics::{counter, histogram};
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::BorrowedMessage;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{Checkpoint, CheckpointKey, CheckpointStore};
use crate::kafka::{self, Ownership, RebalanceLog};
use crate::retry::{until_ok, Backoff};

/// A checkpoint ready to be written, and the offsets to commit once it is durable.
#[derive(Debug, Clone)]
pub struct PendingCheckpoint {
    pub key: CheckpointKey,
    pub checkpoint: Checkpoint,
    /// (topic, partition, next offset).
    pub commits: Vec<(String, i32, i64)>,
}

/// How often to flush and checkpoint.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub flush_interval: Duration,
    pub checkpoint_interval: Duration,
    /// Buffered output rows that force a flush (bounds memory while a sink is down).
    pub max_buffered_rows: usize,
    /// Histogram of checkpoint write + commit time.
    pub checkpoint_seconds: &'static str,
    /// Counter of failed attempts, labelled by `sink`.
    pub errors: &'static str,
}

/// What a service plugs into [`run`].
pub trait Partitioned {
    /// Ownership changed: drop the state of those partitions (reloaded from their checkpoint
    /// when their next record arrives, since another member may have moved them on).
    fn on_ownership(&mut self, change: &Ownership);

    /// Processes one record, buffering its outputs.
    fn handle(
        &mut self,
        msg: &BorrowedMessage<'_>,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = anyhow::Result<()>>;

    fn buffered_rows(&self) -> usize;

    /// Writes the buffered outputs; false only if shutdown interrupted the retries.
    fn flush(&mut self, shutdown: &CancellationToken) -> impl Future<Output = bool>;

    /// Checkpoints of the partitions whose state moved since their last one.
    fn checkpoints(&mut self) -> Vec<PendingCheckpoint>;

    /// The given checkpoints are durable and their offsets committed.
    fn checkpointed(&mut self, done: &[PendingCheckpoint]);

    /// Extra periodic work (idle ticks, gauges, progress lines), every ~100 ms.
    fn on_timer(&mut self) -> impl Future<Output = ()> {
        async {}
    }
}

/// Runs `svc` until `shutdown`, then flushes and checkpoints what it holds (30 s at most).
pub async fn run<S: Partitioned>(
    svc: &mut S,
    consumer: &StreamConsumer<RebalanceLog>,
    rebalances: &RebalanceLog,
    store: &CheckpointStore,
    cfg: &LoopConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut timer = tokio::time::interval(Duration::from_millis(100));
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_flush = Instant::now();
    let mut last_checkpoint = Instant::now();
    loop {
        // Biased, timer first, so that a busy partition cannot starve flushes and checkpoints.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = timer.tick() => {
                apply(svc, rebalances);
                if last_checkpoint.elapsed() >= cfg.checkpoint_interval {
                    if flush_and_checkpoint(svc, consumer, store, cfg, shutdown).await {
                        last_checkpoint = Instant::now();
                        last_flush = last_checkpoint;
                    }
                } else if last_flush.elapsed() >= cfg.flush_interval && svc.flush(shutdown).await {
                    last_flush = Instant::now();
                }
                svc.on_timer().await;
            }
            msg = consumer.recv() => {
                apply(svc, rebalances);
                match msg {
                    Ok(msg) => svc.handle(&msg, shutdown).await?,
                    Err(e) => {
                        tracing::warn!(error = %e, "consumer error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                if svc.buffered_rows() >= cfg.max_buffered_rows && svc.flush(shutdown).await {
                    last_flush = Instant::now();
                }
            }
        }
    }
    // Graceful stop: write what we hold so a successor re-reads nothing.
    let drain = CancellationToken::new();
    tokio::select! {
        _ = flush_and_checkpoint(svc, consumer, store, cfg, &drain) => {}
        _ = tokio::time::sleep(Duration::from_secs(30)) => {
            tracing::warn!("final flush did not finish in 30 s; a restart replays from the last checkpoint");
        }
    }
    Ok(())
}

fn apply<S: Partitioned>(svc: &mut S, rebalances: &RebalanceLog) {
    for change in rebalances.drain() {
        svc.on_ownership(&change);
    }
}

/// Flush, then write the checkpoints, then commit their offsets. False if anything was
/// interrupted (then nothing after the interrupted step happened).
async fn flush_and_checkpoint<S: Partitioned>(
    svc: &mut S,
    consumer: &StreamConsumer<RebalanceLog>,
    store: &CheckpointStore,
    cfg: &LoopConfig,
    shutdown: &CancellationToken,
) -> bool {
    if !svc.flush(shutdown).await {
        return false;
    }
    let started = Instant::now();
    let pending = svc.checkpoints();
    if pending.is_empty() {
        return true;
    }
    let items: Vec<(CheckpointKey, Checkpoint)> =
        pending.iter().map(|p| (p.key.clone(), p.checkpoint.clone())).collect();
    let saved = until_ok(
        "write checkpoint",
        &Backoff::default(),
        shutdown,
        |_| counter!(cfg.errors, "sink" => "checkpoint").increment(1),
        || store.save_all(&items),
    )
    .await;
    if saved.is_none() {
        return false;
    }
    let commits: Vec<(String, i32, i64)> = pending.iter().flat_map(|p| p.commits.iter().cloned()).collect();
    kafka::commit(consumer, &commits);
    svc.checkpointed(&pending);
    histogram!(cfg.checkpoint_seconds).record(started.elapsed().as_secs_f64());
    true
}

/// Loads the newest checkpoint of `key`, retrying while ClickHouse is unreachable. `None`
/// only if shutdown came first.
pub async fn load_checkpoint(
    store: &CheckpointStore,
    key: &CheckpointKey,
    errors: &'static str,
    shutdown: &CancellationToken,
) -> Option<Option<Checkpoint>> {
    until_ok(
        "load checkpoint",
        &Backoff::default(),
        shutdown,
        |_| counter!(errors, "sink" => "checkpoint").increment(1),
        || store.load(key),
    )
    .await
}

/// The connections a partitioned service needs, made the same way for every service.
pub struct ServiceIo {
    pub health: crate::http::Health,
    pub client: clickhouse::Client,
    pub producer: rdkafka::producer::FutureProducer,
    pub consumer: StreamConsumer<RebalanceLog>,
    pub rebalances: RebalanceLog,
    http_task: tokio::task::JoinHandle<()>,
}

impl ServiceIo {
    /// Serves `/healthz`, `/readyz` and `/metrics` on `http_addr`, connects to ClickHouse and
    /// Kafka, and joins `group` subscribed to `topics`.
    pub async fn connect(
        kafka_args: &crate::args::KafkaArgs,
        clickhouse_args: &crate::args::ClickHouseArgs,
        group: &str,
        topics: &[&str],
        http_addr: std::net::SocketAddr,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        use rdkafka::consumer::Consumer;
        let health = crate::http::Health::default();
        let (addr, http_task) = crate::http::serve(http_addr, health.clone(), shutdown.clone()).await?;
        tracing::info!(%addr, "serving /healthz, /readyz, /metrics");
        let rebalances = RebalanceLog::default();
        let consumer: StreamConsumer<RebalanceLog> =
            kafka::consumer_config(kafka_args, group)?.create_with_context(rebalances.clone())?;
        consumer.subscribe(topics)?;
        Ok(Self {
            health,
            client: crate::clickhouse::client(clickhouse_args),
            producer: kafka::producer_config(kafka_args)?.create()?,
            consumer,
            rebalances,
            http_task,
        })
    }

    /// Runs the loop until `shutdown`, then leaves the group promptly (so a successor gets
    /// the partitions without waiting for a session timeout) and stops the HTTP server.
    pub async fn serve<S: Partitioned>(self, svc: &mut S, cfg: &LoopConfig, shutdown: &CancellationToken) -> anyhow::Result<()> {
        use rdkafka::consumer::Consumer;
        let store = CheckpointStore::new(self.client.clone());
        self.health.set_ready(true);
        let result = run(svc, &self.consumer, &self.rebalances, &store, cfg, shutdown).await;
        self.consumer.unsubscribe();
        shutdown.cancel();
        let _ = self.http_task.await;
        result
    }
}
