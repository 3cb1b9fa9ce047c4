//! Go `time.ParseDuration` compatible parsing (`"1h30m"`, `"250ms"`, `"-5s"`).

use std::time::Duration;

/// A duration string that Go would reject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {0:?}")]
pub struct InvalidDuration(pub String);

/// Parses a Go duration. Returns the magnitude and whether it was negative.
///
/// # Errors
/// [`InvalidDuration`] when the text is not a Go duration (a bare number other than `0`
/// needs a unit, as in Go).
pub fn parse_go_duration_signed(text: &str) -> Result<(Duration, bool), InvalidDuration> {
    let bad = || InvalidDuration(text.to_string());
    let mut s = text;
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok((Duration::ZERO, negative));
    }
    if s.is_empty() {
        return Err(bad());
    }
    let mut total_nanos: f64 = 0.0;
    while !s.is_empty() {
        let num_end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_end == 0 {
            return Err(bad());
        }
        let number: f64 = s[..num_end].parse().map_err(|_| bad())?;
        s = &s[num_end..];
        let unit_end = s
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(s.len());
        let scale = match &s[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad()),
        };
        total_nanos += number * scale;
        s = &s[unit_end..];
    }
    if !total_nanos.is_finite() || total_nanos > u64::MAX as f64 {
        return Err(bad());
    }
    Ok((Duration::from_nanos(total_nanos as u64), negative))
}

/// Parses a non-negative Go duration; a negative one is an error.
///
/// # Errors
/// [`InvalidDuration`] when the text is not a Go duration or is negative.
pub fn parse_go_duration(text: &str) -> Result<Duration, InvalidDuration> {
    match parse_go_duration_signed(text)? {
        (d, false) => Ok(d),
        (d, true) if d.is_zero() => Ok(d),
        _ => Err(InvalidDuration(text.to_string())),
    }
}

/// Formats a duration the way Go's `Duration.String()` does for whole units
/// (`5s`, `500ms`, `1m30s`).
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    if nanos < 1_000_000_000 {
        return if nanos.is_multiple_of(1_000_000) {
            format!("{}ms", nanos / 1_000_000)
        } else if nanos.is_multiple_of(1_000) {
            format!("{}µs", nanos / 1_000)
        } else {
            format!("{nanos}ns")
        };
    }
    let total_secs = d.as_secs();
    let frac = d.subsec_nanos();
    let (h, m, s) = (total_secs / 3600, (total_secs / 60) % 60, total_secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if frac == 0 {
        out.push_str(&format!("{s}s"));
    } else {
        let f = format!("{:09}", frac);
        out.push_str(&format!("{s}.{}s", f.trim_end_matches('0')));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_forms() {
        assert_eq!(parse_go_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(
            parse_go_duration("1h30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_go_duration("250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_go_duration("1.5s").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_go_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_go_duration("10us").unwrap(),
            Duration::from_micros(10)
        );
        assert_eq!(
            parse_go_duration_signed("-3s").unwrap(),
            (Duration::from_secs(3), true)
        );
    }

    #[test]
    fn rejects_non_go_forms() {
        for bad in ["", "10", "s", "5x", "1h-5m", "--1s", "abc", "5 s"] {
            assert!(
                parse_go_duration(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
        assert!(parse_go_duration("-1s").is_err());
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format_go_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_go_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_go_duration(Duration::from_secs(3600)), "1h0m0s");
    }
}
