//! The CloudEvent envelope daprd wraps published data in (Dapr's `NewCloudEvent`,
//! `FromCloudEvent` and `ApplyMetadata` behaviour), built without I/O: the caller
//! supplies the id generator's output, the clock and the trace context.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::duration::parse_go_duration_signed;
use crate::json;

/// Event type daprd uses when none is given.
pub const DEFAULT_TYPE: &str = "com.dapr.event.sent";
/// Event type of a bulk delivery.
pub const DEFAULT_BULK_TYPE: &str = "com.dapr.event.sent.bulk";
/// Source used when none is given and no app id is known.
pub const DEFAULT_SOURCE: &str = "Dapr";
/// CloudEvents spec version.
pub const SPEC_VERSION: &str = "1.0";
/// Content type assumed when the publisher gives none.
pub const DEFAULT_DATA_CONTENT_TYPE: &str = "text/plain";

/// Why an envelope could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CloudEventError {
    /// A body sent as `application/cloudevents+json` is not a JSON object.
    #[error("body is not a cloudevent json object: {0}")]
    NotAnObject(String),
    /// The envelope could not be encoded as JSON.
    #[error("cloudevent envelope cannot be encoded: {0}")]
    Encode(String),
}

/// True when `content_type` (ignoring parameters, any case) is `expected`.
pub fn is_content_type(content_type: &str, expected: &str) -> bool {
    let lower = content_type.to_ascii_lowercase();
    let base = lower.split(';').next().unwrap_or("");
    lower == expected || (lower.contains(';') && base == expected)
}

/// `application/cloudevents+json`.
pub fn is_cloudevent_content_type(ct: &str) -> bool {
    is_content_type(ct, "application/cloudevents+json")
}

/// `application/json`.
pub fn is_json_content_type(ct: &str) -> bool {
    is_content_type(ct, "application/json")
}

/// `text/*` or `application/xml`.
pub fn is_string_content_type(ct: &str) -> bool {
    ct.to_ascii_lowercase().starts_with("text/") || is_content_type(ct, "application/xml")
}

/// `application/octet-stream`.
pub fn is_binary_content_type(ct: &str) -> bool {
    is_content_type(ct, "application/octet-stream")
}

/// `application/cloudevents+protobuf`, or `application/x-protobuf` whose bytes parse as a
/// protobuf CloudEvent (a message whose fields 1–4, id/source/spec_version/type, are strings).
pub fn is_cloudevent_protobuf(ct: &str, data: &[u8]) -> bool {
    if is_content_type(ct, "application/cloudevents+protobuf") {
        return true;
    }
    is_content_type(ct, "application/x-protobuf") && looks_like_protobuf_cloudevent(data)
}

fn looks_like_protobuf_cloudevent(mut data: &[u8]) -> bool {
    fn varint(data: &mut &[u8]) -> Option<u64> {
        let mut out = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = data.split_first()?;
            *data = rest;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(out);
            }
        }
        None
    }
    while !data.is_empty() {
        let Some(key) = varint(&mut data) else {
            return false;
        };
        let (field, wire) = (key >> 3, key & 7);
        if field == 0 {
            return false;
        }
        match wire {
            0 => {
                if varint(&mut data).is_none() {
                    return false;
                }
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                if data.len() < n {
                    return false;
                }
                data = &data[n..];
            }
            2 => {
                let Some(len) = varint(&mut data) else {
                    return false;
                };
                let Ok(len) = usize::try_from(len) else {
                    return false;
                };
                if data.len() < len {
                    return false;
                }
                if (1..=4).contains(&field) && std::str::from_utf8(&data[..len]).is_err() {
                    return false;
                }
                data = &data[len..];
            }
            _ => return false,
        }
    }
    true
}

/// Decodes the first JSON value of `data`, keeping numbers exact (Go's
/// `Decoder.UseNumber().Decode`: trailing bytes after the first value are ignored).
pub fn decode_first_json(data: &[u8]) -> Option<Value> {
    serde_json::Deserializer::from_slice(data)
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok)
}

/// The inputs of a new envelope.
#[derive(Debug, Clone)]
pub struct EnvelopeRequest<'a> {
    /// Publishing app id (default `source`).
    pub source: &'a str,
    /// Topic as given by the caller.
    pub topic: &'a str,
    /// Component name.
    pub pubsub_name: &'a str,
    /// Content type of `data` (empty → `text/plain`).
    pub data_content_type: &'a str,
    /// The published body.
    pub data: &'a [u8],
    /// W3C traceparent of the producer span (may be empty).
    pub traceparent: &'a str,
    /// W3C tracestate of the producer span (may be empty).
    pub tracestate: &'a str,
    /// Request metadata (for `cloudevent.*` overrides).
    pub metadata: Option<&'a BTreeMap<String, String>>,
    /// Fresh id used when the caller gives none.
    pub new_id: &'a str,
    /// The current time.
    pub now: SystemTime,
}

fn override_of<'m>(md: Option<&'m BTreeMap<String, String>>, field: &str) -> Option<&'m str> {
    const PREFIX: &[u8] = b"cloudevent.";
    md?.iter()
        .find(|(k, _)| {
            let k = k.as_bytes();
            k.len() == PREFIX.len() + field.len()
                && k[..PREFIX.len()].eq_ignore_ascii_case(PREFIX)
                && k[PREFIX.len()..].eq_ignore_ascii_case(field.as_bytes())
        })
        .map(|(_, v)| v.as_str())
}

/// The attributes of a new envelope, resolved from the request and its `cloudevent.*`
/// overrides.
struct Attributes<'a> {
    id: &'a str,
    source: &'a str,
    ty: &'a str,
    subject: &'a str,
    trace: &'a str,
    tracestate: &'a str,
    content_type: &'a str,
}

impl<'a> Attributes<'a> {
    fn of(req: &EnvelopeRequest<'a>) -> Self {
        let md = req.metadata;
        // An override may set a field to "" on purpose; Go then falls back to the default.
        let pick = |field: &str, default: &'a str| -> &'a str {
            match override_of(md, field) {
                Some(v) if !v.is_empty() => v,
                _ => default,
            }
        };
        let source = match override_of(md, "source").unwrap_or(req.source) {
            "" => DEFAULT_SOURCE,
            s => s,
        };
        let trace = override_of(md, "traceparent")
            .filter(|v| !v.is_empty())
            .or_else(|| override_of(md, "traceid"))
            .unwrap_or(req.traceparent);
        Self {
            id: pick("id", req.new_id),
            source,
            ty: pick("type", DEFAULT_TYPE),
            subject: override_of(md, "subject").unwrap_or(""),
            trace,
            tracestate: override_of(md, "tracestate").unwrap_or(req.tracestate),
            content_type: match req.data_content_type {
                "" => DEFAULT_DATA_CONTENT_TYPE,
                ct => ct,
            },
        }
    }
}

/// RFC 3339 with second precision in UTC, as daprd writes `time` and `expiration`. A time
/// past the last second of year 9999 (a huge TTL) is written as that second: RFC 3339 has four
/// year digits.
pub fn format_time(t: SystemTime) -> String {
    // 9999-12-31T23:59:59Z
    const LAST: Duration = Duration::from_secs(253_402_300_799);
    let last = SystemTime::UNIX_EPOCH + LAST;
    humantime::format_rfc3339_seconds(t.min(last)).to_string()
}

/// Builds the envelope for a publish: wraps `req.data`, or, when the content type is
/// `application/cloudevents+json`, completes the caller's own CloudEvent.
///
/// # Errors
/// [`CloudEventError::NotAnObject`] when a CloudEvent body is not a JSON object.
pub fn new_envelope(req: &EnvelopeRequest<'_>) -> Result<Map<String, Value>, CloudEventError> {
    if is_cloudevent_content_type(req.data_content_type) {
        return from_cloudevent(req);
    }
    let a = Attributes::of(req);
    let mut ce = Map::new();
    ce.insert("id".into(), a.id.into());
    ce.insert("specversion".into(), SPEC_VERSION.into());
    ce.insert("datacontenttype".into(), a.content_type.into());
    ce.insert("source".into(), a.source.into());
    ce.insert("type".into(), a.ty.into());
    ce.insert("topic".into(), req.topic.into());
    ce.insert("pubsubname".into(), req.pubsub_name.into());
    ce.insert("traceid".into(), a.trace.into());
    ce.insert("traceparent".into(), a.trace.into());
    ce.insert("tracestate".into(), a.tracestate.into());
    ce.insert("time".into(), format_time(req.now).into());
    let (field, value) = embed_data(a.content_type, req.data);
    ce.insert(field.into(), value);
    if !a.subject.is_empty() {
        ce.insert("subject".into(), a.subject.into());
    }
    Ok(ce)
}

/// The envelope of a publish as the bytes Go daprd puts on the broker: [`new_envelope`], then
/// [`apply_ttl`], then Go's JSON encoding ([`json::to_vec_go`]). For every content type but
/// `application/cloudevents+json` it is written in one pass, without a JSON tree (a JSON body
/// goes through [`json::reencode_go`]); the tests hold it to the tree's bytes.
///
/// # Errors
/// [`CloudEventError::NotAnObject`] when a CloudEvent body is not a JSON object;
/// [`CloudEventError::Encode`] when the envelope cannot be encoded.
pub fn envelope_bytes(
    req: &EnvelopeRequest<'_>,
    component_handles_ttl: bool,
) -> Result<Vec<u8>, CloudEventError> {
    let md = req.metadata;
    let expiration = (!component_handles_ttl)
        .then(|| md.and_then(ttl_from_metadata))
        .flatten()
        .map(|ttl| format_time(expiry(req.now, ttl)));
    if is_cloudevent_content_type(req.data_content_type) {
        let mut ce = from_cloudevent(req)?;
        if let Some(at) = expiration {
            ce.insert("expiration".into(), at.into());
        }
        return json::to_vec_go(&ce).map_err(|e| CloudEventError::Encode(e.to_string()));
    }
    let a = Attributes::of(req);
    let mut out = Vec::with_capacity(req.data.len() + 512);
    // Keys in Go's order (sorted); `data` / `data_base64` sorts first.
    if is_json_content_type(a.content_type) {
        out.extend_from_slice(b"{\"data\":");
        if !json::reencode_go(req.data, &mut out) {
            match decode_first_json(req.data) {
                Some(v) => out.extend_from_slice(
                    &json::to_vec_go(&v).map_err(|e| CloudEventError::Encode(e.to_string()))?,
                ),
                None => json::write_go_str(&mut out, &utf8_lossy(req.data)),
            }
        }
    } else if is_binary_content_type(a.content_type)
        || is_cloudevent_protobuf(a.content_type, req.data)
    {
        out.extend_from_slice(b"{\"data_base64\":");
        json::write_go_str(
            &mut out,
            &base64::engine::general_purpose::STANDARD.encode(req.data),
        );
    } else {
        out.extend_from_slice(b"{\"data\":");
        json::write_go_str(&mut out, &utf8_lossy(req.data));
    }
    let time = format_time(req.now);
    let fields = [
        ("datacontenttype", Some(a.content_type)),
        ("expiration", expiration.as_deref()),
        ("id", Some(a.id)),
        ("pubsubname", Some(req.pubsub_name)),
        ("source", Some(a.source)),
        ("specversion", Some(SPEC_VERSION)),
        ("subject", Some(a.subject).filter(|s| !s.is_empty())),
        ("time", Some(time.as_str())),
        ("topic", Some(req.topic)),
        ("traceid", Some(a.trace)),
        ("traceparent", Some(a.trace)),
        ("tracestate", Some(a.tracestate)),
        ("type", Some(a.ty)),
    ];
    for (key, value) in fields {
        if let Some(value) = value {
            out.push(b',');
            json::write_go_str(&mut out, key);
            out.push(b':');
            json::write_go_str(&mut out, value);
        }
    }
    out.push(b'}');
    Ok(out)
}

/// How `data` is carried for `content_type`: `("data", json)`, `("data_base64", b64)` or
/// `("data", string)`.
pub fn embed_data(content_type: &str, data: &[u8]) -> (&'static str, Value) {
    if is_json_content_type(content_type) {
        if let Some(v) = decode_first_json(data) {
            return ("data", v);
        }
        return (
            "data",
            Value::String(String::from_utf8_lossy(data).into_owned()),
        );
    }
    if is_binary_content_type(content_type) || is_cloudevent_protobuf(content_type, data) {
        return (
            "data_base64",
            Value::String(base64::engine::general_purpose::STANDARD.encode(data)),
        );
    }
    (
        "data",
        Value::String(String::from_utf8_lossy(data).into_owned()),
    )
}

/// `data` as text, invalid UTF-8 replaced (valid text is borrowed after one fast check).
fn utf8_lossy(data: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(data) {
        Ok(s) => s.into(),
        Err(_) => String::from_utf8_lossy(data),
    }
}

/// The caller's own CloudEvent in a body sent as `application/cloudevents+json`.
fn cloudevent_object(data: &[u8]) -> Result<Map<String, Value>, CloudEventError> {
    match decode_first_json(data) {
        Some(Value::Object(m)) => Ok(m),
        Some(other) => Err(CloudEventError::NotAnObject(format!(
            "expected an object, got {}",
            json_kind(&other)
        ))),
        None => Err(CloudEventError::NotAnObject("invalid json".into())),
    }
}

/// The error [`new_envelope`] would give for `data` of `content_type`, without building the
/// envelope (a bulk publish checks every entry before it publishes any).
///
/// # Errors
/// [`CloudEventError::NotAnObject`] when a CloudEvent body is not a JSON object.
pub fn check_envelope_data(content_type: &str, data: &[u8]) -> Result<(), CloudEventError> {
    if is_cloudevent_content_type(content_type) {
        cloudevent_object(data)?;
    }
    Ok(())
}

fn from_cloudevent(req: &EnvelopeRequest<'_>) -> Result<Map<String, Value>, CloudEventError> {
    let mut m = cloudevent_object(req.data)?;
    if !m.contains_key("time") {
        m.insert("time".into(), format_time(req.now).into());
    }
    if !m.contains_key("traceid") {
        m.insert("traceid".into(), req.traceparent.into());
        m.insert("traceparent".into(), req.traceparent.into());
    }
    if !m.contains_key("tracestate") {
        m.insert("tracestate".into(), req.tracestate.into());
    }
    m.insert("topic".into(), req.topic.into());
    m.insert("pubsubname".into(), req.pubsub_name.into());
    for (field, default) in [
        ("source", DEFAULT_SOURCE),
        ("type", DEFAULT_TYPE),
        ("specversion", SPEC_VERSION),
    ] {
        if m.get(field).is_none_or(Value::is_null) {
            m.insert(field.into(), default.into());
        }
    }
    Ok(m)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The message TTL requested in `metadata` (`ttl` checked before `ttlInSeconds`, keys
/// case-insensitive): a Go duration or a positive integer of seconds. A negative duration
/// is zero. An invalid value is no TTL (daprd ignores the parse error).
pub fn ttl_from_metadata(metadata: &BTreeMap<String, String>) -> Option<Duration> {
    let value = ["ttl", "ttlInSeconds"].iter().find_map(|key| {
        metadata
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    })?;
    if value.is_empty() {
        return None;
    }
    if let Ok((d, negative)) = parse_go_duration_signed(value) {
        return Some(if negative { Duration::ZERO } else { d });
    }
    match value.parse::<i64>() {
        Ok(n) if n > 0 => Some(Duration::from_secs(n.unsigned_abs())),
        _ => None,
    }
}

/// Adds `expiration` = now + TTL when the metadata asks for a TTL and the component does
/// not enforce TTL itself.
pub fn apply_ttl(
    envelope: &mut Map<String, Value>,
    metadata: &BTreeMap<String, String>,
    component_handles_ttl: bool,
    now: SystemTime,
) {
    if component_handles_ttl {
        return;
    }
    if let Some(ttl) = ttl_from_metadata(metadata) {
        envelope.insert("expiration".into(), format_time(expiry(now, ttl)).into());
    }
}

/// `now` + `ttl`, or a century from now when that overflows.
fn expiry(now: SystemTime, ttl: Duration) -> SystemTime {
    now.checked_add(ttl)
        .unwrap_or(now + Duration::from_secs(100 * 365 * 86_400))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_huge_ttl_expires_at_the_end_of_year_9999() {
        // Found by the cloudevent fuzz target: this TTL made the RFC 3339 formatting panic.
        let md: BTreeMap<String, String> = [("ttlInSeconds".into(), "8888888888888888888".into())]
            .into_iter()
            .collect();
        let mut envelope = Map::new();
        apply_ttl(&mut envelope, &md, false, SystemTime::now());
        assert_eq!(envelope["expiration"], "9999-12-31T23:59:59Z");
    }

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn req<'a>(ct: &'a str, data: &'a [u8]) -> EnvelopeRequest<'a> {
        EnvelopeRequest {
            source: "checkout",
            topic: "orders",
            pubsub_name: "pubsub",
            data_content_type: ct,
            data,
            traceparent: TP,
            tracestate: "k=v",
            metadata: None,
            new_id: "id-1",
            now: t0(),
        }
    }

    #[test]
    fn envelope_bytes_are_the_tree_envelope_encoded() {
        let content_types = [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/cloudevents+json",
            "text/plain",
            "",
            "application/octet-stream",
            "application/x-protobuf",
            "application/xml",
        ];
        let bodies: [&[u8]; 9] = [
            br#"{"orderId":1,"pad":"xxxx"}"#,
            br#" {"b":[1,2.50],"a":"<&>","b":null} "#,
            br#"{"id":"orig","source":null,"data":{"x":1},"traceid":"mine"}"#,
            b"[1,2]",
            b"\"quoted\"",
            b"12 34",
            b"{not json",
            b"",
            &[0x0a, 1, b'a', 0x12, 1, 0xff],
        ];
        let md = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let metadata = [
            md(&[]),
            md(&[("ttlInSeconds", "10")]),
            md(&[
                ("cloudevent.ID", "my-id"),
                ("CloudEvent.source", ""),
                ("cloudevent.type", "t<1>"),
                ("cloudevent.subject", "subj\n"),
                ("cloudevent.traceid", "tid"),
                ("cloudevent.traceparent", "tp"),
                ("cloudevent.tracestate", ""),
                ("ttl", "1h"),
            ]),
            md(&[("cloudevent.id", ""), ("cloudevent.traceid", "")]),
        ];
        for ct in content_types {
            for body in bodies {
                for md in &metadata {
                    for handles_ttl in [false, true] {
                        let mut r = req(ct, body);
                        r.metadata = Some(md);
                        let by_tree = new_envelope(&r).map(|mut ce| {
                            apply_ttl(&mut ce, md, handles_ttl, r.now);
                            crate::json::to_vec_go(&ce).unwrap()
                        });
                        let direct = envelope_bytes(&r, handles_ttl);
                        match (by_tree, direct) {
                            (Ok(tree), Ok(direct)) => assert_eq!(
                                String::from_utf8_lossy(&direct),
                                String::from_utf8_lossy(&tree),
                                "{ct:?} {:?} {md:?} {handles_ttl}",
                                String::from_utf8_lossy(body)
                            ),
                            (Err(_), Err(e)) => {
                                assert!(matches!(e, CloudEventError::NotAnObject(_)));
                            }
                            (tree, direct) => panic!(
                                "{ct:?} {:?}: tree {:?}, direct {:?}",
                                String::from_utf8_lossy(body),
                                tree.is_ok(),
                                direct.is_ok()
                            ),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn json_body_is_embedded_as_json() {
        let ce = new_envelope(&req(
            "application/json",
            br#"{"a":1,"big":123456789012345678901}"#,
        ))
        .unwrap();
        assert_eq!(ce["data"], json!({"a":1,"big":123456789012345678901_u128}));
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(ce["id"], "id-1");
        assert_eq!(ce["source"], "checkout");
        assert_eq!(ce["type"], DEFAULT_TYPE);
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["topic"], "orders");
        assert_eq!(ce["pubsubname"], "pubsub");
        assert_eq!(ce["traceid"], TP);
        assert_eq!(ce["traceparent"], TP);
        assert_eq!(ce["tracestate"], "k=v");
        assert_eq!(ce["time"], "2023-11-14T22:13:20Z");
        assert!(!ce.contains_key("subject"));
        assert!(!ce.contains_key("data_base64"));
    }

    #[test]
    fn json_content_type_with_params_and_case() {
        let ce = new_envelope(&req("Application/JSON; charset=utf-8", b"[1,2]")).unwrap();
        assert_eq!(ce["data"], json!([1, 2]));
        assert_eq!(ce["datacontenttype"], "Application/JSON; charset=utf-8");
    }

    #[test]
    fn invalid_json_becomes_string() {
        let ce = new_envelope(&req("application/json", b"{not json")).unwrap();
        assert_eq!(ce["data"], "{not json");
        let ce = new_envelope(&req("application/json", b"")).unwrap();
        assert_eq!(ce["data"], "");
    }

    #[test]
    fn json_trailing_bytes_ignored_like_go_decoder() {
        let ce = new_envelope(&req("application/json", b"1 2")).unwrap();
        assert_eq!(ce["data"], json!(1));
    }

    #[test]
    fn text_is_string_even_when_quoted() {
        let ce = new_envelope(&req("text/plain", b"\"hello\"")).unwrap();
        assert_eq!(ce["data"], "\"hello\"");
        let ce = new_envelope(&req("", b"{\"a\":1}")).unwrap();
        assert_eq!(ce["datacontenttype"], "text/plain");
        assert_eq!(ce["data"], "{\"a\":1}");
        let ce = new_envelope(&req("application/xml", b"<a/>")).unwrap();
        assert_eq!(ce["data"], "<a/>");
    }

    #[test]
    fn binary_is_base64() {
        let ce = new_envelope(&req("application/octet-stream", &[0, 1, 2, 255])).unwrap();
        assert_eq!(ce["data_base64"], "AAEC/w==");
        assert!(!ce.contains_key("data"));
        let ce = new_envelope(&req("application/cloudevents+protobuf", b"xx")).unwrap();
        assert_eq!(ce["data_base64"], "eHg=");
    }

    #[test]
    fn x_protobuf_only_base64_when_it_parses_as_cloudevent() {
        // field 1 (id) = "a", field 2 (source) = "b"
        let valid = [0x0a, 1, b'a', 0x12, 1, b'b'];
        let ce = new_envelope(&req("application/x-protobuf", &valid)).unwrap();
        assert!(ce.contains_key("data_base64"));
        let invalid = [0xff, 0xff];
        let ce = new_envelope(&req("application/x-protobuf", &invalid)).unwrap();
        assert!(ce.contains_key("data"));
    }

    #[test]
    fn overrides_apply_case_insensitively() {
        let md: BTreeMap<String, String> = [
            ("cloudevent.ID", "my-id"),
            ("CloudEvent.source", "src"),
            ("cloudevent.type", "my.type"),
            ("cloudevent.subject", "subj"),
            ("cloudevent.traceid", "tid"),
            ("cloudevent.tracestate", "ts"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut r = req("text/plain", b"x");
        r.metadata = Some(&md);
        let ce = new_envelope(&r).unwrap();
        assert_eq!(ce["id"], "my-id");
        assert_eq!(ce["source"], "src");
        assert_eq!(ce["type"], "my.type");
        assert_eq!(ce["subject"], "subj");
        assert_eq!(ce["traceid"], "tid");
        assert_eq!(ce["traceparent"], "tid");
        assert_eq!(ce["tracestate"], "ts");
    }

    #[test]
    fn traceparent_override_wins_over_traceid() {
        let md: BTreeMap<String, String> = [
            ("cloudevent.traceid".to_string(), "tid".to_string()),
            ("cloudevent.traceparent".to_string(), "tp".to_string()),
        ]
        .into_iter()
        .collect();
        let mut r = req("text/plain", b"x");
        r.metadata = Some(&md);
        let ce = new_envelope(&r).unwrap();
        assert_eq!(ce["traceid"], "tp");
        assert_eq!(ce["traceparent"], "tp");
    }

    #[test]
    fn empty_id_override_falls_back_to_generated() {
        let md: BTreeMap<String, String> = [("cloudevent.id".to_string(), String::new())]
            .into_iter()
            .collect();
        let mut r = req("text/plain", b"x");
        r.metadata = Some(&md);
        assert_eq!(new_envelope(&r).unwrap()["id"], "id-1");
    }

    #[test]
    fn existing_cloudevent_is_completed_not_replaced() {
        let body = br#"{"id":"orig","source":"me","type":"t","data":{"x":1},"datacontenttype":"application/json","topic":"wrong","ext":"e"}"#;
        let md: BTreeMap<String, String> = [("cloudevent.id".to_string(), "ignored".to_string())]
            .into_iter()
            .collect();
        let mut r = req("application/cloudevents+json", body);
        r.metadata = Some(&md);
        let ce = new_envelope(&r).unwrap();
        assert_eq!(ce["id"], "orig");
        assert_eq!(ce["source"], "me");
        assert_eq!(ce["type"], "t");
        assert_eq!(ce["topic"], "orders");
        assert_eq!(ce["pubsubname"], "pubsub");
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["ext"], "e");
        assert_eq!(ce["traceid"], TP);
        assert_eq!(ce["time"], "2023-11-14T22:13:20Z");
    }

    #[test]
    fn existing_cloudevent_keeps_its_trace_and_time_and_no_id_is_added() {
        let body = br#"{"traceid":"mine","time":"2020-01-01T00:00:00Z","source":null}"#;
        let ce = new_envelope(&req("application/cloudevents+json; charset=utf-8", body)).unwrap();
        assert_eq!(ce["traceid"], "mine");
        assert!(!ce.contains_key("traceparent"));
        assert_eq!(ce["tracestate"], "k=v");
        assert_eq!(ce["time"], "2020-01-01T00:00:00Z");
        assert_eq!(ce["source"], DEFAULT_SOURCE);
        assert!(!ce.contains_key("id"));
    }

    #[test]
    fn cloudevent_body_must_be_an_object() {
        assert!(new_envelope(&req("application/cloudevents+json", b"[1]")).is_err());
        assert!(new_envelope(&req("application/cloudevents+json", b"nope")).is_err());
        assert!(new_envelope(&req("application/cloudevents+json", b"null")).is_err());
    }

    #[test]
    fn ttl_rules() {
        let md = |k: &str, v: &str| -> BTreeMap<String, String> {
            [(k.to_string(), v.to_string())].into_iter().collect()
        };
        assert_eq!(
            ttl_from_metadata(&md("ttlInSeconds", "10")),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            ttl_from_metadata(&md("TTLINSECONDS", "1m")),
            Some(Duration::from_secs(60))
        );
        assert_eq!(ttl_from_metadata(&md("ttl", "-5s")), Some(Duration::ZERO));
        assert_eq!(
            ttl_from_metadata(&md("ttlInSeconds", "0")),
            Some(Duration::ZERO)
        );
        assert_eq!(ttl_from_metadata(&md("ttlInSeconds", "-3")), None);
        assert_eq!(ttl_from_metadata(&md("ttlInSeconds", "abc")), None);
        assert_eq!(ttl_from_metadata(&md("other", "10")), None);
        let both: BTreeMap<String, String> = [
            ("ttl".to_string(), "20".to_string()),
            ("ttlInSeconds".to_string(), "10".to_string()),
        ]
        .into_iter()
        .collect();
        assert_eq!(ttl_from_metadata(&both), Some(Duration::from_secs(20)));
    }

    #[test]
    fn ttl_adds_expiration_unless_component_handles_it() {
        let md: BTreeMap<String, String> = [("ttlInSeconds".to_string(), "10".to_string())]
            .into_iter()
            .collect();
        let mut ce = new_envelope(&req("text/plain", b"x")).unwrap();
        apply_ttl(&mut ce, &md, false, t0());
        assert_eq!(ce["expiration"], "2023-11-14T22:13:30Z");
        let mut ce = new_envelope(&req("text/plain", b"x")).unwrap();
        apply_ttl(&mut ce, &md, true, t0());
        assert!(!ce.contains_key("expiration"));
    }
}
