//! The snapshot format of a [`PartitionEngine`](super::PartitionEngine).
//!
//! Hand-rolled little-endian binary instead of serde: the bulk of a snapshot is the dedup
//! tier's ids, which are written as raw 16-byte little-endian integers (a JSON array of
//! 128-bit numbers would be ~3x larger and slow to parse), and a fixed layout makes the
//! bytes deterministic (the same state always snapshots to the same bytes, which the tests
//! use to prove that restore loses nothing).
//!
//! Layout: [`StateHeader`] (`MFENGSNP`, version) `| body | checksum u64`, where the checksum is
//! SipHash-1-3 (fixed key) over everything before it, so truncation or bit rot is reported as
//! [`Error::Snapshot`] instead of being restored as a subtly wrong state. Every read is
//! bounds-checked and every count is checked against the bytes left before allocating, so
//! garbage never panics or allocates unboundedly.

use std::hash::Hasher;
use std::sync::Arc;

use siphasher::sip::SipHasher13;

use super::{EngineConfig, PartitionEngine};
use crate::checkpoint::StateHeader;
use crate::dedup::Deduplicator;
use crate::meter::MeterCatalog;
pub(crate) use super::codec::{Reader, Writer};
use super::codec::*;
use crate::{Error, Result};

pub(crate) const MAGIC: &[u8; 8] = b"MFENGSNP";
/// 2: the dedup section keys ids by `(tenant, meter, event_id)` over the whole horizon
/// (version 1 keyed `(tenant, event_id)` per event-time bucket; see
/// [`Deduplicator::read_snapshot_v1`] for what is restored of it).
/// 3: windows, their last emission and pending aggregates also carry the uncosted quantity
/// (per-event provider cost). Version 2 existed only between two changes of one release and
/// is not read.
pub(crate) const VERSION: u32 = 4;
/// The versions [`open`] accepts, the written one first.
const HEADER: StateHeader = StateHeader { magic: MAGIC, readable: &[VERSION, 3, 1] };

pub(crate) fn checksum(bytes: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(0x6d65_7465_7266_6c6f, 0x736e_6170_7368_6f74);
    h.write(bytes);
    h.finish()
}

/// The trailing checksum of sealed bytes: the identity of a checkpoint that a delta names as
/// its predecessor.
pub(crate) fn sealed_id(bytes: &[u8]) -> u64 {
    let tail = bytes.len().saturating_sub(8);
    let mut a = [0u8; 8];
    a.copy_from_slice(&bytes[tail..]);
    u64::from_le_bytes(a)
}

/// Wraps a body into the versioned, checksummed envelope of `header` (a snapshot's or a
/// delta's).
pub(crate) fn seal_as(header: &StateHeader, version: u32, body: Writer) -> Vec<u8> {
    let body = body.into_inner();
    let mut out = Vec::with_capacity(StateHeader::LEN + body.len() + 8);
    out.extend_from_slice(&header.encode(version));
    out.extend_from_slice(&body);
    let sum = checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Checks the envelope of `header` (`what` names it in errors) and returns the format version
/// and the body.
pub(crate) fn open_as<'a>(header: &StateHeader, what: &str, bytes: &'a [u8]) -> Result<(u32, &'a [u8])> {
    if bytes.len() < StateHeader::LEN + 8 || !bytes.starts_with(header.magic) {
        return Err(Error::Snapshot(format!("not a meterflow engine {what}")));
    }
    let (content, sum) = bytes.split_at(bytes.len() - 8);
    if checksum(content).to_le_bytes() != sum {
        return Err(Error::Snapshot(format!("{what} checksum mismatch (truncated or corrupt)")));
    }
    header.read(content)
}

/// Checks a snapshot's envelope and returns the format version and the body.
pub(crate) fn open(bytes: &[u8]) -> Result<(u32, &[u8])> {
    open_as(&HEADER, "snapshot", bytes)
}

impl PartitionEngine {
    /// The whole state (open and retained windows with their revisions, the dedup hot tier and
    /// its hash key, partition time, seq, next offset, stats and undrained output) as bytes.
    /// Deterministic: equal states give equal bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut w = Writer::default();
        Header::of(self).write(&mut w);
        write_meters(&mut w, self);
        let mut windows: Vec<&crate::window::Window> = self.slab.iter().flatten().collect();
        windows.sort_unstable_by_key(|w| w.created);
        w.len(windows.len());
        for win in windows {
            write_window(&mut w, win);
        }
        self.dedup.write_snapshot(&mut w);
        write_output(&mut w, &self.output);
        // Version 4: appended so older bodies stay a prefix of the layout.
        w.opt_i64(self.stats.first_offset);
        seal_as(&HEADER, VERSION, w)
    }

    /// Rebuilds an engine from [`Self::snapshot`] bytes. The catalog must still define every
    /// meter the snapshot holds windows of, with the same aggregation, window, `group_by` and
    /// `unique_dimension` (lateness, `max_future` and `allow_negative` may change). Anything
    /// else, including garbage, is [`Error::Snapshot`].
    pub fn restore(bytes: &[u8], catalog: Arc<MeterCatalog>, cfg: EngineConfig) -> Result<Self> {
        let (version, body) = open(bytes)?;
        let mut r = Reader::new(body);
        r.version = version;
        let mut h = Header::read(&mut r)?;
        cfg.validate()?;
        // Placeholder dedup, replaced once its section is read.
        let placeholder = Deduplicator::with_key(cfg.dedup_config(), 0)?;
        let mut e = Self::assemble(catalog, cfg, h.partition, placeholder)?;

        let map = read_meters(&mut r, &mut e)?;
        read_windows(&mut r, &mut e, &map, h.next_window_id, |e, win| {
            if e.find_slot(win.hash, &win.key).is_some() {
                return Err(bad("window listed twice"));
            }
            e.insert_restored(win);
            Ok(())
        })?;
        e.dedup = if version == 1 {
            Deduplicator::read_snapshot_v1(e.cfg.dedup_config(), &mut r)?
        } else {
            Deduplicator::read_snapshot(e.cfg.dedup_config(), &mut r)?
        };
        e.output = read_output(&mut r)?;
        h.stats.first_offset = if version >= 4 {
            r.opt_i64()?
        } else {
            // Older snapshots did not record it: derived assuming no gap before the upgrade
            // (the ledger can only vouch for offsets from the upgrade on anyway).
            (h.stats.records() > 0).then(|| h.next_offset - h.stats.records() as i64)
        };
        if r.remaining() != 0 {
            return Err(bad("trailing bytes"));
        }
        e.resume_at(h, bytes);
        Ok(e)
    }
}
