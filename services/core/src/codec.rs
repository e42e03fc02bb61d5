//! Wire format of usage events: Avro binary, framed as Avro single-object encoding
//! (`C3 01` + 8-byte little-endian CRC-64-AVRO fingerprint of the schema's Parsing Canonical
//! Form) by default, or Confluent framing (`00` + 4-byte big-endian schema id) for a
//! schema-registry world. The decoder also accepts the fingerprints apache-avro computed (and
//! meterflow wrote) before the spec's was used; see [`crate::schema`].
//!
//! The decoder is specialised to the known writer schemas (v1, v2) and resolved once: the
//! generic apache-avro path costs ~400 ns per record and re-resolves the schema every call,
//! which alone would use up the per-event budget. Tests check it against apache-avro.

use crate::avro_wire::{write_long, write_str, Header, Reader};
use crate::event::{UsageEvent, UsageEventRef};
use crate::{schema, Error};

/// How a payload is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    SingleObject,
    Confluent { schema_id: u32 },
}

/// A writer schema the decoder understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriterVersion {
    V1,
    V2,
}

/// Encoder and decoder of usage events for every known writer schema.
#[derive(Debug, Clone)]
pub struct UsageEventCodec {
    v1_fingerprint: u64,
    v2_fingerprint: u64,
    v1_legacy_fingerprint: u64,
    v2_legacy_fingerprint: u64,
    confluent_ids: Vec<(u32, WriterVersion)>,
}

impl Default for UsageEventCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl UsageEventCodec {
    /// Confluent ids default to 1 (v1) and 2 (v2); a registry assigns its own, see
    /// [`UsageEventCodec::with_confluent_ids`].
    pub fn new() -> Self {
        Self {
            v1_fingerprint: schema::usage_event_v1().fingerprint,
            v2_fingerprint: schema::usage_event_v2().fingerprint,
            v1_legacy_fingerprint: schema::usage_event_v1().legacy_fingerprint,
            v2_legacy_fingerprint: schema::usage_event_v2().legacy_fingerprint,
            confluent_ids: vec![(1, WriterVersion::V1), (2, WriterVersion::V2)],
        }
    }

    pub fn with_confluent_ids(mut self, v1: u32, v2: u32) -> Self {
        self.confluent_ids = vec![(v1, WriterVersion::V1), (v2, WriterVersion::V2)];
        self
    }

    /// The fingerprint written in single-object headers (the Avro specification's).
    pub fn fingerprint(&self, version: WriterVersion) -> u64 {
        match version {
            WriterVersion::V1 => self.v1_fingerprint,
            WriterVersion::V2 => self.v2_fingerprint,
        }
    }

    /// The fingerprint apache-avro computes, which meterflow wrote before; still accepted.
    pub fn legacy_fingerprint(&self, version: WriterVersion) -> u64 {
        match version {
            WriterVersion::V1 => self.v1_legacy_fingerprint,
            WriterVersion::V2 => self.v2_legacy_fingerprint,
        }
    }

    /// Encodes with the current (v2) schema.
    pub fn encode(&self, ev: &UsageEvent, framing: Framing, out: &mut Vec<u8>) {
        let quantity = ev.quantity.to_string();
        let cost = ev.provider_cost.map(|c| c.to_string());
        let dims: Vec<(&str, &str)> = ev
            .dimensions
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let r = UsageEventRef {
            event_id: &ev.event_id,
            tenant: &ev.tenant,
            meter: &ev.meter,
            quantity: &quantity,
            event_time_ms: ev.event_time_ms,
            dimensions: dims,
            provider_cost: cost.as_deref(),
            source: &ev.source,
        };
        self.encode_ref(&r, WriterVersion::V2, framing, out);
    }

    /// Encodes fields as given, without validation: load generators use it to produce
    /// malformed events on purpose, tests to write old schema versions.
    pub fn encode_ref(
        &self,
        ev: &UsageEventRef<'_>,
        version: WriterVersion,
        framing: Framing,
        out: &mut Vec<u8>,
    ) {
        let header = match framing {
            Framing::SingleObject => Header::SingleObject { fingerprint: self.fingerprint(version) },
            Framing::Confluent { schema_id } => Header::Confluent { schema_id },
        };
        header.write(out);
        write_str(out, ev.event_id);
        write_str(out, ev.tenant);
        write_str(out, ev.meter);
        write_str(out, ev.quantity);
        write_long(out, ev.event_time_ms);
        if !ev.dimensions.is_empty() {
            write_long(out, ev.dimensions.len() as i64);
            for (k, v) in &ev.dimensions {
                write_str(out, k);
                write_str(out, v);
            }
        }
        write_long(out, 0);
        if version == WriterVersion::V2 {
            match ev.provider_cost {
                None => write_long(out, 0),
                Some(c) => {
                    write_long(out, 1);
                    write_str(out, c);
                }
            }
            write_str(out, ev.source);
        }
    }

    /// Decodes a framed payload written with any known schema, as the current schema
    /// (fields a v1 writer lacks take their defaults).
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Result<UsageEventRef<'a>, Error> {
        let (version, body) = self.unframe(bytes)?;
        decode_body(version, body)
    }

    /// Splits the framing off and identifies the writer schema.
    pub fn unframe<'a>(&self, bytes: &'a [u8]) -> Result<(WriterVersion, &'a [u8]), Error> {
        let (version, body) = match Header::split(bytes)? {
            (Header::SingleObject { fingerprint: fp }, body) => {
                let version = if fp == self.v2_fingerprint || fp == self.v2_legacy_fingerprint {
                    WriterVersion::V2
                } else if fp == self.v1_fingerprint || fp == self.v1_legacy_fingerprint {
                    WriterVersion::V1
                } else {
                    return Err(Error::UnknownFingerprint(fp));
                };
                (version, body)
            }
            (Header::Confluent { schema_id }, body) => {
                let version = self
                    .confluent_ids
                    .iter()
                    .find(|(i, _)| *i == schema_id)
                    .map(|(_, v)| *v)
                    .ok_or(Error::UnknownSchemaId(schema_id))?;
                (version, body)
            }
        };
        Ok((version, body))
    }
}

/// Strings of a body checked as UTF-8 in one call over a span of it instead of one call per
/// field. Why: fields are a few bytes each, and `from_utf8`'s word-at-a-time ASCII path only
/// starts at an aligned address, so per field it ran byte by byte (~1,400 instructions per
/// event, the largest single cost of the hot path when measured). A field inside the span is a
/// slice of the checked text (`str::get` checks that it starts and ends on character
/// boundaries, and such a slice of valid UTF-8 is valid); any other field, e.g. when the span
/// is not UTF-8 (a length of 64 or more is a varint byte >= 0x80), is checked on its own. So
/// every field and every error is exactly what one check per field gives.
struct Text<'a> {
    span: &'a str,
    start: usize,
}

impl<'a> Text<'a> {
    /// The span `body[start..end]` ("" and unused if it is not UTF-8).
    #[inline]
    fn new(body: &'a [u8], start: usize, end: usize) -> Self {
        let span = body.get(start..end).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or("");
        Self { span, start }
    }

    /// The field `bytes`, which the reader has just read up to position `end`, as `&str`.
    #[inline(always)]
    fn field(&self, bytes: &'a [u8], end: usize, what: &'static str) -> Result<&'a str, Error> {
        let from = end.checked_sub(bytes.len() + self.start);
        match from.and_then(|from| self.span.get(from..end - self.start)) {
            Some(s) => Ok(s),
            None => check_alone(bytes, what),
        }
    }

    /// The next Avro `string` of `r`, like [`Reader::string`].
    #[inline(always)]
    fn string(&self, r: &mut Reader<'a>, what: &'static str) -> Result<&'a str, Error> {
        let bytes = r.bytes(what)?;
        self.field(bytes, r.position(), what)
    }
}

/// A field outside the checked span (out of line: the span covers most fields).
#[inline(never)]
fn check_alone<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a str, Error> {
    std::str::from_utf8(bytes).map_err(|_| Error::BadUtf8(what))
}

const HEAD: [&str; 4] = ["event_id", "tenant", "meter", "quantity"];

/// The four leading strings, with the first error in field order (a bad string comes before
/// a later field's truncation, as with one check per field).
#[inline]
fn read_head<'a>(body: &'a [u8], r: &mut Reader<'a>) -> Result<[&'a str; 4], Error> {
    let mut raw: [(&[u8], usize); 4] = [(&[], 0); 4];
    let mut read = 0;
    let mut failed = None;
    for (what, slot) in HEAD.iter().zip(raw.iter_mut()) {
        match r.bytes(what) {
            Ok(b) => *slot = (b, r.position()),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
        read += 1;
    }
    let text = Text::new(body, 0, r.position());
    let mut out = [""; 4];
    for ((what, &(bytes, end)), s) in HEAD.iter().zip(&raw).zip(out.iter_mut()).take(read) {
        *s = text.field(bytes, end, what)?;
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn decode_body(version: WriterVersion, body: &[u8]) -> Result<UsageEventRef<'_>, Error> {
    let mut r = Reader::new(body);
    let [event_id, tenant, meter, quantity] = read_head(body, &mut r)?;
    let event_time_ms = r.long("event_time")?;
    // The rest is strings and small varints: one span to the end.
    let text = Text::new(body, r.position(), body.len());
    let mut dimensions = Vec::new();
    loop {
        let count = r.block("dimensions")?;
        if count == 0 {
            break;
        }
        // Each entry takes at least two bytes: a claim of more entries than bytes is a lie.
        if count > r.remaining() / 2 {
            return Err(Error::Truncated("dimensions"));
        }
        dimensions.reserve(count);
        for _ in 0..count {
            let k = text.string(&mut r, "dimensions key")?;
            let v = text.string(&mut r, "dimensions value")?;
            dimensions.push((k, v));
        }
    }
    let (provider_cost, source) = match version {
        WriterVersion::V1 => (None, ""),
        WriterVersion::V2 => {
            let cost = match r.long("provider_cost")? {
                0 => None,
                1 => Some(text.string(&mut r, "provider_cost")?),
                index => {
                    return Err(Error::BadUnion {
                        field: "provider_cost",
                        index,
                    })
                }
            };
            (cost, text.string(&mut r, "source")?)
        }
    };
    if r.remaining() != 0 {
        return Err(Error::TrailingBytes(r.remaining()));
    }
    Ok(UsageEventRef {
        event_id,
        tenant,
        meter,
        quantity,
        event_time_ms,
        dimensions,
        provider_cost,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value;
    use rust_decimal::Decimal;
    use std::str::FromStr;

    fn sample() -> UsageEvent {
        UsageEvent::new("ev-1", "acme", "input_tokens", Decimal::from_str("1234.5").unwrap(), 1_700_000_000_123)
            .with_dimension("model", "gpt-x")
            .with_dimension("region", "eu")
            .with_provider_cost(Decimal::from_str("0.000123").unwrap())
            .with_source("gateway-1")
    }

    #[test]
    fn round_trip_both_framings() {
        let codec = UsageEventCodec::new();
        for framing in [Framing::SingleObject, Framing::Confluent { schema_id: 2 }] {
            let mut buf = Vec::new();
            codec.encode(&sample(), framing, &mut buf);
            let back = codec.decode(&buf).unwrap().to_owned_event().unwrap();
            assert_eq!(back, sample());
        }
    }

    #[test]
    fn matches_apache_avro_single_object_writer() {
        // apache-avro's own single-object encoding of the same record must be byte-identical.
        let known = schema::usage_event_v2();
        let ev = sample();
        let value = Value::Record(vec![
            ("event_id".into(), Value::String(ev.event_id.clone())),
            ("tenant".into(), Value::String(ev.tenant.clone())),
            ("meter".into(), Value::String(ev.meter.clone())),
            ("quantity".into(), Value::String(ev.quantity.to_string())),
            ("event_time".into(), Value::TimestampMillis(ev.event_time_ms)),
            (
                "dimensions".into(),
                Value::Map(ev.dimensions.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect()),
            ),
            ("provider_cost".into(), Value::Union(1, Box::new(Value::String("0.000123".into())))),
            ("source".into(), Value::String(ev.source.clone())),
        ]);
        let datum = apache_avro::to_avro_datum(&known.schema, value.clone()).unwrap();
        let mut ours = Vec::new();
        UsageEventCodec::new().encode(&ev, Framing::SingleObject, &mut ours);
        // HashMap order may differ for maps; compare decoded values instead of bytes there.
        let mut reader = &ours[10..];
        let decoded = apache_avro::from_avro_datum(&known.schema, &mut reader, None).unwrap();
        assert_eq!(decoded, apache_avro::from_avro_datum(&known.schema, &mut &datum[..], None).unwrap());
        // Header: we write the spec's fingerprint; apache-avro writes its own (legacy) one,
        // which we still read.
        let mut writer = apache_avro::GenericSingleObjectWriter::new_with_capacity(&known.schema, 64).unwrap();
        let mut theirs = Vec::new();
        writer.write_value(value, &mut theirs).unwrap();
        assert_eq!(&theirs[..2], &ours[..2]);
        assert_eq!(&ours[2..10], &known.fingerprint.to_le_bytes());
        assert_eq!(&theirs[2..10], &known.legacy_fingerprint.to_le_bytes());
        assert_ne!(known.fingerprint, known.legacy_fingerprint);
        let codec = UsageEventCodec::new();
        assert_eq!(codec.decode(&theirs).unwrap().to_owned_event().unwrap(), ev);
        assert_eq!(codec.legacy_fingerprint(WriterVersion::V2), known.legacy_fingerprint);
    }

    #[test]
    fn both_fingerprints_of_both_versions_are_accepted() {
        let codec = UsageEventCodec::new();
        let mut body = Vec::new();
        codec.encode(&sample(), Framing::SingleObject, &mut body);
        let body = body.split_off(10);
        for (version, fps) in [
            (WriterVersion::V2, [schema::usage_event_v2().fingerprint, schema::usage_event_v2().legacy_fingerprint]),
            (WriterVersion::V1, [schema::usage_event_v1().fingerprint, schema::usage_event_v1().legacy_fingerprint]),
        ] {
            for fp in fps {
                let mut framed = vec![0xC3, 0x01];
                framed.extend_from_slice(&fp.to_le_bytes());
                framed.extend_from_slice(&body);
                assert_eq!(codec.unframe(&framed).unwrap().0, version);
            }
        }
    }

    #[test]
    fn v1_data_reads_with_v2_defaults() {
        // Schema evolution: a v1 writer (no provider_cost, no source), read as v2.
        let v1 = schema::usage_event_v1();
        let v2 = schema::usage_event_v2();
        let value = Value::Record(vec![
            ("event_id".into(), Value::String("old-1".into())),
            ("tenant".into(), Value::String("t".into())),
            ("meter".into(), Value::String("requests".into())),
            ("quantity".into(), Value::String("1".into())),
            ("event_time".into(), Value::TimestampMillis(42)),
            ("dimensions".into(), Value::Map(Default::default())),
        ]);
        let datum = apache_avro::to_avro_datum(&v1.schema, value).unwrap();
        let mut framed = vec![0xC3, 0x01];
        framed.extend_from_slice(&v1.fingerprint.to_le_bytes());
        framed.extend_from_slice(&datum);
        let ours = UsageEventCodec::new().decode(&framed).unwrap();
        assert_eq!(ours.event_id, "old-1");
        assert_eq!(ours.provider_cost, None);
        assert_eq!(ours.source, "");
        // apache-avro's resolution of the same bytes agrees.
        let resolved = apache_avro::from_avro_datum(&v1.schema, &mut &datum[..], Some(&v2.schema)).unwrap();
        let Value::Record(fields) = resolved else { panic!("record expected") };
        assert_eq!(fields[6].1, Value::Union(0, Box::new(Value::Null)));
        assert_eq!(fields[7].1, Value::String(String::new()));
    }

    #[test]
    fn typed_errors() {
        let codec = UsageEventCodec::new();
        let mut good = Vec::new();
        codec.encode(&sample(), Framing::SingleObject, &mut good);
        assert_eq!(codec.decode(&[]), Err(Error::Empty));
        assert_eq!(codec.decode(b"{\"json\":1}"), Err(Error::UnknownFraming(b'{')));
        assert!(matches!(codec.decode(&good[..5]), Err(Error::Truncated("fingerprint"))));
        let mut bad_fp = good.clone();
        bad_fp[2] ^= 0xFF;
        assert!(matches!(codec.decode(&bad_fp), Err(Error::UnknownFingerprint(_))));
        for cut in 10..good.len() {
            assert!(codec.decode(&good[..cut]).is_err(), "prefix of {cut} bytes must not decode");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(codec.decode(&trailing), Err(Error::TrailingBytes(1)));
        assert!(matches!(codec.decode(&[0, 0, 0, 0, 9, 1]), Err(Error::UnknownSchemaId(9))));
    }

    /// One `from_utf8` per field, as the decoder did before checking spans: the reference.
    fn decode_per_field(version: WriterVersion, body: &[u8]) -> Result<UsageEventRef<'_>, Error> {
        let mut r = Reader::new(body);
        let event_id = r.string("event_id")?;
        let tenant = r.string("tenant")?;
        let meter = r.string("meter")?;
        let quantity = r.string("quantity")?;
        let event_time_ms = r.long("event_time")?;
        let mut dimensions = Vec::new();
        loop {
            let count = r.block("dimensions")?;
            if count == 0 {
                break;
            }
            if count > r.remaining() / 2 {
                return Err(Error::Truncated("dimensions"));
            }
            for _ in 0..count {
                let k = r.string("dimensions key")?;
                let v = r.string("dimensions value")?;
                dimensions.push((k, v));
            }
        }
        let (provider_cost, source) = match version {
            WriterVersion::V1 => (None, ""),
            WriterVersion::V2 => {
                let cost = match r.long("provider_cost")? {
                    0 => None,
                    1 => Some(r.string("provider_cost")?),
                    index => return Err(Error::BadUnion { field: "provider_cost", index }),
                };
                (cost, r.string("source")?)
            }
        };
        if r.remaining() != 0 {
            return Err(Error::TrailingBytes(r.remaining()));
        }
        Ok(UsageEventRef { event_id, tenant, meter, quantity, event_time_ms, dimensions, provider_cost, source })
    }

    #[test]
    fn span_checked_strings_decode_exactly_as_per_field_checks() {
        let long = "x".repeat(70);
        let longer = "é".repeat(90);
        let events = [
            sample(),
            UsageEvent::new("ünïcödé-1", "tenant-ß", "input_tokens", Decimal::ONE, 1_767_225_600_000)
                .with_dimension("model", "ñ")
                .with_source("g€"),
            UsageEvent::new(long.as_str(), "t", "m", Decimal::ONE, -5)
                .with_dimension(longer.as_str(), "v")
                .with_provider_cost(Decimal::new(12, 3))
                .with_source(long.as_str()),
            UsageEvent::new("", "", "", Decimal::ZERO, 0),
        ];
        let codec = UsageEventCodec::new();
        for ev in &events {
            let mut good = Vec::new();
            codec.encode(ev, Framing::SingleObject, &mut good);
            let body = &good[10..];
            for version in [WriterVersion::V1, WriterVersion::V2] {
                assert_eq!(decode_body(version, body), decode_per_field(version, body));
            }
            assert_eq!(decode_body(WriterVersion::V2, body).unwrap().to_owned_event().unwrap(), *ev);
            // Every byte replaced by values that break UTF-8 or lengths, and every prefix.
            for at in 0..body.len() {
                for b in [0x00, 0x01, 0x02, 0x41, 0x7F, 0x80, 0xBF, 0xC3, 0xE2, 0xF0, 0xFF] {
                    let mut bad = body.to_vec();
                    bad[at] = b;
                    for version in [WriterVersion::V1, WriterVersion::V2] {
                        assert_eq!(decode_body(version, &bad), decode_per_field(version, &bad), "byte {at} = {b:#x}");
                    }
                }
                let cut = &body[..at];
                assert_eq!(decode_body(WriterVersion::V2, cut), decode_per_field(WriterVersion::V2, cut));
            }
        }
    }
}
