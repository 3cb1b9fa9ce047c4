//! `pubsub.kafka`: Apache Kafka (or any Kafka-protocol broker) through librdkafka, with Go
//! daprd's bytes on the broker.
//!
//! * Publish: topic = Kafka topic, record value = the published bytes, `partitionKey` /
//!   `__key` → record key, `partitionNumber` → explicit partition, every metadata entry →
//!   a record header (unless `excludeHeaderMetaRegex` matches it). Keys are hashed with
//!   FNV-1a as sarama does, so a key lands on the same partition as with Go daprd.
//! * Subscribe: one consumer in group `consumerGroup` (else `consumerID`) per subscription.
//!   Messages of a partition are handled one after the other, partitions concurrently; an
//!   offset is stored for commit only once the runtime answers `Success` or `Drop`.
//!   `Retry` with `consumeRetryEnabled` (the default) retries the message in place with the
//!   `backOff*` policy (forever by default, as in Dapr: the runtime's dead-letter topic is
//!   what unblocks a poison message); without it the message is skipped and its offset is
//!   committed with the next one's.
//! * Bulk subscriptions: a partition's queued messages (up to the batch size) are handed over
//!   together so the runtime sends them to the app in one bulk request; offsets are stored up
//!   to the last of the settled run from the batch's start.
//! * A partition with `channelBufferSize` messages waiting is paused until half drain.
//! * Inbound metadata: `__key`, `__offset`, `__partition`, `__topic`, `__timestamp` (ms)
//!   and the record headers.

mod metadata;
mod producer;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    BulkPublishRequest, ErrorKind, FailedEntry, Feature, Handler, Message, Outcome, PubSub,
    PubSubError, PubSubFactory, PublishRequest, SubscribeRequest, Subscription,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders, OwnedMessage};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::{mpsc, watch};

pub use metadata::{Auth, BackOff, InitialOffset, KafkaMetadata};
use producer::{is_refusal, KafkaProducer, LastError, Opaque, Record};

/// How long a publish may wait in librdkafka's queue and for the broker's acknowledgement.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds `pubsub.kafka` components.
pub struct KafkaFactory;

fn client_config(props: &[(&'static str, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in props {
        config.set(*k, v);
    }
    config
}

fn kafka_error(what: &str, e: KafkaError) -> PubSubError {
    let permanent = matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::InvalidTopic
        )
    );
    PubSubError::Broker {
        message: format!("kafka: {what}: {e}"),
        kind: if permanent {
            ErrorKind::Permanent
        } else {
            ErrorKind::Transient
        },
        source: Some(Box::new(e)),
    }
}

#[async_trait]
impl PubSubFactory for KafkaFactory {
    fn component_type(&self) -> &'static str {
        "pubsub.kafka"
    }

    fn validate(&self, metadata: &Metadata) -> Vec<MetadataError> {
        KafkaMetadata::parse(metadata).err().unwrap_or_default()
    }

    async fn connect(
        &self,
        name: &str,
        metadata: &Metadata,
    ) -> Result<Arc<dyn PubSub>, PubSubError> {
        let md = KafkaMetadata::parse(metadata)?;
        let errors = LastError::default();
        let producer =
            KafkaProducer::new(&client_config(&md.producer_properties()), errors.clone()).map_err(
                |e| PubSubError::Connect {
                    message: format!("kafka: creating the producer: {e}"),
                    source: Some(Box::new(e)),
                },
            )?;
        // As in Dapr (sarama's NewClient), init fails when no broker answers.
        check_brokers(&producer, &errors, &md.brokers).await?;
        let admin = match md.auto_create_partitions {
            None => None,
            Some(_) => Some(
                client_config(&md.common_properties())
                    .create()
                    .map_err(|e| PubSubError::Connect {
                        message: format!("kafka: creating the admin client: {e}"),
                        source: Some(Box::new(e)),
                    })?,
            ),
        };
        Ok(Arc::new(KafkaPubSub {
            name: name.to_string(),
            md: Arc::new(md),
            producer,
            errors,
            admin,
            created: Mutex::default(),
            stop: watch::channel(false).0,
        }))
    }
}

/// The broker's metadata (all topics, or one), fetched off the async threads.
async fn fetch_metadata(
    producer: &KafkaProducer,
    topic: Option<String>,
    wait: Duration,
) -> Result<rdkafka::metadata::Metadata, String> {
    let client = producer.clone();
    tokio::task::spawn_blocking(move || {
        client
            .client()
            .fetch_metadata(topic.as_deref(), Timeout::After(wait))
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Asks the brokers for metadata for up to 10 s; a refused login or TLS handshake ends it at
/// once. The error names the brokers and the last problem librdkafka reported.
async fn check_brokers(
    producer: &KafkaProducer,
    errors: &LastError,
    brokers: &[String],
) -> Result<(), PubSubError> {
    let brokers = brokers.join(",");
    errors.clear();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = fetch_metadata(producer, None, Duration::from_millis(500)).await;
        let Err(e) = attempt else { return Ok(()) };
        let message = match errors.get() {
            Some((k, reason)) if is_refusal(&k) => {
                format!("kafka: broker {brokers} refused the client: {reason}")
            }
            _ if Instant::now() < deadline => continue,
            Some((_, reason)) => format!("kafka: no broker of {brokers} answered: {reason}"),
            None => format!("kafka: no broker of {brokers} answered: {e}"),
        };
        return Err(PubSubError::Connect {
            message,
            source: None,
        });
    }
}

/// A live `pubsub.kafka` component.
pub struct KafkaPubSub {
    name: String,
    md: Arc<KafkaMetadata>,
    producer: KafkaProducer,
    /// What the producer's client last reported as an error.
    errors: LastError,
    /// Present with `autoCreateTopics`.
    admin: Option<AdminClient<DefaultClientContext>>,
    /// Topics known to exist (created or found by `autoCreateTopics`).
    created: Mutex<std::collections::HashSet<String>>,
    stop: watch::Sender<bool>,
}

impl KafkaPubSub {
    /// With `autoCreateTopics`, creates `topic` unless it exists (once per topic).
    async fn ensure_topic(&self, topic: &str) -> Result<(), PubSubError> {
        let (Some(admin), Some(partitions)) = (&self.admin, self.md.auto_create_partitions) else {
            return Ok(());
        };
        if self
            .created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(topic)
        {
            return Ok(());
        }
        let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| kafka_error(&format!("creating topic {topic}"), e))?;
        for res in results {
            match res {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(kafka_error(
                        &format!("creating topic {topic}"),
                        KafkaError::AdminOp(code),
                    ))
                }
            }
        }
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_string());
        Ok(())
    }

    /// The error for a failed publish; a time-out on a topic the broker does not have says so.
    async fn publish_error(&self, topic: &str, e: KafkaError) -> PubSubError {
        let what = format!("publishing to topic {topic}");
        let missing = match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::UnknownTopicOrPartition) => true,
            Some(RDKafkaErrorCode::MessageTimedOut) => self.topic_is_missing(topic).await,
            _ => false,
        };
        if missing {
            self.created
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(topic);
            return PubSubError::Broker {
                message: format!("kafka: {what}: topic {topic} does not exist on the broker, which does not create topics on demand (create it, or set autoCreateTopics)"),
                kind: ErrorKind::Permanent,
                source: Some(Box::new(e)),
            };
        }
        kafka_error(&what, e)
    }

    /// Whether the broker's metadata lacks `topic` (asked after a publish timed out).
    async fn topic_is_missing(&self, topic: &str) -> bool {
        fetch_metadata(
            &self.producer,
            Some(topic.to_string()),
            Duration::from_secs(2),
        )
        .await
        .ok()
        .and_then(|m| {
            m.topics()
                .first()
                .map(|t| t.error().is_some() || t.partitions().is_empty())
        })
        .unwrap_or(false)
    }
}

/// What a publish's metadata makes of a record: key, partition and headers.
#[derive(Debug, Default)]
pub struct RecordParts {
    /// `partitionKey` / `__key`.
    pub key: Option<String>,
    /// `partitionNumber`.
    pub partition: Option<i32>,
    /// Every metadata entry not excluded, as (name, value).
    pub headers: Vec<(String, String)>,
}

impl RecordParts {
    /// Splits publish `metadata` the way Go daprd does.
    ///
    /// # Errors
    /// A `partitionNumber` that is not a non-negative 32-bit integer.
    pub fn from_metadata(
        metadata: &BTreeMap<String, String>,
        exclude: Option<&regex::Regex>,
    ) -> Result<Self, PubSubError> {
        let mut parts = RecordParts::default();
        for (name, value) in metadata {
            match name.as_str() {
                "partitionKey" | "__key" => parts.key = Some(value.clone()),
                "partitionNumber" => match value.trim().parse::<i32>() {
                    Ok(p) if p >= 0 => parts.partition = Some(p),
                    _ => {
                        return Err(PubSubError::broker(
                            ErrorKind::Permanent,
                            format!("kafka: invalid partitionNumber metadata value {value:?}: must be a non-negative integer"),
                        ))
                    }
                },
                _ => {}
            }
            if exclude.is_some_and(|re| re.is_match(name)) {
                continue;
            }
            parts.headers.push((name.clone(), value.clone()));
        }
        Ok(parts)
    }

    fn owned_headers(&self) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(self.headers.len());
        for (k, v) in &self.headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        h
    }

    fn record<'a>(&'a self, topic: &'a str, data: &'a [u8], report: Opaque) -> Record<'a> {
        let mut rec = Record::with_opaque_to(topic, report)
            .payload(data)
            .headers(self.owned_headers());
        if let Some(k) = &self.key {
            rec = rec.key(k.as_str());
        }
        if let Some(p) = self.partition {
            rec = rec.partition(p);
        }
        rec
    }
}

/// Go's `url.QueryEscape`, used for `escapeHeaders`.
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The metadata the runtime gets with a consumed record.
pub fn inbound_metadata(msg: &OwnedMessage, md: &KafkaMetadata) -> BTreeMap<String, String> {
    let escape = |v: &[u8]| {
        let s = String::from_utf8_lossy(v);
        if md.escape_headers {
            query_escape(&s)
        } else {
            s.into_owned()
        }
    };
    let mut out = BTreeMap::new();
    if let Some(headers) = msg.headers() {
        for h in headers.iter() {
            if md
                .exclude_header_meta
                .as_ref()
                .is_some_and(|re| re.is_match(h.key))
            {
                continue;
            }
            out.insert(h.key.to_string(), escape(h.value.unwrap_or_default()));
        }
    }
    if let Some(k) = msg.key() {
        out.insert("__key".into(), escape(k));
    }
    out.insert("__offset".into(), msg.offset().to_string());
    out.insert("__topic".into(), msg.topic().to_string());
    out.insert(
        "__timestamp".into(),
        msg.timestamp().to_millis().unwrap_or(0).to_string(),
    );
    out.insert("__partition".into(), msg.partition().to_string());
    out
}

const FEATURES: &[Feature] = &[Feature::BulkPublish];

#[async_trait]
impl PubSub for KafkaPubSub {
    fn features(&self) -> &[Feature] {
        FEATURES
    }

    async fn publish(&self, request: PublishRequest) -> Result<(), PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::closed_component());
        }
        let parts =
            RecordParts::from_metadata(&request.metadata, self.md.exclude_header_meta.as_ref())?;
        self.ensure_topic(&request.topic).await?;
        match self
            .producer
            .send(
                |report| parts.record(&request.topic, &request.data, report),
                PUBLISH_TIMEOUT,
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => Err(self.publish_error(&request.topic, e).await),
        }
    }

    async fn bulk_publish(
        &self,
        request: BulkPublishRequest,
    ) -> Result<Vec<FailedEntry>, PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::closed_component());
        }
        let exclude = self.md.exclude_header_meta.as_ref();
        let mut parts = Vec::with_capacity(request.entries.len());
        for entry in &request.entries {
            // Request-level metadata overrides the entry's, as in Go daprd.
            let mut md = entry.metadata.clone();
            md.extend(request.metadata.clone());
            parts.push(RecordParts::from_metadata(&md, exclude)?);
        }
        self.ensure_topic(&request.topic).await?;
        let mut failed = Vec::new();
        let mut pending = Vec::with_capacity(parts.len());
        for (entry, parts) in request.entries.iter().zip(&parts) {
            match self
                .producer
                .enqueue(|report| parts.record(&request.topic, &entry.data, report))
            {
                Ok(delivery) => pending.push((entry.entry_id.clone(), delivery)),
                Err(e) => failed.push(FailedEntry {
                    entry_id: entry.entry_id.clone(),
                    error: format!("kafka: publishing to topic {}: {e}", request.topic),
                }),
            }
        }
        for (id, delivery) in pending {
            let res = tokio::time::timeout(PUBLISH_TIMEOUT, delivery).await;
            let error = match res {
                Ok(Ok(Ok(_))) => continue,
                Ok(Ok(Err(e))) => e.to_string(),
                Ok(Err(_)) => "the producer was closed".to_string(),
                Err(_) => "timed out waiting for the broker".to_string(),
            };
            failed.push(FailedEntry {
                entry_id: id,
                error: format!("kafka: publishing to topic {}: {error}", request.topic),
            });
        }
        Ok(failed)
    }

    async fn subscribe(
        &self,
        request: SubscribeRequest,
        handler: Handler,
    ) -> Result<Subscription, PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::closed_component());
        }
        let group = self.md.consumer_group.clone().ok_or_else(|| {
            PubSubError::Metadata(MetadataError::new(
                "consumerGroup",
                "is required to subscribe (set consumerGroup or consumerID)",
            ))
        })?;
        self.ensure_topic(&request.topic).await?;
        let context = RebalanceContext {
            epochs: Arc::default(),
            pending: Arc::default(),
            drain_wait: self.md.session_timeout,
        };
        let epochs = context.epochs.clone();
        let pending = context.pending.clone();
        let consumer: StreamConsumer<RebalanceContext> =
            client_config(&self.md.consumer_properties(&group))
                .create_with_context(context)
                .map_err(|e| PubSubError::Connect {
                    message: format!("kafka: creating the consumer for group {group}: {e}"),
                    source: Some(Box::new(e)),
                })?;
        consumer
            .subscribe(&[request.topic.as_str()])
            .map_err(|e| kafka_error(&format!("subscribing to topic {}", request.topic), e))?;
        let (cancel, cancelled) = watch::channel(false);
        let (guard, drained) = daprd_core::pubsub::drain_tracker();
        let run = ConsumeLoop {
            component: self.name.clone(),
            topic: request.topic.clone(),
            md: self.md.clone(),
            consumer: Arc::new(consumer),
            handler,
            bulk: request.bulk,
            epochs,
            pending,
            cancelled,
            stop: self.stop.subscribe(),
            guard,
        };
        tokio::spawn(run.run());
        Ok(Subscription::new(move || {
            let _ = cancel.send(true);
        })
        .with_drain(drained))
    }

    async fn ping(&self) -> Result<(), PubSubError> {
        check_brokers(&self.producer, &self.errors, &self.md.brokers).await
    }

    async fn close(&self) -> Result<(), PubSubError> {
        let _ = self.stop.send(true);
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
        Ok(())
    }
}

/// Counts partition revocations, so queued messages of a revoked partition are not handled
/// (the partition's next owner reads them from the committed offset).
#[derive(Default)]
struct RebalanceContext {
    epochs: Arc<Mutex<HashMap<i32, u64>>>,
    /// Messages queued or in flight, per partition.
    pending: Arc<Mutex<HashMap<i32, Arc<AtomicUsize>>>>,
    /// How long a revocation waits for the partition's message in flight (`sessionTimeout`).
    drain_wait: Duration,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let revoked: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        {
            let mut epochs = self.epochs.lock().unwrap_or_else(|p| p.into_inner());
            for p in &revoked {
                *epochs.entry(*p).or_default() += 1;
            }
        }
        // Like sarama, let the message in flight finish (and its offset be stored, so the
        // commit before the revocation includes it) instead of having the partition's next
        // owner deliver it again; queued messages are skipped by the epoch bump above.
        let counters: Vec<Arc<AtomicUsize>> = {
            let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            revoked
                .iter()
                .filter_map(|p| pending.get(p).cloned())
                .collect()
        };
        let deadline = Instant::now() + self.drain_wait;
        let wait = || {
            while counters.iter().any(|c| c.load(Ordering::SeqCst) > 0) && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // The callback runs inside the consume loop's poll: on a multi-thread runtime the
        // workers go on elsewhere meanwhile; elsewhere waiting would only stall them.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => {}
        }
    }
}

fn epoch(epochs: &Mutex<HashMap<i32, u64>>, partition: i32) -> u64 {
    epochs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&partition)
        .copied()
        .unwrap_or(0)
}

type SharedConsumer = Arc<StreamConsumer<RebalanceContext>>;

struct ConsumeLoop {
    component: String,
    topic: String,
    md: Arc<KafkaMetadata>,
    consumer: SharedConsumer,
    handler: Handler,
    /// Bulk subscription batch size ([`SubscribeRequest::bulk`]).
    bulk: Option<usize>,
    epochs: Arc<Mutex<HashMap<i32, u64>>>,
    pending: Arc<Mutex<HashMap<i32, Arc<AtomicUsize>>>>,
    cancelled: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
    /// Held until the loop has stopped its workers and committed their offsets.
    guard: daprd_core::pubsub::DrainGuard,
}

/// One partition's queue: handled in order by its own task.
struct PartitionWorker {
    tx: mpsc::UnboundedSender<(OwnedMessage, u64)>,
    flow: Arc<Flow>,
}

/// Pauses a partition whose queue is full and resumes it once half drained.
struct Flow {
    pending: Arc<AtomicUsize>,
    paused: Mutex<bool>,
    high: usize,
    consumer: SharedConsumer,
    topic: String,
    partition: i32,
}

impl Flow {
    fn tpl(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, self.partition);
        tpl
    }

    fn queued(&self) {
        let n = self.pending.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.high {
            let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
            if !*paused && self.pending.load(Ordering::SeqCst) >= self.high {
                if let Err(e) = self.consumer.pause(&self.tpl()) {
                    tracing::warn!(topic = %self.topic, partition = self.partition, error = %e, "kafka: pausing a partition failed");
                } else {
                    *paused = true;
                }
            }
        }
    }

    fn done(&self) {
        let n = self.pending.fetch_sub(1, Ordering::SeqCst) - 1;
        if n <= self.high / 2 {
            let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
            if *paused {
                if let Err(e) = self.consumer.resume(&self.tpl()) {
                    tracing::warn!(topic = %self.topic, partition = self.partition, error = %e, "kafka: resuming a partition failed");
                }
                *paused = false;
            }
        }
    }
}

impl ConsumeLoop {
    async fn run(mut self) {
        let mut workers: HashMap<i32, PartitionWorker> = HashMap::new();
        let (done_tx, done_rx) = watch::channel(false);
        loop {
            let next = tokio::select! {
                biased;
                _ = self.cancelled.wait_for(|c| *c) => break,
                _ = self.stop.wait_for(|c| *c) => break,
                m = self.consumer.recv() => m.map(|m| m.detach()),
            };
            let msg = match next {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(component = %self.component, topic = %self.topic, error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let partition = msg.partition();
            let worker = workers
                .entry(partition)
                .or_insert_with(|| self.spawn_worker(partition, done_rx.clone()));
            worker.flow.queued();
            let current = epoch(&self.epochs, partition);
            if worker.tx.send((msg, current)).is_err() {
                worker.flow.done();
            }
        }
        // Stop the workers (queued messages are left for redelivery), wait for the message
        // each is handling, commit what was stored and leave the group.
        let _ = done_tx.send(true);
        drop(workers);
        drop(done_rx);
        let consumer = self.consumer;
        let guard = self.guard;
        let _ = tokio::task::spawn_blocking(move || {
            // Workers hold clones of the consumer; wait (bounded) until they let go.
            let deadline = Instant::now() + Duration::from_secs(30);
            while Arc::strong_count(&consumer) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
                tracing::debug!(error = %e, "kafka: final offset commit");
            }
            drop(consumer);
        })
        .await;
        drop(guard);
    }

    fn spawn_worker(&self, partition: i32, mut done: watch::Receiver<bool>) -> PartitionWorker {
        let (tx, mut rx) = mpsc::unbounded_channel::<(OwnedMessage, u64)>();
        let pending = Arc::new(AtomicUsize::new(0));
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(partition, pending.clone());
        let flow = Arc::new(Flow {
            pending,
            paused: Mutex::new(false),
            high: self.md.channel_buffer_size.max(1),
            consumer: self.consumer.clone(),
            topic: self.topic.clone(),
            partition,
        });
        let worker_flow = flow.clone();
        let handler = self.handler.clone();
        let md = self.md.clone();
        let epochs = self.epochs.clone();
        let component = self.component.clone();
        let bulk = self.bulk;
        tokio::spawn(async move {
            let flow = worker_flow;
            loop {
                let next = tokio::select! {
                    biased;
                    _ = done.wait_for(|d| *d) => break,
                    m = rx.recv() => m,
                };
                let Some(first) = next else { break };
                // A bulk subscription gets what is already queued (up to its batch size)
                // at once, so the runtime can batch it; otherwise one message at a time.
                let mut batch = vec![first];
                while batch.len() < bulk.unwrap_or(1) {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                let current = epoch(&epochs, partition);
                let live: Vec<&OwnedMessage> = batch
                    .iter()
                    .filter(|(_, at)| *at == current)
                    .map(|(m, _)| m)
                    .collect();
                let settled = futures::future::join_all(live.iter().map(|m| {
                    // a revocation ends retries in place: the next owner retries
                    let revoked = || epoch(&epochs, partition) != current;
                    handle_one(m, &handler, &md, done.clone(), &component, revoked)
                }))
                .await;
                // Commit up to the last message of the settled run from the start: a message
                // behind an unsettled one (shutting down) is delivered again, never skipped.
                let last = live
                    .iter()
                    .zip(&settled)
                    .take_while(|(_, ok)| **ok)
                    .map(|(m, _)| *m)
                    .last();
                if let Some(msg) = last {
                    if let Err(e) =
                        flow.consumer
                            .store_offset(msg.topic(), msg.partition(), msg.offset())
                    {
                        tracing::debug!(%component, topic = msg.topic(), partition, offset = msg.offset(), error = %e, "kafka: storing the offset failed (partition revoked?)");
                    }
                }
                for _ in &batch {
                    flow.done();
                }
            }
            // Stopped: what is still queued will not be handled here, so a revocation (the
            // group leave when the consumer closes) must not wait for it.
            flow.pending.store(0, Ordering::SeqCst);
            drop(flow);
        });
        PartitionWorker { tx, flow }
    }
}

/// Hands `msg` to the runtime until it is settled; `true` when its offset may be committed.
async fn handle_one(
    msg: &OwnedMessage,
    handler: &Handler,
    md: &KafkaMetadata,
    mut done: watch::Receiver<bool>,
    component: &str,
    revoked: impl Fn() -> bool,
) -> bool {
    let message = Message {
        topic: msg.topic().to_string(),
        data: Bytes::copy_from_slice(msg.payload().unwrap_or_default()),
        metadata: inbound_metadata(msg, md),
        content_type: None,
    };
    let started = Instant::now();
    let mut attempt = 0u64;
    loop {
        match handler(message.clone()).await {
            Outcome::Success | Outcome::Drop => return true,
            Outcome::Retry => {}
        }
        let Some(back_off) = &md.consume_retry else {
            tracing::error!(%component, topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), "kafka: message not processed; skipped (consumeRetryEnabled is false)");
            return false;
        };
        let Some(delay) = back_off.next_delay(attempt, started.elapsed()) else {
            tracing::error!(%component, topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), "kafka: too many failed attempts at processing the message; skipped");
            return false;
        };
        attempt += 1;
        tracing::warn!(%component, topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), attempt, "kafka: message not processed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            // Shutting down: not committed, so the group redelivers it.
            _ = done.wait_for(|d| *d) => return false,
        }
        if revoked() {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_metadata_becomes_key_partition_and_headers() {
        let md: BTreeMap<String, String> = [
            ("partitionKey", "k1"),
            ("partitionNumber", "2"),
            ("cloudevent.type", "t"),
            ("internal.secret", "s"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let re = regex::Regex::new("^internal\\.").unwrap();
        let p = RecordParts::from_metadata(&md, Some(&re)).unwrap();
        assert_eq!(p.key.as_deref(), Some("k1"));
        assert_eq!(p.partition, Some(2));
        let names: Vec<&str> = p.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["cloudevent.type", "partitionKey", "partitionNumber"]
        );
        let bad: BTreeMap<String, String> = [("partitionNumber".to_string(), "-1".to_string())]
            .into_iter()
            .collect();
        let e = RecordParts::from_metadata(&bad, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permanent);
        assert!(e.to_string().contains("partitionNumber"), "{e}");
    }

    #[test]
    fn query_escape_matches_go() {
        assert_eq!(query_escape("a b/c?d=é~"), "a+b%2Fc%3Fd%3D%C3%A9~");
    }
}
