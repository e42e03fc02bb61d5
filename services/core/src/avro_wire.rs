//! The Avro wire primitives every meterflow codec shares: the two framings of a payload and
//! the zig-zag varint encoding of longs, lengths and counts.
//!
//! Framings: Avro single-object encoding (`C3 01` + the 8-byte little-endian CRC-64-AVRO
//! fingerprint of the writer schema) and Confluent's (`00` + a 4-byte big-endian schema id).
//! The reader is the hot path of the usage-event decoder (a few ns per field), so it borrows
//! the input, never allocates and checks every length against the bytes left: hostile
//! payloads reach it.

use crate::Error;

/// First two bytes of Avro single-object encoding.
pub const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// First byte of Confluent framing.
pub const CONFLUENT_MAGIC: u8 = 0x00;

/// The header of a framed payload: which writer schema the body was written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Single-object encoding: the writer schema's fingerprint.
    SingleObject { fingerprint: u64 },
    /// Confluent framing: a registry's schema id.
    Confluent { schema_id: u32 },
}

impl Header {
    /// Appends the header bytes.
    #[inline]
    pub fn write(self, out: &mut Vec<u8>) {
        match self {
            Self::SingleObject { fingerprint } => {
                out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
                out.extend_from_slice(&fingerprint.to_le_bytes());
            }
            Self::Confluent { schema_id } => {
                out.push(CONFLUENT_MAGIC);
                out.extend_from_slice(&schema_id.to_be_bytes());
            }
        }
    }

    /// Splits a payload into its header and the Avro body.
    #[inline]
    pub fn split(bytes: &[u8]) -> Result<(Self, &[u8]), Error> {
        match bytes {
            [] => Err(Error::Empty),
            [0xC3, 0x01, rest @ ..] => match rest.split_first_chunk::<8>() {
                Some((fp, body)) => Ok((Self::SingleObject { fingerprint: u64::from_le_bytes(*fp) }, body)),
                None => Err(Error::Truncated("fingerprint")),
            },
            [CONFLUENT_MAGIC, rest @ ..] => match rest.split_first_chunk::<4>() {
                Some((id, body)) => Ok((Self::Confluent { schema_id: u32::from_be_bytes(*id) }, body)),
                None => Err(Error::Truncated("schema id")),
            },
            [b, ..] => Err(Error::UnknownFraming(*b)),
        }
    }
}

/// Appends `v` as an Avro long (zig-zag, then little-endian base-128 varint).
#[inline]
pub fn write_long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// Appends an Avro `bytes` (length, then the bytes).
#[inline]
pub fn write_bytes(out: &mut Vec<u8>, b: &[u8]) {
    write_long(out, b.len() as i64);
    out.extend_from_slice(b);
}

/// Appends an Avro `string`.
#[inline]
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    write_bytes(out, s.as_bytes());
}

/// Reads Avro primitives from a borrowed body; `what` names the field in errors (they end
/// up in dead letters' `detail`).
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes read so far.
    #[inline]
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not read yet.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// An Avro long. A varint longer than 10 bytes, or whose 10th byte carries more than
    /// the 64th bit, is malformed rather than silently truncated.
    #[inline]
    pub fn long(&mut self, what: &'static str) -> Result<i64, Error> {
        // Lengths and counts are nearly always one byte: that case alone stays inlined.
        if let Some(&b) = self.buf.get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(i64::from(b >> 1) ^ -i64::from(b & 1));
            }
        }
        self.long_multi(what)
    }

    /// [`Self::long`] of more than one byte (or none left).
    #[inline(never)]
    fn long_multi(&mut self, what: &'static str) -> Result<i64, Error> {
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(Error::Truncated(what));
            };
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(Error::BadVarint(what));
            }
            value |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
            shift += 7;
            if shift > 63 {
                return Err(Error::BadVarint(what));
            }
        }
    }

    /// The next `n` bytes.
    #[inline]
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Error> {
        if n > self.remaining() {
            return Err(Error::Truncated(what));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    /// A length or count: non-negative and at most the bytes left (every byte of a string,
    /// and every item of a non-empty block, takes at least one byte).
    #[inline]
    pub fn bounded(&self, v: i64, what: &'static str) -> Result<usize, Error> {
        if v < 0 {
            return Err(Error::NegativeLength(what));
        }
        if v as u64 > self.remaining() as u64 {
            return Err(Error::Truncated(what));
        }
        Ok(v as usize)
    }

    /// An Avro `bytes`.
    #[inline]
    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], Error> {
        let len = self.long(what)?;
        let len = self.bounded(len, what)?;
        self.take(len, what)
    }

    /// An Avro `string`, borrowed.
    #[inline]
    pub fn string(&mut self, what: &'static str) -> Result<&'a str, Error> {
        std::str::from_utf8(self.bytes(what)?).map_err(|_| Error::BadUtf8(what))
    }

    /// The item count of the next block of an array or map; 0 ends it. A negative count is
    /// followed by the block's size in bytes, which is checked and skipped.
    #[inline]
    pub fn block(&mut self, what: &'static str) -> Result<usize, Error> {
        let count = self.long(what)?;
        if count < 0 {
            let count = count.checked_neg().ok_or(Error::BadVarint(what))?;
            let size = self.long(what)?;
            self.bounded(size, what)?;
            return self.bounded(count, what);
        }
        self.bounded(count, what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn longs_round_trip_and_match_apache_avro(v in any::<i64>()) {
            let mut ours = Vec::new();
            write_long(&mut ours, v);
            let theirs = apache_avro::to_avro_datum(&apache_avro::Schema::Long, apache_avro::types::Value::Long(v)).unwrap();
            prop_assert_eq!(&ours, &theirs);
            let mut r = Reader::new(&ours);
            prop_assert_eq!(r.long("v"), Ok(v));
            prop_assert_eq!(r.remaining(), 0);
        }

        #[test]
        fn headers_round_trip(fp in any::<u64>(), id in any::<u32>(), body in proptest::collection::vec(any::<u8>(), 0..8)) {
            for h in [Header::SingleObject { fingerprint: fp }, Header::Confluent { schema_id: id }] {
                let mut out = Vec::new();
                h.write(&mut out);
                out.extend_from_slice(&body);
                prop_assert_eq!(Header::split(&out), Ok((h, &body[..])));
            }
        }
    }

    #[test]
    fn malformed_input_is_a_typed_error() {
        assert_eq!(Header::split(&[]), Err(Error::Empty));
        assert_eq!(Header::split(&[0xC3, 0x01, 1, 2]), Err(Error::Truncated("fingerprint")));
        assert_eq!(Header::split(&[0, 1]), Err(Error::Truncated("schema id")));
        assert_eq!(Header::split(b"{}"), Err(Error::UnknownFraming(b'{')));
        assert_eq!(Reader::new(&[0xFF; 11]).long("x"), Err(Error::BadVarint("x")));
        assert_eq!(Reader::new(&[0x80]).long("x"), Err(Error::Truncated("x")));
        // A length of 3 with two bytes left; a negative length.
        assert_eq!(Reader::new(&[6, b'a', b'b']).string("s"), Err(Error::Truncated("s")));
        assert_eq!(Reader::new(&[1]).string("s"), Err(Error::NegativeLength("s")));
        assert_eq!(Reader::new(&[2, 0xFF]).string("s"), Err(Error::BadUtf8("s")));
        // A block of -1 items and 2 bytes, then one item.
        let mut r = Reader::new(&[1, 4, 2, 0]);
        assert_eq!(r.block("m"), Ok(1));
    }
}
