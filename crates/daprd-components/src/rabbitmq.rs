//! `pubsub.rabbitmq`: the same exchanges, queues and messages as Dapr's component.
//!
//! * Topic = exchange (declared with `exchangeKind`, `durable`, auto-delete =
//!   `deletedWhenUnused`); subscription queue = `<consumerID>-<topic>` (or subscription
//!   metadata `queueName`), bound with subscription metadata `routingKey` (comma list).
//! * Publish: `content-type: text/plain`, `deliveryMode`, per-message `expiration` from
//!   `ttlInSeconds` metadata (or the component default; feature `MESSAGE_TTL`), `priority`,
//!   `routingKey`, and `contentType`/`messageID`/`correlationID`/`type` metadata as properties.
//! * Delivery: ack after `Success`/`Drop`; `Retry` → `nack(requeue = requeueInFailure)`.
//! * Connections are re-established after `reconnectWaitSeconds`.

mod metadata;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    ErrorKind, Feature, Handler, Message, Outcome, PubSub, PubSubError, PubSubFactory,
    PublishRequest, SubscribeRequest, Subscription,
};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{watch, Mutex};

pub use metadata::RabbitMetadata;

/// Builds `pubsub.rabbitmq` components.
pub struct RabbitFactory;

async fn open(md: &RabbitMetadata) -> Result<(Connection, Channel), lapin::Error> {
    let mut props = ConnectionProperties::default();
    if let Some(name) = &md.client_name {
        props = props.with_connection_name(name.clone().into());
    }
    let uri = if md.uri.contains('?') || md.heartbeat.is_zero() {
        md.uri.clone()
    } else {
        format!("{}?heartbeat={}", md.uri, md.heartbeat.as_secs())
    };
    let conn = if uri.starts_with("amqps://") {
        // SASL EXTERNAL: the broker takes the user from the client certificate.
        let uri = if md.sasl_external {
            let sep = if uri.contains('?') { '&' } else { '?' };
            format!("{uri}{sep}auth_mechanism=external")
        } else {
            uri
        };
        let tls = lapin::tcp::OwnedTLSConfig {
            identity: md
                .tls
                .client_cert
                .as_ref()
                .zip(md.tls.client_key.as_ref())
                .map(|(cert, key)| lapin::tcp::OwnedIdentity::PKCS8 {
                    pem: cert.clone().into_bytes(),
                    key: key.clone().into_bytes(),
                }),
            cert_chain: md.tls.ca_cert.clone(),
        };
        Connection::connect_with_config(&uri, props, tls, lapin::runtime::default_runtime()?)
            .await?
    } else {
        Connection::connect(&uri, props).await?
    };
    let channel = conn.create_channel().await?;
    if md.publisher_confirm {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
    }
    Ok((conn, channel))
}

#[async_trait]
impl PubSubFactory for RabbitFactory {
    fn component_type(&self) -> &'static str {
        "pubsub.rabbitmq"
    }

    fn validate(&self, metadata: &Metadata) -> Vec<MetadataError> {
        RabbitMetadata::parse(metadata).err().unwrap_or_default()
    }

    async fn connect(
        &self,
        name: &str,
        metadata: &Metadata,
    ) -> Result<Arc<dyn PubSub>, PubSubError> {
        let md = RabbitMetadata::parse(metadata)?;
        let conn = open(&md).await.map_err(|e| PubSubError::Connect {
            message: "connecting to rabbitmq".into(),
            source: Some(Box::new(e)),
        })?;
        Ok(Arc::new(RabbitPubSub {
            name: name.to_string(),
            md: Arc::new(md),
            publisher: Mutex::new(Some(Publisher::new(conn))),
            stop: watch::channel(false).0,
        }))
    }
}

/// A live `pubsub.rabbitmq` component.
pub struct RabbitPubSub {
    name: String,
    md: Arc<RabbitMetadata>,
    publisher: Mutex<Option<Arc<Publisher>>>,
    stop: watch::Sender<bool>,
}

/// The publishing connection: one channel shared by concurrent publishes (their confirms are
/// awaited outside any lock), and the exchanges already declared on it (as Go's component,
/// which declares an exchange once per connection, not on every publish).
struct Publisher {
    conn: Connection,
    ch: Channel,
    declared: std::sync::Mutex<HashSet<String>>,
}

impl Publisher {
    fn new((conn, ch): (Connection, Channel)) -> Arc<Self> {
        Arc::new(Self {
            conn,
            ch,
            declared: std::sync::Mutex::default(),
        })
    }

    fn usable(&self) -> bool {
        self.conn.status().connected() && self.ch.status().connected()
    }

    fn is_declared(&self, exchange: &str) -> bool {
        self.declared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(exchange)
    }

    fn mark_declared(&self, exchange: &str) {
        self.declared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(exchange.to_string());
    }
}

/// The broker closed the channel before routing the message: a cached exchange was deleted
/// (e.g. auto-deleted with its last queue, `deletedWhenUnused`), or another publish on the
/// shared channel hit that. Nothing was routed, so declaring again and retrying is safe.
fn channel_refused(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => matches!(
            amqp.kind(),
            lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)
        ),
        lapin::ErrorKind::InvalidChannelState(..) => true,
        _ => false,
    }
}

const FEATURES: &[Feature] = &[Feature::MessageTtl];

fn exchange_kind(kind: &str) -> ExchangeKind {
    match kind {
        "topic" => ExchangeKind::Topic,
        "direct" => ExchangeKind::Direct,
        "headers" => ExchangeKind::Headers,
        _ => ExchangeKind::Fanout,
    }
}

async fn declare_exchange(
    ch: &Channel,
    md: &RabbitMetadata,
    name: &str,
    kind: &str,
    durable: bool,
) -> Result<(), lapin::Error> {
    ch.exchange_declare(
        name.into(),
        exchange_kind(kind),
        ExchangeDeclareOptions {
            durable,
            auto_delete: md.deleted_when_unused,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

fn get_ci<'a>(md: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    md.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// The AMQP properties daprd-rs publishes with (exposed for the broker-bytes tests).
pub fn publish_properties(md: &RabbitMetadata, request: &PublishRequest) -> BasicProperties {
    let mut p = BasicProperties::default().with_content_type("text/plain".into());
    // Like Go's AMQP client, a zero delivery mode is left out of the frame.
    if md.delivery_mode != 0 {
        p = p.with_delivery_mode(md.delivery_mode);
    }
    let ttl = daprd_core::cloudevent::ttl_from_metadata(&request.metadata).or(md.default_ttl);
    if let Some(ttl) = ttl {
        p = p.with_expiration(ttl.as_millis().to_string().into());
    }
    if let Some(prio) = get_ci(&request.metadata, "priority").and_then(|v| v.parse::<u8>().ok()) {
        p = p.with_priority(prio);
    }
    if let Some(v) = get_ci(&request.metadata, "contentType") {
        p = p.with_content_type(v.into());
    }
    if let Some(v) = get_ci(&request.metadata, "messageID") {
        p = p.with_message_id(v.into());
    }
    if let Some(v) = get_ci(&request.metadata, "correlationID") {
        p = p.with_correlation_id(v.into());
    }
    if let Some(v) = get_ci(&request.metadata, "type") {
        p = p.with_type(v.into());
    }
    p
}

fn broker(what: &str, e: lapin::Error) -> PubSubError {
    PubSubError::Broker {
        message: format!("rabbitmq: {what}: {e}"),
        kind: ErrorKind::Transient,
        source: Some(Box::new(e)),
    }
}

impl RabbitPubSub {
    /// The live publisher, connecting (again) when there is none or it broke.
    async fn publisher(&self) -> Result<Arc<Publisher>, PubSubError> {
        let mut guard = self.publisher.lock().await;
        if let Some(p) = guard.as_ref().filter(|p| p.usable()) {
            return Ok(p.clone());
        }
        *guard = None;
        let p = Publisher::new(open(&self.md).await.map_err(|e| broker("connecting", e))?);
        *guard = Some(p.clone());
        Ok(p)
    }

    /// Forgets `p` (unless another publish already replaced it).
    async fn discard(&self, p: &Arc<Publisher>) {
        let mut guard = self.publisher.lock().await;
        if guard.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, p)) {
            *guard = None;
        }
    }

    async fn try_publish(
        &self,
        p: &Publisher,
        request: &PublishRequest,
    ) -> Result<lapin::Confirmation, lapin::Error> {
        if !p.is_declared(&request.topic) {
            declare_exchange(
                &p.ch,
                &self.md,
                &request.topic,
                &self.md.exchange_kind,
                self.md.durable,
            )
            .await?;
            p.mark_declared(&request.topic);
        }
        let routing_key = get_ci(&request.metadata, "routingKey").unwrap_or("");
        let confirm =
            p.ch.basic_publish(
                request.topic.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &request.data,
                publish_properties(&self.md, request),
            )
            .await?;
        confirm.await
    }

    async fn publish_once(&self, request: &PublishRequest) -> Result<(), PubSubError> {
        let mut retried = false;
        loop {
            let p = self.publisher().await?;
            match self.try_publish(&p, request).await {
                Ok(c) if self.md.publisher_confirm && c.is_nack() => {
                    return Err(PubSubError::broker(
                        ErrorKind::Transient,
                        "rabbitmq: did not receive confirmation of publishing",
                    ))
                }
                Ok(_) => return Ok(()),
                Err(e) => {
                    self.discard(&p).await;
                    if !retried && channel_refused(&e) {
                        retried = true;
                        continue;
                    }
                    return Err(broker("publishing", e));
                }
            }
        }
    }
}

#[async_trait]
impl PubSub for RabbitPubSub {
    fn features(&self) -> &[Feature] {
        FEATURES
    }

    async fn publish(&self, request: PublishRequest) -> Result<(), PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::closed_component());
        }
        self.publish_once(&request).await
    }

    async fn subscribe(
        &self,
        request: SubscribeRequest,
        handler: Handler,
    ) -> Result<Subscription, PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
        }
        let queue = get_ci(&request.metadata, "queueName")
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}-{}", self.md.consumer_id, request.topic));
        let sub = Arc::new(SubscriptionTask {
            failures: Failures::default(),
            component: self.name.clone(),
            md: self.md.clone(),
            topic: request.topic.clone(),
            queue,
            metadata: request.metadata.clone(),
            handler,
        });
        // Declare once up front so configuration errors surface at subscribe time.
        let (conn, ch) = open(&self.md).await.map_err(|e| broker("connecting", e))?;
        sub.prepare(&ch)
            .await
            .map_err(|e| broker("declaring the subscription", e))?;
        let (cancel, cancelled) = watch::channel(false);
        let component_stop = self.stop.subscribe();
        let (guard, drained) = daprd_core::pubsub::drain_tracker();
        tokio::spawn(sub.run(Some((conn, ch)), cancelled, component_stop, guard));
        Ok(Subscription::new(move || {
            let _ = cancel.send(true);
        })
        .with_drain(drained))
    }

    async fn close(&self) -> Result<(), PubSubError> {
        let _ = self.stop.send(true);
        if let Some(p) = self.publisher.lock().await.take() {
            let _ = p.conn.close(200, "closing".into()).await;
        }
        Ok(())
    }
}

/// Consecutive deliveries the app did not accept, for the pause before a requeue.
#[derive(Default)]
struct Failures(std::sync::atomic::AtomicU32);

impl Failures {
    /// Counts one more failure; the pause before its requeue (`backoff::RETRY`).
    fn pause(&self) -> std::time::Duration {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        daprd_core::backoff::RETRY.after(n)
    }

    fn reset(&self) {
        self.0.store(0, std::sync::atomic::Ordering::Relaxed);
    }
}

struct SubscriptionTask {
    failures: Failures,
    component: String,
    md: Arc<RabbitMetadata>,
    topic: String,
    queue: String,
    metadata: BTreeMap<String, String>,
    handler: Handler,
}

impl SubscriptionTask {
    async fn prepare(&self, ch: &Channel) -> Result<(), lapin::Error> {
        let md = &self.md;
        declare_exchange(ch, md, &self.topic, &md.exchange_kind, md.durable).await?;
        let mut args = FieldTable::default();
        if md.enable_dead_letter {
            let dlx = format!("dlx-{}", self.queue);
            let dlq = format!("dlq-{}", self.queue);
            declare_exchange(ch, md, &dlx, "fanout", true).await?;
            ch.queue_declare(
                dlq.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    auto_delete: md.deleted_when_unused,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
            ch.queue_bind(
                dlq.as_str().into(),
                dlx.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(dlx.into()),
            );
        }
        if let Some(n) = md.max_len {
            args.insert("x-max-length".into(), AMQPValue::LongLongInt(n));
        }
        if let Some(n) = md.max_len_bytes {
            args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(n));
        }
        if let Some(p) = get_ci(&self.metadata, "maxPriority").and_then(|v| v.parse::<u8>().ok()) {
            args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(p));
        }
        let queue_type = get_ci(&self.metadata, "queueType").unwrap_or("classic");
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(queue_type.into()),
        );
        if get_ci(&self.metadata, "singleActiveConsumer")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        ch.queue_declare(
            self.queue.as_str().into(),
            QueueDeclareOptions {
                durable: md.durable,
                auto_delete: md.deleted_when_unused,
                ..Default::default()
            },
            args,
        )
        .await?;
        if md.prefetch_count > 0 {
            ch.basic_qos(md.prefetch_count, BasicQosOptions::default())
                .await?;
        }
        let keys: Vec<&str> = get_ci(&self.metadata, "routingKey")
            .map(|k| k.split(',').map(str::trim).collect())
            .unwrap_or_else(|| vec![""]);
        for key in keys {
            ch.queue_bind(
                self.queue.as_str().into(),
                self.topic.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        Ok(())
    }

    /// Consumes until cancelled or the component stops, reconnecting after errors. On a stop
    /// it cancels the consumer, waits until every delivery it started has been acked or
    /// nacked, and only then closes the connection (closing it earlier made the broker
    /// redeliver messages the app had accepted). Prefetched deliveries that were never
    /// handed over go back to the queue with the channel. `_guard` is held until then.
    async fn run(
        self: Arc<Self>,
        mut first: Option<(Connection, Channel)>,
        mut cancelled: watch::Receiver<bool>,
        mut stop: watch::Receiver<bool>,
        _guard: daprd_core::pubsub::DrainGuard,
    ) {
        loop {
            let (conn, ch) = match first.take() {
                Some(c) => c,
                None => match open(&self.md).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(component = %self.component, queue = %self.queue, error = %e, "rabbitmq subscriber cannot connect; retrying");
                        if self.wait(&mut cancelled, &mut stop).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            let consumed = async {
                self.prepare(&ch).await?;
                let tag: ShortString =
                    format!("{}-{}", self.md.consumer_id, uuid::Uuid::new_v4().simple()).into();
                let consumer = ch
                    .basic_consume(
                        self.queue.as_str().into(),
                        tag,
                        BasicConsumeOptions {
                            no_ack: self.md.auto_ack,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
                Ok::<_, lapin::Error>(consumer)
            }
            .await;
            let mut consumer: lapin::Consumer = match consumed {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(component = %self.component, queue = %self.queue, error = %e, "rabbitmq subscription failed; retrying");
                    if self.wait(&mut cancelled, &mut stop).await {
                        return;
                    }
                    continue;
                }
            };
            // Held by every delivery of this connection until it is settled.
            let (settling, settled) = daprd_core::pubsub::drain_tracker();
            loop {
                // A stop wins over a delivery that is ready: none starts after it.
                let next = tokio::select! {
                    biased;
                    _ = cancelled.wait_for(|c| *c) => None,
                    _ = stop.wait_for(|c| *c) => None,
                    d = consumer.next() => Some(d),
                };
                let Some(next) = next else {
                    let _ = ch
                        .basic_cancel(
                            consumer.tag(),
                            lapin::options::BasicCancelOptions::default(),
                        )
                        .await;
                    drop(settling);
                    settled.wait().await;
                    let _ = conn.close(200, "unsubscribed".into()).await;
                    return;
                };
                let delivery = match next {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => {
                        tracing::warn!(component = %self.component, queue = %self.queue, error = %e, "rabbitmq consumer error; reconnecting");
                        break;
                    }
                    None => break,
                };
                let me = self.clone();
                let settling = settling.clone();
                let mut stopping = (cancelled.clone(), stop.clone());
                let work = async move {
                    let _settling = settling;
                    let mut metadata = BTreeMap::new();
                    if me.md.properties_to_metadata {
                        if let Some(v) = delivery.properties.message_id() {
                            metadata.insert("metadata.messageid".to_string(), v.to_string());
                        }
                        if let Some(v) = delivery.properties.correlation_id() {
                            metadata.insert("metadata.correlationid".to_string(), v.to_string());
                        }
                        if let Some(v) = delivery.properties.content_type() {
                            metadata.insert("metadata.contenttype".to_string(), v.to_string());
                        }
                    }
                    let msg = Message {
                        topic: me.topic.clone(),
                        data: Bytes::from(delivery.data.clone()),
                        metadata,
                        content_type: None,
                    };
                    let outcome = (me.handler)(msg).await;
                    if me.md.auto_ack {
                        return;
                    }
                    let res = match outcome {
                        Outcome::Success | Outcome::Drop => {
                            delivery.acker.ack(BasicAckOptions::default()).await
                        }
                        Outcome::Retry => {
                            // A requeued message comes straight back: pause first (growing
                            // while the app keeps failing, cut short by a stop) so an app
                            // that is down does not cost a busy loop.
                            if me.md.requeue_in_failure {
                                let pause = me.failures.pause();
                                tokio::select! {
                                    biased;
                                    _ = stopping.0.wait_for(|c| *c) => {}
                                    _ = stopping.1.wait_for(|c| *c) => {}
                                    _ = tokio::time::sleep(pause) => {}
                                }
                            }
                            delivery
                                .acker
                                .nack(BasicNackOptions {
                                    requeue: me.md.requeue_in_failure,
                                    ..Default::default()
                                })
                                .await
                        }
                    };
                    if matches!(outcome, Outcome::Success | Outcome::Drop) {
                        me.failures.reset();
                    }
                    if let Err(e) = res {
                        tracing::warn!(component = %me.component, queue = %me.queue, error = %e, "rabbitmq ack/nack failed; the broker will redeliver");
                    }
                };
                if self.md.parallel {
                    tokio::spawn(work);
                } else {
                    work.await;
                }
            }
            if self.wait(&mut cancelled, &mut stop).await {
                return;
            }
        }
    }

    /// Sleeps `reconnectWaitSeconds`; true when the subscription should end instead.
    async fn wait(
        &self,
        cancelled: &mut watch::Receiver<bool>,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(self.md.reconnect_wait.max(std::time::Duration::from_millis(100))) => false,
            _ = cancelled.wait_for(|c| *c) => true,
            _ = stop.wait_for(|c| *c) => true,
        }
    }
}
