//! The Dapr HTTP API (axum on hyper; HTTP/1.1 and h2c).
//!
//! Routes: publish (`/v1.0/publish/...`), bulk publish (`/v1.0/publish/bulk/...` and
//! `/v1.0-alpha1/publish/bulk/...`), health, metadata and shutdown. Paths are cleaned like
//! Go's `path.Clean` before routing and path parameters are unescaped like
//! `url.QueryUnescape`, so topics may contain `/`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::Router;
use base64::Engine as _;
use serde_json::Value;

use super::http_metrics::{RecordMetricsLayer, Unrouted};
use crate::api::ApiState;
use crate::error::{AnsweredCode, ApiError};
use crate::outbound::publish::{BulkInput, BulkInputEntry, PublishInput, TraceHeaders, Transport};
use crate::state::RuntimeState;
use daprd_core::gocompat::{go_path_clean, query_unescape};

type AppState = Arc<ApiState>;

/// The API router (all routes, API token and CORS applied).
pub fn router(state: AppState) -> Router {
    // A route the Configuration's API lists refuse is not served at all (Go's plain 404),
    // as Go daprd does not register it; the health endpoints are always served.
    let access = &state.api_access;
    let mut r: Router<AppState> = Router::new()
        .route("/v1.0/healthz", get(healthz))
        .route("/v1.0/healthz/outbound", get(healthz_outbound))
        .fallback(any(not_found));
    if access.http_allows("publish", "v1", "v1.0/publish/{pubsubname}/{topic}") {
        r = r.route("/v1.0/publish/{*rest}", post(publish_any).put(publish_any));
    }
    if access.http_allows(
        "publish",
        "v1alpha1",
        "v1.0-alpha1/publish/bulk/{pubsubname}/{topic}",
    ) {
        r = r.route(
            "/v1.0-alpha1/publish/bulk/{*rest}",
            post(bulk_alpha).put(bulk_alpha),
        );
    }
    if access.http_allows("metadata", "v1", "v1.0/metadata") {
        r = r
            .route("/v1.0/metadata", get(get_metadata))
            .route("/v1.0/metadata/{key}", put(put_metadata));
    }
    if access.http_allows("shutdown", "v1", "v1.0/shutdown") {
        r = r.route("/v1.0/shutdown", post(shutdown));
    }
    // The token check is only layered in when DAPR_API_TOKEN is set.
    if state.config.env.api_token.is_some() {
        r = r.layer(middleware::from_fn_with_state(state.clone(), api_token));
    }
    if state.api_logging.is_some() {
        r = r.layer(middleware::from_fn_with_state(state.clone(), log_api_call));
    }
    let mut r = r.with_state(state.clone());
    if let Some(origins) = &state.config.allowed_origins {
        r = r.layer(cors_layer(origins));
    }
    r
}

/// The public-port router: health and metadata only, no API token.
pub fn public_router(state: AppState) -> Router {
    Router::new()
        .route("/v1.0/healthz", get(healthz))
        .route("/v1.0/healthz/outbound", get(healthz_outbound))
        .route("/v1.0/metadata", get(get_metadata))
        .fallback(any(not_found))
        .with_state(state)
}

/// Wraps `router` so that request paths are cleaned (Go `path.Clean`) before routing, and
/// each request is counted in `metrics` (when given) under its cleaned path. The metrics
/// service wraps the router as a whole: a `Router::layer` would box and clone it per request.
pub fn with_clean_paths(router: Router, metrics: Option<Arc<crate::metrics::Metrics>>) -> Router {
    use tower::Layer as _;
    let outer = match metrics {
        Some(m) => Router::new().fallback_service(RecordMetricsLayer(m).layer(router)),
        None => Router::new().fallback_service(router),
    };
    outer.layer(middleware::map_request(clean_path))
}

/// Whether `path` would change under `go_path_clean` (cheap check, no allocation).
fn needs_cleaning(path: &str) -> bool {
    path.len() > 1
        && (path.ends_with('/')
            || path.contains("//")
            || path.contains("/./")
            || path.contains("/../")
            || path.ends_with("/.")
            || path.ends_with("/.."))
}

async fn clean_path(mut req: Request) -> Request {
    let path = req.uri().path();
    if !needs_cleaning(path) {
        return req;
    }
    let cleaned = go_path_clean(path);
    if cleaned != path {
        let pq = match req.uri().query() {
            Some(q) => format!("{cleaned}?{q}"),
            None => cleaned,
        };
        if let Ok(pq) = pq.parse::<http::uri::PathAndQuery>() {
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    req
}

fn cors_layer(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
    if origins.iter().any(|o| o == "*") {
        return CorsLayer::very_permissive();
    }
    let list: Vec<HeaderValue> = origins.iter().filter_map(|o| o.parse().ok()).collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(list))
        .allow_methods([
            Method::HEAD,
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers(AllowHeaders::mirror_request())
}

/// The name Go daprd gives an HTTP endpoint (API logging with `obfuscateURLs`).
fn endpoint_name(method: &Method, path: &str) -> &'static str {
    match path.trim_end_matches('/') {
        p if p.starts_with("/v1.0-alpha1/publish/bulk/")
            || p.starts_with("/v1.0/publish/bulk/") =>
        {
            "BulkPublishEvent"
        }
        p if p.starts_with("/v1.0/publish/") => "PublishEvent",
        "/v1.0/healthz" => "Healthz",
        "/v1.0/healthz/outbound" => "HealthzOutbound",
        "/v1.0/metadata" => "GetMetadata",
        p if p.starts_with("/v1.0/metadata/") && method == Method::PUT => "PutMetadata",
        "/v1.0/shutdown" => "Shutdown",
        _ => "Unknown",
    }
}

/// Logs each API call at info level ("HTTP API Called"), as Go daprd's API logging: the
/// method and path (the endpoint's name instead with `obfuscateURLs`), the status, the
/// duration and the user agent; health checks left out with `omitHealthChecks`.
async fn log_api_call(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(settings) = state.api_logging else {
        return next.run(req).await;
    };
    let path = req.uri().path().to_string();
    if settings.omit_health_checks && path.starts_with("/v1.0/healthz") {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let useragent = super::user_agent(req.headers());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let called = if settings.obfuscate_urls {
        format!("{method} {}", endpoint_name(&method, &path))
    } else {
        format!("{method} {path}")
    };
    tracing::info!(
        target: "dapr.runtime.http-info",
        method = %called,
        code = resp.status().as_u16(),
        duration = started.elapsed().as_secs_f64() * 1000.0,
        useragent = %useragent,
        "HTTP API Called"
    );
    resp
}

async fn api_token(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(token) = state.config.env.api_token.as_deref() else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get("dapr-api-token")
        .and_then(|v| v.to_str().ok());
    if given != Some(token) {
        let path = req.uri().path().trim_matches('/');
        let exempt = req.method() == Method::GET
            && (path == "v1.0/healthz" || path == "v1.0/healthz/outbound");
        if !exempt {
            return (
                StatusCode::UNAUTHORIZED,
                [(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "invalid api token\n",
            )
                .into_response();
        }
    }
    req.headers_mut().remove("dapr-api-token");
    next.run(req).await
}

async fn not_found() -> Response {
    let mut resp = (StatusCode::NOT_FOUND, "404 page not found\n").into_response();
    resp.extensions_mut().insert(Unrouted);
    resp
}

/// `metadata.*` query parameters (prefix exact, first value wins).
pub fn request_metadata(query: Option<&str>) -> BTreeMap<String, String> {
    let mut md = BTreeMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (query_unescape(k), query_unescape(v)) else {
            continue;
        };
        if let Some(name) = k.strip_prefix("metadata.") {
            md.entry(name.to_string()).or_insert(v);
        }
    }
    md
}

fn trace_headers(headers: &HeaderMap) -> TraceHeaders {
    TraceHeaders::read(|k| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    })
}

fn bad_escape() -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "invalid URL escape in path\n",
    )
        .into_response()
}

/// Splits the escaped remainder `pubsub/topic...` and unescapes both.
fn pubsub_and_topic(rest: &str) -> Option<(String, String)> {
    let (ps, topic) = rest.split_once('/').unwrap_or((rest, ""));
    Some((query_unescape(ps)?, query_unescape(topic)?))
}

async fn read_body(state: &RuntimeState, body: Body) -> Result<Bytes, String> {
    axum::body::to_bytes(body, state.config.max_body_size)
        .await
        .map_err(|e| {
            use std::error::Error as _;
            let too_large = e
                .source()
                .is_some_and(|s| s.to_string().contains("length limit"));
            if too_large {
                format!(
                    "request body exceeds the maximum of {} bytes (--max-body-size)",
                    state.config.max_body_size
                )
            } else {
                format!("error reading request body: {e}")
            }
        })
}

async fn publish_any(State(state): State<AppState>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix("/v1.0/publish/").unwrap_or("");
    // Like chi, the static `bulk` segment wins when a pubsub and a topic follow it.
    if let Some(bulk_rest) = rest.strip_prefix("bulk/") {
        if bulk_rest.contains('/') {
            let bulk_rest = bulk_rest.to_string();
            return bulk(state, req, &bulk_rest).await;
        }
    }
    let rest = rest.to_string();
    single(state, req, &rest).await
}

async fn bulk_alpha(State(state): State<AppState>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let rest = path
        .strip_prefix("/v1.0-alpha1/publish/bulk/")
        .unwrap_or("")
        .to_string();
    bulk(state, req, &rest).await
}

async fn single(state: AppState, req: Request, rest: &str) -> Response {
    let Some((pubsub, topic)) = pubsub_and_topic(rest) else {
        return bad_escape();
    };
    let metadata = request_metadata(req.uri().query());
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let trace = trace_headers(req.headers());
    // Validation errors take precedence over body read errors, as in daprd.
    if let Err(e) = state
        .publisher
        .target(&pubsub, &topic, &metadata, Transport::Http)
    {
        return e.into_response();
    }
    let data = match read_body(&state, req.into_body()).await {
        Ok(b) => b,
        Err(e) => return ApiError::publish_message(&pubsub, &topic, &e).into_response(),
    };
    let input = PublishInput {
        pubsub,
        topic,
        data,
        content_type,
        metadata,
        trace,
        transport: Transport::Http,
    };
    match state.publisher.publish(input).await {
        Ok(traceparent) => {
            let mut resp = StatusCode::NO_CONTENT.into_response();
            if let Ok(v) = http::HeaderValue::from_str(&traceparent) {
                resp.headers_mut().insert("traceparent", v);
            }
            resp
        }
        Err(e) => e.into_response(),
    }
}

/// Converts a bulk entry's `event` to bytes according to its `contentType` (daprd's
/// `ConvertEventToBytes`).
pub fn event_to_bytes(event: &Value, content_type: &str) -> Result<Vec<u8>, String> {
    use daprd_core::cloudevent as ce;
    const MISMATCH: &str = "mismatch between contentType and event";
    if ce::is_binary_content_type(content_type) {
        return match event {
            Value::String(s) => base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| {
                    format!("error: unable to decode base64 application/octect-stream data: {e}")
                }),
            _ => Err(MISMATCH.into()),
        };
    }
    if ce::is_string_content_type(content_type) {
        return match event {
            Value::String(s) => Ok(s.clone().into_bytes()),
            _ => Err(MISMATCH.into()),
        };
    }
    if ce::is_json_content_type(content_type) || ce::is_cloudevent_content_type(content_type) {
        return daprd_core::json::to_vec_go(event).map_err(|e| format!("{MISMATCH}: {e}"));
    }
    Err(MISMATCH.into())
}

/// Parses the bulk body: a JSON array of `{entryId, event, contentType, metadata}` with
/// keys matched case-insensitively, as Go's `encoding/json` does (a later key wins). The
/// array is read entry by entry: only one entry's JSON tree exists at a time, so a body of
/// 50,000 small entries costs the entries themselves, not a document tree many times the
/// body's size.
pub fn parse_bulk_entries(
    body: &[u8],
    pubsub: &str,
    topic: &str,
    app_id: &str,
) -> Result<Vec<BulkInputEntry>, ApiError> {
    use serde::de::DeserializeSeed as _;
    let unmarshal = |e: String| ApiError::unmarshal_events(pubsub, topic, app_id, &e);
    let mut failure = None;
    let seed = BulkEntries {
        failure: &mut failure,
        envelope_error: &|e: &str| ApiError::marshal_envelope(pubsub, topic, app_id, e),
        unmarshal: &unmarshal,
    };
    // The first JSON value only; what follows it is ignored, as by Go's json.Decoder.
    let mut de = serde_json::Deserializer::from_slice(body);
    match seed.deserialize(&mut de) {
        Ok(entries) => Ok(entries),
        Err(e) => Err(failure.unwrap_or_else(|| unmarshal(e.to_string()))),
    }
}

/// Deserializes the bulk array into entries; an error the API answers with is left in
/// `failure` (the serde error then only stops the parse).
struct BulkEntries<'f> {
    failure: &'f mut Option<ApiError>,
    envelope_error: &'f dyn Fn(&str) -> ApiError,
    unmarshal: &'f dyn Fn(String) -> ApiError,
}

impl BulkEntries<'_> {
    fn fail<E: serde::de::Error>(&mut self, e: ApiError) -> E {
        *self.failure = Some(e);
        E::custom("bulk entries")
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for BulkEntries<'_> {
    type Value = Vec<BulkInputEntry>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

const NON_ARRAY: &str =
    "json: cannot unmarshal non-array into Go value of type []http.bulkPublishMessageEntry";

impl<'de> serde::de::Visitor<'de> for BulkEntries<'_> {
    type Value = Vec<BulkInputEntry>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array of bulk publish entries")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        mut self,
        mut seq: A,
    ) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
        while let Some(fields) = seq.next_element::<Option<EntryFields>>()? {
            let entry = match fields.unwrap_or_default().into_entry(self.envelope_error) {
                Ok(e) => e,
                Err(EntryError::Unmarshal(m)) => {
                    let e = (self.unmarshal)(m);
                    return Err(self.fail(e));
                }
                Err(EntryError::Api(e)) => return Err(self.fail(e)),
            };
            out.push(entry);
        }
        Ok(out)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, _: A) -> Result<Self::Value, A::Error> {
        let e = (self.unmarshal)(NON_ARRAY.into());
        Err(self.fail(e))
    }

    fn visit_unit<E: serde::de::Error>(mut self) -> Result<Self::Value, E> {
        let e = (self.unmarshal)(NON_ARRAY.into());
        Err(self.fail(e))
    }

    fn visit_bool<E: serde::de::Error>(mut self, _: bool) -> Result<Self::Value, E> {
        let e = (self.unmarshal)(NON_ARRAY.into());
        Err(self.fail(e))
    }

    fn visit_str<E: serde::de::Error>(mut self, _: &str) -> Result<Self::Value, E> {
        let e = (self.unmarshal)(NON_ARRAY.into());
        Err(self.fail(e))
    }

    fn visit_i64<E: serde::de::Error>(mut self, _: i64) -> Result<Self::Value, E> {
        let e = (self.unmarshal)(NON_ARRAY.into());
        Err(self.fail(e))
    }

    fn visit_u64<E: serde::de::Error>(mut self, _: u64) -> Result<Self::Value, E> {
        let e = (self.unmarshal)(NON_ARRAY.into());
        Err(self.fail(e))
    }

    fn visit_f64<E: serde::de::Error>(mut self, _: f64) -> Result<Self::Value, E> {
        let e = (self.unmarshal)(NON_ARRAY.into());
        Err(self.fail(e))
    }
}

/// The four fields of one entry, as JSON values (keys matched case-insensitively).
#[derive(Default)]
struct EntryFields {
    entry_id: Option<Value>,
    event: Option<Value>,
    content_type: Option<Value>,
    metadata: Option<Value>,
}

enum EntryError {
    Unmarshal(String),
    Api(ApiError),
}

impl<'de> serde::Deserialize<'de> for EntryFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = EntryFields;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("json: cannot unmarshal non-object into Go struct field of type http.bulkPublishMessageEntry")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<EntryFields, A::Error> {
                let mut f = EntryFields::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let slot = if key.eq_ignore_ascii_case("entryId") {
                        &mut f.entry_id
                    } else if key.eq_ignore_ascii_case("event") {
                        &mut f.event
                    } else if key.eq_ignore_ascii_case("contentType") {
                        &mut f.content_type
                    } else if key.eq_ignore_ascii_case("metadata") {
                        &mut f.metadata
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        continue;
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(f)
            }
        }
        d.deserialize_map(V)
    }
}

impl EntryFields {
    fn into_entry(
        self,
        envelope_error: &dyn Fn(&str) -> ApiError,
    ) -> Result<BulkInputEntry, EntryError> {
        let str_field = |v: Option<Value>, k: &str| -> Result<String, EntryError> {
            match v {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(s)) => Ok(s),
                Some(_) => Err(EntryError::Unmarshal(format!("json: cannot unmarshal non-string into Go struct field bulkPublishMessageEntry.{k} of type string"))),
            }
        };
        let entry_id = str_field(self.entry_id, "entryId")?;
        let content_type = str_field(self.content_type, "contentType")?;
        let metadata = match self.metadata {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => {
                let mut md = BTreeMap::new();
                for (k, v) in m {
                    match v {
                        Value::String(s) => {
                            md.insert(k, s);
                        }
                        Value::Null => {
                            md.insert(k, String::new());
                        }
                        _ => return Err(EntryError::Unmarshal(format!("json: cannot unmarshal non-string into Go struct field bulkPublishMessageEntry.metadata of type string (key {k:?})"))),
                    }
                }
                Some(md)
            }
            Some(_) => return Err(EntryError::Unmarshal("json: cannot unmarshal non-object into Go struct field bulkPublishMessageEntry.metadata of type map[string]string".into())),
        };
        let event = self.event.unwrap_or(Value::Null);
        let bytes = event_to_bytes(&event, &content_type)
            .map_err(|e| EntryError::Api(envelope_error(&e)))?;
        Ok(BulkInputEntry {
            entry_id,
            event: bytes.into(),
            content_type,
            metadata,
        })
    }
}

#[derive(serde::Serialize)]
struct BulkFailure<'a> {
    #[serde(rename = "failedEntries")]
    failed_entries: Vec<FailedJson<'a>>,
    #[serde(rename = "errorCode")]
    error_code: &'a str,
}

#[derive(serde::Serialize)]
struct FailedJson<'a> {
    #[serde(rename = "entryId")]
    entry_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    error: &'a str,
}

async fn bulk(state: AppState, req: Request, rest: &str) -> Response {
    let Some((pubsub, topic)) = pubsub_and_topic(rest) else {
        return bad_escape();
    };
    let metadata = request_metadata(req.uri().query());
    let trace = trace_headers(req.headers());
    if let Err(e) = state
        .publisher
        .target(&pubsub, &topic, &metadata, Transport::Http)
    {
        return e.into_response();
    }
    if let Err(e) = crate::outbound::publish::raw_payload(&metadata) {
        return ApiError::metadata_deserialization(&pubsub, &e, &metadata).into_response();
    }
    let app_id = state.config.app_id.clone();
    let body = match read_body(&state, req.into_body()).await {
        Ok(b) => b,
        Err(e) => return ApiError::unmarshal_events(&pubsub, &topic, &app_id, &e).into_response(),
    };
    let entries = match parse_bulk_entries(&body, &pubsub, &topic, &app_id) {
        Ok(e) => e,
        Err(e) => return e.into_response(),
    };
    let input = BulkInput {
        pubsub,
        topic,
        entries,
        metadata,
        trace,
        transport: Transport::Http,
    };
    match state.publisher.bulk_publish(input).await {
        Err(e) => e.into_response(),
        Ok(outcome) => match outcome.error {
            None => StatusCode::NO_CONTENT.into_response(),
            Some(err) => {
                let body = BulkFailure {
                    failed_entries: outcome
                        .failed
                        .iter()
                        .map(|f| FailedJson {
                            entry_id: &f.entry_id,
                            error: &f.error,
                        })
                        .collect(),
                    error_code: err.error_code,
                };
                let json = daprd_core::json::to_vec_go(&body).unwrap_or_default();
                let mut resp = (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(http::header::CONTENT_TYPE, "application/json")],
                    json.clone(),
                )
                    .into_response();
                let headers = resp.headers_mut();
                if let Ok(v) = HeaderValue::from_bytes(&json) {
                    headers.insert("metadata.responseData", v);
                }
                if let Ok(v) = HeaderValue::from_str(&err.message) {
                    headers.insert("metadata.error", v);
                }
                resp.extensions_mut().insert(err.answered_code());
                resp
            }
        },
    }
}

/// An error answer with Dapr's `{errorCode, message}` body; `code` of `category` as Dapr
/// groups them (counted in `dapr_error_code_total`).
fn simple_error(
    status: StatusCode,
    (category, code): (&'static str, &'static str),
    message: &str,
) -> Response {
    let body = serde_json::json!({"errorCode": code, "message": message});
    let mut resp = (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        daprd_core::json::to_vec_go(&body).unwrap_or_default(),
    )
        .into_response();
    resp.extensions_mut()
        .insert(AnsweredCode { category, code });
    resp
}

async fn healthz(State(state): State<AppState>, uri: Uri) -> Response {
    if !state.is_ready() {
        return simple_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            ("health", "ERR_HEALTH_NOT_READY"),
            "dapr is not ready: [runtime]",
        );
    }
    let md = request_query(uri.query());
    if let Some(app_id) = md.get("appid") {
        if app_id != &state.config.app_id {
            return simple_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                ("health", "ERR_HEALTH_APPID_NOT_MATCH"),
                "dapr app-id does not match",
            );
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

fn request_query(query: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if let (Some(k), Some(v)) = (query_unescape(k), query_unescape(v)) {
            out.entry(k).or_insert(v);
        }
    }
    out
}

async fn healthz_outbound(State(state): State<AppState>) -> Response {
    if state.is_outbound_ready() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        simple_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            ("health", "ERR_OUTBOUND_HEALTH_NOT_READY"),
            "dapr outbound is not ready",
        )
    }
}

async fn get_metadata(State(state): State<AppState>) -> Response {
    let md = super::metadata::get_metadata(&state);
    let json = super::metadata::to_http_json(&md);
    (
        StatusCode::OK,
        [(http::header::CONTENT_TYPE, "application/json")],
        daprd_core::json::to_vec_go(&json).unwrap_or_default(),
    )
        .into_response()
}

async fn put_metadata(
    State(state): State<AppState>,
    axum::extract::Path(key): axum::extract::Path<String>,
    body: Body,
) -> Response {
    let value = match read_body(&state, body).await {
        Ok(b) => b,
        Err(e) => {
            return simple_error(
                StatusCode::BAD_REQUEST,
                ("common", "ERR_BODY_READ"),
                &format!("failed to read request body: {e}"),
            )
        }
    };
    state
        .extended
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(key, String::from_utf8_lossy(&value).into_owned());
    StatusCode::NO_CONTENT.into_response()
}

async fn shutdown(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let force = headers
        .get("dapr-force-shutdown")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    state.request_shutdown(force);
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_is_skipped_only_for_clean_paths() {
        for p in ["/v1.0/publish/ps/t", "/", "/a.b/c..d/.e"] {
            assert!(!needs_cleaning(p) && go_path_clean(p) == p, "{p}");
        }
        for p in ["/a//b", "/a/./b", "/a/../b", "/a/", "/a/.", "/a/.."] {
            assert!(needs_cleaning(p) && go_path_clean(p) != p, "{p}");
        }
    }

    #[test]
    fn metadata_from_query() {
        let md = request_metadata(Some("metadata.ttlInSeconds=10&metadata.rawPayload=true&metadata.ttlInSeconds=20&other=1&Metadata.x=1&metadata.sp=a+b"));
        assert_eq!(md.get("ttlInSeconds").map(String::as_str), Some("10"));
        assert_eq!(md.get("rawPayload").map(String::as_str), Some("true"));
        assert_eq!(md.get("sp").map(String::as_str), Some("a b"));
        assert_eq!(md.len(), 3);
    }

    #[test]
    fn bulk_event_conversion() {
        assert_eq!(
            event_to_bytes(&Value::String("AAEC".into()), "application/octet-stream").unwrap(),
            vec![0, 1, 2]
        );
        assert!(event_to_bytes(&Value::String("!!".into()), "application/octet-stream").is_err());
        assert!(event_to_bytes(&serde_json::json!(1), "application/octet-stream").is_err());
        assert_eq!(
            event_to_bytes(&Value::String("hi".into()), "text/plain").unwrap(),
            b"hi"
        );
        assert!(event_to_bytes(&serde_json::json!({"a":1}), "text/plain").is_err());
        assert_eq!(
            event_to_bytes(&serde_json::json!({"b":1,"a":"<"}), "application/json").unwrap(),
            br#"{"a":"\u003c","b":1}"#
        );
        assert!(event_to_bytes(&Value::String("x".into()), "").is_err());
    }

    #[test]
    fn bulk_body_keys_are_case_insensitive() {
        let body = br#"[{"EntryID":"1","Event":"hi","CONTENTTYPE":"text/plain","metadata":{"k":"v"}},{"entryId":"2","event":{"a":1},"contentType":"application/json"}]"#;
        let entries = parse_bulk_entries(body, "ps", "t", "app").unwrap();
        assert_eq!(entries[0].entry_id, "1");
        assert_eq!(&entries[0].event[..], b"hi");
        assert_eq!(entries[0].metadata.as_ref().unwrap()["k"], "v");
        assert!(entries[1].metadata.is_none());
        let e = parse_bulk_entries(b"{}", "ps", "t", "app").unwrap_err();
        assert_eq!(e.reason, "DAPR_PUBSUB_UNMARSHAL_EVENTS");
        let e = parse_bulk_entries(
            br#"[{"entryId":"1","event":1,"contentType":"text/plain"}]"#,
            "ps",
            "t",
            "app",
        )
        .unwrap_err();
        assert_eq!(e.reason, "DAPR_PUBSUB_MARSHAL_ENVELOPE");
    }

    #[test]
    fn bulk_body_edges_as_go_decodes_them() {
        // Unknown keys are skipped; what follows the array is ignored (json.Decoder).
        let entries =
            parse_bulk_entries(br#" [{"entryId":"a","event":"x","contentType":"text/plain","other":[1,{"b":2}]}] trailing"#, "ps", "t", "app")
                .unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].entry_id, "a");
        // A null entry is an empty one: no content type matches its null event.
        let e = parse_bulk_entries(b"[null]", "ps", "t", "app").unwrap_err();
        assert_eq!(e.reason, "DAPR_PUBSUB_MARSHAL_ENVELOPE");
        for (body, want) in [
            (&b"null"[..], "non-array"),
            (b"\"s\"", "non-array"),
            (b"[1]", "non-object"),
            (br#"[{"entryId":1}]"#, "bulkPublishMessageEntry.entryId"),
            (br#"[{"metadata":{"k":1}}]"#, "metadata of type string"),
            (br#"[{"metadata":[]}]"#, "map[string]string"),
            (b"[{", "EOF"),
        ] {
            let e = parse_bulk_entries(body, "ps", "t", "app").unwrap_err();
            assert_eq!(e.reason, "DAPR_PUBSUB_UNMARSHAL_EVENTS", "{body:?}");
            assert!(e.message.contains(want), "{body:?}: {}", e.message);
        }
    }
}
