//! The low-volume records (aggregates, charges, dead letters, wallet adjustments), encoded
//! with apache-avro's generic path: correctness and schema checks matter more than
//! nanoseconds at one record per window.

use std::collections::BTreeMap;

use apache_avro::types::Value;
use rust_decimal::Decimal;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::decimal::check_storable;
use crate::schema::{self, Known};
use crate::Error;

mod provisional;
pub use provisional::ProvisionalTotal;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterAggregate {
    pub tenant: String,
    pub meter: String,
    pub aggregation: String,
    pub dimensions: BTreeMap<String, String>,
    pub window_start: i64,
    pub window_end: i64,
    pub revision: i32,
    #[serde(with = "rust_decimal::serde::str")]
    pub value: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub previous_value: Decimal,
    pub event_count: i64,
    #[serde(with = "rust_decimal::serde::str")]
    pub provider_cost: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub previous_provider_cost: Decimal,
    pub source_partition: i32,
    pub seq: i64,
    pub emitted_at: i64,
    /// The part of `value` contributed by events without a carried provider cost (sum: their
    /// quantities, count: their number), which the rater costs at the rate card. `None` for
    /// other aggregations and in v1 records (then: carried cost if non-zero, else rate card x
    /// value). Since schema v2.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub uncosted_value: Option<Decimal>,
    /// `uncosted_value` of the revision this one replaces.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub previous_uncosted_value: Option<Decimal>,
}

impl MeterAggregate {
    /// Canonical text of the group-by dimensions (`k=v,k=v`, sorted, with `\\`, `,` and `=`
    /// escaped): the window key column in ClickHouse.
    pub fn dimensions_key(&self) -> String {
        dimensions_key(&self.dimensions)
    }
}

/// See [`MeterAggregate::dimensions_key`].
pub fn dimensions_key(dims: &BTreeMap<String, String>) -> String {
    fn esc(out: &mut String, s: &str) {
        for c in s.chars() {
            if matches!(c, '\\' | ',' | '=') {
                out.push('\\');
            }
            out.push(c);
        }
    }
    let mut out = String::new();
    for (i, (k, v)) in dims.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        esc(&mut out, k);
        out.push('=');
        esc(&mut out, v);
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub charge_id: String,
    pub kind: String,
    pub tenant: String,
    pub plan: String,
    pub currency: String,
    pub meter: String,
    pub dimensions: BTreeMap<String, String>,
    pub period_start: i64,
    pub window_start: i64,
    pub window_end: i64,
    pub revision: i32,
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub provider_cost: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub margin: Decimal,
    pub seq: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub reason: String,
    pub detail: String,
    pub tenant: Option<String>,
    pub event_id: Option<String>,
    #[serde(with = "apache_avro::serde_avro_bytes")]
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalletAdjustment {
    pub idempotency_key: String,
    pub tenant: String,
    pub currency: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// `paid | promotional | refund | manual` (v1 wrote `top_up | adjustment`); see
    /// `rating::CreditKind`.
    pub kind: String,
    pub reason: String,
    pub created_at: i64,
    /// When the credit's unused remainder expires (breakage); `None` never (v2).
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// Burn order: higher first (v2, default 0).
    #[serde(default)]
    pub priority: i32,
}

/// A record type tied to its schema.
pub trait AvroRecord: Serialize + DeserializeOwned {
    /// The schema this build writes (and reads into).
    fn known() -> &'static Known;

    /// Decimals on the wire have at most 9 significant fractional digits (what ClickHouse
    /// `Decimal(38, 9)` stores): a record breaking that is refused when read, so nothing
    /// downstream has to round it or fail on it.
    fn check_decimals(&self) -> Result<(), Error> {
        Ok(())
    }

    /// Earlier writer schemas still read (resolved to the current one with its defaults).
    fn older() -> Vec<&'static Known> {
        Vec::new()
    }

    /// Single-object encoding with this record's schema, headed by the spec's fingerprint
    /// (either fingerprint is accepted by [`AvroRecord::from_avro`]; see [`crate::schema`]).
    fn to_avro(&self) -> Result<Vec<u8>, Error> {
        let known = Self::known();
        let value = apache_avro::to_value(self)?.resolve(&known.schema)?;
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&[0xC3, 0x01]);
        out.extend_from_slice(&known.fingerprint.to_le_bytes());
        write_value(&value, &mut out)?;
        Ok(out)
    }

    fn from_avro(bytes: &[u8]) -> Result<Self, Error> {
        let known = Self::known();
        let mut writer = known;
        let body = match bytes {
            [0xC3, 0x01, rest @ ..] if rest.len() >= 8 => {
                let fp = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
                if !known.matches(fp) {
                    writer = Self::older()
                        .into_iter()
                        .find(|k| k.matches(fp))
                        .ok_or(Error::UnknownFingerprint(fp))?;
                }
                &rest[8..]
            }
            [0xC3, 0x01, ..] => return Err(Error::Truncated("fingerprint")),
            [] => return Err(Error::Empty),
            [b, ..] => return Err(Error::UnknownFraming(*b)),
        };
        // apache-avro believes the lengths and counts it reads: check them against the input first.
        check_datum(&writer.schema, &mut Cursor { buf: body, pos: 0 })?;
        let mut reader = body;
        let resolve_into = (!std::ptr::eq(writer, known)).then_some(&known.schema);
        let value = apache_avro::from_avro_datum(&writer.schema, &mut reader, resolve_into)?;
        if !reader.is_empty() {
            return Err(Error::TrailingBytes(reader.len()));
        }
        let record: Self = apache_avro::from_value(&normalise(value))?;
        record.check_decimals()?;
        Ok(record)
    }
}

/// Position in a datum being checked.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn skip(&mut self, n: usize, what: &'static str) -> Result<(), Error> {
        if n > self.remaining() {
            return Err(Error::Truncated(what));
        }
        self.pos += n;
        Ok(())
    }

    fn long(&mut self, what: &'static str) -> Result<i64, Error> {
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

    /// A length or block count: non-negative and at most the bytes left (every string byte,
    /// and every map entry or array item of these schemas, takes at least one byte).
    fn bounded(&mut self, v: i64, what: &'static str) -> Result<usize, Error> {
        if v < 0 {
            return Err(Error::NegativeLength(what));
        }
        if v as u64 > self.remaining() as u64 {
            return Err(Error::Truncated(what));
        }
        Ok(v as usize)
    }

    /// The next block count of an array or map (a negative count is followed by the block's
    /// size in bytes).
    fn block(&mut self, what: &'static str) -> Result<usize, Error> {
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

/// Walks a datum of `schema` without allocating and fails if any length or count in it claims
/// more than the input holds. apache-avro trusts them: a map claiming 10^9 entries makes it
/// reserve tens of GB before reading the first (an abort, found by fuzzing; see
/// `services/core/fuzz`), a string length of 500 MB allocates 500 MB. After this check its
/// allocations are bounded by a small multiple of the input's size.
fn check_datum(schema: &apache_avro::Schema, c: &mut Cursor<'_>) -> Result<(), Error> {
    use apache_avro::Schema as S;
    match schema {
        S::Null => Ok(()),
        S::Boolean => c.skip(1, "boolean"),
        S::Int | S::Long | S::Date | S::TimeMillis | S::TimeMicros | S::TimestampMillis | S::TimestampMicros
        | S::LocalTimestampMillis | S::LocalTimestampMicros | S::Enum(_) => c.long("integer").map(|_| ()),
        S::Float => c.skip(4, "float"),
        S::Double => c.skip(8, "double"),
        S::String | S::Bytes => {
            let len = c.long("string")?;
            let len = c.bounded(len, "string")?;
            c.skip(len, "string")
        }
        S::Fixed(f) => c.skip(f.size, "fixed"),
        S::Array(a) => loop {
            let n = c.block("array")?;
            if n == 0 {
                return Ok(());
            }
            for _ in 0..n {
                check_datum(&a.items, c)?;
            }
        },
        S::Map(m) => loop {
            let n = c.block("map")?;
            if n == 0 {
                return Ok(());
            }
            for _ in 0..n {
                check_datum(&S::String, c)?;
                check_datum(&m.types, c)?;
            }
        },
        S::Union(u) => {
            let index = c.long("union")?;
            let variant = usize::try_from(index)
                .ok()
                .and_then(|i| u.variants().get(i))
                .ok_or(Error::BadUnion { field: "union", index })?;
            check_datum(variant, c)
        }
        S::Record(r) => r.fields.iter().try_for_each(|f| check_datum(&f.schema, c)),
        other => Err(Error::Schema(format!("record schemas may not use {other:?}: the datum check does not know it"))),
    }
}

/// Avro binary encoding of a value already resolved against its schema, with map entries in
/// key order. apache-avro writes maps in `HashMap` order, so the same record could encode to
/// different bytes; meterflow promises byte-identical outputs for identical inputs.
fn write_value(v: &Value, out: &mut Vec<u8>) -> Result<(), Error> {
    use crate::codec::{write_long, write_str};
    match v {
        Value::Null => {}
        Value::Boolean(b) => out.push(u8::from(*b)),
        Value::Int(i) => write_long(out, i64::from(*i)),
        Value::Long(l) | Value::TimestampMillis(l) => write_long(out, *l),
        Value::String(s) | Value::Enum(_, s) => write_str(out, s),
        Value::Bytes(b) => {
            write_long(out, b.len() as i64);
            out.extend_from_slice(b);
        }
        Value::Union(i, inner) => {
            write_long(out, i64::from(*i));
            write_value(inner, out)?;
        }
        Value::Record(fields) => {
            for (_, f) in fields {
                write_value(f, out)?;
            }
        }
        Value::Map(m) => {
            if !m.is_empty() {
                write_long(out, m.len() as i64);
                let mut entries: Vec<_> = m.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                for (k, val) in entries {
                    write_str(out, k);
                    write_value(val, out)?;
                }
            }
            write_long(out, 0);
        }
        Value::Array(items) => {
            if !items.is_empty() {
                write_long(out, items.len() as i64);
                for i in items {
                    write_value(i, out)?;
                }
            }
            write_long(out, 0);
        }
        other => return Err(Error::Avro(format!("unsupported value in a meterflow record: {other:?}"))),
    }
    Ok(())
}

/// Logical types deserialize as their raw representation into plain Rust fields.
fn normalise(v: Value) -> Value {
    match v {
        Value::TimestampMillis(t) => Value::Long(t),
        Value::Record(fields) => {
            Value::Record(fields.into_iter().map(|(k, v)| (k, normalise(v))).collect())
        }
        Value::Union(i, b) => Value::Union(i, Box::new(normalise(*b))),
        other => other,
    }
}

impl AvroRecord for MeterAggregate {
    fn known() -> &'static Known {
        schema::meter_aggregate_v2()
    }

    fn older() -> Vec<&'static Known> {
        vec![schema::meter_aggregate_v1()]
    }
    fn check_decimals(&self) -> Result<(), Error> {
        check_storable("value", &self.value)?;
        check_storable("previous_value", &self.previous_value)?;
        check_storable("provider_cost", &self.provider_cost)?;
        check_storable("previous_provider_cost", &self.previous_provider_cost)
    }
}
impl AvroRecord for Charge {
    fn known() -> &'static Known {
        schema::charge_v1()
    }
    fn check_decimals(&self) -> Result<(), Error> {
        check_storable("quantity", &self.quantity)?;
        check_storable("amount", &self.amount)?;
        check_storable("provider_cost", &self.provider_cost)?;
        check_storable("margin", &self.margin)
    }
}
impl AvroRecord for DeadLetter {
    fn known() -> &'static Known {
        schema::dead_letter_v1()
    }
}
impl AvroRecord for WalletAdjustment {
    fn known() -> &'static Known {
        schema::wallet_adjustment_v2()
    }

    fn older() -> Vec<&'static Known> {
        vec![schema::wallet_adjustment_v1()]
    }
    fn check_decimals(&self) -> Result<(), Error> {
        check_storable("amount", &self.amount)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn aggregate_round_trip() {
        let a = MeterAggregate {
            tenant: "acme".into(),
            meter: "input_tokens".into(),
            aggregation: "sum".into(),
            dimensions: [("model".to_string(), "m1".to_string())].into(),
            window_start: 1_700_000_000_000,
            window_end: 1_700_000_060_000,
            revision: 2,
            value: d("12345.000000001"),
            previous_value: d("12000"),
            event_count: 17,
            provider_cost: d("0.25"),
            previous_provider_cost: d("0.2"),
            source_partition: 3,
            seq: 99,
            emitted_at: 1_700_000_070_000,
            uncosted_value: Some(d("345.000000001")),
            previous_uncosted_value: None,
        };
        assert_eq!(MeterAggregate::from_avro(&a.to_avro().unwrap()).unwrap(), a);
        // v1 bytes (written by older aggregators) still read, the v2 fields as None.
        let v1 = schema::meter_aggregate_v1();
        let value = apache_avro::to_value(&a).unwrap();
        let apache_avro::types::Value::Record(fields) = value else { panic!() };
        let fields: Vec<_> = fields.into_iter().filter(|(k, _)| !k.contains("uncosted")).collect();
        let value = apache_avro::types::Value::Record(fields).resolve(&v1.schema).unwrap();
        let mut bytes = vec![0xC3, 0x01];
        bytes.extend_from_slice(&v1.fingerprint.to_le_bytes());
        bytes.extend_from_slice(&apache_avro::to_avro_datum(&v1.schema, value).unwrap());
        let old = MeterAggregate::from_avro(&bytes).unwrap();
        assert_eq!(old, MeterAggregate { uncosted_value: None, previous_uncosted_value: None, ..a.clone() });
        assert_ne!(v1.fingerprint, MeterAggregate::known().fingerprint);
    }

    #[test]
    fn maps_encode_deterministically_and_like_apache_avro() {
        let dims: BTreeMap<String, String> =
            (0..12).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
        let mut a = MeterAggregate {
            tenant: "t".into(),
            meter: "m".into(),
            aggregation: "sum".into(),
            dimensions: dims,
            window_start: 0,
            window_end: 60_000,
            revision: 0,
            value: d("1"),
            previous_value: d("0"),
            event_count: 1,
            provider_cost: d("0"),
            previous_provider_cost: d("0"),
            source_partition: 0,
            seq: 1,
            emitted_at: 0,
            uncosted_value: Some(d("1")),
            previous_uncosted_value: Some(d("0")),
        };
        let first = a.to_avro().unwrap();
        for _ in 0..20 {
            assert_eq!(a.to_avro().unwrap(), first, "same record, same bytes");
        }
        // apache-avro reads our bytes back to the same value it would have written.
        let known = MeterAggregate::known();
        let theirs = apache_avro::to_avro_datum(&known.schema, apache_avro::to_value(&a).unwrap().resolve(&known.schema).unwrap()).unwrap();
        let ours_value = apache_avro::from_avro_datum(&known.schema, &mut &first[10..], None).unwrap();
        let theirs_value = apache_avro::from_avro_datum(&known.schema, &mut &theirs[..], None).unwrap();
        assert_eq!(ours_value, theirs_value);
        a.dimensions.clear();
        assert_eq!(MeterAggregate::from_avro(&a.to_avro().unwrap()).unwrap(), a);
    }

    /// Writes the spec's fingerprint; reads records headed by it or by the legacy one.
    fn check_fingerprints<R: AvroRecord + PartialEq + std::fmt::Debug>(r: &R) {
        let known = R::known();
        let ours = r.to_avro().unwrap();
        assert_eq!(&ours[..2], &[0xC3, 0x01]);
        assert_eq!(&ours[2..10], &known.fingerprint.to_le_bytes());
        let mut legacy = ours.clone();
        legacy[2..10].copy_from_slice(&known.legacy_fingerprint.to_le_bytes());
        assert_eq!(&R::from_avro(&legacy).unwrap(), r);
        // apache-avro's own single-object writer (legacy header) reads too.
        let value = apache_avro::to_value(r).unwrap().resolve(&known.schema).unwrap();
        let mut writer = apache_avro::GenericSingleObjectWriter::new_with_capacity(&known.schema, 64).unwrap();
        let mut theirs = Vec::new();
        writer.write_value(value, &mut theirs).unwrap();
        assert_eq!(&theirs[2..10], &known.legacy_fingerprint.to_le_bytes());
        assert_eq!(&R::from_avro(&theirs).unwrap(), r);
        let mut other = ours;
        other[2..10].copy_from_slice(&(known.fingerprint ^ 1).to_le_bytes());
        assert!(matches!(R::from_avro(&other), Err(Error::UnknownFingerprint(_))));
    }

    #[test]
    fn every_record_writes_the_spec_fingerprint_and_reads_both() {
        let mut dims = BTreeMap::new();
        dims.insert("model".to_owned(), "m1".to_owned());
        check_fingerprints(&MeterAggregate {
            tenant: "t".into(),
            meter: "m".into(),
            aggregation: "sum".into(),
            dimensions: dims.clone(),
            window_start: 0,
            window_end: 60_000,
            revision: 1,
            value: d("100000000000000000000"),
            previous_value: d("1"),
            event_count: 2,
            provider_cost: d("0.5"),
            previous_provider_cost: d("0"),
            source_partition: 3,
            seq: 9,
            emitted_at: 60_000,
            uncosted_value: Some(d("7")),
            previous_uncosted_value: None,
        });
        check_fingerprints(&Charge {
            charge_id: "c1".into(),
            kind: "usage".into(),
            tenant: "t".into(),
            plan: "pro".into(),
            currency: "USD".into(),
            meter: "m".into(),
            dimensions: dims,
            period_start: 0,
            window_start: 0,
            window_end: 60_000,
            revision: 0,
            quantity: d("10"),
            amount: d("1.5"),
            provider_cost: d("1"),
            margin: d("0.5"),
            seq: 1,
        });
        check_fingerprints(&DeadLetter {
            source_topic: "u".into(),
            source_partition: 0,
            source_offset: 1,
            reason: "undecodable".into(),
            detail: "x".into(),
            tenant: Some("t".into()),
            event_id: None,
            payload: vec![1, 2],
        });
        check_fingerprints(&WalletAdjustment {
            idempotency_key: "k".into(),
            tenant: "t".into(),
            currency: "USD".into(),
            amount: d("5"),
            kind: "top_up".into(),
            reason: "r".into(),
            created_at: 7,
            expires_at: Some(9),
            priority: 2,
        });
    }

    #[test]
    fn decimals_finer_than_nine_digits_are_refused_on_read() {
        let w = WalletAdjustment {
            idempotency_key: "k".into(),
            tenant: "t".into(),
            currency: "USD".into(),
            amount: d("0.0000000001"),
            kind: "top_up".into(),
            reason: "r".into(),
            created_at: 7,
            expires_at: None,
            priority: 0,
        };
        let bytes = w.to_avro().unwrap();
        assert!(matches!(WalletAdjustment::from_avro(&bytes), Err(Error::BadDecimal { field: "amount", .. })));
        let ok = WalletAdjustment { amount: d("4000000000000000000.000000001"), ..w };
        assert_eq!(WalletAdjustment::from_avro(&ok.to_avro().unwrap()).unwrap(), ok);
    }

    #[test]
    fn dead_letter_round_trip_keeps_bytes() {
        let dl = DeadLetter {
            source_topic: "usage".into(),
            source_partition: 1,
            source_offset: 42,
            reason: "undecodable".into(),
            detail: "truncated".into(),
            tenant: None,
            event_id: Some("e".into()),
            payload: vec![0, 1, 2, 255],
        };
        assert_eq!(DeadLetter::from_avro(&dl.to_avro().unwrap()).unwrap(), dl);
    }

    #[test]
    fn lengths_beyond_the_input_are_rejected_before_allocating() {
        // Found by fuzzing: a charge whose dimensions map claims ~2^30 entries made apache-avro
        // reserve ~21 GB (an abort), from a 66-byte message.
        let crash: [u8; 56] = [
            0x1c, 0x1c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c,
            0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x00, 0x31, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x8f, 0xf3, 0xf3, 0x71, 0x65, 0x67, 0x69, 0x6f, 0x04, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c, 0x0c,
            0x0c, 0x0c,
        ];
        let mut framed = vec![0xC3, 0x01];
        framed.extend_from_slice(&Charge::known().fingerprint.to_le_bytes());
        framed.extend_from_slice(&crash);
        assert!(Charge::from_avro(&framed).is_err());
        // A string claiming 500 MB in a 20-byte message.
        let mut big = vec![0xC3, 0x01];
        big.extend_from_slice(&WalletAdjustment::known().fingerprint.to_le_bytes());
        crate::codec::write_long(&mut big, 500 << 20);
        big.extend_from_slice(b"pay_1");
        assert_eq!(WalletAdjustment::from_avro(&big), Err(Error::Truncated("string")));
        // Valid records still read.
        let w = WalletAdjustment {
            idempotency_key: "k".into(),
            tenant: "t".into(),
            currency: "USD".into(),
            amount: d("1"),
            kind: "top_up".into(),
            reason: "r".into(),
            created_at: 1,
            expires_at: None,
            priority: 0,
        };
        assert_eq!(WalletAdjustment::from_avro(&w.to_avro().unwrap()).unwrap(), w);
    }

    #[test]
    fn charge_and_wallet_round_trip() {
        let c = Charge {
            charge_id: "c1".into(),
            kind: "usage".into(),
            tenant: "t".into(),
            plan: "pro".into(),
            currency: "USD".into(),
            meter: "m".into(),
            dimensions: BTreeMap::new(),
            period_start: 0,
            window_start: 0,
            window_end: 60_000,
            revision: 0,
            quantity: d("10"),
            amount: d("0.000000015"),
            provider_cost: d("0.00000001"),
            margin: d("0.000000005"),
            seq: 1,
        };
        assert_eq!(Charge::from_avro(&c.to_avro().unwrap()).unwrap(), c);
        let w = WalletAdjustment {
            idempotency_key: "pay_1".into(),
            tenant: "t".into(),
            currency: "USD".into(),
            amount: d("-5.5"),
            kind: "adjustment".into(),
            reason: "goodwill".into(),
            created_at: 5,
            expires_at: Some(1_800_000_000_000),
            priority: -3,
        };
        assert_eq!(WalletAdjustment::from_avro(&w.to_avro().unwrap()).unwrap(), w);
    }

    /// A v1 record (written by apache-avro's own writer with the v1 schema, framed with the
    /// v1 fingerprint) still reads, with v2's defaults for the new fields.
    #[test]
    fn wallet_adjustment_v1_reads_with_defaults() {
        use apache_avro::types::Record;
        let v1 = schema::wallet_adjustment_v1();
        let mut r = Record::new(&v1.schema).unwrap();
        r.put("idempotency_key", "pay_9");
        r.put("tenant", "acme");
        r.put("currency", "USD");
        r.put("amount", "25.5");
        r.put("kind", "top_up");
        r.put("reason", "card");
        r.put("created_at", Value::TimestampMillis(1_700_000_000_000));
        let datum = apache_avro::to_avro_datum(&v1.schema, r).unwrap();
        let mut framed = vec![0xC3, 0x01];
        framed.extend_from_slice(&v1.fingerprint.to_le_bytes());
        framed.extend_from_slice(&datum);
        let w = WalletAdjustment::from_avro(&framed).unwrap();
        assert_eq!(w.amount, d("25.5"));
        assert_eq!((w.kind.as_str(), w.created_at, w.expires_at, w.priority), ("top_up", 1_700_000_000_000, None, 0));
        assert_ne!(v1.fingerprint, WalletAdjustment::known().fingerprint);
        // New records are written with v2's fingerprint.
        let again = w.to_avro().unwrap();
        assert_eq!(&again[2..10], &WalletAdjustment::known().fingerprint.to_le_bytes());
        // A truncated v1 body is an error, not a panic.
        assert!(WalletAdjustment::from_avro(&framed[..framed.len() - 3]).is_err());
    }
}
