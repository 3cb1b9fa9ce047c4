//! The inbound pipeline (Go daprd's subscription delivery): for each message from a component, decode the
//! CloudEvent (or synthesize one for raw subscriptions), drop expired events, route with
//! CEL, deliver to the app, and turn the app's answer into an ack, a nack or a
//! dead-letter publish. A message is acknowledged only after the app accepted it, or after
//! it went to the dead-letter topic.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use daprd_core::cloudevent;
use daprd_core::pubsub::{Handler, Message, Outcome};
use serde_json::{Map, Value as Json};
use tokio::sync::Notify;

use crate::inbound::channel::{AppChannel, AppReply, Delivery};
use crate::inbound::subscriptions::SubscriptionSpec;
use crate::metrics::{DroppedBy, Metrics, ProcessStatus};
use crate::outbound::publish::{raw_payload, Publisher};
use crate::resiliency::{AttemptError, Policy};
use crate::store::PubSubEntry;
use crate::trace::ActiveSpan;

/// Counts deliveries in flight so shutdown can wait for them.
#[derive(Default)]
pub struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.clone())
    }

    /// Number of deliveries in flight.
    pub fn current(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once no delivery is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.current() == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Everything one subscription's handler needs.
pub struct SubscriptionPipeline {
    /// The subscription.
    pub spec: SubscriptionSpec,
    /// Its component.
    pub entry: Arc<PubSubEntry>,
    /// For dead-letter publishes.
    pub publisher: Publisher,
    /// Where events go.
    pub channel: Arc<dyn AppChannel>,
    /// In-flight counter shared with the shutdown sequence.
    pub in_flight: Arc<InFlight>,
    /// The component's inbound resiliency policy.
    pub policy: Arc<Policy>,
    /// Where deliveries are counted.
    pub metrics: Arc<Metrics>,
}

/// The pipeline a component subscription delivers through. Hot reload swaps it in place when
/// a subscription changes only in what the sidecar does with a message (routes, dead-letter
/// topic): the component keeps consuming, and every message goes through exactly one
/// pipeline, the one current when it arrived.
pub struct PipelineSlot(std::sync::RwLock<Arc<SubscriptionPipeline>>);

impl PipelineSlot {
    /// A slot holding `pipeline`.
    pub fn new(pipeline: Arc<SubscriptionPipeline>) -> Arc<Self> {
        Arc::new(Self(std::sync::RwLock::new(pipeline)))
    }

    /// The pipeline now in the slot.
    pub fn current(&self) -> Arc<SubscriptionPipeline> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `pipeline` in the slot; messages that arrive from now on go through it.
    pub fn replace(&self, pipeline: Arc<SubscriptionPipeline>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = pipeline;
    }

    /// The component handler for one message at a time.
    pub fn handler(self: Arc<Self>) -> Handler {
        Arc::new(move |msg| {
            let pipeline = self.current();
            Box::pin(async move { pipeline.handle(msg).await })
        })
    }
}

const DLT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the CloudEvent's `expiration` is in the past.
pub fn has_expired(event: &Map<String, Json>, now: SystemTime) -> bool {
    match event.get("expiration").and_then(Json::as_str) {
        Some(e) if !e.is_empty() => humantime::parse_rfc3339_weak(e)
            .or_else(|_| humantime::parse_rfc3339(e))
            .map(|t| t < now)
            .unwrap_or(false),
        _ => false,
    }
}

/// The envelope daprd synthesizes for a raw-payload subscription (a new id per delivery).
pub fn raw_envelope(
    data: &[u8],
    topic: &str,
    pubsub: &str,
    metadata: &BTreeMap<String, String>,
) -> Map<String, Json> {
    let mut ce = Map::new();
    ce.insert("id".into(), crate::trace::random_uuid().into());
    ce.insert("specversion".into(), cloudevent::SPEC_VERSION.into());
    ce.insert("datacontenttype".into(), "application/octet-stream".into());
    ce.insert("source".into(), cloudevent::DEFAULT_SOURCE.into());
    ce.insert("type".into(), cloudevent::DEFAULT_TYPE.into());
    ce.insert("topic".into(), topic.into());
    ce.insert("pubsubname".into(), pubsub.into());
    ce.insert(
        "data_base64".into(),
        base64::engine::general_purpose::STANDARD
            .encode(data)
            .into(),
    );
    let trace = metadata
        .get("traceparent")
        .or_else(|| metadata.get("traceid"));
    if let Some(t) = trace {
        ce.insert("traceid".into(), t.clone().into());
        ce.insert("traceparent".into(), t.clone().into());
    }
    if let Some(ts) = metadata.get("tracestate") {
        ce.insert("tracestate".into(), ts.clone().into());
    }
    ce
}

/// Removes the first occurrence of the namespace from a broker topic (as daprd does).
pub fn strip_prefix(prefix: Option<&str>, broker_topic: &str) -> String {
    match prefix {
        Some(p) => broker_topic.replacen(p, "", 1),
        None => broker_topic.to_string(),
    }
}

enum Decoded {
    Event {
        event: Map<String, Json>,
        body: Bytes,
    },
    Failure(String),
}

impl SubscriptionPipeline {
    /// The pipeline of `spec` on `entry`, delivering through `channel`, with the
    /// component's inbound resiliency policy; its deliveries count in `in_flight`.
    pub fn new(
        state: &crate::state::RuntimeState,
        in_flight: Arc<InFlight>,
        spec: SubscriptionSpec,
        entry: Arc<PubSubEntry>,
        channel: Arc<dyn AppChannel>,
    ) -> Self {
        let policy = state
            .resiliency
            .component_policy(&spec.pubsub, crate::resiliency::Direction::Inbound);
        Self {
            spec,
            entry,
            publisher: state.publisher.clone(),
            channel,
            in_flight,
            policy,
            metrics: state.metrics.clone(),
        }
    }

    /// The component handler for this subscription.
    pub fn handler(self: Arc<Self>) -> Handler {
        PipelineSlot::new(self).handler()
    }

    fn api_topic(&self, broker_topic: &str) -> String {
        strip_prefix(self.entry.topic_prefix.as_deref(), broker_topic)
    }

    fn decode(&self, msg: &Message, topic: &str, metadata: &BTreeMap<String, String>) -> Decoded {
        let raw = match raw_payload(&self.spec.metadata) {
            Ok(r) => r,
            Err(e) => return Decoded::Failure(format!("invalid subscription metadata: {e}")),
        };
        if raw {
            let event = raw_envelope(&msg.data, topic, &self.entry.name, metadata);
            let body = Bytes::from(daprd_core::json::to_vec_go(&event).unwrap_or_default());
            return Decoded::Event { event, body };
        }
        let content_type = metadata
            .get("content-type")
            .map(String::as_str)
            .unwrap_or("application/json");
        if cloudevent::is_binary_content_type(content_type)
            && metadata
                .keys()
                .any(|k| k.to_ascii_lowercase().starts_with("ce_"))
        {
            let mut event = Map::new();
            for (k, v) in metadata {
                if k.len() > 3 && k[..3].eq_ignore_ascii_case("ce_") {
                    event.insert(k[3..].to_string(), v.clone().into());
                }
            }
            let ct = event
                .get("datacontenttype")
                .and_then(Json::as_str)
                .unwrap_or("application/octet-stream")
                .to_string();
            let (field, value) = cloudevent::embed_data(&ct, &msg.data);
            event.insert(field.into(), value);
            let body = Bytes::from(daprd_core::json::to_vec_go(&event).unwrap_or_default());
            return Decoded::Event { event, body };
        }
        match cloudevent::decode_first_json(&msg.data) {
            Some(Json::Object(mut event)) => {
                for key in ["traceid", "traceparent", "tracestate"] {
                    if !event.contains_key(key) {
                        if let Some(v) = metadata.get(key) {
                            event.insert(key.into(), v.clone().into());
                        }
                    }
                }
                Decoded::Event {
                    event,
                    body: msg.data.clone(),
                }
            }
            _ => Decoded::Failure(
                "message is not a CloudEvent JSON object (use rawPayload for raw messages)".into(),
            ),
        }
    }

    pub(crate) async fn dead_letter(
        &self,
        msg: &Message,
        metadata: &BTreeMap<String, String>,
    ) -> bool {
        if self.spec.dead_letter_topic.is_empty() {
            return false;
        }
        let res = tokio::time::timeout(
            DLT_TIMEOUT,
            self.publisher.republish(
                &self.entry,
                &self.spec.dead_letter_topic,
                msg.data.clone(),
                metadata.clone(),
            ),
        )
        .await;
        match res {
            Ok(Ok(())) => {
                self.metrics
                    .dead_lettered(&self.entry.name, &self.api_topic(&msg.topic));
                true
            }
            Ok(Err(e)) => {
                tracing::error!(dead_letter_topic = %self.spec.dead_letter_topic, error = %e, "dead-letter publish failed");
                false
            }
            Err(_) => {
                tracing::error!(dead_letter_topic = %self.spec.dead_letter_topic, "dead-letter publish timed out");
                false
            }
        }
    }

    /// Decodes, expires and routes `msg`. `Err` carries the outcome when the message was
    /// settled here (expired, unrouted, undecodable); `Ok` the delivery to make and its span
    /// (a child of the publisher's, named in the app's `traceparent`).
    pub(crate) async fn prepare(
        &self,
        msg: &Message,
    ) -> Result<(Delivery, BTreeMap<String, String>, ActiveSpan), Outcome> {
        let topic = self.api_topic(&msg.topic);
        if msg.redelivered {
            self.metrics.redelivered(&self.entry.name, &topic);
        }
        let mut metadata = msg.metadata.clone();
        if let Some(ct) = &msg.content_type {
            metadata.insert("content-type".into(), ct.clone());
        }
        metadata.insert("pubsubName".into(), self.entry.name.clone());

        let (event, body) = match self.decode(msg, &topic, &metadata) {
            Decoded::Event { event, body } => (event, body),
            Decoded::Failure(reason) => return Err(self.failure(msg, &metadata, &reason).await),
        };
        if has_expired(&event, SystemTime::now()) {
            tracing::warn!(pubsub = %self.entry.name, %topic, id = ?event.get("id"), "dropping expired message");
            self.metrics
                .dropped(&self.entry.name, &topic, DroppedBy::Sidecar, "expired");
            self.dead_letter(msg, &metadata).await;
            return Err(Outcome::Drop);
        }
        let rule = match crate::inbound::routing::select(&self.spec.rules, &event) {
            Ok(Some(rule)) => rule.clone(),
            Ok(None) => {
                tracing::debug!(pubsub = %self.entry.name, %topic, "no routing rule matched; message dropped");
                self.metrics
                    .dropped(&self.entry.name, &topic, DroppedBy::Sidecar, "unrouted");
                self.dead_letter(msg, &metadata).await;
                return Err(Outcome::Drop);
            }
            Err(e) => return Err(self.failure(msg, &metadata, &e.to_string()).await),
        };
        let span = self.publisher.tracer().start(
            event.get("traceparent").and_then(Json::as_str),
            event.get("tracestate").and_then(Json::as_str),
        );
        let delivery = Delivery {
            path: rule.path.clone(),
            body,
            event,
            metadata: metadata.clone(),
            topic,
            pubsub: self.entry.name.clone(),
            traceparent: span.ctx.traceparent(),
            tracestate: span.ctx.tracestate.clone(),
        };
        Ok((delivery, metadata, span))
    }

    /// Counts one more delivery in flight until the guard drops.
    pub(crate) fn in_flight_guard(&self) -> impl Drop {
        self.in_flight.enter()
    }

    /// Whether this subscription delivers raw payloads.
    pub(crate) fn is_raw(&self) -> bool {
        raw_payload(&self.spec.metadata).unwrap_or(false)
    }

    /// The outcome of an app's answer after retries: DLT for drops and exhausted retries.
    pub(crate) async fn settle(
        &self,
        msg: &Message,
        metadata: &BTreeMap<String, String>,
        reply: Result<AppReply, AttemptError>,
    ) -> Outcome {
        match reply {
            Ok(AppReply::Drop {
                dead_letter,
                reason,
            }) => {
                tracing::warn!(pubsub = %self.entry.name, topic = %msg.topic, %reason, "message dropped by the app");
                self.metrics.dropped(
                    &self.entry.name,
                    &self.api_topic(&msg.topic),
                    DroppedBy::App,
                    "drop",
                );
                if dead_letter
                    && !self.spec.dead_letter_topic.is_empty()
                    && !self.dead_letter(msg, metadata).await
                {
                    return Outcome::Retry;
                }
                Outcome::Drop
            }
            Ok(_) => Outcome::Success,
            Err(e) => {
                tracing::debug!(pubsub = %self.entry.name, topic = %msg.topic, reason = %e.message, "delivery not accepted");
                if self.dead_letter(msg, metadata).await {
                    Outcome::Drop
                } else {
                    Outcome::Retry
                }
            }
        }
    }

    /// Handles one message from the component.
    pub async fn handle(&self, msg: Message) -> Outcome {
        let _guard = self.in_flight.enter();
        let (delivery, metadata, span) = match self.prepare(&msg).await {
            Ok(v) => v,
            Err(outcome) => return outcome,
        };
        let _gauge = self.metrics.in_flight(&self.entry.name, &delivery.topic);
        // Retries (per the inbound policy) cover app answers that ask for one; success and
        // drops end the attempt loop.
        let reply = self
            .policy
            .run(|| async {
                let started = std::time::Instant::now();
                let reply = self.channel.deliver(&delivery).await;
                self.metrics.pubsub_ingress(
                    &self.entry.name,
                    &delivery.topic,
                    process_status(&reply),
                    started.elapsed(),
                );
                match reply {
                    AppReply::Retry(reason, code) => Err(AttemptError::new(reason).with_code(code)),
                    other => Ok(other),
                }
            })
            .await;
        let error = span
            .is_recorded()
            .then(|| reply.as_ref().err().map(|e| e.message.clone()))
            .flatten();
        let outcome = self.settle(&msg, &metadata, reply).await;
        self.end_span(span, &delivery.topic, outcome, error);
        outcome
    }

    /// Ends a delivery span (`pubsub/<topic>`, as Go daprd names it).
    pub(crate) fn end_span(
        &self,
        span: ActiveSpan,
        topic: &str,
        outcome: Outcome,
        error: Option<String>,
    ) {
        if !span.is_recorded() {
            return;
        }
        let status = match outcome {
            Outcome::Success => "SUCCESS",
            Outcome::Retry => "RETRY",
            Outcome::Drop => "DROP",
        };
        self.publisher.tracer().end(
            span,
            format!("pubsub/{topic}"),
            vec![
                ("messaging.system", "pubsub".into()),
                ("messaging.destination.name", topic.to_string()),
                ("dapr.component.name", self.entry.name.clone()),
                ("dapr.status", status.into()),
            ],
            error,
        );
    }

    async fn failure(
        &self,
        msg: &Message,
        metadata: &BTreeMap<String, String>,
        reason: &str,
    ) -> Outcome {
        tracing::error!(pubsub = %self.entry.name, topic = %msg.topic, %reason, "cannot process message");
        self.metrics.dropped(
            &self.entry.name,
            &self.api_topic(&msg.topic),
            DroppedBy::Sidecar,
            "undeliverable",
        );
        if self.dead_letter(msg, metadata).await {
            Outcome::Drop
        } else {
            Outcome::Retry
        }
    }
}

/// The `process_status` of an app's answer.
pub(crate) fn process_status(reply: &AppReply) -> ProcessStatus {
    match reply {
        AppReply::Success => ProcessStatus::Success,
        AppReply::Retry(..) => ProcessStatus::Retry,
        AppReply::Drop { .. } => ProcessStatus::Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiration() {
        let now = humantime::parse_rfc3339("2024-01-01T00:00:00Z").unwrap();
        let ev = |e: &str| -> Map<String, Json> {
            [("expiration".to_string(), Json::from(e))]
                .into_iter()
                .collect()
        };
        assert!(has_expired(&ev("2023-12-31T23:59:59Z"), now));
        assert!(!has_expired(&ev("2024-01-01T00:00:01Z"), now));
        assert!(!has_expired(&ev("garbage"), now));
        assert!(!has_expired(&Map::new(), now));
    }

    #[test]
    fn namespace_prefix_is_stripped_once() {
        assert_eq!(strip_prefix(Some("prod"), "prodorders"), "orders");
        assert_eq!(strip_prefix(Some("prod"), "prodprodorders"), "prodorders");
        assert_eq!(strip_prefix(None, "prodorders"), "prodorders");
    }

    #[test]
    fn raw_envelope_shape() {
        let md: BTreeMap<String, String> = [("traceid".to_string(), "t1".to_string())]
            .into_iter()
            .collect();
        let ce = raw_envelope(b"\x00\x01", "orders", "ps", &md);
        assert_eq!(ce["data_base64"], "AAE=");
        assert_eq!(ce["datacontenttype"], "application/octet-stream");
        assert_eq!(ce["source"], "Dapr");
        assert_eq!(ce["traceparent"], "t1");
        assert!(uuid::Uuid::parse_str(ce["id"].as_str().unwrap()).is_ok());
    }
}
