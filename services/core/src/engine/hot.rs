//! Per-record helpers of the hot path: the window-key hash and the fast decimal parse.

use super::*;

/// Up to this many `group_by` dimensions are gathered on the stack.
pub(super) const INLINE_DIMS: usize = 8;

#[inline]
pub(super) fn key_hash<'a>(
    bh: &DefaultHashBuilder,
    meter: u16,
    window_start: i64,
    tenant: &str,
    dims: impl Iterator<Item = &'a str>,
) -> u64 {
    let mut h = bh.build_hasher();
    h.write_u16(meter);
    h.write_i64(window_start);
    h.write_usize(tenant.len());
    h.write(tenant.as_bytes());
    for d in dims {
        h.write_usize(d.len());
        h.write(d.as_bytes());
    }
    h.finish()
}

/// [`crate::decimal::parse`] with a fast path for the common case (at most 18 digits, at most
/// 9 of them fractional), which needs no validation pass and no `from_str`: the result is
/// identical (same value and scale), which a unit test checks against the slow path.
#[inline]
pub(crate) fn parse_decimal(field: &'static str, s: &str) -> Result<Decimal> {
    let b = s.as_bytes();
    let (neg, digits) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, b),
    };
    if !digits.is_empty() && digits.len() <= 18 {
        let mut m: i64 = 0;
        let mut int_digits = 0u32;
        let mut frac_digits = 0u32;
        let mut dot = false;
        let mut ok = true;
        for &c in digits {
            match c {
                b'0'..=b'9' => {
                    m = m * 10 + i64::from(c - b'0');
                    if dot {
                        frac_digits += 1;
                    } else {
                        int_digits += 1;
                    }
                }
                b'.' if !dot => dot = true,
                _ => {
                    ok = false;
                    break;
                }
            }
        }
        if ok && int_digits > 0 && (!dot || (1..=crate::decimal::MAX_SCALE).contains(&frac_digits)) {
            return Ok(Decimal::new(if neg { -m } else { m }, frac_digits));
        }
    }
    crate::decimal::parse(field, s)
}
