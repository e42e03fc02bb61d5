//! The deduplicator's part of an engine delta (see `engine::delta`): the calls that changed
//! it since the last checkpoint mark, in order. Applying a delta replays them through the same
//! [`Deduplicator::commit`] and [`Deduplicator::advance`], so purges, evictions to the cold
//! tier and late cold fingerprints happen exactly where the logging run had them (they are
//! decided on counts and event time only), instead of being re-derived by a second piece of
//! code that could disagree. Cost: one push per accepted id, and about 15 bytes of delta per
//! id (less than the 16 of a full snapshot): the 111 kept bits of its key in 14 bytes, and a
//! one-byte header holding the change of its event-time bucket since the previous commit.

use super::table::key_of;
use super::{DedupStats, Deduplicator, NewId, NoCold};
use crate::engine::snapshot::{Reader, Writer};
use crate::engine::MAX_ABS_EVENT_TIME_MS;
use crate::{Error, Result};

/// One logged call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    /// [`Deduplicator::commit`] of an id (its table key and event-time bucket).
    Commit { key: u128, bucket: i64 },
    /// [`Deduplicator::advance`] to a time that moved the floor bucket.
    Advance(i64),
}

/// The low bit of an operation's header: a commit (the rest of the header is the zigzag change
/// of the bucket, then 14 key bytes follow) or an advance (an i64 time follows).
const COMMIT: u64 = 0;
const ADVANCE: u64 = 1;
/// Key bytes written: bits 16..128 (the low 16 are always `0x1_0000`, see `table::key_of`).
const KEY_BYTES: usize = 14;

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn bad(what: &str) -> Error {
    Error::Snapshot(format!("corrupt delta: dedup {what}"))
}

impl Deduplicator {
    /// Starts (or restarts, forgetting what was logged) logging changes.
    pub(crate) fn track_ops(&mut self) {
        match &mut self.log {
            Some(log) => log.clear(),
            None => self.log = Some(Vec::new()),
        }
    }

    /// Writes the logged calls, the final time and the counters, and starts a new log.
    pub(crate) fn write_delta(&mut self, w: &mut Writer) {
        self.stats.write(w);
        w.opt_i64(self.now);
        let log = self.log.get_or_insert_with(Vec::new);
        w.len(log.len());
        let mut prev = 0i64;
        for op in log.iter() {
            match *op {
                Op::Commit { key, bucket } => {
                    // Buckets are within ±2^50 ms / bucket_ms of each other: no overflow.
                    w.uvarint(zigzag(bucket - prev) << 1 | COMMIT);
                    w.bytes(&(key >> 16).to_le_bytes()[..KEY_BYTES]);
                    prev = bucket;
                }
                Op::Advance(t) => {
                    w.uvarint(ADVANCE);
                    w.i64(t);
                }
            }
        }
        log.clear();
    }

    /// Replays a delta written by [`Self::write_delta`] of the same lineage. Everything is
    /// read and checked before the first call is replayed.
    pub(crate) fn apply_delta(&mut self, r: &mut Reader<'_>) -> Result<()> {
        let stats = DedupStats::read(r)?;
        let now = r.opt_i64()?;
        // The shortest operation is an advance: a header byte and the time.
        let n = r.len(9)?;
        let max_bucket = MAX_ABS_EVENT_TIME_MS / self.cfg.bucket_ms + 1;
        let mut ops = Vec::with_capacity(n);
        let mut time = self.now;
        let mut prev = 0i64;
        for _ in 0..n {
            let header = r.uvarint()?;
            let op = match header & 1 {
                COMMIT => {
                    let mut k = [0u8; 16];
                    k[..KEY_BYTES].copy_from_slice(r.take(KEY_BYTES)?);
                    let key = u128::from_le_bytes(k) << 16;
                    let bucket = prev.checked_add(unzigzag(header >> 1)).filter(|b| b.abs() <= max_bucket);
                    let Some(bucket) = bucket.filter(|_| key_of(key) == key) else {
                        return Err(bad("commit out of range"));
                    };
                    prev = bucket;
                    Op::Commit { key, bucket }
                }
                _ if header == ADVANCE => {
                    let t = r.i64()?;
                    if t.abs() > MAX_ABS_EVENT_TIME_MS || time.is_some_and(|now| t <= now) {
                        return Err(bad("time out of range or not advancing"));
                    }
                    time = Some(t);
                    Op::Advance(t)
                }
                _ => return Err(bad("operation tag")),
            };
            ops.push(op);
        }
        if now.is_some_and(|n| time.is_some_and(|t| n < t)) || (now.is_none() && time.is_some()) {
            return Err(bad("final time behind its operations"));
        }
        let log = self.log.take();
        for op in ops {
            match op {
                Op::Commit { key, bucket } => self.commit(NewId { hash: key, bucket }, &mut NoCold),
                Op::Advance(t) => self.advance(t),
            }
        }
        self.log = log.map(|mut l| {
            l.clear();
            l
        });
        let floor_b = self.floor_b;
        self.now = now;
        self.floor_b = self.compute_floor_bucket();
        if self.floor_b != floor_b {
            return Err(bad("final time moves the floor without a logged advance"));
        }
        self.stats = stats;
        Ok(())
    }
}
