//! The consume loop both services share: records in, outputs written, state checkpointed with
//! the offsets it covers, offsets committed — in that order per batch (see the aggregator's
//! crate docs and `docs/design.md` for why this gives effectively-once without Kafka
//! transactions).
//!
//! The loop owns the protocol around a service's per-partition state:
//! * **Assignment** ([`crate::claim`]): the state of every assigned partition is restored from
//!   its newest checkpoint at once (so quiet partitions still tick and close windows; their
//!   checkpoints load concurrently), checked against the committed offsets, the topic's
//!   offsets and partition count and the service's outputs (a disagreement stops the service
//!   with an error naming the partition and offsets; an operator decides with
//!   `meterflow-admin checkpoint`), claimed in a new epoch (a delta continuing the loaded
//!   chain where the service keeps deltas, else a base; all claims in one save), and the
//!   consumer is sought to the checkpoint's offsets.
//! * **Contiguity**: a partition's records are handed to the service only in offset order
//!   from the checkpoint's position; anything else (records fetched before the seek) is dropped.
//! * **Pipelining** ([`crate::inflight`]): outputs are written by a spawned task while the loop
//!   fills the next batch; one batch in flight at most, and consumption pauses while the
//!   filling one is at its row or byte bound, so memory stays bounded during an outage.
//! * **Checkpoints** travel with the batch taken together with their snapshot and are saved
//!   once that batch is written; offsets are committed once they are durable.
//! * **Fencing**: before checkpoints are written, the newest stored versions are re-read; a
//!   partition someone else has claimed since is given up instead of checkpointed.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use metrics::{counter, histogram};
use tokio_util::sync::CancellationToken;

use crate::chain::{ChainState, DeltaPolicy};
use crate::checkpoint::{config_hash, epoch_of};
use crate::inflight::{InFlight, Names, Settled, Staged};
use crate::record::{AsRecord as _, Record};
use crate::source::Source;
use crate::store::CheckpointStorage;
use crate::telemetry::RuntimeMetrics;

pub use crate::service_io::ServiceIo;

/// How often to write outputs and checkpoint, and how much may wait in memory.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub flush_interval: Duration,
    pub checkpoint_interval: Duration,
    /// Buffered output rows that start a write at once, and at which consumption pauses while
    /// the previous batch is still being written (bounds memory while a sink is down).
    pub max_buffered_rows: usize,
    /// The same bound in (estimated) bytes of buffered output.
    pub max_buffered_bytes: usize,
    /// When checkpoints are deltas instead of full states (services that write deltas).
    pub deltas: DeltaPolicy,
    /// The service's names of what the loop reports (checkpoints, failed writes, fencing).
    pub metrics: RuntimeMetrics,
}

/// What a service plugs into [`run`]. Partition N of every input topic belongs to state N.
pub trait Partitioned {
    /// Outputs taken out of the service's buffers, written while the next ones fill.
    type Batch: Send + 'static;

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

    /// True when a checkpoint must be taken before the next record is processed (a
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
        from: Option<&crate::checkpoint::Envelope>,
        partition_counts: &BTreeMap<String, i32>,
    ) -> anyhow::Result<()>;

    /// Service-specific check of a just restored state against the service's outputs (for
    /// example: no outputs without a checkpoint, no checkpoint ahead of its outputs).
    fn verify(
        &mut self,
        partition: i32,
        from: Option<&crate::checkpoint::Envelope>,
    ) -> impl Future<Output = anyhow::Result<()>>;

    /// The next offset of `topic` the state of `partition` expects; `None` if not held.
    fn position(&self, topic: &str, partition: i32) -> Option<i64>;

    /// Drops the state of `partition` (revoked, or fenced by another instance).
    fn release(&mut self, partition: i32);

    /// The state of `partition` as checkpoint bytes. Called right before [`Partitioned::take_batch`]:
    /// rows that must go with the checkpoint may be added to the buffers here.
    fn snapshot(&mut self, partition: i32) -> anyhow::Result<Vec<u8>>;

    /// The change of the state of `partition` since its last checkpoint (full or delta, as
    /// returned by [`Partitioned::snapshot`] or this), or `None` to have a full one taken
    /// instead. Called only when the runtime knows that last checkpoint to be durable and the
    /// [`DeltaPolicy`] allows a delta. The default: no deltas (a small state needs none).
    fn snapshot_delta(&mut self, partition: i32) -> anyhow::Result<Option<Vec<u8>>> {
        let _ = partition;
        Ok(None)
    }

    /// Applies the deltas stored after the checkpoint [`Partitioned::restore`] just restored,
    /// in order (the states of their envelopes).
    fn apply_deltas(&mut self, partition: i32, deltas: &[&[u8]]) -> anyhow::Result<()> {
        anyhow::ensure!(deltas.is_empty(), "partition {partition}: this service writes no checkpoint deltas, but {} are stored", deltas.len());
        Ok(())
    }

    /// Processes one record (always the next expected offset of its partition).
    fn handle(
        &mut self,
        record: &Record<'_>,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = anyhow::Result<()>>;

    /// Output rows waiting in the buffers.
    fn buffered_rows(&self) -> usize;

    /// Estimated bytes of the buffered outputs.
    fn buffered_bytes(&self) -> usize;

    /// Swaps the buffered outputs out (cheap: no copy of rows).
    fn take_batch(&mut self) -> Self::Batch;

    /// Writes `batch`, retrying until it is written: true, or until `stop`: false. Runs as
    /// its own task while the loop goes on, so it owns everything it needs. A retry must
    /// write byte-identical rows (ClickHouse folds identical blocks and rows).
    fn write_batch(&self, batch: Self::Batch, stop: CancellationToken) -> impl Future<Output = bool> + Send + 'static;

    /// The last batch taken is written (e.g. drop what cold look-ups consulted of it).
    fn batch_written(&mut self) {}

    /// Extra periodic work (idle ticks, gauges, progress lines), every ~100 ms.
    fn on_timer(&mut self) -> impl Future<Output = ()> {
        async {}
    }
}

/// The loop's record of one held partition.
#[derive(Debug)]
pub(crate) struct Held {
    /// Version of the last checkpoint this instance wrote (its claim, then each checkpoint).
    pub version: u64,
    /// Positions the last checkpoint covers, per topic.
    pub checkpointed: BTreeMap<String, i64>,
    /// Partition counts when claimed (recorded in each checkpoint).
    pub partition_counts: BTreeMap<String, i32>,
    /// Hash of the configuration the last checkpoint recorded.
    pub config_hash: String,
    /// A record beyond the expected offset arrived: (expected offset, seeks issued, last seek).
    pub gap: Option<(i64, u32, Instant)>,
    /// The partition's chain of base and deltas (see [`crate::chain`]).
    pub chain: ChainState,
}

/// The protocol state around a service (see the module docs).
pub(crate) struct Driver<'a, Src, St> {
    pub source: &'a Src,
    pub store: &'a St,
    pub cfg: &'a LoopConfig,
    pub held: BTreeMap<i32, Held>,
    /// Partitions given up after a fencing check, and when: ignored until assigned again, or
    /// re-taken after [`FENCED_RETAKE`] if the consumer still has them (so that a partition
    /// whose new owner died at once does not stall).
    pub fenced: BTreeMap<i32, Instant>,
    inflight: Option<InFlight>,
    /// Stops the writers; cancelled only when the final drain runs out of time (a shutdown
    /// lets the batch in flight finish: it is what the final checkpoint builds on).
    write_stop: CancellationToken,
    last_flush: Instant,
    last_checkpoint: Instant,
}

pub(crate) const FENCED_RETAKE: Duration = Duration::from_secs(30);
const DRAIN: Duration = Duration::from_secs(30);
/// Records handled per wake-up of the loop at most (see `run`).
const BURST: usize = 512;

/// Runs `svc` on the records of `source` until `shutdown`, then writes and checkpoints what
/// it holds (30 s at most).
pub async fn run<S: Partitioned, Src: Source, St: CheckpointStorage>(
    svc: &mut S,
    source: &Src,
    store: &St,
    cfg: &LoopConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let now = Instant::now();
    let mut d = Driver {
        source,
        store,
        cfg,
        held: BTreeMap::new(),
        fenced: BTreeMap::new(),
        inflight: None,
        write_stop: CancellationToken::new(),
        last_flush: now,
        last_checkpoint: now,
    };
    let mut timer = tokio::time::interval(Duration::from_millis(100));
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let full = d.is_full(svc);
        // Biased: shutdown, then a finished write (it frees the next batch), then the timer,
        // so that a busy partition cannot starve writes and checkpoints.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            settled = wait(&mut d.inflight) => {
                d.inflight = None;
                d.settle(svc, settled)?;
                d.start_write(svc);
            }
            _ = timer.tick() => {
                d.apply(svc, shutdown).await?;
                d.start_write(svc);
                svc.on_timer().await;
            }
            msg = source.recv(), if !full => {
                d.apply(svc, shutdown).await?;
                d.on_message(svc, msg, shutdown).await?;
                // Records already fetched are handled without a round through the select,
                // which costs more than most records take to process; a burst is short, so
                // the timer, a finished write and shutdown still come promptly.
                for _ in 0..BURST {
                    if d.is_full(svc) || source.rebalance_pending() || shutdown.is_cancelled() {
                        break;
                    }
                    match source.recv().now_or_never() {
                        Some(msg) => d.on_message(svc, msg, shutdown).await?,
                        None => break,
                    }
                }
                if d.is_full(svc) {
                    d.start_write(svc);
                }
            }
        }
    }
    // Graceful stop: write what we hold so a successor re-reads nothing.
    let drained = tokio::time::timeout(DRAIN, async {
        let never = CancellationToken::new();
        if d.settle_inflight(svc, &never).await? {
            d.write(svc, true);
            d.settle_inflight(svc, &never).await?;
        }
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "final write failed; a restart replays from the last checkpoint"),
        Err(_) => tracing::warn!("final write did not finish in {DRAIN:?}; a restart replays from the last checkpoint"),
    }
    d.write_stop.cancel();
    Ok(())
}

/// The batch in flight settling; pending forever when there is none.
async fn wait(inflight: &mut Option<InFlight>) -> Settled {
    match inflight {
        Some(f) => f.wait().await,
        None => std::future::pending().await,
    }
}

impl<Src: Source, St: CheckpointStorage> Driver<'_, Src, St> {
    /// One result of the source: a record for the service, or an error to wait out.
    async fn on_message<S: Partitioned>(
        &mut self,
        svc: &mut S,
        msg: Result<Src::Message<'_>, crate::Error>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        match msg {
            Ok(msg) => {
                self.dispatch_record(svc, &msg.record(), shutdown).await?;
                if svc.wants_checkpoint() && self.settle_inflight(svc, shutdown).await? {
                    self.write(svc, true);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "consumer error");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// The filling buffer is at its bound: consume nothing more until it can be written.
    fn is_full<S: Partitioned>(&self, svc: &S) -> bool {
        svc.buffered_rows() >= self.cfg.max_buffered_rows || svc.buffered_bytes() >= self.cfg.max_buffered_bytes
    }

    /// Starts writing the buffered outputs if nothing is in flight and they are due (full, or
    /// the flush interval has passed), with the snapshots if the checkpoint interval has
    /// passed. Under load a write starts the moment the previous one settles, so the
    /// checkpoint is decided here too, not only on the timer (it would never find the loop
    /// without a batch in flight).
    fn start_write<S: Partitioned>(&mut self, svc: &mut S) {
        if self.inflight.is_some() {
            return;
        }
        let checkpoint = self.last_checkpoint.elapsed() >= self.cfg.checkpoint_interval;
        let flush = self.is_full(svc) || (svc.buffered_rows() > 0 && self.last_flush.elapsed() >= self.cfg.flush_interval);
        if checkpoint || flush {
            self.write(svc, checkpoint);
        }
    }

    /// Takes the buffered outputs (and, with `checkpoint`, a snapshot of every partition that
    /// moved since its last checkpoint, taken at the same moment) and starts writing them.
    /// Nothing may be in flight.
    fn write<S: Partitioned>(&mut self, svc: &mut S, checkpoint: bool) {
        debug_assert!(self.inflight.is_none(), "one batch in flight at most");
        let now = Instant::now();
        self.last_flush = now;
        if checkpoint {
            self.last_checkpoint = now;
        }
        // Snapshots first: rows that go with a checkpoint join this batch.
        let staged = if checkpoint { self.stage(svc) } else { Vec::new() };
        if svc.buffered_rows() == 0 && staged.is_empty() {
            return;
        }
        let batch = svc.take_batch();
        let write = svc.write_batch(batch, self.write_stop.clone());
        let names = Names { errors: self.cfg.metrics.flush_errors };
        self.inflight = Some(InFlight::spawn(write, staged, self.store.clone(), self.write_stop.clone(), names));
    }

    /// Snapshots of the held partitions whose positions or configuration moved since their
    /// last checkpoint.
    fn stage<S: Partitioned>(&mut self, svc: &mut S) -> Vec<Staged> {
        let topics = svc.topics();
        let mut staged = Vec::new();
        for (&p, h) in &mut self.held {
            let started = Instant::now();
            let positions: BTreeMap<String, i64> =
                topics.iter().map(|t| (t.clone(), svc.position(t, p).unwrap_or(0))).collect();
            if positions == h.checkpointed && config_hash(&svc.config_text(p)) == h.config_hash {
                continue;
            }
            let mut delta = h.chain.next_delta(&self.cfg.deltas);
            let state = match delta.map(|_| svc.snapshot_delta(p)).transpose() {
                Ok(Some(Some(d))) => Ok(d),
                Ok(_) => {
                    delta = None;
                    svc.snapshot(p)
                }
                Err(e) => Err(e),
            };
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    // Skipping would silently grow the replay: say it loudly.
                    tracing::error!(error = %e, partition = p, "cannot snapshot state; not checkpointing it");
                    counter!(self.cfg.metrics.flush_errors, "sink" => "checkpoint").increment(1);
                    // The state's delta mark may have moved: the next checkpoint is a base.
                    h.chain.staging(u64::MAX);
                    continue;
                }
            };
            let envelope = Self::envelope(svc, p, &positions, &h.partition_counts, state);
            h.chain.staging(h.version + 1);
            staged.push(Staged {
                partition: p,
                key: Self::key(svc, p),
                version: h.version + 1,
                envelope,
                offsets: positions,
                base_version: h.version,
                snapshot_secs: started.elapsed().as_secs_f64(),
                delta,
                replaces: h.chain.base,
            });
        }
        staged
    }

    /// Waits for the batch in flight, if any, and applies its outcome. False if `shutdown`
    /// came first (the batch stays in flight).
    pub(crate) async fn settle_inflight<S: Partitioned>(
        &mut self,
        svc: &mut S,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let Some(mut f) = self.inflight.take() else { return Ok(true) };
        tokio::select! {
            settled = f.wait() => {
                self.settle(svc, settled)?;
                Ok(true)
            }
            _ = shutdown.cancelled() => {
                self.inflight = Some(f);
                Ok(false)
            }
        }
    }

    /// Applies a settled batch: partitions fenced meanwhile are given up, durable checkpoints
    /// become the partitions' positions and their offsets are committed. A partition released
    /// or claimed again since its snapshot (its version moved) is left alone.
    /// A failed writer stops the loop (see [`Settled::failed`]).
    fn settle<S: Partitioned>(&mut self, svc: &mut S, settled: Settled) -> anyhow::Result<()> {
        if let Some(e) = settled.failed {
            anyhow::bail!("output writer failed ({e}): stopping so that a restart re-derives its batch from the last checkpoint");
        }
        if !settled.written {
            return Ok(());
        }
        svc.batch_written();
        for (s, stored) in settled.fenced {
            let p = s.partition;
            if self.held.get(&p).is_none_or(|h| h.version != s.base_version) {
                continue;
            }
            tracing::error!(
                partition = p,
                ours = s.base_version,
                stored,
                "another instance claimed this partition (epoch {} > {}): giving it up without checkpointing",
                epoch_of(stored),
                epoch_of(s.base_version)
            );
            counter!(self.cfg.metrics.fenced).increment(1);
            self.held.remove(&p);
            self.fenced.insert(p, Instant::now());
            svc.release(p);
        }
        let mut commits = Vec::new();
        let mut secs = None;
        // A batch is a "full" checkpoint if any of its partitions wrote a base.
        let mut kind = "delta";
        for s in settled.saved {
            let Some(h) = self.held.get_mut(&s.partition).filter(|h| h.version == s.base_version) else { continue };
            commits.extend(s.offsets.iter().map(|(t, o)| (t.clone(), s.partition, *o)));
            let (bytes, k) = (s.envelope.state.len(), if s.delta.is_some() { "delta" } else { "full" });
            h.chain.saved(s.version, bytes, s.delta);
            counter!(self.cfg.metrics.checkpoints, "kind" => k).increment(1);
            counter!(self.cfg.metrics.checkpoint_bytes, "kind" => k).increment(bytes as u64);
            if s.delta.is_none() {
                kind = "full";
            }
            h.version = s.version;
            h.checkpointed = s.offsets;
            h.config_hash = s.envelope.meta.config_hash;
            secs = Some(secs.unwrap_or(settled.save_secs) + s.snapshot_secs);
        }
        self.source.commit(&commits);
        if let Some(secs) = secs {
            histogram!(self.cfg.metrics.checkpoint_seconds, "kind" => kind).record(secs);
        }
        Ok(())
    }

    /// Hands `record` to the service if it is the next record of a held partition.
    async fn dispatch_record<S: Partitioned>(
        &mut self,
        svc: &mut S,
        record: &Record<'_>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let (topic, p, offset) = (record.topic, record.partition, record.offset);
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
                Some((at, n, last)) if at == expected => (n, Some(last)),
                _ => (0, None),
            };
            if last.is_some_and(|last| now.duration_since(last) < Duration::from_millis(500)) {
                return Ok(());
            }
            // Records deleted by retention come back with no seek: say so at once (a quiet
            // partition would otherwise deliver nothing more that could trigger the check).
            let low = match self.source.watermarks(topic, p) {
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
            if seeks >= 3 {
                tracing::warn!(topic, partition = p, expected, offset, "offset gap in the log; continuing after it");
                held.gap = None;
                return svc.handle(record, shutdown).await;
            }
            tracing::debug!(topic, partition = p, expected, offset, "record ahead of the state's position; seeking back");
            self.source.seek(topic, p, expected);
            held.gap = Some((expected, seeks + 1, now));
            return Ok(());
        }
        held.gap = None;
        svc.handle(record, shutdown).await
    }
}

#[cfg(test)]
mod tests;
