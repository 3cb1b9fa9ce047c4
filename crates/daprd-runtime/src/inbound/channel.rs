//! App channels: how daprd reaches the app to discover subscriptions and deliver events —
//! HTTP (`--app-protocol http|h2c|https`, pooled connections, [`http`]) and gRPC
//! (`grpc|grpcs`, `AppCallback`, [`grpc`]) — and what travels over them: one event
//! ([`Delivery`]), a bulk batch ([`BulkDelivery`]) and the app's answers ([`AppReply`]).

pub mod grpc;
pub mod http;
pub mod reach;
pub mod tls;

pub use grpc::GrpcChannel;
pub use http::HttpChannel;

use daprd_core::backoff::Backoff;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Map, Value as Json};
use tokio::sync::Semaphore;

use crate::inbound::subscriptions::SubscriptionSpec;
use crate::resiliency::StatusCode;

/// `address` as the host of a URI or socket address: an IPv6 address goes in brackets.
pub(crate) fn uri_host(address: &str) -> std::borrow::Cow<'_, str> {
    if address.contains(':') && !address.starts_with('[') {
        format!("[{address}]").into()
    } else {
        address.into()
    }
}

/// What the app made of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppReply {
    /// Processed.
    Success,
    /// Not processed; may be retried: why, and the app's HTTP status or gRPC code if any.
    Retry(String, Option<StatusCode>),
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
    async fn list_subscriptions(&self) -> Result<Vec<SubscriptionSpec>, ChannelError>;
    /// Delivers one event.
    async fn deliver(&self, delivery: &Delivery) -> AppReply;
    /// One app health probe over this channel (Go daprd probes through the app channel, so
    /// an `https`, `h2c` or `grpcs` app is probed the way it is reached): HTTP `GET <path>`
    /// answering 2xx, or gRPC `AppCallbackHealthCheck.HealthCheck` answering OK.
    async fn health_probe(&self, path: &str, timeout: Duration) -> bool;

    /// Delivers a batch; by default one event at a time.
    async fn deliver_bulk(&self, batch: &BulkDelivery) -> BulkReply {
        let mut out = BulkReply::new();
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

/// One entry of a bulk delivery.
#[derive(Debug, Clone)]
pub struct BulkEntryOut {
    /// Generated entry id.
    pub entry_id: String,
    /// The event: the CloudEvent object, or for raw subscriptions the base64 payload.
    pub event: Json,
    /// `application/cloudevents+json`, or `application/octet-stream` for raw.
    pub content_type: String,
    /// Raw payload bytes (raw subscriptions).
    pub raw: Option<bytes::Bytes>,
    /// The single-event view (for the gRPC CloudEvent mapping).
    pub delivery: Delivery,
}

/// A batch for one route path.
#[derive(Debug, Clone)]
pub struct BulkDelivery {
    /// Batch id.
    pub id: String,
    /// Route path.
    pub path: String,
    /// Topic.
    pub topic: String,
    /// Component name.
    pub pubsub: String,
    /// Batch metadata.
    pub metadata: BTreeMap<String, String>,
    /// Entries.
    pub entries: Vec<BulkEntryOut>,
}

/// Per-entry answers of the app; an entry missing from the map is a retry.
pub type BulkReply = HashMap<String, AppReply>;

/// Replies for every entry of `b`.
pub fn all(b: &BulkDelivery, reply: &AppReply) -> BulkReply {
    b.entries
        .iter()
        .map(|e| (e.entry_id.clone(), reply.clone()))
        .collect()
}

/// Why the app channel could not be set up, or could not list the app's subscriptions.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// TLS to the app could not be set up.
    #[error("setting up TLS: {0}")]
    Tls(#[from] daprd_core::tls::TlsError),
    /// The app's address does not make a valid URI or server name.
    #[error("invalid app address {address:?}: {reason}")]
    Address {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("building the app HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// Asking the app for its subscriptions failed.
    #[error("{call}: {source}")]
    Discovery {
        /// The call (`GET /dapr/subscribe`, `ListTopicSubscriptions`).
        call: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The app's subscriptions are invalid.
    #[error("the app's subscriptions: {0}")]
    Subscriptions(String),
}

impl ChannelError {
    /// An unusable app address.
    pub fn address(address: &str, reason: impl std::fmt::Display) -> Self {
        Self::Address {
            address: address.to_string(),
            reason: reason.to_string(),
        }
    }

    /// `call` to the app failed.
    pub fn discovery(
        call: &'static str,
    ) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> Self {
        move |source| Self::Discovery { call, source }
    }
}

/// Retries discovery like daprd's built-in initialization policy (exponential from
/// 500 ms, at most 1 s apart, 3 retries).
pub(crate) async fn with_discovery_retries<T, F, Fut>(mut f: F) -> Result<T, ChannelError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ChannelError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(1));
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt >= 3 => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, attempt, "subscription discovery failed; retrying");
                tokio::time::sleep(backoff.next_pause()).await;
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AppProtocol;
    use reach::Reach;

    #[test]
    fn ipv6_hosts_go_in_brackets() {
        assert_eq!(uri_host("127.0.0.1"), "127.0.0.1");
        assert_eq!(uri_host("localhost"), "localhost");
        assert_eq!(uri_host("::1"), "[::1]");
        assert_eq!(uri_host("[::1]"), "[::1]");
    }

    #[tokio::test]
    async fn an_app_on_ipv6_loopback_is_found_listening() {
        let Ok(listener) = tokio::net::TcpListener::bind("[::1]:0").await else {
            return; // no IPv6 on this machine
        };
        let port = listener.local_addr().unwrap().port();
        assert!(reach::accepts(&format!("{}:{port}", uri_host("::1"))).await);
    }

    fn delivery() -> Delivery {
        Delivery {
            path: "/orders".into(),
            body: Bytes::from_static(b"{}"),
            event: serde_json::from_str(
                r#"{"id":"1","source":"s","type":"t","specversion":"1.0","data":{}}"#,
            )
            .unwrap_or_default(),
            metadata: BTreeMap::new(),
            topic: "orders".into(),
            pubsub: "ps".into(),
            traceparent: String::new(),
            tracestate: String::new(),
        }
    }

    async fn eventually(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A delivery the app's port refused closes the gate (each channel recognises its
    /// client's connection failure), and the gate opens once the port listens again.
    async fn gate_follows_the_port(channel: &dyn AppChannel, reach: &Reach, port: u16) {
        assert!(matches!(
            channel.deliver(&delivery()).await,
            AppReply::Retry(..)
        ));
        eventually("the gate to close", || !reach.is_up()).await;
        let _app = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("the port is free again");
        eventually("the gate to open", || reach.is_up()).await;
    }

    #[tokio::test]
    async fn http_deliveries_to_a_closed_port_close_the_gate() {
        let port = daprd_testkit::free_port();
        let ch = HttpChannel::new("127.0.0.1", port, AppProtocol::Http, "app", None, -1)
            .expect("the channel");
        gate_follows_the_port(&ch, ch.reach(), port).await;
    }

    #[tokio::test]
    async fn grpc_deliveries_to_a_closed_port_close_the_gate() {
        let port = daprd_testkit::free_port();
        let ch = GrpcChannel::new("127.0.0.1", port, false, None, -1).expect("the channel");
        gate_follows_the_port(&ch, ch.reach(), port).await;
    }
}
