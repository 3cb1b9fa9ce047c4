//! The pub/sub component contract.
//!
//! A [`PubSubFactory`] is registered per component type. Loading calls its pure
//! [`validate`](PubSubFactory::validate) for every component first (so all problems are
//! reported together), then [`connect`](PubSubFactory::connect), which does the I/O and
//! returns a live [`PubSub`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;

use crate::metadata::{Metadata, MetadataError};

/// Optional capabilities a component declares (reported in `/v1.0/metadata`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Feature {
    /// The broker enforces per-message TTL itself (no `expiration` field is added).
    MessageTtl,
    /// Subscription topics may contain wildcards.
    SubscribeWildcards,
    /// Native bulk publish.
    BulkPublish,
    /// Bulk subscriptions flush on arrival.
    BulkSubscribeImmediate,
}

impl Feature {
    /// Dapr's name for the feature.
    pub fn as_str(self) -> &'static str {
        match self {
            Feature::MessageTtl => "MESSAGE_TTL",
            Feature::SubscribeWildcards => "SUBSCRIBE_WILDCARDS",
            Feature::BulkPublish => "BULK_PUBSUB",
            Feature::BulkSubscribeImmediate => "BULK_SUBSCRIBE_IMMEDIATE",
        }
    }
}

/// One publish to a component.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    /// Component name.
    pub pubsub_name: String,
    /// Broker topic (after any namespace prefix).
    pub topic: String,
    /// Bytes to publish (a CloudEvent envelope unless raw).
    pub data: Bytes,
    /// Request metadata, passed on unchanged.
    pub metadata: BTreeMap<String, String>,
    /// Content type, when the caller knows it (not set by the publish API, as in Dapr).
    pub content_type: Option<String>,
}

/// One entry of a bulk publish.
#[derive(Debug, Clone)]
pub struct BulkEntry {
    /// Caller's id for the entry, unique within the request.
    pub entry_id: String,
    /// Bytes to publish.
    pub data: Bytes,
    /// Content type of the entry.
    pub content_type: String,
    /// Per-entry metadata.
    pub metadata: BTreeMap<String, String>,
}

/// A bulk publish to a component.
#[derive(Debug, Clone)]
pub struct BulkPublishRequest {
    /// Component name.
    pub pubsub_name: String,
    /// Broker topic.
    pub topic: String,
    /// Entries to publish.
    pub entries: Vec<BulkEntry>,
    /// Request-level metadata.
    pub metadata: BTreeMap<String, String>,
}

/// An entry a bulk publish could not publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedEntry {
    /// The entry's id.
    pub entry_id: String,
    /// Why it failed.
    pub error: String,
}

/// A message received from the broker, handed to the runtime's handler.
#[derive(Debug, Clone)]
pub struct Message {
    /// Topic the message arrived on.
    pub topic: String,
    /// Raw bytes as published.
    pub data: Bytes,
    /// Broker metadata (headers, properties, ...).
    pub metadata: BTreeMap<String, String>,
    /// Content type, if the broker carries one.
    pub content_type: Option<String>,
    /// The message was handed out before (the broker says so: RabbitMQ's `redelivered`,
    /// JetStream's delivery count, SQS's receive count, a Redis entry taken from the pending
    /// list; or the component hands it again itself after a `Retry`). Counted by the runtime
    /// in `dapr_component_pubsub_ingress_redelivered_count`.
    pub redelivered: bool,
}

/// What became of a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Processed: acknowledge.
    Success,
    /// Not processed: let the broker redeliver (nack / leave pending).
    Retry,
    /// Will never be processed: acknowledge without processing.
    Drop,
}

/// A subscription request.
#[derive(Debug, Clone)]
pub struct SubscribeRequest {
    /// Broker topic (may hold wildcards where the component supports them).
    pub topic: String,
    /// Subscription metadata, passed on unchanged.
    pub metadata: BTreeMap<String, String>,
    /// A bulk subscription batching up to this many messages: a component that otherwise
    /// hands over one message at a time (per partition, per queue) may hand over up to this
    /// many before the first is answered, so that the runtime can batch them.
    pub bulk: Option<usize>,
}

impl SubscribeRequest {
    /// A plain (not bulk) subscription to `topic` with no metadata.
    pub fn new(topic: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            metadata: BTreeMap::new(),
            bulk: None,
        }
    }
}

/// The runtime's callback for each received message.
pub type Handler = Arc<dyn Fn(Message) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// A live subscription. Dropping it (or calling [`Subscription::close`]) stops the
/// component's consume loop for it; [`Subscription::stop`] also waits until every message
/// it handed to the handler is settled (acked, nacked or left for redelivery).
pub struct Subscription {
    stop: Option<Box<dyn FnOnce() + Send + Sync>>,
    drained: Option<Drained>,
    idle: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    quiesce: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Subscription {
    /// A subscription whose `stop` runs once, on close or drop.
    pub fn new(stop: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self {
            stop: Some(Box::new(stop)),
            drained: None,
            idle: None,
            quiesce: None,
        }
    }

    /// The same subscription, whose [`Subscription::quiesce`] runs `quiesce`: stop taking
    /// messages from the broker while delivering those already taken.
    #[must_use]
    pub fn with_quiesce(mut self, quiesce: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.quiesce = Some(Box::new(quiesce));
        self
    }

    /// Stops taking new messages from the broker but keeps delivering the ones taken (a
    /// component without a queue of its own in the process does nothing here). Hot reload
    /// quiesces a replaced subscription, waits for [`Subscription::is_idle`], then stops it:
    /// what it had taken is delivered rather than left for a late redelivery.
    pub fn quiesce(&mut self) {
        if let Some(quiesce) = self.quiesce.take() {
            quiesce();
        }
    }

    /// The same subscription, whose [`Subscription::is_idle`] asks `idle`: for a component
    /// that queues messages in the process for this subscription (in-memory), whether that
    /// queue is empty.
    #[must_use]
    pub fn with_idle(mut self, idle: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.idle = Some(Box::new(idle));
        self
    }

    /// Whether no message waits in the process for this subscription (true for a component
    /// that keeps nothing in the process: its broker holds what is not delivered yet). Hot
    /// reload waits for it before stopping a replaced subscription, so that nothing queued
    /// is dropped.
    pub fn is_idle(&self) -> bool {
        self.idle.as_ref().is_none_or(|idle| idle())
    }

    /// The same subscription, whose [`Subscription::stop`] waits for `drained`: the
    /// component's consume tasks hold the matching [`DrainGuard`]s and drop them once they
    /// fetch no more and have settled what they handed over.
    #[must_use]
    pub fn with_drain(mut self, drained: Drained) -> Self {
        self.drained = Some(drained);
        self
    }

    /// Stops the subscription now.
    pub fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }

    /// Stops fetching now; the returned future resolves once every message already handed
    /// to the handler has been settled with the broker (at once for a component that does
    /// not track it).
    pub fn stop(mut self) -> BoxFuture<'static, ()> {
        if let Some(stop) = self.stop.take() {
            stop();
        }
        match self.drained.take() {
            Some(d) => Box::pin(d.wait()),
            None => Box::pin(std::future::ready(())),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("open", &self.stop.is_some())
            .field("drain", &self.drained.is_some())
            .finish()
    }
}

/// Held by each task of a subscription that may still settle a message with the broker;
/// cloned freely. [`Drained`] resolves when the last one is dropped.
#[derive(Clone)]
pub struct DrainGuard(#[allow(dead_code)] futures::channel::mpsc::Sender<std::convert::Infallible>);

/// Resolves when every [`DrainGuard`] of its pair is gone.
pub struct Drained(futures::channel::mpsc::Receiver<std::convert::Infallible>);

impl Drained {
    /// Waits for the last guard to drop.
    pub async fn wait(mut self) {
        use futures::StreamExt as _;
        // Nothing is ever sent: `next` answers `None` once every sender is dropped.
        while self.0.next().await.is_some() {}
    }
}

/// A new guard and the future that waits for it and all its clones.
pub fn drain_tracker() -> (DrainGuard, Drained) {
    let (tx, rx) = futures::channel::mpsc::channel(0);
    (DrainGuard(tx), Drained(rx))
}

/// Whether a component error is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The broker may accept the same request later (connection lost, timeout, ...).
    Transient,
    /// Retrying the same request will fail again (bad input, missing entity, ...).
    Permanent,
}

/// An error raised by a pub/sub component.
#[derive(Debug, thiserror::Error)]
pub enum PubSubError {
    /// The component's metadata is invalid.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// Connecting to the broker failed.
    #[error("connecting to the broker: {message}")]
    Connect {
        /// What failed.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The broker refused or failed an operation.
    #[error("{message}")]
    Broker {
        /// What failed.
        message: String,
        /// Transient or permanent.
        kind: ErrorKind,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The component has been closed (permanent: retrying cannot help).
    #[error("component is closed")]
    Closed,
    /// The operation is not supported by this component.
    #[error("{0} is not supported by this component")]
    Unsupported(&'static str),
}

impl From<Vec<MetadataError>> for PubSubError {
    /// The first of a component's metadata problems (`validate` has reported them all).
    fn from(mut errors: Vec<MetadataError>) -> Self {
        if errors.is_empty() {
            PubSubError::Metadata(MetadataError::new("metadata", "is invalid"))
        } else {
            PubSubError::Metadata(errors.remove(0))
        }
    }
}

impl PubSubError {
    /// The broker failed `what` for a reason a later attempt may not meet (connection lost,
    /// timeout, broker busy). The message is `<component>: <what>: <error>` followed by the
    /// error's source chain; the error stays the source.
    pub fn transient(
        component: &str,
        what: &str,
        error: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::with_kind(ErrorKind::Transient, component, what, error)
    }

    /// The broker refused `what` in a way the same request will meet again (too large,
    /// unknown entity, not authorized): as [`PubSubError::transient`], permanent.
    pub fn permanent(
        component: &str,
        what: &str,
        error: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::with_kind(ErrorKind::Permanent, component, what, error)
    }

    /// A broker error whose kind the component decided (e.g. from the broker's error code).
    pub fn with_kind(
        kind: ErrorKind,
        component: &str,
        what: &str,
        error: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        // Client libraries' own Display is often terse ("service error"); the reason is
        // further down the source chain.
        let mut message = format!("{component}: {what}: {error}");
        let mut source = std::error::Error::source(&error);
        while let Some(s) = source {
            let text = s.to_string();
            if !message.ends_with(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = s.source();
        }
        Self::Broker {
            message,
            kind,
            source: Some(Box::new(error)),
        }
    }

    /// A broker error of `kind` with a message and no underlying error.
    pub fn broker(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::Broker {
            message: message.into(),
            kind,
            source: None,
        }
    }

    /// Whether retrying could help.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PubSubError::Connect { .. } => ErrorKind::Transient,
            PubSubError::Broker { kind, .. } => *kind,
            PubSubError::Metadata(_) | PubSubError::Unsupported(_) | PubSubError::Closed => {
                ErrorKind::Permanent
            }
        }
    }
}

/// A live pub/sub component.
#[async_trait]
pub trait PubSub: Send + Sync {
    /// Optional capabilities.
    fn features(&self) -> &[Feature];

    /// Publishes one message.
    async fn publish(&self, request: PublishRequest) -> Result<(), PubSubError>;

    /// Publishes many messages natively. Only called when [`Feature::BulkPublish`] is
    /// declared; the runtime otherwise publishes entries one by one.
    async fn bulk_publish(
        &self,
        _request: BulkPublishRequest,
    ) -> Result<Vec<FailedEntry>, PubSubError> {
        Err(PubSubError::Unsupported("bulk publish"))
    }

    /// Starts consuming `request.topic`, calling `handler` for each message and
    /// acknowledging according to the returned [`Outcome`].
    async fn subscribe(
        &self,
        request: SubscribeRequest,
        handler: Handler,
    ) -> Result<Subscription, PubSubError>;

    /// Stops every subscription and closes the connection.
    async fn close(&self) -> Result<(), PubSubError> {
        Ok(())
    }
}

/// Builds components of one type.
#[async_trait]
pub trait PubSubFactory: Send + Sync {
    /// Canonical type, e.g. `pubsub.redis`.
    fn component_type(&self) -> &'static str;

    /// Other type names Dapr accepts for this component (e.g. `pubsub.mqtt`).
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }

    /// Versions served (`""`, `v0` and `v1` all select `v1`).
    fn versions(&self) -> &'static [&'static str] {
        &["v1"]
    }

    /// Checks `metadata` without any I/O; returns every problem found.
    fn validate(&self, metadata: &Metadata) -> Vec<MetadataError>;

    /// Connects to the broker.
    async fn connect(
        &self,
        name: &str,
        metadata: &Metadata,
    ) -> Result<Arc<dyn PubSub>, PubSubError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn stop_waits_for_every_guard() {
        let stopped = Arc::new(AtomicBool::new(false));
        let (guard, drained) = drain_tracker();
        let s = stopped.clone();
        let sub = Subscription::new(move || s.store(true, Ordering::SeqCst)).with_drain(drained);
        let second = guard.clone();
        let mut wait = sub.stop();
        assert!(stopped.load(Ordering::SeqCst), "stop runs at once");
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        drop(guard);
        assert!(
            wait.as_mut().poll(&mut cx).is_pending(),
            "a clone still holds"
        );
        drop(second);
        assert!(wait.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn stop_without_drain_is_ready() {
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut wait = Subscription::new(|| {}).stop();
        assert!(wait.as_mut().poll(&mut cx).is_ready());
    }
}
