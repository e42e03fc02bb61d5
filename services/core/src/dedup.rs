//! Exact deduplication of usage events by `(tenant, event_id)` within a horizon.
//!
//! # Why exact and why hashes
//!
//! A dropped distinct event is unbilled usage, so there is no Bloom filter (or any other
//! structure with false positives by design). Each remembered event is a 128-bit keyed hash:
//! SipHash-1-3-128 over `tenant ‖ 0xFF ‖ event_id`. `0xFF` never occurs in UTF-8, so the
//! concatenation is unambiguous (`("ab","c")` and `("a","bc")` hash different inputs).
//!
//! **Collision bound.** For `n` distinct ids remembered at once, the probability that any two
//! share a 128-bit hash is `p ≈ n² / 2^129` (birthday bound). With `n = 10^10` (ten billion
//! events inside one horizon of one partition) `p ≈ 1.5·10^-19`. A collision would drop one
//! distinct event as a duplicate, so this is the whole error budget of the dedup.
//!
//! **Why keyed.** The 128-bit key is random per deduplicator (kept in the snapshot, so a
//! restored engine hashes identically). Without a secret key a tenant could search for two
//! ids with equal hashes offline and have its own usage dropped; with SipHash's PRF guarantee
//! it cannot do better than guessing.
//!
//! # Tiers
//!
//! * **Hot, open buckets** (event-time buckets near the partition time, default one minute):
//!   a `hashbrown::HashTable<u128>` each, O(1) insert and lookup.
//! * **Hot, sealed buckets**: once a bucket's end is `seal_after_ms` behind the partition time
//!   it is converted to a sorted `Vec<u128>` (exactly 16 bytes per id, binary-search
//!   lookup); the rare late insert goes to a small sorted side vector that is merged in when it
//!   grows. Because the open buckets hold only the last few minutes of a 35-day horizon,
//!   the overall cost stays close to 16 bytes per id (target ≤ 24, see [`Deduplicator::bytes_per_id`]).
//! * **Cold**: when the hot tier holds more than `hot_max_ids`, whole buckets are evicted
//!   oldest-first to a [`ColdStore`]. Memory is therefore bounded by configuration, never by
//!   traffic. The cold buckets always form a prefix of event time (`bucket < cold_below`).
//!
//! # Lookup uses the event's own bucket
//!
//! An id is looked up only in the bucket of *its own event time*. This is sound because the
//! producer contract (see [`crate::event::UsageEvent::event_id`]) is that a retried send
//! carries the same id *and the same event time*; a retry therefore always lands in the same
//! bucket. Two events with the same id but event times in different buckets are treated as
//! distinct (it is not a retry, it is a producer bug, and counting it beats silently
//! dropping it). The payoff is one bucket probe per event instead of up to 840.
//!
//! # Determinism
//!
//! Every decision is a pure function of the state and the input sequence: the tier of a bucket
//! depends on id counts (not bytes or capacities), and cold lookups receive the [`SourcePos`]
//! of the current record so that a store answers as of that position even when it already
//! holds rows written by a previous run that crashed after this point.

use std::collections::{BTreeMap, VecDeque};
use std::hash::{BuildHasher, Hasher};

use hashbrown::HashTable;
use siphasher::sip128::{Hasher128, SipHasher13};

use crate::engine::snapshot::{Reader, Writer};
use crate::{Error, Result};

/// Default dedup horizon: 35 days (a month plus slack for late producers).
pub const DEFAULT_HORIZON_MS: i64 = 35 * 86_400_000;

/// Configuration of the [`Deduplicator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupConfig {
    /// How long (in event time, behind the partition time) an id is remembered. Events older
    /// than this are rejected `TooLate` by the engine, since they could no longer be told
    /// apart from duplicates.
    pub horizon_ms: i64,
    /// Event-time size of one bucket (eviction and sealing granularity).
    pub bucket_ms: i64,
    /// A bucket is sealed (hash set → sorted vector) once `bucket_end + seal_after_ms <=`
    /// partition time. Keep it above the largest allowed lateness so that ordinary
    /// out-of-order events still hit a hash set.
    pub seal_after_ms: i64,
    /// Upper bound on the ids held in memory; beyond it the oldest buckets go cold.
    pub hot_max_ids: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            horizon_ms: DEFAULT_HORIZON_MS,
            // One-minute buckets: the bucket every new event probes then holds one minute of
            // ids (a few MB even for a busy partition), which stays in cache; hour buckets
            // measured ~15% slower on the benchmark's busy workload. 50k buckets over 35
            // days cost ~70 bytes each, nothing next to the ids.
            bucket_ms: 60_000,
            seal_after_ms: 5 * 60_000,
            // ≈ 256 MiB at 16 bytes per id.
            hot_max_ids: 16 << 20,
        }
    }
}

impl DedupConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("dedup: {m}")));
        if self.bucket_ms <= 0 {
            return bad("bucket_ms must be positive");
        }
        if self.horizon_ms <= 0 || self.horizon_ms > crate::engine::MAX_ABS_EVENT_TIME_MS {
            return bad("horizon_ms must be positive and below 2^50 ms");
        }
        if self.seal_after_ms < 0 {
            return bad("seal_after_ms must not be negative");
        }
        Ok(())
    }
}

/// Where the engine is: the input record being processed and the `seq` the next emitted
/// aggregate will get. Stores answer "as of" this position (rows at `offset >= self.offset`,
/// or aggregates with `seq >= self.next_seq`, must be ignored) so that replaying after a crash
/// sees exactly what the first run saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourcePos {
    pub partition: i32,
    pub offset: i64,
    pub next_seq: i64,
}

/// A look-up in the cold tier: "was an event with this tenant and id accepted on this
/// partition, with an event time in `[bucket_start_ms, bucket_end_ms)`, at an offset
/// `< before.offset`?"
#[derive(Debug, Clone, Copy)]
pub struct ColdQuery<'a> {
    pub tenant: &'a str,
    pub event_id: &'a str,
    /// The keyed hash the hot tier uses (for stores that keep evicted hashes).
    pub id_hash: u128,
    pub bucket_start_ms: i64,
    pub bucket_end_ms: i64,
    pub before: SourcePos,
}

/// The cold tier of the deduplicator.
///
/// The aggregator implements it over the raw events it already stores in ClickHouse:
///
/// ```sql
/// SELECT 1 FROM raw_events
/// WHERE source_partition = {before.partition} AND tenant = {tenant} AND event_id = {event_id}
///   AND event_time >= {bucket_start_ms} AND event_time < {bucket_end_ms}
///   AND source_offset < {before.offset}
/// LIMIT 1
/// ```
///
/// Contract: the answer must reflect **every** event the engine accepted on this partition at
/// an offset `< before.offset` (so an implementation with buffered, not yet flushed inserts
/// must consult or flush its buffer first) and **nothing** at or after it (replay determinism).
/// An error aborts the current `on_event` without changing the engine; retry it.
pub trait ColdStore {
    fn contains(&mut self, q: &ColdQuery<'_>) -> Result<bool>;

    /// The hot tier just gave up the bucket `[bucket_start_ms, bucket_end_ms)`, holding
    /// `ids` (sorted hashes). A store backed by the raw events needs no action; a store that
    /// keeps hashes would keep these.
    fn evicted(&mut self, bucket_start_ms: i64, bucket_end_ms: i64, ids: &[u128]) {
        let _ = (bucket_start_ms, bucket_end_ms, ids);
    }
}

/// Result of [`Deduplicator::probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Duplicate,
    /// Not seen: pass the token to [`Deduplicator::commit`] once the event is accepted.
    New(NewId),
}

/// A not-yet-remembered id (probe and commit are separate so that an event rejected after
/// the probe, e.g. for a bad quantity, does not consume its id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewId {
    hash: u128,
    bucket: i64,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DedupStats {
    pub cold_lookups: u64,
    pub sealed_buckets: u64,
    pub evicted_buckets: u64,
    pub evicted_ids: u64,
    pub expired_buckets: u64,
}

/// Identity hasher for ids that are already uniformly distributed SipHash outputs.
#[inline]
fn h64(id: &u128) -> u64 {
    *id as u64
}

/// A sealed bucket: sorted ids (16 bytes each) plus a small sorted side vector for late inserts.
struct Sealed {
    sorted: Vec<u128>,
    /// Late inserts after sealing, kept sorted; merged into `sorted` when it grows.
    extra: Vec<u128>,
}

impl Sealed {
    fn contains(&self, id: u128) -> bool {
        self.sorted.binary_search(&id).is_ok() || self.extra.binary_search(&id).is_ok()
    }

    /// Inserts an id known to be absent.
    fn insert_new(&mut self, id: u128) {
        let at = self.extra.binary_search(&id).unwrap_or_else(|e| e);
        self.extra.insert(at, id);
        if self.extra.len() > 64.max(self.sorted.len() / 32) {
            self.sorted = merge_sorted(&self.sorted, &self.extra);
            self.extra = Vec::new();
        }
    }

    fn sorted_ids(&self) -> Vec<u128> {
        merge_sorted(&self.sorted, &self.extra)
    }

    fn bytes(&self) -> usize {
        std::mem::size_of::<Self>() + 8 + (self.sorted.capacity() + self.extra.capacity()) * 16
    }
}

fn open_contains(t: &HashTable<u128>, id: u128) -> bool {
    t.find(h64(&id), |x| *x == id).is_some()
}

fn open_sorted_ids(t: &HashTable<u128>) -> Vec<u128> {
    let mut v: Vec<u128> = t.iter().copied().collect();
    v.sort_unstable();
    v
}

fn open_bytes(t: &HashTable<u128>) -> usize {
    std::mem::size_of::<(i64, HashTable<u128>)>() + t.allocation_size()
}

fn merge_sorted(a: &[u128], b: &[u128]) -> Vec<u128> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i] <= b[j] {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// The deduplicator of one partition. See the module docs for the design.
pub struct Deduplicator {
    cfg: DedupConfig,
    key: u128,
    sip: SipHasher13,
    /// Open buckets, ascending by index. Only the few near partition time are open, so a
    /// linear search from the newest end finds the usual bucket at once, where a B-tree
    /// search (twice per event: probe and commit) would not.
    open: VecDeque<(i64, HashTable<u128>)>,
    sealed: BTreeMap<i64, Sealed>,
    hot_ids: usize,
    /// Buckets with an index below this are cold (always a prefix of event time).
    cold_below: i64,
    /// Partition time as last given to [`Deduplicator::advance`].
    now: Option<i64>,
    stats: DedupStats,
}

impl std::fmt::Debug for Deduplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deduplicator")
            .field("cfg", &self.cfg)
            .field("open", &self.open.len())
            .field("sealed", &self.sealed.len())
            .field("hot_ids", &self.hot_ids)
            .field("cold_below", &self.cold_below)
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

/// A fresh random 128-bit key. `RandomState` is seeded from the OS's randomness once per
/// thread (and perturbed per instance), which is what we need without a `rand` dependency or
/// I/O in the core.
pub fn random_key() -> u128 {
    let mut key = 0u128;
    for i in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(key);
        let addr = &key as *const u128 as usize;
        h.write_usize(addr);
        key = (key << 64) | u128::from(h.finish());
    }
    key
}

impl Deduplicator {
    /// A deduplicator with a random hash key.
    pub fn new(cfg: DedupConfig) -> Result<Self> {
        Self::with_key(cfg, random_key())
    }

    /// A deduplicator with a given key (tests and benchmarks that need reproducible hashes).
    pub fn with_key(cfg: DedupConfig, key: u128) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            sip: SipHasher13::new_with_keys(key as u64, (key >> 64) as u64),
            key,
            cfg,
            open: VecDeque::new(),
            sealed: BTreeMap::new(),
            hot_ids: 0,
            cold_below: i64::MIN,
            now: None,
            stats: DedupStats::default(),
        })
    }

    pub fn config(&self) -> &DedupConfig {
        &self.cfg
    }

    /// The secret hash key (it is part of the snapshot).
    pub fn key(&self) -> u128 {
        self.key
    }

    pub fn stats(&self) -> DedupStats {
        self.stats
    }

    /// The keyed 128-bit hash of `tenant ‖ 0xFF ‖ event_id`.
    #[inline]
    pub fn id_hash(&self, tenant: &str, event_id: &str) -> u128 {
        // One pass over a contiguous buffer is cheaper than three streaming writes; the
        // streaming path (same bytes, same hash) handles long inputs.
        let n = tenant.len() + 1 + event_id.len();
        let mut buf = [0u8; 128];
        if n <= buf.len() {
            buf[..tenant.len()].copy_from_slice(tenant.as_bytes());
            buf[tenant.len()] = 0xFF;
            buf[tenant.len() + 1..n].copy_from_slice(event_id.as_bytes());
            return self.sip.hash(&buf[..n]).as_u128();
        }
        let mut h = self.sip;
        h.write(tenant.as_bytes());
        h.write_u8(0xFF);
        h.write(event_id.as_bytes());
        h.finish128().as_u128()
    }

    #[inline]
    fn bucket_of(&self, event_time_ms: i64) -> i64 {
        event_time_ms.div_euclid(self.cfg.bucket_ms)
    }

    /// Events strictly older than this (partition time minus horizon) cannot be deduplicated
    /// any more; the engine rejects them as too late.
    pub fn floor(&self, partition_time_ms: i64) -> i64 {
        partition_time_ms.saturating_sub(self.cfg.horizon_ms)
    }

    /// Has `(tenant, event_id)` been committed in the bucket of `event_time_ms`? Consults
    /// the cold store for cold buckets. Does not change what is remembered.
    pub fn probe<C: ColdStore + ?Sized>(
        &mut self,
        tenant: &str,
        event_id: &str,
        event_time_ms: i64,
        before: SourcePos,
        cold: &mut C,
    ) -> Result<Probe> {
        let hash = self.id_hash(tenant, event_id);
        let bucket = self.bucket_of(event_time_ms);
        let dup = if bucket < self.cold_below {
            self.stats.cold_lookups += 1;
            let start = bucket * self.cfg.bucket_ms;
            cold.contains(&ColdQuery {
                tenant,
                event_id,
                id_hash: hash,
                bucket_start_ms: start,
                bucket_end_ms: start + self.cfg.bucket_ms,
                before,
            })?
        } else if let Some(p) = self.open_pos(bucket) {
            open_contains(&self.open[p].1, hash)
        } else {
            self.sealed.get(&bucket).is_some_and(|b| b.contains(hash))
        };
        Ok(if dup {
            Probe::Duplicate
        } else {
            Probe::New(NewId { hash, bucket })
        })
    }

    /// Remembers a probed id (the event was accepted), then enforces the memory budget.
    pub fn commit<C: ColdStore + ?Sized>(&mut self, id: NewId, cold: &mut C) {
        if id.bucket < self.cold_below {
            // The cold store learns of accepted events through the raw events the service
            // writes; nothing to remember here.
            return;
        }
        if let Some(p) = self.open_pos(id.bucket) {
            self.open[p].1.insert_unique(h64(&id.hash), id.hash, h64);
        } else if let Some(b) = self.sealed.get_mut(&id.bucket) {
            b.insert_new(id.hash);
        } else if self.now.is_some_and(|now| {
            (id.bucket + 1).saturating_mul(self.cfg.bucket_ms) + self.cfg.seal_after_ms <= now
        }) {
            self.sealed.insert(
                id.bucket,
                Sealed {
                    sorted: vec![id.hash],
                    extra: Vec::new(),
                },
            );
        } else {
            let mut t = HashTable::new();
            t.insert_unique(h64(&id.hash), id.hash, h64);
            let at = self.open.partition_point(|(i, _)| *i < id.bucket);
            self.open.insert(at, (id.bucket, t));
        }
        self.hot_ids += 1;
        if self.hot_ids > self.cfg.hot_max_ids {
            self.evict(cold);
        }
    }

    #[inline]
    fn open_pos(&self, bucket: i64) -> Option<usize> {
        self.open.iter().rposition(|(i, _)| *i == bucket)
    }

    /// Index of the oldest hot bucket.
    fn oldest(&self) -> Option<i64> {
        match (self.open.front().map(|(i, _)| *i), self.sealed.first_key_value().map(|(i, _)| *i)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Removes the oldest hot bucket, returning its index and sorted ids.
    fn pop_oldest(&mut self) -> Option<(i64, Vec<u128>)> {
        let idx = self.oldest()?;
        let ids = if self.open.front().is_some_and(|(i, _)| *i == idx) {
            open_sorted_ids(&self.open.pop_front().expect("non-empty").1)
        } else {
            self.sealed.remove(&idx).expect("oldest exists").sorted_ids()
        };
        self.hot_ids -= ids.len();
        Some((idx, ids))
    }

    fn evict<C: ColdStore + ?Sized>(&mut self, cold: &mut C) {
        while self.hot_ids > self.cfg.hot_max_ids {
            let Some((idx, ids)) = self.pop_oldest() else {
                break;
            };
            self.cold_below = idx + 1;
            self.stats.evicted_buckets += 1;
            self.stats.evicted_ids += ids.len() as u64;
            let start = idx * self.cfg.bucket_ms;
            cold.evicted(start, start + self.cfg.bucket_ms, &ids);
        }
    }

    /// Moves partition time forward: seals buckets that are `seal_after_ms` behind it and
    /// forgets buckets that fell out of the horizon.
    pub fn advance(&mut self, partition_time_ms: i64) {
        if self.now.is_some_and(|n| n >= partition_time_ms) {
            return;
        }
        let prev = self.now;
        self.now = Some(partition_time_ms);
        let floor = self.floor(partition_time_ms);
        // Forget buckets whose end is at or below the floor: no accepted event can map there.
        while let Some(idx) = self.oldest() {
            if (idx + 1).saturating_mul(self.cfg.bucket_ms) <= floor {
                self.pop_oldest();
                self.stats.expired_buckets += 1;
            } else {
                break;
            }
        }
        // Seal open buckets, only when the seal threshold crossed a bucket boundary.
        let seal_line = partition_time_ms.saturating_sub(self.cfg.seal_after_ms);
        let sealable_below = seal_line.div_euclid(self.cfg.bucket_ms); // buckets < this end <= seal_line
        let prev_below = prev.map(|p| p.saturating_sub(self.cfg.seal_after_ms).div_euclid(self.cfg.bucket_ms));
        if prev_below != Some(sealable_below) {
            while self.open.front().is_some_and(|(i, _)| *i < sealable_below) {
                let (idx, mut t) = self.open.pop_front().expect("non-empty");
                let mut v = Vec::with_capacity(t.len());
                v.extend(t.drain());
                v.sort_unstable();
                self.sealed.insert(
                    idx,
                    Sealed {
                        sorted: v,
                        extra: Vec::new(),
                    },
                );
                self.stats.sealed_buckets += 1;
            }
        }
    }

    /// Ids held in memory.
    pub fn hot_ids(&self) -> usize {
        self.hot_ids
    }

    /// Number of hot buckets (open and sealed).
    pub fn hot_buckets(&self) -> usize {
        self.open.len() + self.sealed.len()
    }

    /// Heap bytes of the hot tier: table allocations, vectors' capacities and per-bucket
    /// overhead.
    pub fn hot_bytes(&self) -> usize {
        self.open.iter().map(|(_, t)| open_bytes(t)).sum::<usize>()
            + self.sealed.values().map(Sealed::bytes).sum::<usize>()
    }

    /// Bytes per remembered id (the benchmark's memory figure); 0 when empty.
    pub fn bytes_per_id(&self) -> f64 {
        if self.hot_ids == 0 {
            0.0
        } else {
            self.hot_bytes() as f64 / self.hot_ids as f64
        }
    }

    /// First event-time millisecond that is still in the hot tier (everything before is cold).
    pub fn cold_before_ms(&self) -> Option<i64> {
        (self.cold_below != i64::MIN).then(|| self.cold_below.saturating_mul(self.cfg.bucket_ms))
    }

    pub(crate) fn write_snapshot(&self, w: &mut Writer) {
        w.u128(self.key);
        w.i64(self.cfg.bucket_ms);
        w.i64(self.cold_below);
        w.opt_i64(self.now);
        w.u64(self.stats.cold_lookups);
        w.u64(self.stats.sealed_buckets);
        w.u64(self.stats.evicted_buckets);
        w.u64(self.stats.evicted_ids);
        w.u64(self.stats.expired_buckets);
        // Both tiers, by bucket index.
        let mut all: Vec<(i64, bool, Vec<u128>)> = self
            .open
            .iter()
            .map(|(i, t)| (*i, false, open_sorted_ids(t)))
            .chain(self.sealed.iter().map(|(i, b)| (*i, true, b.sorted_ids())))
            .collect();
        all.sort_unstable_by_key(|(i, _, _)| *i);
        w.len(all.len());
        for (idx, sealed, ids) in all {
            w.i64(idx);
            w.u8(sealed as u8);
            w.len(ids.len());
            // Raw little-endian, 16 bytes per id.
            for id in ids {
                w.u128(id);
            }
        }
    }

    pub(crate) fn read_snapshot(cfg: DedupConfig, r: &mut Reader<'_>) -> Result<Self> {
        let key = r.u128()?;
        let mut d = Self::with_key(cfg, key)?;
        let bucket_ms = r.i64()?;
        if bucket_ms != d.cfg.bucket_ms {
            return Err(Error::Snapshot(format!(
                "dedup bucket size changed from {bucket_ms} ms to {} ms",
                d.cfg.bucket_ms
            )));
        }
        d.cold_below = r.i64()?;
        d.now = r.opt_i64()?;
        d.stats = DedupStats {
            cold_lookups: r.u64()?,
            sealed_buckets: r.u64()?,
            evicted_buckets: r.u64()?,
            evicted_ids: r.u64()?,
            expired_buckets: r.u64()?,
        };
        let n = r.len(9)?;
        let mut last_idx = None;
        for _ in 0..n {
            let idx = r.i64()?;
            if last_idx.is_some_and(|l| l >= idx) || idx < d.cold_below {
                return Err(Error::Snapshot("dedup buckets out of order".into()));
            }
            last_idx = Some(idx);
            let sealed = r.bool()?;
            let count = r.len(16)?;
            let mut ids = Vec::with_capacity(count);
            for _ in 0..count {
                ids.push(r.u128()?);
            }
            if ids.windows(2).any(|w| w[0] >= w[1]) {
                return Err(Error::Snapshot("dedup ids not strictly sorted".into()));
            }
            d.hot_ids += ids.len();
            if sealed {
                d.sealed.insert(
                    idx,
                    Sealed {
                        sorted: ids,
                        extra: Vec::new(),
                    },
                );
            } else {
                let mut t = HashTable::with_capacity(ids.len());
                for id in ids {
                    t.insert_unique(h64(&id), id, h64);
                }
                d.open.push_back((idx, t));
            }
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Cold {
        evicted: Vec<(i64, i64, Vec<u128>)>,
        queries: usize,
    }
    impl ColdStore for Cold {
        fn contains(&mut self, q: &ColdQuery<'_>) -> Result<bool> {
            self.queries += 1;
            Ok(self
                .evicted
                .iter()
                .any(|(s, _, ids)| *s == q.bucket_start_ms && ids.binary_search(&q.id_hash).is_ok()))
        }
        fn evicted(&mut self, s: i64, e: i64, ids: &[u128]) {
            self.evicted.push((s, e, ids.to_vec()));
        }
    }

    const POS: SourcePos = SourcePos {
        partition: 0,
        offset: 0,
        next_seq: 1,
    };

    fn see(d: &mut Deduplicator, cold: &mut Cold, t: &str, id: &str, time: i64) -> bool {
        match d.probe(t, id, time, POS, cold).unwrap() {
            Probe::Duplicate => false,
            Probe::New(n) => {
                d.commit(n, cold);
                true
            }
        }
    }

    #[test]
    fn separator_makes_concatenation_unambiguous() {
        let d = Deduplicator::with_key(DedupConfig::default(), 7).unwrap();
        // The one-pass and streaming paths agree.
        let long = "x".repeat(200);
        let mut h = d.sip;
        h.write(long.as_bytes());
        h.write_u8(0xFF);
        h.write(b"id");
        assert_eq!(d.id_hash(&long, "id"), h.finish128().as_u128());
        let mut h = d.sip;
        h.write(b"t");
        h.write_u8(0xFF);
        h.write(b"id");
        assert_eq!(d.id_hash("t", "id"), h.finish128().as_u128());
        assert_ne!(d.id_hash("ab", "c"), d.id_hash("a", "bc"));
        assert_eq!(d.id_hash("a", "b"), d.id_hash("a", "b"));
        let other = Deduplicator::with_key(DedupConfig::default(), 8).unwrap();
        assert_ne!(d.id_hash("a", "b"), other.id_hash("a", "b"), "keyed");
        assert_ne!(random_key(), random_key());
    }

    #[test]
    fn open_sealed_and_cold_tiers_agree() {
        let cfg = DedupConfig {
            bucket_ms: 1000,
            seal_after_ms: 0,
            hot_max_ids: 50,
            ..DedupConfig::default()
        };
        let mut d = Deduplicator::with_key(cfg, 1).unwrap();
        let mut cold = Cold::default();
        for i in 0..200i64 {
            let t = i * 50; // 20 per bucket
            assert!(see(&mut d, &mut cold, "t", &format!("e{i}"), t));
            d.advance(t);
            assert!(!see(&mut d, &mut cold, "t", &format!("e{i}"), t), "immediate dup {i}");
            assert!(d.hot_ids() <= 50);
        }
        assert!(d.stats().sealed_buckets > 0 && d.stats().evicted_buckets > 0);
        // Every id is still known, whichever tier it is in.
        for i in 0..200i64 {
            assert!(!see(&mut d, &mut cold, "t", &format!("e{i}"), i * 50), "{i}");
        }
        assert!(cold.queries > 0);
        // Same id, other bucket: distinct by design.
        assert!(see(&mut d, &mut cold, "t", "e199", 199 * 50 + 5000));
        // Late insert into a sealed bucket.
        assert!(see(&mut d, &mut cold, "t", "late", 9_000));
        assert!(!see(&mut d, &mut cold, "t", "late", 9_000));
    }

    #[test]
    fn sealed_bucket_late_inserts_merge() {
        let cfg = DedupConfig {
            bucket_ms: 1000,
            seal_after_ms: 0,
            ..DedupConfig::default()
        };
        let mut d = Deduplicator::with_key(cfg, 1).unwrap();
        let mut cold = Cold::default();
        see(&mut d, &mut cold, "t", "x", 0);
        d.advance(5000);
        for i in 0..500 {
            assert!(see(&mut d, &mut cold, "t", &format!("late{i}"), 10));
        }
        for i in 0..500 {
            assert!(!see(&mut d, &mut cold, "t", &format!("late{i}"), 10));
        }
        assert_eq!(d.hot_ids(), 501);
        assert!(d.bytes_per_id() < 24.0, "{}", d.bytes_per_id());
    }

    #[test]
    fn expiry_forgets_buckets() {
        let cfg = DedupConfig {
            bucket_ms: 1000,
            horizon_ms: 10_000,
            ..DedupConfig::default()
        };
        let mut d = Deduplicator::with_key(cfg, 1).unwrap();
        let mut cold = Cold::default();
        see(&mut d, &mut cold, "t", "x", 0);
        d.advance(10_999);
        assert_eq!(d.hot_ids(), 1);
        d.advance(11_000);
        assert_eq!(d.hot_ids(), 0);
        assert_eq!(d.floor(11_000), 1000);
    }

    #[test]
    fn snapshot_round_trip() {
        let cfg = DedupConfig {
            bucket_ms: 1000,
            seal_after_ms: 0,
            hot_max_ids: 30,
            ..DedupConfig::default()
        };
        let mut d = Deduplicator::with_key(cfg.clone(), 99).unwrap();
        let mut cold = Cold::default();
        for i in 0..60 {
            see(&mut d, &mut cold, "t", &format!("e{i}"), i * 100);
            d.advance(i * 100);
        }
        let mut w = Writer::default();
        d.write_snapshot(&mut w);
        let bytes = w.into_inner();
        let mut r = Reader::new(&bytes);
        let mut back = Deduplicator::read_snapshot(cfg, &mut r).unwrap();
        assert_eq!(back.key(), 99);
        assert_eq!(back.hot_ids(), d.hot_ids());
        let mut w2 = Writer::default();
        back.write_snapshot(&mut w2);
        assert_eq!(w2.into_inner(), bytes);
        for i in 0..60 {
            assert!(!see(&mut back, &mut cold, "t", &format!("e{i}"), i * 100));
        }
    }
}
