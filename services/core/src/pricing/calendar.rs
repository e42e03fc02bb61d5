//! Calendar arithmetic (UTC, proleptic Gregorian): billing periods are calendar months.

pub(crate) const DAY_MS: i64 = 86_400_000;

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Civil date of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days in month `m` (1-12) of year `y`.
pub fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// First instant the calendar functions are meant for (the Unix epoch).
pub const MIN_TIME_MS: i64 = 0;
/// First instant past the supported range (year 10000). Times outside
/// `MIN_TIME_MS..MAX_TIME_MS` are rejected or clamped by the rater, so calendar arithmetic
/// cannot overflow and a bogus watermark cannot make it walk millions of months.
pub const MAX_TIME_MS: i64 = 253_402_300_800_000;

/// Start (Unix ms, UTC) of the calendar-month billing period holding `ms`.
pub fn period_start(ms: i64) -> i64 {
    let (y, m, _) = civil_from_days(ms.div_euclid(DAY_MS));
    days_from_civil(y, m, 1) * DAY_MS
}

/// End (exclusive) of the billing period holding `ms`: the start of the next month.
pub fn period_end(ms: i64) -> i64 {
    let (y, m, _) = civil_from_days(ms.div_euclid(DAY_MS));
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(y, m, 1) * DAY_MS
}

/// Parses an RFC 3339 timestamp (`2026-01-15T00:00:00Z`, optional fraction, `Z` or `±HH:MM`)
/// into Unix milliseconds. Fractions beyond milliseconds must be zero: an effective date that
/// cannot be represented is an error rather than silently moved.
pub fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    let bad = || format!("{s:?} is not an RFC 3339 timestamp like \"2026-01-15T00:00:00Z\"");
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let part = &b[r];
        if part.iter().all(u8::is_ascii_digit) {
            Ok(part.iter().fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')))
        } else {
            Err(bad())
        }
    };
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || d < 1 || d > i64::from(days_in_month(y, mo as u32)) || h > 23 || mi > 59 || sec > 59 {
        return Err(format!("{s:?}: date or time out of range"));
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = &b[start..i];
        if frac.is_empty() {
            return Err(bad());
        }
        for (k, digit) in frac.iter().enumerate() {
            let v = i64::from(digit - b'0');
            if k < 3 {
                millis += v * 10i64.pow(2 - k as u32);
            } else if v != 0 {
                return Err(format!("{s:?}: sub-millisecond precision is not supported"));
            }
        }
    }
    let offset_ms = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), rest @ ..] if rest.len() == 5 && rest[2] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return Err(format!("{s:?}: offset out of range"));
            }
            let off = (oh * 60 + om) * 60_000;
            if *sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    Ok(days * DAY_MS + ((h * 60 + mi) * 60 + sec) * 1000 + millis - offset_ms)
}

