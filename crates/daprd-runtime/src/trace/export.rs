//! Span export: a bounded queue between the request path and one background task that sends
//! batches to the configured exporters (Zipkin v2 JSON, OTLP over HTTP/protobuf, OTLP over
//! gRPC, stdout). A publish never waits for an exporter: when the queue is full the span is
//! dropped and counted, and the first drop is logged.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use tokio::sync::mpsc;

use super::otlp;

/// Spans waiting for export at most (beyond, new spans are dropped).
pub const QUEUE: usize = 2048;
/// Spans per export call at most.
const BATCH: usize = 512;
/// How long a span waits for its batch to fill.
const LINGER: Duration = Duration::from_secs(1);
/// Export timeout when the Configuration gives none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a span is to its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Dapr's API and delivery spans are CLIENT spans.
    Client,
    /// An incoming call.
    Server,
}

/// A finished span on its way out.
#[derive(Debug, Clone)]
pub struct FinishedSpan {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// The parent's span id (16 hex digits), if any.
    pub parent_span_id: Option<String>,
    /// W3C tracestate.
    pub tracestate: String,
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: SpanKind,
    /// Start.
    pub start: SystemTime,
    /// End.
    pub end: SystemTime,
    /// Attributes.
    pub attributes: Vec<(&'static str, String)>,
    /// Error description when the operation failed.
    pub error: Option<String>,
}

/// Where spans go.
#[derive(Debug, Clone)]
pub enum Sink {
    /// One log line per span.
    Stdout,
    /// Zipkin v2 JSON, `POST` to this URL.
    Zipkin(String),
    /// OTLP over HTTP/protobuf, `POST` to this URL (`.../v1/traces`).
    OtlpHttp {
        /// Full URL.
        url: String,
        /// Extra headers.
        headers: Vec<(String, String)>,
        /// Per-export timeout.
        timeout: Option<Duration>,
    },
    /// OTLP over gRPC to this `http://host:port`.
    OtlpGrpc {
        /// Endpoint URI.
        uri: String,
        /// Extra metadata.
        headers: Vec<(String, String)>,
        /// Per-export timeout.
        timeout: Option<Duration>,
    },
}

/// Starts the export task; spans sent to the returned queue are exported in batches.
pub fn spawn(sinks: Vec<Sink>, service: String) -> mpsc::Sender<FinishedSpan> {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(run(rx, sinks, service));
    tx
}

/// The system's root certificates (`SSL_CERT_FILE` / `SSL_CERT_DIR` where set), which
/// verify an `https` collector as Go daprd's exporters do.
fn verified_tls() -> Result<rustls::ClientConfig, String> {
    daprd_core::tls::PemMaterial::default()
        .client_config(false)
        .map_err(|e| format!("cannot set up TLS: {e}"))
}

/// The HTTP client of the Zipkin and OTLP/HTTP exporters (`https` verified by the system's
/// roots).
fn http_client() -> reqwest::Client {
    let client = verified_tls().and_then(|tls| {
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .map_err(|e| e.to_string())
    });
    client.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "trace export: TLS is not available; https collectors cannot be reached");
        reqwest::Client::new()
    })
}

/// The channel of an OTLP/gRPC sink, made once (tonic reconnects it when the collector comes
/// back): TLS verified by the system's roots for `https://`, plain HTTP/2 otherwise.
fn grpc_channel(uri: &str) -> Result<tonic::transport::Channel, String> {
    let Some(authority) = uri.strip_prefix("https://") else {
        return tonic::transport::Endpoint::from_shared(uri.to_string())
            .map(|e| e.connect_lazy())
            .map_err(|e| format!("{uri} is not a valid endpoint: {e}"));
    };
    let authority = authority.split('/').next().unwrap_or(authority);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{uri}: port {p} is not a number"))?,
        ),
        _ => (authority, 443),
    };
    crate::tls::grpc_channel(host, port, verified_tls()?).map_err(|e| e.to_string())
}

async fn run(mut rx: mpsc::Receiver<FinishedSpan>, sinks: Vec<Sink>, service: String) {
    let http = http_client();
    let channels: Vec<Option<Result<tonic::transport::Channel, String>>> = sinks
        .iter()
        .map(|s| match s {
            Sink::OtlpGrpc { uri, .. } => Some(grpc_channel(uri)),
            _ => None,
        })
        .collect();
    let mut failing = vec![false; sinks.len()];
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(s) => batch.push(s),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        for (i, sink) in sinks.iter().enumerate() {
            let to = Exporters {
                http: &http,
                grpc: channels[i].as_ref(),
            };
            match export(&to, sink, &service, &batch).await {
                Ok(()) if failing[i] => {
                    tracing::info!(exporter = sink.name(), "trace export works again");
                    failing[i] = false;
                }
                Ok(()) => {}
                Err(e) if !failing[i] => {
                    tracing::warn!(exporter = sink.name(), error = %e, spans = batch.len(), "trace export failed; spans dropped (logged once until it works again)");
                    failing[i] = true;
                }
                Err(e) => {
                    tracing::debug!(exporter = sink.name(), error = %e, spans = batch.len(), "trace export failed");
                }
            }
        }
    }
}

impl Sink {
    fn name(&self) -> &'static str {
        match self {
            Sink::Stdout => "stdout",
            Sink::Zipkin(_) => "zipkin",
            Sink::OtlpHttp { .. } => "otel http",
            Sink::OtlpGrpc { .. } => "otel grpc",
        }
    }
}

/// The clients an export goes through: the HTTP client, and the sink's gRPC channel.
struct Exporters<'a> {
    http: &'a reqwest::Client,
    grpc: Option<&'a Result<tonic::transport::Channel, String>>,
}

async fn export(
    to: &Exporters<'_>,
    sink: &Sink,
    service: &str,
    spans: &[FinishedSpan],
) -> Result<(), String> {
    match sink {
        Sink::Stdout => {
            for s in spans {
                tracing::info!(
                    trace_id = %s.trace_id, span_id = %s.span_id,
                    parent_span_id = s.parent_span_id.as_deref().unwrap_or(""),
                    name = %s.name, duration_us = duration(s).as_micros() as u64,
                    "span"
                );
            }
            Ok(())
        }
        Sink::Zipkin(url) => {
            let r = to
                .http
                .post(url)
                .timeout(DEFAULT_TIMEOUT)
                .json(&zipkin_json(service, spans))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            check_status(r.status())
        }
        Sink::OtlpHttp {
            url,
            headers,
            timeout,
        } => {
            let mut req = to
                .http
                .post(url)
                .timeout(timeout.unwrap_or(DEFAULT_TIMEOUT))
                .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                .body(otlp_request(service, spans).encode_to_vec());
            for (k, v) in headers {
                req = req.header(k, v);
            }
            let r = req.send().await.map_err(|e| e.to_string())?;
            check_status(r.status())
        }
        Sink::OtlpGrpc {
            headers, timeout, ..
        } => {
            let channel = match to.grpc {
                Some(Ok(c)) => c.clone(),
                Some(Err(e)) => return Err(e.clone()),
                None => return Err("no channel".into()),
            };
            let call = grpc_export(channel, headers, otlp_request(service, spans));
            tokio::time::timeout(timeout.unwrap_or(DEFAULT_TIMEOUT), call)
                .await
                .map_err(|_| "timed out".to_string())?
        }
    }
}

fn check_status(status: reqwest::StatusCode) -> Result<(), String> {
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the collector answered {status}"))
    }
}

async fn grpc_export(
    channel: tonic::transport::Channel,
    headers: &[(String, String)],
    msg: otlp::ExportTraceServiceRequest,
) -> Result<(), String> {
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.map_err(|e| e.to_string())?;
    let mut req = tonic::Request::new(msg);
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            k.to_ascii_lowercase()
                .parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
            v.parse(),
        ) {
            req.metadata_mut().insert(k, v);
        }
    }
    let path = http::uri::PathAndQuery::from_static(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    );
    let codec = tonic_prost::ProstCodec::<
        otlp::ExportTraceServiceRequest,
        otlp::ExportTraceServiceResponse,
    >::default();
    client
        .unary(req, path, codec)
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

fn duration(s: &FinishedSpan) -> Duration {
    s.end.duration_since(s.start).unwrap_or_default()
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Zipkin v2 JSON (`[{traceId, id, parentId, name, kind, timestamp, duration, ...}]`).
pub fn zipkin_json(service: &str, spans: &[FinishedSpan]) -> serde_json::Value {
    spans
        .iter()
        .map(|s| {
            let mut tags: serde_json::Map<String, serde_json::Value> = s
                .attributes
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.clone().into()))
                .collect();
            if let Some(e) = &s.error {
                tags.insert("error".into(), e.clone().into());
            }
            let mut span = serde_json::json!({
                "traceId": s.trace_id,
                "id": s.span_id,
                "name": s.name,
                "kind": match s.kind { SpanKind::Client => "CLIENT", SpanKind::Server => "SERVER" },
                "timestamp": micros(s.start),
                "duration": duration(s).as_micros().max(1) as u64,
                "localEndpoint": {"serviceName": service},
                "tags": tags,
            });
            if let Some(p) = &s.parent_span_id {
                span["parentId"] = p.clone().into();
            }
            span
        })
        .collect()
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// The OTLP export request for `spans` of `service`.
pub fn otlp_request(service: &str, spans: &[FinishedSpan]) -> otlp::ExportTraceServiceRequest {
    let spans = spans
        .iter()
        .map(|s| otlp::Span {
            trace_id: hex_bytes(&s.trace_id),
            span_id: hex_bytes(&s.span_id),
            trace_state: s.tracestate.clone(),
            parent_span_id: s
                .parent_span_id
                .as_deref()
                .map(hex_bytes)
                .unwrap_or_default(),
            name: s.name.clone(),
            kind: match s.kind {
                SpanKind::Server => 2,
                SpanKind::Client => 3,
            },
            start_time_unix_nano: nanos(s.start),
            end_time_unix_nano: nanos(s.end),
            attributes: s
                .attributes
                .iter()
                .map(|(k, v)| otlp::KeyValue::string(k, v))
                .collect(),
            status: Some(match &s.error {
                Some(e) => otlp::Status {
                    message: e.clone(),
                    code: 2,
                },
                None => otlp::Status {
                    message: String::new(),
                    code: 0,
                },
            }),
        })
        .collect();
    otlp::ExportTraceServiceRequest {
        resource_spans: vec![otlp::ResourceSpans {
            resource: Some(otlp::Resource {
                attributes: vec![otlp::KeyValue::string("service.name", service)],
            }),
            scope_spans: vec![otlp::ScopeSpans {
                scope: Some(otlp::InstrumentationScope {
                    name: "daprd-rs".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                spans,
            }],
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grpc_channels_for_each_scheme() {
        assert!(grpc_channel("http://127.0.0.1:4317").is_ok());
        assert!(grpc_channel("https://collector.example:4317").is_ok());
        assert!(grpc_channel("https://[::1]:4317").is_ok());
        assert!(grpc_channel("https://collector.example/v1").is_ok());
        let e = grpc_channel("https://c:x").unwrap_err();
        assert!(e.contains("port x is not a number"), "{e}");
        let e = grpc_channel("https://bad name:1").unwrap_err();
        assert!(e.contains("not a valid TLS server name"), "{e}");
    }
}
