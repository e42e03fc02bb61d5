//! RFC 3339 instants as Unix milliseconds, through chrono: one parser and one formatter for
//! every place a person or a client writes a time (event times, catalog dates, query ranges,
//! command-line flags). Hand-written copies used to disagree on leap seconds and on digits
//! below the millisecond.
//!
//! Accepted: `2026-01-15T00:00:00Z`, a fraction, `Z`/`z` or `±HH:MM`, and `t` or a space
//! instead of `T`. A leap second (`23:59:60`) is its minute's last millisecond, `23:59:59.999`:
//! meterflow's milliseconds have no leap seconds, and the instant stays in its minute.

use chrono::{DateTime, SecondsFormat, Timelike as _};

/// What to do with digits below the millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubMillis {
    /// Drop them, toward the past (event times: a window boundary is a whole millisecond, and
    /// clients often send nanoseconds).
    Truncate,
    /// Refuse a non-zero one (effective dates, query ranges: an instant that cannot be
    /// represented is an error rather than silently moved).
    Reject,
}

/// Parses an RFC 3339 timestamp into Unix milliseconds, refusing sub-millisecond precision.
pub fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    parse_rfc3339(s, SubMillis::Reject)
}

/// Parses an RFC 3339 timestamp into Unix milliseconds.
pub fn parse_rfc3339(s: &str, sub_millis: SubMillis) -> Result<i64, String> {
    let t = DateTime::parse_from_rfc3339(s.trim())
        .map_err(|e| format!("{s:?} is not an RFC 3339 timestamp like \"2026-01-15T00:00:00Z\" ({e})"))?;
    // chrono keeps a leap second as a nanosecond count of 1e9 and more within second 59.
    let nanos = t.nanosecond();
    if nanos >= 1_000_000_000 {
        return Ok(t.timestamp() * 1000 + 999);
    }
    if sub_millis == SubMillis::Reject && nanos % 1_000_000 != 0 {
        return Err(format!("{s:?}: sub-millisecond precision is not supported"));
    }
    Ok(t.timestamp() * 1000 + i64::from(nanos / 1_000_000))
}

/// RFC 3339 in UTC with milliseconds, e.g. `2025-01-01T00:00:00.250Z`; Unix milliseconds as
/// digits when out of chrono's range (about ±262,000 years).
pub fn format_rfc3339_ms(ms: i64) -> String {
    format_rfc3339(ms, SecondsFormat::Millis)
}

/// RFC 3339 in UTC to the second, e.g. `2025-01-01T00:00:00Z` (API answers, window starts).
pub fn format_rfc3339_s(ms: i64) -> String {
    format_rfc3339(ms, SecondsFormat::Secs)
}

fn format_rfc3339(ms: i64, precision: SecondsFormat) -> String {
    DateTime::from_timestamp_millis(ms).map_or_else(|| ms.to_string(), |t| t.to_rfc3339_opts(precision, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accepted_forms() {
        let ms = 1_735_689_600_000;
        for s in [
            "2025-01-01T00:00:00Z",
            "2025-01-01t00:00:00z",
            "2025-01-01 00:00:00Z",
            "2025-01-01T01:00:00+01:00",
            "2024-12-31T19:00:00-05:00",
            " 2025-01-01T00:00:00.000Z ",
        ] {
            assert_eq!(parse_rfc3339_ms(s), Ok(ms), "{s}");
        }
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00.25Z"), Ok(250));
        assert_eq!(parse_rfc3339_ms("2024-02-29T12:00:00Z"), Ok(1_709_208_000_000));
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59.999Z"), Ok(-1));
        for bad in [
            "",
            "yesterday",
            "12s",
            "2025-01-01",
            "2025-01-01T00:00:00",
            "2025-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2025-01-01T24:00:00Z",
        ] {
            assert!(parse_rfc3339_ms(bad).is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn digits_below_the_millisecond() {
        let s = "2024-12-31T19:00:00.123456-05:00";
        assert_eq!(parse_rfc3339(s, SubMillis::Truncate), Ok(1_735_689_600_123));
        assert!(parse_rfc3339(s, SubMillis::Reject).is_err());
        // Toward the past also before 1970.
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59.9999Z", SubMillis::Truncate), Ok(-1));
        assert_eq!(parse_rfc3339("2025-01-01T00:00:00.120000000Z", SubMillis::Reject), Ok(1_735_689_600_120));
    }

    #[test]
    fn a_leap_second_is_its_minutes_last_millisecond() {
        for mode in [SubMillis::Truncate, SubMillis::Reject] {
            assert_eq!(parse_rfc3339("2016-12-31T23:59:60Z", mode), Ok(1_483_228_799_999));
            assert_eq!(parse_rfc3339("2016-12-31T23:59:60.5Z", mode), Ok(1_483_228_799_999));
        }
    }

    #[test]
    fn formats_round_trip() {
        for ms in [0, 1_735_689_600_250, 1_709_208_000_000, 951_782_400_999, -1] {
            assert_eq!(parse_rfc3339_ms(&format_rfc3339_ms(ms)), Ok(ms), "{}", format_rfc3339_ms(ms));
        }
        assert_eq!(format_rfc3339_ms(1_735_689_600_250), "2025-01-01T00:00:00.250Z");
        assert_eq!(format_rfc3339_s(1_735_689_600_250), "2025-01-01T00:00:00Z");
        assert_eq!(format_rfc3339_ms(i64::MAX), i64::MAX.to_string());
    }
}
