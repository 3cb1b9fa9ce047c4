//! `pubsub.jetstream`: NATS JetStream, as Dapr's component uses it.
//!
//! * Topic = subject. Publish sets `Nats-Msg-Id` to the CloudEvent `id` (deduplication).
//! * Subscribe: a push consumer on the stream holding the subject (`streamName`, else looked
//!   up by subject — the stream must exist), durable when `durableName` is set, delivered to
//!   queue group `queueGroupName`; `consumerID` is not used (as in Dapr).
//! * `Success`/`Drop` → `Ack`; `Retry` → `Nak` (with `ackWait` delay when set).

mod metadata;
mod subscriber;

use std::sync::Arc;

use async_nats::jetstream::{self, consumer::push};
use async_trait::async_trait;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    ErrorKind, Feature, Handler, PubSub, PubSubError, PubSubFactory, PublishRequest,
    SubscribeRequest, Subscription,
};
use tokio::sync::watch;

pub use metadata::{JetStreamMetadata, StartAt};
use subscriber::ConsumeLoop;

/// Builds `pubsub.jetstream` components.
pub struct JetStreamFactory;

#[async_trait]
impl PubSubFactory for JetStreamFactory {
    fn component_type(&self) -> &'static str {
        "pubsub.jetstream"
    }

    fn validate(&self, metadata: &Metadata) -> Vec<MetadataError> {
        JetStreamMetadata::parse(metadata).err().unwrap_or_default()
    }

    async fn connect(
        &self,
        name: &str,
        metadata: &Metadata,
    ) -> Result<Arc<dyn PubSub>, PubSubError> {
        let md = JetStreamMetadata::parse(metadata)?;
        // The first connection must succeed (as in Dapr, an unreachable or refusing server
        // fails component init with a clear error); later outages reconnect by themselves.
        let mut opts = async_nats::ConnectOptions::new()
            .name(&md.name)
            .reconnect_delay_callback(|attempts| {
                daprd_core::backoff::RECONNECT.after(u32::try_from(attempts).unwrap_or(u32::MAX))
            });
        if let Some(t) = &md.token {
            opts = opts.token(t.clone());
        }
        if let Some((jwt, seed)) = &md.jwt {
            // validated at parse time
            let key =
                Arc::new(
                    nkeys::KeyPair::from_seed(seed).map_err(|e| PubSubError::Connect {
                        message: format!("jetstream seedKey: {e}"),
                        source: None,
                    })?,
                );
            opts = opts.jwt(jwt.clone(), move |nonce| {
                let key = key.clone();
                async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
            });
        } else if let Some((cert, key)) = &md.tls_client {
            opts = opts.add_client_certificate(cert.into(), key.into());
        }
        let client = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            opts.connect(md.url.as_str()),
        )
        .await
        .map_err(|_| PubSubError::Connect {
            message: format!("connecting to nats at {} timed out", md.url),
            source: None,
        })?
        .map_err(|e| PubSubError::Connect {
            message: format!("connecting to nats at {}", md.url),
            source: Some(Box::new(e)),
        })?;
        let js = match (&md.api_prefix, &md.domain) {
            (Some(prefix), _) => jetstream::with_prefix(client, prefix),
            (None, Some(domain)) => jetstream::with_domain(client, domain),
            (None, None) => jetstream::new(client),
        };
        Ok(Arc::new(JetStreamPubSub {
            name: name.to_string(),
            md: Arc::new(md),
            js,
            stop: watch::channel(false).0,
        }))
    }
}

/// A live `pubsub.jetstream` component.
pub struct JetStreamPubSub {
    name: String,
    md: Arc<JetStreamMetadata>,
    js: jetstream::Context,
    stop: watch::Sender<bool>,
}

/// The `Nats-Msg-Id` a publish carries: the CloudEvent id when the data is one.
pub fn message_id(data: &[u8]) -> Option<String> {
    match daprd_core::cloudevent::decode_first_json(data)? {
        serde_json::Value::Object(o) => o.get("id")?.as_str().map(str::to_string),
        _ => None,
    }
}

const FEATURES: &[Feature] = &[];

#[async_trait]
impl PubSub for JetStreamPubSub {
    fn features(&self) -> &[Feature] {
        FEATURES
    }

    async fn publish(&self, request: PublishRequest) -> Result<(), PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
        }
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = message_id(&request.data) {
            headers.insert("Nats-Msg-Id", id.as_str());
        }
        let ack = self
            .js
            .publish_with_headers(request.topic.clone(), headers, request.data.clone())
            .await
            .map_err(|e| PubSubError::transient("jetstream", "publishing", e))?;
        ack.await.map_err(|e| {
            PubSubError::transient("jetstream", "waiting for the publish acknowledgement", e)
        })?;
        Ok(())
    }

    async fn subscribe(
        &self,
        request: SubscribeRequest,
        handler: Handler,
    ) -> Result<Subscription, PubSubError> {
        let md = &self.md;
        let stream_name = match &md.stream_name {
            Some(s) => s.clone(),
            None => self
                .js
                .stream_by_subject(request.topic.clone())
                .await
                .map_err(|e| {
                    PubSubError::transient(
                        "jetstream",
                        &format!("finding the stream for subject {}", request.topic),
                        e,
                    )
                })?,
        };
        let stream = self.js.get_stream(&stream_name).await.map_err(|e| {
            PubSubError::transient("jetstream", &format!("getting stream {stream_name}"), e)
        })?;
        let deliver_policy = match md.start {
            StartAt::All => jetstream::consumer::DeliverPolicy::All,
            StartAt::Last => jetstream::consumer::DeliverPolicy::Last,
            StartAt::New => jetstream::consumer::DeliverPolicy::New,
            StartAt::Sequence(s) => {
                jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: s }
            }
            StartAt::Time(t) => jetstream::consumer::DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp(t)
                    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            },
        };
        let ack_policy = match md.ack_policy.as_str() {
            "all" => jetstream::consumer::AckPolicy::All,
            "none" => jetstream::consumer::AckPolicy::None,
            _ => jetstream::consumer::AckPolicy::Explicit,
        };
        let config = push::Config {
            deliver_subject: self.js.client().new_inbox(),
            durable_name: md.durable_name.clone(),
            deliver_group: md.queue_group.clone(),
            deliver_policy,
            ack_policy,
            ack_wait: md.ack_wait.unwrap_or_default(),
            max_deliver: md.max_deliver,
            backoff: md.back_off.clone(),
            max_ack_pending: md.max_ack_pending,
            num_replicas: md.replicas,
            memory_storage: md.memory_storage,
            rate_limit: md.rate_limit,
            flow_control: md.flow_control,
            idle_heartbeat: md.heartbeat.unwrap_or_default(),
            filter_subject: request.topic.clone(),
            ..Default::default()
        };
        let consumer: jetstream::consumer::Consumer<push::Config> = match &md.durable_name {
            Some(durable) => {
                let mut consumer: jetstream::consumer::Consumer<push::Config> = stream
                    .get_or_create_consumer(durable, config)
                    .await
                    .map_err(|e| PubSubError::transient("jetstream", "creating the consumer", e))?;
                // An existing durable consumer keeps its own subject: binding a second
                // subscription to it would hand that subscription another topic's messages.
                let info = consumer
                    .info()
                    .await
                    .map_err(|e| PubSubError::transient("jetstream", "reading the consumer", e))?;
                let filter = info.config.filter_subject.clone();
                if !filter.is_empty() && filter != request.topic {
                    return Err(PubSubError::broker(
                        ErrorKind::Permanent,
                        format!(
                            "jetstream: durable consumer {durable:?} serves subject {filter:?}, not {:?}: give each topic its own durableName",
                            request.topic
                        ),
                    ));
                }
                consumer
            }
            None => stream
                .create_consumer(config)
                .await
                .map_err(|e| PubSubError::transient("jetstream", "creating the consumer", e))?,
        };
        let messages = consumer
            .messages()
            .await
            .map_err(|e| PubSubError::transient("jetstream", "subscribing", e))?;
        // The consume task and each delivery hold a guard until their ack/nak is sent: the
        // subscription's stop waits for that. Messages the server pushed but no delivery
        // took are redelivered after `ackWait`.
        let (stop, guard, handle) = crate::stop::subscription(self.stop.subscribe());
        tokio::spawn(
            ConsumeLoop {
                messages,
                stop,
                component: self.name.clone(),
                topic: request.topic.clone(),
                md: self.md.clone(),
                handler,
                guard,
            }
            .run(),
        );
        Ok(handle)
    }

    async fn close(&self) -> Result<(), PubSubError> {
        let _ = self.stop.send(true);
        // Acks are publishes the client buffers: write them out before the process ends.
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), self.js.client().flush()).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_is_the_cloudevent_id() {
        assert_eq!(
            message_id(br#"{"id":"abc","data":1}"#).as_deref(),
            Some("abc")
        );
        assert_eq!(message_id(b"raw"), None);
        assert_eq!(message_id(br#"{"id":5}"#), None);
    }
}
