//! The OTLP trace messages daprd-rs sends (`opentelemetry/proto/collector/trace/v1`,
//! `trace/v1`, `common/v1`, `resource/v1`), declared with the field numbers of the published
//! `.proto` files; only the fields written are declared.

/// `ExportTraceServiceRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceRequest {
    /// `resource_spans`.
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

/// `ExportTraceServiceResponse` (its partial-success details are not read).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceResponse {}

/// `ResourceSpans`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceSpans {
    /// `resource`.
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    /// `scope_spans`.
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
}

/// `Resource`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    /// `attributes`.
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

/// `ScopeSpans`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeSpans {
    /// `scope`.
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    /// `spans`.
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<Span>,
}

/// `InstrumentationScope`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InstrumentationScope {
    /// `name`.
    #[prost(string, tag = "1")]
    pub name: String,
    /// `version`.
    #[prost(string, tag = "2")]
    pub version: String,
}

/// `Span`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Span {
    /// `trace_id` (16 bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    /// `span_id` (8 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    /// `trace_state`.
    #[prost(string, tag = "3")]
    pub trace_state: String,
    /// `parent_span_id` (empty for a root).
    #[prost(bytes = "vec", tag = "4")]
    pub parent_span_id: Vec<u8>,
    /// `name`.
    #[prost(string, tag = "5")]
    pub name: String,
    /// `kind` (`SPAN_KIND_SERVER` 2, `SPAN_KIND_CLIENT` 3).
    #[prost(int32, tag = "6")]
    pub kind: i32,
    /// `start_time_unix_nano`.
    #[prost(fixed64, tag = "7")]
    pub start_time_unix_nano: u64,
    /// `end_time_unix_nano`.
    #[prost(fixed64, tag = "8")]
    pub end_time_unix_nano: u64,
    /// `attributes`.
    #[prost(message, repeated, tag = "9")]
    pub attributes: Vec<KeyValue>,
    /// `status`.
    #[prost(message, optional, tag = "15")]
    pub status: Option<Status>,
}

/// `Status`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    /// `message`.
    #[prost(string, tag = "2")]
    pub message: String,
    /// `code` (0 unset, 1 ok, 2 error).
    #[prost(int32, tag = "3")]
    pub code: i32,
}

/// `KeyValue` with a string value (the only kind daprd-rs writes).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// `key`.
    #[prost(string, tag = "1")]
    pub key: String,
    /// `value`.
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

/// `AnyValue` holding `string_value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyValue {
    /// `string_value`.
    #[prost(string, tag = "1")]
    pub string_value: String,
}

impl KeyValue {
    /// A string attribute.
    pub fn string(key: &str, value: &str) -> Self {
        Self {
            key: key.to_string(),
            value: Some(AnyValue {
                string_value: value.to_string(),
            }),
        }
    }
}
