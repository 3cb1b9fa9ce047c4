//! The HTTP app channel: events as `POST /<route>` with the CloudEvent (or raw) body,
//! subscriptions from `GET /dapr/subscribe`, bulk batches as one request per route.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use daprd_core::gocompat::canonical_header;
use serde_json::Value as Json;

use super::reach::{Reach, HOLD};
use super::{
    all, with_discovery_retries, AppChannel, AppReply, BulkDelivery, BulkReply, ChannelError,
    Concurrency, Delivery,
};
use crate::config::AppProtocol;
use crate::inbound::subscriptions::{self, SubscriptionSpec};
use crate::resiliency::StatusCode;

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

/// The HTTP app channel.
pub struct HttpChannel {
    client: reqwest::Client,
    base: String,
    app_id: String,
    token: Option<String>,
    concurrency: Concurrency,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    reach: Reach,
    /// The URL of each route delivered to, parsed once (the parse and its IDNA host check
    /// were a per-delivery cost); bounded, a route past the bound is parsed per call.
    urls: std::sync::RwLock<HashMap<String, reqwest::Url>>,
}

/// Routes whose URL [`HttpChannel`] keeps parsed.
const URL_CACHE: usize = 256;

impl HttpChannel {
    /// A channel to `http://address:port` (`h2c` uses HTTP/2 with prior knowledge,
    /// `https` TLS without certificate verification).
    ///
    /// # Errors
    /// The HTTP client could not be built.
    pub fn new(
        address: &str,
        port: u16,
        protocol: AppProtocol,
        app_id: &str,
        token: Option<String>,
        max_concurrency: i64,
    ) -> Result<Self, ChannelError> {
        // Title-case header names on the wire, as Go daprd sends them (Pubsubname, Traceparent).
        let mut builder = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .http1_title_case_headers();
        if protocol == AppProtocol::H2c {
            builder = builder.http2_prior_knowledge();
        }
        let scheme = if protocol == AppProtocol::Https {
            // Like daprd: encrypted, the app's certificate is not verified.
            builder = builder
                .use_preconfigured_tls(super::tls::insecure_client_config(&[b"h2", b"http/1.1"])?);
            "https"
        } else {
            "http"
        };
        let client = builder.build().map_err(ChannelError::Client)?;
        let host = super::uri_host(address);
        Ok(Self {
            client,
            base: format!("{scheme}://{host}:{port}"),
            app_id: app_id.to_string(),
            token,
            concurrency: Concurrency::new(max_concurrency),
            metrics: None,
            reach: Reach::new(address, port, HOLD, None),
            urls: std::sync::RwLock::default(),
        })
    }

    /// Deliveries waiting for an app that stopped listening give up when `shutdown` begins.
    #[must_use]
    pub fn with_shutdown(mut self, shutdown: crate::state::Shutdown) -> Self {
        self.reach = self.reach.with_shutdown(shutdown);
        self
    }

    /// The app's reachability as this channel sees it.
    #[cfg(test)]
    pub(crate) fn reach(&self) -> &Reach {
        &self.reach
    }

    /// Counts every delivery in the `dapr_http_client_*` series of `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics.enabled().then_some(metrics);
        self
    }

    fn record(
        &self,
        path: &str,
        status: u16,
        sent: usize,
        received: usize,
        started: std::time::Instant,
    ) {
        if let Some(m) = &self.metrics {
            m.http_client(
                "POST",
                path,
                status,
                sent as u64,
                received as u64,
                started.elapsed(),
            );
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.authorized(
            self.client
                .request(method, format!("{}{}", self.base, path)),
        )
    }

    fn authorized(&self, mut r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        if let Some(t) = &self.token {
            r = r.header("dapr-api-token", t);
        }
        r
    }

    /// A `POST` of an event to the app's `path` (already cleaned by [`app_path`]).
    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let cached = self
            .urls
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(path)
            .cloned();
        let url = match cached {
            Some(url) => url,
            None => match reqwest::Url::parse(&format!("{}{}", self.base, path)) {
                Ok(url) => {
                    let mut urls = self
                        .urls
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if urls.len() < URL_CACHE {
                        urls.insert(path.to_string(), url.clone());
                    }
                    url
                }
                // reqwest reports the bad URL when the request is sent
                Err(_) => return self.request(reqwest::Method::POST, path),
            },
        };
        self.authorized(self.client.post(url))
    }
}

/// `/` + path, cleaned like Go's `path.Clean`.
pub fn app_path(path: &str) -> String {
    daprd_core::gocompat::go_path_clean(&format!("/{path}"))
}

#[async_trait]
impl AppChannel for HttpChannel {
    async fn health_probe(&self, path: &str, timeout: Duration) -> bool {
        let probe = self.request(reqwest::Method::GET, &app_path(path)).send();
        matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(r)) if r.status().is_success())
    }

    async fn list_subscriptions(&self) -> Result<Vec<SubscriptionSpec>, ChannelError> {
        with_discovery_retries(|| async {
            let resp = self
                .request(reqwest::Method::GET, "/dapr/subscribe")
                .header("content-type", "application/json")
                .header("dapr-app-id", &self.app_id)
                .send()
                .await
                .map_err(|e| ChannelError::discovery("calling GET /dapr/subscribe")(e.into()))?;
            let status = resp.status();
            if status == reqwest::StatusCode::NOT_FOUND {
                tracing::debug!("app has no GET /dapr/subscribe (404): no programmatic subscriptions");
                return Ok(Vec::new());
            }
            if !status.is_success() {
                tracing::error!(%status, "GET /dapr/subscribe failed; no programmatic subscriptions");
                return Ok(Vec::new());
            }
            let body = resp
                .bytes()
                .await
                .map_err(|e| ChannelError::discovery("reading GET /dapr/subscribe")(e.into()))?;
            let (subs, warnings) =
                subscriptions::parse_programmatic_json(&body).map_err(ChannelError::Subscriptions)?;
            for w in warnings {
                tracing::warn!("{w}");
            }
            Ok(subs)
        })
        .await
    }

    async fn deliver(&self, d: &Delivery) -> AppReply {
        if let Err(why) = self.reach.ready().await {
            return AppReply::Retry(why, None);
        }
        let _permit = self.concurrency.acquire().await;
        let path = app_path(&d.path);
        let mut req = self
            .post(&path)
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
        let started = std::time::Instant::now();
        let resp = match req.body(d.body.clone()).send().await {
            Ok(r) => r,
            Err(e) => {
                if e.is_connect() {
                    self.reach.suspect();
                }
                return AppReply::Retry(format!("delivering to the app: {e}"), None);
            }
        };
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        self.record(&path, status.as_u16(), d.body.len(), body.len(), started);
        if status == reqwest::StatusCode::NOT_FOUND {
            return AppReply::Drop {
                dead_letter: true,
                reason: format!("app returned 404 for {path}"),
            };
        }
        if !status.is_success() {
            return AppReply::Retry(
                format!("app returned HTTP {}", status.as_u16()),
                Some(StatusCode::Http(status.as_u16())),
            );
        }
        interpret_status_body(&body)
    }

    async fn deliver_bulk(&self, b: &BulkDelivery) -> BulkReply {
        if let Err(why) = self.reach.ready().await {
            return all(b, &AppReply::Retry(why, None));
        }
        let _permit = self.concurrency.acquire().await;
        let body = daprd_core::json::to_vec_go(&http_body(b)).unwrap_or_default();
        let mut req = self
            .post(&app_path(&b.path))
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
                if e.is_connect() {
                    self.reach.suspect();
                }
                return all(
                    b,
                    &AppReply::Retry(format!("delivering to the app: {e}"), None),
                );
            }
        };
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return all(
                b,
                &AppReply::Drop {
                    dead_letter: false,
                    reason: "app returned 404 for a bulk delivery".into(),
                },
            );
        }
        if !status.is_success() {
            let code = Some(StatusCode::Http(status.as_u16()));
            return all(
                b,
                &AppReply::Retry(format!("app returned HTTP {}", status.as_u16()), code),
            );
        }
        let body = resp.bytes().await.unwrap_or_default();
        match interpret_bulk_body(&body) {
            Ok(r) => r,
            Err(e) => all(b, &AppReply::Retry(e, None)),
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

/// What Go daprd makes of an app's 2xx answer to a bulk delivery (per-entry statuses).
pub fn interpret_bulk_body(body: &[u8]) -> Result<BulkReply, String> {
    let v: Json =
        serde_json::from_slice(body).map_err(|e| format!("invalid bulk response: {e}"))?;
    let Json::Object(obj) = v else {
        return Err("invalid bulk response: not an object".into());
    };
    let find = |o: &serde_json::Map<String, Json>, k: &str| {
        o.iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    let mut out = HashMap::new();
    if let Some(Json::Array(statuses)) = find(&obj, "statuses") {
        for s in statuses {
            let Json::Object(so) = s else { continue };
            let Some(Json::String(id)) = find(&so, "entryId") else {
                continue;
            };
            let reply = match find(&so, "status") {
                Some(Json::String(st)) if st == "SUCCESS" => AppReply::Success,
                Some(Json::String(st)) if st == "DROP" => AppReply::Drop {
                    dead_letter: true,
                    reason: "app dropped the entry".into(),
                },
                other => AppReply::Retry(format!("entry status {other:?}"), None),
            };
            out.insert(id, reply);
        }
    }
    Ok(out)
}

/// The HTTP bulk request body.
pub fn http_body(b: &BulkDelivery) -> Json {
    let entries: Vec<Json> = b
        .entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "entryId": e.entry_id,
                "event": e.event,
                "metadata": e.delivery.metadata,
                "contentType": e.content_type,
            })
        })
        .collect();
    serde_json::json!({
        "id": b.id,
        "type": daprd_core::cloudevent::DEFAULT_BULK_TYPE,
        "topic": b.topic,
        "pubsubname": b.pubsub,
        "metadata": b.metadata,
        "entries": entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_posts_reuse_the_route_url_and_carry_the_token() {
        let ch = HttpChannel::new(
            "localhost",
            3000,
            AppProtocol::Http,
            "app",
            Some("t0k".into()),
            -1,
        )
        .unwrap();
        for _ in 0..2 {
            let req = ch.post(&app_path("orders/new")).build().unwrap();
            assert_eq!(req.url().as_str(), "http://localhost:3000/orders/new");
            assert_eq!(req.headers()["dapr-api-token"], "t0k");
        }
        assert_eq!(ch.urls.read().unwrap().len(), 1);
        // a route with characters a URL escapes is sent as reqwest would parse it
        let req = ch.post("/a b?x=1").build().unwrap();
        assert_eq!(req.url().as_str(), "http://localhost:3000/a%20b?x=1");
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
    fn bulk_statuses_table() {
        let r = interpret_bulk_body(br#"{"statuses":[{"entryId":"a","status":"SUCCESS"},{"entryId":"b","status":"DROP"},{"entryId":"c","status":"RETRY"},{"entryId":"d","status":""},{"EntryID":"e","Status":"SUCCESS"}]}"#).unwrap();
        assert_eq!(r["a"], AppReply::Success);
        assert!(matches!(
            r["b"],
            AppReply::Drop {
                dead_letter: true,
                ..
            }
        ));
        assert!(matches!(r["c"], AppReply::Retry(..)));
        assert!(
            matches!(r["d"], AppReply::Retry(..)),
            "empty status is a retry in bulk"
        );
        assert_eq!(r["e"], AppReply::Success, "keys match case-insensitively");
        assert!(!r.contains_key("f"));
        assert!(interpret_bulk_body(b"nope").is_err());
    }
}
