//! Incremental checkpoints: what changed in a [`PartitionEngine`] since the last checkpoint
//! (a full snapshot or the previous delta), so that checkpoint cost follows the traffic, not
//! the state (150 MiB of dedup ids at 10M events).
//!
//! **What is tracked.** While armed (after [`PartitionEngine::snapshot_marked`],
//! [`PartitionEngine::restore`] or [`PartitionEngine::apply_delta`]): the slots of windows
//! created or changed (a flag on the window and a push, once per window per delta), the keys
//! of windows evicted that existed at the mark, and the deduplicator's calls in order (see
//! `dedup::delta`). Header fields (offsets, seq, time, counters, eviction bounds) and the
//! undrained output are small and written whole.
//!
//! **Chain.** Every checkpoint is identified by its trailing checksum. A delta names the one it
//! follows; [`PartitionEngine::apply_delta`] refuses a delta that does not follow the engine's
//! current state (wrong base, out of order, a gap), before changing anything, so a broken
//! chain is an error and never a silently wrong state.
//!
//! Layout: `MFENGDLT | version u32 | prev id u64 | partition | header | meters | evicted keys |
//! changed windows | dedup calls | output | checksum u64`, with the snapshot's codec
//! (bounds-checked, counts checked against the bytes left, garbage never panics).

use super::codec::*;
use super::snapshot::{open_as, seal_as, sealed_id};
use super::close::{forget_open, take_from};
use super::PartitionEngine;
use crate::checkpoint::StateHeader;
use crate::window::{Window, WindowKey};
use crate::{Error, Result};

pub(crate) const DELTA_MAGIC: &[u8; 8] = b"MFENGDLT";
const DELTA_VERSION: u32 = 1;
const DELTA_HEADER: StateHeader = StateHeader { magic: DELTA_MAGIC, readable: &[DELTA_VERSION] };

/// What changed since the last mark.
#[derive(Debug, Default)]
pub(super) struct Tracker {
    /// Id of the checkpoint the state equalled at the mark.
    chain: u64,
    /// Windows created from this number on did not exist at the mark.
    first_new_window: u64,
    /// Slots of changed windows (stale or repeated entries are skipped: the flag decides).
    slots: Vec<u32>,
    /// Windows that existed at the mark and were evicted since.
    removed: Vec<(u64, WindowKey)>,
}

fn corrupt(what: &str) -> Error {
    Error::Snapshot(format!("corrupt delta: {what}"))
}

/// Is `bytes` an engine delta (as opposed to a full snapshot)?
pub fn is_delta(bytes: &[u8]) -> bool {
    bytes.starts_with(DELTA_MAGIC)
}

fn open_delta(bytes: &[u8]) -> Result<&[u8]> {
    Ok(open_as(&DELTA_HEADER, "delta", bytes)?.1)
}

impl PartitionEngine {
    /// Arms tracking at the checkpoint `id`, forgetting what was tracked before.
    pub(super) fn mark_at(&mut self, id: u64) {
        let t = self.delta.get_or_insert_with(Tracker::default);
        for s in t.slots.drain(..) {
            if let Some(Some(w)) = self.slab.get_mut(s as usize) {
                w.changed = false;
            }
        }
        t.removed.clear();
        t.chain = id;
        t.first_new_window = self.next_window_id;
        self.dedup.track_ops();
    }

    /// Takes the positions and counters of a restored checkpoint (`bytes`, a snapshot or a
    /// delta) and arms deltas on it.
    pub(super) fn resume_at(&mut self, h: Header, bytes: &[u8]) {
        self.next_offset = h.next_offset;
        self.next_seq = h.next_seq;
        self.max_time = h.max_time;
        self.next_window_id = h.next_window_id;
        self.stats = h.stats;
        self.mark_at(sealed_id(bytes));
    }

    /// Records that the window in `slot` changed (the per-record cost of tracking).
    #[inline]
    pub(super) fn note_changed(&mut self, slot: u32) {
        if let Some(t) = &mut self.delta {
            let w = self.slab[slot as usize].as_mut().expect("live slot");
            if !w.changed {
                w.changed = true;
                t.slots.push(slot);
            }
        }
    }

    /// Records the eviction of `w` (if it existed at the mark, a delta must remove it).
    pub(super) fn note_evicted(&mut self, w: &Window) {
        if let Some(t) = &mut self.delta {
            if w.created < t.first_new_window {
                t.removed.push((w.created, w.key.clone()));
            }
        }
    }

    /// [`Self::snapshot`], and the mark that later deltas build on.
    pub fn snapshot_marked(&mut self) -> Vec<u8> {
        let bytes = self.snapshot();
        self.mark_at(sealed_id(&bytes));
        bytes
    }

    /// Changes tracked since the last mark: deltas are armed (a full snapshot has been marked,
    /// or the engine was restored).
    pub fn tracks_deltas(&self) -> bool {
        self.delta.is_some()
    }

    /// What changed since the last checkpoint (full or delta), as bytes that
    /// [`Self::apply_delta`] applies to that checkpoint's state; then marks. Its size and cost
    /// follow the windows touched and ids accepted since, not the state.
    pub fn checkpoint_delta(&mut self) -> Result<Vec<u8>> {
        let mut t = self
            .delta
            .take()
            .ok_or_else(|| Error::Snapshot("no checkpoint to build a delta on: take a marked snapshot first".into()))?;
        let mut w = Writer::default();
        w.u64(t.chain);
        Header::of(self).write(&mut w);
        w.opt_i64(self.stats.first_offset);
        write_meters(&mut w, self);
        t.removed.sort_unstable_by_key(|&(created, _)| created);
        w.len(t.removed.len());
        for (created, key) in t.removed.drain(..) {
            write_key(&mut w, created, &key);
        }
        let mut changed: Vec<u32> = Vec::with_capacity(t.slots.len());
        for &s in &t.slots {
            if let Some(win) = self.slab[s as usize].as_mut().filter(|w| w.changed) {
                win.changed = false;
                changed.push(s);
            }
        }
        let slab = &self.slab;
        changed.sort_unstable_by_key(|&s| slab[s as usize].as_ref().map_or(0, |w| w.created));
        w.len(changed.len());
        for s in changed {
            write_window(&mut w, self.slab[s as usize].as_ref().expect("live slot"));
        }
        t.slots.clear();
        self.dedup.write_delta(&mut w);
        write_output(&mut w, &self.output);
        let bytes = seal_as(&DELTA_HEADER, DELTA_VERSION, w);
        t.chain = sealed_id(&bytes);
        t.first_new_window = self.next_window_id;
        self.delta = Some(t);
        Ok(bytes)
    }

    /// Applies a delta from [`Self::checkpoint_delta`] to the state of the checkpoint it
    /// follows. A delta of another chain or out of order is refused before anything changes;
    /// an error after that (a delta that passed its checksum but contradicts the state, i.e. a
    /// bug) leaves the engine unusable: discard it.
    pub fn apply_delta(&mut self, bytes: &[u8]) -> Result<()> {
        let body = open_delta(bytes)?;
        let mut r = Reader::new(body);
        let prev = r.u64()?;
        let at = self.delta.as_ref().map(|t| t.chain);
        if at != Some(prev) {
            return Err(Error::Snapshot(format!(
                "delta follows checkpoint {prev:016x}, but this engine is at {}: wrong base, or deltas missing or out of order",
                at.map_or("an unmarked state".to_owned(), |c| format!("{c:016x}"))
            )));
        }
        let mut h = Header::read(&mut r)?;
        h.stats.first_offset = r.opt_i64()?;
        if h.partition != self.partition {
            return Err(corrupt("partition"));
        }
        if h.next_offset < self.next_offset || h.next_seq < self.next_seq || h.next_window_id < self.next_window_id {
            return Err(corrupt("positions go backwards"));
        }
        let map = read_meters(&mut r, self)?;
        let n = r.len(29)?;
        for _ in 0..n {
            let k = read_key(&mut r, self, &map)?;
            self.unlink_evicted(k)?;
        }
        let old_next = self.next_window_id;
        read_windows(&mut r, self, &map, h.next_window_id, |e, win| e.put_window(win, old_next))?;
        self.dedup.apply_delta(&mut r)?;
        let output = read_output(&mut r)?;
        if r.remaining() != 0 {
            return Err(corrupt("trailing bytes"));
        }
        self.output = output;
        self.resume_at(h, bytes);
        Ok(())
    }

    /// Removes a window the delta says was evicted: it existed at the base (open or closed
    /// there) and is gone from the state the delta describes.
    fn unlink_evicted(&mut self, k: KeyRecord) -> Result<()> {
        let slot = self.find_slot(k.hash, &k.key).ok_or_else(|| corrupt("evicts a window the state does not hold"))?;
        let w = self.slab[slot as usize].as_ref().expect("indexed slot is live");
        if w.created != k.created {
            return Err(corrupt("evicts another window"));
        }
        let close_at = close_at(self, w);
        let (lists, at) = if w.closed {
            (&mut self.retained, close_at.saturating_add(self.cfg.retain_closed_ms))
        } else {
            forget_open(&mut self.open_per_tenant, w.key.tenant_bytes());
            (&mut self.closing, close_at)
        };
        if !take_from(lists, at, slot) {
            return Err(corrupt("evicted window not in its time index"));
        }
        if w.dirty {
            self.dirty.retain(|&s| s != slot);
        }
        self.index
            .find_entry(k.hash, |&i| i == slot)
            .map_err(|_| corrupt("window index"))?
            .remove();
        self.slab[slot as usize] = None;
        self.free.push(slot);
        Ok(())
    }

    /// Inserts a window created since the base, or updates one in place (keeping its place in
    /// the close-time lists, which order output by creation).
    fn put_window(&mut self, win: Window, old_next: u64) -> Result<()> {
        let Some(slot) = self.find_slot(win.hash, &win.key) else {
            if win.created < old_next {
                return Err(corrupt("updates a window the state does not hold"));
            }
            self.insert_restored(win);
            return Ok(());
        };
        let old = self.slab[slot as usize].as_ref().expect("indexed slot is live");
        if old.created != win.created || (old.closed && !win.closed) {
            return Err(corrupt("window identity or state regresses"));
        }
        if !old.closed && win.closed {
            let close_at = close_at(self, old);
            if !take_from(&mut self.closing, close_at, slot) {
                return Err(corrupt("open window not closing"));
            }
            forget_open(&mut self.open_per_tenant, old.key.tenant_bytes());
            self.retained.entry(close_at.saturating_add(self.cfg.retain_closed_ms)).or_default().push(slot);
        }
        match (old.dirty, win.dirty) {
            (false, true) => self.dirty.push(slot),
            (true, false) => self.dirty.retain(|&s| s != slot),
            _ => {}
        }
        self.slab[slot as usize] = Some(win);
        Ok(())
    }
}
