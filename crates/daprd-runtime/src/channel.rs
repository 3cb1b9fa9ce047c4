//! App channels: how daprd reaches the app to discover subscriptions and deliver events.
//! HTTP (`--app-protocol http|h2c`, pooled connections) and gRPC (`grpc`, `AppCallback`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use daprd_proto::runtime::v1 as pb;
use serde_json::{Map, Value as Json};
use tokio::sync::Semaphore;

use crate::subscriptions::{self, SubscriptionSpec};

/// What the app made of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppReply {
    /// Processed.
    Success,
    /// Not processed; may be retried: why, and the app's HTTP status or gRPC code if any.
    Retry(String, Option<i32>),
    /// Will never be processed. `dead_letter` says whether the DLT applies.
    Drop {
        /// Send to the dead-letter topic when one is configured.
        dead_letter: bool,
        /// Why.
        reason: String,
    },
}

/// One event on its way to the app.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Matched route path.
    pub path: String,
    /// Body for HTTP (the broker bytes, or the synthesized raw envelope).
    pub body: Bytes,
    /// The decoded CloudEvent.
    pub event: Map<String, Json>,
    /// Message metadata (sent as headers / gRPC metadata).
    pub metadata: BTreeMap<String, String>,
    /// Topic (namespace prefix removed).
    pub topic: String,
    /// Component name.
    pub pubsub: String,
    /// W3C traceparent of the delivery span.
    pub traceparent: String,
    /// W3C tracestate.
    pub tracestate: String,
}

/// A way to reach the app.
#[async_trait]
pub trait AppChannel: Send + Sync {
    /// Asks the app for its programmatic subscriptions.
    async fn list_subscriptions(&self) -> Result<Vec<SubscriptionSpec>, String>;
    /// Delivers one event.
    async fn deliver(&self, delivery: &Delivery) -> AppReply;

    /// Delivers a batch; by default one event at a time.
    async fn deliver_bulk(&self, batch: &crate::bulk::BulkDelivery) -> crate::bulk::BulkReply {
        let mut out = crate::bulk::BulkReply::new();
        for e in &batch.entries {
            out.insert(e.entry_id.clone(), self.deliver(&e.delivery).await);
        }
        out
    }
}

/// Limits concurrent calls to the app (`--app-max-concurrency`).
#[derive(Clone, Default)]
pub struct Concurrency(Option<Arc<Semaphore>>);

impl Concurrency {
    /// `limit` ≤ 0 means unlimited.
    pub fn new(limit: i64) -> Self {
        Self(
            (limit > 0)
                .then(|| Arc::new(Semaphore::new(usize::try_from(limit).unwrap_or(usize::MAX)))),
        )
    }

    async fn acquire(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        match &self.0 {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        }
    }
}

/// Go's `http.CanonicalHeaderKey`.
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

fn excluded_header(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    matches!(
        k.as_str(),
        "content-type"
            | "content-length"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "traceparent"
            | "tracestate"
            | "host"
    ) || k.ends_with("-bin")
}

/// Retries discovery like daprd's built-in initialization policy (exponential from
/// 500 ms, at most 1 s apart, 3 retries).
async fn with_discovery_retries<T, F, Fut>(mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut delay = Duration::from_millis(500);
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt >= 3 => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, attempt, "subscription discovery failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
                attempt += 1;
            }
        }
    }
}

/// The HTTP app channel.
pub struct HttpChannel {
    client: reqwest::Client,
    base: String,
    app_id: String,
    token: Option<String>,
    concurrency: Concurrency,
}

impl HttpChannel {
    /// A channel to `http://address:port` (`h2c` uses HTTP/2 with prior knowledge,
    /// `https` TLS without certificate verification).
    ///
    /// # Errors
    /// The HTTP client could not be built.
    pub fn new(
        address: &str,
        port: u16,
        protocol: &str,
        app_id: &str,
        token: Option<String>,
        max_concurrency: i64,
    ) -> Result<Self, String> {
        // Title-case header names on the wire, as Go daprd sends them (Pubsubname, Traceparent).
        let mut builder = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .http1_title_case_headers();
        if protocol == "h2c" {
            builder = builder.http2_prior_knowledge();
        }
        let scheme = if protocol == "https" {
            // Like daprd: encrypted, the app's certificate is not verified.
            builder = builder
                .use_preconfigured_tls(crate::tls::insecure_client_config(&[b"h2", b"http/1.1"])?);
            "https"
        } else {
            "http"
        };
        let client = builder
            .build()
            .map_err(|e| format!("building the app HTTP client: {e}"))?;
        let host = if address.contains(':') && !address.starts_with('[') {
            format!("[{address}]")
        } else {
            address.to_string()
        };
        Ok(Self {
            client,
            base: format!("{scheme}://{host}:{port}"),
            app_id: app_id.to_string(),
            token,
            concurrency: Concurrency::new(max_concurrency),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            r = r.header("dapr-api-token", t);
        }
        r
    }
}

/// `/` + path, cleaned like Go's `path.Clean`.
pub fn app_path(path: &str) -> String {
    crate::api::http::go_path_clean(&format!("/{path}"))
}

#[async_trait]
impl AppChannel for HttpChannel {
    async fn list_subscriptions(&self) -> Result<Vec<SubscriptionSpec>, String> {
        with_discovery_retries(|| async {
            let resp = self
                .request(reqwest::Method::GET, "/dapr/subscribe")
                .header("content-type", "application/json")
                .header("dapr-app-id", &self.app_id)
                .send()
                .await
                .map_err(|e| format!("calling GET /dapr/subscribe: {e}"))?;
            let status = resp.status();
            if status == reqwest::StatusCode::NOT_FOUND {
                tracing::debug!("app has no GET /dapr/subscribe (404): no programmatic subscriptions");
                return Ok(Vec::new());
            }
            if !status.is_success() {
                tracing::error!(%status, "GET /dapr/subscribe failed; no programmatic subscriptions");
                return Ok(Vec::new());
            }
            let body = resp.bytes().await.map_err(|e| format!("reading GET /dapr/subscribe: {e}"))?;
            let (subs, warnings) = subscriptions::parse_programmatic_json(&body)?;
            for w in warnings {
                tracing::warn!("{w}");
            }
            Ok(subs)
        })
        .await
    }

    async fn deliver(&self, d: &Delivery) -> AppReply {
        let _permit = self.concurrency.acquire().await;
        let mut req = self
            .request(reqwest::Method::POST, &app_path(&d.path))
            .header("content-type", "application/cloudevents+json")
            .header("traceparent", &d.traceparent);
        if !d.tracestate.is_empty() {
            req = req.header("tracestate", &d.tracestate);
        }
        for (k, v) in &d.metadata {
            if excluded_header(k) {
                continue;
            }
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(canonical_header(k).as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                req = req.header(name, value);
            }
        }
        let resp = match req.body(d.body.clone()).send().await {
            Ok(r) => r,
            Err(e) => return AppReply::Retry(format!("delivering to the app: {e}"), None),
        };
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return AppReply::Drop {
                dead_letter: true,
                reason: format!("app returned 404 for {}", app_path(&d.path)),
            };
        }
        if !status.is_success() {
            return AppReply::Retry(
                format!("app returned HTTP {}", status.as_u16()),
                Some(i32::from(status.as_u16())),
            );
        }
        let body = resp.bytes().await.unwrap_or_default();
        interpret_status_body(&body)
    }

    async fn deliver_bulk(&self, b: &crate::bulk::BulkDelivery) -> crate::bulk::BulkReply {
        let _permit = self.concurrency.acquire().await;
        let body = daprd_core::json::to_vec_go(&crate::bulk::http_body(b)).unwrap_or_default();
        let mut req = self
            .request(reqwest::Method::POST, &app_path(&b.path))
            .header("content-type", "application/json");
        if let Some(first) = b.entries.first() {
            req = req.header("traceparent", &first.delivery.traceparent);
        }
        for (k, v) in &b.metadata {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(canonical_header(k).as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                req = req.header(name, value);
            }
        }
        let resp = match req.body(body).send().await {
            Ok(r) => r,
            Err(e) => {
                return crate::bulk::all(
                    b,
                    &AppReply::Retry(format!("delivering to the app: {e}"), None),
                )
            }
        };
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return crate::bulk::all(
                b,
                &AppReply::Drop {
                    dead_letter: false,
                    reason: "app returned 404 for a bulk delivery".into(),
                },
            );
        }
        if !status.is_success() {
            let code = Some(i32::from(status.as_u16()));
            return crate::bulk::all(
                b,
                &AppReply::Retry(format!("app returned HTTP {}", status.as_u16()), code),
            );
        }
        let body = resp.bytes().await.unwrap_or_default();
        match crate::bulk::interpret_bulk_body(&body) {
            Ok(r) => r,
            Err(e) => crate::bulk::all(b, &AppReply::Retry(e, None)),
        }
    }
}

/// What Go daprd makes of an HTTP app's 2xx body for one delivery (`status` SUCCESS, RETRY,
/// DROP, empty or unknown).
pub fn interpret_status_body(body: &[u8]) -> AppReply {
    let Ok(Json::Object(obj)) = serde_json::from_slice::<Json>(body) else {
        return AppReply::Success;
    };
    let status = obj.get("status").or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("status"))
            .map(|(_, v)| v)
    });
    match status {
        None | Some(Json::Null) => AppReply::Success,
        Some(Json::String(s)) => match s.as_str() {
            "" | "SUCCESS" => AppReply::Success,
            "RETRY" => AppReply::Retry("app asked for a retry".into(), None),
            "DROP" => AppReply::Drop {
                dead_letter: true,
                reason: "app dropped the message".into(),
            },
            other => AppReply::Retry(
                format!("unknown status {other:?} returned by the app"),
                None,
            ),
        },
        Some(other) => AppReply::Retry(format!("unknown status {other} returned by the app"), None),
    }
}

/// The gRPC app channel (`AppCallback`).
pub struct GrpcChannel {
    channel: tonic::transport::Channel,
    client: pb::app_callback_client::AppCallbackClient<tonic::transport::Channel>,
    token: Option<String>,
    concurrency: Concurrency,
}

impl GrpcChannel {
    /// A lazily connected channel to `address:port` (`tls`: grpcs, certificate not verified).
    ///
    /// # Errors
    /// The address does not make a valid URI.
    pub fn new(
        address: &str,
        port: u16,
        tls: bool,
        token: Option<String>,
        max_concurrency: i64,
    ) -> Result<Self, String> {
        let host = if address.contains(':') && !address.starts_with('[') {
            format!("[{address}]")
        } else {
            address.to_string()
        };
        let channel = if tls {
            crate::tls::grpcs_channel(&host, port)?
        } else {
            tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))
                .map_err(|e| format!("invalid app address: {e}"))?
                .connect_timeout(Duration::from_secs(5))
                .connect_lazy()
        };
        Ok(Self {
            client: pb::app_callback_client::AppCallbackClient::new(channel.clone())
                .max_decoding_message_size(usize::MAX),
            channel,
            token,
            concurrency: Concurrency::new(max_concurrency),
        })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            if let Ok(v) = t.parse() {
                r.metadata_mut().insert("dapr-api-token", v);
            }
        }
        r
    }
}

fn json_to_prost(v: &Json) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_prost).collect(),
        }),
        Json::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_prost(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Builds the `TopicEventRequest` Go daprd sends a gRPC app, from a decoded CloudEvent.
///
/// # Errors
/// `data_base64` that is not valid base64.
pub fn topic_event_request(d: &Delivery) -> Result<pb::TopicEventRequest, String> {
    use base64::Engine as _;
    use daprd_core::cloudevent as ce;
    let s = |k: &str| {
        d.event
            .get(k)
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string()
    };
    let content_type = s("datacontenttype");
    let data = if let Some(b64) = d.event.get("data_base64").filter(|v| !v.is_null()) {
        let text = b64.as_str().unwrap_or("");
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("invalid data_base64: {e}"))?
    } else if let Some(data) = d.event.get("data").filter(|v| !v.is_null()) {
        if ce::is_string_content_type(&content_type) {
            match data {
                Json::String(s) => s.clone().into_bytes(),
                other => other.to_string().into_bytes(),
            }
        } else if ce::is_json_content_type(&content_type)
            || ce::is_cloudevent_content_type(&content_type)
        {
            daprd_core::json::to_vec_go(data).unwrap_or_default()
        } else {
            Vec::new()
        }
    } else {
        Vec::new()
    };
    const CORE: [&str; 7] = [
        "id",
        "source",
        "datacontenttype",
        "type",
        "specversion",
        "data",
        "data_base64",
    ];
    let extensions = prost_types::Struct {
        fields: d
            .event
            .iter()
            .filter(|(k, _)| !CORE.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), json_to_prost(v)))
            .collect(),
    };
    Ok(pb::TopicEventRequest {
        id: s("id"),
        source: s("source"),
        r#type: s("type"),
        spec_version: s("specversion"),
        data_content_type: content_type,
        topic: d.topic.clone(),
        data,
        pubsub_name: d.pubsub.clone(),
        path: d.path.clone(),
        extensions: Some(extensions),
    })
}

/// What Go daprd makes of a gRPC app's `TopicEventResponse` status value.
pub fn interpret_grpc_status(status: i32) -> AppReply {
    use pb::topic_event_response::TopicEventResponseStatus as S;
    match S::try_from(status) {
        Ok(S::Success) => AppReply::Success,
        Ok(S::Retry) => AppReply::Retry("app asked for a retry".into(), None),
        Ok(S::Drop) => AppReply::Drop {
            dead_letter: true,
            reason: "app dropped the message".into(),
        },
        Err(_) => AppReply::Retry(format!("unknown status {status} returned by the app"), None),
    }
}

#[async_trait]
impl AppChannel for GrpcChannel {
    async fn list_subscriptions(&self) -> Result<Vec<SubscriptionSpec>, String> {
        let resp = with_discovery_retries(|| async {
            match self
                .client
                .clone()
                .list_topic_subscriptions(self.request(()))
                .await
            {
                Ok(r) => Ok(Some(r.into_inner())),
                Err(st) if st.code() == tonic::Code::Unimplemented => Ok(None),
                Err(st) => Err(format!("calling ListTopicSubscriptions: {st}")),
            }
        })
        .await?;
        let Some(resp) = resp else {
            tracing::info!(
                "app does not implement ListTopicSubscriptions: no programmatic subscriptions"
            );
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for s in resp.subscriptions {
            let (rules, default) = match &s.routes {
                Some(r) => (
                    r.rules
                        .iter()
                        .map(|x| (x.r#match.clone(), x.path.clone()))
                        .collect::<Vec<_>>(),
                    r.default.clone(),
                ),
                None => (Vec::new(), String::new()),
            };
            let mut rules = subscriptions::build_rules(&rules, &default, "")?;
            if rules.is_empty() {
                rules = subscriptions::build_rules(&[], "", "/")?;
                if let Some(r) = rules.first_mut() {
                    r.path = String::new();
                }
            }
            let bulk = s
                .bulk_subscribe
                .as_ref()
                .map(|b| subscriptions::BulkSubscribe {
                    enabled: b.enabled,
                    max_messages: if b.max_messages_count > 0 {
                        usize::try_from(b.max_messages_count).unwrap_or(100)
                    } else {
                        100
                    },
                    max_await_ms: if b.max_await_duration_ms > 0 {
                        u64::try_from(b.max_await_duration_ms).unwrap_or(1000)
                    } else {
                        1000
                    },
                });
            out.push(SubscriptionSpec {
                name: String::new(),
                pubsub: s.pubsub_name,
                topic: s.topic,
                rules,
                metadata: s.metadata.into_iter().collect(),
                dead_letter_topic: s.dead_letter_topic,
                bulk: bulk.unwrap_or_default(),
                kind: subscriptions::SubscriptionKind::Programmatic,
                scopes: Vec::new(),
            });
        }
        Ok(out)
    }

    async fn deliver(&self, d: &Delivery) -> AppReply {
        let _permit = self.concurrency.acquire().await;
        let msg = match topic_event_request(d) {
            Ok(m) => m,
            Err(e) => return AppReply::Retry(e, None),
        };
        let mut req = self.request(msg);
        for (k, v) in &d.metadata {
            let lower = k.to_ascii_lowercase();
            if lower == "content-type"
                || lower == "content-length"
                || lower.ends_with("-bin")
                || lower == "traceparent"
                || lower == "tracestate"
            {
                continue;
            }
            if let (Ok(key), Ok(val)) = (
                lower.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
                v.parse(),
            ) {
                req.metadata_mut().insert(key, val);
            }
        }
        if let Ok(tp) = d.traceparent.parse() {
            req.metadata_mut().insert("traceparent", tp);
        }
        match self.client.clone().on_topic_event(req).await {
            Ok(r) => interpret_grpc_status(r.into_inner().status),
            Err(st) if st.code() == tonic::Code::Unimplemented => AppReply::Drop {
                dead_letter: false,
                reason: "app does not implement OnTopicEvent".into(),
            },
            Err(st) => {
                AppReply::Retry(format!("OnTopicEvent failed: {st}"), Some(st.code() as i32))
            }
        }
    }

    async fn deliver_bulk(&self, b: &crate::bulk::BulkDelivery) -> crate::bulk::BulkReply {
        use pb::topic_event_bulk_request_entry::Event;
        let _permit = self.concurrency.acquire().await;
        let mut entries = Vec::with_capacity(b.entries.len());
        for e in &b.entries {
            let event = match &e.raw {
                Some(raw) => Event::Bytes(raw.to_vec()),
                None => match topic_event_request(&e.delivery) {
                    Ok(t) => Event::CloudEvent(pb::TopicEventCeRequest {
                        id: t.id,
                        source: t.source,
                        r#type: t.r#type,
                        spec_version: t.spec_version,
                        data_content_type: t.data_content_type,
                        data: t.data,
                        extensions: t.extensions,
                    }),
                    Err(err) => return crate::bulk::all(b, &AppReply::Retry(err, None)),
                },
            };
            entries.push(pb::TopicEventBulkRequestEntry {
                entry_id: e.entry_id.clone(),
                event: Some(event),
                content_type: e.content_type.clone(),
                metadata: e.delivery.metadata.clone().into_iter().collect(),
            });
        }
        let msg = pb::TopicEventBulkRequest {
            id: b.id.clone(),
            entries,
            metadata: b.metadata.clone().into_iter().collect(),
            topic: b.topic.clone(),
            pubsub_name: b.pubsub.clone(),
            r#type: daprd_core::cloudevent::DEFAULT_BULK_TYPE.into(),
            path: b.path.clone(),
        };
        let mut result = self
            .client
            .clone()
            .on_bulk_topic_event(self.request(msg.clone()))
            .await;
        if matches!(&result, Err(st) if st.code() == tonic::Code::Unimplemented) {
            tracing::debug!(topic = %b.topic, "app does not implement OnBulkTopicEvent; falling back to OnBulkTopicEventAlpha1");
            let mut alpha =
                pb::app_callback_alpha_client::AppCallbackAlphaClient::new(self.channel.clone());
            result = alpha.on_bulk_topic_event_alpha1(self.request(msg)).await;
        }
        match result {
            Ok(r) => r
                .into_inner()
                .statuses
                .into_iter()
                .map(|s| (s.entry_id, interpret_grpc_status(s.status)))
                .collect(),
            Err(st) if st.code() == tonic::Code::Unimplemented => crate::bulk::all(
                b,
                &AppReply::Drop {
                    dead_letter: false,
                    reason: "app implements no bulk topic event method".into(),
                },
            ),
            Err(st) => crate::bulk::all(
                b,
                &AppReply::Retry(
                    format!("OnBulkTopicEvent failed: {st}"),
                    Some(st.code() as i32),
                ),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_header_names_like_go() {
        assert_eq!(canonical_header("pubsubName"), "Pubsubname");
        assert_eq!(canonical_header("x-my-header"), "X-My-Header");
        assert_eq!(canonical_header("__key"), "__key");
        assert_eq!(canonical_header("with space"), "with space");
    }

    #[test]
    fn http_2xx_body_table() {
        assert_eq!(interpret_status_body(b""), AppReply::Success);
        assert_eq!(interpret_status_body(b"not json"), AppReply::Success);
        assert_eq!(
            interpret_status_body(br#"{"status":""}"#),
            AppReply::Success
        );
        assert_eq!(interpret_status_body(br#"{"other":1}"#), AppReply::Success);
        assert_eq!(
            interpret_status_body(br#"{"status":"SUCCESS"}"#),
            AppReply::Success
        );
        assert!(matches!(
            interpret_status_body(br#"{"status":"RETRY"}"#),
            AppReply::Retry(..)
        ));
        assert!(matches!(
            interpret_status_body(br#"{"status":"DROP"}"#),
            AppReply::Drop {
                dead_letter: true,
                ..
            }
        ));
        assert!(
            matches!(
                interpret_status_body(br#"{"status":"success"}"#),
                AppReply::Retry(..)
            ),
            "lowercase is unknown"
        );
        assert!(matches!(
            interpret_status_body(br#"{"status":"MAYBE"}"#),
            AppReply::Retry(..)
        ));
    }

    #[test]
    fn grpc_status_table() {
        assert_eq!(interpret_grpc_status(0), AppReply::Success);
        assert!(matches!(interpret_grpc_status(1), AppReply::Retry(..)));
        assert!(matches!(
            interpret_grpc_status(2),
            AppReply::Drop {
                dead_letter: true,
                ..
            }
        ));
        assert!(matches!(interpret_grpc_status(7), AppReply::Retry(..)));
    }

    #[test]
    fn topic_event_request_mapping() {
        let event: Map<String, Json> = serde_json::from_str(
            r#"{"id":"1","source":"s","type":"t","specversion":"1.0","datacontenttype":"application/json","data":{"a":1},"topic":"orders","pubsubname":"ps","traceid":"x","custom":"c"}"#,
        ).unwrap();
        let d = Delivery {
            path: "/orders".into(),
            body: Bytes::new(),
            event,
            metadata: BTreeMap::new(),
            topic: "orders".into(),
            pubsub: "ps".into(),
            traceparent: String::new(),
            tracestate: String::new(),
        };
        let r = topic_event_request(&d).unwrap();
        assert_eq!(
            (
                r.id.as_str(),
                r.source.as_str(),
                r.r#type.as_str(),
                r.spec_version.as_str()
            ),
            ("1", "s", "t", "1.0")
        );
        assert_eq!(r.data, br#"{"a":1}"#);
        assert_eq!(r.path, "/orders");
        let ext = r.extensions.unwrap().fields;
        assert!(
            ext.contains_key("topic")
                && ext.contains_key("pubsubname")
                && ext.contains_key("traceid")
                && ext.contains_key("custom")
        );
        assert!(!ext.contains_key("id") && !ext.contains_key("data"));

        let mut d2 = d.clone();
        d2.event =
            serde_json::from_str(r#"{"id":"2","datacontenttype":"text/plain","data":"hello"}"#)
                .unwrap();
        assert_eq!(topic_event_request(&d2).unwrap().data, b"hello");
        d2.event = serde_json::from_str(
            r#"{"id":"3","datacontenttype":"application/octet-stream","data_base64":"AAE="}"#,
        )
        .unwrap();
        assert_eq!(topic_event_request(&d2).unwrap().data, vec![0, 1]);
        d2.event = serde_json::from_str(r#"{"id":"4","data_base64":"!!"}"#).unwrap();
        assert!(topic_event_request(&d2).is_err());
    }
}
