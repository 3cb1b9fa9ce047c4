//! The streaming-pull loop of one `pubsub.gcp.pubsub` subscription: takes what the server
//! hands out, delivers each message once at a time (a copy of a message in the app's hands is
//! dropped), extends its deadline while the app works, and acks or nacks by the outcome. A
//! broken stream is reopened after `connectionRecoveryInSec`, up to `maxReconnectionAttempts`
//! failures in a row.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use daprd_core::pubsub::{DrainGuard, Handler, Message, Outcome};
use gcloud_googleapis::pubsub::v1 as api;
use gcloud_googleapis::pubsub::v1::subscriber_client::SubscriberClient;
use tokio::sync::{mpsc, oneshot};

use super::metadata::GcpMetadata;
use crate::stop::Stop;

/// One subscription's pull loop.
pub(super) struct PullLoop {
    pub(super) client: SubscriberClient<super::Grpc>,
    pub(super) subscription: String,
    pub(super) stop: Stop,
    pub(super) component: String,
    pub(super) topic: String,
    pub(super) md: Arc<GcpMetadata>,
    pub(super) handler: Handler,
    /// Held by the loop and by each delivery until its ack or nack is sent.
    pub(super) guard: DrainGuard,
}

/// The message ids a subscription has in the app's hands, and the last [`SEEN_NACKED`] it
/// nacked (a later copy of one of those is marked redelivered: the server counts delivery
/// attempts only for subscriptions with a dead-letter policy).
#[derive(Default)]
struct Seen {
    in_hand: HashSet<String>,
    nacked: HashSet<String>,
    nacked_order: VecDeque<String>,
}

const SEEN_NACKED: usize = 10_000;

/// How long a stop waits for the server to end the stream after the request side closed.
const RELEASE_WAIT: Duration = Duration::from_secs(1);

impl Seen {
    /// Takes `id` into the app's hands: `None` when it already is, else whether it was
    /// nacked before.
    fn take(&mut self, id: &str) -> Option<bool> {
        if !self.in_hand.insert(id.to_string()) {
            return None;
        }
        Some(self.nacked.contains(id))
    }

    fn done(&mut self, id: &str, nacked: bool) {
        self.in_hand.remove(id);
        if nacked && self.nacked.insert(id.to_string()) {
            self.nacked_order.push_back(id.to_string());
            if self.nacked_order.len() > SEEN_NACKED {
                if let Some(old) = self.nacked_order.pop_front() {
                    self.nacked.remove(&old);
                }
            }
        }
    }
}

/// The deliveries of each ordering key, chained: each waits for the one before it.
#[derive(Default)]
struct KeyOrder {
    last: HashMap<String, oneshot::Receiver<()>>,
}

impl KeyOrder {
    /// For the next message of `key`: what to wait for (the previous delivery of the key,
    /// ended when its sender drops), and the sender whose drop ends this one.
    fn next(&mut self, key: &str) -> (Option<oneshot::Receiver<()>>, oneshot::Sender<()>) {
        if self.last.len() >= 1024 {
            // forget the keys whose last delivery is over
            self.last
                .retain(|_, rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        }
        let (done, rx) = oneshot::channel();
        (self.last.insert(key.to_string(), rx), done)
    }
}

/// How a stream ended.
enum Ended {
    Stopped,
    /// The server closed it or it broke; `received` tells whether it worked for a while.
    Broken {
        error: Option<tonic::Status>,
        received: bool,
    },
}

impl PullLoop {
    pub(super) async fn run(mut self) {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let mut order = KeyOrder::default();
        let mut failures = 0u32;
        loop {
            match self.pull_once(&seen, &mut order).await {
                Ended::Stopped => return,
                Ended::Broken { error, received } => {
                    if received {
                        failures = 0;
                    }
                    failures += 1;
                    if failures > self.md.max_reconnection_attempts {
                        tracing::error!(component = %self.component, topic = %self.topic, error = ?error, attempts = failures - 1, "gcp pubsub: the subscription gave up after maxReconnectionAttempts failed pulls");
                        return;
                    }
                    tracing::warn!(component = %self.component, topic = %self.topic, error = ?error, "gcp pubsub: the streaming pull ended; reopening it");
                    if self.stop.sleep(self.md.connection_recovery).await {
                        return;
                    }
                }
            }
        }
    }

    /// One streaming pull, until it ends or the subscription stops.
    async fn pull_once(&mut self, seen: &Arc<Mutex<Seen>>, order: &mut KeyOrder) -> Ended {
        let (requests, rx) = mpsc::channel::<api::StreamingPullRequest>(4);
        let first = api::StreamingPullRequest {
            subscription: self.subscription.clone(),
            stream_ack_deadline_seconds: deadline_secs(self.md.ack_deadline),
            client_id: uuid::Uuid::new_v4().to_string(),
            max_outstanding_messages: self.md.max_outstanding_messages,
            max_outstanding_bytes: self.md.max_outstanding_bytes,
            ..Default::default()
        };
        if requests.send(first).await.is_err() {
            return Ended::Stopped;
        }
        let outbound =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let opened = self.stop.or(self.client.streaming_pull(outbound)).await;
        let mut stream = match opened {
            None => return Ended::Stopped,
            Some(Ok(r)) => r.into_inner(),
            Some(Err(st)) => {
                return Ended::Broken {
                    error: Some(st),
                    received: false,
                }
            }
        };
        let mut received = false;
        loop {
            // A stop wins over a message that is ready: no delivery starts after it.
            let next = match self.stop.or(stream.message()).await {
                None => {
                    drop(requests);
                    self.release(&mut stream, seen).await;
                    return Ended::Stopped;
                }
                Some(n) => n,
            };
            let response = match next {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return Ended::Broken {
                        error: None,
                        received,
                    }
                }
                Err(st) => {
                    return Ended::Broken {
                        error: Some(st),
                        received,
                    }
                }
            };
            received = true;
            for m in response.received_messages {
                self.deliver(m, seen, order);
            }
        }
    }

    /// After a stop: the stream is ended the orderly way — the request side closed, the
    /// server's end awaited (at most [`RELEASE_WAIT`]) — and every message read meanwhile is
    /// nacked, so the next subscriber gets it at once. A stream merely dropped (cancelled)
    /// leaves messages it had been handed leased to nobody until their deadline; and Google's
    /// emulator never ends a stream cancelled without the half-close: it goes on handing the
    /// subscription's messages to it every 50 ms, so about half of them (and of each round of
    /// redeliveries) vanish for another deadline (in the conformance suite's graceful stop, 3
    /// of 60 did not reach the next subscriber within 35 s, about one run in five).
    async fn release(
        &self,
        stream: &mut tonic::Streaming<api::StreamingPullResponse>,
        seen: &Arc<Mutex<Seen>>,
    ) {
        let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
        let mut ack_ids = Vec::new();
        while let Ok(Ok(Some(response))) = tokio::time::timeout_at(deadline, stream.message()).await
        {
            let seen = lock(seen);
            for m in response.received_messages {
                let in_hand = m
                    .message
                    .as_ref()
                    .is_some_and(|msg| seen.in_hand.contains(&msg.message_id));
                if !in_hand {
                    ack_ids.push(m.ack_id);
                }
            }
        }
        if ack_ids.is_empty() {
            return;
        }
        let result = self
            .client
            .clone()
            .modify_ack_deadline(api::ModifyAckDeadlineRequest {
                subscription: self.subscription.clone(),
                ack_ids,
                ack_deadline_seconds: 0,
            })
            .await;
        if let Err(st) = result {
            tracing::warn!(component = %self.component, topic = %self.topic, error = %st, "gcp pubsub: could not hand back the messages read after the stop; the server redelivers them after the deadline");
        }
    }

    fn deliver(
        &self,
        received: api::ReceivedMessage,
        seen: &Arc<Mutex<Seen>>,
        order: &mut KeyOrder,
    ) {
        let Some(message) = received.message else {
            return;
        };
        // The server hands a message out again when its deadline passes, even while the app
        // still works on the first copy: that copy is dropped (the first one's ack settles it).
        let Some(nacked_before) = lock(seen).take(&message.message_id) else {
            return;
        };
        let client = self.client.clone();
        let subscription = self.subscription.clone();
        let handler = self.handler.clone();
        let topic = self.topic.clone();
        let component = self.component.clone();
        let deadline = self.md.ack_deadline;
        let seen = seen.clone();
        let settling = self.guard.clone();
        // With ordering, a message waits for the one before it of the same key.
        let (previous, done) =
            if self.md.enable_message_ordering && !message.ordering_key.is_empty() {
                let (previous, done) = order.next(&message.ordering_key);
                (previous, Some(done))
            } else {
                (None, None)
            };
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let _settling = settling;
            let _done = done;
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            let ack_id = received.ack_id;
            // No delivery starts after the stop: the message goes back at once.
            if stop.is_set() {
                let _ = modify(&client, &subscription, &ack_id, 0).await;
                lock(&seen).done(&message.message_id, true);
                return;
            }
            let m = Message {
                topic: topic.clone(),
                data: message.data,
                metadata: std::collections::BTreeMap::new(),
                content_type: None,
                redelivered: nacked_before || received.delivery_attempt > 1,
            };
            let work = handler(m);
            tokio::pin!(work);
            let period = (deadline / 2).max(Duration::from_millis(100));
            let outcome = loop {
                tokio::select! {
                    o = &mut work => break o,
                    () = tokio::time::sleep(period) => {
                        let _ = modify(&client, &subscription, &ack_id, deadline_secs(deadline)).await;
                    }
                }
            };
            let settled = match outcome {
                Outcome::Success | Outcome::Drop => client
                    .clone()
                    .acknowledge(api::AcknowledgeRequest {
                        subscription: subscription.clone(),
                        ack_ids: vec![ack_id],
                    })
                    .await
                    .map(|_| ()),
                // a nack: the deadline ends now, the server redelivers
                Outcome::Retry => modify(&client, &subscription, &ack_id, 0).await,
            };
            lock(&seen).done(
                &message.message_id,
                outcome == Outcome::Retry || settled.is_err(),
            );
            if let Err(st) = settled {
                tracing::warn!(%component, %topic, error = %st, "gcp pubsub: ack/nack failed; the server redelivers after the deadline");
            }
        });
    }
}

fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn deadline_secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(600)
}

async fn modify(
    client: &SubscriberClient<super::Grpc>,
    subscription: &str,
    ack_id: &str,
    seconds: i32,
) -> Result<(), tonic::Status> {
    client
        .clone()
        .modify_ack_deadline(api::ModifyAckDeadlineRequest {
            subscription: subscription.to_string(),
            ack_ids: vec![ack_id.to_string()],
            ack_deadline_seconds: seconds,
        })
        .await
        .map(|_| ())
}
