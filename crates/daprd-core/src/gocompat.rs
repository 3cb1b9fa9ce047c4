//! Go standard-library behaviour that Dapr's answers depend on, written once: URL path
//! cleaning (`path.Clean`), query unescaping (`url.QueryUnescape`), header-name
//! canonicalisation (`http.CanonicalHeaderKey`) and the two time layouts components read and
//! write (`time.RFC3339`, `http.TimeFormat`).

/// Go's `path.Clean` for an absolute URL path.
pub fn go_path_clean(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Go's `url.QueryUnescape`: `%XX` escapes and `+` for a space; `None` for a bad escape or
/// bytes that are not UTF-8.
pub fn query_unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Go's `url.QueryEscape`: unreserved bytes as they are, a space as `+`, the rest `%XX`.
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Go's `http.CanonicalHeaderKey`: `x-my-header` → `X-My-Header`; a key with a byte that is
/// not a token character is returned unchanged.
pub fn canonical_header(key: &str) -> String {
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        return key.to_string();
    }
    let mut upper = true;
    key.chars()
        .map(|c| {
            let out = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            out
        })
        .collect()
}

/// Milliseconds since the epoch of an RFC 3339 time (`Z` or a `±hh:mm` offset, as Go's
/// `time.RFC3339` reads it); `None` when it is not one.
pub fn parse_rfc3339_ms(v: &str) -> Option<i64> {
    let v = v.trim();
    if v.len() < 20 || v.as_bytes().get(10) != Some(&b'T') {
        return None;
    }
    let (base, offset_s) = if let Some(b) = v.strip_suffix('Z').or_else(|| v.strip_suffix('z')) {
        (b.to_string(), 0i64)
    } else {
        let (b, off) = v.split_at(v.len().checked_sub(6)?);
        let sign = match off.as_bytes().first()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let (h, m) = off.get(1..)?.split_once(':')?;
        let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
        (b.to_string(), sign * (h * 3600 + m * 60))
    };
    let t = humantime::parse_rfc3339(&format!("{base}Z")).ok()?;
    let ms = i64::try_from(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis()).ok()?;
    Some(ms - offset_s * 1000)
}

const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01: (year, month 1..=12, day 1..=31).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A time (milliseconds since the epoch) in Go's `http.TimeFormat`,
/// `Mon, 02 Jan 2006 15:04:05 GMT` (whole seconds, UTC).
pub fn format_http_date_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = WEEKDAYS[usize::try_from(days.rem_euclid(7)).unwrap_or(0)];
    let month = MONTHS[usize::try_from(m - 1).unwrap_or(0)];
    format!(
        "{weekday}, {d:02} {month} {y:04} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Milliseconds since the epoch of a time in Go's `http.TimeFormat` (the weekday is read but
/// not checked, as Go's `time.Parse` does not either); `None` when it is not one.
pub fn parse_http_date_ms(v: &str) -> Option<i64> {
    let mut parts = v.trim().split(' ');
    let weekday = parts.next()?.strip_suffix(',')?;
    if !WEEKDAYS.contains(&weekday) {
        return None;
    }
    let d: i64 = parts.next().filter(|d| d.len() == 2)?.parse().ok()?;
    let month = parts.next()?;
    let m = i64::try_from(MONTHS.iter().position(|n| *n == month)?).ok()? + 1;
    let y: i64 = parts.next().filter(|y| y.len() == 4)?.parse().ok()?;
    let clock: Vec<i64> = parts
        .next()?
        .split(':')
        .map(|p| if p.len() == 2 { p.parse().ok() } else { None })
        .collect::<Option<_>>()?;
    if parts.next()? != "GMT" || parts.next().is_some() || clock.len() != 3 {
        return None;
    }
    if !(1..=31).contains(&d) || clock[0] > 23 || clock[1] > 59 || clock[2] > 60 {
        return None;
    }
    let days = days_from_civil(y, m, d);
    Some((days * 86_400 + clock[0] * 3600 + clock[1] * 60 + clock[2]) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_escape_like_go() {
        assert_eq!(query_escape("a b/c?d=é~"), "a+b%2Fc%3Fd%3D%C3%A9~");
        assert_eq!(
            query_unescape(&query_escape("x y/é")).as_deref(),
            Some("x y/é")
        );
    }

    #[test]
    fn path_clean_like_go() {
        assert_eq!(go_path_clean("/v1.0//publish/ps/t/"), "/v1.0/publish/ps/t");
        assert_eq!(
            go_path_clean("/v1.0/publish/ps/./a/../b"),
            "/v1.0/publish/ps/b"
        );
        assert_eq!(go_path_clean("/"), "/");
        assert_eq!(go_path_clean("/a/%2F/b"), "/a/%2F/b");
    }

    #[test]
    fn unescape_like_go_query_unescape() {
        assert_eq!(query_unescape("a%2Fb+c%23").as_deref(), Some("a/b c#"));
        assert_eq!(query_unescape("%zz"), None);
        assert_eq!(query_unescape("%4"), None);
    }

    #[test]
    fn canonical_header_names_like_go() {
        assert_eq!(canonical_header("pubsubName"), "Pubsubname");
        assert_eq!(canonical_header("x-my-header"), "X-My-Header");
        assert_eq!(canonical_header("__key"), "__key");
        assert_eq!(canonical_header("with space"), "with space");
    }

    #[test]
    fn go_time_layouts_round_trip() {
        // 2009-11-10T23:00:00Z, Go's playground time, a Tuesday
        let ms = 1_257_894_000_000;
        assert_eq!(format_http_date_ms(ms), "Tue, 10 Nov 2009 23:00:00 GMT");
        assert_eq!(
            parse_http_date_ms("Tue, 10 Nov 2009 23:00:00 GMT"),
            Some(ms)
        );
        assert_eq!(parse_rfc3339_ms("2009-11-10T23:00:00Z"), Some(ms));
        assert_eq!(parse_rfc3339_ms("2009-11-11T01:00:00+02:00"), Some(ms));
        assert_eq!(format_http_date_ms(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            format_http_date_ms(951_782_400_000),
            "Tue, 29 Feb 2000 00:00:00 GMT"
        );
        for bad in [
            "",
            "Tue 10 Nov 2009 23:00:00 GMT",
            "Tue, 10 Nov 2009 23:00:00",
            "Tue, 32 Nov 2009 23:00:00 GMT",
            "Tue, 10 Nox 2009 23:00:00 GMT",
        ] {
            assert_eq!(parse_http_date_ms(bad), None, "{bad:?}");
        }
        assert_eq!(parse_rfc3339_ms("2009-11-10 23:00:00Z"), None);
    }
}
