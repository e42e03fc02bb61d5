//! Event-time tumbling windows: the per-window state, how events fold into it, and the
//! [`WindowStore`] that lets a window evicted from memory be rebuilt for a restatement.
//!
//! # Exactness
//!
//! Values are `rust_decimal::Decimal` and additions are *checked for exactness*:
//! `rust_decimal` silently rounds (drops fractional digits) when a sum needs more than 28-29
//! significant digits. A rounded total would make results depend on the order of events, so an
//! addition that would round is refused and the event is rejected (`BadQuantity` /
//! `BadProviderCost`, detail "window total would lose precision"). In practice that needs totals
//! beyond 10^19 with 9 fractional digits. Order-independence of every aggregation then follows:
//! exact sums commute, min/max/unique sets are lattices, `latest` is a max over
//! `(event_time, event_id)`.
//!
//! `avg` is `sum / count` rounded half-to-even to 9 fractional digits
//! ([`crate::decimal::round_amount`]), computed from the exact sum and count at emission, so
//! it is reproducible and matches what ClickHouse `Decimal(38, 9)` can store.
//!
//! # Missing dimensions
//!
//! A `group_by` or `unique_dimension` dimension absent from an event counts as the empty
//! string. That is what ClickHouse's `dimensions['x']` returns for a missing key, so a
//! [`WindowStore`] over stored raw events agrees with the in-memory state without special
//! cases, and every aggregate of a meter carries the same dimension keys.

use rust_decimal::Decimal;

use crate::dedup::SourcePos;
use crate::meter::{Aggregation, MeterDef};
use crate::{Error, Result};

/// One accepted event as a [`WindowStore`] returns it: just the fields that aggregation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub event_id: String,
    pub quantity: Decimal,
    pub event_time_ms: i64,
    /// Value of the meter's `unique_dimension` ("" when absent or not a unique_count meter).
    pub unique_value: String,
    pub provider_cost: Option<Decimal>,
}

/// The last aggregate emitted for a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastEmitted {
    pub revision: i32,
    pub value: Decimal,
    pub provider_cost: Decimal,
    /// Its `uncosted_value` (see [`crate::records::MeterAggregate`]); `None` when not
    /// additive or emitted before schema v2.
    pub uncosted: Option<Decimal>,
}

/// What a [`WindowStore`] knows about a window evicted from memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadedWindow {
    /// Accepted events of the window, in source-offset order.
    pub events: Vec<StoredEvent>,
    /// The highest revision emitted for it (None if none was).
    pub last_emitted: Option<LastEmitted>,
}

/// Identifies one window of one meter, tenant and `group_by` dimension set.
#[derive(Debug, Clone, Copy)]
pub struct WindowQuery<'a> {
    pub meter: &'a MeterDef,
    pub tenant: &'a str,
    /// `(dimension, value)` for each of the meter's `group_by` dimensions, in `group_by` order
    /// (sorted); a missing dimension has value "".
    pub group: &'a [(&'a str, &'a str)],
    pub window_start: i64,
    pub window_end: i64,
    /// Answer as of this position (see [`SourcePos`]).
    pub before: SourcePos,
}

/// Where windows evicted from memory can be reloaded from, for restatements days later.
///
/// The aggregator implements it over ClickHouse, with two queries:
///
/// ```sql
/// -- events (the raw events it stores for every Accepted outcome)
/// SELECT event_id, quantity, event_time, dimensions[{unique_dimension}], provider_cost
/// FROM raw_events
/// WHERE source_partition = {before.partition} AND tenant = {tenant} AND meter = {meter.name}
///   AND event_time >= {window_start} AND event_time < {window_end}
///   AND dimensions[{g1}] = {v1} AND ...            -- each group pair
///   AND source_offset < {before.offset}
/// ORDER BY source_offset;
/// -- last emission (the aggregates it publishes)
/// SELECT revision, value, provider_cost FROM meter_aggregates
/// WHERE source_partition = {before.partition} AND tenant = ... AND meter = ...
///   AND dimensions = {group as map} AND window_start = {window_start}
///   AND seq < {before.next_seq}
/// ORDER BY seq DESC LIMIT 1;
/// ```
///
/// Contract: reflect every accepted event at offsets `< before.offset` and every aggregate with
/// `seq < before.next_seq` (flush or consult buffered inserts first), and nothing later
/// (replay determinism). Return `None` if neither query finds anything. An error aborts the
/// current `on_event` without changing the engine; retry it.
pub trait WindowStore {
    fn load(&mut self, q: &WindowQuery<'_>) -> Result<Option<LoadedWindow>>;

    /// The engine dropped a closed window from memory; `last` is its final emitted state.
    /// Stores backed by raw events need no action.
    fn window_evicted(&mut self, q: &WindowQuery<'_>, last: &LastEmitted) {
        let _ = (q, last);
    }
}

/// A window's identity inside the engine: meter, window start, and tenant plus `group_by`
/// values packed as netstrings (`"4:acme9:gpt-large2:eu"`), stored **inline** when short
/// (up to 46 bytes, which covers typical keys) and in one allocation otherwise.
///
/// Why: high-cardinality traffic creates a window every few events, and every event compares
/// its key with the stored one. Separate `String`s per part cost one allocation each to create
/// and one more cache miss each to compare; inline storage costs neither. Length prefixes (not
/// separators) keep any tenant or value unambiguous.
#[derive(Debug, Clone)]
pub(crate) struct WindowKey {
    pub window_start: i64,
    pub meter: u16,
    text: KeyText,
}

const INLINE_KEY: usize = 46;

#[derive(Debug, Clone)]
enum KeyText {
    Inline { len: u8, buf: [u8; INLINE_KEY] },
    Heap(Box<[u8]>),
}

impl KeyText {
    #[inline]
    fn as_bytes(&self) -> &[u8] {
        match self {
            KeyText::Inline { len, buf } => &buf[..usize::from(*len)],
            KeyText::Heap(b) => b,
        }
    }
}

impl PartialEq for WindowKey {
    fn eq(&self, other: &Self) -> bool {
        self.window_start == other.window_start
            && self.meter == other.meter
            && self.text.as_bytes() == other.text.as_bytes()
    }
}
impl Eq for WindowKey {}

fn decimal_digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Writes the netstring of `part` at `buf[at..]` (sized by the caller) and returns where it
/// ends. Slice copies, not a byte-wise `Extend`: this runs for nearly every event when windows
/// hold few events.
#[inline]
fn put_part(buf: &mut [u8], mut at: usize, part: &[u8]) -> usize {
    let n = part.len();
    if n < 10 {
        buf[at] = b'0' + n as u8;
        at += 1;
    } else {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut rest = n;
        while rest > 0 {
            i -= 1;
            digits[i] = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        let len = digits.len() - i;
        buf[at..at + len].copy_from_slice(&digits[i..]);
        at += len;
    }
    buf[at] = b':';
    at += 1;
    buf[at..at + n].copy_from_slice(part);
    at + n
}

impl WindowKey {
    pub fn new<'a>(meter: u16, window_start: i64, tenant: &'a str, dims: impl Iterator<Item = &'a str> + Clone) -> Self {
        let parts = std::iter::once(tenant).chain(dims);
        let size: usize = parts.clone().map(|p| p.len() + decimal_digits(p.len()) + 1).sum();
        let text = if size <= INLINE_KEY {
            let mut buf = [0; INLINE_KEY];
            let mut len = 0;
            for p in parts {
                len = put_part(&mut buf, len, p.as_bytes());
            }
            KeyText::Inline { len: len as u8, buf }
        } else {
            let mut v = vec![0; size];
            let mut len = 0;
            for p in parts {
                len = put_part(&mut v, len, p.as_bytes());
            }
            KeyText::Heap(v.into_boxed_slice())
        };
        Self {
            window_start,
            meter,
            text,
        }
    }

    /// Tenant, then the `group_by` values.
    pub fn parts(&self) -> Parts<'_> {
        Parts {
            rest: self.text.as_bytes(),
        }
    }

    pub fn tenant(&self) -> &str {
        self.parts().next().unwrap_or("")
    }

    /// The tenant's bytes, without the UTF-8 check of [`Self::tenant`] (for per-tenant counts).
    #[inline]
    pub fn tenant_bytes(&self) -> &[u8] {
        RawParts { rest: self.text.as_bytes() }.next().unwrap_or(&[])
    }

    /// The tenant and the `group_by` values, parsing the key once.
    #[inline]
    pub fn tenant_and_dims(&self) -> (&str, Parts<'_>) {
        let mut parts = self.parts();
        (parts.next().unwrap_or(""), parts)
    }

    pub fn dims(&self) -> std::iter::Skip<Parts<'_>> {
        self.parts().skip(1)
    }

    #[inline]
    pub fn matches(&self, meter: u16, window_start: i64, tenant: &str, dims: &[&str]) -> bool {
        if self.window_start != window_start || self.meter != meter {
            return false;
        }
        let mut parts = RawParts {
            rest: self.text.as_bytes(),
        };
        parts.next() == Some(tenant.as_bytes())
            && dims.iter().all(|d| parts.next() == Some(d.as_bytes()))
            && parts.next().is_none()
    }
}

/// Iterator over the parts of a [`WindowKey`], as bytes (for comparisons).
struct RawParts<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for RawParts<'a> {
    type Item = &'a [u8];

    #[inline]
    fn next(&mut self) -> Option<&'a [u8]> {
        // Lengths are short: a digit loop beats `find` + `parse`.
        let mut len = 0usize;
        let mut i = 0;
        while let Some(&b) = self.rest.get(i) {
            if b == b':' {
                break;
            }
            len = len * 10 + usize::from(b.wrapping_sub(b'0'));
            i += 1;
        }
        let part = self.rest.get(i + 1..i + 1 + len)?;
        self.rest = &self.rest[i + 1 + len..];
        Some(part)
    }
}

/// Iterator over the parts of a [`WindowKey`] as `&str`.
pub(crate) struct Parts<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Parts<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let mut raw = RawParts { rest: self.rest };
        let part = raw.next()?;
        self.rest = raw.rest;
        // Each part was copied from a `&str`, so this cannot fail; validating costs a few ns
        // and happens only on emission, eviction and snapshots, never per event.
        #[allow(clippy::expect_used, reason = "each part was copied from a &str")]
        Some(std::str::from_utf8(part).expect("window key parts are UTF-8"))
    }
}

/// What one event without a carried cost adds to [`Window::uncosted`].
fn uncosted_unit(agg: Aggregation, c: &Contribution<'_>) -> Decimal {
    match agg {
        Aggregation::Count => Decimal::ONE,
        _ => c.quantity,
    }
}

/// One event's contribution, already validated and parsed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Contribution<'a> {
    pub quantity: Decimal,
    pub event_time_ms: i64,
    pub event_id: &'a str,
    pub unique_value: &'a str,
    pub provider_cost: Option<Decimal>,
}

/// Which addition could not be done exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overflow {
    Quantity,
    ProviderCost,
}

/// `a + b`, or None if the result does not fit or would be rounded.
///
/// `rust_decimal` rounds (lowering the scale) only when the exact sum does not fit 96 bits, so
/// a result scale below the operands' means digits were lost, with one exception: when an
/// operand is zero it returns the other one unchanged, with its own (possibly lower) scale,
/// which is exact. (`0.0 + -3` gives `-3`, scale 0.)
#[inline]
pub(crate) fn exact_add(a: Decimal, b: Decimal) -> Option<Decimal> {
    if a.is_zero() {
        return Some(b);
    }
    if b.is_zero() {
        return Some(a);
    }
    let r = a.checked_add(b)?;
    (r.scale() >= a.scale().max(b.scale())).then_some(r)
}

/// The aggregation-specific part of a window's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Acc {
    /// Sum (also the numerator of avg; the count is `event_count`).
    Sum(Decimal),
    /// Count needs no state beyond `event_count`.
    Count,
    Min(Decimal),
    Max(Decimal),
    /// Boxed (like `Latest`): rare aggregations should not make every window's state bigger;
    /// the common ones then fit with the key in two cache lines.
    Unique(Box<hashbrown::HashSet<Box<str>>>),
    Latest(Box<Latest>),
}

/// State of a `latest` window: the greatest `(event_time, event_id)` and its quantity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Latest {
    pub event_time_ms: i64,
    pub event_id: Box<str>,
    pub value: Decimal,
}

/// The state of one window. `repr(C)` so that the fields every event touches (key, then the
/// accumulator and counters) share the first cache lines, and the emission-only ones come last.
#[derive(Debug, Clone)]
#[repr(C)]
pub(crate) struct Window {
    pub key: WindowKey,
    pub event_count: i64,
    pub provider_cost: Decimal,
    /// What the events without a carried provider cost contributed: their quantities (their
    /// number for `count`), so the rater costs exactly those at the rate card.
    pub uncosted: Decimal,
    pub acc: Acc,
    pub closed: bool,
    /// Closed and changed since its last emission (a restatement is pending).
    pub dirty: bool,
    /// Open and changed since its last provisional total (see `engine::open`). Not in the
    /// snapshot: provisional totals are best effort.
    pub touched: bool,
    /// Changed since the last checkpoint mark while deltas are tracked (see `engine::delta`).
    /// Not in the snapshot.
    pub changed: bool,
    pub hash: u64,
    /// Creation number (per engine, deterministic, in the snapshot): the emission order of
    /// windows that close or restate together, so no sort by key is needed.
    pub created: u64,
    pub last: Option<LastEmitted>,
}

impl Window {
    pub fn new(key: WindowKey, hash: u64, created: u64, agg: Aggregation, c: &Contribution<'_>) -> Self {
        let acc = match agg {
            Aggregation::Sum | Aggregation::Avg => Acc::Sum(c.quantity),
            Aggregation::Count => Acc::Count,
            Aggregation::Min => Acc::Min(c.quantity),
            Aggregation::Max => Acc::Max(c.quantity),
            Aggregation::UniqueCount => {
                let mut s = hashbrown::HashSet::new();
                s.insert(Box::from(c.unique_value));
                Acc::Unique(Box::new(s))
            }
            Aggregation::Latest => Acc::Latest(Box::new(Latest {
                event_time_ms: c.event_time_ms,
                event_id: Box::from(c.event_id),
                value: c.quantity,
            })),
        };
        Self {
            key,
            hash,
            created,
            acc,
            event_count: 1,
            provider_cost: c.provider_cost.unwrap_or(Decimal::ZERO),
            uncosted: if c.provider_cost.is_some() { Decimal::ZERO } else { uncosted_unit(agg, c) },
            closed: false,
            dirty: false,
            touched: false,
            changed: false,
            last: None,
        }
    }

    /// Adds one event, all or nothing.
    #[inline]
    pub fn try_apply(&mut self, c: &Contribution<'_>) -> Result<(), Overflow> {
        let cost = match c.provider_cost {
            Some(pc) => Some(exact_add(self.provider_cost, pc).ok_or(Overflow::ProviderCost)?),
            None => None,
        };
        let uncosted = match (c.provider_cost, &self.acc) {
            (Some(_), _) => None,
            (None, Acc::Count) => Some(exact_add(self.uncosted, Decimal::ONE).ok_or(Overflow::Quantity)?),
            (None, _) => Some(exact_add(self.uncosted, c.quantity).ok_or(Overflow::Quantity)?),
        };
        match &mut self.acc {
            Acc::Sum(s) => *s = exact_add(*s, c.quantity).ok_or(Overflow::Quantity)?,
            Acc::Count => {}
            Acc::Min(m) => {
                if c.quantity < *m {
                    *m = c.quantity
                }
            }
            Acc::Max(m) => {
                if c.quantity > *m {
                    *m = c.quantity
                }
            }
            Acc::Unique(set) => {
                if !set.contains(c.unique_value) {
                    set.insert(Box::from(c.unique_value));
                }
            }
            Acc::Latest(l) => {
                if (c.event_time_ms, c.event_id) > (l.event_time_ms, &*l.event_id) {
                    l.event_time_ms = c.event_time_ms;
                    l.event_id = Box::from(c.event_id);
                    l.value = c.quantity;
                }
            }
        }
        if let Some(cost) = cost {
            self.provider_cost = cost;
        }
        if let Some(u) = uncosted {
            self.uncosted = u;
        }
        self.event_count += 1;
        Ok(())
    }

    /// Rebuilds a window from a store's events (in offset order, as they were first applied).
    pub fn rebuild(
        key: WindowKey,
        hash: u64,
        created: u64,
        agg: Aggregation,
        loaded: &LoadedWindow,
    ) -> Result<Option<Self>> {
        let mut w: Option<Window> = None;
        for e in &loaded.events {
            let c = Contribution {
                quantity: e.quantity,
                event_time_ms: e.event_time_ms,
                event_id: &e.event_id,
                unique_value: &e.unique_value,
                provider_cost: e.provider_cost,
            };
            match &mut w {
                None => w = Some(Window::new(key.clone(), hash, created, agg, &c)),
                Some(w) => w
                    .try_apply(&c)
                    .map_err(|_| Error::Store("stored events of a window overflow its total".into()))?,
            }
        }
        if let Some(w) = &mut w {
            w.closed = true;
            w.last = loaded.last_emitted;
        }
        Ok(w)
    }

    /// The window's value, canonical (normalised, no negative zero) so that a window rebuilt
    /// from a store with another scale (ClickHouse returns scale 9) emits identical bytes.
    pub fn value(&self, agg: Aggregation) -> Decimal {
        let v = match (&self.acc, agg) {
            (Acc::Sum(s), Aggregation::Avg) => {
                crate::decimal::round_amount(*s / Decimal::from(self.event_count))
            }
            (Acc::Sum(s), _) => *s,
            (Acc::Count, _) => Decimal::from(self.event_count),
            (Acc::Min(m) | Acc::Max(m), _) => *m,
            (Acc::Unique(set), _) => Decimal::from(set.len() as u64),
            (Acc::Latest(l), _) => l.value,
        };
        canonical(v)
    }
}

/// Normalised, with zero always positive.
#[inline]
pub(crate) fn canonical(d: Decimal) -> Decimal {
    if d.is_zero() {
        Decimal::ZERO
    } else {
        d.normalize()
    }
}

#[cfg(test)]
mod tests;
