//! The publish pipeline shared by the HTTP and gRPC APIs: validate → scoping →
//! CloudEvent envelope (+ TTL) → namespace prefix → component. Every failure is an
//! [`ApiError`] carrying Dapr's codes for both protocols.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use daprd_core::cloudevent::{self, CloudEventError, EnvelopeRequest};
use daprd_core::metadata::parse_go_bool;
use daprd_core::pubsub::{BulkEntry, BulkPublishRequest, FailedEntry, Feature, PublishRequest};
use futures::StreamExt;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::resiliency::{AttemptError, Direction, Policies, StatusCode};
use crate::store::{ComponentStore, PubSubEntry};
use crate::trace::{SpanContext, Tracer};

/// Which API a publish came through (daprd treats them slightly differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// HTTP API.
    Http,
    /// gRPC API.
    Grpc,
}

/// Incoming trace context.
#[derive(Debug, Clone, Default)]
pub struct TraceHeaders {
    /// `traceparent`.
    pub traceparent: Option<String>,
    /// `tracestate`.
    pub tracestate: Option<String>,
}

impl TraceHeaders {
    /// Reads `traceparent` and `tracestate` through `get` (HTTP headers, gRPC metadata).
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Self {
        Self {
            traceparent: get("traceparent"),
            tracestate: get("tracestate"),
        }
    }
}

/// One publish request, as received by an API.
#[derive(Debug, Clone)]
pub struct PublishInput {
    /// Component name.
    pub pubsub: String,
    /// Topic.
    pub topic: String,
    /// Body.
    pub data: Bytes,
    /// Content type (empty → `text/plain`).
    pub content_type: String,
    /// Request metadata.
    pub metadata: BTreeMap<String, String>,
    /// Incoming trace context.
    pub trace: TraceHeaders,
    /// API.
    pub transport: Transport,
}

/// One entry of a bulk publish, with its event already as bytes.
#[derive(Debug, Clone)]
pub struct BulkInputEntry {
    /// Entry id.
    pub entry_id: String,
    /// Event bytes.
    pub event: Bytes,
    /// Content type.
    pub content_type: String,
    /// Entry metadata, when the entry carried any.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// A bulk publish request.
#[derive(Debug, Clone)]
pub struct BulkInput {
    /// Component name.
    pub pubsub: String,
    /// Topic.
    pub topic: String,
    /// Entries.
    pub entries: Vec<BulkInputEntry>,
    /// Request-level metadata.
    pub metadata: BTreeMap<String, String>,
    /// Incoming trace context.
    pub trace: TraceHeaders,
    /// API.
    pub transport: Transport,
}

/// The outcome of a bulk publish that reached the component.
#[derive(Debug, Clone, Default)]
pub struct BulkOutcome {
    /// Entries the component could not publish.
    pub failed: Vec<FailedEntry>,
    /// Why (set when any entry failed).
    pub error: Option<ApiError>,
}

/// Publishes for one app.
#[derive(Clone)]
pub struct Publisher {
    app_id: String,
    store: Arc<ComponentStore>,
    resiliency: Arc<Policies>,
    metrics: Arc<Metrics>,
    tracer: Arc<Tracer>,
}

/// Most entries of a non-native bulk publish in flight at once (as daprd).
const BULK_CONCURRENCY: usize = 100;

/// Entries whose envelopes exist at once during a bulk publish (and per native bulk call).
const BULK_CHUNK: usize = 1000;

/// `rawPayload` (exact key, Go `ParseBool`).
pub fn raw_payload(md: &BTreeMap<String, String>) -> Result<bool, String> {
    match md.get("rawPayload").map(String::as_str) {
        None | Some("") => Ok(false),
        Some(v) => parse_go_bool(v)
            .ok_or_else(|| format!("rawPayload value must be a valid boolean: actual is '{v}'")),
    }
}

/// The name and attributes of a publish span, as Go daprd's API tracing names them: the
/// HTTP route path or the gRPC method; `dapr.api` is the same as the name.
fn publish_span(
    pubsub: &str,
    topic: &str,
    transport: Transport,
    res: &Result<(), ApiError>,
) -> (String, Vec<(&'static str, String)>) {
    let (name, protocol, status) = match transport {
        Transport::Http => (
            format!("/v1.0/publish/{pubsub}/{topic}"),
            "http",
            res.as_ref()
                .map_or_else(|e| e.http_status.to_string(), |()| "204".into()),
        ),
        Transport::Grpc => (
            "/dapr.proto.runtime.v1.Dapr/PublishEvent".to_string(),
            "grpc",
            format!(
                "{:?}",
                res.as_ref()
                    .map_or_else(|e| e.grpc_code, |()| tonic::Code::Ok)
            ),
        ),
    };
    let mut attributes = vec![
        ("dapr.api", name.clone()),
        ("dapr.protocol", protocol.to_string()),
        ("dapr.status_code", status),
        ("messaging.system", "pubsub".to_string()),
        ("messaging.destination.name", topic.to_string()),
        ("dapr.component.name", pubsub.to_string()),
    ];
    if transport == Transport::Http {
        attributes.push(("http.request.method", "POST".to_string()));
    }
    (name, attributes)
}

/// Dapr's publish error for a failed attempt, caused by it.
fn publish_failed(pubsub: &str, topic: &str, e: AttemptError) -> ApiError {
    ApiError::publish_message(pubsub, topic, &e.message).caused_by(Arc::new(e))
}

impl Publisher {
    /// A publisher for `app_id` over `store`, with outbound `resiliency`, recording in
    /// `metrics` and tracing with `tracer`.
    pub fn new(
        app_id: impl Into<String>,
        store: Arc<ComponentStore>,
        resiliency: Arc<Policies>,
        metrics: Arc<Metrics>,
        tracer: Arc<Tracer>,
    ) -> Self {
        Self {
            app_id: app_id.into(),
            store,
            resiliency,
            metrics,
            tracer,
        }
    }

    /// A publish span, a child of the caller's context.
    fn start_span(&self, trace: &TraceHeaders) -> crate::trace::ActiveSpan {
        self.tracer
            .start(trace.traceparent.as_deref(), trace.tracestate.as_deref())
    }

    /// The tracer (deliveries start their spans with it too).
    pub fn tracer(&self) -> &Arc<Tracer> {
        &self.tracer
    }

    /// Publishes through the component's outbound resiliency policy. Component errors
    /// carry a code for `matching`: gRPC `Unavailable`/`FailedPrecondition` (transient /
    /// permanent), mapped to HTTP 503/400 for the HTTP API, as daprd does.
    async fn send(
        &self,
        entry: &PubSubEntry,
        request: PublishRequest,
        transport: Transport,
    ) -> Result<(), AttemptError> {
        let policy = self
            .resiliency
            .component_policy(&entry.name, Direction::Outbound);
        policy
            .run(|| async {
                entry.component.publish(request.clone()).await.map_err(|e| {
                    let transient = e.kind() == daprd_core::pubsub::ErrorKind::Transient;
                    let code = match (transport, transient) {
                        (Transport::Http, true) => StatusCode::Http(503),
                        (Transport::Http, false) => StatusCode::Http(400),
                        (Transport::Grpc, true) => StatusCode::Grpc(tonic::Code::Unavailable),
                        (Transport::Grpc, false) => {
                            StatusCode::Grpc(tonic::Code::FailedPrecondition)
                        }
                    };
                    AttemptError {
                        message: e.to_string(),
                        code: Some(code),
                        source: Some(Arc::new(e)),
                    }
                })
            })
            .await
    }

    /// The app id.
    pub fn app_id(&self) -> &str {
        &self.app_id
    }

    /// The component store.
    pub fn store(&self) -> &Arc<ComponentStore> {
        &self.store
    }

    /// The component a publish goes to, checked as daprd checks it before anything else
    /// (before the HTTP body is read): a pubsub name, a known pubsub, a topic.
    ///
    /// # Errors
    /// `ERR_PUBSUB_EMPTY`, `ERR_PUBSUB_NOT_FOUND` or `ERR_TOPIC_EMPTY`.
    pub fn target(
        &self,
        pubsub: &str,
        topic: &str,
        md: &BTreeMap<String, String>,
        transport: Transport,
    ) -> Result<Arc<PubSubEntry>, ApiError> {
        let empty = BTreeMap::new();
        if pubsub.is_empty() {
            return Err(ApiError::pubsub_name_empty(md));
        }
        let Some(entry) = self.store.pubsub(pubsub) else {
            let md = if transport == Transport::Grpc {
                &empty
            } else {
                md
            };
            return Err(ApiError::pubsub_not_found(pubsub, md));
        };
        if topic.is_empty() {
            return Err(ApiError::topic_empty(pubsub, md));
        }
        Ok(entry)
    }

    fn validate(
        &self,
        pubsub: &str,
        topic: &str,
        md: &BTreeMap<String, String>,
        transport: Transport,
    ) -> Result<(Arc<PubSubEntry>, bool), ApiError> {
        let entry = self.target(pubsub, topic, md, transport)?;
        let raw =
            raw_payload(md).map_err(|e| ApiError::metadata_deserialization(pubsub, &e, md))?;
        Ok((entry, raw))
    }

    fn envelope(
        &self,
        entry: &PubSubEntry,
        topic: &str,
        data: &[u8],
        content_type: &str,
        md: &BTreeMap<String, String>,
        span: &SpanContext,
    ) -> Result<Bytes, ApiError> {
        let traceparent = span.traceparent();
        let new_id = crate::trace::random_uuid();
        let now = SystemTime::now();
        let handles_ttl = entry.component.features().contains(&Feature::MessageTtl);
        let request = EnvelopeRequest {
            source: &self.app_id,
            topic,
            pubsub_name: &entry.name,
            data_content_type: content_type,
            data,
            traceparent: &traceparent,
            tracestate: &span.tracestate,
            metadata: Some(md),
            new_id: &new_id,
            now,
        };
        cloudevent::envelope_bytes(&request, handles_ttl)
            .map(Bytes::from)
            .map_err(|e| match e {
                CloudEventError::NotAnObject(_) => {
                    ApiError::cloud_event_creation(&entry.name, &self.app_id, &e.to_string())
                }
                CloudEventError::Encode(_) => {
                    ApiError::marshal_envelope(&entry.name, topic, &self.app_id, &e.to_string())
                }
            })
    }

    fn check_scope(&self, entry: &PubSubEntry, topic: &str) -> Result<(), ApiError> {
        if entry.scoping.may_publish(&self.app_id, topic) {
            Ok(())
        } else {
            Err(ApiError::forbidden(&entry.name, topic, &self.app_id))
        }
    }

    /// Publishes one event under a span of its own (a child of the caller's); returns that
    /// span's `traceparent`.
    ///
    /// # Errors
    /// The [`ApiError`] of Dapr's error table for whatever went wrong.
    pub async fn publish(&self, input: PublishInput) -> Result<String, ApiError> {
        let span = self.start_span(&input.trace);
        let traceparent = span.ctx.traceparent();
        let recorded = span
            .is_recorded()
            .then(|| (input.pubsub.clone(), input.topic.clone(), input.transport));
        let res = self.publish_in(input, &span.ctx).await;
        if let Some((pubsub, topic, transport)) = recorded {
            let (name, attributes) = publish_span(&pubsub, &topic, transport, &res);
            self.tracer.end(
                span,
                name,
                attributes,
                res.as_ref().err().map(|e| e.message.clone()),
            );
        }
        res.map(|()| traceparent)
    }

    async fn publish_in(&self, input: PublishInput, span: &SpanContext) -> Result<(), ApiError> {
        let (entry, raw) = self.validate(
            &input.pubsub,
            &input.topic,
            &input.metadata,
            input.transport,
        )?;
        let mut metadata = input.metadata;
        let data = if raw {
            if input.transport == Transport::Grpc {
                metadata.insert("traceid".into(), span.traceparent());
                metadata.insert("tracestate".into(), span.tracestate.clone());
            }
            input.data
        } else {
            self.envelope(
                &entry,
                &input.topic,
                &input.data,
                &input.content_type,
                &metadata,
                span,
            )?
        };
        self.check_scope(&entry, &input.topic)?;
        let request = PublishRequest {
            pubsub_name: entry.name.clone(),
            topic: entry.broker_topic(&input.topic),
            data,
            metadata,
            content_type: None,
        };
        let started = std::time::Instant::now();
        let sent = self.send(&entry, request, input.transport).await;
        self.metrics
            .pubsub_egress(&entry.name, &input.topic, sent.is_ok(), started.elapsed());
        sent.map_err(|e| publish_failed(&entry.name, &input.topic, e))
    }

    /// Publishes `data` as-is to `topic` of `entry` (dead-letter republish): scoping and the
    /// namespace prefix apply, no envelope is built.
    ///
    /// # Errors
    /// Forbidden by scoping, or the component failed.
    pub async fn republish(
        &self,
        entry: &PubSubEntry,
        topic: &str,
        data: Bytes,
        metadata: BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        self.check_scope(entry, topic)?;
        let request = PublishRequest {
            pubsub_name: entry.name.clone(),
            topic: entry.broker_topic(topic),
            data,
            metadata,
            content_type: None,
        };
        self.send(entry, request, Transport::Grpc)
            .await
            .map_err(|e| publish_failed(&entry.name, topic, e))
    }

    /// Publishes many events to one topic. Validation problems are an `Err`; entries the
    /// component failed come back in [`BulkOutcome::failed`].
    ///
    /// # Errors
    /// The [`ApiError`] of Dapr's error table for a request that could not be attempted.
    pub async fn bulk_publish(&self, input: BulkInput) -> Result<BulkOutcome, ApiError> {
        let (entry, raw) = self.validate(
            &input.pubsub,
            &input.topic,
            &input.metadata,
            input.transport,
        )?;
        {
            let mut seen = std::collections::HashSet::with_capacity(input.entries.len());
            if input
                .entries
                .iter()
                .any(|e| e.entry_id.is_empty() || !seen.insert(e.entry_id.as_str()))
            {
                return Err(ApiError::marshal_events(
                    &entry.name,
                    &input.topic,
                    &self.app_id,
                ));
            }
        }
        // Every envelope that can fail is checked before anything is published (as daprd
        // builds them all first); the envelopes themselves are built a chunk at a time below,
        // so a 50,000-entry request never holds 50,000 envelopes.
        if !raw {
            for e in &input.entries {
                cloudevent::check_envelope_data(&e.content_type, &e.event).map_err(|err| {
                    ApiError::cloud_event_creation(&entry.name, &self.app_id, &err.to_string())
                })?;
            }
        }
        self.check_scope(&entry, &input.topic)?;
        // One span for the whole call; every entry's envelope names it.
        let span = self.start_span(&input.trace);
        let broker_topic = entry.broker_topic(&input.topic);
        let native = entry.component.features().contains(&Feature::BulkPublish);
        let mut failed = Vec::new();
        let total = input.entries.len();
        let started = std::time::Instant::now();
        let mut entries = input.entries.into_iter().peekable();
        while entries.peek().is_some() {
            let mut chunk = Vec::with_capacity(BULK_CHUNK);
            for e in entries.by_ref().take(BULK_CHUNK) {
                // Entry metadata wins; request metadata fills the gaps — only for entries
                // that carried metadata of their own, as daprd does.
                let metadata = e
                    .metadata
                    .map(|mut m| {
                        for (k, v) in &input.metadata {
                            m.entry(k.clone()).or_insert_with(|| v.clone());
                        }
                        m
                    })
                    .unwrap_or_default();
                let data = if raw {
                    e.event
                } else {
                    self.envelope(
                        &entry,
                        &input.topic,
                        &e.event,
                        &e.content_type,
                        &metadata,
                        &span.ctx,
                    )?
                };
                chunk.push(BulkEntry {
                    entry_id: e.entry_id,
                    data,
                    content_type: e.content_type,
                    metadata,
                });
            }
            if native {
                failed.extend(
                    self.bulk_native(&entry, &broker_topic, chunk, &input.metadata)
                        .await,
                );
            } else {
                failed.extend(self.bulk_one_by_one(&entry, &broker_topic, chunk).await);
            }
        }
        self.metrics.bulk_pubsub_egress(
            &entry.name,
            &input.topic,
            failed.is_empty(),
            (total - failed.len().min(total)) as u64,
            started.elapsed(),
        );
        let error = (!failed.is_empty()).then(|| {
            let first = failed.first().map(|f| f.error.clone()).unwrap_or_default();
            ApiError::publish_message(&entry.name, &input.topic, &first)
        });
        if span.is_recorded() {
            let res = error.clone().map_or(Ok(()), Err);
            let (name, mut attributes) =
                publish_span(&entry.name, &input.topic, input.transport, &res);
            let name = match input.transport {
                Transport::Http => name.replacen("/v1.0/publish/", "/v1.0-alpha1/publish/bulk/", 1),
                Transport::Grpc => "/dapr.proto.runtime.v1.Dapr/BulkPublishEventAlpha1".into(),
            };
            attributes[0].1 = name.clone();
            self.tracer
                .end(span, name, attributes, res.err().map(|e| e.message));
        }
        Ok(BulkOutcome { failed, error })
    }

    /// One chunk through the component's native bulk publish.
    async fn bulk_native(
        &self,
        entry: &PubSubEntry,
        broker_topic: &str,
        chunk: Vec<BulkEntry>,
        metadata: &BTreeMap<String, String>,
    ) -> Vec<FailedEntry> {
        // Only the ids are kept for a failure of the whole call (not a second copy of every
        // entry).
        let ids: Vec<String> = chunk.iter().map(|b| b.entry_id.clone()).collect();
        let request = BulkPublishRequest {
            pubsub_name: entry.name.clone(),
            topic: broker_topic.to_string(),
            entries: chunk,
            metadata: metadata.clone(),
        };
        match entry.component.bulk_publish(request).await {
            Ok(failed) => failed,
            Err(e) => ids
                .into_iter()
                .map(|entry_id| FailedEntry {
                    entry_id,
                    error: e.to_string(),
                })
                .collect(),
        }
    }

    /// One chunk as concurrent single publishes.
    async fn bulk_one_by_one(
        &self,
        entry: &PubSubEntry,
        broker_topic: &str,
        chunk: Vec<BulkEntry>,
    ) -> Vec<FailedEntry> {
        futures::stream::iter(chunk)
            .map(|b| {
                let component = entry.component.clone();
                let request = PublishRequest {
                    pubsub_name: entry.name.clone(),
                    topic: broker_topic.to_string(),
                    data: b.data,
                    metadata: b.metadata,
                    content_type: Some(b.content_type),
                };
                async move {
                    component.publish(request).await.err().map(|e| FailedEntry {
                        entry_id: b.entry_id,
                        error: e.to_string(),
                    })
                }
            })
            .buffer_unordered(BULK_CONCURRENCY)
            .filter_map(|r| async move { r })
            .collect()
            .await
    }
}
