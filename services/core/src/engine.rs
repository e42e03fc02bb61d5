//! The per-partition streaming engine: validation, dedup and event-time windows, as a pure
//! state machine (`on_event`, `on_watermark`, `on_tick`, `on_skipped`) in the style of
//! Arroyo's operators.
//!
//! # Model
//!
//! The aggregator creates one [`PartitionEngine`] per Kafka partition and feeds it that
//! partition's records in offset order. Everything the engine emits is a deterministic function
//! of its snapshot and the records after it. That is what makes exactly-once output possible:
//! after a crash the aggregator restores the last snapshot, seeks to [`PartitionEngine::next_offset`],
//! and replays. It regenerates the same aggregates with the same `seq`, which consumers skip.
//!
//! * **Partition time** is the highest event time among accepted events, or the highest
//!   `on_tick`/`on_watermark` time if that is higher. Only accepted events move it: a rejected
//!   event with an absurd timestamp must not move the clock.
//! * **Watermark of a meter** = partition time − that meter's `allowed_lateness_ms`. A window
//!   closes (revision 0 is emitted) when the watermark of its meter reaches its end, i.e.
//!   when partition time ≥ `window_end + allowed_lateness_ms`.
//! * **Restatements.** An accepted event for a closed window updates it and marks it dirty.
//!   Dirty windows are emitted with `revision + 1`, the full corrected value and the previous
//!   value, **coalesced**: when partition time crosses a multiple of
//!   [`EngineConfig::restate_interval_ms`] (or immediately, in the same `on_event`, if it is 0),
//!   on every `on_tick`/`on_watermark`, and before the window is evicted. Coalescing bounds the
//!   output when a producer flushes a backlog of old events (one restatement per window per
//!   interval instead of one per event) while staying deterministic, because the flush points
//!   are a function of event times and logged ticks, never of wall-clock time or batch boundaries.
//! * **Closed-window retention.** Closed windows stay in memory for
//!   [`EngineConfig::retain_closed_ms`] of partition time after they close, then are evicted. A
//!   late event for an evicted window (up to the dedup horizon, 35 days by default) reloads it
//!   through [`WindowStore::load`]: the window's stored raw events are folded again (this is why
//!   min, max, latest and unique_count restate exactly, not only sums) and the last emitted
//!   revision is continued.
//! * **Too late / too early.** An event older than the dedup horizon behind partition time is
//!   rejected `TooLate`: its id may already be forgotten, so accepting it could double count.
//!   An event more than the meter's `max_future_ms` ahead of partition time is rejected
//!   `TooEarly` (a clock gone wrong would otherwise close every open window at once). The first
//!   event of a partition that has seen neither events nor ticks has nothing to compare to
//!   and is accepted: the aggregator should send a tick with its wall clock when it starts a
//!   fresh partition. Event times beyond ±2^50 ms (±35,000 years) are rejected outright, so
//!   window arithmetic can never overflow.
//! * **Memory limits.** A new window is refused (`WindowLimit`) when its tenant already has
//!   [`EngineConfig::max_open_windows_per_tenant`] open windows in the partition, or the
//!   partition holds [`EngineConfig::max_windows`] windows (open + retained). Events for
//!   existing windows are never refused, and both counts follow from the input alone, so a
//!   replay refuses the same events.
//! * **Output order** is deterministic: windows closing together are emitted by close time,
//!   then in the order they were opened; pending restatements in the order their windows were
//!   opened (or reloaded). The opening order is a per-engine counter kept in the snapshot, so it
//!   is as reproducible as a content order and needs no sorting by string keys (which cost ~10%
//!   of the hot path when measured). Every aggregate gets the next value of a per-partition
//!   `seq` (from 1), and `emitted_at` is the meter's watermark at emission.
//!
//! # Validation order
//!
//! missing tenant → missing event id → unknown meter → too late / too early → **dedup probe** →
//! quantity → negative quantity → max_quantity → provider cost → window limits (only for an
//! event that needs a new window) → exactness of the window total → **dedup commit**. The probe comes before decimal parsing, so a duplicate costs no parsing; the id is
//! only committed when the event is accepted, so a malformed event never consumes the id of
//! its corrected retry.

mod close;
mod config;
mod hot;
pub mod memory;
mod codec;
mod delta;
mod event;
mod open;
mod stats;
pub(crate) mod snapshot;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::hash::{BuildHasher, Hasher};

use hashbrown::{DefaultHashBuilder, HashTable};
use rust_decimal::Decimal;

pub use crate::dedup::{ColdQuery, ColdStore, DedupConfig, Deduplicator, Probe, SourcePos};
use crate::event::{RejectReason, UsageEventRef};
use crate::meter::{Aggregation, MeterCatalog, MeterDef};
use crate::records::MeterAggregate;
pub use crate::window::{LastEmitted, LoadedWindow, StoredEvent, WindowQuery, WindowStore};
use crate::window::{canonical, Contribution, Overflow, Window, WindowKey};
use crate::{Error, Result};
pub use delta::is_delta;
pub use config::{EngineConfig, DEFAULT_MAX_OPEN_WINDOWS_PER_TENANT, DEFAULT_MAX_WINDOWS};
pub use memory::MemoryStore;
pub use stats::EngineStats;
pub(crate) use hot::parse_decimal;
use hot::{key_hash, INLINE_DIMS};

/// Event times must lie within ±2^50 ms (about ±35,000 years), so that window and horizon
/// arithmetic never overflows an `i64`.
pub const MAX_ABS_EVENT_TIME_MS: i64 = 1 << 50;


/// What became of one input event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Counted. The service must store the raw event (it is what the cold stores query).
    Accepted,
    /// Already counted: an event with the same `(tenant, meter, event_id)` was accepted
    /// and its event time is still within the dedup horizon (see [`crate::dedup`]).
    Duplicate,
    /// Not counted; goes to the dead-letter topic with `reason` and `detail`.
    Rejected { reason: RejectReason, detail: String },
}

/// What the service stores of the event the engine just accepted, as the engine parsed it:
/// the raw row needs no second parse and no meter look-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accepted {
    pub quantity: Decimal,
    pub provider_cost: Option<Decimal>,
    /// Start of the event's window (Unix ms).
    pub window_start: i64,
}


struct MeterRt {
    def: MeterDef,
    /// Every window of this meter with `window_end <= evicted_end_bound` may have been
    /// evicted, so a miss there must ask the [`WindowStore`]; a miss above it is a window that
    /// never existed. Recorded from actual evictions (not derived from the configuration), so it
    /// stays right if `retain_closed_ms` changes across a restore.
    evicted_end_bound: i64,
}

/// The engine of one source partition. See the module docs.
pub struct PartitionEngine {
    cfg: EngineConfig,
    partition: i32,
    catalog: Arc<MeterCatalog>,
    meters: Vec<MeterRt>,
    meter_index: hashbrown::HashMap<Box<str>, u16>,
    dedup: Deduplicator,
    hasher: DefaultHashBuilder,
    /// Window states; `index` and the time indexes refer to slots here.
    slab: Vec<Option<Window>>,
    free: Vec<u32>,
    /// Hash of (meter, window_start, tenant, dims) → slab slot; probed with borrowed parts so
    /// that an event for an existing window allocates nothing.
    index: HashTable<u32>,
    /// Open windows by close time (`window_end + allowed_lateness`).
    closing: BTreeMap<i64, Vec<u32>>,
    /// Closed windows by eviction time (`close time + retain_closed_ms`).
    retained: BTreeMap<i64, Vec<u32>>,
    /// Slots of dirty windows (restatement pending).
    dirty: Vec<u32>,
    /// Slots of open windows changed since the last [`Self::take_provisional`] (may hold
    /// stale slots; the window's `touched` flag decides).
    touched: Vec<u32>,
    /// Open windows per tenant (tenants with none are absent), for
    /// [`EngineConfig::max_open_windows_per_tenant`]. Derived from the windows, so not in the
    /// snapshot: `insert_window` rebuilds it on restore.
    /// Keyed by the tenant's bytes, so that counting needs no UTF-8 check of a window key.
    open_per_tenant: hashbrown::HashMap<Box<[u8]>, u32>,
    max_time: Option<i64>,
    next_offset: i64,
    next_seq: i64,
    /// Creation number of the next window (see `Window::created`).
    next_window_id: u64,
    stats: EngineStats,
    /// Emitted, not yet drained aggregates.
    output: Vec<MeterAggregate>,
    /// The last accepted event (see [`Self::accepted`]); not part of the snapshot.
    accepted: Accepted,
    /// Changes since the last checkpoint, when deltas are armed (see [`delta`]).
    delta: Option<delta::Tracker>,
}

impl std::fmt::Debug for PartitionEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionEngine")
            .field("partition", &self.partition)
            .field("windows", &self.index.len())
            .field("max_time", &self.max_time)
            .field("next_offset", &self.next_offset)
            .field("next_seq", &self.next_seq)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}


impl PartitionEngine {
    /// A fresh engine for source partition `partition`, with a random dedup hash key.
    pub fn new(catalog: Arc<MeterCatalog>, cfg: EngineConfig, partition: i32) -> Result<Self> {
        Self::with_dedup_key(catalog, cfg, partition, crate::dedup::random_key())
    }

    /// A fresh engine with a given dedup key (tests, benchmarks).
    pub fn with_dedup_key(catalog: Arc<MeterCatalog>, cfg: EngineConfig, partition: i32, key: u128) -> Result<Self> {
        cfg.validate()?;
        let dedup = Deduplicator::with_key(cfg.dedup_config(), key)?;
        Self::assemble(catalog, cfg, partition, dedup)
    }

    fn assemble(catalog: Arc<MeterCatalog>, cfg: EngineConfig, partition: i32, dedup: Deduplicator) -> Result<Self> {
        if catalog.meters().len() > usize::from(u16::MAX) {
            return Err(Error::Config("more than 65535 meters".into()));
        }
        let meters: Vec<MeterRt> = catalog
            .meters()
            .iter()
            .map(|m| MeterRt {
                def: m.clone(),
                evicted_end_bound: i64::MIN,
            })
            .collect();
        let meter_index = meters
            .iter()
            .enumerate()
            .map(|(i, m)| (Box::from(m.def.name.as_str()), i as u16))
            .collect();
        Ok(Self {
            cfg,
            partition,
            catalog,
            meters,
            meter_index,
            dedup,
            hasher: DefaultHashBuilder::default(),
            slab: Vec::new(),
            free: Vec::new(),
            index: HashTable::new(),
            closing: BTreeMap::new(),
            retained: BTreeMap::new(),
            dirty: Vec::new(),
            touched: Vec::new(),
            open_per_tenant: hashbrown::HashMap::new(),
            max_time: None,
            next_offset: 0,
            next_seq: 1,
            next_window_id: 0,
            stats: EngineStats::default(),
            output: Vec::new(),
            accepted: Accepted::default(),
            delta: None,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    pub fn catalog(&self) -> &Arc<MeterCatalog> {
        &self.catalog
    }

    /// Takes the aggregates emitted so far, in `seq` order. The service publishes them; a
    /// snapshot also carries undrained ones, so none is lost either way.
    pub fn drain_output(&mut self) -> std::vec::Drain<'_, MeterAggregate> {
        self.output.drain(..)
    }

    /// The event of the last `on_event` that returned [`Outcome::Accepted`], as parsed.
    pub fn accepted(&self) -> &Accepted {
        &self.accepted
    }

    /// Emitted, not yet drained aggregates.
    pub fn output(&self) -> &[MeterAggregate] {
        &self.output
    }

    /// The first source offset not yet covered (where to resume consuming after a restore).
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// Positions a fresh engine (no input seen yet) at `next_offset`, numbering its output from
    /// `next_seq`: how an operator's `checkpoint replay` decision resumes a partition whose
    /// earlier output consumers have already seen.
    pub fn start_at(&mut self, next_offset: i64, next_seq: i64) -> Result<()> {
        if self.stats.input() != 0 || self.stats.ticks != 0 || next_seq < 1 || next_offset < 0 {
            return Err(Error::Config("start_at needs a fresh engine, next_offset >= 0 and next_seq >= 1".into()));
        }
        self.next_offset = next_offset;
        self.next_seq = next_seq;
        self.stats.first_offset = Some(next_offset);
        Ok(())
    }

    /// The `seq` the next emitted aggregate will get.
    pub fn next_seq(&self) -> i64 {
        self.next_seq
    }

    /// Partition time (highest accepted event time or tick), None before the first.
    pub fn partition_time(&self) -> Option<i64> {
        self.max_time
    }

    /// The lowest meter watermark: partition time minus the largest allowed lateness. Every
    /// window that ends at or before it is closed (for lag metrics).
    pub fn watermark(&self) -> Option<i64> {
        let lateness = self.meters.iter().map(|m| m.def.allowed_lateness_ms).max().unwrap_or(0);
        Some(self.max_time?.saturating_sub(lateness))
    }

    /// The watermark of `meter` (partition time − its allowed lateness).
    pub fn meter_watermark(&self, meter: &str) -> Option<i64> {
        let m = &self.meters[usize::from(*self.meter_index.get(meter)?)].def;
        Some(self.max_time?.saturating_sub(m.allowed_lateness_ms))
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn dedup(&self) -> &Deduplicator {
        &self.dedup
    }

    /// Windows in memory (open and retained closed).
    pub fn windows_in_memory(&self) -> usize {
        self.index.len()
    }

    /// The partition time at which the next open window closes (its end plus lateness).
    pub fn next_close_at(&self) -> Option<i64> {
        self.closing.first_key_value().map(|(&k, _)| k)
    }

    /// Open (not yet closed) windows.
    pub fn open_windows(&self) -> usize {
        self.closing.values().map(Vec::len).sum()
    }

    /// Open windows of `tenant`.
    pub fn open_windows_of(&self, tenant: &str) -> usize {
        self.open_per_tenant.get(tenant.as_bytes()).map_or(0, |&n| n as usize)
    }

    fn check_offset(&self, offset: i64) -> Result<()> {
        if offset < self.next_offset {
            return Err(Error::OffsetRegression {
                partition: self.partition,
                offset,
                next_offset: self.next_offset,
            });
        }
        Ok(())
    }

    /// Moves `next_offset` past `offset` (already checked not to go backwards).
    fn cover(&mut self, offset: i64) {
        self.stats.first_offset.get_or_insert(offset);
        self.next_offset = offset + 1;
    }

    /// Processes the decoded event at `offset` (offsets must increase; gaps are fine).
    /// Aggregates that become final are buffered for [`Self::drain_output`]. On `Err` (a store
    /// failed, or the offset went backwards) the engine is unchanged and the call can be retried.
    pub fn on_event<S: ColdStore + WindowStore + ?Sized>(
        &mut self,
        offset: i64,
        ev: &UsageEventRef<'_>,
        stores: &mut S,
    ) -> Result<Outcome> {
        self.on_event_at(offset, None, ev, stores)
    }

    /// [`Self::on_event`] with the record's log timestamp (Kafka CreateTime or LogAppendTime,
    /// Unix ms). When given, it bounds the event time instead of partition time: too late is
    /// older than the horizon before `max(partition time, record time)`, too early is more than
    /// `max_future` after the record time. Why: partition time only knows what this partition
    /// has seen, so a first event that is itself late (or 36 days old) would otherwise make
    /// every normal event after it look "too early" (or be accepted although too late). The
    /// timestamp is part of the record, so replays decide the same way.
    pub fn on_event_at<S: ColdStore + WindowStore + ?Sized>(
        &mut self,
        offset: i64,
        record_time_ms: Option<i64>,
        ev: &UsageEventRef<'_>,
        stores: &mut S,
    ) -> Result<Outcome> {
        self.check_offset(offset)?;
        let outcome = self.process(ev, offset, record_time_ms, stores)?;
        self.cover(offset);
        match &outcome {
            Outcome::Accepted => self.stats.accepted += 1,
            Outcome::Duplicate => self.stats.duplicates += 1,
            Outcome::Rejected { reason, .. } => self.stats.rejected[*reason as usize] += 1,
        }
        Ok(outcome)
    }

    /// A record the service could not decode (so it never reaches `on_event`): counted as
    /// rejected `Undecodable`, its offset covered, so that stats add up to the input and
    /// `next_offset` moves on. Returns false (and does nothing) for an offset already covered.
    /// (Every other reject reason is decided by the engine, so this takes none.)
    pub fn on_skipped(&mut self, offset: i64) -> bool {
        self.on_rejected(offset, RejectReason::Undecodable)
    }

    /// A record the service rejected before the engine saw it (undecodable, or on the wrong
    /// partition): counted, its offset covered. False (and nothing done) if already covered.
    pub fn on_rejected(&mut self, offset: i64, reason: RejectReason) -> bool {
        if offset < self.next_offset {
            return false;
        }
        self.cover(offset);
        self.stats.rejected[reason as usize] += 1;
        true
    }

    /// A tick control record at `offset` of the input log: the aggregator writes one for an
    /// idle partition with `time_ms` taken from its clock, so that windows close without
    /// traffic, and replay sees the same ticks. Advances partition time to `time_ms` (never
    /// backwards) and emits every pending restatement. `time_ms` is a partition time, comparable
    /// with event times; each meter's lateness still applies.
    pub fn on_tick<S: ColdStore + WindowStore + ?Sized>(
        &mut self,
        offset: i64,
        time_ms: i64,
        stores: &mut S,
    ) -> Result<()> {
        self.check_offset(offset)?;
        self.cover(offset);
        self.stats.ticks += 1;
        self.on_watermark(time_ms, stores);
        Ok(())
    }

    /// Advances partition time to `time_ms` (ignored if not ahead, clamped to ±2^50), closes
    /// windows, emits every pending restatement and evicts expired state. A pure function of
    /// the state and `time_ms`; it covers no offset (use [`Self::on_tick`] for logged ticks).
    pub fn on_watermark<S: ColdStore + WindowStore + ?Sized>(&mut self, time_ms: i64, stores: &mut S) {
        let t = time_ms.clamp(-MAX_ABS_EVENT_TIME_MS, MAX_ABS_EVENT_TIME_MS);
        self.advance(t, stores, true);
    }
}

#[cfg(test)]
mod tests;
