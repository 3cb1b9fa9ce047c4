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
mod subscriber;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    BulkPublishRequest, ErrorKind, FailedEntry, Feature, Handler, PubSub, PubSubError,
    PubSubFactory, PublishRequest, SubscribeRequest, Subscription,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::util::Timeout;
use tokio::sync::watch;

pub use metadata::{Auth, BackOff, InitialOffset, KafkaMetadata};
use producer::{is_refusal, KafkaProducer, LastError, Opaque, Record};
use subscriber::{ConsumeLoop, RebalanceContext};

/// How long a publish may wait in librdkafka's queue and for the broker's acknowledgement.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds `pubsub.kafka` components.
pub struct KafkaFactory;

fn client_config(props: &[(&'static str, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in props {
        config.set(*k, v);
    }
    // The client library takes its level from the `log` crate, which the sidecar does not
    // use (errors only, then): take it from the sidecar's own log filter.
    config.set_log_level(librdkafka_log_level());
    config
}

/// The most detailed level of the client library's lines the sidecar's log shows.
fn librdkafka_log_level() -> rdkafka::config::RDKafkaLogLevel {
    use rdkafka::config::RDKafkaLogLevel;
    if tracing::enabled!(target: "librdkafka", tracing::Level::DEBUG) {
        RDKafkaLogLevel::Debug
    } else if tracing::enabled!(target: "librdkafka", tracing::Level::INFO) {
        RDKafkaLogLevel::Info
    } else if tracing::enabled!(target: "librdkafka", tracing::Level::WARN) {
        RDKafkaLogLevel::Warning
    } else {
        RDKafkaLogLevel::Error
    }
}

/// A librdkafka error as a component error: permanent for the codes a retry meets again.
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
    let kind = if permanent {
        ErrorKind::Permanent
    } else {
        ErrorKind::Transient
    };
    PubSubError::with_kind(kind, "kafka", what, e)
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
            return PubSubError::permanent(
                "kafka",
                &format!("{what}: topic {topic} does not exist on the broker, which does not create topics on demand (create it, or set autoCreateTopics)"),
                e,
            );
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

const FEATURES: &[Feature] = &[Feature::BulkPublish];

#[async_trait]
impl PubSub for KafkaPubSub {
    fn features(&self) -> &[Feature] {
        FEATURES
    }

    async fn publish(&self, request: PublishRequest) -> Result<(), PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
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
            return Err(PubSubError::Closed);
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
            return Err(PubSubError::Closed);
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
        let (stop, guard, handle) = crate::stop::subscription(self.stop.subscribe());
        let run = ConsumeLoop {
            component: self.name.clone(),
            topic: request.topic.clone(),
            md: self.md.clone(),
            consumer: Arc::new(consumer),
            handler,
            bulk: request.bulk,
            epochs,
            pending,
            stop,
            guard,
        };
        tokio::spawn(run.run());
        Ok(handle)
    }

    async fn close(&self) -> Result<(), PubSubError> {
        let _ = self.stop.send(true);
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
        Ok(())
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
}
