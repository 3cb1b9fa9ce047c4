//! `pubsub.pulsar`: Apache Pulsar over its binary protocol (the pure-Rust `pulsar` client),
//! as Dapr's component uses it.
//!
//! * Topic = `{persistent|non-persistent}://<tenant>/<namespace>/<topic>`; the subscription
//!   is named `consumerID`, of type `subscribeType` (a subscription's own `subscribeType`
//!   metadata wins), starting at `subscribeInitialPosition`; `topicsPattern` subscribes to
//!   every topic of the namespace whose name matches.
//! * Publish: the payload as given (the CloudEvent); `partitionKey` is the message key,
//!   `deliverAt`/`deliverAfter` its delivery time, every other non-empty metadata entry a
//!   message property — the message Go daprd sends. One producer per topic, batching and
//!   compression as configured; a publish returns once the broker's receipt is in.
//! * Subscribe: up to `maxConcurrentHandlers` messages in the app's hands (`processMode: sync`:
//!   one); `Success`/`Drop` → ack, `Retry` → negative ack after `redeliveryDelay` (the broker
//!   hands it out again). A message's properties are its metadata.

mod metadata;
mod oauth2;
mod subscriber;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    ErrorKind, Feature, Handler, PubSub, PubSubError, PubSubFactory, PublishRequest,
    SubscribeRequest, Subscription,
};
use pulsar::{Pulsar, TokioExecutor};
use tokio::sync::{watch, Mutex};

pub use metadata::{Batching, Compression, PulsarMetadata};

/// Builds `pubsub.pulsar` components.
pub struct PulsarFactory;

/// How long the first connection may take before the component fails to start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[async_trait]
impl PubSubFactory for PulsarFactory {
    fn component_type(&self) -> &'static str {
        "pubsub.pulsar"
    }

    fn validate(&self, metadata: &Metadata) -> Vec<MetadataError> {
        PulsarMetadata::parse(metadata).err().unwrap_or_default()
    }

    async fn connect(
        &self,
        name: &str,
        metadata: &Metadata,
    ) -> Result<Arc<dyn PubSub>, PubSubError> {
        let md = PulsarMetadata::parse(metadata)?;
        // Two clients, so publishes and the consumers' acks travel on connections of their
        // own: the client does not set TCP_NODELAY, and a publish queued behind an ack the
        // broker has not acknowledged yet waits for its delayed TCP ack (40 ms per publish,
        // measured, while a subscription was active).
        let oauth2 = match &md.oauth2 {
            Some(settings) => Some(oauth2::OAuth2Token::new(settings).await.map_err(|e| {
                PubSubError::Connect {
                    message: format!("pulsar oauth2: {e}"),
                    source: None,
                }
            })?),
            None => None,
        };
        let publisher = client(&md, oauth2.as_ref()).await?;
        let consumers = client(&md, oauth2.as_ref()).await?;
        Ok(Arc::new(PulsarPubSub {
            name: name.to_string(),
            md: Arc::new(md),
            publisher,
            consumers,
            producers: Mutex::new(HashMap::new()),
            stop: watch::channel(false).0,
        }))
    }
}

/// How often a subscribe or a producer's creation is retried when the broker answers "busy"
/// or "not ready" (one second apart): the client's default retries forever, which would hang
/// a second consumer of an exclusive subscription instead of failing it.
const OPERATION_RETRIES: u32 = 5;

/// A client of the broker at `md.url`, connected (with the OAuth2 token source, if any).
async fn client(
    md: &PulsarMetadata,
    oauth2: Option<&oauth2::OAuth2Token>,
) -> Result<Pulsar<TokioExecutor>, PubSubError> {
    let mut builder = Pulsar::builder(md.url.clone(), TokioExecutor)
        .with_operation_retry_options(pulsar::OperationRetryOptions {
            operation_timeout: Duration::from_secs(30),
            retry_delay: Duration::from_secs(1),
            max_retries: Some(OPERATION_RETRIES),
        })
        .with_allow_insecure_connection(!md.enable_tls)
        .with_tls_hostname_verification_enabled(md.enable_tls);
    if let Some(token) = &md.token {
        builder = builder.with_auth(pulsar::Authentication {
            name: "token".into(),
            data: token.clone().into_bytes(),
        });
    } else if let Some(source) = oauth2 {
        builder = builder.with_auth_provider(Box::new(source.clone()));
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, builder.build()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(PubSubError::Connect {
            message: format!("connecting to the pulsar broker at {}", md.url),
            source: Some(Box::new(e)),
        }),
        Err(_) => Err(PubSubError::Connect {
            message: format!(
                "connecting to the pulsar broker at {}: no answer in {CONNECT_TIMEOUT:?}",
                md.url
            ),
            source: None,
        }),
    }
}

/// Go daprd's partition choice on a partitioned topic: a message with a key goes to partition
/// `JavaStringHash(key) % partitions` (the Pulsar Go client's default router, the same as the
/// Java client's for ASCII keys), so the messages of a key share a partition (and its order)
/// with Go daprd's and Java producers'; one without a key goes round robin. The `pulsar`
/// crate's default sends every message round robin, key or not.
struct KeyHashRouting {
    next: std::sync::atomic::AtomicUsize,
}

/// Java's `String.hashCode` over the key's bytes, as the Pulsar Go client computes it.
fn java_string_hash(key: &str) -> u32 {
    key.bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
}

impl pulsar::routing_policy::CustomRoutingPolicy for KeyHashRouting {
    fn route(&self, message: &pulsar::producer::Message, partitions: usize) -> usize {
        let n = partitions.max(1);
        match message.partition_key.as_deref().filter(|k| !k.is_empty()) {
            Some(key) => java_string_hash(key) as usize % n,
            None => self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n,
        }
    }
}

type Producer = Arc<Mutex<pulsar::Producer<TokioExecutor>>>;

/// A live `pubsub.pulsar` component.
pub struct PulsarPubSub {
    name: String,
    md: Arc<PulsarMetadata>,
    /// The client of the producers.
    publisher: Pulsar<TokioExecutor>,
    /// The client of the subscriptions' consumers.
    consumers: Pulsar<TokioExecutor>,
    /// One producer per full topic name, made on its first publish.
    producers: Mutex<HashMap<String, Producer>>,
    stop: watch::Sender<bool>,
}

/// Bulk subscriptions flush on arrival, as Dapr's Pulsar component declares.
const FEATURES: &[Feature] = &[Feature::BulkSubscribeImmediate];

/// A client error as a component error: what a retry can help with is transient.
pub(crate) fn client_error(what: &str, e: &pulsar::Error) -> PubSubError {
    use pulsar::error::{ConnectionError, ProducerError};
    let kind = match e {
        pulsar::Error::Producer(ProducerError::Custom(_))
        | pulsar::Error::Connection(ConnectionError::Authentication(_)) => ErrorKind::Permanent,
        _ => ErrorKind::Transient,
    };
    PubSubError::broker(kind, format!("pulsar: {what}: {e}"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl PulsarPubSub {
    async fn producer(&self, topic: &str) -> Result<Producer, PubSubError> {
        let mut producers = self.producers.lock().await;
        if let Some(p) = producers.get(topic) {
            return Ok(p.clone());
        }
        let mut options = pulsar::ProducerOptions {
            routing_policy: Some(pulsar::routing_policy::RoutingPolicy::Custom(Arc::new(
                KeyHashRouting {
                    next: std::sync::atomic::AtomicUsize::new(0),
                },
            ))),
            ..Default::default()
        };
        if let Some(b) = self.md.batching {
            options.batch_size = Some(b.max_messages);
            options.batch_byte_size = Some(b.max_size);
            options.batch_timeout = Some(b.max_publish_delay);
        }
        options.compression = Some(match self.md.compression {
            Compression::None => pulsar::compression::Compression::None,
            Compression::Lz4 => pulsar::compression::Compression::Lz4(Default::default()),
            Compression::Zlib => pulsar::compression::Compression::Zlib(Default::default()),
            Compression::Zstd => pulsar::compression::Compression::Zstd(Default::default()),
        });
        let producer = self
            .publisher
            .producer()
            .with_topic(topic)
            .with_options(options)
            .build()
            .await
            .map_err(|e| client_error(&format!("creating a producer for {topic}"), &e))?;
        let producer = Arc::new(Mutex::new(producer));
        producers.insert(topic.to_string(), producer.clone());
        Ok(producer)
    }
}

#[async_trait]
impl PubSub for PulsarPubSub {
    fn features(&self) -> &[Feature] {
        FEATURES
    }

    async fn publish(&self, request: PublishRequest) -> Result<(), PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
        }
        let message =
            PulsarMetadata::publish_message(request.data.to_vec(), &request.metadata, now_ms())
                .map_err(|e| PubSubError::broker(ErrorKind::Permanent, format!("pulsar: {e}")))?;
        let topic = self.md.topic_name(&request.topic);
        let producer = self.producer(&topic).await?;
        // Queue under the lock, wait for the receipt without it: publishes to one topic
        // share a producer (and its batches).
        let sent = async {
            let receipt = producer.lock().await.send_non_blocking(message).await?;
            receipt.await
        };
        if let Err(e) = sent.await {
            // the next publish makes a new producer rather than trust this one
            self.producers.lock().await.remove(&topic);
            return Err(client_error(&format!("publishing to {topic}"), &e));
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        request: SubscribeRequest,
        handler: Handler,
    ) -> Result<Subscription, PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
        }
        let target = subscriber::Target::of(&self.md, &request)?;
        // The first subscribe must succeed (a clear error); later outages resubscribe.
        let consumer = subscriber::consumer(&self.consumers, &self.md, &target)
            .await
            .map_err(|e| client_error(&format!("subscribing to {}", target.describe()), &e))?;
        let (stop, guard, handle) = crate::stop::subscription(self.stop.subscribe());
        tokio::spawn(
            subscriber::ConsumeLoop {
                client: self.consumers.clone(),
                md: self.md.clone(),
                target,
                stop,
                component: self.name.clone(),
                topic: request.topic.clone(),
                handler,
                guard,
            }
            .run(consumer),
        );
        Ok(handle)
    }

    async fn close(&self) -> Result<(), PubSubError> {
        let _ = self.stop.send(true);
        let producers: Vec<Producer> = self
            .producers
            .lock()
            .await
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in producers {
            let _ = p.lock().await.close().await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulsar::routing_policy::CustomRoutingPolicy;

    fn keyed(key: &str) -> pulsar::producer::Message {
        pulsar::producer::Message {
            partition_key: Some(key.to_string()),
            ..Default::default()
        }
    }

    #[test]
    fn keys_route_as_the_go_client_does() {
        // Java's "hello".hashCode() is 99162322
        assert_eq!(java_string_hash("hello"), 99_162_322);
        let r = KeyHashRouting {
            next: std::sync::atomic::AtomicUsize::new(0),
        };
        assert_eq!(r.route(&keyed("hello"), 7), 0);
        // hashes with the top bit set stay unsigned (Go's uint32), not Java's negative int
        assert_eq!(java_string_hash("customer-7"), 2_713_781_768);
        assert_eq!(r.route(&keyed("customer-7"), 7), 5);
        assert_eq!(r.route(&keyed("zzzzzzzz"), 7), 4);
        // the same key, the same partition, every time
        assert!((0..10).all(|_| r.route(&keyed("customer-7"), 7) == 5));
        // no key: round robin over every partition
        let keyless = pulsar::producer::Message::default();
        let seen: std::collections::BTreeSet<usize> =
            (0..6).map(|_| r.route(&keyless, 3)).collect();
        assert_eq!(seen, (0..3).collect());
    }
}
