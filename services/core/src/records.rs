//! The low-volume records (aggregates, charges, dead letters, wallet adjustments), encoded
//! with apache-avro's generic path: correctness and schema checks matter more than
//! nanoseconds at one record per window.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::avro_wire::{Header, CONFLUENT_MAGIC};
use crate::decimal::check_storable;
use crate::schema::{self, Known};
use crate::Error;

mod alert;
mod datum;
mod names;
mod provisional;
use datum::{check_body, normalise, write_value};
pub use alert::AlertRecord;
pub use names::{AlertKind, ChargeKind, DeadLetterReason, RaterReason};
use names::{check_aggregation, check_charge_kind, check_reason};
pub use provisional::ProvisionalTotal;

/// `Default` is for building records field by field (tests, fixtures): its empty aggregation
/// name is refused on encode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterAggregate {
    pub tenant: String,
    pub meter: String,
    /// An [`Aggregation`](crate::meter::Aggregation) name (checked on encode and decode).
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

/// `Default` as for [`MeterAggregate`] (its empty kind is refused on encode).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub charge_id: String,
    /// A [`ChargeKind`] name (checked on encode and decode).
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
    /// A [`DeadLetterReason`] name (checked on encode and decode).
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

    /// Fields that are strings on the wire but one of a closed set of names in code (see
    /// [`names`]): checked on encode and on decode, so an unknown name is refused at both ends.
    fn check_names(&self) -> Result<(), Error> {
        Ok(())
    }

    /// Earlier writer schemas still read (resolved to the current one with its defaults).
    fn older() -> Vec<&'static Known> {
        Vec::new()
    }

    /// Single-object encoding with this record's schema, headed by the spec's fingerprint
    /// (either fingerprint is accepted by [`AvroRecord::from_avro`]; see [`crate::schema`]).
    fn to_avro(&self) -> Result<Vec<u8>, Error> {
        self.check_names()?;
        let known = Self::known();
        let value = apache_avro::to_value(self)?.resolve(&known.schema)?;
        let mut out = Vec::with_capacity(256);
        Header::SingleObject { fingerprint: known.fingerprint }.write(&mut out);
        write_value(&value, &mut out)?;
        Ok(out)
    }

    fn from_avro(bytes: &[u8]) -> Result<Self, Error> {
        let known = Self::known();
        let mut writer = known;
        let body = match Header::split(bytes)? {
            (Header::SingleObject { fingerprint: fp }, body) => {
                if !known.matches(fp) {
                    writer = Self::older()
                        .into_iter()
                        .find(|k| k.matches(fp))
                        .ok_or(Error::UnknownFingerprint(fp))?;
                }
                body
            }
            // Internal records are always single-object encoded.
            (Header::Confluent { .. }, _) => return Err(Error::UnknownFraming(CONFLUENT_MAGIC)),
        };
        // apache-avro believes the lengths and counts it reads: check them against the input first.
        check_body(&writer.schema, body)?;
        let mut reader = body;
        let resolve_into = (!std::ptr::eq(writer, known)).then_some(&known.schema);
        let value = apache_avro::from_avro_datum(&writer.schema, &mut reader, resolve_into)?;
        if !reader.is_empty() {
            return Err(Error::TrailingBytes(reader.len()));
        }
        let record: Self = apache_avro::from_value(&normalise(value))?;
        record.check_decimals()?;
        record.check_names()?;
        Ok(record)
    }
}

impl AvroRecord for MeterAggregate {
    fn known() -> &'static Known {
        schema::meter_aggregate_v2()
    }

    fn older() -> Vec<&'static Known> {
        vec![schema::meter_aggregate_v1()]
    }
    fn check_names(&self) -> Result<(), Error> {
        check_aggregation(&self.aggregation)
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
    fn check_names(&self) -> Result<(), Error> {
        check_charge_kind(&self.kind)
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
    fn check_names(&self) -> Result<(), Error> {
        check_reason(&self.reason)
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
mod tests;
