//! Taking a partition over: restore its newest checkpoint, check it against the group's
//! offsets, the topic and the service's outputs, claim it in a new epoch and seek the consumer
//! to it (see the module docs of [`crate::partitioned`] and `docs/operations.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use anyhow::Context as _;
use metrics::counter;
use tokio_util::sync::CancellationToken;

use crate::chain::{ChainState, DeltaLink, StoredDelta};
use crate::checkpoint::{config_hash, epoch_of, version_in, Checkpoint, CheckpointKey, Envelope, Meta};
use crate::kafka::Ownership;
use crate::partitioned::{Driver, Held, Partitioned, FENCED_RETAKE};
use crate::retry::{until_ok, Backoff};
use crate::source::Source;
use crate::store::CheckpointStorage;
use head::Head;

mod head;

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
            let mut again = Vec::new();
            for p in due {
                self.fenced.remove(&p);
                if assigned.contains(&p) && !self.held.contains_key(&p) {
                    tracing::warn!(partition = p, "still assigned {FENCED_RETAKE:?} after being fenced: taking it again");
                    again.push(p);
                }
            }
            if !self.take(svc, &again, shutdown).await? {
                return Ok(());
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
                    for p in &parts {
                        self.fenced.remove(p);
                    }
                    let new: Vec<i32> = parts.into_iter().filter(|p| !self.held.contains_key(p)).collect();
                    if !self.take(svc, &new, shutdown).await? {
                        return Ok(()); // shutdown
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

    /// Takes the assigned partitions `parts` over: loads their checkpoints concurrently,
    /// restores and checks each, claims them all in one save, then seeks each to its
    /// checkpoint. Ok(false): shutdown came first.
    pub(crate) async fn take<S: Partitioned>(&mut self, svc: &mut S, parts: &[i32], shutdown: &CancellationToken) -> anyhow::Result<bool> {
        if parts.is_empty() {
            return Ok(true);
        }
        // Where a takeover's time goes (restart time is what an operator waits for), in ms.
        let started = Instant::now();
        let keys: Vec<CheckpointKey> = parts.iter().map(|&p| Self::key(svc, p)).collect();
        let Some(heads) = head::load_all(self.store, &keys, self.cfg.metrics.flush_errors, shutdown).await? else {
            return Ok(false);
        };
        let load_ms = started.elapsed().as_millis();
        let mut restored = Vec::with_capacity(heads.len());
        for (key, head) in keys.into_iter().zip(heads) {
            let Some(r) = self.restore(svc, key, head, Phases::after("load", load_ms), shutdown).await? else {
                return Ok(false);
            };
            restored.push(r);
        }
        let claiming = Instant::now();
        let Some(claims) = self.claim(svc, &restored, shutdown).await? else { return Ok(false) };
        let claim_ms = claiming.elapsed().as_millis();
        for (mut r, Claimed { version, positions, chain }) in restored.into_iter().zip(claims) {
            let p = r.key.partition;
            r.phases.add("claim", claim_ms);
            tracing::info!(
                partition = p,
                epoch = epoch_of(version),
                offsets = ?positions,
                restored = r.head.checkpoint.is_some(),
                deltas = r.head.deltas.len(),
                claim = if chain.base == Some(version) { "base" } else { "delta" },
                ms = %r.phases,
                "partition claimed"
            );
            for (t, o) in &positions {
                self.source.seek(t, p, *o);
            }
            let hash = config_hash(&svc.config_text(p));
            let counts = r.counts;
            self.held.insert(p, Held { version, checkpointed: positions, partition_counts: counts, config_hash: hash, gap: None, chain });
        }
        tracing::info!(partitions = ?parts, ms = started.elapsed().as_millis() as u64, "partitions taken over");
        Ok(true)
    }

    /// Checks the loaded checkpoint of one partition, restores its state (base, then deltas)
    /// and checks that against the service's outputs. `None`: shutdown came first.
    async fn restore<S: Partitioned>(
        &self,
        svc: &mut S,
        key: CheckpointKey,
        head: Head,
        mut phases: Phases,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Restored>> {
        let p = key.partition;
        let (loaded, envelope) = (head.checkpoint.as_ref(), head.envelope.as_ref());
        let Some(counts) = self.checked_counts(svc, &key, loaded, envelope, shutdown).await? else {
            return Ok(None);
        };
        phases.lap("check");
        svc.restore(p, envelope, &counts)
            .with_context(|| format!("restoring {} state of {} partition {p}", key.service, key.topic))?;
        phases.lap("restore");
        if !head.deltas.is_empty() {
            let refs: Vec<&[u8]> = head.deltas.iter().map(Vec::as_slice).collect();
            if let Err(e) = svc.apply_deltas(p, &refs) {
                svc.release(p);
                return Err(e.context(format!("applying the checkpoint deltas of {} partition {p}", key.topic)));
            }
            phases.lap("deltas");
        }
        if let Some(op) = envelope.and_then(|e| e.meta.operator.as_ref()) {
            tracing::warn!(partition = p, action = %op.action, note = %op.note, "following an operator's checkpoint decision");
        } else if !Self::verified(svc, &key, envelope, self.cfg.metrics.flush_errors, shutdown).await? {
            return Ok(None);
        }
        phases.lap("verify");
        Ok(Some(Restored { key, head, counts, phases }))
    }

    /// The loaded chain if the claim may continue it with a delta instead of writing the whole
    /// state again: the service keeps deltas and still runs the configuration the chain was
    /// written under (a switch, an operator's decision and a fresh partition write a base).
    fn continued<S: Partitioned>(&self, svc: &S, p: i32, head: &Head) -> Option<ChainState> {
        let env = head.envelope.as_ref()?;
        let same = config_hash(&svc.config_text(p)) == env.meta.config_hash;
        (self.cfg.deltas.full_every > 0 && same).then(|| head.chain.clone()).flatten()
    }

    /// The input topics' partition counts, once the checkpoint agrees with the group's
    /// offsets and the topics (unless an operator decided). Broker errors (a restart, an
    /// election) are retried; only a real disagreement refuses. `None`: shutdown came first.
    async fn checked_counts<S: Partitioned>(
        &self,
        svc: &S,
        key: &CheckpointKey,
        loaded: Option<&Checkpoint>,
        envelope: Option<&Envelope>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<BTreeMap<String, i32>>> {
        let topics = svc.topics();
        let operator = envelope.and_then(|e| e.meta.operator.as_ref());
        let mut retry = Retry::new(self.cfg.metrics.flush_errors, "kafka");
        loop {
            let checked = (|| -> anyhow::Result<BTreeMap<String, i32>> {
                let mut counts = BTreeMap::new();
                for t in &topics {
                    let count = self.source.partition_count(t).with_context(|| format!("fetching metadata of {t}"))?;
                    counts.insert(t.clone(), count);
                }
                if operator.is_none() {
                    self.check_offsets(key, &topics, &counts, loaded, envelope)?;
                }
                Ok(counts)
            })();
            match checked {
                Ok(counts) => return Ok(Some(counts)),
                // The source's own errors (a broker unreachable); a disagreement is an ensure!.
                Err(e) if e.chain().any(|c| c.is::<crate::Error>()) => {
                    if !retry.wait(&e, key.partition, "reading the topic's offsets failed", shutdown).await {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The service's check of the restored state against its outputs. ClickHouse errors (an
    /// outage) are retried; only a real disagreement refuses. False: shutdown came first.
    /// Either way but success, the partition is released again.
    async fn verified<S: Partitioned>(
        svc: &mut S,
        key: &CheckpointKey,
        envelope: Option<&Envelope>,
        errors: &'static str,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let p = key.partition;
        let mut retry = Retry::new(errors, "checkpoint");
        loop {
            match svc.verify(p, envelope).await {
                Ok(()) => return Ok(true),
                Err(e) if e.chain().any(|c| c.is::<::clickhouse::error::Error>()) => {
                    if !retry.wait(&e, p, "checking outputs failed", shutdown).await {
                        svc.release(p);
                        return Ok(false);
                    }
                }
                Err(e) => {
                    svc.release(p);
                    return Err(e.context(format!(
                        "{} partition {p}: checkpoint and outputs disagree; refusing to start. \
                         Decide with `meterflow-admin checkpoint replay|reset --service {} --group {} --partition {p}` \
                         (see docs/operations.md)",
                        key.topic, key.service, key.consumer_group
                    )));
                }
            }
        }
    }

    /// Claims the restored partitions, each in a new epoch above every version stored after
    /// they were loaded: with a delta on the chain it continues (the service's change since
    /// the restore, normally none), else with its whole state as a new base. All in one save
    /// (one insert per table). `None`: shutdown.
    async fn claim<S: Partitioned>(
        &self,
        svc: &mut S,
        restored: &[Restored],
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Vec<Claimed>>> {
        let errors = self.cfg.metrics.flush_errors;
        let on_error = |_: &crate::Error| counter!(errors, "sink" => "checkpoint").increment(1);
        let Some(k0) = restored.first().map(|r| &r.key) else { return Ok(Some(Vec::new())) };
        let stored = until_ok("read checkpoint versions", &Backoff::default(), shutdown, on_error, || {
            self.store.max_versions(&k0.service, &k0.consumer_group, &k0.topic)
        })
        .await;
        let Some(stored) = stored else { return Ok(None) };
        let (mut bases, mut deltas, mut claims) = (Vec::new(), Vec::new(), Vec::new());
        for r in restored {
            let (key, p) = (&r.key, r.key.partition);
            let loaded = r.head.checkpoint.as_ref().map_or(0, |c| c.version);
            let version = version_in(epoch_of(stored.get(&p).copied().unwrap_or(0).max(loaded)) + 1, 0);
            let positions: BTreeMap<String, i64> =
                svc.topics().into_iter().map(|t| (t.clone(), svc.position(&t, p).unwrap_or(0))).collect();
            let mut chain = self.continued(svc, p, &r.head).unwrap_or_default();
            let mut link = chain.base.map(|base_version| DeltaLink { base_version, prev_version: chain.at });
            let delta = if link.is_some() { svc.snapshot_delta(p)? } else { None };
            let state = match delta {
                Some(d) => d,
                None => {
                    link = None;
                    svc.snapshot(p)?
                }
            };
            let envelope = Self::envelope(svc, p, &positions, &r.counts, state);
            let next_offset = positions.get(&key.topic).copied().unwrap_or(0);
            let checkpoint = Checkpoint { version, next_offset, state: envelope.encode() };
            // A claimed base counts its stored bytes (as claims always did), a delta its state's
            // (as the loop counts deltas).
            let bytes = if link.is_some() { envelope.state.len() } else { checkpoint.state.len() };
            match link {
                Some(link) => deltas.push((key.clone(), StoredDelta { link, checkpoint })),
                None => bases.push((key.clone(), checkpoint)),
            }
            chain.staging(version);
            chain.saved(version, bytes, link);
            claims.push(Claimed { version, positions, chain });
        }
        let backoff = Backoff::default();
        if !bases.is_empty() {
            let saved = until_ok("write claim checkpoints", &backoff, shutdown, on_error, || self.store.save_all(&bases));
            if saved.await.is_none() {
                return Ok(None);
            }
        }
        if !deltas.is_empty() {
            let saved = until_ok("write claim deltas", &backoff, shutdown, on_error, || self.store.save_deltas(&deltas));
            if saved.await.is_none() {
                return Ok(None);
            }
        }
        Ok(Some(claims))
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

/// Waits between attempts of a check whose errors may be transient, with backoff, counting
/// and logging each failure.
struct Retry {
    delay: std::time::Duration,
    errors: &'static str,
    sink: &'static str,
}

impl Retry {
    fn new(errors: &'static str, sink: &'static str) -> Self {
        Self { delay: Backoff::default().min, errors, sink }
    }

    /// False if `shutdown` came first.
    async fn wait(&mut self, e: &anyhow::Error, partition: i32, what: &str, shutdown: &CancellationToken) -> bool {
        counter!(self.errors, "sink" => self.sink).increment(1);
        tracing::warn!(error = %format!("{e:#}"), partition, "{what}; retrying");
        tokio::select! {
            _ = tokio::time::sleep(self.delay) => {}
            _ = shutdown.cancelled() => return false,
        }
        self.delay = (self.delay * 2).min(Backoff::default().max);
        true
    }
}

/// A partition restored and checked, waiting for its claim.
struct Restored {
    key: CheckpointKey,
    head: Head,
    /// The input topics' partition counts.
    counts: BTreeMap<String, i32>,
    phases: Phases,
}

/// A partition just claimed: the claim's version, the positions it covers, its chain.
struct Claimed {
    version: u64,
    positions: BTreeMap<String, i64>,
    chain: ChainState,
}

/// Milliseconds of the phases of a take, for its log line.
struct Phases {
    at: Instant,
    laps: Vec<(&'static str, u128)>,
}

impl Default for Phases {
    fn default() -> Self {
        Self { at: Instant::now(), laps: Vec::new() }
    }
}

impl Phases {
    /// Phases that start with one already measured (shared by the partitions taken together).
    fn after(what: &'static str, ms: u128) -> Self {
        Self { at: Instant::now(), laps: vec![(what, ms)] }
    }

    fn add(&mut self, what: &'static str, ms: u128) {
        self.laps.push((what, ms));
    }

    fn lap(&mut self, what: &'static str) {
        let now = Instant::now();
        self.laps.push((what, (now - self.at).as_millis()));
        self.at = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.laps.iter().map(|(w, ms)| format!("{w} {ms}")).collect();
        f.write_str(&parts.join(", "))
    }
}
