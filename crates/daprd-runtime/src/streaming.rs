//! Streaming subscriptions (`SubscribeTopicEventsAlpha1`, Dapr's streaming subscription API): each stream owns its
//! own component subscription, independent of the app channel. Events go out as
//! `event_message`s and are settled by the client's `event_processed` answers, matched by
//! CloudEvent id. When the stream ends for any reason the component subscription is
//! dropped at once, so a closed stream never keeps consuming (no phantom consumer).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use daprd_core::pubsub::SubscribeRequest;
use daprd_proto::runtime::v1 as pb;
use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::channel::{interpret_grpc_status, topic_event_request, AppChannel, AppReply, Delivery};
use crate::delivery::SubscriptionPipeline;
use crate::error::ApiError;
use crate::routing::Rule;
use crate::runtime::RuntimeState;
use crate::subscriptions::{BulkSubscribe, SubscriptionKind, SubscriptionSpec};

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<AppReply>>>>;

/// The outgoing half of one stream, seen by the delivery pipeline as an app channel.
struct StreamChannel {
    out: mpsc::Sender<Result<pb::SubscribeTopicEventsResponseAlpha1, Status>>,
    pending: Pending,
}

#[async_trait]
impl AppChannel for StreamChannel {
    async fn list_subscriptions(&self) -> Result<Vec<SubscriptionSpec>, String> {
        Ok(Vec::new())
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

/// Serves one `SubscribeTopicEventsAlpha1` call.
///
/// # Errors
/// The initial request is missing or invalid, the pubsub is unknown, or scoping forbids it.
pub async fn subscribe(
    state: Arc<RuntimeState>,
    mut incoming: tonic::Streaming<pb::SubscribeTopicEventsRequestAlpha1>,
) -> Result<EventStream, Status> {
    use pb::subscribe_topic_events_request_alpha1::SubscribeTopicEventsRequestType as Req;
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
    let metadata = init.metadata.clone().into_iter().collect();
    let Some(entry) = state.publisher.store().pubsub(&init.pubsub_name) else {
        return Err(ApiError::pubsub_not_found(&init.pubsub_name, &metadata).to_status());
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
        pubsub: init.pubsub_name.clone(),
        topic: init.topic.clone(),
        rules: vec![Rule::new("", "/").map_err(Status::internal)?],
        metadata,
        dead_letter_topic: init.dead_letter_topic.clone().unwrap_or_default(),
        bulk: BulkSubscribe::default(),
        kind: SubscriptionKind::Streaming,
        scopes: Vec::new(),
    };
    let (out_tx, out_rx) = mpsc::channel(64);
    let pending: Pending = Arc::default();
    let channel = Arc::new(StreamChannel {
        out: out_tx.clone(),
        pending: pending.clone(),
    });
    let pipeline = Arc::new(SubscriptionPipeline::new(
        &state,
        spec.clone(),
        entry.clone(),
        channel,
    ));
    let request = SubscribeRequest {
        topic: entry.broker_topic(&spec.topic),
        metadata: spec.metadata.clone(),
        bulk: None,
    };
    let handle = entry
        .component
        .subscribe(request, pipeline.handler())
        .await
        .map_err(|e| {
            plain(&format!(
                "failed to create subscription for topic {} on pubsub {}: {e}",
                spec.topic, spec.pubsub
            ))
        })?;
    let id = state.subscriptions.add(spec.clone(), handle);
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

    // Reads the client's answers until the stream ends, then tears the subscription down.
    let reader_state = state.clone();
    tokio::spawn(async move {
        let shutdown = reader_state.shutdown.clone();
        loop {
            let next = tokio::select! {
                m = incoming.message() => m,
                _ = shutdown.wait() => break,
            };
            match next {
                Ok(Some(msg)) => match msg.subscribe_topic_events_request_type {
                    Some(Req::EventProcessed(done)) => {
                        let reply =
                            interpret_grpc_status(done.status.map(|s| s.status).unwrap_or(0));
                        if let Some(tx) = pending
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&done.id)
                        {
                            let _ = tx.send(reply);
                        }
                    }
                    Some(Req::InitialRequest(_)) => {
                        let _ = out_tx
                            .send(Err(plain("duplicate initial request received")))
                            .await;
                        break;
                    }
                    None => {}
                },
                Ok(None) | Err(_) => break,
            }
        }
        reader_state.subscriptions.remove(id);
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
