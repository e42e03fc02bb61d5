//! Taking a partition over: restore its newest checkpoint, check it against the group's
//! offsets, the topic and the service's outputs, claim it in a new epoch and seek the consumer
//! to it (see the module docs of [`crate::partitioned`] and `docs/operations.md`).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use metrics::counter;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{config_hash, epoch_of, version_in, Checkpoint, CheckpointKey, Envelope, Meta};
use crate::kafka::Ownership;
use crate::partitioned::{Driver, Held, Partitioned, FENCED_RETAKE};
use crate::retry::{until_ok, Backoff};
use crate::source::Source;
use crate::store::CheckpointStorage;

impl<Src: Source, St: CheckpointStorage> Driver<'_, Src, St> {
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
        if (!due.is_empty() || self.source.rebalance_pending()) && !self.settle_inflight(svc, shutdown).await? {
            return Ok(()); // shutdown
        }
        if !due.is_empty() {
            let assigned = self.source.assignment().unwrap_or_default();
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
        for change in self.source.drain_rebalances() {
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
                    if let Err(e) = self.source.resume(&list) {
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
        let operator = envelope.as_ref().and_then(|e| e.meta.operator.as_ref());
        // Broker errors (a restart, an election) are retried; only a real disagreement refuses.
        let mut backoff = Backoff::default().min;
        let counts = loop {
            let checked = (|| -> anyhow::Result<BTreeMap<String, i32>> {
                let mut counts = BTreeMap::new();
                for t in &topics {
                    let count = self.source.partition_count(t).with_context(|| format!("fetching metadata of {t}"))?;
                    counts.insert(t.clone(), count);
                }
                if operator.is_none() {
                    self.check_offsets(&key, &topics, &counts, loaded.as_ref(), envelope.as_ref())?;
                }
                Ok(counts)
            })();
            match checked {
                Ok(counts) => break counts,
                // The source's own errors (a broker unreachable); a disagreement is an ensure!.
                Err(e) if e.chain().any(|c| c.is::<crate::Error>()) => {
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
        let envelope = Self::envelope(svc, p, &positions, &counts, state);
        let next_offset = positions.get(&key.topic).copied().unwrap_or(0);
        let items = [(key.clone(), Checkpoint { version, next_offset, state: envelope.encode() })];
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
            self.source.seek(t, p, *o);
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
            let committed = self
                .source
                .committed(t, p)
                .with_context(|| format!("fetching the committed offset of {t} partition {p}"))?;
            let (low, high) =
                self.source.watermarks(t, p).with_context(|| format!("fetching the offsets of {t} partition {p}"))?;
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
