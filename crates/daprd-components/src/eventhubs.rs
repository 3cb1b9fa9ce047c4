//! `pubsub.azure.eventhubs`: Azure Event Hubs over AMQP 1.0 (`fe2o3-amqp`), through the
//! namespace connection, claims-based security and publisher it shares with Service Bus
//! ([`crate::servicebus`]: the two are one AMQP service), as Go daprd's component uses it.
//!
//! * Auth: the namespace's `connectionString` (with `EntityPath`, the one event hub it may
//!   name), or Microsoft Entra ID with `eventHubNamespace` (tokens for Event Hubs' scope).
//! * Publish: to the event hub named as the topic; the payload as one data section with its
//!   content type, `partitionKey` as the event's `x-opt-partition-key` — the event Go daprd
//!   sends (other metadata is not carried, as in Go). A 2xx publish means the service
//!   accepted it. Bulk publish sends the entries at once; they must share one partition key.
//! * Subscribe: as consumer group `consumerID`, with checkpoints and partition ownership in
//!   Blob Storage (`storageAccountName`/`storageAccountKey` or `storageConnectionString`,
//!   `storageContainerName`) in the layout of Azure's SDKs, so a Go daprd (or any Azure
//!   processor) of the same group takes over where this one stopped ([`consumer`]).
//!
//! * Entity management (`enableEntityManagement` with Entra ID, as Go daprd): missing event
//!   hubs and consumer groups are made through Azure Resource Manager ([`arm`]).
//!
//! Not supported: Entra ID for Blob Storage.

mod arm;
pub mod checkpoints;
mod consumer;
mod metadata;

use std::sync::Arc;

use async_trait::async_trait;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    BulkPublishRequest, ErrorKind, FailedEntry, Feature, Handler, PubSub, PubSubError,
    PubSubFactory, PublishRequest, SubscribeRequest, Subscription,
};
use fe2o3_amqp::types::messaging::{Data, Message, MessageAnnotations, Properties};
use fe2o3_amqp::types::primitives::{Binary, OrderedMap, Symbol, Value};
use tokio::sync::watch;

pub use arm::ArmError;
pub use metadata::{EntityManagement, EventHubsMetadata, SubscribeOptions, ENTRA_SCOPE};

use crate::servicebus::amqp::{AmqpError, Conn};
use crate::servicebus::Publisher;

/// How the component turns a publish into an event and a received event into the app's
/// metadata; public for the check of the framing against a real AMQP 1.0 broker (RabbitMQ's
/// plugin), not an API.
#[doc(hidden)]
pub mod wire {
    pub use super::consumer::incoming_metadata;
    pub use super::event;
}

/// Builds `pubsub.azure.eventhubs` components.
pub struct EventHubsFactory;

#[async_trait]
impl PubSubFactory for EventHubsFactory {
    fn component_type(&self) -> &'static str {
        "pubsub.azure.eventhubs"
    }

    fn validate(&self, metadata: &Metadata) -> Vec<MetadataError> {
        EventHubsMetadata::parse(metadata).err().unwrap_or_default()
    }

    async fn connect(
        &self,
        name: &str,
        metadata: &Metadata,
    ) -> Result<Arc<dyn PubSub>, PubSubError> {
        let md = EventHubsMetadata::parse(metadata)?;
        // The first connection must work (a clear error at start-up); later ones are opened
        // when needed.
        let conn = Conn::open(&md.connection, md.timeout)
            .await
            .map_err(component_error)?;
        let arm = match (&md.entity_management, &md.connection.entra) {
            (Some(settings), Some(credential)) => Some(
                arm::Arm::new(settings.clone(), &md.connection.host, credential.clone())
                    .map_err(|e| permanent(e.to_string()))?,
            ),
            _ => None,
        };
        Ok(Arc::new(EventHubsPubSub {
            name: name.to_string(),
            publisher: Publisher::new(md.connection.clone(), md.timeout, Some(conn)),
            md: Arc::new(md),
            arm,
            ensured: std::sync::Mutex::default(),
            stop: watch::channel(false).0,
        }))
    }
}

/// A live Event Hubs component.
pub struct EventHubsPubSub {
    name: String,
    md: Arc<EventHubsMetadata>,
    publisher: Publisher,
    /// Resource Manager, with `enableEntityManagement`.
    arm: Option<arm::Arm>,
    /// Event hubs (and `<hub>/<consumer group>`s) already looked up, and made if missing.
    ensured: std::sync::Mutex<std::collections::HashSet<String>>,
    stop: watch::Sender<bool>,
}

fn component_error(e: AmqpError) -> PubSubError {
    let kind = if e.is_transient() {
        ErrorKind::Transient
    } else {
        ErrorKind::Permanent
    };
    PubSubError::broker(kind, format!("azure event hubs: {e}"))
}

fn permanent(message: String) -> PubSubError {
    PubSubError::broker(ErrorKind::Permanent, format!("azure event hubs: {message}"))
}

/// The event Go daprd sends: the payload, its content type, the partition key annotation.
pub fn event(
    data: &[u8],
    content_type: Option<&str>,
    partition_key: Option<&str>,
) -> Message<Data> {
    let mut annotations = OrderedMap::new();
    if let Some(key) = partition_key.filter(|k| !k.is_empty()) {
        annotations.insert(
            fe2o3_amqp::types::messaging::annotations::OwnedKey::Symbol(Symbol::from(
                "x-opt-partition-key",
            )),
            Value::String(key.to_string()),
        );
    }
    let builder = Message::builder();
    let builder = match content_type.filter(|c| !c.is_empty()) {
        Some(c) => builder.properties(Properties {
            content_type: Some(Symbol::from(c)),
            ..Default::default()
        }),
        None => builder,
    };
    let builder = if annotations.is_empty() {
        builder
    } else {
        builder.message_annotations(MessageAnnotations(annotations))
    };
    builder.data(Binary::from(data.to_vec())).build()
}

impl EventHubsPubSub {
    /// The event hub a topic names: the topic itself, which must be the connection string's
    /// `EntityPath` when it has one (Go daprd's check).
    fn hub(&self, topic: &str) -> Result<String, PubSubError> {
        if topic.is_empty() {
            return Err(permanent("parameter 'topic' is required".into()));
        }
        match &self.md.hub {
            Some(hub) if hub != topic => Err(permanent(format!(
                "the requested topic '{topic}' does not match the Event Hub name in the connection string"
            ))),
            _ => Ok(topic.to_string()),
        }
    }

    /// With entity management: makes the event hub `hub` (and with `group`, that consumer
    /// group of it) through Resource Manager if missing, once per component.
    async fn ensure(&self, hub: &str, group: Option<&str>) -> Result<(), PubSubError> {
        let Some(arm) = &self.arm else {
            return Ok(());
        };
        let key = match group {
            Some(g) => format!("{hub}/{g}"),
            None => hub.to_string(),
        };
        let ensured = || {
            self.ensured
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if ensured().contains(&key) {
            return Ok(());
        }
        let made = match group {
            Some(g) => arm.ensure_consumer_group(hub, g).await,
            None => arm.ensure_hub(hub).await,
        };
        made.map_err(|e| {
            PubSubError::broker(ErrorKind::Transient, format!("azure event hubs: {e}"))
        })?;
        ensured().insert(key);
        Ok(())
    }

    /// Sends `events` to `hub`; on a transient failure once more on a new connection.
    async fn send(
        &self,
        hub: &str,
        events: Vec<Message<Data>>,
    ) -> Result<Vec<Result<(), AmqpError>>, AmqpError> {
        match self.publisher.send_all(hub, events.clone()).await {
            Err(e) if e.is_transient() => {
                tracing::warn!(component = %self.name, hub, error = %e, "azure event hubs: publish failed; retrying on a new connection");
                self.publisher.reset().await;
                let second = self.publisher.send_all(hub, events).await;
                if matches!(&second, Err(e) if e.is_transient()) {
                    self.publisher.reset().await;
                }
                second
            }
            other => other,
        }
    }
}

/// Bulk publish is native (the entries go out at once).
const FEATURES: &[Feature] = &[Feature::BulkPublish];

#[async_trait]
impl PubSub for EventHubsPubSub {
    fn features(&self) -> &[Feature] {
        FEATURES
    }

    async fn publish(&self, request: PublishRequest) -> Result<(), PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
        }
        let hub = self.hub(&request.topic)?;
        self.ensure(&hub, None).await?;
        let message = event(
            &request.data,
            request.content_type.as_deref(),
            request.metadata.get("partitionKey").map(String::as_str),
        );
        let mut outcomes = self
            .send(&hub, vec![message])
            .await
            .map_err(component_error)?;
        outcomes.pop().unwrap_or(Ok(())).map_err(component_error)
    }

    async fn bulk_publish(
        &self,
        request: BulkPublishRequest,
    ) -> Result<Vec<FailedEntry>, PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
        }
        let hub = self.hub(&request.topic)?;
        self.ensure(&hub, None).await?;
        let mut key: Option<&str> = request
            .metadata
            .get("partitionKey")
            .map(String::as_str)
            .filter(|k| !k.is_empty());
        for entry in &request.entries {
            if let Some(k) = entry.metadata.get("partitionKey").filter(|k| !k.is_empty()) {
                if key.is_some_and(|have| have != k) {
                    return Err(permanent(
                        "cannot send messages to different partitions".into(),
                    ));
                }
                key = Some(k);
            }
        }
        let events = request
            .entries
            .iter()
            .map(|e| event(&e.data, Some(&e.content_type), key))
            .collect();
        let failed = match self.send(&hub, events).await {
            Ok(outcomes) => request
                .entries
                .iter()
                .zip(outcomes)
                .filter_map(|(entry, outcome)| {
                    outcome.err().map(|e| FailedEntry {
                        entry_id: entry.entry_id.clone(),
                        error: format!("azure event hubs: {e}"),
                    })
                })
                .collect(),
            Err(e) => {
                let error = format!("azure event hubs: {e}");
                request
                    .entries
                    .iter()
                    .map(|entry| FailedEntry {
                        entry_id: entry.entry_id.clone(),
                        error: error.clone(),
                    })
                    .collect()
            }
        };
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
        let hub = self.hub(&request.topic)?;
        let options = SubscribeOptions::parse(&request.metadata, &self.md)?;
        let missing = |key: &str| {
            PubSubError::Metadata(MetadataError::new(
                key,
                "is required to subscribe to an Event Hub topic",
            ))
        };
        let group = self
            .md
            .consumer_group
            .clone()
            .ok_or_else(|| missing("consumerID"))?;
        let account = self
            .md
            .storage
            .clone()
            .ok_or_else(|| missing("storageAccountName"))?;
        let container = self
            .md
            .container
            .clone()
            .ok_or_else(|| missing("storageContainerName"))?;
        self.ensure(&hub, None).await?;
        self.ensure(&hub, Some(&group)).await?;
        let store = checkpoints::CheckpointStore::new(
            account,
            &container,
            &self.md.connection.host,
            &hub,
            &group,
        )
        .map_err(|e| permanent(e.to_string()))?;
        store.ensure_container().await.map_err(|e| {
            PubSubError::broker(ErrorKind::Transient, format!("azure event hubs: {e}"))
        })?;
        let consumer = Arc::new(consumer::Consumer {
            md: self.md.clone(),
            options,
            hub,
            topic: request.topic.clone(),
            group,
            store,
            owner: uuid::Uuid::new_v4().to_string(),
            handler,
            bulk: request.bulk,
            component: self.name.clone(),
        });
        // The hub must be there (a clear error); its partitions do not change.
        let partitions = consumer.partitions().await.map_err(component_error)?;
        let (stop, guard, handle) = crate::stop::subscription(self.stop.subscribe());
        consumer.start(partitions, stop, guard).await;
        Ok(handle)
    }

    async fn close(&self) -> Result<(), PubSubError> {
        let _ = self.stop.send(true);
        self.publisher.close().await;
        Ok(())
    }
}
