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

use rust_decimal::Decimal;
use siphasher::sip::SipHasher13;

use crate::checkpoint::StateHeader;
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

fn bad(what: &str) -> Error {
    Error::Snapshot(format!("corrupt snapshot: {what}"))
}

#[derive(Default)]
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn bool(&mut self, v: bool) {
        self.buf.push(v as u8);
    }
    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn i32(&mut self, v: i32) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn i64(&mut self, v: i64) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn u128(&mut self, v: u128) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn opt_i64(&mut self, v: Option<i64>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.i64(v);
            }
        }
    }
    pub fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).expect("snapshot collections hold fewer than 2^32 items"));
    }
    pub fn str(&mut self, s: &str) {
        self.len(s.len());
        self.bytes(s.as_bytes());
    }
    /// Mantissa and scale: exact, keeps the scale (so restored values print identically).
    pub fn decimal(&mut self, d: &Decimal) {
        self.bytes(&d.mantissa().to_le_bytes());
        self.u8(d.scale() as u8);
    }
}

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Format version of what is read (fields added later are absent in older ones).
    pub(crate) version: u32,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0, version: VERSION }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(bad("truncated"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(bad("bad boolean")),
        }
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    pub fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.arr()?))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    pub fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.arr()?))
    }
    pub fn u128(&mut self) -> Result<u128> {
        Ok(u128::from_le_bytes(self.arr()?))
    }
    pub fn opt_i64(&mut self) -> Result<Option<i64>> {
        Ok(if self.bool()? { Some(self.i64()?) } else { None })
    }
    /// A count of items each taking at least `min_item_bytes`: rejects counts the remaining
    /// bytes cannot hold, so a corrupt count cannot trigger a huge allocation.
    pub fn len(&mut self, min_item_bytes: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item_bytes.max(1)) > self.remaining() {
            return Err(bad("count larger than the snapshot"));
        }
        Ok(n)
    }
    pub fn str(&mut self) -> Result<&'a str> {
        let n = self.len(1)?;
        std::str::from_utf8(self.take(n)?).map_err(|_| bad("invalid UTF-8"))
    }
    pub fn decimal(&mut self) -> Result<Decimal> {
        let m = i128::from_le_bytes(self.arr()?);
        let scale = u32::from(self.u8()?);
        Decimal::try_from_i128_with_scale(m, scale).map_err(|_| bad("invalid decimal"))
    }
}

/// Wraps a body into the versioned, checksummed envelope.
pub(crate) fn seal(body: Writer) -> Vec<u8> {
    let body = body.into_inner();
    let mut out = Vec::with_capacity(StateHeader::LEN + body.len() + 8);
    out.extend_from_slice(&HEADER.encode(VERSION));
    out.extend_from_slice(&body);
    let sum = checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Checks the envelope and returns the format version and the body.
pub(crate) fn open(bytes: &[u8]) -> Result<(u32, &[u8])> {
    if bytes.len() < StateHeader::LEN + 8 || !bytes.starts_with(MAGIC) {
        return Err(Error::Snapshot("not a meterflow engine snapshot".into()));
    }
    let (content, sum) = bytes.split_at(bytes.len() - 8);
    if checksum(content).to_le_bytes() != sum {
        return Err(Error::Snapshot("checksum mismatch (truncated or corrupt)".into()));
    }
    HEADER.read(content)
}

// ---------------------------------------------------------------------------------------------
// The engine's snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{key_hash, EngineConfig, EngineStats, PartitionEngine};
use crate::dedup::Deduplicator;
use crate::meter::{Aggregation, MeterCatalog};
use crate::records::MeterAggregate;
use crate::window::{Acc, LastEmitted, Latest, Window, WindowKey};

const ACC_SUM: u8 = 0;
const ACC_COUNT: u8 = 1;
const ACC_MIN: u8 = 2;
const ACC_MAX: u8 = 3;
const ACC_UNIQUE: u8 = 4;
const ACC_LATEST: u8 = 5;

fn acc_tag(agg: Aggregation) -> u8 {
    match agg {
        Aggregation::Sum | Aggregation::Avg => ACC_SUM,
        Aggregation::Count => ACC_COUNT,
        Aggregation::Min => ACC_MIN,
        Aggregation::Max => ACC_MAX,
        Aggregation::UniqueCount => ACC_UNIQUE,
        Aggregation::Latest => ACC_LATEST,
    }
}

fn write_stats(w: &mut Writer, s: &EngineStats) {
    w.u64(s.accepted);
    w.u64(s.duplicates);
    w.len(s.rejected.len());
    for r in s.rejected {
        w.u64(r);
    }
    for v in [s.ticks, s.aggregates, s.restatements, s.windows_opened, s.windows_loaded, s.windows_evicted] {
        w.u64(v);
    }
}

fn read_stats(r: &mut Reader<'_>) -> Result<EngineStats> {
    let mut s = EngineStats {
        accepted: r.u64()?,
        duplicates: r.u64()?,
        ..EngineStats::default()
    };
    // Reasons are only ever appended: a snapshot from before a new reason has fewer counters.
    let n = r.len(8)?;
    if n > s.rejected.len() {
        return Err(bad("reject reasons"));
    }
    for slot in s.rejected.iter_mut().take(n) {
        *slot = r.u64()?;
    }
    s.ticks = r.u64()?;
    s.aggregates = r.u64()?;
    s.restatements = r.u64()?;
    s.windows_opened = r.u64()?;
    s.windows_loaded = r.u64()?;
    s.windows_evicted = r.u64()?;
    Ok(s)
}

fn write_last(w: &mut Writer, last: &Option<LastEmitted>) {
    match last {
        None => w.u8(0),
        Some(l) => {
            w.u8(1);
            w.i32(l.revision);
            w.decimal(&l.value);
            w.decimal(&l.provider_cost);
            write_opt_decimal(w, &l.uncosted);
        }
    }
}

fn write_opt_decimal(w: &mut Writer, d: &Option<Decimal>) {
    match d {
        None => w.u8(0),
        Some(d) => {
            w.u8(1);
            w.decimal(d);
        }
    }
}

fn read_opt_decimal(r: &mut Reader<'_>) -> Result<Option<Decimal>> {
    Ok(if r.bool()? { Some(r.decimal()?) } else { None })
}

fn read_last(r: &mut Reader<'_>) -> Result<Option<LastEmitted>> {
    Ok(if r.bool()? {
        Some(LastEmitted {
            revision: r.i32()?,
            value: r.decimal()?,
            provider_cost: r.decimal()?,
            uncosted: if r.version >= 3 { read_opt_decimal(r)? } else { None },
        })
    } else {
        None
    })
}

fn write_window(w: &mut Writer, win: &Window) {
    let k = &win.key;
    w.u64(win.created);
    w.i64(k.window_start);
    w.u32(u32::from(k.meter));
    w.str(k.tenant());
    w.len(k.dims().count());
    for d in k.dims() {
        w.str(d);
    }
    w.bool(win.closed);
    w.bool(win.dirty);
    w.i64(win.event_count);
    w.decimal(&win.provider_cost);
    w.decimal(&win.uncosted);
    write_last(w, &win.last);
    match &win.acc {
        Acc::Sum(s) => {
            w.u8(ACC_SUM);
            w.decimal(s);
        }
        Acc::Count => w.u8(ACC_COUNT),
        Acc::Min(m) => {
            w.u8(ACC_MIN);
            w.decimal(m);
        }
        Acc::Max(m) => {
            w.u8(ACC_MAX);
            w.decimal(m);
        }
        Acc::Unique(set) => {
            w.u8(ACC_UNIQUE);
            let mut values: Vec<&str> = set.iter().map(|v| &**v).collect();
            values.sort_unstable();
            w.len(values.len());
            for v in values {
                w.str(v);
            }
        }
        Acc::Latest(l) => {
            w.u8(ACC_LATEST);
            w.i64(l.event_time_ms);
            w.str(&l.event_id);
            w.decimal(&l.value);
        }
    }
}

fn write_aggregate(w: &mut Writer, a: &MeterAggregate) {
    w.str(&a.tenant);
    w.str(&a.meter);
    w.str(&a.aggregation);
    w.len(a.dimensions.len());
    for (k, v) in &a.dimensions {
        w.str(k);
        w.str(v);
    }
    w.i64(a.window_start);
    w.i64(a.window_end);
    w.i32(a.revision);
    w.decimal(&a.value);
    w.decimal(&a.previous_value);
    w.i64(a.event_count);
    w.decimal(&a.provider_cost);
    w.decimal(&a.previous_provider_cost);
    w.i32(a.source_partition);
    w.i64(a.seq);
    w.i64(a.emitted_at);
    write_opt_decimal(w, &a.uncosted_value);
    write_opt_decimal(w, &a.previous_uncosted_value);
}

fn read_aggregate(r: &mut Reader<'_>) -> Result<MeterAggregate> {
    let tenant = r.str()?.to_owned();
    let meter = r.str()?.to_owned();
    let aggregation = r.str()?.to_owned();
    let n = r.len(8)?;
    let mut dimensions = BTreeMap::new();
    for _ in 0..n {
        let k = r.str()?.to_owned();
        dimensions.insert(k, r.str()?.to_owned());
    }
    Ok(MeterAggregate {
        tenant,
        meter,
        aggregation,
        dimensions,
        window_start: r.i64()?,
        window_end: r.i64()?,
        revision: r.i32()?,
        value: r.decimal()?,
        previous_value: r.decimal()?,
        event_count: r.i64()?,
        provider_cost: r.decimal()?,
        previous_provider_cost: r.decimal()?,
        source_partition: r.i32()?,
        seq: r.i64()?,
        emitted_at: r.i64()?,
        uncosted_value: if r.version >= 3 { read_opt_decimal(r)? } else { None },
        previous_uncosted_value: if r.version >= 3 { read_opt_decimal(r)? } else { None },
    })
}

impl PartitionEngine {
    /// The whole state (open and retained windows with their revisions, the dedup hot tier and
    /// its hash key, partition time, seq, next offset, stats and undrained output) as bytes.
    /// Deterministic: equal states give equal bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.i32(self.partition);
        w.i64(self.next_offset);
        w.i64(self.next_seq);
        w.opt_i64(self.max_time);
        w.u64(self.next_window_id);
        write_stats(&mut w, &self.stats);
        w.len(self.meters.len());
        for m in &self.meters {
            let d = &m.def;
            w.str(&d.name);
            w.str(d.aggregation.as_str());
            w.i64(d.window_ms);
            w.len(d.group_by.len());
            for g in &d.group_by {
                w.str(g);
            }
            w.str(d.unique_dimension.as_deref().unwrap_or(""));
            w.i64(m.evicted_end_bound);
        }
        let mut windows: Vec<&Window> = self.slab.iter().flatten().collect();
        windows.sort_unstable_by_key(|w| w.created);
        w.len(windows.len());
        for win in windows {
            write_window(&mut w, win);
        }
        self.dedup.write_snapshot(&mut w);
        w.len(self.output.len());
        for a in &self.output {
            write_aggregate(&mut w, a);
        }
        // Version 4: appended so older bodies stay a prefix of the layout.
        w.opt_i64(self.stats.first_offset);
        seal(w)
    }

    /// Rebuilds an engine from [`Self::snapshot`] bytes. The catalog must still define every
    /// meter the snapshot holds windows of, with the same aggregation, window, `group_by` and
    /// `unique_dimension` (lateness, `max_future` and `allow_negative` may change). Anything
    /// else, including garbage, is [`Error::Snapshot`].
    pub fn restore(bytes: &[u8], catalog: Arc<MeterCatalog>, cfg: EngineConfig) -> Result<Self> {
        let (version, body) = open(bytes)?;
        let mut r = Reader::new(body);
        r.version = version;
        let partition = r.i32()?;
        let next_offset = r.i64()?;
        let next_seq = r.i64()?;
        let max_time = r.opt_i64()?;
        let next_window_id = r.u64()?;
        let stats = read_stats(&mut r)?;
        cfg.validate()?;
        // Placeholder dedup, replaced once its section is read.
        let placeholder = Deduplicator::with_key(cfg.dedup_config(), 0)?;
        let mut e = Self::assemble(catalog, cfg, partition, placeholder)?;

        // Meters: snapshot index → current index, if compatible.
        let n = r.len(8)?;
        let mut map: Vec<Result<u16, String>> = Vec::with_capacity(n);
        for _ in 0..n {
            let name = r.str()?;
            let agg = r.str()?;
            let window_ms = r.i64()?;
            let g = r.len(4)?;
            let mut group_by = Vec::with_capacity(g);
            for _ in 0..g {
                group_by.push(r.str()?.to_owned());
            }
            let unique = r.str()?;
            let bound = r.i64()?;
            let mapped = match e.meter_index.get(name) {
                None => Err(format!("meter {name:?} is no longer defined")),
                Some(&i) => {
                    let d = &e.meters[usize::from(i)].def;
                    if d.aggregation.as_str() != agg
                        || d.window_ms != window_ms
                        || d.group_by != group_by
                        || d.unique_dimension.as_deref().unwrap_or("") != unique
                    {
                        Err(format!(
                            "meter {name:?} changed its aggregation, window, group_by or unique_dimension"
                        ))
                    } else {
                        e.meters[usize::from(i)].evicted_end_bound = bound;
                        Ok(i)
                    }
                }
            };
            map.push(mapped);
        }

        let n = r.len(40)?;
        let mut last_created = None;
        for _ in 0..n {
            let created = r.u64()?;
            if last_created.is_some_and(|l| l >= created) || created >= next_window_id {
                return Err(bad("window creation numbers out of order"));
            }
            last_created = Some(created);
            let window_start = r.i64()?;
            let mi = r.u32()? as usize;
            let meter = map
                .get(mi)
                .ok_or_else(|| bad("meter index"))?
                .clone()
                .map_err(Error::Snapshot)?;
            let def = &e.meters[usize::from(meter)].def;
            let tenant = r.str()?;
            let nd = r.len(4)?;
            if nd != def.group_by.len() {
                return Err(bad("dimension count"));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                dims.push(r.str()?);
            }
            let closed = r.bool()?;
            let dirty = r.bool()?;
            let event_count = r.i64()?;
            let provider_cost = r.decimal()?;
            // Before version 3 no uncosted quantity was kept: treat every event as carrying
            // its cost (what the rater then did).
            let uncosted = if r.version >= 3 { r.decimal()? } else { Decimal::ZERO };
            let last = read_last(&mut r)?;
            let tag = r.u8()?;
            if tag != acc_tag(def.aggregation) {
                return Err(bad("accumulator does not match the meter's aggregation"));
            }
            let acc = match tag {
                ACC_SUM => Acc::Sum(r.decimal()?),
                ACC_COUNT => Acc::Count,
                ACC_MIN => Acc::Min(r.decimal()?),
                ACC_MAX => Acc::Max(r.decimal()?),
                ACC_UNIQUE => {
                    let k = r.len(4)?;
                    let mut set = hashbrown::HashSet::with_capacity(k);
                    for _ in 0..k {
                        set.insert(Box::<str>::from(r.str()?));
                    }
                    Acc::Unique(Box::new(set))
                }
                _ => Acc::Latest(Box::new(Latest {
                    event_time_ms: r.i64()?,
                    event_id: r.str()?.into(),
                    value: r.decimal()?,
                })),
            };
            if event_count < 1 || (dirty && !closed) || (closed && !dirty && last.is_none()) {
                return Err(bad("inconsistent window state"));
            }
            let key = WindowKey::new(meter, window_start, tenant, dims.iter().copied());
            let hash = key_hash(&e.hasher, meter, window_start, tenant, dims.iter().copied());
            let slab = &e.slab;
            if e.index
                .find(hash, |&i| slab[i as usize].as_ref().is_some_and(|w| w.key == key))
                .is_some()
            {
                return Err(bad("window listed twice"));
            }
            let close_at = window_start
                .saturating_add(def.window_ms)
                .saturating_add(def.allowed_lateness_ms);
            let win = Window {
                key,
                hash,
                created,
                acc,
                event_count,
                provider_cost,
                uncosted,
                closed,
                dirty,
                touched: false,
                last,
            };
            let slot = e.insert_window(win, !closed, close_at);
            if dirty {
                e.dirty.push(slot);
            }
        }
        e.dedup = if version == 1 {
            Deduplicator::read_snapshot_v1(e.cfg.dedup_config(), &mut r)?
        } else {
            Deduplicator::read_snapshot(e.cfg.dedup_config(), &mut r)?
        };
        let n = r.len(60)?;
        for _ in 0..n {
            e.output.push(read_aggregate(&mut r)?);
        }
        let mut stats = stats;
        stats.first_offset = if version >= 4 {
            r.opt_i64()?
        } else {
            // Older snapshots did not record it: derived assuming no gap before the upgrade
            // (the ledger can only vouch for offsets from the upgrade on anyway).
            (stats.records() > 0).then(|| next_offset - stats.records() as i64)
        };
        if r.remaining() != 0 {
            return Err(bad("trailing bytes"));
        }
        e.next_offset = next_offset;
        e.next_seq = next_seq;
        e.next_window_id = next_window_id;
        e.max_time = max_time;
        e.stats = stats;
        Ok(e)
    }
}
