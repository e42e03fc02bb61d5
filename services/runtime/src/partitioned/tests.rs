//! The loop's protocol on the in-memory driver ([`crate::memory`]): a service that sums the
//! integers of its partitions, a sink that can fail, a checkpoint store that can fail, and a
//! broker whose partitions the test assigns and revokes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::checkpoint::{version_in, Checkpoint, CheckpointKey, Envelope};
use crate::memory::{Event, Journal, MemorySource, MemoryStore};
use crate::resume::Resume;
use crate::retry::{until_ok, Backoff};

const TOPIC: &str = "in";

/// Incremental checkpoints: base + deltas through the loop.
mod deltas;

/// A partition's state: the next offset and the sum of the payloads before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sum {
    next: i64,
    total: i64,
}

impl Sum {
    fn encode(self) -> Vec<u8> {
        [self.next.to_le_bytes(), self.total.to_le_bytes()].concat()
    }

    fn decode(bytes: &[u8]) -> anyhow::Result<Self> {
        let field = |i: usize| -> anyhow::Result<i64> {
            Ok(i64::from_le_bytes(bytes.get(i * 8..i * 8 + 8).context("short state")?.try_into()?))
        };
        Ok(Sum { next: field(0)?, total: field(1)? })
    }
}

/// What the test observes of the service while the loop owns it.
#[derive(Debug, Default)]
struct Seen {
    handled: Vec<(i32, i64)>,
    restored: Vec<(i32, Sum)>,
    released: Vec<i32>,
    sums: BTreeMap<i32, Sum>,
    /// Deltas applied at a restore: (partition, how many, the state after them).
    applied: Vec<(i32, usize, Sum)>,
}

/// A sink that fails while `down` attempts remain, then journals what it writes.
#[derive(Debug, Clone, Default)]
struct Sink {
    journal: Journal,
    down: Arc<AtomicU32>,
    attempts: Arc<AtomicU32>,
    /// Writes that panic (a bug in a sink) before one succeeds.
    panics: Arc<AtomicU32>,
}

struct Summer {
    parts: BTreeMap<i32, Sum>,
    buffer: Vec<(i32, i64)>,
    sink: Sink,
    seen: Arc<Mutex<Seen>>,
    /// With deltas: per partition, what was added since the last checkpoint (see `deltas.rs`).
    since: Option<BTreeMap<i32, i64>>,
}

impl Summer {
    fn new(sink: Sink) -> Self {
        Self { parts: BTreeMap::new(), buffer: Vec::new(), sink, seen: Arc::default(), since: None }
    }

    fn seen(&self) -> Arc<Mutex<Seen>> {
        self.seen.clone()
    }

    fn publish(&self) {
        self.seen.lock().unwrap().sums = self.parts.clone();
    }
}

impl Partitioned for Summer {
    type Batch = Vec<(i32, i64)>;

    fn service(&self) -> &'static str {
        "summer"
    }

    fn group(&self) -> &str {
        "g"
    }

    fn topics(&self) -> Vec<String> {
        vec![TOPIC.to_owned()]
    }

    fn config_text(&self, _partition: i32) -> String {
        "sum v1".to_owned()
    }

    fn restore(&mut self, partition: i32, from: Option<&Envelope>, _counts: &BTreeMap<String, i32>) -> anyhow::Result<()> {
        let sum = match Resume::of(from, "sum v1") {
            Resume::Fresh => Sum::default(),
            Resume::Checkpoint { state, .. } => Sum::decode(state)?,
            Resume::Operator { offsets, .. } => Sum { next: offsets.get(TOPIC).copied().unwrap_or(0), total: 0 },
        };
        self.parts.insert(partition, sum);
        // Like the engine: a restored state tracks its changes from there.
        if let Some(since) = &mut self.since {
            since.insert(partition, 0);
        }
        self.seen.lock().unwrap().restored.push((partition, sum));
        self.publish();
        Ok(())
    }

    async fn verify(&mut self, _partition: i32, _from: Option<&Envelope>) -> anyhow::Result<()> {
        Ok(())
    }

    fn position(&self, _topic: &str, partition: i32) -> Option<i64> {
        self.parts.get(&partition).map(|s| s.next)
    }

    fn release(&mut self, partition: i32) {
        self.parts.remove(&partition);
        self.seen.lock().unwrap().released.push(partition);
        self.publish();
    }

    fn snapshot(&mut self, partition: i32) -> anyhow::Result<Vec<u8>> {
        if let Some(since) = &mut self.since {
            since.insert(partition, 0);
        }
        Ok(self.parts.get(&partition).context("not held")?.encode())
    }

    fn snapshot_delta(&mut self, partition: i32) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(since) = &mut self.since else { return Ok(None) };
        let next = self.parts.get(&partition).context("not held")?.next;
        let added = since.insert(partition, 0).unwrap_or(0);
        Ok(Some(Sum { next, total: added }.encode()))
    }

    fn apply_deltas(&mut self, partition: i32, deltas: &[&[u8]]) -> anyhow::Result<()> {
        let sum = self.parts.get_mut(&partition).context("not held")?;
        for d in deltas {
            let d = Sum::decode(d)?;
            anyhow::ensure!(d.next >= sum.next, "a delta behind the state");
            *sum = Sum { next: d.next, total: sum.total + d.total };
        }
        let mut seen = self.seen.lock().unwrap();
        seen.applied.push((partition, deltas.len(), *sum));
        seen.sums = self.parts.clone();
        Ok(())
    }

    async fn handle(&mut self, record: &Record<'_>, _shutdown: &CancellationToken) -> anyhow::Result<()> {
        let sum = self.parts.get_mut(&record.partition).context("not held")?;
        assert_eq!(record.offset, sum.next, "the loop hands over records in offset order");
        let value = i64::from_le_bytes(record.payload.try_into()?);
        sum.total += value;
        if let Some(since) = &mut self.since {
            *since.entry(record.partition).or_default() += value;
        }
        sum.next = record.offset + 1;
        self.buffer.push((record.partition, record.offset));
        self.seen.lock().unwrap().handled.push((record.partition, record.offset));
        self.publish();
        Ok(())
    }

    fn buffered_rows(&self) -> usize {
        self.buffer.len()
    }

    fn buffered_bytes(&self) -> usize {
        self.buffer.len() * 16
    }

    fn take_batch(&mut self) -> Self::Batch {
        std::mem::take(&mut self.buffer)
    }

    fn write_batch(&self, batch: Self::Batch, stop: CancellationToken) -> impl Future<Output = bool> + Send + 'static {
        let sink = self.sink.clone();
        async move {
            let backoff = Backoff { min: Duration::from_millis(5), max: Duration::from_millis(20) };
            let write = || {
                let (sink, rows) = (sink.clone(), batch.clone());
                async move {
                    sink.attempts.fetch_add(1, Ordering::SeqCst);
                    if sink.panics.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                        panic!("injected sink bug");
                    }
                    let down = sink.down.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                    if down.is_ok() {
                        return Err("sink down");
                    }
                    sink.journal.push(Event::Written { rows });
                    Ok(())
                }
            };
            until_ok("test write", &backoff, &stop, |_| {}, write).await.is_some()
        }
    }
}

fn config() -> LoopConfig {
    LoopConfig {
        flush_interval: Duration::from_millis(10),
        checkpoint_interval: Duration::from_millis(30),
        max_buffered_rows: 8,
        max_buffered_bytes: 1 << 20,
        deltas: crate::chain::DeltaPolicy::default(),
        metrics: crate::telemetry::RuntimeMetrics {
            insert_seconds: "test_insert_seconds",
            checkpoint_seconds: "test_checkpoint_seconds",
            flush_errors: "test_errors",
            fenced: "test_fenced",
            checkpoints: "test_checkpoints",
            checkpoint_bytes: "test_checkpoint_bytes",
        },
    }
}

/// The broker, store, sink and journal of one test.
struct World {
    journal: Journal,
    source: MemorySource,
    store: MemoryStore,
    sink: Sink,
}

impl World {
    fn new(partitions: i32) -> Self {
        let journal = Journal::default();
        Self {
            source: MemorySource::new(&[(TOPIC, partitions)], journal.clone()),
            store: MemoryStore::new(journal.clone()),
            sink: Sink { journal: journal.clone(), ..Sink::default() },
            journal,
        }
    }

    /// Produces `values` to `partition`; returns their sum.
    fn produce(&self, partition: i32, values: impl IntoIterator<Item = i64>) -> i64 {
        values.into_iter().map(|v| self.source.produce(TOPIC, partition, &v.to_le_bytes(), &[]).map(|_| v).unwrap()).sum()
    }

    /// Runs `svc` on this world while `script` runs, then shuts the loop down.
    async fn drive(&self, svc: &mut Summer, script: impl Future<Output = ()>) -> anyhow::Result<()> {
        self.drive_with(svc, config(), script).await
    }

    async fn drive_with(&self, svc: &mut Summer, cfg: LoopConfig, script: impl Future<Output = ()>) -> anyhow::Result<()> {
        let shutdown = CancellationToken::new();
        let script = async {
            script.await;
            shutdown.cancel();
        };
        let (result, ()) = tokio::join!(run(svc, &self.source, &self.store, &cfg, &shutdown), script);
        result
    }

    fn key(partition: i32) -> CheckpointKey {
        CheckpointKey { service: "summer".into(), consumer_group: "g".into(), topic: TOPIC.into(), partition }
    }

    fn written(&self) -> Vec<(i32, i64)> {
        let mut rows: Vec<(i32, i64)> = self
            .journal
            .events()
            .into_iter()
            .flat_map(|e| match e {
                Event::Written { rows } => rows,
                _ => Vec::new(),
            })
            .collect();
        rows.sort_unstable();
        rows
    }
}

/// Runs `svc` on `w` until the loop stops by itself (with an error); returns the error.
async fn stops_with_error(w: &World, svc: &mut Summer) -> String {
    let shutdown = CancellationToken::new();
    let result = tokio::time::timeout(Duration::from_secs(10), run(svc, &w.source, &w.store, &config(), &shutdown))
        .await
        .expect("the loop stops by itself");
    format!("{:#}", result.expect_err("the loop stops with an error"))
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every commit follows a checkpoint of the same offset, which follows the writes of every
/// row of the records it covers: flush -> checkpoint -> commit. Returns the number of commits.
fn protocol_order(events: &[Event]) -> usize {
    let mut commits = 0;
    for (i, e) in events.iter().enumerate() {
        let Event::Committed { partition, offset, .. } = e else { continue };
        commits += 1;
        let saved = events[..i].iter().rposition(|e| {
            matches!(e, Event::Saved { partition: p, next_offset, .. } if p == partition && next_offset == offset)
        });
        let saved = saved.unwrap_or_else(|| panic!("commit of {partition}@{offset} without a checkpoint before it"));
        for o in 0..*offset {
            let written = events[..saved].iter().any(|e| matches!(e, Event::Written { rows } if rows.contains(&(*partition, o))));
            assert!(written, "checkpoint of {partition}@{offset} saved before the row of offset {o} was written");
        }
    }
    commits
}

fn assert_protocol_order(events: &[Event]) {
    assert!(protocol_order(events) > 0, "nothing was committed");
}

#[tokio::test]
async fn writes_then_checkpoints_then_commits() {
    let w = World::new(2);
    let sums = [w.produce(0, 1..=40), w.produce(1, (1..=30).map(|v| v * 100))];
    let mut svc = Summer::new(w.sink.clone());
    let seen = svc.seen();
    w.drive(&mut svc, async {
        w.source.assign(&[(TOPIC, 0), (TOPIC, 1)]);
        until("both partitions are committed to their ends", || {
            w.source.committed_offset(TOPIC, 0) == Some(40) && w.source.committed_offset(TOPIC, 1) == Some(30)
        })
        .await;
    })
    .await
    .unwrap();

    let seen = seen.lock().unwrap();
    assert_eq!(seen.sums[&0], Sum { next: 40, total: sums[0] });
    assert_eq!(seen.sums[&1], Sum { next: 30, total: sums[1] });
    let every: Vec<(i32, i64)> = (0..40).map(|o| (0, o)).chain((0..30).map(|o| (1, o))).collect();
    assert_eq!(w.written(), every, "each record's row written exactly once");
    let events = w.journal.events();
    assert_protocol_order(&events);
    let batches = events.iter().filter(|e| matches!(e, Event::Written { .. })).count();
    assert!(batches >= 70 / 8, "rows bounded per batch: {batches} batches");
}

#[tokio::test]
async fn a_failed_write_is_retried_and_nothing_is_committed_past_it() {
    let w = World::new(1);
    let sum = w.produce(0, 1..=50);
    w.sink.down.store(u32::MAX, Ordering::SeqCst);
    let mut svc = Summer::new(w.sink.clone());
    let seen = svc.seen();
    w.drive(&mut svc, async {
        w.source.assign(&[(TOPIC, 0)]);
        until("the sink has refused several writes", || w.sink.attempts.load(Ordering::SeqCst) >= 5).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        // While the sink is down: no checkpoint beyond the claim, no commit, and consumption
        // paused at two batches (the one in flight and the full one filling).
        let events = w.journal.events();
        assert!(!events.iter().any(|e| matches!(e, Event::Written { .. } | Event::Committed { .. })), "{events:?}");
        let saved: Vec<i64> = events
            .iter()
            .filter_map(|e| match e {
                Event::Saved { next_offset, .. } => Some(*next_offset),
                _ => None,
            })
            .collect();
        assert_eq!(saved, vec![0], "only the claim is checkpointed");
        let handled = seen.lock().unwrap().handled.len();
        assert!((8..=16).contains(&handled), "consumption pauses when the buffers are full: {handled} handled");

        w.sink.down.store(0, Ordering::SeqCst);
        until("committed to the end", || w.source.committed_offset(TOPIC, 0) == Some(50)).await;
    })
    .await
    .unwrap();

    assert_eq!(seen.lock().unwrap().sums[&0], Sum { next: 50, total: sum });
    assert_eq!(w.written(), (0..50).map(|o| (0, o)).collect::<Vec<_>>());
    assert_protocol_order(&w.journal.events());
}

#[tokio::test]
async fn a_failed_checkpoint_holds_the_commit_back() {
    let w = World::new(1);
    let sum = w.produce(0, 1..=20);
    let mut svc = Summer::new(w.sink.clone());
    let seen = svc.seen();
    w.drive(&mut svc, async {
        w.source.assign(&[(TOPIC, 0)]);
        until("the claim is saved", || !w.journal.events().is_empty()).await;
        w.store.fail_saves(4);
        until("the failing saves were tried", || w.store.failing_saves() == 0).await;
        until("committed to the end", || w.source.committed_offset(TOPIC, 0) == Some(20)).await;
    })
    .await
    .unwrap();

    assert_eq!(seen.lock().unwrap().sums[&0], Sum { next: 20, total: sum });
    assert_protocol_order(&w.journal.events());
}

#[tokio::test]
async fn a_rebalance_releases_and_restores_from_the_checkpoint() {
    let w = World::new(1);
    let mut sum = w.produce(0, 1..=30);
    let mut svc = Summer::new(w.sink.clone());
    let seen = svc.seen();
    w.drive(&mut svc, async {
        w.source.assign(&[(TOPIC, 0)]);
        until("committed to the end", || w.source.committed_offset(TOPIC, 0) == Some(30)).await;
        w.source.revoke(&[(TOPIC, 0)]);
        until("released", || seen.lock().unwrap().released == [0]).await;
        assert!(seen.lock().unwrap().sums.is_empty(), "a revoked partition's state is dropped");
        sum += w.produce(0, 31..=45);
        w.source.assign(&[(TOPIC, 0)]);
        until("committed to the new end", || w.source.committed_offset(TOPIC, 0) == Some(45)).await;
    })
    .await
    .unwrap();

    let seen = seen.lock().unwrap();
    // Fresh at the first assignment, the newest checkpoint (offset 30) at the second.
    let sum30: i64 = (1..=30).sum();
    assert_eq!(seen.restored, vec![(0, Sum::default()), (0, Sum { next: 30, total: sum30 })]);
    assert_eq!(seen.sums[&0], Sum { next: 45, total: sum });
    let second_claim_seeks: Vec<_> = w.source.seeks().into_iter().filter(|(_, _, o)| *o == 30).collect();
    assert_eq!(second_claim_seeks, vec![(TOPIC.to_owned(), 0, 30)], "the second claim seeks to its checkpoint");
    assert_eq!(w.written(), (0..45).map(|o| (0, o)).collect::<Vec<_>>(), "nothing re-read, nothing lost");
    assert_protocol_order(&w.journal.events());
}

#[tokio::test]
async fn restore_seeks_to_the_checkpoint_not_the_committed_offset() {
    let w = World::new(1);
    let sum = w.produce(0, 1..=12);
    // A previous owner checkpointed offset 5 (sum of 1..=5) but its commit was lost: the group
    // still says 2.
    let state = Sum { next: 5, total: 15 }.encode();
    let mut svc = Summer::new(w.sink.clone());
    let envelope = Driver::<MemorySource, MemoryStore>::envelope(
        &svc,
        0,
        &BTreeMap::from([(TOPIC.to_owned(), 5)]),
        &BTreeMap::from([(TOPIC.to_owned(), 1)]),
        state,
    );
    w.store.insert(World::key(0), Checkpoint { version: version_in(3, 7), next_offset: 5, state: envelope.encode() });
    w.source.set_committed(TOPIC, 0, 2);
    let seen = svc.seen();
    w.drive(&mut svc, async {
        w.source.assign(&[(TOPIC, 0)]);
        until("committed to the end", || w.source.committed_offset(TOPIC, 0) == Some(12)).await;
    })
    .await
    .unwrap();

    let seen = seen.lock().unwrap();
    assert_eq!(seen.restored, vec![(0, Sum { next: 5, total: 15 })]);
    assert_eq!(w.source.seeks().first(), Some(&(TOPIC.to_owned(), 0, 5)));
    assert_eq!(seen.handled.first(), Some(&(0, 5)), "nothing before the checkpoint is handled");
    assert_eq!(seen.sums[&0], Sum { next: 12, total: sum });
    let claim = w.journal.events().into_iter().find_map(|e| match e {
        Event::Saved { version, .. } => Some(version),
        _ => None,
    });
    assert_eq!(claim, Some(version_in(4, 0)), "claimed in the epoch after the stored one");
}

#[tokio::test]
async fn a_partition_claimed_elsewhere_is_given_up() {
    let w = World::new(1);
    w.produce(0, 1..=10);
    let mut svc = Summer::new(w.sink.clone());
    let seen = svc.seen();
    w.drive(&mut svc, async {
        w.source.assign(&[(TOPIC, 0)]);
        until("committed to the end", || w.source.committed_offset(TOPIC, 0) == Some(10)).await;
        // Another instance takes the partition over (a newer epoch) at offset 10.
        w.store.insert(World::key(0), Checkpoint { version: version_in(9, 0), next_offset: 10, state: Vec::new() });
        w.produce(0, 11..=20);
        until("given up", || seen.lock().unwrap().released == [0]).await;
    })
    .await
    .unwrap();

    let events = w.journal.events();
    let saved_after_10 = events.iter().any(|e| matches!(e, Event::Saved { next_offset, .. } if *next_offset > 10));
    assert!(!saved_after_10, "no checkpoint over the new owner's: {events:?}");
    assert_eq!(w.source.committed_offset(TOPIC, 0), Some(10), "nothing committed past the takeover");
}

#[tokio::test]
async fn broker_errors_while_claiming_are_retried() {
    let w = World::new(1);
    let sum = w.produce(0, 1..=5);
    w.source.fail_calls(3);
    let mut svc = Summer::new(w.sink.clone());
    let seen = svc.seen();
    w.drive(&mut svc, async {
        w.source.assign(&[(TOPIC, 0)]);
        until("committed to the end", || w.source.committed_offset(TOPIC, 0) == Some(5)).await;
    })
    .await
    .unwrap();
    assert_eq!(w.source.failing_calls(), 0, "the injected failures happened");
    assert_eq!(seen.lock().unwrap().sums[&0], Sum { next: 5, total: sum });
}

#[tokio::test]
async fn a_group_ahead_of_any_checkpoint_refuses_to_start() {
    let w = World::new(1);
    w.produce(0, 1..=5);
    w.source.set_committed(TOPIC, 0, 3);
    let mut svc = Summer::new(w.sink.clone());
    w.source.assign(&[(TOPIC, 0)]);
    let err = stops_with_error(&w, &mut svc).await;
    assert!(err.contains("no checkpoint, but the consumer group g committed offset 3"), "{err}");
    assert!(w.journal.events().is_empty(), "nothing claimed, written or committed");
}

#[tokio::test]
async fn records_deleted_before_they_were_processed_stop_the_loop() {
    let w = World::new(1);
    w.produce(0, 1..=10);
    // Retention deleted 0..4 before anything was processed.
    w.source.truncate(TOPIC, 0, 4);
    let mut svc = Summer::new(w.sink.clone());
    w.source.assign(&[(TOPIC, 0)]);
    let err = stops_with_error(&w, &mut svc).await;
    assert!(err.contains("offsets 0..4 were deleted"), "{err}");
    assert_eq!(w.source.seeks(), vec![(TOPIC.to_owned(), 0, 0)], "refused at the first record, not after seeking");
    assert!(svc.seen.lock().unwrap().handled.is_empty(), "nothing skipped silently");
}

#[tokio::test]
async fn a_writer_that_panics_stops_the_loop_before_anything_is_checkpointed_past_it() {
    let w = World::new(1);
    w.produce(0, 1..=40);
    w.sink.panics.store(1, Ordering::SeqCst);
    let mut svc = Summer::new(w.sink.clone());
    w.source.assign(&[(TOPIC, 0)]);
    let err = stops_with_error(&w, &mut svc).await;
    assert!(err.contains("output writer failed"), "{err}");
    assert_eq!(w.sink.panics.load(Ordering::SeqCst), 0, "the injected panic happened");
    let events = w.journal.events();
    protocol_order(&events);
    // The rows of the panicked batch (the first one) were never written: no checkpoint and no
    // commit may cover them, whatever was written after.
    assert!(!w.written().contains(&(0, 0)), "the first batch was lost with the writer");
    let beyond_claim = events.iter().any(|e| matches!(e, Event::Saved { next_offset, .. } if *next_offset > 0));
    assert!(!beyond_claim, "checkpointed past lost rows: {events:?}");
    assert_eq!(w.source.committed_offset(TOPIC, 0), None);
}
