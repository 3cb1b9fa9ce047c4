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

mod conn;
mod metadata;
mod subscriber;

use conn::{declare_exchange, open};
use metadata::get_ci;
use subscriber::{Failures, SubscriptionTask};

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    ErrorKind, Feature, Handler, PubSub, PubSubError, PubSubFactory, PublishRequest,
    SubscribeRequest, Subscription,
};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{watch, Mutex};

pub use metadata::RabbitMetadata;

/// Builds `pubsub.rabbitmq` components.
pub struct RabbitFactory;

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

impl RabbitPubSub {
    /// The live publisher, connecting (again) when there is none or it broke.
    async fn publisher(&self) -> Result<Arc<Publisher>, PubSubError> {
        let mut guard = self.publisher.lock().await;
        if let Some(p) = guard.as_ref().filter(|p| p.usable()) {
            return Ok(p.clone());
        }
        *guard = None;
        let p = Publisher::new(
            open(&self.md)
                .await
                .map_err(|e| PubSubError::transient("rabbitmq", "connecting", e))?,
        );
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
                    return Err(PubSubError::transient("rabbitmq", "publishing", e));
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
            return Err(PubSubError::Closed);
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
        // Declared and consuming before this returns: configuration errors surface here, and
        // a caller that replaces a subscription (hot reload) knows the queue has its new
        // consumer before the old one goes (an auto-delete queue would go with it).
        let (conn, ch) = open(&self.md)
            .await
            .map_err(|e| PubSubError::transient("rabbitmq", "connecting", e))?;
        let consumer = sub
            .consume(&ch)
            .await
            .map_err(|e| PubSubError::transient("rabbitmq", "declaring the subscription", e))?;
        let (stop, guard, handle) = crate::stop::subscription(self.stop.subscribe());
        tokio::spawn(sub.run(Some((conn, ch, consumer)), stop, guard));
        Ok(handle)
    }

    async fn close(&self) -> Result<(), PubSubError> {
        let _ = self.stop.send(true);
        if let Some(p) = self.publisher.lock().await.take() {
            let _ = p.conn.close(200, "closing".into()).await;
        }
        Ok(())
    }
}
