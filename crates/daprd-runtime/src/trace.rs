//! W3C trace context and spans: the span daprd starts for each publish and each delivery,
//! continuing the caller's `traceparent` when there is one, and the [`Tracer`] that samples
//! them (parent-based trace-id ratio, the Configuration's `tracing.samplingRate`) and hands
//! recorded spans to the exporters ([`export`]).

pub mod export;
pub mod otlp;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::config::configuration::{OtelProtocol, Tracing};
use export::{FinishedSpan, Sink, SpanKind};

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

/// Samples spans and queues the recorded ones for export.
pub struct Tracer {
    rate: f64,
    queue: Option<tokio::sync::mpsc::Sender<FinishedSpan>>,
    dropped: AtomicU64,
}

/// A span in progress.
#[derive(Debug, Clone)]
pub struct ActiveSpan {
    /// Its context (what goes into `traceparent`).
    pub ctx: SpanContext,
    parent: Option<String>,
    start: SystemTime,
    record: bool,
}

impl Tracer {
    /// A tracer that records nothing (spans still carry the caller's context on).
    pub fn off() -> Self {
        Self {
            rate: 0.0,
            queue: None,
            dropped: AtomicU64::new(0),
        }
    }

    /// The tracer `tracing` describes for `service` (the app id); starts the export task
    /// when spans can be recorded (a rate above 0 and an exporter).
    pub fn new(tracing: &Tracing, service: &str) -> Self {
        let sinks = sinks(tracing);
        let queue = (tracing.sampling_rate > 0.0 && !sinks.is_empty())
            .then(|| export::spawn(sinks, service.to_string()));
        Self {
            rate: tracing.sampling_rate,
            queue,
            dropped: AtomicU64::new(0),
        }
    }

    /// Starts a span: a child of the incoming context when valid (sampled as its parent),
    /// else a new root sampled by trace-id ratio.
    pub fn start(&self, traceparent: Option<&str>, tracestate: Option<&str>) -> ActiveSpan {
        let parent = traceparent.and_then(parse_traceparent);
        let (ctx, parent_id) = match parent {
            Some((trace_id, parent_id, flags)) => (
                SpanContext {
                    trace_id,
                    span_id: random_hex(16),
                    flags: flags & 1,
                    tracestate: tracestate.unwrap_or("").to_string(),
                },
                Some(parent_id),
            ),
            None => {
                let trace_id = random_hex(32);
                let sampled = ratio_sampled(&trace_id, self.rate);
                (
                    SpanContext {
                        trace_id,
                        span_id: random_hex(16),
                        flags: u8::from(sampled),
                        tracestate: String::new(),
                    },
                    None,
                )
            }
        };
        ActiveSpan {
            record: self.queue.is_some() && ctx.flags & 1 == 1,
            ctx,
            parent: parent_id,
            start: SystemTime::now(),
        }
    }

    /// Ends `span`, queueing it for export when it is recorded.
    pub fn end(
        &self,
        span: ActiveSpan,
        name: String,
        attributes: Vec<(&'static str, String)>,
        error: Option<String>,
    ) {
        let (true, Some(queue)) = (span.record, &self.queue) else {
            return;
        };
        let finished = FinishedSpan {
            trace_id: span.ctx.trace_id,
            span_id: span.ctx.span_id,
            parent_span_id: span.parent,
            tracestate: span.ctx.tracestate,
            name,
            kind: SpanKind::Client,
            start: span.start,
            end: SystemTime::now(),
            attributes,
            error,
        };
        if queue.try_send(finished).is_err() && self.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                queue = export::QUEUE,
                "trace export queue full: spans are dropped (counted; logged once)"
            );
        }
    }

    /// Spans dropped because the export queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl ActiveSpan {
    /// Whether the span will be exported.
    pub fn is_recorded(&self) -> bool {
        self.record
    }
}

/// OpenTelemetry's trace-id ratio rule: the low 8 bytes of the id, shifted right once,
/// below `rate` × 2^63.
fn ratio_sampled(trace_id: &str, rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    if rate >= 1.0 {
        return true;
    }
    let low = trace_id
        .get(16..32)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(u64::MAX);
    ((low >> 1) as f64) < rate * (1u64 << 63) as f64
}

/// The exporters `tracing` names.
fn sinks(tracing: &Tracing) -> Vec<Sink> {
    let mut out = Vec::new();
    if tracing.stdout {
        out.push(Sink::Stdout);
    }
    if let Some(url) = &tracing.zipkin_endpoint {
        out.push(Sink::Zipkin(url.clone()));
    }
    if let Some(otel) = &tracing.otel {
        let scheme = if otel.is_secure { "https" } else { "http" };
        let base = if otel.endpoint.contains("://") {
            otel.endpoint.clone()
        } else {
            format!("{scheme}://{}", otel.endpoint)
        };
        match otel.protocol {
            OtelProtocol::Http => {
                let has_path = base
                    .split_once("://")
                    .and_then(|(_, rest)| rest.split_once('/'))
                    .is_some_and(|(_, path)| !path.is_empty());
                let url = if has_path {
                    base
                } else {
                    format!("{}/v1/traces", base.trim_end_matches('/'))
                };
                out.push(Sink::OtlpHttp {
                    url,
                    headers: otel.headers.clone(),
                    timeout: otel.timeout,
                });
            }
            OtelProtocol::Grpc => out.push(Sink::OtlpGrpc {
                uri: base,
                headers: otel.headers.clone(),
                timeout: otel.timeout,
            }),
        }
    }
    out
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
        let s = Tracer::off().start(Some(tp), Some("congo=t61rcWkgMzE")).ctx;
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
            let s = Tracer::off().start(Some(bad), Some("x=y")).ctx;
            assert_eq!(s.flags, 0, "{bad}");
            assert_eq!(s.tracestate, "");
            assert!(parse_traceparent(&s.traceparent()).is_some());
        }
    }

    #[test]
    fn ratio_sampling_follows_the_rate() {
        let n = 4000;
        let ids: Vec<String> = (0..n).map(|_| random_hex(32)).collect();
        let count = |rate| ids.iter().filter(|id| ratio_sampled(id, rate)).count();
        assert_eq!(count(0.0), 0);
        assert_eq!(count(1.0), n);
        let half = count(0.5);
        assert!((1700..2300).contains(&half), "{half} of {n} at 0.5");
    }

    #[test]
    fn a_span_is_recorded_only_when_sampled_and_exported() {
        let off = Tracer::off();
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let s = off.start(Some(tp), None);
        assert!(!s.is_recorded(), "no exporter");
        assert_eq!(s.ctx.flags, 1, "the caller's sampled flag is carried on");
        let root = off.start(None, None);
        assert_eq!(root.ctx.flags, 0, "rate 0 samples no root");
    }

    #[test]
    fn otel_endpoints_become_urls() {
        use crate::config::configuration::Otel;
        let t = |endpoint: &str, protocol, is_secure| Tracing {
            otel: Some(Otel {
                endpoint: endpoint.into(),
                protocol,
                is_secure,
                headers: vec![],
                timeout: None,
            }),
            ..Tracing::default()
        };
        match &sinks(&t("localhost:4318", OtelProtocol::Http, false))[..] {
            [Sink::OtlpHttp { url, .. }] => assert_eq!(url, "http://localhost:4318/v1/traces"),
            other => panic!("{other:?}"),
        }
        match &sinks(&t("https://c:4318/custom", OtelProtocol::Http, false))[..] {
            [Sink::OtlpHttp { url, .. }] => assert_eq!(url, "https://c:4318/custom"),
            other => panic!("{other:?}"),
        }
        match &sinks(&t("localhost:4317", OtelProtocol::Grpc, false))[..] {
            [Sink::OtlpGrpc { uri, .. }] => assert_eq!(uri, "http://localhost:4317"),
            other => panic!("{other:?}"),
        }
        match &sinks(&t("localhost:4317", OtelProtocol::Grpc, true))[..] {
            [Sink::OtlpGrpc { uri, .. }] => assert_eq!(uri, "https://localhost:4317"),
            other => panic!("{other:?}"),
        }
    }
}
