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
use super::snapshot::{checksum, sealed_id};
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
    if bytes.len() < StateHeader::LEN + 8 || !is_delta(bytes) {
        return Err(Error::Snapshot("not a meterflow engine delta".into()));
    }
    let (content, sum) = bytes.split_at(bytes.len() - 8);
    if checksum(content).to_le_bytes() != sum {
        return Err(Error::Snapshot("delta checksum mismatch (truncated or corrupt)".into()));
    }
    Ok(DELTA_HEADER.read(content)?.1)
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
        w.i32(self.partition);
        w.i64(self.next_offset);
        w.i64(self.next_seq);
        w.opt_i64(self.max_time);
        w.u64(self.next_window_id);
        write_stats(&mut w, &self.stats);
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
        w.len(self.output.len());
        for a in &self.output {
            write_aggregate(&mut w, a);
        }
        let bytes = seal_delta(w);
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
        if r.i32()? != self.partition {
            return Err(corrupt("partition"));
        }
        let next_offset = r.i64()?;
        let next_seq = r.i64()?;
        let max_time = r.opt_i64()?;
        let next_window_id = r.u64()?;
        let mut stats = read_stats(&mut r)?;
        stats.first_offset = r.opt_i64()?;
        if next_offset < self.next_offset || next_seq < self.next_seq || next_window_id < self.next_window_id {
            return Err(corrupt("positions go backwards"));
        }
        let map = read_meters(&mut r, self)?;
        let n = r.len(29)?;
        for _ in 0..n {
            let k = read_key(&mut r, self, &map)?;
            self.unlink_evicted(k)?;
        }
        let (old_next, n) = (self.next_window_id, r.len(40)?);
        let mut last_created = None;
        for _ in 0..n {
            let win = read_window(&mut r, self, &map)?;
            if last_created.is_some_and(|l| l >= win.created) || win.created >= next_window_id {
                return Err(corrupt("window creation numbers out of order"));
            }
            last_created = Some(win.created);
            self.put_window(win, old_next)?;
        }
        self.dedup.apply_delta(&mut r)?;
        let n = r.len(60)?;
        let mut output = Vec::with_capacity(n);
        for _ in 0..n {
            output.push(read_aggregate(&mut r)?);
        }
        if r.remaining() != 0 {
            return Err(corrupt("trailing bytes"));
        }
        self.output = output;
        self.next_offset = next_offset;
        self.next_seq = next_seq;
        self.max_time = max_time;
        self.next_window_id = next_window_id;
        self.stats = stats;
        self.mark_at(sealed_id(bytes));
        Ok(())
    }

    fn find_slot(&self, hash: u64, key: &WindowKey) -> Option<u32> {
        let slab = &self.slab;
        self.index
            .find(hash, |&i| slab[i as usize].as_ref().is_some_and(|w| &w.key == key))
            .copied()
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
            let tenant = w.key.tenant();
            if let Some(n) = self.open_per_tenant.get_mut(tenant) {
                *n -= 1;
                if *n == 0 {
                    self.open_per_tenant.remove(tenant);
                }
            }
            (&mut self.closing, close_at)
        };
        let list = lists.get_mut(&at).ok_or_else(|| corrupt("evicted window not in its time index"))?;
        let i = list.iter().position(|&s| s == slot).ok_or_else(|| corrupt("evicted window not in its time index"))?;
        list.remove(i);
        if list.is_empty() {
            lists.remove(&at);
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
            let (closed, dirty, close_at) = (win.closed, win.dirty, close_at(self, &win));
            let slot = self.insert_window(win, !closed, close_at);
            if dirty {
                self.dirty.push(slot);
            }
            return Ok(());
        };
        let old = self.slab[slot as usize].as_ref().expect("indexed slot is live");
        if old.created != win.created || (old.closed && !win.closed) {
            return Err(corrupt("window identity or state regresses"));
        }
        if !old.closed && win.closed {
            let close_at = close_at(self, old);
            let list = self.closing.get_mut(&close_at).ok_or_else(|| corrupt("open window not closing"))?;
            let at = list.iter().position(|&s| s == slot).ok_or_else(|| corrupt("open window not closing"))?;
            list.remove(at);
            if list.is_empty() {
                self.closing.remove(&close_at);
            }
            let tenant = old.key.tenant();
            if let Some(n) = self.open_per_tenant.get_mut(tenant) {
                *n -= 1;
                if *n == 0 {
                    self.open_per_tenant.remove(tenant);
                }
            }
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

fn seal_delta(body: Writer) -> Vec<u8> {
    let body = body.into_inner();
    let mut out = Vec::with_capacity(StateHeader::LEN + body.len() + 8);
    out.extend_from_slice(&DELTA_HEADER.encode(DELTA_VERSION));
    out.extend_from_slice(&body);
    let sum = checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}
