//! An in-memory broker and checkpoint store, so that the partitioned loop's protocol (restore,
//! seek, flush -> checkpoint -> commit, rebalances, fencing) and a service on it can be tested
//! without Kafka or ClickHouse.
//!
//! [`MemorySource`] keeps per-partition logs, a consumer's assignment and fetch positions
//! (paused on assignment, as [`crate::kafka::RebalanceLog`] does), committed offsets and the
//! ownership changes the test triggers with [`MemorySource::assign`] and
//! [`MemorySource::revoke`]. [`MemoryStore`] keeps checkpoints by version. Both record what
//! the loop did, in order, in a shared [`Journal`], where a test's sink records its writes
//! too, so that a test can check the order of writes, checkpoints and commits.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::chain::StoredDelta;
use crate::checkpoint::{Checkpoint, CheckpointKey};
use crate::kafka::Ownership;
use crate::record::{AsRecord, Headers, Record, Timestamp};
use crate::source::Source;
use crate::store::CheckpointStorage;
use crate::Error;

/// One thing that happened to the outputs, checkpoints or offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A sink wrote rows, each named by the input record (partition, offset) it derives from.
    Written { rows: Vec<(i32, i64)> },
    /// A checkpoint was stored.
    Saved { partition: i32, version: u64, next_offset: i64 },
    /// An offset was committed to the group.
    Committed { topic: String, partition: i32, offset: i64 },
}

/// The order in which events happened, shared by the source, the store and a test's sinks.
#[derive(Debug, Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<Event>>>);

impl Journal {
    pub fn push(&self, event: Event) {
        lock(&self.0).push(event);
    }

    pub fn events(&self) -> Vec<Event> {
        lock(&self.0).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A record as the in-memory broker keeps it.
#[derive(Debug, Clone)]
pub struct MemoryRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp: Timestamp,
}

impl AsRecord for MemoryRecord {
    fn record(&self) -> Record<'_> {
        Record {
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key.as_deref(),
            payload: &self.payload,
            headers: if self.headers.is_empty() { Headers::None } else { Headers::List(&self.headers) },
            timestamp: self.timestamp,
        }
    }
}

type Tp = (String, i32);

#[derive(Debug, Clone, Copy)]
struct Fetch {
    position: i64,
    paused: bool,
}

#[derive(Debug, Default)]
struct SourceState {
    /// Per topic, per partition: the records still in the log and the log's start offset.
    logs: BTreeMap<String, Vec<(i64, Vec<MemoryRecord>)>>,
    assigned: BTreeMap<Tp, Fetch>,
    committed: BTreeMap<Tp, i64>,
    rebalances: Vec<Ownership>,
    seeks: Vec<(String, i32, i64)>,
    /// Round-robin cursor over the assigned partitions, so that partitions interleave.
    cursor: usize,
    /// Calls of the broker round trips (metadata, offsets) that fail before one succeeds.
    failing_calls: u32,
}

impl SourceState {
    fn log(&self, topic: &str, partition: i32) -> Option<&(i64, Vec<MemoryRecord>)> {
        self.logs.get(topic)?.get(usize::try_from(partition).ok()?)
    }

    fn fail(&mut self) -> Result<(), Error> {
        if self.failing_calls > 0 {
            self.failing_calls -= 1;
            return Err(Error::Other("injected broker failure".to_owned()));
        }
        Ok(())
    }

    /// The next record of an assigned, unpaused partition, advancing its position.
    fn next(&mut self) -> Option<MemoryRecord> {
        let n = self.assigned.len();
        for i in 0..n {
            let at = (self.cursor + i) % n;
            let Some(((topic, p), fetch)) = self.assigned.iter().nth(at) else { continue };
            if fetch.paused {
                continue;
            }
            let Some((start, records)) = self.log(topic, *p) else { continue };
            // Like auto.offset.reset=earliest: a position before the log start reads from it.
            let position = fetch.position.max(*start);
            let Some(rec) = usize::try_from(position - start).ok().and_then(|i| records.get(i)).cloned() else {
                continue;
            };
            let key = (topic.clone(), *p);
            if let Some(f) = self.assigned.get_mut(&key) {
                f.position = position + 1;
            }
            self.cursor = at + 1;
            return Some(rec);
        }
        None
    }
}

/// An in-memory broker with one consumer (see the module docs).
#[derive(Debug, Default)]
pub struct MemorySource {
    state: Mutex<SourceState>,
    wake: Notify,
    journal: Journal,
}

impl MemorySource {
    /// Empty `topics` (name, partition count); commits are recorded in `journal`.
    pub fn new(topics: &[(&str, i32)], journal: Journal) -> Self {
        let logs = topics.iter().map(|(t, n)| ((*t).to_owned(), (0..*n).map(|_| (0, Vec::new())).collect())).collect();
        Self { state: Mutex::new(SourceState { logs, ..SourceState::default() }), wake: Notify::new(), journal }
    }

    /// Appends a record; returns its offset.
    pub fn produce(&self, topic: &str, partition: i32, payload: &[u8], headers: &[(&str, &[u8])]) -> Result<i64, Error> {
        let mut s = lock(&self.state);
        let (start, records) = s
            .logs
            .get_mut(topic)
            .and_then(|l| l.get_mut(usize::try_from(partition).ok()?))
            .ok_or_else(|| Error::Other(format!("{topic} partition {partition} does not exist")))?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let offset = *start + records.len() as i64;
        records.push(MemoryRecord {
            topic: topic.to_owned(),
            partition,
            offset,
            key: None,
            payload: payload.to_vec(),
            headers: headers.iter().map(|(k, v)| ((*k).to_owned(), v.to_vec())).collect(),
            timestamp: Timestamp::LogAppendTime(now_ms),
        });
        drop(s);
        self.wake.notify_one();
        Ok(offset)
    }

    /// Assigns partitions to the consumer (paused, fetching from the committed offset) and
    /// records the change for the loop.
    pub fn assign(&self, partitions: &[(&str, i32)]) {
        let mut s = lock(&self.state);
        let list: Vec<Tp> = partitions.iter().map(|(t, p)| ((*t).to_owned(), *p)).collect();
        for tp in &list {
            let position = s.committed.get(tp).copied().unwrap_or(0);
            s.assigned.insert(tp.clone(), Fetch { position, paused: true });
        }
        s.rebalances.push(Ownership::Assigned(list));
        drop(s);
        self.wake.notify_one();
    }

    /// Takes partitions away from the consumer and records the change for the loop.
    pub fn revoke(&self, partitions: &[(&str, i32)]) {
        let mut s = lock(&self.state);
        let list: Vec<Tp> = partitions.iter().map(|(t, p)| ((*t).to_owned(), *p)).collect();
        for tp in &list {
            s.assigned.remove(tp);
        }
        s.rebalances.push(Ownership::Revoked(list));
    }

    /// Sets the group's committed offset (e.g. to one an asynchronous commit lost).
    pub fn set_committed(&self, topic: &str, partition: i32, offset: i64) {
        lock(&self.state).committed.insert((topic.to_owned(), partition), offset);
    }

    /// Deletes the records before `offset` (retention).
    pub fn truncate(&self, topic: &str, partition: i32, offset: i64) {
        let mut s = lock(&self.state);
        if let Some((start, records)) = s.logs.get_mut(topic).and_then(|l| l.get_mut(usize::try_from(partition).ok()?)) {
            let n = usize::try_from(offset - *start).unwrap_or(0).min(records.len());
            records.drain(..n);
            *start += n as i64;
        }
    }

    /// The next `n` broker round trips (metadata, committed offsets, watermarks) fail.
    pub fn fail_calls(&self, n: u32) {
        lock(&self.state).failing_calls = n;
    }

    /// Broker round trips still to fail.
    pub fn failing_calls(&self) -> u32 {
        lock(&self.state).failing_calls
    }

    /// Every seek the loop issued: (topic, partition, offset).
    pub fn seeks(&self) -> Vec<(String, i32, i64)> {
        lock(&self.state).seeks.clone()
    }

    /// The group's committed offset.
    pub fn committed_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        lock(&self.state).committed.get(&(topic.to_owned(), partition)).copied()
    }
}

impl Source for MemorySource {
    type Message<'a> = MemoryRecord;

    async fn recv(&self) -> Result<MemoryRecord, Error> {
        loop {
            if let Some(rec) = lock(&self.state).next() {
                return Ok(rec);
            }
            self.wake.notified().await;
        }
    }

    fn rebalance_pending(&self) -> bool {
        !lock(&self.state).rebalances.is_empty()
    }

    fn drain_rebalances(&self) -> Vec<Ownership> {
        std::mem::take(&mut lock(&self.state).rebalances)
    }

    fn assignment(&self) -> Result<BTreeSet<i32>, Error> {
        Ok(lock(&self.state).assigned.keys().map(|(_, p)| *p).collect())
    }

    fn resume(&self, partitions: &[(String, i32)]) -> Result<(), Error> {
        let mut s = lock(&self.state);
        for tp in partitions {
            if let Some(f) = s.assigned.get_mut(tp) {
                f.paused = false;
            }
        }
        drop(s);
        self.wake.notify_one();
        Ok(())
    }

    fn seek(&self, topic: &str, partition: i32, offset: i64) {
        let mut s = lock(&self.state);
        s.seeks.push((topic.to_owned(), partition, offset));
        if let Some(f) = s.assigned.get_mut(&(topic.to_owned(), partition)) {
            f.position = offset;
        }
        drop(s);
        self.wake.notify_one();
    }

    fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), Error> {
        let mut s = lock(&self.state);
        s.fail()?;
        let (start, records) = s.log(topic, partition).ok_or_else(|| Error::Other(format!("no {topic}/{partition}")))?;
        Ok((*start, start + records.len() as i64))
    }

    fn partition_count(&self, topic: &str) -> Result<i32, Error> {
        let mut s = lock(&self.state);
        s.fail()?;
        let n = s.logs.get(topic).map_or(0, Vec::len);
        i32::try_from(n).map_err(|e| Error::Other(e.to_string()))
    }

    fn committed(&self, topic: &str, partition: i32) -> Result<Option<i64>, Error> {
        let mut s = lock(&self.state);
        s.fail()?;
        Ok(s.committed.get(&(topic.to_owned(), partition)).copied())
    }

    fn commit(&self, offsets: &[(String, i32, i64)]) {
        let mut s = lock(&self.state);
        for (topic, partition, offset) in offsets {
            s.committed.insert((topic.clone(), *partition), *offset);
            self.journal.push(Event::Committed { topic: topic.clone(), partition: *partition, offset: *offset });
        }
    }
}

#[derive(Debug, Default)]
struct StoreState {
    rows: Vec<(CheckpointKey, Checkpoint)>,
    deltas: Vec<(CheckpointKey, StoredDelta)>,
    failing_saves: u32,
    /// Loads wait here for each other (see [`MemoryStore::gate_loads`]).
    gate: Option<(Arc<tokio::sync::Barrier>, usize)>,
    loads_met: usize,
    save_calls: usize,
}

/// Checkpoints in memory; saves are recorded in the journal (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<StoreState>>,
    journal: Journal,
}

impl MemoryStore {
    pub fn new(journal: Journal) -> Self {
        Self { state: Arc::default(), journal }
    }

    /// The next `n` saves fail.
    pub fn fail_saves(&self, n: u32) {
        lock(&self.state).failing_saves = n;
    }

    /// Saves still to fail.
    pub fn failing_saves(&self) -> u32 {
        lock(&self.state).failing_saves
    }

    /// The next `n` loads wait (up to 2 s) until all `n` are waiting together: loads that run
    /// one after another never meet. [`MemoryStore::loads_met`] counts those that did.
    pub fn gate_loads(&self, n: usize) {
        lock(&self.state).gate = Some((Arc::new(tokio::sync::Barrier::new(n)), n));
    }

    /// Loads that met at the gate.
    pub fn loads_met(&self) -> usize {
        lock(&self.state).loads_met
    }

    /// Calls of `save_all` and `save_deltas` so far (each one insert in ClickHouse).
    pub fn save_calls(&self) -> usize {
        lock(&self.state).save_calls
    }

    /// Stores a checkpoint as another instance would (not journaled, never failing).
    pub fn insert(&self, key: CheckpointKey, checkpoint: Checkpoint) {
        lock(&self.state).rows.push((key, checkpoint));
    }

    /// Stores a delta as another instance would (not journaled, never failing).
    pub fn insert_delta(&self, key: CheckpointKey, delta: StoredDelta) {
        lock(&self.state).deltas.push((key, delta));
    }

    /// The stored deltas of `key`, in version order.
    pub fn deltas(&self, key: &CheckpointKey) -> Vec<StoredDelta> {
        let mut found: Vec<StoredDelta> =
            lock(&self.state).deltas.iter().filter(|(k, _)| k == key).map(|(_, d)| d.clone()).collect();
        found.sort_by_key(|d| d.checkpoint.version);
        found
    }

    /// Loses the delta `version` of `key` (a damaged table).
    pub fn remove_delta(&self, key: &CheckpointKey, version: u64) {
        lock(&self.state).deltas.retain(|(k, d)| !(k == key && d.checkpoint.version == version));
    }

    /// The versions of the stored bases of `key`, in order.
    pub fn bases(&self, key: &CheckpointKey) -> Vec<u64> {
        let mut found: Vec<u64> = lock(&self.state).rows.iter().filter(|(k, _)| k == key).map(|(_, c)| c.version).collect();
        found.sort_unstable();
        found
    }

    fn newest(&self, key: &CheckpointKey) -> Option<Checkpoint> {
        let s = lock(&self.state);
        s.rows.iter().filter(|(k, _)| k == key).map(|(_, c)| c).max_by_key(|c| c.version).cloned()
    }
}

impl StoreState {
    /// The next of the failures set by [`MemoryStore::fail_saves`], if any is left.
    fn injected_failure(&mut self) -> Result<(), Error> {
        if self.failing_saves == 0 {
            return Ok(());
        }
        self.failing_saves -= 1;
        Err(Error::Other("injected checkpoint store failure".to_owned()))
    }
}

impl CheckpointStorage for MemoryStore {
    async fn load(&self, key: &CheckpointKey) -> Result<Option<Checkpoint>, Error> {
        let gate = {
            let mut s = lock(&self.state);
            let gate = s.gate.as_ref().map(|(b, _)| b.clone());
            if let Some((_, left)) = &mut s.gate {
                *left -= 1;
                if *left == 0 {
                    s.gate = None;
                }
            }
            gate
        };
        if let Some(barrier) = gate {
            if tokio::time::timeout(std::time::Duration::from_secs(2), barrier.wait()).await.is_ok() {
                lock(&self.state).loads_met += 1;
            }
        }
        Ok(self.newest(key))
    }

    async fn max_versions(&self, service: &str, group: &str, topic: &str) -> Result<BTreeMap<i32, u64>, Error> {
        let s = lock(&self.state);
        let mut max = BTreeMap::new();
        let deltas = s.deltas.iter().map(|(k, d)| (k, &d.checkpoint));
        for (k, c) in s.rows.iter().map(|(k, c)| (k, c)).chain(deltas) {
            if k.service == service && k.consumer_group == group && k.topic == topic {
                let v = max.entry(k.partition).or_insert(c.version);
                *v = (*v).max(c.version);
            }
        }
        Ok(max)
    }

    async fn save_all(&self, items: &[(CheckpointKey, Checkpoint)]) -> Result<(), Error> {
        let mut s = lock(&self.state);
        s.save_calls += 1;
        s.injected_failure()?;
        for (k, c) in items {
            s.rows.push((k.clone(), c.clone()));
            self.journal.push(Event::Saved { partition: k.partition, version: c.version, next_offset: c.next_offset });
        }
        Ok(())
    }

    async fn load_deltas(&self, key: &CheckpointKey, base_version: u64) -> Result<Vec<StoredDelta>, Error> {
        let s = lock(&self.state);
        let mut found: Vec<StoredDelta> = s
            .deltas
            .iter()
            .filter(|(k, d)| k == key && d.link.base_version == base_version)
            .map(|(_, d)| d.clone())
            .collect();
        found.sort_by_key(|d| d.checkpoint.version);
        Ok(found)
    }

    async fn load_base_of(&self, key: &CheckpointKey, version: u64) -> Result<Option<Checkpoint>, Error> {
        let s = lock(&self.state);
        let Some(base) = s.deltas.iter().find(|(k, d)| k == key && d.checkpoint.version == version).map(|(_, d)| d.link.base_version)
        else {
            return Ok(None);
        };
        Ok(s.rows.iter().find(|(k, c)| k == key && c.version == base).map(|(_, c)| c.clone()))
    }

    async fn save_deltas(&self, items: &[(CheckpointKey, StoredDelta)]) -> Result<(), Error> {
        let mut s = lock(&self.state);
        s.save_calls += 1;
        s.injected_failure()?;
        for (k, d) in items {
            s.deltas.push((k.clone(), d.clone()));
            let c = &d.checkpoint;
            self.journal.push(Event::Saved { partition: k.partition, version: c.version, next_offset: c.next_offset });
        }
        Ok(())
    }

    async fn drop_superseded(&self, service: &str, group: &str, topic: &str, bases: &BTreeMap<i32, u64>) -> Result<(), Error> {
        let mut s = lock(&self.state);
        s.deltas.retain(|(k, d)| {
            let ours = k.service == service && k.consumer_group == group && k.topic == topic;
            !(ours && bases.get(&k.partition).is_some_and(|&b| d.checkpoint.version < b))
        });
        Ok(())
    }
}
