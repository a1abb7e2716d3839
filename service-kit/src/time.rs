//! Wall-clock times as UTC text, for logs, file names and tools (no time-zone database, no
//! extra crate).

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds:
/// `2026-01-02T03:04:05.678Z`.
pub fn utc_millis(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

/// Like [`utc_millis`] without the milliseconds: `2026-01-02T03:04:05Z`.
pub fn utc_seconds(ms: i64) -> String {
    let full = utc_millis(ms);
    format!("{}Z", &full[..full.len() - 5])
}

/// Milliseconds since the Unix epoch now (0 if the clock is before 1970).
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_calendar_dates() {
        assert_eq!(utc_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_seconds(1_000), "1970-01-01T00:00:01Z");
        // A leap day.
        assert_eq!(utc_millis(1_709_210_096_789), "2024-02-29T12:34:56.789Z");
        assert_eq!(utc_seconds(1_709_210_096_789), "2024-02-29T12:34:56Z");
    }
}
