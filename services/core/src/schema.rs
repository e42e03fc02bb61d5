//! The Avro schemas of `schemas/avro/`, embedded at build time so the binary and the files
//! can never disagree, and their single-object fingerprints.
//!
//! # Fingerprints
//!
//! Avro single-object encoding puts the CRC-64-AVRO (Rabin) fingerprint of the writer
//! schema's *Parsing Canonical Form* (PCF) in the header. Java's `BinaryMessageEncoder`,
//! fastavro and every other spec-following library compute it from the PCF, in which
//! `{"type":"long","logicalType":"timestamp-millis"}` is just `"long"`. apache-avro 0.21 keeps
//! `{"type":"long"}` in its canonical form, so the fingerprint it computes for any schema with
//! a logical type differs from everybody else's, and those producers were dead-lettered as
//! `unknown schema fingerprint`. So the PCF is implemented here, from the spec, over the JSON
//! text of the schema: [`Known::fingerprint`] is the spec's and is what meterflow writes;
//! [`Known::legacy_fingerprint`] (apache-avro's) is still accepted, because every record
//! written before this fix carries it.

use std::sync::OnceLock;

use apache_avro::rabin::Rabin;
use apache_avro::Schema;
use serde_json::{Map, Value};

use crate::Error;

pub const USAGE_EVENT_V1: &str = include_str!("../../../schemas/avro/usage_event.v1.avsc");
pub const USAGE_EVENT_V2: &str = include_str!("../../../schemas/avro/usage_event.v2.avsc");
pub const METER_AGGREGATE_V1: &str = include_str!("../../../schemas/avro/meter_aggregate.v1.avsc");
pub const METER_AGGREGATE_V2: &str = include_str!("../../../schemas/avro/meter_aggregate.v2.avsc");
pub const CHARGE_V1: &str = include_str!("../../../schemas/avro/charge.v1.avsc");
pub const DEAD_LETTER_V1: &str = include_str!("../../../schemas/avro/dead_letter.v1.avsc");
pub const WALLET_ADJUSTMENT_V1: &str =
    include_str!("../../../schemas/avro/wallet_adjustment.v1.avsc");
pub const WALLET_ADJUSTMENT_V2: &str =
    include_str!("../../../schemas/avro/wallet_adjustment.v2.avsc");
pub const PROVISIONAL_TOTAL_V1: &str =
    include_str!("../../../schemas/avro/provisional_total.v1.avsc");
pub const ALERT_V1: &str = include_str!("../../../schemas/avro/alert.v1.avsc");

/// A parsed schema with its single-object fingerprints.
#[derive(Debug)]
pub struct Known {
    pub schema: Schema,
    /// CRC-64-AVRO of the Parsing Canonical Form, as the Avro specification defines it: what
    /// meterflow writes, and what other languages' libraries write.
    pub fingerprint: u64,
    /// The fingerprint apache-avro 0.21 computes (its canonical form keeps `{"type":"long"}`
    /// for logical types). Written by meterflow before the spec one was; accepted on input.
    /// Equal to `fingerprint` for schemas without logical types.
    pub legacy_fingerprint: u64,
}

impl Known {
    /// Whether a single-object header's fingerprint names this schema.
    #[inline]
    pub fn matches(&self, fp: u64) -> bool {
        fp == self.fingerprint || fp == self.legacy_fingerprint
    }
}

#[allow(clippy::expect_used, reason = "the schemas are compiled in and parsed by tests: a failure is a build defect")]
fn load(text: &str) -> Known {
    // The texts are compiled in and covered by tests: failing here is a build defect.
    let schema = Schema::parse_str(text).expect("embedded Avro schema parses");
    let legacy = schema.fingerprint::<Rabin>();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&legacy.bytes[..8]);
    let pcf = parsing_canonical_form(text).expect("embedded Avro schema has a canonical form");
    Known {
        schema,
        fingerprint: crc64_avro(pcf.as_bytes()),
        legacy_fingerprint: u64::from_le_bytes(bytes),
    }
}

macro_rules! known {
    ($fn_name:ident, $text:expr) => {
        pub fn $fn_name() -> &'static Known {
            static CELL: OnceLock<Known> = OnceLock::new();
            CELL.get_or_init(|| load($text))
        }
    };
}

known!(usage_event_v1, USAGE_EVENT_V1);
known!(usage_event_v2, USAGE_EVENT_V2);
known!(meter_aggregate_v1, METER_AGGREGATE_V1);
known!(meter_aggregate_v2, METER_AGGREGATE_V2);
known!(charge_v1, CHARGE_V1);
known!(dead_letter_v1, DEAD_LETTER_V1);
known!(wallet_adjustment_v1, WALLET_ADJUSTMENT_V1);
known!(wallet_adjustment_v2, WALLET_ADJUSTMENT_V2);
known!(provisional_total_v1, PROVISIONAL_TOTAL_V1);
known!(alert_v1, ALERT_V1);

/// CRC-64-AVRO, the Rabin fingerprint of the Avro specification ("Schema Fingerprints").
pub fn crc64_avro(bytes: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    static TABLE: OnceLock<[u64; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u64; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut fp = i as u64;
            for _ in 0..8 {
                fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
            }
            *slot = fp;
        }
        t
    });
    bytes
        .iter()
        .fold(EMPTY, |fp, &b| (fp >> 8) ^ table[((fp ^ u64::from(b)) & 0xff) as usize])
}

/// The CRC-64-AVRO fingerprint of a schema's Parsing Canonical Form.
pub fn spec_fingerprint(schema_json: &str) -> Result<u64, Error> {
    Ok(crc64_avro(parsing_canonical_form(schema_json)?.as_bytes()))
}

const PRIMITIVES: [&str; 8] = ["null", "boolean", "int", "long", "float", "double", "bytes", "string"];

/// The Parsing Canonical Form of a schema given as JSON text, per the Avro specification:
/// primitives in simple form (logical types dropped), full names, only the attributes `name`,
/// `type`, `fields`, `symbols`, `items`, `values`, `size` in that order, a named type written
/// out at its first occurrence and referenced by full name afterwards, no whitespace.
pub fn parsing_canonical_form(schema_json: &str) -> Result<String, Error> {
    let v: Value = serde_json::from_str(schema_json).map_err(|e| Error::Schema(format!("schema JSON: {e}")))?;
    let mut out = String::new();
    let mut seen = std::collections::HashSet::new();
    pcf(&v, "", &mut seen, &mut out)?;
    Ok(out)
}

fn schema_err(what: impl Into<String>) -> Error {
    Error::Schema(what.into())
}

/// The full name of a named type: a dotted name is already full; otherwise the explicit
/// namespace, else the enclosing one.
fn full_name(obj: &Map<String, Value>, enclosing: &str) -> Result<String, Error> {
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| schema_err("named type without a string name"))?;
    if name.contains('.') {
        return Ok(name.to_owned());
    }
    let ns = match obj.get("namespace") {
        Some(Value::String(ns)) => ns.as_str(),
        Some(Value::Null) | None => enclosing,
        Some(_) => return Err(schema_err("namespace is not a string")),
    };
    Ok(if ns.is_empty() { name.to_owned() } else { format!("{ns}.{name}") })
}

fn namespace_of(full: &str) -> &str {
    full.rfind('.').map_or("", |i| &full[..i])
}

fn push_json_str(out: &mut String, s: &str) {
    // serde_json escapes only `"`, `\` and control characters and writes everything else as
    // UTF-8: the spec's [STRINGS] rule.
    out.push_str(&Value::String(s.to_owned()).to_string());
}

fn pcf(v: &Value, ns: &str, seen: &mut std::collections::HashSet<String>, out: &mut String) -> Result<(), Error> {
    match v {
        Value::String(s) => {
            if PRIMITIVES.contains(&s.as_str()) {
                push_json_str(out, s);
            } else {
                // A reference to a named type defined earlier.
                let full = if s.contains('.') || ns.is_empty() { s.clone() } else { format!("{ns}.{s}") };
                push_json_str(out, &full);
            }
            Ok(())
        }
        Value::Array(branches) => {
            out.push('[');
            for (i, b) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                pcf(b, ns, seen, out)?;
            }
            out.push(']');
            Ok(())
        }
        Value::Object(obj) => {
            let ty = obj.get("type").ok_or_else(|| schema_err("schema object without type"))?;
            let ty_str = match ty {
                Value::String(s) => s.as_str(),
                // {"type": {...}} or {"type": [...]}: the attribute is the schema itself.
                other => return pcf(other, ns, seen, out),
            };
            match ty_str {
                // [PRIMITIVES] + [STRIP]: logicalType and every other attribute go away.
                t if PRIMITIVES.contains(&t) => {
                    push_json_str(out, t);
                    Ok(())
                }
                "record" | "error" | "enum" | "fixed" => pcf_named(obj, ty_str, ns, seen, out),
                "array" | "map" => {
                    let attr = if ty_str == "array" { "items" } else { "values" };
                    let inner = obj.get(attr).ok_or_else(|| schema_err(format!("{ty_str} without {attr}")))?;
                    out.push_str(&format!("{{\"type\":\"{ty_str}\",\"{attr}\":"));
                    pcf(inner, ns, seen, out)?;
                    out.push('}');
                    Ok(())
                }
                // {"type": "SomeNamedType"}: a reference written as an object.
                other => pcf(&Value::String(other.to_owned()), ns, seen, out),
            }
        }
        _ => Err(schema_err(format!("not a schema: {v}"))),
    }
}

/// The canonical form of a named type (record, error, enum, fixed); a name seen before is
/// written as a reference ([FULLNAMES], [STRIP]).
fn pcf_named(
    obj: &Map<String, Value>,
    ty: &str,
    ns: &str,
    seen: &mut std::collections::HashSet<String>,
    out: &mut String,
) -> Result<(), Error> {
    let full = full_name(obj, ns)?;
    if !seen.insert(full.clone()) {
        push_json_str(out, &full);
        return Ok(());
    }
    out.push_str("{\"name\":");
    push_json_str(out, &full);
    out.push_str(",\"type\":");
    push_json_str(out, ty);
    match ty {
        "enum" => {
            let symbols = obj
                .get("symbols")
                .and_then(Value::as_array)
                .ok_or_else(|| schema_err(format!("enum {full} without symbols")))?;
            out.push_str(",\"symbols\":[");
            for (i, s) in symbols.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let s = s.as_str().ok_or_else(|| schema_err("enum symbol is not a string"))?;
                push_json_str(out, s);
            }
            out.push(']');
        }
        "fixed" => {
            let size = match obj.get("size") {
                Some(Value::Number(n)) => n.as_u64(),
                // [INTEGERS]: quotes and leading zeros go.
                Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
                _ => None,
            }
            .ok_or_else(|| schema_err(format!("fixed {full} without a valid size")))?;
            out.push_str(",\"size\":");
            out.push_str(&size.to_string());
        }
        _ => pcf_fields(obj, &full, seen, out)?,
    }
    out.push('}');
    Ok(())
}

/// The `fields` of record `full`, each with its name and type only, in order.
fn pcf_fields(
    obj: &Map<String, Value>,
    full: &str,
    seen: &mut std::collections::HashSet<String>,
    out: &mut String,
) -> Result<(), Error> {
    let fields = obj
        .get("fields")
        .and_then(Value::as_array)
        .ok_or_else(|| schema_err(format!("record {full} without fields")))?;
    let inner_ns = namespace_of(full).to_owned();
    out.push_str(",\"fields\":[");
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let f = f.as_object().ok_or_else(|| schema_err("field is not an object"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| schema_err(format!("field of {full} without a name")))?;
        let fty = f.get("type").ok_or_else(|| schema_err(format!("field {name} of {full} without a type")))?;
        out.push_str("{\"name\":");
        push_json_str(out, name);
        out.push_str(",\"type\":");
        pcf(fty, &inner_ns, seen, out)?;
        out.push('}');
    }
    out.push(']');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Apache Avro's `share/test/data/schema-tests.txt` (the cross-language
    /// suite; its fingerprints are checked there against Java's reference implementation),
    /// fingerprints as the signed 64-bit integers Java prints.
    const AVRO_SUITE: &[(&str, &str, Option<i64>)] = &[
        (r#""null""#, r#""null""#, Some(7195948357588979594)),
        (r#"{"type":"null"}"#, r#""null""#, None),
        (r#""boolean""#, r#""boolean""#, Some(-6970731678124411036)),
        (r#""int""#, r#""int""#, Some(8247732601305521295)),
        (r#"{"type":"int"}"#, r#""int""#, None),
        (r#""long""#, r#""long""#, Some(-3434872931120570953)),
        (r#""float""#, r#""float""#, Some(5583340709985441680)),
        (r#""double""#, r#""double""#, Some(-8181574048448539266)),
        (r#""bytes""#, r#""bytes""#, Some(5746618253357095269)),
        (r#""string""#, r#""string""#, Some(-8142146995180207161)),
        ("[  ]", "[]", Some(-1241056759729112623)),
        (r#"[ "int"  ]"#, r#"["int"]"#, Some(-5232228896498058493)),
        (r#"[ "int" , {"type":"boolean"} ]"#, r#"["int","boolean"]"#, Some(5392556393470105090)),
        (
            r#"{"fields":[], "type":"record", "name":"foo"}"#,
            r#"{"name":"foo","type":"record","fields":[]}"#,
            Some(-4824392279771201922),
        ),
        (
            r#"{"fields":[], "type":"record", "name":"foo", "namespace":"x.y"}"#,
            r#"{"name":"x.y.foo","type":"record","fields":[]}"#,
            Some(5916914534497305771),
        ),
        (
            r#"{"fields":[], "type":"record", "name":"a.b.foo", "namespace":"x.y"}"#,
            r#"{"name":"a.b.foo","type":"record","fields":[]}"#,
            Some(-4616218487480524110),
        ),
        (
            r#"{"fields":[], "type":"record", "name":"foo", "doc":"foo", "aliases":["foo","bar"]}"#,
            r#"{"name":"foo","type":"record","fields":[]}"#,
            Some(-4824392279771201922),
        ),
        (
            r#"{"fields":[{"type":{"type":"boolean"}, "name":"f1"}], "type":"record", "name":"foo"}"#,
            r#"{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}"#,
            Some(7843277075252814651),
        ),
        (
            r#"{ "fields":[{"type":"boolean", "aliases":[], "name":"f1", "default":"true"},
                {"order":"descending","name":"f2","doc":"Hello","type":"int"}],
                "type":"record", "name":"foo" }"#,
            r#"{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"},{"name":"f2","type":"int"}]}"#,
            Some(-4860222112080293046),
        ),
        (
            r#"{"type":"enum", "name":"foo", "symbols":["A1"]}"#,
            r#"{"name":"foo","type":"enum","symbols":["A1"]}"#,
            Some(-6342190197741309591),
        ),
        (
            r#"{"namespace":"x.y.z", "type":"enum", "name":"foo", "doc":"foo bar", "symbols":["A1", "A2"]}"#,
            r#"{"name":"x.y.z.foo","type":"enum","symbols":["A1","A2"]}"#,
            Some(-4448647247586288245),
        ),
        (
            r#"{"name":"foo","type":"fixed","size":15}"#,
            r#"{"name":"foo","type":"fixed","size":15}"#,
            Some(1756455273707447556),
        ),
        (
            r#"{"namespace":"x.y.z", "type":"fixed", "name":"foo", "doc":"foo bar", "size":32}"#,
            r#"{"name":"x.y.z.foo","type":"fixed","size":32}"#,
            Some(-3064184465700546786),
        ),
        (r#"{ "items":{"type":"null"}, "type":"array"}"#, r#"{"type":"array","items":"null"}"#, Some(-589620603366471059)),
        (r#"{ "values":"string", "type":"map"}"#, r#"{"type":"map","values":"string"}"#, Some(-8732877298790414990)),
        (
            r#"{"name":"PigValue","type":"record",
               "fields":[{"name":"value", "type":["null", "int", "long", "PigValue"]}]}"#,
            r#"{"name":"PigValue","type":"record","fields":[{"name":"value","type":["null","int","long","PigValue"]}]}"#,
            Some(-1759257747318642341),
        ),
    ];

    #[test]
    fn avro_suite_canonical_forms_and_fingerprints() {
        for (input, canonical, fp) in AVRO_SUITE {
            assert_eq!(&parsing_canonical_form(input).unwrap(), canonical, "{input}");
            if let Some(fp) = fp {
                assert_eq!(spec_fingerprint(input).unwrap(), *fp as u64, "{input}");
            }
        }
    }

    #[test]
    fn logical_types_are_their_primitive() {
        let with = r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"t","type":{"type":"long","logicalType":"timestamp-millis"},"doc":"x"}]}"#;
        assert_eq!(
            parsing_canonical_form(with).unwrap(),
            r#"{"name":"n.R","type":"record","fields":[{"name":"t","type":"long"}]}"#
        );
        let without = r#"{"type":"record","name":"R","namespace":"n","fields":[{"name":"t","type":"long"}]}"#;
        assert_eq!(spec_fingerprint(with).unwrap(), spec_fingerprint(without).unwrap());
    }

    #[test]
    fn named_types_inherit_namespaces_and_are_referenced_once() {
        let s = r#"{"type":"record","name":"Outer","namespace":"a.b","fields":[
            {"name":"x","type":{"type":"fixed","name":"F","size":"004"}},
            {"name":"y","type":"F"},
            {"name":"z","type":{"type":"enum","name":"c.E","symbols":["A"]}},
            {"name":"w","type":{"type":"array","items":"c.E"}}]}"#;
        assert_eq!(
            parsing_canonical_form(s).unwrap(),
            concat!(
                r#"{"name":"a.b.Outer","type":"record","fields":["#,
                r#"{"name":"x","type":{"name":"a.b.F","type":"fixed","size":4}},"#,
                r#"{"name":"y","type":"a.b.F"},"#,
                r#"{"name":"z","type":{"name":"c.E","type":"enum","symbols":["A"]}},"#,
                r#"{"name":"w","type":{"type":"array","items":"c.E"}}]}"#
            )
        );
    }

    #[test]
    fn crc_matches_apache_avro_rabin_where_canonical_forms_agree() {
        // Without logical types apache-avro's canonical form is the spec's: both hashes agree,
        // an independent check of the CRC itself.
        let mut compared = 0;
        for (input, _, _) in AVRO_SUITE {
            let Ok(schema) = Schema::parse_str(input) else { continue };
            compared += 1;
            let theirs = schema.fingerprint::<Rabin>();
            let theirs = u64::from_le_bytes(theirs.bytes[..8].try_into().unwrap());
            assert_eq!(spec_fingerprint(input).unwrap(), theirs, "{input}");
        }
        assert!(compared >= 20, "apache-avro parsed only {compared} of the vectors");
    }

    #[test]
    fn published_schemas() {
        // Every published schema with a logical type has two fingerprints; the others one.
        for (text, k) in [
            (USAGE_EVENT_V1, usage_event_v1()),
            (USAGE_EVENT_V2, usage_event_v2()),
            (METER_AGGREGATE_V1, meter_aggregate_v1()),
            (CHARGE_V1, charge_v1()),
            (DEAD_LETTER_V1, dead_letter_v1()),
            (WALLET_ADJUSTMENT_V1, wallet_adjustment_v1()),
            (ALERT_V1, alert_v1()),
        ] {
            let pcf = parsing_canonical_form(text).unwrap();
            assert!(!pcf.contains("logicalType") && !pcf.contains("doc") && !pcf.contains(' '), "{pcf}");
            assert_eq!(k.fingerprint, crc64_avro(pcf.as_bytes()));
            assert!(k.matches(k.fingerprint) && k.matches(k.legacy_fingerprint));
            assert_eq!(text.contains("logicalType"), k.fingerprint != k.legacy_fingerprint, "{pcf}");
        }
        assert_eq!(
            parsing_canonical_form(USAGE_EVENT_V2).unwrap(),
            concat!(
                r#"{"name":"io.meterflow.UsageEvent","type":"record","fields":["#,
                r#"{"name":"event_id","type":"string"},{"name":"tenant","type":"string"},"#,
                r#"{"name":"meter","type":"string"},{"name":"quantity","type":"string"},"#,
                r#"{"name":"event_time","type":"long"},"#,
                r#"{"name":"dimensions","type":{"type":"map","values":"string"}},"#,
                r#"{"name":"provider_cost","type":["null","string"]},{"name":"source","type":"string"}]}"#
            )
        );
    }
}
