//! `pubsub.in-memory`: a process-local event bus. Every subscription in the process gets
//! every message published to a matching topic (no consumer groups); a subscription topic
//! ending in `*` matches every topic with that prefix. Deliveries to one subscription are
//! serialised through its own queue, so a slow subscriber never blocks publishers or other
//! subscribers. Nothing is persisted and nothing is redelivered: a handler's `Retry` is
//! logged (daprd's inbound resiliency is where retries happen).

mod bus;

use std::sync::Arc;

use async_trait::async_trait;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    Feature, Handler, PubSub, PubSubError, PubSubFactory, PublishRequest, SubscribeRequest,
    Subscription,
};

pub use bus::Bus;

/// Builds `pubsub.in-memory` components.
pub struct InMemoryFactory;

#[async_trait]
impl PubSubFactory for InMemoryFactory {
    fn component_type(&self) -> &'static str {
        "pubsub.in-memory"
    }

    fn validate(&self, _metadata: &Metadata) -> Vec<MetadataError> {
        Vec::new()
    }

    async fn connect(
        &self,
        name: &str,
        _metadata: &Metadata,
    ) -> Result<Arc<dyn PubSub>, PubSubError> {
        Ok(Arc::new(InMemoryPubSub {
            bus: Bus::new(name),
        }))
    }
}

/// A live in-memory component.
pub struct InMemoryPubSub {
    bus: Bus,
}

impl InMemoryPubSub {
    /// A component with its own bus (for tests and embedding).
    pub fn new(name: &str) -> Self {
        Self {
            bus: Bus::new(name),
        }
    }
}

const FEATURES: &[Feature] = &[Feature::SubscribeWildcards];

#[async_trait]
impl PubSub for InMemoryPubSub {
    fn features(&self) -> &[Feature] {
        FEATURES
    }

    async fn publish(&self, request: PublishRequest) -> Result<(), PubSubError> {
        self.bus.publish(request).await
    }

    async fn subscribe(
        &self,
        request: SubscribeRequest,
        handler: Handler,
    ) -> Result<Subscription, PubSubError> {
        self.bus.subscribe(request.topic, handler)
    }

    async fn close(&self) -> Result<(), PubSubError> {
        self.bus.close();
        Ok(())
    }
}
