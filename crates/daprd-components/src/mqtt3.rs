//! `pubsub.mqtt3` (alias `pubsub.mqtt`): MQTT 3.1.1, as Dapr's component uses it.
//!
//! * Topic = MQTT topic; `qos` (1) and `retain` (false, also per-publish metadata `retain`).
//! * Client id = `consumerID` (so replicas need `{uuid}`/`{podName}`, or MQTT shared
//!   subscriptions `$share/<group>/<topic>` to balance load). Wildcards `+`/`#` work
//!   (feature `SUBSCRIBE_WILDCARDS`).
//! * A message is acknowledged (PUBACK) only after `Success`/`Drop`; an unacknowledged one is
//!   redelivered by the broker per MQTT session rules (on reconnect, `cleanSession` false).
//!   Inbound metadata `retained`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use daprd_core::metadata::{Metadata, MetadataError, MetadataReader};
use daprd_core::pubsub::{
    ErrorKind, Feature, Handler, Message, Outcome, PubSub, PubSubError, PubSubFactory,
    PublishRequest, SubscribeRequest, Subscription,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, watch};

/// Parsed `pubsub.mqtt3` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttMetadata {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// User from the URL.
    pub username: Option<String>,
    /// Password from the URL.
    pub password: Option<String>,
    /// `consumerID`: the MQTT client id.
    pub client_id: String,
    /// `qos` (1).
    pub qos: u8,
    /// `retain` (false).
    pub retain: bool,
    /// `cleanSession` (false).
    pub clean_session: bool,
    /// `ssl://` (also `tls://`, `mqtts://`, `tcps://`, as Go's component maps them).
    pub tls: bool,
    /// `caCert` / `clientCert` / `clientKey` (PEM text).
    pub tls_material: crate::tls::PemMaterial,
}

impl MqttMetadata {
    /// Parses and checks `md`.
    ///
    /// # Errors
    /// Every bad key.
    pub fn parse(md: &Metadata) -> Result<Self, Vec<MetadataError>> {
        let mut r = MetadataReader::new(md);
        let url = md.get_non_empty("url").unwrap_or("");
        let (mut host, mut port, mut username, mut password) = (String::new(), 1883u16, None, None);
        let mut tls = false;
        if url.is_empty() {
            r.fail("url", "is required (tcp://host:1883)");
        } else {
            let (scheme, rest) = url.split_once("://").unwrap_or(("tcp", url));
            match scheme {
                "tcp" | "mqtt" => {}
                "ssl" | "tls" | "mqtts" | "tcps" => {
                    tls = true;
                    port = 8883;
                }
                "ws" | "wss" => r.fail(
                    "url",
                    format!("{scheme}:// (MQTT over WebSocket) is not supported yet by daprd-rs"),
                ),
                other => r.fail("url", format!("unknown scheme {other:?}")),
            }
            let rest = rest.trim_end_matches('/');
            let (auth, hostport) = match rest.rsplit_once('@') {
                Some((a, h)) => (Some(a), h),
                None => (None, rest),
            };
            if let Some(a) = auth {
                let (u, p) = a.split_once(':').unwrap_or((a, ""));
                username = Some(u.to_string());
                password = (!p.is_empty()).then(|| p.to_string());
            }
            match hostport.rsplit_once(':') {
                Some((h, p)) => match p.parse() {
                    Ok(p) => {
                        host = h.to_string();
                        port = p;
                    }
                    Err(_) => r.fail("url", format!("{p:?} is not a port")),
                },
                None => host = hostport.to_string(),
            }
        }
        let qos = u8::try_from(r.int("qos", 1, 0..=2)).unwrap_or(1);
        let retain = r.bool("retain", false);
        let clean_session = r.bool("cleanSession", false);
        let tls_material =
            crate::tls::PemMaterial::read(&mut r, (Some("caCert"), "clientCert", "clientKey"));
        let client_id = r.required("consumerID", " (daprd sets it to the app id)");
        r.finish(|| Self {
            host,
            port,
            username,
            password,
            client_id,
            qos,
            retain,
            clean_session,
            tls,
            tls_material,
        })
    }

    fn qos(&self) -> QoS {
        match self.qos {
            0 => QoS::AtMostOnce,
            2 => QoS::ExactlyOnce,
            _ => QoS::AtLeastOnce,
        }
    }
}

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
        let mut opts = MqttOptions::new(md.client_id.clone(), md.host.clone(), md.port);
        opts.set_clean_session(md.clean_session)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(30));
        if let Some(u) = &md.username {
            opts.set_credentials(u.clone(), md.password.clone().unwrap_or_default());
        }
        if md.tls {
            let config =
                md.tls_material
                    .client_config(false)
                    .map_err(|e| PubSubError::Connect {
                        message: format!("mqtt tls: {e}"),
                        source: None,
                    })?;
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let routes: Routes = Arc::default();
        let confirms: SharedConfirms = Arc::default();
        let loop_confirms = confirms.clone();
        let (connected_tx, mut connected_rx) = watch::channel(false);
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let (disconnected_tx, disconnected_rx) = watch::channel(false);
        let loop_routes = routes.clone();
        let loop_client = client.clone();
        let component = name.to_string();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    e = eventloop.poll() => e,
                    _ = stop_rx.wait_for(|s| *s) => return,
                };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = connected_tx.send(true);
                        // (Re)subscribe every filter on a new session.
                        let filters: Vec<(String, u8)> = loop_routes
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
                            let _ = loop_client.subscribe(f, qos).await;
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                        let mut c = loop_confirms.lock().unwrap_or_else(PoisonError::into_inner);
                        if let Some(tx) = c.queued.pop_front() {
                            if pkid == 0 {
                                let _ = tx.send(Ok(()));
                            } else {
                                c.by_pkid.insert(pkid, tx);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(tx) = loop_confirms
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .by_pkid
                            .remove(&ack.pkid)
                        {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::PubComp(comp))) => {
                        if let Some(tx) = loop_confirms
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .by_pkid
                            .remove(&comp.pkid)
                        {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        // A message no subscription of this process wants (yet) is parked,
                        // not acknowledged: a persistent session replays its messages right
                        // after CONNACK, before the runtime subscribes, and messages keep
                        // coming between a subscription's stop and the component's close.
                        let expired = {
                            let mut inbound =
                                loop_routes.lock().unwrap_or_else(PoisonError::into_inner);
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
                            tracing::warn!(%component, topic = %p.topic, "mqtt message matched no subscription for {PARK_TTL:?}; acknowledged without delivery");
                            let _ = loop_client.ack(&p).await;
                        }
                    }
                    // Requests go out in order: once DISCONNECT is written, every PUBACK
                    // queued before it is too.
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                        let _ = disconnected_tx.send(true);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = connected_tx.send(false);
                        // Unconfirmed publishes are reported as failed (never a false success).
                        loop_confirms
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .fail_all(&format!("connection lost: {e}"));
                        tracing::warn!(%component, error = %e, "mqtt connection lost; reconnecting");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
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
            send_order: tokio::sync::Mutex::new(()),
            connected: connected_rx,
            disconnected: disconnected_rx,
            stop: stop_tx,
        }))
    }
}

/// `$share/<group>/<filter>` → `<filter>` (the broker delivers with the real topic).
fn strip_share(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/').map(|(_, f)| f))
        .unwrap_or(filter)
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

struct Route {
    id: u64,
    filter: String,
    qos: u8,
    queue: mpsc::UnboundedSender<rumqttc::Publish>,
}

/// How long a message that matches no subscription waits for one before it is acknowledged
/// without delivery (so an abandoned filter of a persistent session cannot hold the broker's
/// in-flight window forever).
const PARK_TTL: Duration = Duration::from_secs(60);
/// Most messages parked at once; beyond that the oldest is forgotten unacknowledged (the
/// broker sends it again on the next session).
const PARK_MAX: usize = 10_000;

/// Where incoming messages go: the subscriptions' queues, and the messages that matched none.
#[derive(Default)]
struct Inbound {
    routes: Vec<Route>,
    parked: std::collections::VecDeque<(std::time::Instant, rumqttc::Publish)>,
}

impl Inbound {
    fn park(&mut self, p: rumqttc::Publish) {
        if self.parked.len() >= PARK_MAX {
            self.parked.pop_front();
        }
        self.parked.push_back((std::time::Instant::now(), p));
    }

    /// Takes the parked messages older than [`PARK_TTL`].
    fn expired(&mut self, now: std::time::Instant) -> Vec<rumqttc::Publish> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.parked.front() {
            if now.duration_since(*at) < PARK_TTL {
                break;
            }
            if let Some((_, p)) = self.parked.pop_front() {
                out.push(p);
            }
        }
        out
    }

    /// Adds `route` and hands it the parked messages it matches.
    fn add(&mut self, route: Route) {
        let filter = strip_share(&route.filter).to_string();
        let parked = std::mem::take(&mut self.parked);
        for (at, p) in parked {
            if rumqttc::matches(&p.topic, &filter) {
                let _ = route.queue.send(p);
            } else {
                self.parked.push_back((at, p));
            }
        }
        self.routes.push(route);
    }
}

type Routes = Arc<Mutex<Inbound>>;

/// A live `pubsub.mqtt3` component.
pub struct MqttPubSub {
    md: Arc<MqttMetadata>,
    client: AsyncClient,
    routes: Routes,
    confirms: SharedConfirms,
    send_order: tokio::sync::Mutex<()>,
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
            return Err(PubSubError::closed_component());
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
            self.client
                .publish(
                    request.topic.clone(),
                    self.md.qos(),
                    retain,
                    request.data.to_vec(),
                )
                .await
                .map_err(|e| PubSubError::Broker {
                    message: format!("mqtt: publishing: {e}"),
                    kind: ErrorKind::Transient,
                    source: Some(Box::new(e)),
                })?;
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
            .map_err(|e| PubSubError::Broker {
                message: format!("mqtt: subscribing: {e}"),
                kind: ErrorKind::Transient,
                source: Some(Box::new(e)),
            })?;
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
                let msg = Message {
                    topic: p.topic.clone(),
                    data: Bytes::from(p.payload.to_vec()),
                    metadata,
                    content_type: None,
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

/// A process-unique id for a subscription's route.
fn next_route_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> Metadata {
        Metadata::from_pairs(pairs)
    }

    #[test]
    fn parses_url_and_defaults() {
        let m = MqttMetadata::parse(&md(&[
            ("url", "tcp://user:pw@localhost:1884"),
            ("consumerID", "app"),
        ]))
        .unwrap();
        assert_eq!((m.host.as_str(), m.port), ("localhost", 1884));
        assert_eq!(m.username.as_deref(), Some("user"));
        assert_eq!(m.qos, 1);
        assert!(!m.retain && !m.clean_session);
        let tls = MqttMetadata::parse(&md(&[("url", "mqtts://h"), ("consumerID", "app")])).unwrap();
        assert!(tls.tls && !m.tls);
        assert_eq!(tls.port, 8883, "the TLS default port");
        let errs = MqttMetadata::parse(&md(&[
            ("url", "wss://h:8883"),
            ("qos", "3"),
            ("caCert", "x"),
        ]))
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in ["url", "qos", "caCert", "consumerID"] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }

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
