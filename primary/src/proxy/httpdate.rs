//! HTTP dates (RFC 9110 §5.6.7): IMF-fixdate out; IMF-fixdate, RFC 850 and asctime in, as a
//! recipient must accept all three. Also the RFC 3339 timestamps of the request log.
//!
//! Pure arithmetic on seconds since the Unix epoch (proleptic Gregorian, UTC); no clock is read.

const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// Civil date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Day count since 1970-01-01 of a civil date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn split(secs: u64) -> (i64, u32, u32, u64, u64, u64, usize) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    (y, m, d, rem / 3600, rem % 3600 / 60, rem % 60, (days % 7) as usize)
}

/// `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn format(secs: u64) -> String {
    let (y, m, d, hh, mm, ss, wd) = split(secs);
    format!("{}, {d:02} {} {y:04} {hh:02}:{mm:02}:{ss:02} GMT", DAYS[wd], MONTHS[m as usize - 1])
}

/// `1994-11-06T08:49:37.123Z`, for the request log.
pub fn format_rfc3339_millis(millis: u64) -> String {
    let (y, m, d, hh, mm, ss, _) = split(millis / 1000);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{:03}Z", millis % 1000)
}

fn month(name: &str) -> Option<u32> {
    MONTHS.iter().position(|m| *m == name).map(|i| i as u32 + 1)
}

fn time_of_day(s: &str) -> Option<u64> {
    let mut it = s.split(':');
    let (h, m, sec) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || h.len() != 2 || m.len() != 2 || sec.len() != 2 {
        return None;
    }
    let (h, m, sec): (u64, u64, u64) = (h.parse().ok()?, m.parse().ok()?, sec.parse().ok()?);
    // 60 allows a leap second, as RFC 9110's grammar does.
    (h < 24 && m < 60 && sec <= 60).then_some(h * 3600 + m * 60 + sec)
}

fn to_secs(year: i64, month: u32, day: u32, tod: u64) -> Option<u64> {
    if !(1..=31).contains(&day) || year < 1970 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    // Reject 31 Feb and friends: the date must survive the round trip.
    if civil_from_days(days) != (year, month, day) {
        return None;
    }
    Some(days as u64 * 86_400 + tod)
}

/// Parses any of the three HTTP date formats; `None` for anything else (the caller then
/// ignores the header, as RFC 9110 §13.1.3 and §13.1.4 require).
pub fn parse(s: &str) -> Option<u64> {
    let s = s.trim();
    let parts: Vec<&str> = s.split_ascii_whitespace().collect();
    match parts.as_slice() {
        // IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
        [wd, d, mon, y, t, "GMT"] if wd.ends_with(',') && d.len() == 2 && y.len() == 4 => {
            to_secs(y.parse().ok()?, month(mon)?, d.parse().ok()?, time_of_day(t)?)
        }
        // RFC 850: Sunday, 06-Nov-94 08:49:37 GMT
        [wd, date, t, "GMT"] if wd.ends_with(',') => {
            let mut it = date.split('-');
            let (d, mon, y) = (it.next()?, it.next()?, it.next()?);
            if it.next().is_some() || d.len() != 2 || y.len() != 2 {
                return None;
            }
            let yy: i64 = y.parse().ok()?;
            // RFC 9110 §5.6.7: a two-digit year more than 50 years in the future is in the past century.
            let year = if yy < 70 { 2000 + yy } else { 1900 + yy };
            to_secs(year, month(mon)?, d.parse().ok()?, time_of_day(t)?)
        }
        // asctime: Sun Nov  6 08:49:37 1994
        [_wd, mon, d, t, y] if y.len() == 4 => to_secs(y.parse().ok()?, month(mon)?, d.parse().ok()?, time_of_day(t)?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_example_formats_and_parses_in_all_three_forms() {
        let t = 784_111_777;
        assert_eq!(format(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(parse("Sun, 06 Nov 1994 08:49:37 GMT"), Some(t));
        assert_eq!(parse("Sunday, 06-Nov-94 08:49:37 GMT"), Some(t));
        assert_eq!(parse("Sun Nov  6 08:49:37 1994"), Some(t));
    }

    #[test]
    fn round_trip_across_leap_years_and_epoch() {
        for t in [0u64, 951_782_400, 1_709_164_800, 4_102_444_799, 1_800_000_000] {
            assert_eq!(parse(&format(t)), Some(t), "{}", format(t));
        }
        assert_eq!(format(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
    }

    #[test]
    fn impossible_dates_and_garbage_are_refused() {
        for s in [
            "",
            "yesterday",
            "Sun, 31 Feb 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 CET",
        ] {
            assert_eq!(parse(s), None, "{s}");
        }
    }

    #[test]
    fn rfc3339_millis() {
        assert_eq!(format_rfc3339_millis(784_111_777_042), "1994-11-06T08:49:37.042Z");
    }
}
