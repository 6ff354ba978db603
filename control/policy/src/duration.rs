//! Durations as written in flyball configuration: `"500ms"`, `"2s"`, `"1m30s"`, `"0"`.
//!
//! Grammar (a subset of Go's `time.ParseDuration`, which Kubernetes users already know; no sign,
//! since no flyball duration is negative):
//!
//! ```text
//! duration = "0" | term { term }
//! term     = digits [ "." digits ] unit
//! unit     = "ns" | "us" | "µs" | "ms" | "s" | "m" | "h"
//! ```
//!
//! [`DURATION_PATTERN`] is the same grammar as a regular expression, for the CRD schema, so the API
//! server rejects what this parser rejects.

use std::fmt;
use std::time::Duration;

/// The grammar above as a regular expression (used in the generated JSON schema).
pub const DURATION_PATTERN: &str = r"^(0|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+)$";

/// Durations above this are refused: no window, period or SLO needs more than a week, and the bound
/// keeps every sum of parsed durations far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why a string is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty")]
    Empty,
    #[error("expected a number at byte {at}")]
    ExpectedNumber { at: usize },
    #[error("missing unit after the number at byte {at} (use ns, us, ms, s, m or h)")]
    MissingUnit { at: usize },
    #[error("unknown unit {unit:?} (use ns, us, ms, s, m or h)")]
    UnknownUnit { unit: String },
    #[error("longer than the maximum of 168h")]
    TooLong,
}

/// Parses a duration in the grammar above.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let bytes = text.as_bytes();
    let mut at = 0;
    let mut total_ns: u128 = 0;
    while at < bytes.len() {
        let start = at;
        let mut whole: u128 = 0;
        while at < bytes.len() && bytes[at].is_ascii_digit() {
            whole = whole
                .saturating_mul(10)
                .saturating_add(u128::from(bytes[at] - b'0'));
            at += 1;
        }
        if at == start {
            return Err(DurationError::ExpectedNumber { at: start });
        }
        // The fraction is kept as numerator / 10^digits, at most 18 digits: finer than 1 ns of an hour.
        let mut frac_num: u128 = 0;
        let mut frac_den: u128 = 1;
        if at < bytes.len() && bytes[at] == b'.' {
            at += 1;
            let frac_start = at;
            while at < bytes.len() && bytes[at].is_ascii_digit() {
                if frac_den < 1_000_000_000_000_000_000 {
                    frac_num = frac_num * 10 + u128::from(bytes[at] - b'0');
                    frac_den *= 10;
                }
                at += 1;
            }
            if at == frac_start {
                return Err(DurationError::ExpectedNumber { at: frac_start });
            }
        }
        let unit_start = at;
        while at < bytes.len() && !bytes[at].is_ascii_digit() && bytes[at] != b'.' {
            at += 1;
        }
        let unit = text.get(unit_start..at).unwrap_or("");
        let ns_per_unit: u128 = match unit {
            "" => return Err(DurationError::MissingUnit { at: unit_start }),
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            other => {
                return Err(DurationError::UnknownUnit {
                    unit: other.to_owned(),
                });
            }
        };
        total_ns = total_ns
            .saturating_add(whole.saturating_mul(ns_per_unit))
            .saturating_add(frac_num.saturating_mul(ns_per_unit) / frac_den);
    }
    if total_ns > MAX_DURATION.as_nanos() {
        return Err(DurationError::TooLong);
    }
    // Bounded by MAX_DURATION above, so it fits in u64 nanoseconds.
    let total_ns = u64::try_from(total_ns).map_err(|_| DurationError::TooLong)?;
    Ok(Duration::from_nanos(total_ns))
}

/// Formats a duration in the grammar above, in the largest of s, ms, us, ns that is exact. Minutes
/// and hours are never used, so windows print as the HPA documents them (`300s`).
pub fn format_duration(duration: Duration) -> DurationDisplay {
    DurationDisplay(duration)
}

/// [`fmt::Display`] for a [`Duration`] in flyball's grammar; see [`format_duration`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationDisplay(pub Duration);

impl fmt::Display for DurationDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let ns = d.as_nanos();
        if ns == 0 {
            f.write_str("0s")
        } else if ns.is_multiple_of(1_000_000_000) {
            write!(f, "{}s", d.as_secs())
        } else if ns.is_multiple_of(1_000_000) {
            write!(f, "{}ms", ns / 1_000_000)
        } else if ns.is_multiple_of(1_000) {
            write!(f, "{}us", ns / 1_000)
        } else {
            write!(f, "{ns}ns")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_units_kubernetes_users_write() {
        let cases = [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("500ms", Duration::from_millis(500)),
            ("2s", Duration::from_secs(2)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m30s", Duration::from_secs(90)),
            ("2h", Duration::from_secs(7200)),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("7ns", Duration::from_nanos(7)),
            ("0.001s", Duration::from_millis(1)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_what_the_schema_pattern_rejects() {
        let cases = [
            ("", DurationError::Empty),
            ("ms", DurationError::ExpectedNumber { at: 0 }),
            ("5", DurationError::MissingUnit { at: 1 }),
            ("5 s", DurationError::UnknownUnit { unit: " s".into() }),
            ("-5s", DurationError::ExpectedNumber { at: 0 }),
            ("1.s", DurationError::ExpectedNumber { at: 2 }),
            ("3d", DurationError::UnknownUnit { unit: "d".into() }),
            ("169h", DurationError::TooLong),
            ("99999999999999999999999999999999h", DurationError::TooLong),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Err(want), "{text:?}");
        }
    }

    #[test]
    fn formatting_then_parsing_gives_the_same_duration() {
        for d in [
            Duration::ZERO,
            Duration::from_secs(300),
            Duration::from_millis(1500),
            Duration::from_micros(3),
            Duration::from_nanos(1_000_000_001),
        ] {
            let text = format_duration(d).to_string();
            assert_eq!(parse_duration(&text), Ok(d), "{text}");
        }
    }
}
