//! `pubsub.jetstream`: NATS JetStream, as Dapr's component uses it.
//!
//! * Topic = subject. Publish sets `Nats-Msg-Id` to the CloudEvent `id` (deduplication).
//! * Subscribe: a push consumer on the stream holding the subject (`streamName`, else looked
//!   up by subject — the stream must exist), durable when `durableName` is set, delivered to
//!   queue group `queueGroupName`; `consumerID` is not used (as in Dapr).
//! * `Success`/`Drop` → `Ack`; `Retry` → `Nak` (with `ackWait` delay when set).

mod metadata;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::push, AckKind};
use async_trait::async_trait;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    ErrorKind, Feature, Handler, Message, Outcome, PubSub, PubSubError, PubSubFactory,
    PublishRequest, SubscribeRequest, Subscription,
};
use futures::StreamExt;
use tokio::sync::watch;

pub use metadata::{JetStreamMetadata, StartAt};

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
        let mut opts = async_nats::ConnectOptions::new().name(&md.name);
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

/// What a subscription knows of the stream sequences it was handed: the ones in the app's
/// hands, and the last [`SEEN_SETTLED`] it acknowledged.
#[derive(Default)]
struct Seen {
    in_hand: std::collections::HashSet<u64>,
    settled: std::collections::HashSet<u64>,
    settled_order: std::collections::VecDeque<u64>,
}

const SEEN_SETTLED: usize = 10_000;

enum Admit {
    Deliver,
    InHand,
    Settled,
}

impl Seen {
    fn admit(&mut self, seq: u64) -> Admit {
        if self.in_hand.contains(&seq) {
            Admit::InHand
        } else if self.settled.contains(&seq) {
            Admit::Settled
        } else {
            self.in_hand.insert(seq);
            Admit::Deliver
        }
    }

    fn done(&mut self, seq: u64, acked: bool) {
        self.in_hand.remove(&seq);
        if acked && self.settled.insert(seq) {
            self.settled_order.push_back(seq);
            if self.settled_order.len() > SEEN_SETTLED {
                if let Some(old) = self.settled_order.pop_front() {
                    self.settled.remove(&old);
                }
            }
        }
    }
}

/// The `Nats-Msg-Id` a publish carries: the CloudEvent id when the data is one.
pub fn message_id(data: &[u8]) -> Option<String> {
    match daprd_core::cloudevent::decode_first_json(data)? {
        serde_json::Value::Object(o) => o.get("id")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn broker(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> PubSubError {
    PubSubError::Broker {
        message: format!("jetstream: {what}: {e}"),
        kind: ErrorKind::Transient,
        source: Some(Box::new(e)),
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
            return Err(PubSubError::closed_component());
        }
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = message_id(&request.data) {
            headers.insert("Nats-Msg-Id", id.as_str());
        }
        let ack = self
            .js
            .publish_with_headers(request.topic.clone(), headers, request.data.clone())
            .await
            .map_err(|e| broker("publishing", e))?;
        ack.await
            .map_err(|e| broker("waiting for the publish acknowledgement", e))?;
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
                    broker(
                        &format!("finding the stream for subject {}", request.topic),
                        e,
                    )
                })?,
        };
        let stream = self
            .js
            .get_stream(&stream_name)
            .await
            .map_err(|e| broker(&format!("getting stream {stream_name}"), e))?;
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
                    .map_err(|e| broker("creating the consumer", e))?;
                // An existing durable consumer keeps its own subject: binding a second
                // subscription to it would hand that subscription another topic's messages.
                let info = consumer
                    .info()
                    .await
                    .map_err(|e| broker("reading the consumer", e))?;
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
                .map_err(|e| broker("creating the consumer", e))?,
        };
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| broker("subscribing", e))?;
        let (cancel, mut cancelled) = watch::channel(false);
        let mut stop = self.stop.subscribe();
        let component = self.name.clone();
        let topic = request.topic.clone();
        let md = self.md.clone();
        // The consume task and each delivery hold a guard until their ack/nak is sent: the
        // subscription's stop waits for that. Messages the server pushed but no delivery
        // took are redelivered after `ackWait`.
        let (guard, drained) = daprd_core::pubsub::drain_tracker();
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        tokio::spawn(async move {
            loop {
                // A stop wins over a message that is ready: no delivery starts after it.
                let next = tokio::select! {
                    biased;
                    _ = cancelled.wait_for(|c| *c) => None,
                    _ = stop.wait_for(|c| *c) => None,
                    m = messages.next() => m,
                };
                let Some(next) = next else { return };
                let msg = match next {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(%component, %topic, error = %e, "jetstream message error");
                        continue;
                    }
                };
                // The server redelivers a message `ackWait` after it pushed it, even while it
                // waits here behind a slow handler: a copy of a message in the app's hands is
                // dropped (the first delivery's ack settles it), a copy of one already
                // accepted is acknowledged again, never handed to the app a second time.
                let stream_seq = msg.info().ok().map(|i| i.stream_sequence);
                if let Some(seq) = stream_seq {
                    let verdict = seen.lock().unwrap_or_else(|p| p.into_inner()).admit(seq);
                    match verdict {
                        Admit::Deliver => {}
                        Admit::InHand => continue,
                        Admit::Settled => {
                            let _ = msg.ack().await;
                            continue;
                        }
                    }
                }
                let seen = seen.clone();
                let handler = handler.clone();
                let parallel = md.parallel;
                let md = md.clone();
                let topic = topic.clone();
                let component = component.clone();
                let settling = guard.clone();
                let work = async move {
                    let _settling = settling;
                    let m = Message {
                        topic: topic.clone(),
                        data: msg.payload.clone(),
                        metadata: [("Topic".to_string(), msg.subject.to_string())]
                            .into_iter()
                            .collect::<BTreeMap<_, _>>(),
                        content_type: None,
                    };
                    // While the app works on it, tell the server every half `ackWait` (30 s
                    // by default) that the message is in progress: otherwise it is delivered
                    // again, to this or another subscriber, while the first handler still runs.
                    let outcome = if md.ack_policy == "none" {
                        handler(m).await
                    } else {
                        let work = handler(m);
                        tokio::pin!(work);
                        let period = (md.ack_wait.unwrap_or(Duration::from_secs(30)) / 2)
                            .max(Duration::from_millis(100));
                        loop {
                            tokio::select! {
                                o = &mut work => break o,
                                _ = tokio::time::sleep(period) => {
                                    let _ = msg.ack_with(AckKind::Progress).await;
                                }
                            }
                        }
                    };
                    if md.ack_policy == "none" {
                        if let Some(seq) = stream_seq {
                            seen.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .done(seq, true);
                        }
                        return;
                    }
                    let res = match outcome {
                        Outcome::Success | Outcome::Drop => msg.ack().await,
                        Outcome::Retry => msg.ack_with(AckKind::Nak(md.ack_wait)).await,
                    };
                    if let Some(seq) = stream_seq {
                        seen.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .done(seq, res.is_ok() && outcome != Outcome::Retry);
                    }
                    if let Err(e) = res {
                        tracing::warn!(%component, %topic, error = %e, "jetstream ack/nak failed; the server will redeliver");
                    }
                };
                if parallel {
                    tokio::spawn(work);
                } else {
                    work.await;
                }
            }
        });
        Ok(Subscription::new(move || {
            let _ = cancel.send(true);
        })
        .with_drain(drained))
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
