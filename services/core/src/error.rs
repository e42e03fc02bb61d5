//! The one error type of the core crate.

use thiserror::Error;

/// Everything that can go wrong in the core. Decode variants are what a dead letter's
/// `detail` shows, so they say what was wrong with the bytes, not where in our code.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("empty payload")]
    Empty,
    #[error("unknown framing: first byte 0x{0:02x} is neither Avro single-object (0xC3 0x01) nor Confluent (0x00)")]
    UnknownFraming(u8),
    #[error("unknown schema fingerprint 0x{0:016x}")]
    UnknownFingerprint(u64),
    #[error("unknown Confluent schema id {0}")]
    UnknownSchemaId(u32),
    #[error("truncated payload while reading {0}")]
    Truncated(&'static str),
    #[error("malformed varint while reading {0}")]
    BadVarint(&'static str),
    #[error("negative length while reading {0}")]
    NegativeLength(&'static str),
    #[error("invalid UTF-8 in {0}")]
    BadUtf8(&'static str),
    #[error("invalid union branch {index} for {field}")]
    BadUnion { field: &'static str, index: i64 },
    #[error("{0} trailing bytes after the record")]
    TrailingBytes(usize),
    #[error("bad decimal in {field}: {value:?} ({reason})")]
    BadDecimal {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    /// A name outside its closed set (charge kind, dead-letter reason, aggregation): the wire
    /// type is a string, the set is an enum in code (see `records::names`).
    #[error("unknown {field} {value:?}")]
    UnknownName { field: &'static str, value: String },
    #[error("schema error: {0}")]
    Schema(String),
    #[error("avro error: {0}")]
    Avro(String),
    #[error("invalid meter {meter:?}: field {field}: {reason}")]
    InvalidMeter {
        meter: String,
        field: String,
        reason: String,
    },
    #[error("invalid catalog: plan {plan:?}, price {price:?}, field {field}: {reason}")]
    InvalidCatalog {
        plan: String,
        price: String,
        field: String,
        reason: String,
    },
    #[error("invalid config: {0}")]
    Config(String),
    #[error("snapshot error: {0}")]
    Snapshot(String),
    #[error("store error: {0}")]
    Store(String),
    /// An aggregate the rater cannot price (no plan in force, no price for the meter, a
    /// finalized period, a malformed window). The rater dead-letters it.
    #[error("cannot rate tenant {tenant:?} meter {meter:?}: {reason}")]
    Unrateable {
        tenant: String,
        meter: String,
        reason: String,
    },
    /// A decimal computation that does not fit `rust_decimal` (never wrapped or rounded away).
    #[error("arithmetic overflow: {0}")]
    Arithmetic(String),
    /// A decimal that ClickHouse `Decimal(38, 9)` cannot store exactly (refused, never rescaled).
    #[error("{value} cannot be stored exactly as Decimal(38, 9): {reason}")]
    NotStorable { value: String, reason: &'static str },
    /// A partition engine was given a record below the offset it has already covered.
    #[error("partition {partition}: offset {offset} is below the next offset {next_offset}")]
    OffsetRegression {
        partition: i32,
        offset: i64,
        next_offset: i64,
    },
}

impl From<apache_avro::Error> for Error {
    fn from(e: apache_avro::Error) -> Self {
        Error::Avro(e.to_string())
    }
}
