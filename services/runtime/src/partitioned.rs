//! The consume loop both services share: records in, outputs flushed, state checkpointed with
//! the offsets it covers, offsets committed — in that order (see the aggregator's crate docs
//! and `docs/operations.md` for why this gives effectively-once without Kafka transactions).
//!
//! The loop owns the protocol around a service's per-partition state:
//! * **Assignment**: the state of every assigned partition is restored from its newest
//!   checkpoint at once (so quiet partitions still tick and close windows), checked against
//!   the committed offsets, the topic's offsets and partition count and the service's outputs
//!   (a disagreement stops the service with an error naming the partition and offsets; an
//!   operator decides with `meterflow-admin checkpoint`), claimed in a new epoch, and the
//!   consumer is sought to the checkpoint's offsets.
//! * **Contiguity**: a partition's records are handed to the service only in offset order
//!   from the checkpoint's position; anything else (records fetched before the seek) is dropped.
//! * **Fencing**: before checkpoints are written, the newest stored versions are re-read; a
//!   partition someone else has claimed since is given up instead of checkpointed.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use metrics::{counter, histogram};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{config_hash, epoch_of, version_in, Checkpoint, CheckpointKey, CheckpointStore, Envelope, Meta};
use crate::kafka::{self, Ownership, RebalanceLog};
use crate::retry::{until_ok, Backoff};

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
    /// Counter of partitions given up because another instance claimed them (fencing).
    pub fenced: &'static str,
}

/// What a service plugs into [`run`]. Partition N of every input topic belongs to state N.
pub trait Partitioned {
    /// `service` part of the checkpoint key.
    fn service(&self) -> &'static str;
    /// Consumer group (part of the checkpoint key).
    fn group(&self) -> &str;
    /// Input topics; the first one names the checkpoint key.
    fn topics(&self) -> Vec<String>;
    /// The configuration the state of `partition` is computed with (meters or catalog text,
    /// plus settings), recorded in every checkpoint with its hash. A partition restored from a
    /// checkpoint with another configuration keeps the old one until it has re-derived what
    /// was already output, then switches (and asks for a checkpoint, see
    /// [`Partitioned::wants_checkpoint`]).
    fn config_text(&self, partition: i32) -> String;

    /// True when a checkpoint must be written before the next record is processed (a
    /// configuration switch just happened).
    fn wants_checkpoint(&self) -> bool {
        false
    }

    /// Creates the state of `partition` from its newest checkpoint (`None`: fresh). An
    /// operator's decision in the envelope's meta means fresh state at the meta's offsets.
    /// `partition_counts` are the input topics' current partition counts.
    fn restore(
        &mut self,
        partition: i32,
        from: Option<&Envelope>,
        partition_counts: &BTreeMap<String, i32>,
    ) -> anyhow::Result<()>;

    /// Service-specific check of a just restored state against the service's outputs (for
    /// example: no outputs without a checkpoint, no checkpoint ahead of its outputs).
    fn verify(&mut self, partition: i32, from: Option<&Envelope>) -> impl Future<Output = anyhow::Result<()>>;

    /// The next offset of `topic` the state of `partition` expects; `None` if not held.
    fn position(&self, topic: &str, partition: i32) -> Option<i64>;

    /// Drops the state of `partition` (revoked, or fenced by another instance).
    fn release(&mut self, partition: i32);

    /// The state of `partition` as checkpoint bytes.
    fn snapshot(&mut self, partition: i32) -> anyhow::Result<Vec<u8>>;

    /// Processes one record (always the next expected offset of its partition).
    fn handle(
        &mut self,
        msg: &BorrowedMessage<'_>,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = anyhow::Result<()>>;

    fn buffered_rows(&self) -> usize;

    /// Writes the buffered outputs; false only if shutdown interrupted the retries.
    fn flush(&mut self, shutdown: &CancellationToken) -> impl Future<Output = bool>;

    /// Extra periodic work (idle ticks, gauges, progress lines), every ~100 ms.
    fn on_timer(&mut self) -> impl Future<Output = ()> {
        async {}
    }
}

/// The loop's record of one held partition.
#[derive(Debug)]
struct Held {
    /// Version of the last checkpoint this instance wrote (its claim, then each checkpoint).
    version: u64,
    /// Positions the last checkpoint covers, per topic.
    checkpointed: BTreeMap<String, i64>,
    /// Partition counts when claimed (recorded in each checkpoint).
    partition_counts: BTreeMap<String, i32>,
    /// Hash of the configuration the last checkpoint recorded.
    config_hash: String,
    /// A record beyond the expected offset arrived: (expected offset, seeks issued, last seek).
    gap: Option<(i64, u32, Instant)>,
}

/// A checkpoint ready to be written, and the offsets to commit once it is durable.
#[derive(Debug, Clone)]
struct Pending {
    partition: i32,
    key: CheckpointKey,
    checkpoint: Checkpoint,
    offsets: BTreeMap<String, i64>,
    config_hash: String,
}

/// The protocol state around a service (see the module docs).
struct Driver<'a> {
    consumer: &'a StreamConsumer<RebalanceLog>,
    rebalances: &'a RebalanceLog,
    store: &'a CheckpointStore,
    cfg: &'a LoopConfig,
    held: BTreeMap<i32, Held>,
    /// Partitions given up after a fencing check, and when: ignored until assigned again, or
    /// re-taken after [`FENCED_RETAKE`] if the consumer still has them (so that a partition
    /// whose new owner died at once does not stall).
    fenced: BTreeMap<i32, Instant>,
}

const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
const FENCED_RETAKE: Duration = Duration::from_secs(30);

/// Runs `svc` until `shutdown`, then flushes and checkpoints what it holds (30 s at most).
pub async fn run<S: Partitioned>(
    svc: &mut S,
    consumer: &StreamConsumer<RebalanceLog>,
    rebalances: &RebalanceLog,
    store: &CheckpointStore,
    cfg: &LoopConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut d = Driver { consumer, rebalances, store, cfg, held: BTreeMap::new(), fenced: BTreeMap::new() };
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
                d.apply(svc, shutdown).await?;
                if last_checkpoint.elapsed() >= cfg.checkpoint_interval {
                    if d.flush_and_checkpoint(svc, shutdown).await {
                        last_checkpoint = Instant::now();
                        last_flush = last_checkpoint;
                    }
                } else if last_flush.elapsed() >= cfg.flush_interval && svc.flush(shutdown).await {
                    last_flush = Instant::now();
                }
                svc.on_timer().await;
            }
            msg = consumer.recv() => {
                d.apply(svc, shutdown).await?;
                match msg {
                    Ok(msg) => {
                        d.dispatch(svc, &msg, shutdown).await?;
                        if svc.wants_checkpoint() && d.flush_and_checkpoint(svc, shutdown).await {
                            last_checkpoint = Instant::now();
                            last_flush = last_checkpoint;
                        }
                    }
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
        _ = d.flush_and_checkpoint(svc, &drain) => {}
        _ = tokio::time::sleep(Duration::from_secs(30)) => {
            tracing::warn!("final flush did not finish in 30 s; a restart replays from the last checkpoint");
        }
    }
    Ok(())
}

impl Driver<'_> {
    fn key<S: Partitioned>(svc: &S, partition: i32) -> CheckpointKey {
        CheckpointKey {
            service: svc.service().to_owned(),
            consumer_group: svc.group().to_owned(),
            topic: svc.topics().into_iter().next().unwrap_or_default(),
            partition,
        }
    }

    /// Applies ownership changes: releases revoked partitions, restores and claims assigned ones.
    async fn apply<S: Partitioned>(&mut self, svc: &mut S, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let due: Vec<i32> =
            self.fenced.iter().filter(|(_, at)| at.elapsed() >= FENCED_RETAKE).map(|(p, _)| *p).collect();
        if !due.is_empty() {
            let assigned: BTreeSet<i32> = self
                .consumer
                .assignment()
                .map(|tpl| tpl.elements().iter().map(|e| e.partition()).collect())
                .unwrap_or_default();
            for p in due {
                self.fenced.remove(&p);
                if assigned.contains(&p) && !self.held.contains_key(&p) {
                    tracing::warn!(partition = p, "still assigned {FENCED_RETAKE:?} after being fenced: taking it again");
                    if !self.take(svc, p, shutdown).await? {
                        return Ok(());
                    }
                }
            }
        }
        for change in self.rebalances.drain() {
            match change {
                Ownership::Revoked(list) => {
                    let parts: BTreeSet<i32> = list.iter().map(|(_, p)| *p).collect();
                    for p in parts {
                        if self.held.remove(&p).is_some() {
                            svc.release(p);
                        }
                    }
                }
                Ownership::Assigned(list) => {
                    let parts: BTreeSet<i32> = list.iter().map(|(_, p)| *p).collect();
                    for p in parts {
                        self.fenced.remove(&p);
                        if self.held.contains_key(&p) {
                            continue;
                        }
                        if !self.take(svc, p, shutdown).await? {
                            return Ok(()); // shutdown
                        }
                    }
                    // Partitions were paused when assigned (kafka::RebalanceLog) so that nothing
                    // is fetched from a committed offset the checkpoint may disagree with.
                    let mut tpl = TopicPartitionList::new();
                    for (t, p) in &list {
                        tpl.add_partition(t, *p);
                    }
                    if let Err(e) = self.consumer.resume(&tpl) {
                        tracing::warn!(error = %e, "resuming assigned partitions failed");
                    }
                }
            }
        }
        Ok(())
    }

    /// Restores, checks and claims one assigned partition, then seeks to its checkpoint.
    /// Ok(false): shutdown came first.
    async fn take<S: Partitioned>(&mut self, svc: &mut S, p: i32, shutdown: &CancellationToken) -> anyhow::Result<bool> {
        let key = Self::key(svc, p);
        let topics = svc.topics();
        let errors = self.cfg.errors;
        let Some(loaded) = until_ok(
            "load checkpoint",
            &Backoff::default(),
            shutdown,
            |_| counter!(errors, "sink" => "checkpoint").increment(1),
            || self.store.load(&key),
        )
        .await
        else {
            return Ok(false);
        };
        let envelope = match &loaded {
            Some(cp) => Some(
                Envelope::decode(&cp.state)
                    .with_context(|| format!("checkpoint of {} partition {p} (version {})", key.topic, cp.version))?,
            ),
            None => None,
        };
        let operator = envelope.as_ref().and_then(|e| e.meta.operator.as_ref());
        // Broker errors (a restart, an election) are retried; only a real disagreement refuses.
        let mut backoff = Backoff::default().min;
        let counts = loop {
            let checked = (|| -> anyhow::Result<BTreeMap<String, i32>> {
                let mut counts = BTreeMap::new();
                for t in &topics {
                    counts.insert(t.clone(), partition_count(self.consumer, t)?);
                }
                if operator.is_none() {
                    self.check_offsets(&key, &topics, &counts, loaded.as_ref(), envelope.as_ref())?;
                }
                Ok(counts)
            })();
            match checked {
                Ok(counts) => break counts,
                Err(e) if e.chain().any(|c| c.is::<rdkafka::error::KafkaError>()) => {
                    counter!(errors, "sink" => "kafka").increment(1);
                    tracing::warn!(error = %format!("{e:#}"), partition = p, "reading the topic's offsets failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return Ok(false),
                    }
                    backoff = (backoff * 2).min(Backoff::default().max);
                }
                Err(e) => return Err(e),
            }
        };
        svc.restore(p, envelope.as_ref(), &counts)
            .with_context(|| format!("restoring {} state of {} partition {p}", key.service, key.topic))?;
        if operator.is_none() {
            // ClickHouse errors (an outage) are retried; only a real disagreement refuses.
            let mut backoff = Backoff::default().min;
            let verified = loop {
                match svc.verify(p, envelope.as_ref()).await {
                    Err(e) if e.chain().any(|c| c.is::<::clickhouse::error::Error>()) => {
                        counter!(errors, "sink" => "checkpoint").increment(1);
                        tracing::warn!(error = %format!("{e:#}"), partition = p, "checking outputs failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.cancelled() => {
                                svc.release(p);
                                return Ok(false);
                            }
                        }
                        backoff = (backoff * 2).min(Backoff::default().max);
                    }
                    other => break other,
                }
            };
            if let Err(e) = verified {
                svc.release(p);
                return Err(e.context(format!(
                    "{} partition {p}: checkpoint and outputs disagree; refusing to start. \
                     Decide with `meterflow-admin checkpoint replay|reset --service {} --group {} --partition {p}` \
                     (see docs/operations.md)",
                    key.topic, key.service, key.consumer_group
                )));
            }
        } else if let Some(op) = operator {
            tracing::warn!(partition = p, action = %op.action, note = %op.note, "following an operator's checkpoint decision");
        }
        // Claim: a checkpoint in a new epoch, above every stored one.
        let stored = until_ok(
            "read checkpoint versions",
            &Backoff::default(),
            shutdown,
            |_| counter!(errors, "sink" => "checkpoint").increment(1),
            || self.store.max_versions(&key.service, &key.consumer_group, &key.topic),
        )
        .await;
        let Some(stored) = stored else { return Ok(false) };
        let top = stored.get(&p).copied().unwrap_or(0).max(loaded.as_ref().map_or(0, |c| c.version));
        let version = version_in(epoch_of(top) + 1, 0);
        let positions: BTreeMap<String, i64> =
            topics.iter().map(|t| (t.clone(), svc.position(t, p).unwrap_or(0))).collect();
        let state = svc.snapshot(p)?;
        let claim = self.pending(svc, p, version, &positions, &counts, state);
        let items = [(claim.key.clone(), claim.checkpoint.clone())];
        let saved = until_ok(
            "write claim checkpoint",
            &Backoff::default(),
            shutdown,
            |_| counter!(errors, "sink" => "checkpoint").increment(1),
            || self.store.save_all(&items),
        )
        .await;
        if saved.is_none() {
            return Ok(false);
        }
        tracing::info!(
            partition = p,
            epoch = epoch_of(version),
            offsets = ?positions,
            restored = loaded.is_some(),
            "partition claimed"
        );
        for (t, o) in &positions {
            seek(self.consumer, t, p, *o);
        }
        let hash = config_hash(&svc.config_text(p));
        self.held.insert(p, Held { version, checkpointed: positions, partition_counts: counts, config_hash: hash, gap: None });
        Ok(true)
    }

    /// The checks every service shares: the checkpoint against the group's committed offsets,
    /// the topic's offsets and its partition count.
    fn check_offsets(
        &self,
        key: &CheckpointKey,
        topics: &[String],
        counts: &BTreeMap<String, i32>,
        loaded: Option<&Checkpoint>,
        envelope: Option<&Envelope>,
    ) -> anyhow::Result<()> {
        let p = key.partition;
        let hint = "refusing to start; decide with `meterflow-admin checkpoint` (see docs/operations.md)";
        for t in topics {
            let committed = committed_offset(self.consumer, t, p)?;
            let (low, high) = self
                .consumer
                .fetch_watermarks(t, p, KAFKA_TIMEOUT)
                .with_context(|| format!("fetching the offsets of {t} partition {p}"))?;
            match (loaded, envelope) {
                (Some(cp), Some(env)) => {
                    let at = env.meta.offsets.get(t).copied().or((t == &key.topic).then_some(cp.next_offset)).unwrap_or(0);
                    if let Some(c) = committed {
                        anyhow::ensure!(
                            c <= at,
                            "{t} partition {p}: the consumer group committed offset {c}, but the newest checkpoint \
                             (version {}) only covers up to {at}: the checkpoint is older than what was already \
                             processed (a restored or truncated checkpoints table?); {hint}",
                            cp.version
                        );
                    }
                    anyhow::ensure!(
                        at <= high,
                        "{t} partition {p}: the checkpoint covers up to offset {at}, but the topic ends at {high}: \
                         the topic was recreated or truncated; {hint}"
                    );
                    if let (Some(&was), Some(&now)) = (env.meta.partition_counts.get(t), counts.get(t)) {
                        anyhow::ensure!(
                            was == now,
                            "{t} has {now} partitions, but partition {p}'s checkpoint was written with {was}: tenants \
                             have moved between partitions; a partition-count change is an explicit operation \
                             (docs/operations.md, \"Changing the partition count\"); {hint}"
                        );
                    }
                }
                _ => {
                    if let Some(c) = committed {
                        anyhow::ensure!(
                            c <= low,
                            "{t} partition {p}: no checkpoint, but the consumer group {} committed offset {c}: state \
                             for offsets before it is missing (a new database with an old consumer group, or a \
                             truncated checkpoints table); {hint}",
                            key.consumer_group
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn pending<S: Partitioned>(
        &self,
        svc: &S,
        p: i32,
        version: u64,
        positions: &BTreeMap<String, i64>,
        counts: &BTreeMap<String, i32>,
        state: Vec<u8>,
    ) -> Pending {
        let key = Self::key(svc, p);
        let config_text = svc.config_text(p);
        let env = Envelope {
            meta: Meta {
                offsets: positions.clone(),
                partition_counts: counts.clone(),
                config_hash: config_hash(&config_text),
                config_text,
                operator: None,
            },
            state,
        };
        let next_offset = positions.get(&key.topic).copied().unwrap_or(0);
        Pending {
            partition: p,
            key,
            config_hash: env.meta.config_hash.clone(),
            checkpoint: Checkpoint { version, next_offset, state: env.encode() },
            offsets: positions.clone(),
        }
    }

    /// Hands `msg` to the service if it is the next record of a held partition.
    async fn dispatch<S: Partitioned>(
        &mut self,
        svc: &mut S,
        msg: &BorrowedMessage<'_>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let (topic, p, offset) = (msg.topic(), msg.partition(), msg.offset());
        let Some(held) = self.held.get_mut(&p) else {
            return Ok(()); // not ours (revoked or fenced)
        };
        let Some(expected) = svc.position(topic, p) else {
            return Ok(());
        };
        if offset < expected {
            return Ok(()); // covered by the state already
        }
        if offset > expected {
            // Fetched before the seek took effect, or a real hole in the log.
            let now = Instant::now();
            let (seeks, last) = match held.gap {
                Some((at, n, last)) if at == expected => (n, last),
                _ => (0, now - Duration::from_secs(10)),
            };
            if now.duration_since(last) < Duration::from_millis(500) {
                return Ok(());
            }
            if seeks >= 3 {
                let low = match tokio::task::block_in_place(|| self.consumer.fetch_watermarks(topic, p, KAFKA_TIMEOUT)) {
                    Ok((low, _)) => low,
                    Err(e) => {
                        tracing::warn!(error = %e, topic, partition = p, "reading the log start failed; retrying");
                        return Ok(());
                    }
                };
                anyhow::ensure!(
                    low <= expected,
                    "{topic} partition {p}: offsets {expected}..{low} were deleted (retention?) before they were \
                     processed; refusing to skip them silently (see docs/operations.md)"
                );
                tracing::warn!(topic, partition = p, expected, offset, "offset gap in the log; continuing after it");
                held.gap = None;
                return svc.handle(msg, shutdown).await;
            }
            tracing::debug!(topic, partition = p, expected, offset, "record ahead of the state's position; seeking back");
            seek(self.consumer, topic, p, expected);
            held.gap = Some((expected, seeks + 1, now));
            return Ok(());
        }
        held.gap = None;
        svc.handle(msg, shutdown).await
    }

    /// Flush, then the fencing check, then the checkpoints, then commit their offsets. False
    /// if anything was interrupted (then nothing after the interrupted step happened).
    async fn flush_and_checkpoint<S: Partitioned>(&mut self, svc: &mut S, shutdown: &CancellationToken) -> bool {
        if !svc.flush(shutdown).await {
            return false;
        }
        let started = Instant::now();
        let topics = svc.topics();
        let mut moved = Vec::new();
        for (&p, h) in &self.held {
            let positions: BTreeMap<String, i64> =
                topics.iter().map(|t| (t.clone(), svc.position(t, p).unwrap_or(0))).collect();
            if positions != h.checkpointed || config_hash(&svc.config_text(p)) != h.config_hash {
                moved.push((p, positions));
            }
        }
        if moved.is_empty() {
            return true;
        }
        let errors = self.cfg.errors;
        let key0 = Self::key(svc, 0);
        let Some(stored) = until_ok(
            "read checkpoint versions",
            &Backoff::default(),
            shutdown,
            |_| counter!(errors, "sink" => "checkpoint").increment(1),
            || self.store.max_versions(&key0.service, &key0.consumer_group, &key0.topic),
        )
        .await
        else {
            return false;
        };
        let mut pending = Vec::new();
        for (p, positions) in moved {
            let Some(h) = self.held.get(&p) else { continue };
            if let Some(&v) = stored.get(&p).filter(|&&v| v > h.version) {
                tracing::error!(
                    partition = p,
                    ours = h.version,
                    stored = v,
                    "another instance claimed this partition (epoch {} > {}): giving it up without checkpointing",
                    epoch_of(v),
                    epoch_of(h.version)
                );
                counter!(self.cfg.fenced).increment(1);
                self.held.remove(&p);
                self.fenced.insert(p, Instant::now());
                svc.release(p);
                continue;
            }
            let state = match svc.snapshot(p) {
                Ok(s) => s,
                Err(e) => {
                    // Skipping would silently grow the replay: say it loudly.
                    tracing::error!(error = %e, partition = p, "cannot snapshot state; not checkpointing it");
                    counter!(errors, "sink" => "checkpoint").increment(1);
                    continue;
                }
            };
            let counts = h.partition_counts.clone();
            pending.push(self.pending(svc, p, h.version + 1, &positions, &counts, state));
        }
        if pending.is_empty() {
            return true;
        }
        let items: Vec<(CheckpointKey, Checkpoint)> =
            pending.iter().map(|p| (p.key.clone(), p.checkpoint.clone())).collect();
        let saved = until_ok(
            "write checkpoint",
            &Backoff::default(),
            shutdown,
            |_| counter!(errors, "sink" => "checkpoint").increment(1),
            || self.store.save_all(&items),
        )
        .await;
        if saved.is_none() {
            return false;
        }
        let commits: Vec<(String, i32, i64)> = pending
            .iter()
            .flat_map(|p| p.offsets.iter().map(move |(t, o)| (t.clone(), p.partition, *o)))
            .collect();
        kafka::commit(self.consumer, &commits);
        for done in pending {
            if let Some(h) = self.held.get_mut(&done.partition) {
                h.version = done.checkpoint.version;
                h.checkpointed = done.offsets;
                h.config_hash = done.config_hash;
            }
        }
        histogram!(self.cfg.checkpoint_seconds).record(started.elapsed().as_secs_f64());
        true
    }
}

/// Number of partitions of `topic`, from the broker's metadata.
fn partition_count(consumer: &StreamConsumer<RebalanceLog>, topic: &str) -> anyhow::Result<i32> {
    let md = tokio::task::block_in_place(|| consumer.fetch_metadata(Some(topic), KAFKA_TIMEOUT))
        .with_context(|| format!("fetching metadata of {topic}"))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .with_context(|| format!("topic {topic} is not in the broker's metadata"))?;
    Ok(t.partitions().len() as i32)
}

/// The group's committed offset of `topic`/`p`, if any.
fn committed_offset(consumer: &StreamConsumer<RebalanceLog>, topic: &str, p: i32) -> anyhow::Result<Option<i64>> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, p);
    let got = tokio::task::block_in_place(|| consumer.committed_offsets(tpl, KAFKA_TIMEOUT))
        .with_context(|| format!("fetching the committed offset of {topic} partition {p}"))?;
    Ok(got.elements().first().and_then(|e| match e.offset() {
        Offset::Offset(o) if o >= 0 => Some(o),
        _ => None,
    }))
}

/// Seeks `topic`/`p` to `offset`, retrying while librdkafka has not started the partition yet.
/// Bounded (at most ~2 s, it runs on the loop's thread): if it fails, the contiguity check in
/// `dispatch` seeks again when a record arrives at the wrong offset.
fn seek(consumer: &StreamConsumer<RebalanceLog>, topic: &str, p: i32, offset: i64) {
    for attempt in 0..5 {
        match tokio::task::block_in_place(|| consumer.seek(topic, p, Offset::Offset(offset), Duration::from_millis(300))) {
            Ok(()) => return,
            Err(e) => {
                if attempt == 4 {
                    // The contiguity check in `dispatch` still protects the state; it seeks again.
                    tracing::warn!(error = %e, topic, partition = p, offset, "seek failed");
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
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
        let store = CheckpointStore::new(self.client.clone());
        self.health.set_ready(true);
        let result = run(svc, &self.consumer, &self.rebalances, &store, cfg, shutdown).await;
        self.consumer.unsubscribe();
        shutdown.cancel();
        let _ = self.http_task.await;
        result
    }
}
