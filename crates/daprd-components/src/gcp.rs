//! `pubsub.gcp.pubsub`: Google Cloud Pub/Sub over its gRPC API, as Dapr's component uses it.
//!
//! * Topic = Pub/Sub topic `projects/<projectId>/topics/<topic>`; the subscription is
//!   `<consumerID>-<topic>`. Both are created when missing unless `disableEntityManagement`
//!   (the subscription with `ackDeadline`, `enableMessageOrdering` and, with
//!   `deadLetterTopic`, a dead-letter policy of `maxDeliveryAttempts`; the dead-letter topic
//!   is created too, as the server requires it to exist).
//! * Publish: the message data is the payload as given (the CloudEvent), no attributes; an
//!   ordering key only with `enableMessageOrdering` (the publish's `orderingKey` metadata wins
//!   over the component's).
//! * Subscribe: one streaming pull per subscription; `Success`/`Drop` → ack, `Retry` → nack
//!   (deadline 0: redelivered at once). While the app works on a message its deadline is
//!   extended every half `ackDeadline`.
//! * With `endpoint` (or `PUBSUB_EMULATOR_HOST`) it talks to that Pub/Sub emulator in plain
//!   gRPC without credentials; else to `pubsub.googleapis.com:443` over TLS with Google's
//!   credentials (see [`auth`]): the metadata's service account or Application Default
//!   Credentials.

pub mod auth;
mod metadata;
mod subscriber;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    ErrorKind, Feature, Handler, PubSub, PubSubError, PubSubFactory, PublishRequest,
    SubscribeRequest, Subscription,
};
use gcloud_googleapis::pubsub::v1 as api;
use gcloud_googleapis::pubsub::v1::publisher_client::PublisherClient;
use gcloud_googleapis::pubsub::v1::subscriber_client::SubscriberClient;
use tokio::sync::watch;
use tonic::transport::Channel;

pub use auth::GoogleApis;
pub use metadata::{GcpMetadata, ServiceAccountFields};

/// Builds `pubsub.gcp.pubsub` components.
pub struct GcpPubSubFactory;

/// The gRPC service the clients call: a channel whose calls carry the bearer token (none to
/// an emulator).
type Grpc = tonic::service::interceptor::InterceptedService<Channel, auth::Bearer>;

#[async_trait]
impl PubSubFactory for GcpPubSubFactory {
    fn component_type(&self) -> &'static str {
        "pubsub.gcp.pubsub"
    }

    fn validate(&self, metadata: &Metadata) -> Vec<MetadataError> {
        GcpMetadata::parse(metadata, GoogleApis::from_env().emulator_host.as_deref())
            .err()
            .unwrap_or_default()
    }

    async fn connect(
        &self,
        name: &str,
        metadata: &Metadata,
    ) -> Result<Arc<dyn PubSub>, PubSubError> {
        Self::connect_to(name, metadata, &GoogleApis::from_env()).await
    }
}

impl GcpPubSubFactory {
    /// [`PubSubFactory::connect`] with Google's services at `apis` (tests point it at their
    /// own servers).
    ///
    /// # Errors
    /// Bad metadata, credentials that give no token, an emulator that cannot be reached.
    pub async fn connect_to(
        name: &str,
        metadata: &Metadata,
        apis: &GoogleApis,
    ) -> Result<Arc<dyn PubSub>, PubSubError> {
        let md = GcpMetadata::parse(metadata, apis.emulator_host.as_deref())?;
        let stop = watch::channel(false).0;
        let (channel, bearer) = match &md.endpoint {
            Some(endpoint) => (emulator_channel(endpoint).await?, auth::Bearer::default()),
            None => google_channel(&md, apis, stop.subscribe()).await?,
        };
        let grpc = Grpc::new(channel, bearer);
        Ok(Arc::new(GcpPubSub {
            name: name.to_string(),
            md: Arc::new(md),
            publisher: PublisherClient::new(grpc.clone()),
            subscriber: SubscriberClient::new(grpc),
            topics: Mutex::new(HashSet::new()),
            stop,
        }))
    }
}

/// A plain channel to an emulator; the first connection must succeed (a clear init error),
/// later outages reconnect.
async fn emulator_channel(endpoint: &str) -> Result<Channel, PubSubError> {
    let uri = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    Channel::from_shared(uri)
        .map_err(|e| PubSubError::Metadata(MetadataError::new("endpoint", e.to_string())))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| PubSubError::Connect {
            message: format!("connecting to the pub/sub emulator at {endpoint}"),
            source: Some(Box::new(e)),
        })
}

/// A TLS channel to Google's Pub/Sub API and the bearer token of the credentials (the
/// metadata's service account, else Application Default Credentials); the first token is
/// had before this returns.
async fn google_channel(
    md: &GcpMetadata,
    apis: &GoogleApis,
    stop: watch::Receiver<bool>,
) -> Result<(Channel, auth::Bearer), PubSubError> {
    let auth_error = |e: auth::AuthError| PubSubError::Connect {
        message: e.to_string(),
        source: None,
    };
    let http = auth::http_client(apis).map_err(auth_error)?;
    let (credentials, first) = match &md.service_account {
        Some(sa) => (
            auth::Credentials::ServiceAccount(
                auth::ServiceAccount::new(&sa.client_email, &sa.private_key_id, &sa.private_key)
                    .map_err(|e| PubSubError::Metadata(MetadataError::new("privateKey", e)))?,
            ),
            None,
        ),
        None => auth::Credentials::find(apis, &http)
            .await
            .map_err(auth_error)?,
    };
    let bearer = auth::Bearer::start(credentials, first, apis.clone(), http, stop)
        .await
        .map_err(auth_error)?;
    let tls = auth::tls_config(apis).map_err(auth_error)?;
    let channel =
        daprd_core::tls::grpc_channel(&apis.pubsub_host, apis.pubsub_port, tls).map_err(|e| {
            PubSubError::Connect {
                message: format!("the channel to {}", apis.pubsub_host),
                source: Some(Box::new(e)),
            }
        })?;
    Ok((channel, bearer))
}

/// A live `pubsub.gcp.pubsub` component.
pub struct GcpPubSub {
    name: String,
    md: Arc<GcpMetadata>,
    publisher: PublisherClient<Grpc>,
    subscriber: SubscriberClient<Grpc>,
    /// Topics known to exist (created or found).
    topics: Mutex<HashSet<String>>,
    stop: watch::Sender<bool>,
}

const FEATURES: &[Feature] = &[];

/// A gRPC status as a component error: the codes a retry can help with are transient.
pub(crate) fn status_error(what: &str, st: &tonic::Status) -> PubSubError {
    use tonic::Code;
    let kind = match st.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::Cancelled => ErrorKind::Transient,
        _ => ErrorKind::Permanent,
    };
    PubSubError::broker(
        kind,
        format!("gcp pubsub: {what}: {} ({:?})", st.message(), st.code()),
    )
}

impl GcpPubSub {
    /// Makes sure `topic` exists: created unless `disableEntityManagement` (then only
    /// assumed: a publish to a missing topic fails with the server's NOT_FOUND).
    async fn ensure_topic(&self, topic: &str) -> Result<(), PubSubError> {
        if self.md.disable_entity_management || self.known(topic) {
            return Ok(());
        }
        let name = self.md.topic_path(topic);
        match self
            .publisher
            .clone()
            .create_topic(api::Topic {
                name: name.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(_) => {}
            Err(st) if st.code() == tonic::Code::AlreadyExists => {}
            Err(st) => return Err(status_error(&format!("creating topic {name}"), &st)),
        }
        self.topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(topic.to_string());
        Ok(())
    }

    fn known(&self, topic: &str) -> bool {
        self.topics
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(topic)
    }

    /// Makes sure the subscription of `topic` exists (unless `disableEntityManagement`).
    async fn ensure_subscription(&self, topic: &str) -> Result<String, PubSubError> {
        let name = self.md.subscription_path(topic);
        if self.md.disable_entity_management {
            return Ok(name);
        }
        self.ensure_topic(topic).await?;
        // Pub/Sub refuses a dead-letter policy whose topic does not exist: it is created too.
        if let Some(dlt) = &self.md.dead_letter_topic {
            self.ensure_topic(dlt).await?;
        }
        let dead_letter_policy =
            self.md
                .dead_letter_topic
                .as_ref()
                .map(|dlt| api::DeadLetterPolicy {
                    dead_letter_topic: self.md.topic_path(dlt),
                    max_delivery_attempts: self.md.max_delivery_attempts,
                });
        let sub = api::Subscription {
            name: name.clone(),
            topic: self.md.topic_path(topic),
            ack_deadline_seconds: i32::try_from(self.md.ack_deadline.as_secs()).unwrap_or(20),
            enable_message_ordering: self.md.enable_message_ordering,
            dead_letter_policy,
            ..Default::default()
        };
        match self.subscriber.clone().create_subscription(sub).await {
            Ok(_) => Ok(name),
            Err(st) if st.code() == tonic::Code::AlreadyExists => Ok(name),
            Err(st) => Err(status_error(&format!("creating subscription {name}"), &st)),
        }
    }
}

#[async_trait]
impl PubSub for GcpPubSub {
    fn features(&self) -> &[Feature] {
        FEATURES
    }

    async fn publish(&self, request: PublishRequest) -> Result<(), PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
        }
        self.ensure_topic(&request.topic).await?;
        let ordering_key = if self.md.enable_message_ordering {
            request
                .metadata
                .get("orderingKey")
                .filter(|k| !k.is_empty())
                .cloned()
                .or_else(|| self.md.ordering_key.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let topic = self.md.topic_path(&request.topic);
        self.publisher
            .clone()
            .publish(api::PublishRequest {
                topic: topic.clone(),
                messages: vec![api::PubsubMessage {
                    data: request.data.clone(),
                    ordering_key,
                    ..Default::default()
                }],
            })
            .await
            .map_err(|st| status_error(&format!("publishing to {topic}"), &st))?;
        Ok(())
    }

    async fn subscribe(
        &self,
        request: SubscribeRequest,
        handler: Handler,
    ) -> Result<Subscription, PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
        }
        let subscription = self.ensure_subscription(&request.topic).await?;
        let (stop, guard, handle) = crate::stop::subscription(self.stop.subscribe());
        tokio::spawn(
            subscriber::PullLoop {
                client: self.subscriber.clone(),
                subscription,
                stop,
                component: self.name.clone(),
                topic: request.topic.clone(),
                md: self.md.clone(),
                handler,
                guard,
            }
            .run(),
        );
        Ok(handle)
    }

    async fn close(&self) -> Result<(), PubSubError> {
        let _ = self.stop.send(true);
        Ok(())
    }
}
