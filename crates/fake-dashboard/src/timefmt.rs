//! Naive-UTC ISO-8601 timestamps, the way the dashboard writes them (protocol §1).
//!
//! Internally every timestamp is a `SystemTime`; this module only renders them as Python's
//! `datetime.utcnow().isoformat()` does (`2026-11-29T07:22:21.845137`, no zone suffix, the
//! fraction left out when it is zero) for the control API and the JSON log lines.

use std::time::{SystemTime, UNIX_EPOCH};

/// Formats `t` like `datetime.utcnow().isoformat()`.
pub fn naive_utc(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let micros = d.subsec_micros();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if micros == 0 {
        format!("{y:04}-{m:02}-{day:02}T{hh:02}:{mm:02}:{ss:02}")
    } else {
        format!("{y:04}-{m:02}-{day:02}T{hh:02}:{mm:02}:{ss:02}.{micros:06}")
    }
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Serde helpers for `SystemTime` fields rendered as naive UTC strings.
pub mod serde_naive {
    use serde::Serializer;
    use std::time::SystemTime;

    /// Serializes a required timestamp.
    pub fn required<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::naive_utc(*t))
    }

    /// Serializes an optional timestamp (`null` when absent).
    pub fn optional<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&super::naive_utc(*t)),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_like_python_isoformat() {
        assert_eq!(naive_utc(UNIX_EPOCH), "1970-01-01T00:00:00");
        let t = UNIX_EPOCH + Duration::from_micros(1_795_936_941_845_137);
        assert_eq!(naive_utc(t), "2026-11-29T07:22:21.845137");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(naive_utc(leap), "2000-02-29T00:00:00");
    }
}
