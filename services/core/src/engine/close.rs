//! Windows in the slab and its indexes, partition time advancing, and emitting what closed
//! or was restated.

use super::*;

/// One window of `tenant` fewer open (tenants with none are absent).
pub(super) fn forget_open(open_per_tenant: &mut hashbrown::HashMap<Box<[u8]>, u32>, tenant: &[u8]) {
    // One hash of the tenant, also when its last window closes.
    if let hashbrown::hash_map::EntryRef::Occupied(mut e) = open_per_tenant.entry_ref(tenant) {
        *e.get_mut() -= 1;
        if *e.get() == 0 {
            e.remove();
        }
    }
}

/// Removes `slot` from the time-index list at `at` (and the list once empty); false if it is
/// not there.
pub(super) fn take_from(lists: &mut BTreeMap<i64, Vec<u32>>, at: i64, slot: u32) -> bool {
    let Some(list) = lists.get_mut(&at) else { return false };
    let Some(i) = list.iter().position(|&s| s == slot) else { return false };
    list.remove(i);
    if list.is_empty() {
        lists.remove(&at);
    }
    true
}

impl PartitionEngine {
    /// The slot of the window with `key`, if in memory.
    pub(super) fn find_slot(&self, hash: u64, key: &WindowKey) -> Option<u32> {
        let slab = &self.slab;
        self.index
            .find(hash, |&i| slab[i as usize].as_ref().is_some_and(|w| &w.key == key))
            .copied()
    }

    /// Puts a window read from a checkpoint in the slab and its indexes, as it was (open or
    /// closed, dirty or not).
    pub(super) fn insert_restored(&mut self, win: Window) {
        let (closed, dirty, close_at) = (win.closed, win.dirty, super::codec::close_at(self, &win));
        let slot = self.insert_window(win, !closed, close_at);
        if dirty {
            self.dirty.push(slot);
        }
    }

    /// Puts a new window in the slab, the hash index and the right time index.
    pub(super) fn insert_window(&mut self, mut w: Window, is_open: bool, close_at: i64) -> u32 {
        w.closed = !is_open;
        let hash = w.hash;
        let slot = match self.free.pop() {
            Some(s) => {
                self.slab[s as usize] = Some(w);
                s
            }
            None => {
                self.slab.push(Some(w));
                (self.slab.len() - 1) as u32
            }
        };
        let slab = &self.slab;
        self.index.insert_unique(hash, slot, |&i| {
            slab[i as usize].as_ref().map_or(0, |w| w.hash)
        });
        if is_open {
            self.closing.entry(close_at).or_default().push(slot);
            let tenant = self.slab[slot as usize].as_ref().expect("just inserted").key.tenant_bytes();
            *self.open_per_tenant.entry_ref(tenant).or_insert(0) += 1;
        } else {
            let evict_at = close_at.saturating_add(self.cfg.retain_closed_ms);
            self.retained.entry(evict_at).or_default().push(slot);
        }
        self.stats.windows_opened += 1;
        slot
    }

    /// Moves partition time to `t` (if ahead) and does everything that follows from it.
    pub(super) fn advance<S: ColdStore + WindowStore + ?Sized>(
        &mut self,
        t: i64,
        store: &mut S,
        force_flush: bool,
    ) {
        let prev = self.max_time;
        if prev.is_some_and(|p| p >= t) {
            if force_flush {
                self.flush_dirty();
            }
            return;
        }
        self.max_time = Some(t);
        self.dedup.advance(t);

        self.close_due(t);
        // Coalesced restatements.
        let interval = self.cfg.restate_interval_ms;
        let crossed = interval > 0 && prev.is_none_or(|p| p.div_euclid(interval) != t.div_euclid(interval));
        if force_flush || crossed {
            self.flush_dirty();
        }
        self.evict_due(t, store);
    }

    /// Closes the windows due at `t` (revision 0).
    fn close_due(&mut self, t: i64) {
        if self.closing.first_key_value().is_none_or(|(&k, _)| k > t) {
            return;
        }
        let mut batch: Vec<(i64, u32)> = Vec::new();
        while let Some(entry) = self.closing.first_entry() {
            if *entry.key() > t {
                break;
            }
            let close_at = *entry.key();
            batch.extend(entry.remove().into_iter().map(|s| (close_at, s)));
        }
        // Each list is in creation order (windows are pushed when created), so the batch
        // is in (close time, creation) order without sorting.
        for (close_at, slot) in batch {
            let w = self.slab[slot as usize].as_mut().expect("live");
            w.closed = true;
            forget_open(&mut self.open_per_tenant, w.key.tenant_bytes());
            self.emit(slot);
            let evict_at = close_at.saturating_add(self.cfg.retain_closed_ms);
            self.retained.entry(evict_at).or_default().push(slot);
        }
    }

    /// Evicts closed windows past retention at `t` (flushing their pending restatements first).
    fn evict_due<S: ColdStore + WindowStore + ?Sized>(&mut self, t: i64, store: &mut S) {
        if self.retained.first_key_value().is_none_or(|(&k, _)| k > t) {
            return;
        }
        let mut batch: Vec<u32> = Vec::new();
        while let Some(entry) = self.retained.first_entry() {
            if *entry.key() > t {
                break;
            }
            batch.extend(entry.remove());
        }
        if batch.iter().any(|&s| self.slab[s as usize].as_ref().expect("live").dirty) {
            self.flush_dirty();
        }
        // (Eviction order only affects store notifications, never output.)
        let pos = SourcePos {
            partition: self.partition,
            offset: self.next_offset,
            next_seq: self.next_seq,
        };
        for slot in batch {
            self.evict(slot, pos, store);
        }
    }

    /// Drops the window in `slot` and tells the store its last emission.
    fn evict<S: ColdStore + WindowStore + ?Sized>(&mut self, slot: u32, pos: SourcePos, store: &mut S) {
        let w = self.slab[slot as usize].take().expect("live");
        self.note_evicted(&w);
        self.index
            .find_entry(w.hash, |&i| i == slot)
            .expect("evicted window is indexed")
            .remove();
        self.free.push(slot);
        let rt = &mut self.meters[usize::from(w.key.meter)];
        let window_end = w.key.window_start + rt.def.window_ms;
        rt.evicted_end_bound = rt.evicted_end_bound.max(window_end);
        self.stats.windows_evicted += 1;
        let mut inline = [("", ""); INLINE_DIMS];
        let heap: Vec<(&str, &str)>;
        let (tenant, dims) = w.key.tenant_and_dims();
        let pairs = rt.def.group_by.iter().map(String::as_str).zip(dims);
        let group: &[(&str, &str)] = if rt.def.group_by.len() <= INLINE_DIMS {
            for (slot, pair) in inline.iter_mut().zip(pairs) {
                *slot = pair;
            }
            &inline[..rt.def.group_by.len()]
        } else {
            heap = pairs.collect();
            &heap
        };
        let q = WindowQuery {
            meter: &rt.def,
            tenant,
            group,
            window_start: w.key.window_start,
            window_end,
            before: pos,
        };
        let last = w.last.expect("a closed, flushed window has been emitted");
        store.window_evicted(&q, &last);
    }

    /// Emits every dirty window, in opening order.
    pub(super) fn flush_dirty(&mut self) {
        if self.dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        let slab = &self.slab;
        dirty.sort_unstable_by_key(|&s| slab[s as usize].as_ref().expect("live").created);
        for &slot in &dirty {
            self.emit(slot);
        }
        dirty.clear();
        self.dirty = dirty;
    }

    /// Emits the current state of a closed window as its next revision.
    pub(super) fn emit(&mut self, slot: u32) {
        let now = self.max_time.expect("emission happens after time started");
        let w = self.slab[slot as usize].as_mut().expect("live");
        let m = &self.meters[usize::from(w.key.meter)].def;
        let value = w.value(m.aggregation);
        let provider_cost = canonical(w.provider_cost);
        // Per-event cost needs an additive value: for min/max/avg/latest/unique the rater
        // keeps pricing the window's value (carried cost if any, else rate card x value).
        let uncosted_value =
            matches!(m.aggregation, Aggregation::Sum | Aggregation::Count).then(|| canonical(w.uncosted));
        let (revision, previous_value, previous_provider_cost, previous_uncosted_value) = match &w.last {
            None => (0, Decimal::ZERO, Decimal::ZERO, uncosted_value.map(|_| Decimal::ZERO)),
            Some(l) => (l.revision + 1, l.value, l.provider_cost, l.uncosted),
        };
        // Inserting in (sorted) group_by order is cheaper than `collect`, which sorts.
        let (tenant, dims) = w.key.tenant_and_dims();
        let mut dimensions = BTreeMap::new();
        for (name, value) in m.group_by.iter().zip(dims) {
            dimensions.insert(name.clone(), value.to_owned());
        }
        self.output.push(MeterAggregate {
            tenant: tenant.to_owned(),
            meter: m.name.clone(),
            aggregation: m.aggregation.as_str().to_owned(),
            dimensions,
            window_start: w.key.window_start,
            window_end: w.key.window_start + m.window_ms,
            revision,
            value,
            previous_value,
            event_count: w.event_count,
            provider_cost,
            previous_provider_cost,
            source_partition: self.partition,
            seq: self.next_seq,
            emitted_at: now.saturating_sub(m.allowed_lateness_ms),
            uncosted_value,
            previous_uncosted_value,
        });
        self.next_seq += 1;
        self.stats.aggregates += 1;
        if revision > 0 {
            self.stats.restatements += 1;
        }
        w.last = Some(LastEmitted {
            revision,
            value,
            provider_cost,
            uncosted: uncosted_value,
        });
        w.dirty = false;
        self.note_changed(slot);
    }
}
