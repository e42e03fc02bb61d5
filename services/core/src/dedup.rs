//! Exact deduplication of usage events by `(tenant, meter, event_id)` over the whole horizon.
//!
//! # What counts as a duplicate
//!
//! An event is a duplicate when an earlier event with the same **tenant, meter and event id**
//! was accepted on this partition and that earlier copy's event time is still inside the
//! dedup horizon, **wherever its event time fell**: a retry that a producer re-stamped with
//! `event_time = now()` (one second or three minutes later) is found. The meter is part of
//! the key because AI platforms send one id per *request* and several measurements under it
//! (`input_tokens` and `output_tokens` of one completion); keying by `(tenant, event_id)`
//! alone silently dropped the second measurement. A copy whose event time has left the
//! horizon is forgotten (an expired hit counts as not found), exactly as if it never was.
//!
//! Precisely: with `B = bucket_ms` and partition time `now` (last [`Deduplicator::advance`]),
//! a copy with event time `t` is *live* while `t.div_euclid(B) >= (now - horizon_ms).div_euclid(B)`,
//! i.e. ids are forgotten a whole bucket at a time (at most `B`, one hour by default, after
//! the horizon has passed them).
//!
//! # Why exact and why hashes
//!
//! A dropped distinct event is unbilled usage, so nothing with false positives by design
//! decides (no Bloom filter). Each remembered id is a keyed SipHash-1-3-128 over
//! `tenant ‖ 0xFF ‖ meter ‖ 0xFF ‖ event_id` (`0xFF` never occurs in UTF-8, so the
//! concatenation is unambiguous), of which **111 bits** are kept: bits 17..128 of the hash,
//! bit 16 forced to 1 (so that no entry is zero, the empty slot) and the low 16 bits replaced
//! by the entry's event-time bucket (relative to a base, see below), so one id is exactly one
//! `u128`.
//!
//! **Collision bound.** For `n` distinct ids remembered at once, the probability that any two
//! share the 111 kept bits is `p ≈ n² / 2^112`. With `n = 10^10` (ten billion events inside one
//! horizon of one partition) `p ≈ 2·10^-14`. A collision would drop one distinct event as a
//! duplicate; this is the whole error budget of the dedup.
//!
//! **Why keyed.** The 128-bit key is random per deduplicator (kept in the snapshot, so a
//! restored engine hashes identically). Without a secret key a tenant could search for two
//! ids with equal hashes offline and have its own usage dropped; with SipHash's PRF guarantee
//! it cannot do better than guessing.
//!
//! # Hot tier: one ordered hash table
//!
//! The hashes are uniform, so the table needs no hashing of its own: an entry's home slot is
//! `hash_hi64 × capacity / 2^64` (monotone in the hash) and entries are kept sorted along
//! each cluster (ordered linear probing, Amble & Knuth), so the whole slot array is a sorted
//! array with gaps. A look-up starts at the home slot and stops at the first empty slot or
//! larger entry: at the load kept here (0.72..0.88) that is one or two cache lines, one
//! memory miss per event whatever the event time. Growing, compacting and snapshotting are
//! linear passes over already sorted data. Memory is `16 / load` = 18.2..22.3 bytes per id
//! (plus a 1/256 tail slack), within the 24-byte budget; [`Deduplicator::bytes_per_id`]
//! reports it.
//!
//! The low 16 bits of an entry are its bucket minus `base` (the floor bucket at the last
//! compaction), so the table covers 65,536 buckets (7.5 years of hours) from `base`. An id
//! outside that range (an event time years ahead, allowed by a meter's `max_future`) goes to a
//! small exact side map instead: never wrong, only slower.
//!
//! **Compaction** drops expired ids when the floor enters a new bucket and at least 1/8 of the
//! table is expired, and evicts the oldest buckets to the cold tier when the table holds more
//! than `hot_max_ids` ids (down to 7/8 of it, so evictions come in large groups). Both are
//! decided on counts and event time only, never on capacities, so a restored engine compacts
//! exactly where the original would have (snapshots stay byte-identical).
//!
//! # Cold tier: fingerprints plus the raw events
//!
//! Evicted ids keep a 32-bit fingerprint (4 bytes per id) in sorted groups (at most
//! [`MAX_COLD_GROUPS`], adjacent groups merged; a group is dropped once all its buckets
//! expired). A new id whose fingerprint matches asks the [`ColdStore`], which answers from the
//! raw events the service already stores; an id whose fingerprint matches nothing is new, with
//! no I/O. The store is asked for about `cold_ids / 2^32` of new events (0.4% with 16 M cold
//! ids), and its answer, not the fingerprint, decides. Cold buckets are always a prefix of
//! event time (`bucket < cold_below`); an accepted event in a cold bucket only adds its
//! fingerprint.
//!
//! # Determinism
//!
//! Every decision is a pure function of the state and the input sequence (probe → commit;
//! compaction on counts and event time), and cold look-ups receive the [`SourcePos`] of the
//! current record so that a store answers as of that position even when it already holds rows
//! written by a previous run that crashed after this point.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use siphasher::sip128::{Hasher128, SipHasher13};

use crate::{Error, Result};

mod cold;
mod compact;
mod delta;
mod snapshot;
mod table;
use cold::{empty_group, merge_u32, ColdGroup};
use table::{fp_of, key_of, Table};

/// Default dedup horizon: 35 days (a month plus slack for late producers).
pub const DEFAULT_HORIZON_MS: i64 = 35 * 86_400_000;

/// Bits of an entry that hold its bucket (relative to the table's base).
const BUCKET_BITS: u32 = 16;
const BUCKET_MASK: u128 = (1 << BUCKET_BITS) - 1;
/// Buckets the table can hold from its base.
const BUCKET_SPAN: i64 = 1 << BUCKET_BITS;
/// The horizon must fit in half the span, so that the live range plus a long future fits.
const MAX_HORIZON_BUCKETS: i64 = BUCKET_SPAN / 2;

/// At most this many fingerprint groups in the cold tier (each look-up searches all of them).
pub const MAX_COLD_GROUPS: usize = 8;
/// Fingerprints of accepted events in cold buckets collect in a small group that is sealed
/// into the group list once it holds this many.
const LATE_GROUP_MAX: usize = 4096;

/// Configuration of the [`Deduplicator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupConfig {
    /// How long (in event time, behind the partition time) an id is remembered. Events older
    /// than this are rejected `TooLate` by the engine, since they could no longer be told
    /// apart from duplicates.
    pub horizon_ms: i64,
    /// Event-time granularity of expiry and eviction: ids are forgotten (and evicted) a whole
    /// bucket at a time. At most 32,768 buckets per horizon.
    pub bucket_ms: i64,
    /// Upper bound on the ids held in memory; beyond it the oldest buckets go cold.
    pub hot_max_ids: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            horizon_ms: DEFAULT_HORIZON_MS,
            // One hour: ids outlive the horizon by at most an hour (0.1% of 35 days), and the
            // 16-bit bucket field spans 7.5 years.
            bucket_ms: 3_600_000,
            // ≈ 320..370 MiB at 18..22 bytes per id.
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
        if self.horizon_ms / self.bucket_ms > MAX_HORIZON_BUCKETS {
            return bad("horizon_ms / bucket_ms must be at most 32768 (use larger buckets)");
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

/// A look-up in the cold tier: "was an event with this tenant, meter and id accepted on this
/// partition, with an event time `>= from_ms`, at an offset `< before.offset`?"
#[derive(Debug, Clone, Copy)]
pub struct ColdQuery<'a> {
    pub tenant: &'a str,
    pub meter: &'a str,
    pub event_id: &'a str,
    /// The keyed hash the hot tier uses (for stores that keep evicted hashes).
    pub id_hash: u128,
    /// Start of the oldest live bucket: copies with an earlier event time have left the
    /// horizon and do not count.
    pub from_ms: i64,
    pub before: SourcePos,
}

/// The cold tier of the deduplicator.
///
/// The aggregator implements it over the raw events it already stores in ClickHouse:
///
/// ```sql
/// SELECT count() FROM usage_event_ids
/// WHERE tenant = {tenant} AND meter = {meter} AND event_id = {event_id}
///   AND source_partition = {before.partition} AND event_time_ms >= {from_ms}
///   AND source_offset < {before.offset}
/// ```
///
/// Contract: the answer must reflect **every** event the engine accepted on this partition at
/// an offset `< before.offset` (so an implementation with buffered, not yet flushed inserts
/// must consult or flush its buffer first) and **nothing** at or after it (replay determinism).
/// It is asked only when a fingerprint matches, so it may be slow. An error aborts the
/// current `on_event` without changing the engine; retry it.
pub trait ColdStore {
    fn contains(&mut self, q: &ColdQuery<'_>) -> Result<bool>;

    /// The hot tier just gave up `ids` ids with event times before `cold_before_ms`
    /// (informational: a store backed by the raw events needs no action).
    fn evicted(&mut self, cold_before_ms: i64, ids: usize) {
        let _ = (cold_before_ms, ids);
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
    /// Questions asked to the [`ColdStore`] (fingerprint matches).
    pub cold_lookups: u64,
    /// Of which the store said "not seen" (fingerprint false positives).
    pub cold_misses: u64,
    pub compactions: u64,
    pub evicted_buckets: u64,
    pub evicted_ids: u64,
    pub expired_ids: u64,
}

/// The deduplicator of one partition. See the module docs for the design.
pub struct Deduplicator {
    cfg: DedupConfig,
    key: u128,
    sip: SipHasher13,
    table: Table,
    /// Bucket of the low-bits value 0 in table entries.
    base: i64,
    /// Table entries per bucket, indexed by `bucket - base`.
    counts: Vec<u32>,
    /// Hot ids whose bucket does not fit the table's 16-bit range: key → bucket.
    side: HashMap<u128, i64>,
    /// Buckets below this are cold (always a prefix of event time).
    cold_below: i64,
    cold: Vec<ColdGroup>,
    /// Fingerprints of ids accepted into cold buckets since the last seal, sorted.
    late: ColdGroup,
    /// Partition time as last given to [`Deduplicator::advance`].
    now: Option<i64>,
    /// The oldest live bucket at `now` (`i64::MIN` before any time), cached for the probe.
    floor_b: i64,
    stats: DedupStats,
    /// The state-changing calls since the last checkpoint mark, while an engine tracks deltas
    /// (`None` otherwise, so an engine that never takes deltas pays nothing).
    log: Option<Vec<delta::Op>>,
}

impl std::fmt::Debug for Deduplicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deduplicator")
            .field("cfg", &self.cfg)
            .field("hot_ids", &self.hot_ids())
            .field("cold_ids", &self.cold_ids())
            .field("base", &self.base)
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
            table: Table::default(),
            base: 0,
            counts: Vec::new(),
            side: HashMap::new(),
            cold_below: i64::MIN,
            cold: Vec::new(),
            late: empty_group(),
            now: None,
            floor_b: i64::MIN,
            stats: DedupStats::default(),
            log: None,
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

    /// The keyed 128-bit hash of `tenant ‖ 0xFF ‖ meter ‖ 0xFF ‖ event_id`.
    #[inline]
    pub fn id_hash(&self, tenant: &str, meter: &str, event_id: &str) -> u128 {
        // One pass over a contiguous buffer is cheaper than five streaming writes; the
        // streaming path (same bytes, same hash) handles long inputs.
        let n = tenant.len() + 1 + meter.len() + 1 + event_id.len();
        let mut buf = [0u8; 160];
        if n <= buf.len() {
            let mut at = 0;
            for (i, part) in [tenant, meter, event_id].into_iter().enumerate() {
                if i > 0 {
                    buf[at] = 0xFF;
                    at += 1;
                }
                buf[at..at + part.len()].copy_from_slice(part.as_bytes());
                at += part.len();
            }
            return self.sip.hash(&buf[..n]).as_u128();
        }
        let mut h = self.sip;
        h.write(tenant.as_bytes());
        h.write_u8(0xFF);
        h.write(meter.as_bytes());
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

    /// The oldest live bucket (ids in older buckets are forgotten).
    #[inline]
    fn floor_bucket(&self) -> i64 {
        self.floor_b
    }

    fn compute_floor_bucket(&self) -> i64 {
        self.now.map_or(i64::MIN, |now| self.bucket_of(self.floor(now)))
    }

    /// The newest bucket of a hot id, if it is remembered (live or not yet purged).
    #[inline]
    fn hot_bucket(&self, key: u128) -> Option<i64> {
        let in_table = self
            .table
            .find(key)
            .ok()
            .map(|i| self.base + (self.table.slots[i] & BUCKET_MASK) as i64);
        if self.side.is_empty() {
            return in_table;
        }
        match (in_table, self.side.get(&key).copied()) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    fn cold_may_contain(&self, fp: u32, floor_b: i64) -> bool {
        (self.late.max_bucket >= floor_b && self.late.contains(fp))
            || self.cold.iter().any(|g| g.max_bucket >= floor_b && g.contains(fp))
    }

    /// Has `(tenant, meter, event_id)` been committed with an event time that is still live?
    /// `event_time_ms` is only where the id would be remembered. Consults the cold store
    /// when a cold fingerprint matches. Does not change what is remembered.
    pub fn probe<C: ColdStore + ?Sized>(
        &mut self,
        tenant: &str,
        meter: &str,
        event_id: &str,
        event_time_ms: i64,
        before: SourcePos,
        cold: &mut C,
    ) -> Result<Probe> {
        let hash = self.id_hash(tenant, meter, event_id);
        let bucket = self.bucket_of(event_time_ms);
        let floor_b = self.floor_bucket();
        let key = key_of(hash);
        if self.hot_bucket(key).is_some_and(|b| b >= floor_b) {
            return Ok(Probe::Duplicate);
        }
        if self.cold_below != i64::MIN && self.cold_may_contain(fp_of(key), floor_b) {
            self.stats.cold_lookups += 1;
            let from_ms = if floor_b == i64::MIN {
                i64::MIN
            } else {
                floor_b.saturating_mul(self.cfg.bucket_ms)
            };
            let seen = cold.contains(&ColdQuery {
                tenant,
                meter,
                event_id,
                id_hash: hash,
                from_ms,
                before,
            })?;
            if seen {
                return Ok(Probe::Duplicate);
            }
            self.stats.cold_misses += 1;
        }
        Ok(Probe::New(NewId { hash, bucket }))
    }

    /// Remembers a probed id (the event was accepted), then enforces the memory budget.
    pub fn commit<C: ColdStore + ?Sized>(&mut self, id: NewId, cold: &mut C) {
        let key = key_of(id.hash);
        if let Some(log) = &mut self.log {
            log.push(delta::Op::Commit { key, bucket: id.bucket });
        }
        if id.bucket < self.cold_below {
            // Accepted into a cold bucket: the store has the raw event; remember that it may.
            let fp = fp_of(key);
            let at = self.late.fps.binary_search(&fp).unwrap_or_else(|e| e);
            self.late.fps.insert(at, fp);
            self.late.min_bucket = self.late.min_bucket.min(id.bucket);
            self.late.max_bucket = self.late.max_bucket.max(id.bucket);
            if self.late.fps.len() >= LATE_GROUP_MAX {
                let g = std::mem::replace(&mut self.late, empty_group());
                self.push_cold(g);
            }
            return;
        }
        self.insert_hot(key, id.bucket);
        if self.hot_ids() > self.cfg.hot_max_ids {
            self.compact(true, cold);
        }
    }

    fn insert_hot(&mut self, key: u128, bucket: i64) {
        if !self.side.is_empty() {
            self.side.remove(&key);
        }
        if self.table.len == 0 {
            // Anchor the range where it will be used: from the floor (late events) on.
            let floor_b = self.floor_bucket();
            self.base = if floor_b == i64::MIN {
                bucket - self.cfg.horizon_ms / self.cfg.bucket_ms - 1
            } else {
                floor_b.min(bucket)
            };
            self.counts.clear();
        }
        let rel = bucket - self.base;
        if !(0..BUCKET_SPAN).contains(&rel) {
            self.side.insert(key, bucket);
            return;
        }
        let entry = key | rel as u128;
        match self.table.find(key) {
            Ok(i) => {
                // A forgotten (expired, not yet purged) copy: the id lives again from here.
                let old = (self.table.slots[i] & BUCKET_MASK) as usize;
                self.counts[old] -= 1;
                self.table.slots[i] = entry;
            }
            Err(at) => self.table.insert_at(at, entry),
        }
        let rel = rel as usize;
        if self.counts.len() <= rel {
            self.counts.resize(rel + 1, 0);
        }
        self.counts[rel] += 1;
    }

    /// Moves partition time forward. When the floor enters a new bucket, ids that left the
    /// horizon are purged once they are at least 1/8 of the table.
    pub fn advance(&mut self, partition_time_ms: i64) {
        if self.now.is_some_and(|n| n >= partition_time_ms) {
            return;
        }
        let prev_floor_b = self.floor_b;
        self.now = Some(partition_time_ms);
        self.floor_b = self.compute_floor_bucket();
        let floor_b = self.floor_b;
        if floor_b == prev_floor_b {
            return;
        }
        // Only floor changes can purge or shape later compactions; the final time goes into
        // the delta on its own.
        if let Some(log) = &mut self.log {
            log.push(delta::Op::Advance(partition_time_ms));
        }
        let below = (floor_b.saturating_sub(self.base)).clamp(0, self.counts.len() as i64) as usize;
        let expired: u64 = self.counts[..below].iter().map(|&c| u64::from(c)).sum::<u64>()
            + self.side.values().filter(|&&b| b < floor_b).count() as u64;
        if expired > 0 && expired * 8 >= self.hot_ids() as u64 {
            self.compact(false, &mut NoCold);
        } else {
            self.drop_expired_cold(floor_b);
        }
    }

    /// Ids held in memory (including expired ones not yet purged).
    pub fn hot_ids(&self) -> usize {
        self.table.len + self.side.len()
    }

    /// Fingerprints held for cold ids.
    pub fn cold_ids(&self) -> usize {
        self.cold.iter().map(|g| g.fps.len()).sum::<usize>() + self.late.fps.len()
    }

    /// Heap bytes of the hot tier: the table's slots, the per-bucket counts and the side map.
    pub fn hot_bytes(&self) -> usize {
        self.table.bytes() + self.counts.capacity() * 4 + self.side.capacity() * 40
    }

    /// Heap bytes of the cold tier's fingerprints (4 per cold id plus vector slack).
    pub fn cold_bytes(&self) -> usize {
        self.cold.iter().map(|g| g.fps.capacity() * 4 + 40).sum::<usize>() + self.late.fps.capacity() * 4
    }

    /// Hot bytes per remembered hot id (the benchmark's memory figure); 0 when empty.
    pub fn bytes_per_id(&self) -> f64 {
        if self.hot_ids() == 0 {
            0.0
        } else {
            self.hot_bytes() as f64 / self.hot_ids() as f64
        }
    }

    /// First event-time millisecond that is still in the hot tier (everything before is cold).
    pub fn cold_before_ms(&self) -> Option<i64> {
        (self.cold_below != i64::MIN).then(|| self.cold_below.saturating_mul(self.cfg.bucket_ms))
    }
}

/// For purges, which never evict.
struct NoCold;
impl ColdStore for NoCold {
    fn contains(&mut self, _q: &ColdQuery<'_>) -> Result<bool> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests;
