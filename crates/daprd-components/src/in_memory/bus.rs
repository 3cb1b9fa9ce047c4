//! The in-memory event bus: topic patterns → per-subscriber queues.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use daprd_core::pubsub::{Handler, Message, Outcome, PubSubError, PublishRequest, Subscription};
use tokio::sync::mpsc;

/// Messages queued per subscriber before publishers wait.
const QUEUE_DEPTH: usize = 1024;

struct Subscriber {
    id: u64,
    pattern: String,
    queue: mpsc::Sender<Message>,
}

struct Inner {
    name: String,
    subscribers: Mutex<Vec<Subscriber>>,
    next_id: AtomicU64,
    closed: AtomicBool,
}

/// A process-local fan-out bus.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

/// Whether subscription topic `pattern` receives messages published to `topic`.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

impl Bus {
    /// An empty bus for component `name`.
    pub fn new(name: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.to_string(),
                subscribers: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(1),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Queues `request` for every subscriber whose pattern matches its topic.
    ///
    /// # Errors
    /// [`PubSubError::Closed`] after [`Bus::close`].
    pub async fn publish(&self, request: PublishRequest) -> Result<(), PubSubError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(PubSubError::Closed);
        }
        let targets: Vec<mpsc::Sender<Message>> = self
            .inner
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|s| topic_matches(&s.pattern, &request.topic))
            .map(|s| s.queue.clone())
            .collect();
        let message = Message {
            topic: request.topic,
            data: request.data,
            metadata: request.metadata,
            content_type: request.content_type,
            // a Retry is not delivered again
            redelivered: false,
        };
        for target in targets {
            // A subscriber that went away in the meantime simply misses the message.
            let _ = target.send(message.clone()).await;
        }
        Ok(())
    }

    /// Registers `handler` for topics matching `pattern`; deliveries to it are serialised.
    ///
    /// # Errors
    /// [`PubSubError::Closed`] after [`Bus::close`].
    pub fn subscribe(
        &self,
        pattern: String,
        handler: Handler,
    ) -> Result<Subscription, PubSubError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(PubSubError::Closed);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Message>(QUEUE_DEPTH);
        // a sender of its own: the bus drops its one when the subscription leaves (quiesce),
        // and the queue must still be measurable then
        let queue = tx.clone();
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let (guard, drained) = daprd_core::pubsub::drain_tracker();
        let component = self.inner.name.clone();
        let topic = pattern.clone();
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                // A stop wins over a queued message: no delivery starts after it. What is
                // still queued is dropped (the in-memory bus keeps nothing, as in Dapr).
                let message = tokio::select! {
                    biased;
                    _ = stop_rx.wait_for(|s| *s) => None,
                    m = rx.recv() => m,
                };
                let Some(message) = message else {
                    if !rx.is_empty() {
                        tracing::debug!(%component, %topic, dropped = rx.len(), "in-memory subscription stopped with messages queued");
                    }
                    return;
                };
                let outcome = handler(message).await;
                if outcome == Outcome::Retry {
                    tracing::debug!(%component, %topic, "in-memory handler asked for a retry; message not redelivered");
                }
            }
        });
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Subscriber {
                id,
                pattern,
                queue: tx,
            });
        let inner = Arc::downgrade(&self.inner);
        let leave = move || {
            if let Some(inner) = inner.upgrade() {
                inner
                    .subscribers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .retain(|s| s.id != id);
            }
        };
        let quiesce = leave.clone();
        Ok(Subscription::new(move || {
            let _ = stop_tx.send(true);
            leave();
        })
        .with_drain(drained)
        // no publish reaches it any more; what is queued is still delivered
        .with_quiesce(quiesce)
        .with_idle(move || queue.capacity() == queue.max_capacity()))
    }

    /// Drops every subscriber and refuses further use.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    fn publish_req(topic: &str, data: &str) -> PublishRequest {
        PublishRequest {
            pubsub_name: "ps".into(),
            topic: topic.into(),
            data: Bytes::from(data.to_string()),
            metadata: Default::default(),
            content_type: None,
        }
    }

    fn collector() -> (Handler, mpsc::UnboundedReceiver<Message>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handler: Handler = Arc::new(move |m| {
            let tx = tx.clone();
            Box::pin(async move {
                let _ = tx.send(m);
                Outcome::Success
            })
        });
        (handler, rx)
    }

    async fn recv(rx: &mut mpsc::UnboundedReceiver<Message>) -> Option<Message> {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .ok()
            .flatten()
    }

    #[test]
    fn wildcard_matching() {
        assert!(topic_matches("orders", "orders"));
        assert!(!topic_matches("orders", "orders2"));
        assert!(topic_matches("orders*", "orders2"));
        assert!(topic_matches("*", "anything"));
        assert!(!topic_matches("a*", "b"));
    }

    #[tokio::test]
    async fn fans_out_to_every_matching_subscription() {
        let bus = Bus::new("ps");
        let (h1, mut r1) = collector();
        let (h2, mut r2) = collector();
        let (h3, mut r3) = collector();
        let _s1 = bus.subscribe("orders".into(), h1).unwrap();
        let _s2 = bus.subscribe("ord*".into(), h2).unwrap();
        let _s3 = bus.subscribe("other".into(), h3).unwrap();
        bus.publish(publish_req("orders", "hello")).await.unwrap();
        assert_eq!(recv(&mut r1).await.unwrap().data, "hello");
        let m2 = recv(&mut r2).await.unwrap();
        assert_eq!(m2.topic, "orders");
        bus.publish(publish_req("other", "x")).await.unwrap();
        assert_eq!(recv(&mut r3).await.unwrap().data, "x");
        assert!(
            r1.try_recv().is_err(),
            "orders subscriber must not get 'other'"
        );
    }

    #[tokio::test]
    async fn dropping_a_subscription_stops_delivery() {
        let bus = Bus::new("ps");
        let (h1, mut r1) = collector();
        let s1 = bus.subscribe("t".into(), h1).unwrap();
        drop(s1);
        bus.publish(publish_req("t", "x")).await.unwrap();
        assert!(recv(&mut r1).await.is_none());
    }

    #[tokio::test]
    async fn a_quiesced_subscription_delivers_what_it_queued_and_nothing_new() {
        let bus = Bus::new("ps");
        let (release, released) = tokio::sync::watch::channel(false);
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let handler: Handler = Arc::new(move |m: Message| {
            let (mut released, seen_tx) = (released.clone(), seen_tx.clone());
            Box::pin(async move {
                let _ = released.wait_for(|r| *r).await;
                let _ = seen_tx.send(m.data);
                Outcome::Success
            })
        });
        let mut sub = bus.subscribe("t".into(), handler).unwrap();
        assert!(sub.is_idle());
        for d in ["1", "2", "3"] {
            bus.publish(publish_req("t", d)).await.unwrap();
        }
        // one in the handler, two queued
        assert!(!sub.is_idle());
        sub.quiesce();
        bus.publish(publish_req("t", "late")).await.unwrap();
        release.send(true).unwrap();
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(recv_bytes(&mut seen).await);
        }
        assert_eq!(got, ["1", "2", "3"]);
        assert!(sub.is_idle());
        sub.stop().await;
        assert!(
            seen.try_recv().is_err(),
            "nothing published after the quiesce"
        );
    }

    async fn recv_bytes(rx: &mut mpsc::UnboundedReceiver<Bytes>) -> Bytes {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("delivered in time")
            .expect("open")
    }

    #[tokio::test]
    async fn closed_bus_refuses_publish() {
        let bus = Bus::new("ps");
        bus.close();
        assert!(matches!(
            bus.publish(publish_req("t", "x")).await,
            Err(PubSubError::Closed)
        ));
    }
}
