//! HTTP dates (RFC 9110 §5.6.7): recipients accept IMF-fixdate and the two obsolete formats
//! (RFC 850 and asctime); everything quicar writes is IMF-fixdate. Strict: a date with extra
//! spaces or a wrong weekday name is invalid (an invalid `Expires` means "already stale").

use std::time::{Duration, SystemTime};

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const LONG_DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Parses an HTTP-date in any of the three formats.
pub(crate) fn parse(s: &str) -> Option<SystemTime> {
    imf_fixdate(s).or_else(|| rfc850(s)).or_else(|| asctime(s))
}

/// Formats as IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
pub(crate) fn format(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let days = (secs / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = DAYS[((days + 3).rem_euclid(7)) as usize];
    let rem = secs % 86_400;
    format!(
        "{weekday}, {d:02} {} {y:04} {:02}:{:02}:{:02} GMT",
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn imf_fixdate(s: &str) -> Option<SystemTime> {
    // Sun, 06 Nov 1994 08:49:37 GMT
    let b = s.as_bytes();
    if b.len() != 29 || &s[3..5] != ", " || s[7..8] != *" " || s[11..12] != *" " {
        return None;
    }
    if s[16..17] != *" " || s[25..] != *" GMT" {
        return None;
    }
    let wd = DAYS.iter().position(|d| *d == &s[..3])?;
    let day = digits(&s[5..7])?;
    let month = month(&s[8..11])?;
    let year = digits(&s[12..16])?;
    let t = time_of_day(&s[17..25])?;
    build(year, month, day, t, Some(wd))
}

fn rfc850(s: &str) -> Option<SystemTime> {
    // Sunday, 06-Nov-94 08:49:37 GMT
    let (wd, rest) = s.split_once(", ")?;
    let wd = LONG_DAYS.iter().position(|d| *d == wd)?;
    if rest.len() != 22 || &rest[2..3] != "-" || &rest[6..7] != "-" || &rest[9..10] != " " {
        return None;
    }
    if &rest[18..] != " GMT" {
        return None;
    }
    let day = digits(&rest[..2])?;
    let month = month(&rest[3..6])?;
    let yy = digits(&rest[7..9])?;
    // RFC 9110: a two-digit year more than 50 years in the future is in the past century.
    let now_year = civil_from_days(
        (SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            / 86_400) as i64,
    )
    .0 as u64;
    let mut year = now_year / 100 * 100 + yy;
    if year > now_year + 50 {
        year -= 100;
    }
    let t = time_of_day(&rest[10..18])?;
    build(year, month, day, t, Some(wd))
}

fn asctime(s: &str) -> Option<SystemTime> {
    // Sun Nov  6 08:49:37 1994
    if s.len() != 24 || &s[3..4] != " " || &s[7..8] != " " || &s[10..11] != " " {
        return None;
    }
    if &s[19..20] != " " {
        return None;
    }
    let wd = DAYS.iter().position(|d| *d == &s[..3])?;
    let month = month(&s[4..7])?;
    let day = digits(s[8..10].trim_start()).filter(|_| s.as_bytes()[9].is_ascii_digit())?;
    let t = time_of_day(&s[11..19])?;
    let year = digits(&s[20..24])?;
    build(year, month, day, t, Some(wd))
}

fn digits(s: &str) -> Option<u64> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

fn month(s: &str) -> Option<u64> {
    MONTHS.iter().position(|m| *m == s).map(|i| i as u64 + 1)
}

fn time_of_day(s: &str) -> Option<u64> {
    if s.len() != 8 || &s[2..3] != ":" || &s[5..6] != ":" {
        return None;
    }
    let (h, m, sec) = (digits(&s[..2])?, digits(&s[3..5])?, digits(&s[6..8])?);
    (h < 24 && m < 60 && sec < 61).then_some(h * 3600 + m * 60 + sec.min(59))
}

fn build(year: u64, month: u64, day: u64, tod: u64, weekday: Option<usize>) -> Option<SystemTime> {
    if !(1..=31).contains(&day) || year < 1970 {
        return None;
    }
    let days = days_from_civil(year as i64, month as i64, day as i64);
    let (y, m, d) = civil_from_days(days);
    if (y as u64, m as u64, d as u64) != (year, month, day) {
        return None; // 31 Feb and friends
    }
    if let Some(wd) = weekday {
        if (days + 3).rem_euclid(7) as usize != wd {
            return None;
        }
    }
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(days as u64 * 86_400 + tod))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_formats_parse_to_the_same_instant() {
        let want = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse("Sun, 06 Nov 1994 08:49:37 GMT"), Some(want));
        assert_eq!(parse("Sunday, 06-Nov-94 08:49:37 GMT"), Some(want));
        assert_eq!(parse("Sun Nov  6 08:49:37 1994"), Some(want));
        assert_eq!(format(want), "Sun, 06 Nov 1994 08:49:37 GMT");
    }

    #[test]
    fn invalid_dates_do_not_parse() {
        for bad in [
            "Thu, 18  Aug  2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 02:01:18 +0000",
            "Mon, 06 Nov 1994 08:49:37 GMT",
            "Sun, 31 Feb 1994 08:49:37 GMT",
            "0",
            "",
            "Sun, 06 Nov 1994 25:49:37 GMT",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        let t = parse("Thu, 18 Aug 2050 02:01:18 GMT").unwrap();
        assert_eq!(format(t), "Thu, 18 Aug 2050 02:01:18 GMT");
    }
}
