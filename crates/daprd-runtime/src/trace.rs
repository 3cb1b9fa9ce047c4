//! W3C trace context: the producer span daprd starts for each publish, continuing the
//! caller's `traceparent` when there is one. (No exporter: daprd-rs writes the context
//! into envelopes; sampling follows the parent, else "not sampled", like Dapr's default
//! rate of 0.0001.)

/// A span context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanContext {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits.
    pub span_id: String,
    /// Trace flags (`01` sampled).
    pub flags: u8,
    /// W3C tracestate, passed through.
    pub tracestate: String,
}

impl SpanContext {
    /// `00-<trace>-<span>-<flags>`.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags)
    }
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses a W3C `traceparent` (version 00 rules; future versions accept extra fields).
pub fn parse_traceparent(value: &str) -> Option<(String, String, u8)> {
    let value = value.trim();
    let mut parts = value.split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    if !is_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !is_hex(trace, 32) || trace.bytes().all(|b| b == b'0') {
        return None;
    }
    if !is_hex(span, 16) || span.bytes().all(|b| b == b'0') {
        return None;
    }
    if !is_hex(flags, 2) {
        return None;
    }
    Some((
        trace.to_string(),
        span.to_string(),
        u8::from_str_radix(flags, 16).ok()?,
    ))
}

/// A random (version 4) UUID for CloudEvent ids, from the thread-local PRNG: an id only
/// needs to be unique, and `Uuid::new_v4` costs a `getrandom` system call per event.
pub fn random_uuid() -> String {
    uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes())
        .into_uuid()
        .to_string()
}

/// `digits` random lowercase hex digits, never all zero (W3C forbids all-zero ids).
fn random_hex(digits: usize) -> String {
    loop {
        let s = match digits {
            16 => format!("{:016x}", fastrand::u64(..)),
            _ => format!("{:032x}", fastrand::u128(..)),
        };
        if !s.bytes().all(|b| b == b'0') {
            return s;
        }
    }
}

/// Starts a producer span: a child of the incoming context if valid, else a new root.
pub fn start_span(traceparent: Option<&str>, tracestate: Option<&str>) -> SpanContext {
    match traceparent.and_then(parse_traceparent) {
        Some((trace_id, _parent, flags)) => SpanContext {
            trace_id,
            span_id: random_hex(16),
            flags: flags & 1,
            tracestate: tracestate.unwrap_or("").to_string(),
        },
        None => SpanContext {
            trace_id: random_hex(32),
            span_id: random_hex(16),
            flags: 0,
            tracestate: String::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_uuids_are_v4_and_distinct() {
        let ids: std::collections::BTreeSet<String> = (0..1000).map(|_| random_uuid()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 4, "{id}");
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
    }

    #[test]
    fn continues_incoming_trace() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let s = start_span(Some(tp), Some("congo=t61rcWkgMzE"));
        assert_eq!(s.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_ne!(s.span_id, "b7ad6b7169203331");
        assert_eq!(s.flags, 1);
        assert_eq!(s.tracestate, "congo=t61rcWkgMzE");
        assert!(parse_traceparent(&s.traceparent()).is_some());
    }

    #[test]
    fn invalid_incoming_starts_a_new_trace() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            let s = start_span(Some(bad), Some("x=y"));
            assert_eq!(s.flags, 0, "{bad}");
            assert_eq!(s.tracestate, "");
            assert!(parse_traceparent(&s.traceparent()).is_some());
        }
    }
}
