//! `pubsub.mqtt3` (alias `pubsub.mqtt`): MQTT 3.1.1, as Dapr's component uses it.
//!
//! * Topic = MQTT topic; `qos` (1) and `retain` (false, also per-publish metadata `retain`).
//! * Client id = `consumerID` (so replicas need `{uuid}`/`{podName}`, or MQTT shared
//!   subscriptions `$share/<group>/<topic>` to balance load). Wildcards `+`/`#` work
//!   (feature `SUBSCRIBE_WILDCARDS`).
//! * A message is acknowledged (PUBACK) only after `Success`/`Drop`; an unacknowledged one is
//!   redelivered by the broker per MQTT session rules (on reconnect, `cleanSession` false).
//!   Inbound metadata `retained`.

mod metadata;
mod subscriber;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    ErrorKind, Feature, Handler, Message, Outcome, PubSub, PubSubError, PubSubFactory,
    PublishRequest, SubscribeRequest, Subscription,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};

pub use metadata::MqttMetadata;
use subscriber::{next_route_id, strip_share, Route, Routes, PARK_TTL};

/// Builds `pubsub.mqtt3` components.
pub struct MqttFactory;

#[async_trait]
impl PubSubFactory for MqttFactory {
    fn component_type(&self) -> &'static str {
        "pubsub.mqtt3"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["pubsub.mqtt"]
    }

    fn validate(&self, metadata: &Metadata) -> Vec<MetadataError> {
        MqttMetadata::parse(metadata).err().unwrap_or_default()
    }

    async fn connect(
        &self,
        name: &str,
        metadata: &Metadata,
    ) -> Result<Arc<dyn PubSub>, PubSubError> {
        let md = MqttMetadata::parse(metadata)?;
        let (client, eventloop) = AsyncClient::new(options(&md)?, 1024);
        let routes: Routes = Arc::default();
        let confirms: SharedConfirms = Arc::default();
        let send_order = Arc::new(tokio::sync::Mutex::new(()));
        let (connected_tx, mut connected_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (disconnected_tx, disconnected_rx) = watch::channel(false);
        tokio::spawn(
            EventLoop {
                component: name.to_string(),
                eventloop,
                client: client.clone(),
                routes: routes.clone(),
                confirms: confirms.clone(),
                send_order: send_order.clone(),
                connected: connected_tx,
                disconnected: disconnected_tx,
                reconnect: daprd_core::backoff::RECONNECT,
            }
            .run(stop_rx),
        );
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(10), connected_rx.wait_for(|c| *c)).await,
            Ok(Ok(_))
        );
        if !ok {
            let _ = stop_tx.send(true);
            return Err(PubSubError::Connect {
                message: format!("connecting to mqtt broker {}:{}", md.host, md.port),
                source: None,
            });
        }
        Ok(Arc::new(MqttPubSub {
            md: Arc::new(md),
            client,
            routes,
            confirms,
            send_order,
            connected: connected_rx,
            disconnected: disconnected_rx,
            stop: stop_tx,
        }))
    }
}

/// The client options: client id, broker, session, credentials, TLS.
fn options(md: &MqttMetadata) -> Result<MqttOptions, PubSubError> {
    let mut opts = MqttOptions::new(md.client_id.clone(), md.host.clone(), md.port);
    opts.set_clean_session(md.clean_session)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30));
    if let Some(u) = &md.username {
        opts.set_credentials(u.clone(), md.password.clone().unwrap_or_default());
    }
    if md.tls {
        let config = md
            .tls_material
            .client_config(false)
            .map_err(|e| PubSubError::Connect {
                message: format!("mqtt tls: {e}"),
                source: Some(Box::new(e)),
            })?;
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
        ));
    }
    Ok(opts)
}

/// The connection's event loop: drives the client library, (re)subscribes on every new
/// session, matches acknowledgements to waiting publishes, hands messages to the
/// subscriptions, and reconnects with backoff.
struct EventLoop {
    component: String,
    eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    routes: Routes,
    confirms: SharedConfirms,
    /// The publishers' order lock (see [`MqttPubSub::publish`]).
    send_order: Arc<tokio::sync::Mutex<()>>,
    connected: watch::Sender<bool>,
    /// Set once DISCONNECT is written: requests go out in order, so every PUBACK queued
    /// before it is too.
    disconnected: watch::Sender<bool>,
    reconnect: daprd_core::backoff::Backoff,
}

impl EventLoop {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            let event = tokio::select! {
                e = self.eventloop.poll() => e,
                _ = stop.wait_for(|s| *s) => return,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => self.connected().await,
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => self.sent(pkid),
                Ok(Event::Incoming(Packet::PubAck(ack))) => self.confirmed(ack.pkid),
                Ok(Event::Incoming(Packet::PubComp(comp))) => self.confirmed(comp.pkid),
                Ok(Event::Incoming(Packet::Publish(p))) => self.received(p).await,
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                    let _ = self.disconnected.send(true);
                }
                Ok(_) => {}
                Err(e) => self.lost(e).await,
            }
        }
    }

    /// A new session: subscribe every filter again.
    async fn connected(&mut self) {
        self.reconnect.reset();
        let _ = self.connected.send(true);
        let filters: Vec<(String, u8)> = self
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .routes
            .iter()
            .map(|r| (r.filter.clone(), r.qos))
            .collect();
        for (f, q) in filters {
            let qos = match q {
                0 => QoS::AtMostOnce,
                2 => QoS::ExactlyOnce,
                _ => QoS::AtLeastOnce,
            };
            let _ = self.client.subscribe(f, qos).await;
        }
    }

    /// A PUBLISH went out: the oldest waiter is its (QoS 0 is done once written).
    fn sent(&self, pkid: u16) {
        let mut c = self.confirms.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = c.queued.pop_front() {
            if pkid == 0 {
                let _ = tx.send(Ok(()));
            } else {
                c.by_pkid.insert(pkid, tx);
            }
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2).
    fn confirmed(&self, pkid: u16) {
        let waiter = self
            .confirms
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_pkid
            .remove(&pkid);
        if let Some(tx) = waiter {
            let _ = tx.send(Ok(()));
        }
    }

    /// A message for the subscriptions. One that no subscription of this process wants (yet)
    /// is parked, not acknowledged: a persistent session replays its messages right after
    /// CONNACK, before the runtime subscribes, and messages keep coming between a
    /// subscription's stop and the component's close.
    async fn received(&mut self, p: rumqttc::Publish) {
        let expired = {
            let mut inbound = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
            let targets: Vec<mpsc::UnboundedSender<rumqttc::Publish>> = inbound
                .routes
                .iter()
                .filter(|r| rumqttc::matches(&p.topic, strip_share(&r.filter)))
                .map(|r| r.queue.clone())
                .collect();
            for t in &targets {
                let _ = t.send(p.clone());
            }
            if targets.is_empty() {
                inbound.park(p);
            }
            inbound.expired(std::time::Instant::now())
        };
        for p in expired {
            tracing::warn!(component = %self.component, topic = %p.topic, "mqtt message matched no subscription for {PARK_TTL:?}; acknowledged without delivery");
            let _ = self.client.ack(&p).await;
        }
    }

    /// The connection dropped. Unconfirmed publishes are reported as failed (never a false
    /// success), and their requests are dropped: the client library would send them again
    /// on the next connection, where a resent one would answer for a newer request's waiter.
    /// Under the publishers' order lock, so no publish is between its waiter and its request;
    /// `clean` also takes what was queued since the library's own clean-up on the error.
    async fn lost(&mut self, e: rumqttc::ConnectionError) {
        let _ = self.connected.send(false);
        {
            let _order = self.send_order.lock().await;
            self.eventloop.clean();
            self.eventloop
                .pending
                .retain(|r| !matches!(r, rumqttc::Request::Publish(_)));
            self.confirms
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .fail_all(&format!("connection lost: {e}"));
        }
        tracing::warn!(component = %self.component, error = %e, "mqtt connection lost; reconnecting");
        tokio::time::sleep(self.reconnect.next_pause()).await;
    }
}

/// Publishes waiting for the broker's acknowledgement (PUBACK, or PUBCOMP for QoS 2): the
/// event loop sends requests in order, so the n-th outgoing PUBLISH is the n-th waiter.
#[derive(Default)]
struct Confirms {
    queued: std::collections::VecDeque<tokio::sync::oneshot::Sender<Result<(), String>>>,
    by_pkid: std::collections::HashMap<u16, tokio::sync::oneshot::Sender<Result<(), String>>>,
}

impl Confirms {
    fn fail_all(&mut self, why: &str) {
        for tx in self
            .queued
            .drain(..)
            .chain(self.by_pkid.drain().map(|(_, v)| v))
        {
            let _ = tx.send(Err(why.to_string()));
        }
    }
}

type SharedConfirms = Arc<Mutex<Confirms>>;

/// A live `pubsub.mqtt3` component.
pub struct MqttPubSub {
    md: Arc<MqttMetadata>,
    client: AsyncClient,
    routes: Routes,
    confirms: SharedConfirms,
    send_order: Arc<tokio::sync::Mutex<()>>,
    connected: watch::Receiver<bool>,
    /// Turns true once the event loop has written DISCONNECT (and so every ack before it).
    disconnected: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
}

const FEATURES: &[Feature] = &[Feature::SubscribeWildcards];

#[async_trait]
impl PubSub for MqttPubSub {
    fn features(&self) -> &[Feature] {
        FEATURES
    }

    async fn publish(&self, request: PublishRequest) -> Result<(), PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
        }
        if !*self.connected.borrow() {
            return Err(PubSubError::broker(
                ErrorKind::Transient,
                "mqtt: not connected to the broker",
            ));
        }
        let retain = request
            .metadata
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("retain"))
            .and_then(|(_, v)| daprd_core::metadata::parse_loose_bool(v))
            .unwrap_or(self.md.retain);
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            // Queue the waiter and the request in the same order.
            let _order = self.send_order.lock().await;
            self.confirms
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .queued
                .push_back(tx);
            // Never waits while holding the order lock (the event loop takes it when the
            // connection drops): a full request queue is an error, not a wait.
            let sent = self.client.try_publish(
                request.topic.clone(),
                self.md.qos(),
                retain,
                request.data.to_vec(),
            );
            if let Err(e) = sent {
                self.confirms
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .queued
                    .pop_back();
                return Err(PubSubError::transient("mqtt", "publishing", e));
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(why))) => Err(PubSubError::broker(
                ErrorKind::Transient,
                format!("mqtt: publish not confirmed: {why}"),
            )),
            Ok(Err(_)) | Err(_) => Err(PubSubError::broker(
                ErrorKind::Transient,
                "mqtt: publish not confirmed by the broker",
            )),
        }
    }

    async fn subscribe(
        &self,
        request: SubscribeRequest,
        handler: Handler,
    ) -> Result<Subscription, PubSubError> {
        let (tx, mut rx) = mpsc::unbounded_channel::<rumqttc::Publish>();
        let id = next_route_id();
        self.client
            .subscribe(request.topic.clone(), self.md.qos())
            .await
            .map_err(|e| PubSubError::transient("mqtt", "subscribing", e))?;
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(Route {
                id,
                filter: request.topic.clone(),
                qos: self.md.qos,
                queue: tx,
            });
        let client = self.client.clone();
        let filter = request.topic.clone();
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let (guard, drained) = daprd_core::pubsub::drain_tracker();
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                // A stop wins over a queued message: none is delivered after it. What is
                // queued stays unacknowledged; the broker sends it again on the next session.
                let next = tokio::select! {
                    biased;
                    _ = stop_rx.wait_for(|s| *s) => None,
                    p = rx.recv() => p,
                };
                let Some(p) = next else { return };
                let mut metadata = BTreeMap::new();
                metadata.insert("retained".to_string(), p.retain.to_string());
                let mut msg = Message {
                    topic: p.topic.clone(),
                    data: Bytes::from(p.payload.to_vec()),
                    metadata,
                    content_type: None,
                    // the broker's DUP flag: sent before in an earlier session
                    redelivered: p.dup,
                };
                // MQTT 3 has no negative acknowledgement (the broker sends an unacknowledged
                // message again only on the next session), so a message the app did not
                // accept is handed to it again here, in order, with a growing pause (as Go
                // daprd's component retries), until it is accepted or the subscription stops.
                let mut backoff = daprd_core::backoff::RETRY;
                loop {
                    match handler(msg.clone()).await {
                        Outcome::Success | Outcome::Drop => {
                            let _ = client.ack(&p).await;
                            break;
                        }
                        Outcome::Retry => {
                            let pause = backoff.next_pause();
                            tracing::debug!(topic = %filter, retry_in = ?pause, "mqtt message not accepted; retrying");
                            let stopped = tokio::select! {
                                biased;
                                _ = stop_rx.wait_for(|s| *s) => true,
                                _ = tokio::time::sleep(pause) => false,
                            };
                            if stopped {
                                // Left unacknowledged: the next session gets it again.
                                return;
                            }
                            msg.redelivered = true;
                        }
                    }
                }
            }
        });
        let routes = self.routes.clone();
        let client = self.client.clone();
        let topic = request.topic.clone();
        let unsubscribe = request
            .metadata
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("unsubscribeOnClose"))
            .and_then(|(_, v)| daprd_core::metadata::parse_loose_bool(v))
            .unwrap_or(self.md.clean_session);
        Ok(Subscription::new(move || {
            let _ = stop_tx.send(true);
            routes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .routes
                .retain(|r| r.id != id);
            if unsubscribe {
                let _ = client.try_unsubscribe(topic);
            }
        })
        .with_drain(drained))
    }

    async fn close(&self) -> Result<(), PubSubError> {
        let _ = self.client.disconnect().await;
        // Let the event loop write the acks queued before the DISCONNECT.
        let mut disconnected = self.disconnected.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), disconnected.wait_for(|d| *d)).await;
        let _ = self.stop.send(true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_subscription_filters() {
        assert_eq!(strip_share("$share/g/orders/+"), "orders/+");
        assert_eq!(strip_share("orders/#"), "orders/#");
        assert!(rumqttc::matches(
            "orders/1",
            strip_share("$share/g/orders/+")
        ));
    }
}
