//! Time helpers: wall clock in Unix milliseconds, RFC 3339 parsing and formatting, durations.
//!
//! Event times are plain `i64` milliseconds everywhere in meterflow; these helpers let humans
//! write `2025-01-01T00:00:00Z` (or Unix milliseconds) on the command line and read it back in
//! summaries, through `meterflow_core::time`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use meterflow_core::time::format_rfc3339_ms;
use meterflow_core::time::{self, SubMillis};

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
    time::parse_rfc3339(s, SubMillis::Truncate)
        .map_err(|_| format!("{s:?} is neither Unix milliseconds nor RFC 3339 (e.g. 2025-01-01T00:00:00Z)"))
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
