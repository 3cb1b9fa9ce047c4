//! Streaming subscriptions (`SubscribeTopicEventsAlpha1`, Dapr's streaming subscription API): each stream owns its
//! own component subscription, independent of the app channel. Events go out as
//! `event_message`s and are settled by the client's `event_processed` answers, matched by
//! CloudEvent id. When the stream ends for any reason the component subscription is
//! dropped at once, so a closed stream never keeps consuming (no phantom consumer).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use daprd_proto::runtime::v1 as pb;
use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::error::ApiError;
use crate::inbound::channel::grpc::{interpret_grpc_status, topic_event_request};
use crate::inbound::channel::{AppChannel, AppReply, ChannelError, Delivery};
use crate::inbound::routing::Rule;
use crate::inbound::subscriber::Subscriptions;
use crate::inbound::subscriptions::{BulkSubscribe, SubscriptionKind, SubscriptionSpec};
use crate::state::RuntimeState;
use crate::store::PubSubEntry;

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<AppReply>>>>;

/// The outgoing half of one stream, seen by the delivery pipeline as an app channel.
struct StreamChannel {
    out: Outgoing,
    pending: Pending,
}

#[async_trait]
impl AppChannel for StreamChannel {
    async fn list_subscriptions(&self) -> Result<Vec<SubscriptionSpec>, ChannelError> {
        Ok(Vec::new())
    }

    /// A stream is healthy while it is open: app health checks do not apply to it.
    async fn health_probe(&self, _path: &str, _timeout: std::time::Duration) -> bool {
        !self.out.is_closed()
    }

    async fn deliver(&self, d: &Delivery) -> AppReply {
        let event = match topic_event_request(d) {
            Ok(e) => e,
            Err(e) => return AppReply::Retry(e, None),
        };
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(event.id.clone(), tx);
        let msg = pb::SubscribeTopicEventsResponseAlpha1 {
            subscribe_topic_events_response_type: Some(
                pb::subscribe_topic_events_response_alpha1::SubscribeTopicEventsResponseType::EventMessage(event),
            ),
        };
        if self.out.send(Ok(msg)).await.is_err() {
            return AppReply::Retry("the streaming subscriber went away".into(), None);
        }
        rx.await.unwrap_or_else(|_| {
            AppReply::Retry(
                "the stream closed before the event was processed".into(),
                None,
            )
        })
    }
}

/// The response stream type.
pub type EventStream =
    Pin<Box<dyn Stream<Item = Result<pb::SubscribeTopicEventsResponseAlpha1, Status>> + Send>>;

fn plain(msg: &str) -> Status {
    Status::unknown(msg)
}

type Req = pb::subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType;
type Outgoing = mpsc::Sender<Result<pb::SubscribeTopicEventsResponseAlpha1, Status>>;

/// Serves one `SubscribeTopicEventsAlpha1` call.
///
/// # Errors
/// The initial request is missing or invalid, the pubsub is unknown, or scoping forbids it.
pub async fn subscribe(
    state: Arc<RuntimeState>,
    subscriptions: Arc<Subscriptions>,
    mut incoming: tonic::Streaming<pb::SubscribeTopicEventsRequestAlpha1>,
) -> Result<EventStream, Status> {
    let (spec, entry) = initial_request(&state, &mut incoming).await?;
    let (out_tx, out_rx) = mpsc::channel(64);
    let pending: Pending = Arc::default();
    let channel: Arc<dyn crate::inbound::channel::AppChannel> = Arc::new(StreamChannel {
        out: out_tx.clone(),
        pending: pending.clone(),
    });
    let (handle, slot) = crate::inbound::subscriber::subscribe_on(
        &state,
        &subscriptions.in_flight,
        &spec,
        &entry,
        channel.clone(),
    )
    .await
    .map_err(|e| {
        plain(&format!(
            "failed to create subscription for topic {} on pubsub {}: {e}",
            spec.topic, spec.pubsub
        ))
    })?;
    let id = subscriptions.add(spec.clone(), handle, channel, slot);
    tracing::info!(pubsub = %spec.pubsub, topic = %spec.topic, "streaming subscription opened");

    let initial = pb::SubscribeTopicEventsResponseAlpha1 {
        subscribe_topic_events_response_type: Some(
            pb::subscribe_topic_events_response_alpha1::SubscribeTopicEventsResponseType::InitialResponse(
                pb::SubscribeTopicEventsResponseInitialAlpha1 {},
            ),
        ),
    };
    // The initial response goes first; the queue has room for it.
    let _ = out_tx.send(Ok(initial)).await;

    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = read_answers(incoming, &pending, &out_tx) => {}
            _ = shutdown.wait() => {}
        }
        subscriptions.remove(id);
        // Unsettled events are left for redelivery, never acked.
        pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        tracing::info!(pubsub = %spec.pubsub, topic = %spec.topic, "streaming subscription closed");
    });

    let stream = tokio_stream::wrappers::ReceiverStream::new(out_rx);
    Ok(Box::pin(stream))
}

/// Reads and checks the stream's first message: the subscription it asks for, and its
/// component.
async fn initial_request(
    state: &RuntimeState,
    incoming: &mut tonic::Streaming<pb::SubscribeTopicEventsRequestAlpha1>,
) -> Result<(SubscriptionSpec, Arc<PubSubEntry>), Status> {
    let first = incoming
        .message()
        .await?
        .ok_or_else(|| plain("initial request is required"))?;
    let Some(Req::InitialRequest(init)) = first.subscribe_topic_events_request_type else {
        return Err(plain("initial request is required"));
    };
    if init.pubsub_name.is_empty() {
        return Err(plain("pubsubName is required"));
    }
    if init.topic.is_empty() {
        return Err(plain("topic is required"));
    }
    let metadata = init.metadata.into_iter().collect();
    let Some(entry) = state.publisher.store().pubsub(&init.pubsub_name) else {
        let e = ApiError::pubsub_not_found(&init.pubsub_name, &metadata);
        e.count_in(&state.metrics);
        return Err(e.to_status());
    };
    if !entry
        .scoping
        .may_subscribe(&state.config.app_id, &init.topic)
    {
        return Err(plain(&format!(
            "failed to create subscription for topic {} on pubsub {}: subscription to topic '{}' on pubsub '{}' is not allowed",
            init.topic, init.pubsub_name, init.topic, init.pubsub_name
        )));
    }
    let spec = SubscriptionSpec {
        name: String::new(),
        pubsub: init.pubsub_name,
        topic: init.topic,
        rules: vec![Rule::new("", "/").map_err(|e| Status::internal(e.to_string()))?],
        metadata,
        dead_letter_topic: init.dead_letter_topic.unwrap_or_default(),
        bulk: BulkSubscribe::default(),
        kind: SubscriptionKind::Streaming,
        scopes: Vec::new(),
    };
    Ok((spec, entry))
}

/// Settles delivered events with the client's answers until the stream ends (or the client
/// breaks the protocol with a second initial request).
async fn read_answers(
    mut incoming: tonic::Streaming<pb::SubscribeTopicEventsRequestAlpha1>,
    pending: &Pending,
    out: &Outgoing,
) {
    while let Ok(Some(msg)) = incoming.message().await {
        match msg.subscribe_topic_events_request_type {
            Some(Req::EventProcessed(done)) => {
                let reply = interpret_grpc_status(done.status.map(|s| s.status).unwrap_or(0));
                let waiter = pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&done.id);
                if let Some(tx) = waiter {
                    let _ = tx.send(reply);
                }
            }
            Some(Req::InitialRequest(_)) => {
                let _ = out
                    .send(Err(plain("duplicate initial request received")))
                    .await;
                return;
            }
            None => {}
        }
    }
}
