//! Walking Avro datums by hand: a bounds check before apache-avro reads (it believes the
//! lengths it reads) and the writer of resolved values.

use apache_avro::types::Value;

use crate::avro_wire::{write_bytes, write_long, write_str, Reader};
use crate::Error;

/// Checks, before apache-avro reads `body`, that the lengths and counts of a `schema` datum fit in it.
pub(super) fn check_body(schema: &apache_avro::Schema, body: &[u8]) -> Result<(), Error> {
    check_datum(schema, &mut Reader::new(body))
}

/// Walks a datum of `schema` without allocating and fails if any length or count in it claims
/// more than the input holds. apache-avro trusts them: a map claiming 10^9 entries makes it
/// reserve tens of GB before reading the first (an abort, found by fuzzing; see
/// `services/core/fuzz`), a string length of 500 MB allocates 500 MB. After this check its
/// allocations are bounded by a small multiple of the input's size.
fn check_datum(schema: &apache_avro::Schema, c: &mut Reader<'_>) -> Result<(), Error> {
    use apache_avro::Schema as S;
    let skip = |c: &mut Reader<'_>, n: usize, what: &'static str| c.take(n, what).map(|_| ());
    match schema {
        S::Null => Ok(()),
        S::Boolean => skip(c, 1, "boolean"),
        S::Int | S::Long | S::Date | S::TimeMillis | S::TimeMicros | S::TimestampMillis | S::TimestampMicros
        | S::LocalTimestampMillis | S::LocalTimestampMicros | S::Enum(_) => c.long("integer").map(|_| ()),
        S::Float => skip(c, 4, "float"),
        S::Double => skip(c, 8, "double"),
        S::String | S::Bytes => c.bytes("string").map(|_| ()),
        S::Fixed(f) => skip(c, f.size, "fixed"),
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
pub(super) fn write_value(v: &Value, out: &mut Vec<u8>) -> Result<(), Error> {
    match v {
        Value::Null => {}
        Value::Boolean(b) => out.push(u8::from(*b)),
        Value::Int(i) => write_long(out, i64::from(*i)),
        Value::Long(l) | Value::TimestampMillis(l) => write_long(out, *l),
        Value::String(s) | Value::Enum(_, s) => write_str(out, s),
        Value::Bytes(b) => write_bytes(out, b),
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
pub(super) fn normalise(v: Value) -> Value {
    match v {
        Value::TimestampMillis(t) => Value::Long(t),
        Value::Record(fields) => {
            Value::Record(fields.into_iter().map(|(k, v)| (k, normalise(v))).collect())
        }
        Value::Union(i, b) => Value::Union(i, Box::new(normalise(*b))),
        other => other,
    }
}
