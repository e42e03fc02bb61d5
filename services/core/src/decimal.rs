//! Decimals travel as canonical strings: `-?[0-9]+(\.[0-9]+)?`.
//!
//! Why strings and not Avro's `decimal` logical type: a logical decimal fixes one scale per
//! schema, while usage quantities (tokens, GPU seconds) and prices need different ones, and a
//! string is readable in every Kafka tool. The scale is capped at [`MAX_SCALE`] fractional
//! digits because ClickHouse stores `Decimal(38, 9)`: a value with more digits could not be
//! stored exactly, so it is rejected rather than silently rounded.

use rust_decimal::Decimal;

use crate::Error;

/// Fractional digits that survive the whole pipeline (ClickHouse `Decimal(38, 9)`).
pub const MAX_SCALE: u32 = 9;

/// Parses a canonical decimal string exactly; anything else (exponents, `NaN`, `inf`, a
/// leading `+`, spaces, more than [`MAX_SCALE`] fractional digits) is an error naming `field`.
pub fn parse(field: &'static str, s: &str) -> Result<Decimal, Error> {
    let bad = |reason: &'static str| Error::BadDecimal {
        field,
        value: s.chars().take(64).collect(),
        reason,
    };
    let bytes = s.as_bytes();
    let digits = bytes.strip_prefix(b"-").unwrap_or(bytes);
    if digits.is_empty() {
        return Err(bad("empty"));
    }
    let (int, frac) = match digits.iter().position(|&b| b == b'.') {
        Some(dot) => (&digits[..dot], Some(&digits[dot + 1..])),
        None => (digits, None),
    };
    if int.is_empty() || !int.iter().all(u8::is_ascii_digit) {
        return Err(bad("not a canonical decimal"));
    }
    if let Some(frac) = frac {
        if frac.is_empty() || !frac.iter().all(u8::is_ascii_digit) {
            return Err(bad("not a canonical decimal"));
        }
        if frac.len() > MAX_SCALE as usize {
            return Err(bad("more than 9 fractional digits"));
        }
    }
    Decimal::from_str_exact(s).map_err(|_| bad("out of range"))
}

/// Canonical text of a decimal: no exponent, trailing zeros removed.
pub fn format(d: &Decimal) -> String {
    d.normalize().to_string()
}

/// Converts an exact decimal to the `Decimal(38, 9)` fixed-point integer ClickHouse stores.
/// Values are rescaled (never rounded away: callers only pass values of scale <= 9).
pub fn to_ch_i128(d: &Decimal) -> i128 {
    let mut v = *d;
    v.rescale(MAX_SCALE);
    v.mantissa()
}

/// The inverse of [`to_ch_i128`].
pub fn from_ch_i128(v: i128) -> Decimal {
    Decimal::from_i128_with_scale(v, MAX_SCALE).normalize()
}

/// Rounds a money amount to the pipeline's scale, half to even (banker's rounding), the one
/// place amounts lose digits.
pub fn round_amount(d: Decimal) -> Decimal {
    d.round_dp_with_strategy(MAX_SCALE, rust_decimal::RoundingStrategy::MidpointNearestEven)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn accepts_canonical_forms() {
        for s in ["0", "1", "-1", "1250", "0.5", "123.456789012", "-0.000000001"] {
            assert_eq!(parse("q", s).unwrap(), Decimal::from_str(s).unwrap(), "{s}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for s in ["", "-", "NaN", "inf", "-inf", "1e5", "+1", " 1", "1.", ".5", "1.0000000001", "0x10", "1,5"] {
            let err = parse("quantity", s).unwrap_err();
            assert!(matches!(err, Error::BadDecimal { field: "quantity", .. }), "{s}: {err}");
        }
    }

    #[test]
    fn clickhouse_round_trip() {
        for s in ["0", "1.5", "-2.000000001", "79228162514.264337593"] {
            let d = Decimal::from_str(s).unwrap();
            assert_eq!(from_ch_i128(to_ch_i128(&d)), d.normalize());
        }
    }
}
