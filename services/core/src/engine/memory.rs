//! [`MemoryStore`]: the in-memory stand-in for the aggregator's ClickHouse tables, for tests
//! and benchmarks.
//!
//! It works the way the production store does, so that tests exercise the same contract: the
//! driver records every **accepted raw event** ([`MemoryStore::record_accepted`]) and every
//! **emitted aggregate** ([`MemoryStore::record_emitted`]), and the store answers the engine's
//! cold dedup look-ups and window reloads from those rows, "as of" the [`SourcePos`] given
//! (rows at later offsets or seqs are invisible). Recording is idempotent per offset and per
//! seq, like a replay re-inserting rows a crashed run already wrote.

use std::collections::HashMap;

use crate::dedup::{ColdQuery, ColdStore, SourcePos};
use crate::event::UsageEventRef;
use crate::meter::{MeterCatalog, MeterDef};
use crate::records::MeterAggregate;
use crate::window::{LastEmitted, LoadedWindow, StoredEvent, WindowQuery, WindowStore};
use crate::Result;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WinKey {
    partition: i32,
    meter: String,
    tenant: String,
    group: Vec<String>,
    window_start: i64,
}

/// (partition, tenant, meter, event_id): the dedup key, per source partition.
type IdKey = (i32, String, String, String);

/// Counters, for tests that check the cold paths were taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStoreStats {
    pub cold_queries: u64,
    pub window_loads: u64,
    /// Evictions of dedup ids to the cold tier (each of one or more buckets).
    pub evictions: u64,
    pub evicted_windows: u64,
}

/// See the module docs.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    meters: HashMap<String, MeterDef>,
    /// (partition, tenant, meter, event_id) → (offset, event time), sorted by offset.
    ids: HashMap<IdKey, Vec<(i64, i64)>>,
    /// Window → its accepted events, sorted by offset.
    windows: HashMap<WinKey, Vec<(i64, StoredEvent)>>,
    /// Window → its emitted revisions, sorted by seq.
    emitted: HashMap<WinKey, Vec<(i64, LastEmitted)>>,
    pub stats: MemoryStoreStats,
}

fn insert_sorted<T>(v: &mut Vec<(i64, T)>, at: i64, item: T) {
    if let Err(i) = v.binary_search_by_key(&at, |(o, _)| *o) {
        v.insert(i, (at, item));
    }
}

impl MemoryStore {
    pub fn new(catalog: &MeterCatalog) -> Self {
        Self {
            meters: catalog.meters().iter().map(|m| (m.name.clone(), m.clone())).collect(),
            ..Self::default()
        }
    }

    /// Records an event the engine returned `Accepted` for (what the aggregator writes to
    /// its raw events table).
    pub fn record_accepted(&mut self, partition: i32, offset: i64, ev: &UsageEventRef<'_>) -> Result<()> {
        let Some(m) = self.meters.get(ev.meter) else {
            return Ok(());
        };
        insert_sorted(
            self.ids
                .entry((partition, ev.tenant.to_owned(), ev.meter.to_owned(), ev.event_id.to_owned()))
                .or_default(),
            offset,
            ev.event_time_ms,
        );
        let key = WinKey {
            partition,
            meter: m.name.clone(),
            tenant: ev.tenant.to_owned(),
            group: m.group_by.iter().map(|g| ev.dimension(g).unwrap_or("").to_owned()).collect(),
            window_start: m.window_start(ev.event_time_ms),
        };
        let stored = StoredEvent {
            event_id: ev.event_id.to_owned(),
            quantity: crate::decimal::parse("quantity", ev.quantity)?,
            event_time_ms: ev.event_time_ms,
            unique_value: m
                .unique_dimension
                .as_deref()
                .map_or("", |u| ev.dimension(u).unwrap_or(""))
                .to_owned(),
            provider_cost: ev.provider_cost.map(|c| crate::decimal::parse("provider_cost", c)).transpose()?,
        };
        insert_sorted(self.windows.entry(key).or_default(), offset, stored);
        Ok(())
    }

    /// Records emitted aggregates (what the aggregator publishes and stores).
    pub fn record_emitted<'a>(&mut self, aggregates: impl IntoIterator<Item = &'a MeterAggregate>) {
        for a in aggregates {
            let key = WinKey {
                partition: a.source_partition,
                meter: a.meter.clone(),
                tenant: a.tenant.clone(),
                group: a.dimensions.values().cloned().collect(),
                window_start: a.window_start,
            };
            insert_sorted(
                self.emitted.entry(key).or_default(),
                a.seq,
                LastEmitted {
                    revision: a.revision,
                    value: a.value,
                    provider_cost: a.provider_cost,
                    uncosted: a.uncosted_value,
                },
            );
        }
    }

    fn key(q: &WindowQuery<'_>) -> WinKey {
        WinKey {
            partition: q.before.partition,
            meter: q.meter.name.clone(),
            tenant: q.tenant.to_owned(),
            group: q.group.iter().map(|(_, v)| (*v).to_owned()).collect(),
            window_start: q.window_start,
        }
    }
}

impl ColdStore for MemoryStore {
    fn contains(&mut self, q: &ColdQuery<'_>) -> Result<bool> {
        self.stats.cold_queries += 1;
        let SourcePos { partition, offset, .. } = q.before;
        Ok(self
            .ids
            .get(&(partition, q.tenant.to_owned(), q.meter.to_owned(), q.event_id.to_owned()))
            .is_some_and(|v| v.iter().any(|&(o, t)| o < offset && t >= q.from_ms)))
    }

    fn evicted(&mut self, _cold_before_ms: i64, _ids: usize) {
        self.stats.evictions += 1;
    }
}

impl WindowStore for MemoryStore {
    fn load(&mut self, q: &WindowQuery<'_>) -> Result<Option<LoadedWindow>> {
        self.stats.window_loads += 1;
        let key = Self::key(q);
        let events: Vec<StoredEvent> = self
            .windows
            .get(&key)
            .map(|v| {
                v.iter()
                    .filter(|(o, _)| *o < q.before.offset)
                    .map(|(_, e)| e.clone())
                    .collect()
            })
            .unwrap_or_default();
        let last_emitted = self
            .emitted
            .get(&key)
            .and_then(|v| v.iter().rev().find(|(s, _)| *s < q.before.next_seq))
            .map(|(_, l)| *l);
        if events.is_empty() && last_emitted.is_none() {
            return Ok(None);
        }
        Ok(Some(LoadedWindow { events, last_emitted }))
    }

    fn window_evicted(&mut self, _q: &WindowQuery<'_>, _last: &LastEmitted) {
        self.stats.evicted_windows += 1;
    }
}
