//! The accepted events of a batch as `usage_events` rows, encoded in ClickHouse's RowBinary
//! the moment they are accepted.
//!
//! Why bytes and not a `Vec` of owned rows: an owned row costs ~10 allocations per accepted
//! event on the consume loop (its strings and dimension vectors, freed again by the writer
//! task on another thread) and a second pass to serialize it; appending the encoded row to a
//! buffer that is reused from batch to batch allocates nothing in steady state. Every retry of
//! an insert sends the same bytes, which ClickHouse's block deduplication relies on.
//!
//! The rare readers of unwritten rows (the cold tier's look-ups, which must also see events
//! accepted but not yet inserted) decode them again with [`UsageRows::iter`].

use meterflow_core::decimal::to_ch_i128;
use meterflow_core::engine::Accepted;
use meterflow_core::event::UsageEventRef;

use crate::rows::secs;

/// The columns of a row, in encoding order (`INSERT INTO usage_events (..) FORMAT RowBinary`).
pub const COLUMNS: &str = "tenant, meter, event_id, event_time, event_time_ms, window_start, quantity, \
     provider_cost, has_provider_cost, dim_keys, dim_values, source, source_partition, source_offset";

/// RowBinary `usage_events` rows and where each starts.
#[derive(Debug, Default)]
pub struct UsageRows {
    buf: Vec<u8>,
    starts: Vec<usize>,
}

impl UsageRows {
    /// Appends the row of an accepted event. The dimensions must be sorted by key (the table
    /// keeps them in key order). Quantities come from the engine (canonical, at most 9
    /// fractional digits), so the conversion to `Decimal(38, 9)` is exact; an error is a bug.
    pub fn push(
        &mut self,
        acc: &Accepted,
        ev: &UsageEventRef<'_>,
        partition: i32,
        offset: i64,
    ) -> Result<(), meterflow_core::Error> {
        let quantity = to_ch_i128(&acc.quantity)?;
        let provider_cost = match &acc.provider_cost {
            Some(c) => to_ch_i128(c)?,
            None => 0,
        };
        debug_assert!(ev.dimensions.is_sorted(), "dimensions sorted by the caller");
        self.starts.push(self.buf.len());
        let b = &mut self.buf;
        put_str(b, ev.tenant);
        put_str(b, ev.meter);
        put_str(b, ev.event_id);
        b.extend_from_slice(&secs(ev.event_time_ms).to_le_bytes());
        b.extend_from_slice(&ev.event_time_ms.to_le_bytes());
        b.extend_from_slice(&secs(acc.window_start).to_le_bytes());
        b.extend_from_slice(&quantity.to_le_bytes());
        b.extend_from_slice(&provider_cost.to_le_bytes());
        b.push(u8::from(acc.provider_cost.is_some()));
        put_len(b, ev.dimensions.len());
        for (k, _) in &ev.dimensions {
            put_str(b, k);
        }
        put_len(b, ev.dimensions.len());
        for (_, v) in &ev.dimensions {
            put_str(b, v);
        }
        put_str(b, ev.source);
        b.extend_from_slice(&partition.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Memory held by the rows.
    pub fn bytes(&self) -> usize {
        self.buf.len() + self.starts.len() * std::mem::size_of::<usize>()
    }

    /// Empties the buffer, keeping its capacity.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.starts.clear();
    }

    /// The encoded rows `[0, n/2)` and `[n/2, n)`: the same split on every retry.
    pub fn halves(&self) -> (&[u8], &[u8]) {
        let at = self.starts.get(self.starts.len() / 2).copied().unwrap_or(self.buf.len());
        self.buf.split_at(at)
    }

    /// The rows, decoded again (the cold tier's look-ups of unwritten events).
    pub fn iter(&self) -> impl Iterator<Item = UsageRowRef<'_>> {
        let buf = &self.buf[..];
        self.starts.iter().filter_map(move |&s| {
            let row = UsageRowRef::decode(buf.get(s..)?);
            // Only this module writes the buffer: a row that does not decode is a bug.
            debug_assert!(row.is_some(), "usage row at {s} does not decode");
            row
        })
    }
}

/// One row of [`UsageRows`], borrowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRowRef<'a> {
    pub tenant: &'a str,
    pub meter: &'a str,
    pub event_id: &'a str,
    pub event_time_ms: i64,
    pub window_start: u32,
    pub quantity: i128,
    pub provider_cost: i128,
    pub has_provider_cost: bool,
    pub dimensions: Vec<(&'a str, &'a str)>,
    pub source: &'a str,
    pub source_partition: i32,
    pub source_offset: i64,
}

impl<'a> UsageRowRef<'a> {
    /// The value of dimension `key`, `""` if absent (as `dim_values[indexOf(dim_keys, key)]`
    /// answers in ClickHouse).
    pub fn dim(&self, key: &str) -> &'a str {
        self.dimensions.iter().find(|(k, _)| *k == key).map_or("", |(_, v)| *v)
    }

    fn decode(bytes: &'a [u8]) -> Option<Self> {
        let mut r = Reader(bytes);
        let tenant = r.str()?;
        let meter = r.str()?;
        let event_id = r.str()?;
        let _event_time = r.array::<4>()?;
        let event_time_ms = i64::from_le_bytes(r.array()?);
        let window_start = u32::from_le_bytes(r.array()?);
        let quantity = i128::from_le_bytes(r.array()?);
        let provider_cost = i128::from_le_bytes(r.array()?);
        let has_provider_cost = r.array::<1>()?[0] != 0;
        let n = r.len()?;
        let keys = (0..n).map(|_| r.str()).collect::<Option<Vec<_>>>()?;
        if r.len()? != n {
            return None;
        }
        let mut dimensions = Vec::with_capacity(n);
        for k in keys {
            dimensions.push((k, r.str()?));
        }
        Some(Self {
            tenant,
            meter,
            event_id,
            event_time_ms,
            window_start,
            quantity,
            provider_cost,
            has_provider_cost,
            dimensions,
            source: r.str()?,
            source_partition: i32::from_le_bytes(r.array()?),
            source_offset: i64::from_le_bytes(r.array()?),
        })
    }
}

/// RowBinary lengths are unsigned LEB128.
fn put_len(b: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        b.push((n as u8) | 0x80);
        n >>= 7;
    }
    b.push(n as u8);
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    put_len(b, s.len());
    b.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn len(&mut self) -> Option<usize> {
        let mut n = 0usize;
        for shift in (0..64).step_by(7) {
            let byte = *self.take(1)?.first()?;
            n |= usize::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }

    fn str(&mut self) -> Option<&'a str> {
        let n = self.len()?;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use rust_decimal::Decimal;

    use super::*;

    fn event<'a>(id: &'a str, dims: Vec<(&'a str, &'a str)>) -> UsageEventRef<'a> {
        UsageEventRef {
            event_id: id,
            tenant: "acme",
            meter: "tokens",
            quantity: "1.5",
            event_time_ms: 1_700_000_000_123,
            dimensions: dims,
            provider_cost: None,
            source: "gw-1",
        }
    }

    #[test]
    fn rows_decode_to_what_was_pushed() {
        let mut rows = UsageRows::default();
        let long = "x".repeat(300); // a length that needs two LEB128 bytes
        let accepted = Accepted { quantity: Decimal::new(15, 1), provider_cost: Some(Decimal::new(2, 3)), window_start: 1_699_999_980_000 };
        rows.push(&accepted, &event("e1", vec![("model", "gpt"), ("region", &long)]), 3, 41).unwrap();
        let plain = Accepted { quantity: Decimal::new(7, 0), provider_cost: None, window_start: 0 };
        rows.push(&plain, &event(&long, vec![]), 3, 42).unwrap();

        let back: Vec<_> = rows.iter().collect();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].event_id, "e1");
        assert_eq!(back[0].quantity, 1_500_000_000);
        assert_eq!(back[0].provider_cost, 2_000_000);
        assert!(back[0].has_provider_cost);
        assert_eq!(back[0].window_start, 1_699_999_980);
        assert_eq!(back[0].dim("region"), long);
        assert_eq!(back[0].dim("absent"), "");
        assert_eq!((back[0].source_partition, back[0].source_offset), (3, 41));
        assert_eq!(back[1].event_id, long);
        assert_eq!(back[1].quantity, 7_000_000_000);
        assert!(!back[1].has_provider_cost && back[1].dimensions.is_empty());
    }

    #[test]
    fn the_encoding_is_clickhouse_row_binary() {
        // Written out by hand from ClickHouse's RowBinary documentation, not by the encoder.
        let mut rows = UsageRows::default();
        let acc = Accepted { quantity: Decimal::ONE, provider_cost: None, window_start: 60_000 };
        rows.push(&acc, &event("e", vec![("k", "v")]), 1, 2).unwrap();
        let mut want = vec![4, b'a', b'c', b'm', b'e', 6, b't', b'o', b'k', b'e', b'n', b's', 1, b'e'];
        want.extend_from_slice(&1_700_000_000u32.to_le_bytes());
        want.extend_from_slice(&1_700_000_000_123i64.to_le_bytes());
        want.extend_from_slice(&60u32.to_le_bytes());
        want.extend_from_slice(&1_000_000_000i128.to_le_bytes());
        want.extend_from_slice(&0i128.to_le_bytes());
        want.push(0);
        want.extend_from_slice(&[1, 1, b'k', 1, 1, b'v']);
        want.extend_from_slice(&[4, b'g', b'w', b'-', b'1']);
        want.extend_from_slice(&1i32.to_le_bytes());
        want.extend_from_slice(&2i64.to_le_bytes());
        assert_eq!(rows.halves().1, &want[..]);
        assert!(rows.halves().0.is_empty());
    }

    #[test]
    fn halves_split_at_a_row_boundary_and_clear_keeps_nothing() {
        let mut rows = UsageRows::default();
        let acc = Accepted { quantity: Decimal::ONE, provider_cost: None, window_start: 0 };
        for i in 0..5 {
            rows.push(&acc, &event(&format!("id-{i}"), vec![]), 0, i).unwrap();
        }
        let (a, b) = rows.halves();
        let first = UsageRowRef::decode(a).unwrap();
        let third = UsageRowRef::decode(b).unwrap();
        assert_eq!((first.event_id, third.event_id), ("id-0", "id-2"));
        rows.clear();
        assert!(rows.is_empty() && rows.iter().next().is_none() && rows.bytes() == 0);
    }
}
