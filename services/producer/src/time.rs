//! Time helpers: wall clock in Unix milliseconds, RFC 3339 parsing and formatting, durations.
//!
//! Event times are plain `i64` milliseconds everywhere in meterflow; these helpers exist so that
//! humans can write `2025-01-01T00:00:00Z` on the command line and read it back in summaries,
//! without pulling a calendar crate into the producer for two conversions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meterflow_core::pricing as calendar;

/// Wall-clock time in Unix milliseconds (negative before 1970, which never happens in practice).
pub fn now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// Parses an event time given either as Unix milliseconds (`1735689600000`) or as RFC 3339
/// (`2025-01-01T00:00:00Z`, `2025-01-01T01:00:00.250+01:00`, a space instead of `T` works too).
pub fn parse_time_ms(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let digits = s.strip_prefix('-').unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<i64>().map_err(|e| format!("{s:?}: {e}"));
    }
    parse_rfc3339(s).ok_or_else(|| {
        format!("{s:?} is neither Unix milliseconds nor RFC 3339 (e.g. 2025-01-01T00:00:00Z)")
    })
}

fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut pos = 19;
    let mut millis = 0i64;
    if b.get(pos) == Some(&b'.') {
        pos += 1;
        let start = pos;
        while pos < b.len() && b[pos].is_ascii_digit() {
            pos += 1;
        }
        if pos == start {
            return None;
        }
        // Sub-millisecond digits are truncated: event times are milliseconds.
        let frac = &s[start..pos];
        let ms3: String = frac.chars().chain("000".chars()).take(3).collect();
        millis = ms3.parse().ok()?;
    }
    let offset_s = match &s[pos..] {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) && tz.as_bytes()[3] == b':' => {
            let h: i64 = tz[1..3].parse().ok()?;
            let m: i64 = tz[4..6].parse().ok()?;
            if h > 23 || m > 59 {
                return None;
            }
            let off = h * 3600 + m * 60;
            if tz.starts_with('-') {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_s;
    Some(secs * 1000 + millis)
}

/// The core's calendar (one copy for the whole workspace), with this parser's `i64` fields.
fn days_in_month(y: i64, m: i64) -> i64 {
    i64::from(calendar::days_in_month(y, m as u32))
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    calendar::days_from_civil(y, m as u32, d as u32)
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let (y, m, d) = calendar::civil_from_days(z);
    (y, i64::from(m), i64::from(d))
}

/// RFC 3339 in UTC with milliseconds, e.g. `2025-01-01T00:00:00.000Z`.
pub fn format_rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// Parses `"500ms"`, `"90s"`, `"10m"`, `"1h"`, `"35d"` (the meters file's syntax) for clap.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let ms = meterflow_core::meter::parse_duration(s)?;
    u64::try_from(ms)
        .map(Duration::from_millis)
        .map_err(|_| format!("{s:?} must not be negative"))
}

/// A duration in whole milliseconds as `i64`, the unit of event-time arithmetic.
pub fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_millis_and_rfc3339() {
        assert_eq!(parse_time_ms("1735689600000").unwrap(), 1_735_689_600_000);
        assert_eq!(parse_time_ms("2025-01-01T00:00:00Z").unwrap(), 1_735_689_600_000);
        assert_eq!(parse_time_ms("2025-01-01T01:00:00.25+01:00").unwrap(), 1_735_689_600_250);
        assert_eq!(parse_time_ms("2024-12-31 19:00:00.123456-05:00").unwrap(), 1_735_689_600_123);
        assert_eq!(parse_time_ms("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(parse_time_ms("2024-02-29T12:00:00Z").unwrap(), 1_709_208_000_000);
        for bad in ["", "2025-13-01T00:00:00Z", "2023-02-29T00:00:00Z", "2025-01-01", "2025-01-01T00:00:00", "yesterday", "12s"] {
            assert!(parse_time_ms(bad).is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn format_round_trips() {
        for ms in [0, 1_735_689_600_250, 1_709_208_000_000, 951_782_400_999, -1] {
            assert_eq!(parse_time_ms(&format_rfc3339_ms(ms)).unwrap(), ms, "{}", format_rfc3339_ms(ms));
        }
        assert_eq!(format_rfc3339_ms(1_735_689_600_250), "2025-01-01T00:00:00.250Z");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("35d").unwrap(), Duration::from_secs(35 * 86_400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("ten").is_err());
    }
}
