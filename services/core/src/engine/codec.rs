//! The byte codec of engine checkpoints: bounds-checked little-endian primitives and the
//! records (windows, meters, counters, aggregates) that full snapshots and deltas share, so
//! that a window reads back the same whichever of the two wrote it.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::snapshot::VERSION;
use super::stats::{read_stats, write_stats};
use super::{key_hash, EngineStats, PartitionEngine};
use crate::meter::Aggregation;
use crate::records::MeterAggregate;
use crate::window::{Acc, LastEmitted, Latest, Window, WindowKey};
use crate::{Error, Result};

pub(crate) fn bad(what: &str) -> Error {
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
    /// LEB128: small values (a bucket that did not change) in one byte.
    pub fn uvarint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
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
    pub fn uvarint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(bad("varint overflows 64 bits"));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("varint longer than 10 bytes"))
    }
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


pub(super) const ACC_SUM: u8 = 0;
pub(super) const ACC_COUNT: u8 = 1;
pub(super) const ACC_MIN: u8 = 2;
pub(super) const ACC_MAX: u8 = 3;
pub(super) const ACC_UNIQUE: u8 = 4;
pub(super) const ACC_LATEST: u8 = 5;

pub(super) fn acc_tag(agg: Aggregation) -> u8 {
    match agg {
        Aggregation::Sum | Aggregation::Avg => ACC_SUM,
        Aggregation::Count => ACC_COUNT,
        Aggregation::Min => ACC_MIN,
        Aggregation::Max => ACC_MAX,
        Aggregation::UniqueCount => ACC_UNIQUE,
        Aggregation::Latest => ACC_LATEST,
    }
}

/// The engine's positions and counters, which a snapshot and a delta both carry whole (in
/// this order, after which a delta adds `stats.first_offset`; a snapshot has it at its end).
pub(super) struct Header {
    pub partition: i32,
    pub next_offset: i64,
    pub next_seq: i64,
    pub max_time: Option<i64>,
    pub next_window_id: u64,
    pub stats: EngineStats,
}

impl Header {
    pub fn of(e: &PartitionEngine) -> Self {
        Self {
            partition: e.partition,
            next_offset: e.next_offset,
            next_seq: e.next_seq,
            max_time: e.max_time,
            next_window_id: e.next_window_id,
            stats: e.stats,
        }
    }

    pub fn write(&self, w: &mut Writer) {
        w.i32(self.partition);
        w.i64(self.next_offset);
        w.i64(self.next_seq);
        w.opt_i64(self.max_time);
        w.u64(self.next_window_id);
        write_stats(w, &self.stats);
    }

    pub fn read(r: &mut Reader<'_>) -> Result<Self> {
        Ok(Self {
            partition: r.i32()?,
            next_offset: r.i64()?,
            next_seq: r.i64()?,
            max_time: r.opt_i64()?,
            next_window_id: r.u64()?,
            stats: read_stats(r)?,
        })
    }
}

pub(super) fn write_last(w: &mut Writer, last: &Option<LastEmitted>) {
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

pub(super) fn write_opt_decimal(w: &mut Writer, d: &Option<Decimal>) {
    match d {
        None => w.u8(0),
        Some(d) => {
            w.u8(1);
            w.decimal(d);
        }
    }
}

pub(super) fn read_opt_decimal(r: &mut Reader<'_>) -> Result<Option<Decimal>> {
    Ok(if r.bool()? { Some(r.decimal()?) } else { None })
}

pub(super) fn read_last(r: &mut Reader<'_>) -> Result<Option<LastEmitted>> {
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

pub(super) fn write_window(w: &mut Writer, win: &Window) {
    write_key(w, win.created, &win.key);
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

pub(super) fn write_aggregate(w: &mut Writer, a: &MeterAggregate) {
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

/// The undrained output, which a snapshot and a delta both carry whole.
pub(super) fn write_output(w: &mut Writer, output: &[MeterAggregate]) {
    w.len(output.len());
    for a in output {
        write_aggregate(w, a);
    }
}

pub(super) fn read_output(r: &mut Reader<'_>) -> Result<Vec<MeterAggregate>> {
    let n = r.len(60)?;
    let mut output = Vec::with_capacity(n);
    for _ in 0..n {
        output.push(read_aggregate(r)?);
    }
    Ok(output)
}

pub(super) fn read_aggregate(r: &mut Reader<'_>) -> Result<MeterAggregate> {
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


/// How the meter indexes of a checkpoint map to the current catalog's: `Err` names why a
/// meter cannot be restored (only an error if a window of it is actually read).
pub(super) type MeterMap = Vec<std::result::Result<u16, String>>;

/// The meters a checkpoint's windows refer to (by index) and where each was last evicted.
pub(super) fn write_meters(w: &mut Writer, e: &PartitionEngine) {
    w.len(e.meters.len());
    for m in &e.meters {
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
}

/// Reads the meter section into `e` (their eviction bounds) and maps its indexes to `e`'s.
pub(super) fn read_meters(r: &mut Reader<'_>, e: &mut PartitionEngine) -> Result<MeterMap> {
    let n = r.len(8)?;
    let mut map = Vec::with_capacity(n);
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
                    Err(format!("meter {name:?} changed its aggregation, window, group_by or unique_dimension"))
                } else {
                    e.meters[usize::from(i)].evicted_end_bound = bound;
                    Ok(i)
                }
            }
        };
        map.push(mapped);
    }
    Ok(map)
}

/// A window's identity as written by [`write_key`].
pub(super) struct KeyRecord {
    pub created: u64,
    pub key: WindowKey,
    pub hash: u64,
}

/// The identity part of a window record (creation number and key).
pub(super) fn write_key(w: &mut Writer, created: u64, k: &WindowKey) {
    w.u64(created);
    w.i64(k.window_start);
    w.u32(u32::from(k.meter));
    w.str(k.tenant());
    w.len(k.dims().count());
    for d in k.dims() {
        w.str(d);
    }
}

pub(super) fn read_key(r: &mut Reader<'_>, e: &PartitionEngine, map: &MeterMap) -> Result<KeyRecord> {
    let created = r.u64()?;
    let window_start = r.i64()?;
    let mi = r.u32()? as usize;
    let meter = map.get(mi).ok_or_else(|| bad("meter index"))?.clone().map_err(Error::Snapshot)?;
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
    let key = WindowKey::new(meter, window_start, tenant, dims.iter().copied());
    let hash = key_hash(&e.hasher, meter, window_start, tenant, dims.iter().copied());
    Ok(KeyRecord { created, key, hash })
}

/// Reads a whole window record (see [`write_window`]), checking it against its meter.
pub(super) fn read_window(r: &mut Reader<'_>, e: &PartitionEngine, map: &MeterMap) -> Result<Window> {
    let KeyRecord { created, key, hash } = read_key(r, e, map)?;
    let def = &e.meters[usize::from(key.meter)].def;
    let closed = r.bool()?;
    let dirty = r.bool()?;
    let event_count = r.i64()?;
    let provider_cost = r.decimal()?;
    // Before version 3 no uncosted quantity was kept: treat every event as carrying
    // its cost (what the rater then did).
    let uncosted = if r.version >= 3 { r.decimal()? } else { Decimal::ZERO };
    let last = read_last(r)?;
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
    Ok(Window {
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
        changed: false,
        last,
    })
}

/// Reads a section of window records (in creation order, each below `next_window_id`, which
/// is checked) and hands each to `put`.
pub(super) fn read_windows(
    r: &mut Reader<'_>,
    e: &mut PartitionEngine,
    map: &MeterMap,
    next_window_id: u64,
    mut put: impl FnMut(&mut PartitionEngine, Window) -> Result<()>,
) -> Result<()> {
    let n = r.len(40)?;
    let mut last_created = None;
    for _ in 0..n {
        let win = read_window(r, e, map)?;
        if last_created.is_some_and(|l| l >= win.created) || win.created >= next_window_id {
            return Err(bad("window creation numbers out of order"));
        }
        last_created = Some(win.created);
        put(e, win)?;
    }
    Ok(())
}

/// Partition time at which `w` closes (its end plus its meter's lateness).
pub(super) fn close_at(e: &PartitionEngine, w: &Window) -> i64 {
    let def = &e.meters[usize::from(w.key.meter)].def;
    w.key.window_start.saturating_add(def.window_ms).saturating_add(def.allowed_lateness_ms)
}
