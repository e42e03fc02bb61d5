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

/// Largest magnitude of a ClickHouse `Decimal(38, 9)` as its fixed-point integer (38 digits).
pub const CH_MAX_I128: i128 = 10_i128.pow(38) - 1;

/// Converts an exact decimal to the `Decimal(38, 9)` fixed-point integer ClickHouse stores,
/// exactly or not at all: integer arithmetic on the 96-bit mantissa, so every `rust_decimal`
/// of scale <= 9 converts (|mantissa| < 2^96 ≈ 7.9e28, times at most 10^9, stays below
/// 10^38), and a value with non-zero digits beyond the 9th fractional one is refused.
///
/// Why not `rescale(9)`: `rust_decimal` cannot hold a mantissa above 2^96, so rescaling a
/// large value to scale 9 silently stops short (1e20 came out as 1e19 in ClickHouse).
pub fn to_ch_i128(d: &Decimal) -> Result<i128, Error> {
    let m = d.mantissa();
    let scale = d.scale();
    let v = if scale <= MAX_SCALE {
        m * 10_i128.pow(MAX_SCALE - scale)
    } else {
        let div = 10_i128.pow(scale - MAX_SCALE);
        if m % div != 0 {
            return Err(Error::NotStorable {
                value: d.to_string(),
                reason: "more than 9 fractional digits",
            });
        }
        m / div
    };
    // Unreachable for a 96-bit mantissa; kept so the bound is stated and checked in one place.
    if v.abs() > CH_MAX_I128 {
        return Err(Error::NotStorable {
            value: d.to_string(),
            reason: "more than 38 digits",
        });
    }
    Ok(v)
}

/// The inverse of [`to_ch_i128`], normalised. Trailing zeros are stripped in `i128` first, so
/// every value [`to_ch_i128`] produces converts back (4e23 is 4e32 units of 10^-9, beyond a
/// 96-bit mantissa at scale 9 but not at scale 0). Errors for a stored value `rust_decimal`
/// cannot hold at all (above ~7.9e28, which meterflow never writes but another writer of the
/// table could).
pub fn try_from_ch_i128(v: i128) -> Result<Decimal, Error> {
    let (mut m, mut scale) = (v, MAX_SCALE);
    while scale > 0 && m % 10 == 0 {
        m /= 10;
        scale -= 1;
    }
    Decimal::try_from_i128_with_scale(m, scale)
        .map(|d| d.normalize())
        .map_err(|_| Error::NotStorable {
            value: v.to_string(),
            reason: "beyond rust_decimal's 96-bit mantissa",
        })
}

/// [`try_from_ch_i128`] for values meterflow wrote, which are always within range.
///
/// # Panics
/// On a stored value beyond `rust_decimal` (|value| >= 2^96 in its shortest form).
#[allow(clippy::expect_used, reason = "documented above: for per-row values meterflow wrote, which always fit")]
pub fn from_ch_i128(v: i128) -> Decimal {
    try_from_ch_i128(v).expect("a Decimal(38, 9) value meterflow wrote fits rust_decimal")
}

/// Checks that a decimal read from the wire fits the pipeline: at most [`MAX_SCALE`]
/// significant fractional digits (so it converts exactly to ClickHouse).
pub fn check_storable(field: &'static str, d: &Decimal) -> Result<(), Error> {
    to_ch_i128(d).map(|_| ()).map_err(|e| Error::BadDecimal {
        field,
        value: d.to_string().chars().take(64).collect(),
        reason: match e {
            Error::NotStorable { reason, .. } => reason,
            _ => "not storable",
        },
    })
}

/// Rounds a money amount to the pipeline's scale, half to even (banker's rounding), the one
/// place amounts lose digits.
pub fn round_amount(d: Decimal) -> Decimal {
    d.round_dp_with_strategy(MAX_SCALE, rust_decimal::RoundingStrategy::MidpointNearestEven)
}

/// `d` with the sign of a zero dropped. `-x + x` is a negative zero, which prints `-0` but
/// parses as `0`: kept in a state, a restored copy would snapshot to other bytes than the
/// state it was restored from. State that accumulates signed amounts stores this.
pub fn unsigned_zero(mut d: Decimal) -> Decimal {
    if d.is_zero() {
        d.set_sign_positive(true);
    }
    d
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
            assert_eq!(from_ch_i128(to_ch_i128(&d).unwrap()), d.normalize());
        }
    }

    /// The reference: the decimal's text with the point moved 9 places, computed on strings
    /// (no decimal arithmetic), parsed as an i128.
    fn reference(s: &str) -> i128 {
        let (neg, digits) = s.strip_prefix('-').map_or((false, s), |r| (true, r));
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        assert!(frac.len() <= 9);
        let text = format!("{int}{frac:0<9}");
        let v: i128 = text.parse().unwrap();
        if neg { -v } else { v }
    }

    #[test]
    fn large_values_convert_exactly() {
        // 1e20 used to come out as 1e19 (rescale stopping short at the 96-bit mantissa).
        let max = Decimal::MAX.to_string();
        let min = Decimal::MIN.to_string();
        for s in [
            "100000000000000000000",
            "400000000000000000000000",
            "-400000000000000000000000",
            "12345678901234567890.123456789",
            "0.000000001",
            "-0.000000001",
            "9999999999999999999.999999999",
            max.as_str(),
            min.as_str(),
            "7922816251426433759.354395033",
        ] {
            let d = parse("q", s).unwrap();
            let v = to_ch_i128(&d).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(v, reference(s), "{s}");
            assert_eq!(from_ch_i128(v), d.normalize(), "{s}");
            assert_eq!(try_from_ch_i128(v).unwrap(), d.normalize(), "{s}");
        }
        assert_eq!(to_ch_i128(&Decimal::MAX).unwrap(), 79_228_162_514_264_337_593_543_950_335_000_000_000);
        // 29 significant digits do not fit rust_decimal: refused on the wire, not rounded
        // (Decimal::from_str would round this one to 1e20).
        assert!(parse("q", "99999999999999999999.999999999").is_err());
    }

    #[test]
    fn finer_than_nine_digits_is_refused_unless_the_extra_digits_are_zero() {
        let d = Decimal::from_str("1.0000000001").unwrap();
        assert!(matches!(to_ch_i128(&d), Err(Error::NotStorable { .. })));
        assert!(matches!(check_storable("value", &d), Err(Error::BadDecimal { field: "value", .. })));
        // 28 fractional digits, all zero beyond the 9th: exact.
        let d = Decimal::from_i128_with_scale(15 * 10_i128.pow(27), 28);
        assert_eq!(to_ch_i128(&d).unwrap(), 1_500_000_000);
        assert!(check_storable("value", &d).is_ok());
        let tiny = Decimal::from_i128_with_scale(1, 28);
        assert!(to_ch_i128(&tiny).is_err());
    }

    #[test]
    fn beyond_rust_decimal_is_an_error_when_reading_back() {
        assert!(try_from_ch_i128(CH_MAX_I128).is_err());
        assert!(try_from_ch_i128(-CH_MAX_I128).is_err());
    }

    proptest::proptest! {
        #[test]
        fn conversion_is_exact(m in proptest::num::i128::ANY, scale in 0u32..=9) {
            let m = m % (1_i128 << 96);
            let d = Decimal::from_i128_with_scale(m, scale);
            let v = to_ch_i128(&d).unwrap();
            proptest::prop_assert_eq!(v, m * 10_i128.pow(9 - scale));
            proptest::prop_assert_eq!(from_ch_i128(v), d.normalize());
        }
    }
}
