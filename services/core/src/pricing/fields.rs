//! Leaf values of the catalog file, checked while serde reads them. A bad value then fails
//! inside the deserializer, where `serde_path_to_error` knows its full path
//! (`plan[0].price[2].tiers[1].up_to`) and toml knows its line.

use std::fmt;

use rust_decimal::Decimal;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::{parse_rfc3339_ms, MAX_CATALOG_VALUE, PRICE_SCALE};
use crate::decimal::MAX_SCALE;

/// A non-empty string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Text(pub(super) String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Err(de::Error::custom("must not be empty"));
        }
        Ok(Self(s))
    }
}

/// A plan id: it ends up in charge ids and ClickHouse rows, so only `[A-Za-z0-9_.-]`.
#[derive(Debug)]
pub(super) struct PlanId(pub(super) String);

impl<'de> Deserialize<'de> for PlanId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Text(s) = Text::deserialize(d)?;
        if !s.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
            return Err(de::Error::custom(format!("{s:?} must be [A-Za-z0-9_.-]")));
        }
        Ok(Self(s))
    }
}

/// An ISO 4217 currency code (three upper-case letters).
#[derive(Debug)]
pub(super) struct Currency(pub(super) String);

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() != 3 || !s.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(de::Error::custom(format!("{s:?} is not an ISO 4217 code like \"USD\"")));
        }
        Ok(Self(s))
    }
}

/// The billing period: the calendar month in UTC is the only one.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Period {
    Month,
}

/// A non-negative decimal of at most 1e15 with at most `SCALE` fractional digits, written
/// as a string or an integer (TOML floats are refused), normalized.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dec<const SCALE: u32>(pub(super) Decimal);

/// Quantities (`up_to`, `free_units`, `package_size`) and money amounts: the pipeline's scale.
pub(super) type Quantity = Dec<MAX_SCALE>;
/// Prices (unit prices, fees, cost rates): 12 digits, what Stripe allows.
pub(super) type Rate = Dec<PRICE_SCALE>;

impl<const SCALE: u32> Dec<SCALE> {
    /// An optional amount's value, zero when absent.
    pub(super) fn or_zero(d: Option<Self>) -> Decimal {
        d.map_or(Decimal::ZERO, |d| d.0)
    }
}

impl<'de, const SCALE: u32> Deserialize<'de> for Dec<SCALE> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match d.deserialize_any(DecVisitor { scale: SCALE, allow_inf: false })? {
            Bound::Finite(v) => Ok(Self(v)),
            Bound::Unbounded => Err(de::Error::custom("\"inf\" is only a tier's up_to")),
        }
    }
}

/// A tier's `up_to`: a quantity, or `"inf"` for the unbounded last tier.
#[derive(Debug, Clone, Copy)]
pub(super) enum Bound {
    Finite(Decimal),
    Unbounded,
}

impl<'de> Deserialize<'de> for Bound {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DecVisitor { scale: MAX_SCALE, allow_inf: true })
    }
}

struct DecVisitor {
    scale: u32,
    allow_inf: bool,
}

impl DecVisitor {
    fn checked<E: de::Error>(d: Decimal) -> Result<Bound, E> {
        if d.is_sign_negative() && !d.is_zero() {
            return Err(E::custom("must not be negative"));
        }
        if d > Decimal::from(MAX_CATALOG_VALUE) {
            return Err(E::custom("must be at most 1e15"));
        }
        Ok(Bound::Finite(d.normalize()))
    }
}

impl Visitor<'_> for DecVisitor {
    type Value = Bound;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a decimal string like \"0.0025\" or an integer")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Bound, E> {
        Self::checked(Decimal::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Bound, E> {
        Self::checked(Decimal::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Bound, E> {
        Err(E::custom(format!("write decimals as strings (\"{v}\"): TOML floats are binary and inexact")))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Bound, E> {
        if self.allow_inf && s == "inf" {
            return Ok(Bound::Unbounded);
        }
        Self::checked(parse_decimal(s, self.scale).map_err(E::custom)?)
    }
}

/// Canonical decimal text (`-?[0-9]+(\.[0-9]+)?`) with at most `max_scale` fractional digits.
/// Stricter than `Decimal::from_str`, which also takes `1e3`, `_` and a leading `+`.
fn parse_decimal(s: &str, max_scale: u32) -> Result<Decimal, String> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (digits, None),
    };
    let ok = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !ok(int) || !frac.is_none_or(ok) {
        return Err(format!("{s:?} is not a decimal like \"0.0025\""));
    }
    if frac.is_some_and(|f| f.len() > max_scale as usize) {
        return Err(format!("{s:?} has more than {max_scale} fractional digits"));
    }
    Decimal::from_str_exact(s).map_err(|_| format!("{s:?} is out of range"))
}

/// An instant as Unix milliseconds, written as an RFC 3339 string or a bare TOML datetime
/// (whose text form is RFC 3339).
#[derive(Debug, Clone, Copy)]
pub(super) struct Instant(pub(super) i64);

impl<'de> Deserialize<'de> for Instant {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(InstantVisitor)
    }
}

struct InstantVisitor;

impl<'de> Visitor<'de> for InstantVisitor {
    type Value = Instant;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an RFC 3339 timestamp like \"2026-01-15T00:00:00Z\"")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Instant, E> {
        parse_rfc3339_ms(s).map(Instant).map_err(E::custom)
    }

    /// toml hands a datetime over as a one-entry map; its own type reads that map.
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Instant, A::Error> {
        let dt = toml::value::Datetime::deserialize(de::value::MapAccessDeserializer::new(map))?;
        self.visit_str(&dt.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_canonical_text() {
        assert_eq!(parse_decimal("0.0025", 9), Ok(Decimal::new(25, 4)));
        assert_eq!(parse_decimal("-1", 0), Ok(Decimal::from(-1)));
        for bad in ["1e3", "+1", "1_000", ".5", "5.", "", "0x10", " 1"] {
            assert!(parse_decimal(bad, 9).is_err(), "{bad}");
        }
        assert!(parse_decimal("0.0000000001", 9).unwrap_err().contains("more than 9"));
    }
}
