//! The per-event path, in the validation order of the module docs: checks that need no
//! parsing, the dedup probe, the amounts, the window (found, reloaded or created within the
//! memory limits), then the commit.

use super::*;

/// An event's fate decided before it is counted: `Err` carries the outcome to return.
type Step<T> = std::result::Result<T, Outcome>;

/// What finding the event's window needs: its key as borrowed parts of the event (so that
/// finding an existing window allocates nothing) and where the event stands in the source (for
/// a store's reload).
struct Lookup<'a> {
    meter: u16,
    window_start: i64,
    tenant: &'a str,
    dims: &'a [&'a str],
    hash: u64,
    pos: SourcePos,
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

fn reject(reason: RejectReason, detail: String) -> Outcome {
    Outcome::Rejected { reason, detail }
}

fn overflow_reject(o: Overflow) -> Outcome {
    match o {
        Overflow::Quantity => reject(RejectReason::BadQuantity, "window total would lose precision".into()),
        Overflow::ProviderCost => {
            reject(RejectReason::BadProviderCost, "window provider cost would lose precision".into())
        }
    }
}

/// Quantity and provider cost, parsed and checked against the meter's limits.
fn amounts(m: &MeterDef, ev: &UsageEventRef<'_>) -> Step<(Decimal, Option<Decimal>)> {
    let quantity = parse_decimal("quantity", ev.quantity).map_err(|e| reject(RejectReason::BadQuantity, e.to_string()))?;
    if !m.allow_negative && quantity < Decimal::ZERO {
        return Err(reject(
            RejectReason::NegativeQuantity,
            format!("quantity {} is negative and meter {} does not allow_negative", truncate(ev.quantity), m.name),
        ));
    }
    if let Some(max) = m.max_quantity {
        if quantity.abs() > max {
            return Err(reject(
                RejectReason::QuantityOutOfRange,
                format!("|quantity| {} is above max_quantity {max} of meter {}", truncate(ev.quantity), m.name),
            ));
        }
    }
    let provider_cost = ev
        .provider_cost
        .map(|c| parse_decimal("provider_cost", c))
        .transpose()
        .map_err(|e| reject(RejectReason::BadProviderCost, e.to_string()))?;
    Ok((quantity, provider_cost))
}

impl PartitionEngine {
    /// The outcome of one event; `Err` only for a failed store (nothing is changed then).
    pub(super) fn process<S: ColdStore + WindowStore + ?Sized>(
        &mut self,
        ev: &UsageEventRef<'_>,
        offset: i64,
        record_time_ms: Option<i64>,
        store: &mut S,
    ) -> Result<Outcome> {
        let mi = match self.admit(ev, record_time_ms) {
            Ok(mi) => mi,
            Err(o) => return Ok(o),
        };
        let t = ev.event_time_ms;
        let pos = SourcePos { partition: self.partition, offset, next_seq: self.next_seq };
        let new_id = match self.dedup.probe(ev.tenant, ev.meter, ev.event_id, t, pos, store)? {
            Probe::Duplicate => return Ok(Outcome::Duplicate),
            Probe::New(id) => id,
        };
        let m = &self.meters[usize::from(mi)].def;
        let (quantity, provider_cost) = match amounts(m, ev) {
            Ok(a) => a,
            Err(o) => return Ok(o),
        };
        let window_start = m.window_start(t);
        let mut inline = [""; INLINE_DIMS];
        let heap: Vec<&str>;
        let dims: &[&str] = if m.group_by.len() <= INLINE_DIMS {
            for (slot, name) in inline.iter_mut().zip(&m.group_by) {
                *slot = ev.dimension(name).unwrap_or("");
            }
            &inline[..m.group_by.len()]
        } else {
            heap = m.group_by.iter().map(|name| ev.dimension(name).unwrap_or("")).collect();
            &heap
        };
        let unique_value = m.unique_dimension.as_ref().map_or("", |u| ev.dimension(u).unwrap_or(""));
        let c = Contribution { quantity, event_time_ms: t, event_id: ev.event_id, unique_value, provider_cost };
        let hash = key_hash(&self.hasher, mi, window_start, ev.tenant, dims.iter().copied());
        let k = Lookup { meter: mi, window_start, tenant: ev.tenant, dims, hash, pos };
        let slot = match self.window_for(&k, &c, store)? {
            Ok(slot) => slot,
            Err(o) => return Ok(o),
        };
        self.accepted = Accepted { quantity, provider_cost, window_start };
        self.accept(new_id, slot, t, store)
    }

    /// The checks before the dedup probe (no parsing): tenant, event id, meter, and the event
    /// time against the horizon and `max_future`. The meter's index if they pass.
    fn admit(&self, ev: &UsageEventRef<'_>, record_time_ms: Option<i64>) -> Step<u16> {
        if ev.tenant.is_empty() {
            return Err(reject(RejectReason::MissingTenant, "empty tenant".into()));
        }
        if ev.event_id.is_empty() {
            return Err(reject(RejectReason::MissingEventId, "empty event_id".into()));
        }
        let Some(&mi) = self.meter_index.get(ev.meter) else {
            return Err(reject(RejectReason::UnknownMeter, format!("unknown meter {:?}", truncate(ev.meter))));
        };
        let m = &self.meters[usize::from(mi)].def;
        let t = ev.event_time_ms;
        let now = match (self.max_time, record_time_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let floor = now.map(|now| self.dedup.floor(now));
        if t < -MAX_ABS_EVENT_TIME_MS || floor.is_some_and(|f| t < f) {
            return Err(reject(
                RejectReason::TooLate,
                match floor {
                    Some(f) => format!("event time {t} is older than the dedup horizon (earliest accepted {f})"),
                    None => format!("event time {t} is before -2^50"),
                },
            ));
        }
        let latest = record_time_ms.or(self.max_time).map(|now| now.saturating_add(m.max_future_ms));
        if t > MAX_ABS_EVENT_TIME_MS || latest.is_some_and(|l| t > l) {
            return Err(reject(
                RejectReason::TooEarly,
                match latest {
                    Some(l) => format!("event time {t} is beyond max_future (latest accepted {l})"),
                    None => format!("event time {t} is after 2^50"),
                },
            ));
        }
        Ok(mi)
    }

    /// The slot of the event's window with `c` applied: an existing one, or a new one.
    fn window_for<S: WindowStore + ?Sized>(&mut self, k: &Lookup<'_>, c: &Contribution<'_>, store: &mut S) -> Result<Step<u32>> {
        let slab = &self.slab;
        let found = self
            .index
            .find(k.hash, |&i| {
                slab[i as usize]
                    .as_ref()
                    .is_some_and(|w| w.key.matches(k.meter, k.window_start, k.tenant, k.dims))
            })
            .copied();
        let Some(i) = found else { return self.new_window(k, c, store) };
        let w = self.slab[i as usize].as_mut().expect("indexed slot is live");
        Ok(w.try_apply(c).map(|()| i).map_err(overflow_reject))
    }

    /// A window not in memory: refused by the memory limits, reloaded from the store (if it
    /// may have been evicted) or new.
    fn new_window<S: WindowStore + ?Sized>(&mut self, k: &Lookup<'_>, c: &Contribution<'_>, store: &mut S) -> Result<Step<u32>> {
        let m = &self.meters[usize::from(k.meter)];
        let window_end = k.window_start + m.def.window_ms;
        let close_at = window_end + m.def.allowed_lateness_ms;
        let is_open = self.max_time.is_none_or(|now| close_at > now);
        let may_be_evicted = !is_open && window_end <= m.evicted_end_bound;
        if let Err(o) = self.check_limits(k.tenant, is_open) {
            return Ok(Err(o));
        }
        let key = WindowKey::new(k.meter, k.window_start, k.tenant, k.dims.iter().copied());
        let created = self.next_window_id;
        let agg = m.def.aggregation;
        let loaded = if may_be_evicted { self.load_evicted(k, window_end, store)? } else { None };
        let base = match &loaded {
            Some(loaded) => Window::rebuild(key.clone(), k.hash, created, agg, loaded)?,
            None => None,
        };
        if loaded.is_some() {
            self.stats.windows_loaded += 1;
        }
        let w = match base {
            Some(mut w) => {
                if let Err(o) = w.try_apply(c) {
                    return Ok(Err(overflow_reject(o)));
                }
                w
            }
            None => {
                let mut w = Window::new(key, k.hash, created, agg, c);
                // (No events but an emission cannot happen within the horizon; if a store
                // says so anyway, the revision sequence still continues.)
                w.last = loaded.and_then(|l| l.last_emitted);
                w
            }
        };
        self.next_window_id += 1;
        Ok(Ok(self.insert_window(w, is_open, close_at)))
    }

    /// Memory limits, checked before anything is loaded or allocated. Both counts are
    /// functions of the input so far, so a replay rejects the same events.
    fn check_limits(&self, tenant: &str, is_open: bool) -> Step<()> {
        if is_open && self.open_windows_of(tenant) >= self.cfg.max_open_windows_per_tenant {
            return Err(reject(
                RejectReason::WindowLimit,
                format!(
                    "tenant {:?} has {} open windows in partition {}, the limit (max_open_windows_per_tenant)",
                    truncate(tenant),
                    self.cfg.max_open_windows_per_tenant,
                    self.partition
                ),
            ));
        }
        if self.index.len() >= self.cfg.max_windows {
            return Err(reject(
                RejectReason::WindowLimit,
                format!(
                    "partition {} holds {} windows in memory, the limit (max_windows)",
                    self.partition, self.cfg.max_windows
                ),
            ));
        }
        Ok(())
    }

    /// Asks the store for an evicted window's raw events and last emission.
    fn load_evicted<S: WindowStore + ?Sized>(&self, k: &Lookup<'_>, window_end: i64, store: &mut S) -> Result<Option<LoadedWindow>> {
        let m = &self.meters[usize::from(k.meter)].def;
        let group: Vec<(&str, &str)> = m.group_by.iter().map(String::as_str).zip(k.dims.iter().copied()).collect();
        let q = WindowQuery {
            meter: m,
            tenant: k.tenant,
            group: &group,
            window_start: k.window_start,
            window_end,
            before: k.pos,
        };
        store.load(&q)
    }

    /// Commits the id, marks a closed window dirty and moves time.
    fn accept<S: ColdStore + WindowStore + ?Sized>(
        &mut self,
        new_id: crate::dedup::NewId,
        slot: u32,
        t: i64,
        store: &mut S,
    ) -> Result<Outcome> {
        self.dedup.commit(new_id, store);
        let w = self.slab[slot as usize].as_mut().expect("live slot");
        if w.closed && !w.dirty {
            w.dirty = true;
            self.dirty.push(slot);
        } else if !w.closed && !w.touched {
            w.touched = true;
            self.touched.push(slot);
            self.compact_touched();
        }
        self.note_changed(slot);
        if self.max_time.is_none_or(|now| t > now) {
            self.advance(t, store, false);
        }
        if self.cfg.restate_interval_ms == 0 && !self.dirty.is_empty() {
            self.flush_dirty();
        }
        Ok(Outcome::Accepted)
    }
}
