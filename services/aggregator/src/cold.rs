//! The engine's cold tiers over ClickHouse: the raw events and aggregates the aggregator has
//! already written are what it needs to recognise old duplicates and rebuild days-old
//! windows, so no second store is kept.
//!
//! Both answer "as of" the engine's position: rows written at or after the current offset
//! (or seq) are ignored, so that a replay after a crash, which finds rows the first run wrote
//! ahead of its checkpoint, sees what the first run saw. Rows not yet in ClickHouse are
//! consulted in memory: the buffer being filled and the batch being written.

use std::collections::{BTreeMap, HashSet};

use clickhouse::Client;
use meterflow_core::decimal::from_ch_i128;
use meterflow_core::dedup::{ColdQuery, ColdStore};
use meterflow_core::records::dimensions_key;
use meterflow_core::window::{LastEmitted, LoadedWindow, StoredEvent, WindowQuery, WindowStore};
use meterflow_core::Error;
use serde::Deserialize;
use tokio::runtime::Handle;

use crate::sink::Outputs;

/// Borrowed for the duration of one engine call.
pub struct ChStores<'a> {
    pub client: &'a Client,
    pub handle: &'a Handle,
    /// The outputs being buffered.
    pub pending: &'a Outputs,
    /// The batch being written, if any (possibly partly in ClickHouse already).
    pub writing: Option<&'a Outputs>,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct EventRow {
    event_id: String,
    quantity: i128,
    event_time_ms: i64,
    unique_value: String,
    provider_cost: i128,
    has_provider_cost: u8,
    source_offset: i64,
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct LastRow {
    revision: u32,
    value: i128,
    provider_cost: i128,
    seq: i64,
}

impl ChStores<'_> {
    /// Outputs not known to be in ClickHouse yet.
    fn unwritten(&self) -> impl Iterator<Item = &Outputs> {
        std::iter::once(self.pending).chain(self.writing)
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        // The engine is synchronous (no I/O in the core); cold look-ups are rare (old
        // duplicates, days-old windows), so blocking this worker briefly is the simple choice.
        tokio::task::block_in_place(|| self.handle.block_on(f))
    }
}

fn store_err(e: clickhouse::error::Error) -> Error {
    Error::Store(e.to_string())
}

impl ColdStore for ChStores<'_> {
    /// Asked only when an evicted id's fingerprint matches, so a round trip is affordable.
    /// `usage_event_ids` is sorted by (tenant, meter, event_id): the look-up reads one
    /// granule per month partition, whatever the horizon (migration 014).
    fn contains(&mut self, q: &ColdQuery<'_>) -> Result<bool, Error> {
        let p = q.before.partition;
        let buffered = self.unwritten().flat_map(|o| o.usage.iter()).any(|r| {
            r.source_partition == p
                && r.source_offset < q.before.offset
                && r.tenant == q.tenant
                && r.meter == q.meter
                && r.event_id == q.event_id
                && r.event_time_ms >= q.from_ms
        });
        if buffered {
            return Ok(true);
        }
        let n: u64 = self
            .block_on(
                self.client
                    .query(
                        "SELECT count() FROM usage_event_ids WHERE tenant = ? AND meter = ? AND event_id = ? \
                         AND source_partition = ? AND event_time_ms >= ? AND source_offset < ?",
                    )
                    .bind(q.tenant)
                    .bind(q.meter)
                    .bind(q.event_id)
                    .bind(p)
                    .bind(q.from_ms)
                    .bind(q.before.offset)
                    .fetch_one::<u64>(),
            )
            .map_err(store_err)?;
        Ok(n > 0)
    }
}

impl WindowStore for ChStores<'_> {
    fn load(&mut self, q: &WindowQuery<'_>) -> Result<Option<LoadedWindow>, Error> {
        let events = self.events(q)?;
        let last_emitted = self.last_emitted(q)?;
        if events.is_empty() && last_emitted.is_none() {
            return Ok(None);
        }
        Ok(Some(LoadedWindow { events, last_emitted }))
    }
}

impl ChStores<'_> {
    /// The window's events before the query's offset, stored or still buffered, each source
    /// offset once (a replay may have inserted a row twice), in offset order.
    fn events(&mut self, q: &WindowQuery<'_>) -> Result<Vec<StoredEvent>, Error> {
        let p = q.before.partition;
        let unique_dim = q.meter.unique_dimension.as_deref().unwrap_or("");
        let mut sql = String::from(
            "SELECT event_id, quantity, event_time_ms, \
             if(? = '', '', dim_values[indexOf(dim_keys, ?)]) AS unique_value, \
             provider_cost, has_provider_cost, source_offset \
             FROM usage_events WHERE source_partition = ? AND tenant = ? AND meter = ? \
             AND event_time_ms >= ? AND event_time_ms < ? AND source_offset < ?",
        );
        for _ in q.group {
            sql.push_str(" AND dim_values[indexOf(dim_keys, ?)] = ?");
        }
        let mut query = self
            .client
            .query(&sql)
            .bind(unique_dim)
            .bind(unique_dim)
            .bind(p)
            .bind(q.tenant)
            .bind(q.meter.name.as_str())
            .bind(q.window_start)
            .bind(q.window_end)
            .bind(q.before.offset);
        for (k, v) in q.group {
            query = query.bind(*k).bind(*v);
        }
        let stored: Vec<EventRow> = self.block_on(query.fetch_all()).map_err(store_err)?;

        // Replays may have inserted a row twice: one per source offset.
        let mut seen = HashSet::new();
        let mut rows: Vec<(i64, StoredEvent)> = Vec::new();
        for r in stored {
            if seen.insert(r.source_offset) {
                rows.push((
                    r.source_offset,
                    StoredEvent {
                        event_id: r.event_id,
                        quantity: from_ch_i128(r.quantity),
                        event_time_ms: r.event_time_ms,
                        unique_value: r.unique_value,
                        provider_cost: (r.has_provider_cost != 0).then(|| from_ch_i128(r.provider_cost)),
                    },
                ));
            }
        }
        for r in self.unwritten().flat_map(|o| o.usage.iter()) {
            let matches = r.source_partition == p
                && r.source_offset < q.before.offset
                && r.tenant == q.tenant
                && r.meter == q.meter.name
                && r.event_time_ms >= q.window_start
                && r.event_time_ms < q.window_end
                && q.group.iter().all(|(k, v)| r.dim(k) == *v);
            if matches && seen.insert(r.source_offset) {
                rows.push((
                    r.source_offset,
                    StoredEvent {
                        event_id: r.event_id.to_owned(),
                        quantity: from_ch_i128(r.quantity),
                        event_time_ms: r.event_time_ms,
                        unique_value: if unique_dim.is_empty() {
                            String::new()
                        } else {
                            r.dim(unique_dim).to_owned()
                        },
                        provider_cost: r.has_provider_cost.then(|| from_ch_i128(r.provider_cost)),
                    },
                ));
            }
        }
        rows.sort_by_key(|(o, _)| *o);
        Ok(rows.into_iter().map(|(_, e)| e).collect())
    }

    /// What was last emitted for the window before the query's seq: the newer of the
    /// buffered and the stored revision.
    fn last_emitted(&mut self, q: &WindowQuery<'_>) -> Result<Option<LastEmitted>, Error> {
        let p = q.before.partition;
        let group: BTreeMap<String, String> =
            q.group.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let key = dimensions_key(&group);
        let buffered_last = self
            .unwritten()
            .flat_map(|o| &o.aggregates)
            .filter(|a| {
                a.source_partition == p
                    && a.seq < q.before.next_seq
                    && a.tenant == q.tenant
                    && a.meter == q.meter.name
                    && a.window_start == q.window_start
                    && a.dimensions == group
            })
            .max_by_key(|a| a.seq)
            .map(|a| (a.seq, LastEmitted {
                    revision: a.revision,
                    value: a.value,
                    provider_cost: a.provider_cost,
                    uncosted: a.uncosted_value,
                }));
        let stored_last: Vec<LastRow> = self
            .block_on(
                self.client
                    .query(
                        "SELECT revision, value, provider_cost, seq FROM meter_revisions \
                         WHERE source_partition = ? AND tenant = ? AND meter = ? AND dimensions_key = ? \
                         AND window_start_ms = ? AND seq < ? ORDER BY seq DESC LIMIT 1",
                    )
                    .bind(p)
                    .bind(q.tenant)
                    .bind(q.meter.name.as_str())
                    .bind(key.as_str())
                    .bind(q.window_start)
                    .bind(q.before.next_seq)
                    .fetch_all(),
            )
            .map_err(store_err)?;
        let stored_last = match stored_last.into_iter().next() {
            None => None,
            Some(r) => {
                // Its uncosted part (no row: not additive, or emitted before migration 009).
                let uncosted: Vec<i128> = self
                    .block_on(
                        self.client
                            .query("SELECT uncosted_value FROM aggregate_uncosted WHERE source_partition = ? AND seq = ? LIMIT 1")
                            .bind(p)
                            .bind(r.seq)
                            .fetch_all(),
                    )
                    .map_err(store_err)?;
                Some((
                    r.seq,
                    LastEmitted {
                        revision: r.revision as i32,
                        value: from_ch_i128(r.value),
                        provider_cost: from_ch_i128(r.provider_cost),
                        uncosted: uncosted.first().map(|u| from_ch_i128(*u)),
                    },
                ))
            }
        };
        Ok(match (buffered_last, stored_last) {
            (Some(a), Some(b)) => Some(if a.0 >= b.0 { a.1 } else { b.1 }),
            (a, b) => a.or(b).map(|x| x.1),
        })
    }
}

