//! `pubsub.azure.servicebus.topics` (alias `pubsub.azure.servicebus`) and
//! `pubsub.azure.servicebus.queues`: Azure Service Bus over AMQP 1.0 (`fe2o3-amqp`), as Dapr's
//! components use it.
//!
//! * Auth: the namespace's `connectionString` (a shared access key signs a SAS token per
//!   entity, put on the `$cbs` node before the entity's links attach, and put again before
//!   it expires), or Microsoft Entra ID with `namespaceName` ([`crate::entra`]: a token for
//!   Service Bus's scope put on `$cbs` as a `jwt`, and sent to the management API as a bearer
//!   token).
//! * Topics: a publish goes to the topic; a subscription receives from
//!   `<topic>/Subscriptions/<consumerID>`. Queues: both use the queue named as the topic.
//! * Entities: unless `disableEntityManagement` is set, the topic or queue is made through
//!   the management API before the first send to it, and the topic with its subscription (or
//!   the queue) before subscribing, with the component's entity properties ([`admin`]).
//! * Publish: the payload as one data section; Service Bus's keys in the metadata
//!   (`MessageId`, `CorrelationId`, `SessionId`, `PartitionKey`, `Label`, `To`, `ReplyTo`,
//!   `ContentType`, `ScheduledEnqueueTimeUtc`, `ttlInSeconds`) become the message's properties,
//!   every other entry an application property — the message Go daprd sends. A publish returns
//!   once the broker accepted the message; a transient failure is retried
//!   (`publishMaxRetries`, from `publishInitialRetryIntervalInMs`, doubling) on a new connection.
//!   Bulk publish sends every entry on the link at once and reports each refused entry.
//! * Subscribe: peek-lock. At most `maxActiveMessages` messages taken and not settled,
//!   `maxConcurrentHandlers` in the app's hands (a bulk subscription's handler call is a
//!   batch, so it may have up to its batch size times as many); complete (`accepted`) after
//!   the app accepted, abandon (`modified`) otherwise or after `handlerTimeoutInSec`; the
//!   locks of messages in the app's hands are renewed every `lockRenewalInSec` on the entity's
//!   `$management` node.
//!   A lost connection is reopened (`minConnectionRecoveryInSec` growing to
//!   `maxConnectionRecoveryInSec`); what the app still had is redelivered by the broker when
//!   its lock expires.
//! * Sessions (a topic subscription's metadata `requireSessions`, as Go daprd; refused on
//!   queues, which Go's component never asks for them on): the subscription is made (or must
//!   exist) requiring sessions; `maxConcurrentSessions` (8) slots, each with its own
//!   connection, accept the next free session (Service Bus's session filter left empty) and
//!   hand its messages to the app one at a time, in order — one link credit at a time, so a
//!   message the app refused comes back before the next is read (Go daprd's issue
//!   components-contrib#3868: it may hand one session's messages out in parallel). The
//!   session's lock is renewed every `lockRenewalInSec`; a session with nothing for
//!   `sessionIdleTimeoutInSec` (60) is let go and the slot takes the next one.

mod admin;
pub(crate) mod amqp;
mod metadata;
mod publisher;
mod sas;
mod subscriber;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use daprd_core::backoff::Backoff;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    BulkPublishRequest, ErrorKind, FailedEntry, Feature, Handler, PubSub, PubSubError,
    PubSubFactory, PublishRequest, SubscribeRequest, Subscription,
};
use fe2o3_amqp::types::messaging::{Data, Message};
use tokio::sync::watch;

pub use metadata::{
    ConnectionString, EntityProperties, Mode, ServiceBusMetadata, SubscribeOptions,
};

use admin::Admin;
use amqp::{AmqpError, Conn};
#[cfg(feature = "eventhubs")]
pub(crate) use metadata::namespace as entra_namespace;
pub(crate) use publisher::Publisher;

/// How the component turns a publish into an AMQP message and a received one back into the
/// app's data and metadata; public for the check of the framing against a real AMQP 1.0
/// broker (RabbitMQ's plugin), not an API.
#[doc(hidden)]
pub mod wire {
    pub use super::amqp::{body_bytes, incoming_metadata, outgoing};
}

/// Builds `pubsub.azure.servicebus.topics` or `.queues` components.
pub struct ServiceBusFactory {
    mode: Mode,
}

impl ServiceBusFactory {
    /// The topics component.
    pub const TOPICS: Self = Self { mode: Mode::Topics };
    /// The queues component.
    pub const QUEUES: Self = Self { mode: Mode::Queues };
}

#[async_trait]
impl PubSubFactory for ServiceBusFactory {
    fn component_type(&self) -> &'static str {
        match self.mode {
            Mode::Topics => "pubsub.azure.servicebus.topics",
            Mode::Queues => "pubsub.azure.servicebus.queues",
        }
    }

    fn aliases(&self) -> &'static [&'static str] {
        match self.mode {
            Mode::Topics => &["pubsub.azure.servicebus"],
            Mode::Queues => &["pubsub.azure.servicebusqueues"],
        }
    }

    fn validate(&self, metadata: &Metadata) -> Vec<MetadataError> {
        ServiceBusMetadata::parse(metadata, self.mode)
            .err()
            .unwrap_or_default()
    }

    async fn connect(
        &self,
        name: &str,
        metadata: &Metadata,
    ) -> Result<Arc<dyn PubSub>, PubSubError> {
        let md = ServiceBusMetadata::parse(metadata, self.mode)?;
        // The first connection must work (a clear error at start-up); later ones are opened
        // when needed.
        let conn =
            Conn::open(&md.connection, md.timeout)
                .await
                .map_err(|e| PubSubError::Connect {
                    message: format!("azure service bus: {e}"),
                    source: None,
                })?;
        let admin = if md.disable_entity_management {
            None
        } else {
            Some(
                Admin::new(&md.connection, md.timeout).map_err(|e| PubSubError::Connect {
                    message: format!("azure service bus: {e}"),
                    source: None,
                })?,
            )
        };
        let publisher = Publisher::new(md.connection.clone(), md.timeout, Some(conn));
        Ok(Arc::new(ServiceBusPubSub {
            name: name.to_string(),
            mode: self.mode,
            md: Arc::new(md),
            admin,
            publisher,
            ensured: std::sync::Mutex::default(),
            stop: watch::channel(false).0,
        }))
    }
}

/// A token is put again after this long (it is valid for [`amqp::TOKEN_LIFETIME`]).
pub(crate) const TOKEN_REFRESH: Duration = Duration::from_secs(45 * 60);

/// A live Service Bus component.
pub struct ServiceBusPubSub {
    name: String,
    mode: Mode,
    md: Arc<ServiceBusMetadata>,
    /// The management API client, unless `disableEntityManagement` is set.
    admin: Option<Admin>,
    /// Entities already looked up (and made if missing) for publishing.
    ensured: std::sync::Mutex<HashSet<String>>,
    publisher: Publisher,
    stop: watch::Sender<bool>,
}

/// Service Bus enforces a message's time to live itself; bulk publish is native.
const FEATURES: &[Feature] = &[Feature::MessageTtl, Feature::BulkPublish];

fn component_error(e: AmqpError) -> PubSubError {
    let kind = if e.is_transient() {
        ErrorKind::Transient
    } else {
        ErrorKind::Permanent
    };
    PubSubError::broker(kind, format!("azure service bus: {e}"))
}

impl ServiceBusPubSub {
    /// Looks `entity` up through the management API and makes it if missing, once per
    /// entity (two publishes racing both look; a create that loses the race is no error).
    async fn ensure(&self, entity: &str) -> Result<(), AmqpError> {
        let Some(admin) = &self.admin else {
            return Ok(());
        };
        if self.ensured_set().contains(entity) {
            return Ok(());
        }
        match self.mode {
            Mode::Topics => admin.ensure_topic(entity).await?,
            Mode::Queues => admin.ensure_queue(entity, &self.md.entity, false).await?,
        }
        self.ensured_set().insert(entity.to_string());
        Ok(())
    }

    fn ensured_set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.ensured
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `messages` to `entity` (made first if need be) at once; each one's outcome.
    async fn send_all(
        &self,
        entity: &str,
        messages: Vec<Message<Data>>,
    ) -> Result<Vec<Result<(), AmqpError>>, AmqpError> {
        // Before the publisher's lock: publishes to other entities do not wait for the
        // management API.
        self.ensure(entity).await?;
        self.publisher.send_all(entity, messages).await
    }

    /// Publishes one message with Go daprd's retries: a transient failure is tried again on a
    /// new connection after a pause that doubles from `publishInitialRetryIntervalInMs`.
    async fn publish_one(&self, entity: &str, message: Message<Data>) -> Result<(), AmqpError> {
        let mut pause = Backoff::new(self.md.publish_initial_retry, Duration::from_secs(60));
        let mut attempt = 0;
        loop {
            let result = match self.send_all(entity, vec![message.clone()]).await {
                Ok(mut outcomes) => outcomes.pop().unwrap_or(Ok(())),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && attempt < self.md.publish_max_retries => {
                    tracing::warn!(component = %self.name, entity, error = %e, "azure service bus: publish failed; retrying");
                    self.publisher.reset().await;
                    attempt += 1;
                    tokio::time::sleep(pause.next_pause()).await;
                }
                Err(e) => {
                    if e.is_transient() {
                        self.publisher.reset().await;
                    }
                    return Err(e);
                }
            }
        }
    }
}

#[async_trait]
impl PubSub for ServiceBusPubSub {
    fn features(&self) -> &[Feature] {
        FEATURES
    }

    async fn publish(&self, request: PublishRequest) -> Result<(), PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
        }
        let message =
            amqp::outgoing(&request.data, &request.metadata, None).map_err(component_error)?;
        self.publish_one(&request.topic, message)
            .await
            .map_err(component_error)
    }

    async fn bulk_publish(
        &self,
        request: BulkPublishRequest,
    ) -> Result<Vec<FailedEntry>, PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
        }
        let mut failed = Vec::new();
        let mut ids = Vec::new();
        let mut messages = Vec::new();
        for entry in &request.entries {
            let mut md = request.metadata.clone();
            md.extend(entry.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
            match amqp::outgoing(&entry.data, &md, Some(&entry.content_type)) {
                Ok(m) => {
                    ids.push(entry.entry_id.clone());
                    messages.push(m);
                }
                Err(e) => failed.push(FailedEntry {
                    entry_id: entry.entry_id.clone(),
                    error: e.to_string(),
                }),
            }
        }
        if messages.is_empty() {
            return Ok(failed);
        }
        match self.send_all(&request.topic, messages).await {
            Ok(outcomes) => {
                for (id, outcome) in ids.into_iter().zip(outcomes) {
                    if let Err(e) = outcome {
                        failed.push(FailedEntry {
                            entry_id: id,
                            error: format!("azure service bus: {e}"),
                        });
                    }
                }
            }
            Err(e) => {
                if e.is_transient() {
                    self.publisher.reset().await;
                }
                let error = format!("azure service bus: {e}");
                failed.extend(ids.into_iter().map(|entry_id| FailedEntry {
                    entry_id,
                    error: error.clone(),
                }));
            }
        }
        Ok(failed)
    }

    async fn subscribe(
        &self,
        request: SubscribeRequest,
        handler: Handler,
    ) -> Result<Subscription, PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
        }
        let options = SubscribeOptions::parse(&request.metadata)?;
        if options.require_sessions && self.mode == Mode::Queues {
            // Go daprd's queues component never asks for sessions either (it ignores the key)
            return Err(PubSubError::Metadata(MetadataError::new(
                "requireSessions",
                "sessions are supported on topic subscriptions (pubsub.azure.servicebus.topics), not on queues",
            )));
        }
        let address = match self.mode {
            Mode::Topics => format!("{}/Subscriptions/{}", request.topic, self.md.consumer_id),
            Mode::Queues => request.topic.clone(),
        };
        if let Some(admin) = &self.admin {
            let made = match self.mode {
                Mode::Topics => {
                    admin
                        .ensure_subscription(
                            &request.topic,
                            &self.md.consumer_id,
                            &self.md.entity,
                            options.require_sessions,
                        )
                        .await
                }
                Mode::Queues => {
                    admin
                        .ensure_queue(&request.topic, &self.md.entity, false)
                        .await
                }
            };
            made.map_err(|e| component_error(e.into()))?;
        }
        let (stop, guard, handle) = crate::stop::subscription(self.stop.subscribe());
        let consume = |session_idle| subscriber::ConsumeLoop {
            md: self.md.clone(),
            address: address.clone(),
            stop: stop.clone(),
            component: self.name.clone(),
            topic: request.topic.clone(),
            handler: handler.clone(),
            bulk: request.bulk,
            guard: guard.clone(),
            session_idle,
        };
        if options.require_sessions {
            // `maxConcurrentSessions` slots, each holding one session at a time. The first
            // connection must work (a clear error); a session comes when the broker has one.
            let first = subscriber::Link::connect(&self.md, &address)
                .await
                .map_err(component_error)?;
            let mut first = Some(first);
            for _ in 0..options.max_concurrent_sessions {
                let slot = consume(Some(options.session_idle_timeout));
                tokio::spawn(slot.run(None, first.take()));
            }
        } else {
            // The first attach must work (a clear error); later outages reconnect.
            let first = subscriber::Link::open(&self.md, &address)
                .await
                .map_err(component_error)?;
            tokio::spawn(consume(None).run(Some(first), None));
        }
        Ok(handle)
    }

    async fn close(&self) -> Result<(), PubSubError> {
        let _ = self.stop.send(true);
        self.publisher.close().await;
        Ok(())
    }
}
