//! Taking a partition over: restore its newest checkpoint, check it against the group's
//! offsets, the topic and the service's outputs, claim it in a new epoch and seek the consumer
//! to it (see the module docs of [`crate::partitioned`] and `docs/operations.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context as _;
use metrics::counter;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::chain::{contiguous, ChainState, StoredDelta};
use crate::checkpoint::{config_hash, epoch_of, version_in, Checkpoint, CheckpointKey, Envelope, Meta};
use crate::kafka::{Ownership, RebalanceLog};
use crate::partitioned::{Driver, Held, Partitioned, FENCED_RETAKE, KAFKA_TIMEOUT};
use crate::retry::{until_ok, Backoff};

impl Driver<'_> {
    pub(crate) fn key<S: Partitioned>(svc: &S, partition: i32) -> CheckpointKey {
        CheckpointKey {
            service: svc.service().to_owned(),
            consumer_group: svc.group().to_owned(),
            topic: svc.topics().into_iter().next().unwrap_or_default(),
            partition,
        }
    }

    /// Applies ownership changes: releases revoked partitions, restores and claims assigned ones.
    /// The batch in flight settles first, so that its checkpoints and commits never race a
    /// release or a claim of the same partition.
    pub(crate) async fn apply<S: Partitioned>(&mut self, svc: &mut S, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let due: Vec<i32> =
            self.fenced.iter().filter(|(_, at)| at.elapsed() >= FENCED_RETAKE).map(|(p, _)| *p).collect();
        if (!due.is_empty() || self.rebalances.pending()) && !self.settle_inflight(svc, shutdown).await {
            return Ok(()); // shutdown
        }
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
    pub(crate) async fn take<S: Partitioned>(&mut self, svc: &mut S, p: i32, shutdown: &CancellationToken) -> anyhow::Result<bool> {
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
        let deltas = match (&loaded, &envelope) {
            (Some(cp), Some(env)) if env.meta.operator.is_none() => {
                let Some(rows) = until_ok(
                    "load checkpoint deltas",
                    &Backoff::default(),
                    shutdown,
                    |_| counter!(errors, "sink" => "checkpoint").increment(1),
                    || self.store.load_deltas(&key, cp.version),
                )
                .await
                else {
                    return Ok(false);
                };
                contiguous(cp.version, rows).with_context(|| format!("{} partition {p}: refusing to start", key.topic))?
            }
            _ => Vec::new(),
        };
        let (loaded, envelope, delta_states) = chain_head(loaded, envelope, deltas)
            .with_context(|| format!("checkpoint deltas of {} partition {p}", key.topic))?;
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
        if !delta_states.is_empty() {
            let refs: Vec<&[u8]> = delta_states.iter().map(Vec::as_slice).collect();
            if let Err(e) = svc.apply_deltas(p, &refs) {
                svc.release(p);
                return Err(e.context(format!("applying the checkpoint deltas of {} partition {p}", key.topic)));
            }
        }
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
        let envelope = Self::envelope(svc, p, &positions, &counts, state);
        let next_offset = positions.get(&key.topic).copied().unwrap_or(0);
        let state = envelope.encode();
        let base_bytes = state.len();
        let items = [(key.clone(), Checkpoint { version, next_offset, state })];
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
            deltas = delta_states.len(),
            "partition claimed"
        );
        for (t, o) in &positions {
            seek(self.consumer, t, p, *o);
        }
        let hash = config_hash(&svc.config_text(p));
        let chain = ChainState::based(version, base_bytes);
        self.held.insert(p, Held { version, checkpointed: positions, partition_counts: counts, config_hash: hash, gap: None, chain });
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

    /// The envelope of a checkpoint of `p` at `positions` with `state`.
    pub(crate) fn envelope<S: Partitioned>(
        svc: &S,
        p: i32,
        positions: &BTreeMap<String, i64>,
        counts: &BTreeMap<String, i32>,
        state: Vec<u8>,
    ) -> Envelope {
        let config_text = svc.config_text(p);
        Envelope {
            meta: Meta {
                offsets: positions.clone(),
                partition_counts: counts.clone(),
                config_hash: config_hash(&config_text),
                config_text,
                operator: None,
            },
            state,
        }
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
pub(crate) fn seek(consumer: &StreamConsumer<RebalanceLog>, topic: &str, p: i32, offset: i64) {
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


/// What a claim continues from: the checkpoint and envelope it describes, the deltas' states.
type Head = (Option<Checkpoint>, Option<Envelope>, Vec<Vec<u8>>);

/// The newest base and its deltas as what the claim continues from: the last delta's version,
/// offsets and meta (they describe the state after it), the base's state, and the deltas'
/// states in order. Every delta must have been written under the base's configuration (a
/// switch writes a base).
fn chain_head(
    loaded: Option<Checkpoint>,
    envelope: Option<Envelope>,
    deltas: Vec<StoredDelta>,
) -> anyhow::Result<Head> {
    let (Some(mut cp), Some(mut env)) = (loaded, envelope) else {
        return Ok((None, None, Vec::new()));
    };
    let mut states = Vec::with_capacity(deltas.len());
    for d in deltas {
        let de = Envelope::decode(&d.checkpoint.state).with_context(|| format!("delta version {}", d.checkpoint.version))?;
        anyhow::ensure!(
            de.meta.config_hash == env.meta.config_hash && de.meta.operator.is_none(),
            "delta version {} was written under another configuration than its base {}",
            d.checkpoint.version,
            d.link.base_version
        );
        cp = Checkpoint { version: d.checkpoint.version, next_offset: d.checkpoint.next_offset, state: Vec::new() };
        env.meta = de.meta;
        states.push(de.state);
    }
    Ok((Some(cp), Some(env), states))
}
