//! The consume loop of one `pubsub.pulsar` subscription: takes a message when a handler slot
//! is free (`maxConcurrentHandlers`, or one in `processMode: sync`), hands it to the app in a
//! task of its own, and acks or negatively acks it by the outcome. The loop owns the client's
//! consumer, so every ack goes through it; at a stop it takes no more messages, settles what
//! the app still has, then closes the consumer (the broker hands what the client had read
//! ahead to the subscription's other consumers). A consumer the client gave up on (a broker
//! away longer than its reconnection attempts) is subscribed again.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use daprd_core::pubsub::{DrainGuard, Handler, Message, Outcome, PubSubError, SubscribeRequest};
use futures::StreamExt;
use pulsar::consumer::ConsumerOptions;
use pulsar::message::proto::command_subscribe::SubType;
use pulsar::message::proto::MessageIdData;
use pulsar::{Pulsar, TokioExecutor};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::metadata::{process_mode_sync, sub_type, PulsarMetadata};
use crate::stop::Stop;

type Consumer = pulsar::Consumer<Vec<u8>, TokioExecutor>;

/// What a subscription consumes: one topic or the topics a pattern matches, how.
pub(super) struct Target {
    topic: Option<String>,
    pattern: Option<regex::Regex>,
    sub_type: SubType,
    sync: bool,
}

impl Target {
    /// The subscription's target; its own `subscribeType`, `processMode` and `topicsPattern`
    /// metadata win over the component's.
    pub(super) fn of(md: &PulsarMetadata, req: &SubscribeRequest) -> Result<Self, PubSubError> {
        let bad = |key: &str, problem: String| {
            PubSubError::Metadata(daprd_core::metadata::MetadataError::new(key, problem))
        };
        let sub_type = match req.metadata.get("subscribeType").filter(|v| !v.is_empty()) {
            None => md.subscribe_type,
            Some(v) => sub_type(v).ok_or_else(|| {
                bad(
                    "subscribeType",
                    format!("{v:?} is not one of exclusive, shared, failover, key_shared"),
                )
            })?,
        };
        let sync = match req.metadata.get("processMode").filter(|v| !v.is_empty()) {
            None => md.sync,
            Some(v) => process_mode_sync(v)
                .ok_or_else(|| bad("processMode", format!("{v:?} is not one of async, sync")))?,
        };
        let pattern = match req.metadata.get("topicsPattern") {
            Some(p) => Some(p.clone()).filter(|p| !p.is_empty()),
            None => md.topics_pattern.clone(),
        };
        // compiled once, on the full name the client matches topics by
        let pattern = match pattern {
            None => None,
            Some(p) => Some(regex::Regex::new(&md.topic_name(&p)).map_err(|e| {
                bad(
                    "topicsPattern",
                    format!("{p:?} is not a regular expression: {e}"),
                )
            })?),
        };
        Ok(Self {
            topic: pattern.is_none().then(|| md.topic_name(&req.topic)),
            pattern,
            sub_type,
            sync,
        })
    }

    pub(super) fn describe(&self) -> String {
        match (&self.topic, &self.pattern) {
            (Some(t), _) => t.clone(),
            (None, Some(p)) => format!("the topics matching {p}"),
            (None, None) => String::new(),
        }
    }
}

/// Subscribes `md.consumer_id` to `target`.
pub(super) async fn consumer(
    client: &Pulsar<TokioExecutor>,
    md: &PulsarMetadata,
    target: &Target,
) -> Result<Consumer, pulsar::Error> {
    let options = ConsumerOptions::default()
        .durable(md.durable)
        .with_initial_position(md.initial_position.clone())
        .with_receiver_queue_size(md.receiver_queue_size);
    let mut builder = client
        .consumer()
        .with_subscription(md.consumer_id.clone())
        .with_subscription_type(target.sub_type)
        .with_batch_size(md.receiver_queue_size)
        .with_options(options)
        .with_unacked_message_resend_delay(None);
    builder = match (&target.topic, &target.pattern) {
        (Some(topic), _) => builder.with_topic(topic.clone()),
        (None, Some(regex)) => {
            let mut b = builder
                .with_topic_regex(regex.clone())
                .with_lookup_namespace(format!("{}/{}", md.tenant, md.namespace));
            if let Some(period) = md.auto_discovery_period {
                b = b.with_topic_refresh(period);
            }
            b
        }
        (None, None) => builder,
    };
    builder.build().await
}

/// What a delivery asks of the loop once the app answered.
struct Settle {
    topic: String,
    id: MessageIdData,
    ack: bool,
}

/// The ids of the last [`SEEN_NACKED`] messages this subscription negatively acked: a later
/// copy of one is marked redelivered (the client does not expose Pulsar's redelivery count).
#[derive(Default)]
struct Nacked {
    ids: HashSet<(u64, u64, i32)>,
    order: VecDeque<(u64, u64, i32)>,
}

const SEEN_NACKED: usize = 10_000;

fn key(id: &MessageIdData) -> (u64, u64, i32) {
    (id.ledger_id, id.entry_id, id.batch_index.unwrap_or(-1))
}

impl Nacked {
    fn add(&mut self, id: &MessageIdData) {
        let k = key(id);
        if self.ids.insert(k) {
            self.order.push_back(k);
            if self.order.len() > SEEN_NACKED {
                if let Some(old) = self.order.pop_front() {
                    self.ids.remove(&old);
                }
            }
        }
    }
}

/// One subscription's consume loop.
pub(super) struct ConsumeLoop {
    pub(super) client: Pulsar<TokioExecutor>,
    pub(super) md: Arc<PulsarMetadata>,
    pub(super) target: Target,
    pub(super) stop: Stop,
    pub(super) component: String,
    /// The subscription's topic as the app knows it.
    pub(super) topic: String,
    pub(super) handler: Handler,
    /// Held until every message taken is settled and the consumer is closed.
    pub(super) guard: DrainGuard,
}

enum Event {
    Settled(Settle),
    Stopped,
    Slot(OwnedSemaphorePermit),
    Next(Option<Result<Box<pulsar::consumer::Message<Vec<u8>>>, pulsar::Error>>),
}

impl ConsumeLoop {
    pub(super) async fn run(mut self, mut consumer: Consumer) {
        let slots = Arc::new(Semaphore::new(if self.target.sync {
            1
        } else {
            self.md.max_concurrent_handlers
        }));
        let (settle_tx, mut settled) = mpsc::unbounded_channel::<Settle>();
        let mut outstanding = 0usize;
        let mut nacked = Nacked::default();
        let mut slot: Option<OwnedSemaphorePermit> = None;
        loop {
            let event = if slot.is_some() {
                tokio::select! {
                    biased;
                    Some(s) = settled.recv() => Event::Settled(s),
                    () = self.stop.wait() => Event::Stopped,
                    m = consumer.next() => Event::Next(m.map(|r| r.map(Box::new))),
                }
            } else {
                tokio::select! {
                    biased;
                    Some(s) = settled.recv() => Event::Settled(s),
                    () = self.stop.wait() => Event::Stopped,
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => Event::Slot(p),
                        Err(_) => Event::Stopped,
                    },
                }
            };
            match event {
                Event::Settled(s) => {
                    outstanding -= 1;
                    self.settle(&mut consumer, s, &mut nacked).await;
                }
                Event::Stopped => break,
                Event::Slot(p) => slot = Some(p),
                Event::Next(Some(Ok(m))) => {
                    let Some(p) = slot.take() else { continue };
                    outstanding += 1;
                    self.deliver(*m, p, &settle_tx, &nacked);
                }
                Event::Next(Some(Err(e))) => {
                    tracing::warn!(component = %self.component, topic = %self.topic, error = %e, "pulsar: the consumer reported an error");
                    if self.stop.sleep(Duration::from_secs(1)).await {
                        break;
                    }
                }
                Event::Next(None) => {
                    tracing::warn!(component = %self.component, topic = %self.topic, "pulsar: the consumer ended; subscribing again");
                    match self.resubscribe().await {
                        Some(c) => consumer = c,
                        None => break,
                    }
                }
            }
        }
        // Stopped: settle what the app still has, then close (the rest goes back).
        while outstanding > 0 {
            let Some(s) = settled.recv().await else { break };
            outstanding -= 1;
            self.settle(&mut consumer, s, &mut nacked).await;
        }
        if let Err(e) = consumer.close().await {
            tracing::debug!(component = %self.component, topic = %self.topic, error = %e, "pulsar: closing the consumer");
        }
        drop(self.guard);
    }

    async fn settle(&self, consumer: &mut Consumer, s: Settle, nacked: &mut Nacked) {
        let done = if s.ack {
            consumer.ack_with_id(&s.topic, s.id).await
        } else {
            nacked.add(&s.id);
            consumer.nack_with_id(&s.topic, s.id).await
        };
        if let Err(e) = done {
            tracing::warn!(component = %self.component, topic = %self.topic, error = %e, "pulsar: ack/nack failed; the broker hands the message out again");
        }
    }

    /// Subscribes again after a pause, until it works or the subscription stops.
    async fn resubscribe(&mut self) -> Option<Consumer> {
        loop {
            if self.stop.sleep(Duration::from_secs(1)).await {
                return None;
            }
            match consumer(&self.client, &self.md, &self.target).await {
                Ok(c) => return Some(c),
                Err(e) => {
                    tracing::warn!(component = %self.component, topic = %self.topic, error = %e, "pulsar: subscribing again failed");
                }
            }
        }
    }

    fn deliver(
        &self,
        m: pulsar::consumer::Message<Vec<u8>>,
        slot: OwnedSemaphorePermit,
        settle: &mpsc::UnboundedSender<Settle>,
        nacked: &Nacked,
    ) {
        let id = m.message_id.id.clone();
        let redelivered = nacked.ids.contains(&key(&id));
        // A pattern subscription tells the topic each message came from, by its short name.
        let topic = if self.target.pattern.is_some() {
            m.topic.rsplit('/').next().unwrap_or(&m.topic).to_string()
        } else {
            self.topic.clone()
        };
        let metadata: BTreeMap<String, String> = m
            .payload
            .metadata
            .properties
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect();
        let message = Message {
            topic,
            data: bytes::Bytes::from(m.payload.data),
            metadata,
            content_type: None,
            redelivered,
        };
        let handler = self.handler.clone();
        let mut stop = self.stop.clone();
        let delay = self.md.redelivery_delay;
        let settle = settle.clone();
        let full_topic = m.topic;
        tokio::spawn(async move {
            let _slot = slot;
            // No delivery starts after the stop: the message goes back.
            let ack = if stop.is_set() {
                false
            } else {
                match handler(message).await {
                    Outcome::Success | Outcome::Drop => true,
                    Outcome::Retry => {
                        // handed out again after redeliveryDelay (at once when stopping)
                        stop.sleep(delay).await;
                        false
                    }
                }
            };
            let _ = settle.send(Settle {
                topic: full_topic,
                id,
                ack,
            });
        });
    }
}
