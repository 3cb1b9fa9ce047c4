//! `pubsub.aws.snssqs`: AWS SNS topics fanned out to one SQS queue per consumer, as Dapr's
//! component uses them, through the official AWS SDK for Rust.
//!
//! * Topic → SNS topic (sanitized name, `.fifo` when `fifo`); publish = SNS `Publish` of the
//!   bytes as the message (FIFO: `MessageGroupId` = `fifoMessageGroupID`).
//! * `consumerID` → one SQS queue, subscribed to every topic the component subscribes to;
//!   a queue policy lets those topics send to it. Entities are created unless
//!   `disableEntityManagement`.
//! * One long-poll loop per component reads the queue and routes each SNS envelope by its
//!   topic ARN. `Success`/`Drop` → `DeleteMessage`; `Retry` → left alone, visible again after
//!   `messageVisibilityTimeout`. After `messageRetryLimit` receives a message is deleted
//!   (unless `disableDeleteOnRetryLimit`), or moved by SQS to `sqsDeadLettersQueueName`
//!   after `messageReceiveLimit` receives.

mod metadata;
mod subscriber;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::QueueAttributeName;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    ErrorKind, Feature, Handler, PubSub, PubSubError, PubSubFactory, PublishRequest,
    SubscribeRequest, Subscription,
};
use tokio::sync::watch;

pub use metadata::{sanitized_name, SnsSqsMetadata};
pub use subscriber::parse_envelope;
use subscriber::{Handlers, Poller, PollerShared, QueueInfo, TopicHandler};

/// Builds `pubsub.aws.snssqs` components.
pub struct SnsSqsFactory;

async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, PubSubError>>,
) -> Result<T, PubSubError> {
    tokio::time::timeout(limit, fut).await.map_err(|_| {
        PubSubError::broker(
            ErrorKind::Transient,
            format!("snssqs: {what}: timed out after {limit:?}"),
        )
    })?
}

#[async_trait]
impl PubSubFactory for SnsSqsFactory {
    fn component_type(&self) -> &'static str {
        "pubsub.aws.snssqs"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["pubsub.snssqs"]
    }

    fn validate(&self, metadata: &Metadata) -> Vec<MetadataError> {
        SnsSqsMetadata::parse(metadata).err().unwrap_or_default()
    }

    async fn connect(
        &self,
        name: &str,
        metadata: &Metadata,
    ) -> Result<Arc<dyn PubSub>, PubSubError> {
        let md = SnsSqsMetadata::parse(metadata)?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
        if let Some(region) = &md.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let (Some(ak), Some(sk)) = (&md.access_key, &md.secret_key) {
            loader = loader.credentials_provider(aws_credential_types::Credentials::new(
                ak,
                sk,
                md.session_token.clone(),
                None,
                "daprd-component-metadata",
            ));
        }
        if let Some(endpoint) = &md.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let config = loader.load().await;
        let pubsub = SnsSqsPubSub {
            name: name.to_string(),
            sns: aws_sdk_sns::Client::new(&config),
            sqs: aws_sdk_sqs::Client::new(&config),
            md: Arc::new(md),
            topics: Mutex::default(),
            consumer: tokio::sync::Mutex::default(),
            handlers: Arc::default(),
            stop: watch::channel(false).0,
        };
        // As in Dapr (which asks STS for the account at init), an unreachable or refusing
        // endpoint fails component init.
        pubsub.ping().await.map_err(|e| PubSubError::Connect {
            message: e.to_string(),
            source: None,
        })?;
        Ok(Arc::new(pubsub))
    }
}

#[derive(Default)]
struct ConsumerState {
    queue: Option<QueueInfo>,
    dead_letters: Option<QueueInfo>,
    /// Policy statements already on the queue (topic ARNs allowed to send).
    allowed: Vec<String>,
    subscribed: Vec<String>,
    running: Option<watch::Sender<bool>>,
    next_id: u64,
}

/// A live `pubsub.aws.snssqs` component.
pub struct SnsSqsPubSub {
    name: String,
    md: Arc<SnsSqsMetadata>,
    sns: aws_sdk_sns::Client,
    sqs: aws_sdk_sqs::Client,
    topics: Mutex<HashMap<String, String>>,
    consumer: tokio::sync::Mutex<ConsumerState>,
    handlers: Handlers,
    stop: watch::Sender<bool>,
}

/// The SQS queue policy statement that lets `topic_arn` send to `queue_arn`.
fn policy_statement(queue_arn: &str, topic_arn: &str) -> serde_json::Value {
    serde_json::json!({
        "Effect": "Allow",
        "Principal": {"Service": "sns.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": queue_arn,
        "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
    })
}

/// `policy` (the queue's current JSON policy, if any) with a statement for `topic_arn`;
/// `None` when it already has one.
pub fn policy_with(policy: Option<&str>, queue_arn: &str, topic_arn: &str) -> Option<String> {
    let mut doc: serde_json::Value = policy
        .and_then(|p| serde_json::from_str(p).ok())
        .unwrap_or_else(|| serde_json::json!({"Version": "2012-10-17", "Statement": []}));
    let statements = doc
        .as_object_mut()?
        .entry("Statement")
        .or_insert_with(|| serde_json::json!([]));
    if !statements.is_array() {
        *statements = serde_json::json!([statements.take()]);
    }
    let list = statements.as_array_mut()?;
    let present = list.iter().any(|s| {
        s.get("Resource").and_then(|r| r.as_str()) == Some(queue_arn)
            && s.pointer("/Condition/ArnEquals/aws:SourceArn")
                .and_then(|a| a.as_str())
                == Some(topic_arn)
    });
    if present {
        return None;
    }
    list.push(policy_statement(queue_arn, topic_arn));
    Some(doc.to_string())
}

impl SnsSqsPubSub {
    /// Checks that the SQS endpoint answers (at start-up).
    async fn ping(&self) -> Result<(), PubSubError> {
        within(self.md.assets_timeout, "checking the SQS endpoint", async {
            self.sqs
                .list_queues()
                .max_results(1)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| PubSubError::transient("snssqs", "checking the SQS endpoint", e))
        })
        .await
    }

    async fn topic_arn(&self, topic: &str) -> Result<String, PubSubError> {
        let name = sanitized_name(topic, self.md.fifo);
        if let Some(arn) = self
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
        {
            return Ok(arn.clone());
        }
        let limit = self.md.assets_timeout;
        let arn = if self.md.disable_entity_management {
            within(limit, "finding the topic", self.find_topic(&name)).await?
        } else {
            let mut req = self.sns.create_topic().name(&name).tags(
                aws_sdk_sns::types::Tag::builder()
                    .key("dapr-topic-name")
                    .value(topic)
                    .build()
                    .map_err(|e| PubSubError::transient("snssqs", "tagging the topic", e))?,
            );
            if self.md.fifo {
                req = req
                    .attributes("FifoTopic", "true")
                    .attributes("ContentBasedDeduplication", "true");
            }
            let out = within(limit, "creating the topic", async {
                req.send().await.map_err(|e| {
                    PubSubError::transient("snssqs", &format!("creating SNS topic {name}"), e)
                })
            })
            .await?;
            out.topic_arn().unwrap_or_default().to_string()
        };
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, arn.clone());
        Ok(arn)
    }

    async fn find_topic(&self, name: &str) -> Result<String, PubSubError> {
        let mut token = None;
        loop {
            let out = self
                .sns
                .list_topics()
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| PubSubError::transient("snssqs", "listing SNS topics", e))?;
            for t in out.topics() {
                if let Some(arn) = t.topic_arn() {
                    if arn.rsplit(':').next() == Some(name) {
                        return Ok(arn.to_string());
                    }
                }
            }
            token = out.next_token().map(str::to_string);
            if token.is_none() {
                return Err(PubSubError::broker(
                    ErrorKind::Permanent,
                    format!(
                        "snssqs: SNS topic {name} does not exist (disableEntityManagement is true)"
                    ),
                ));
            }
        }
    }

    async fn queue(&self, name: &str) -> Result<QueueInfo, PubSubError> {
        let name = sanitized_name(name, self.md.fifo);
        let limit = self.md.assets_timeout;
        let url = if self.md.disable_entity_management {
            within(limit, "finding the queue", async {
                self.sqs
                    .get_queue_url()
                    .queue_name(&name)
                    .send()
                    .await
                    .map_err(|e| {
                        PubSubError::transient("snssqs", &format!("finding SQS queue {name}"), e)
                    })
            })
            .await?
            .queue_url()
            .unwrap_or_default()
            .to_string()
        } else {
            let mut req = self
                .sqs
                .create_queue()
                .queue_name(&name)
                .tags("dapr-queue-name", &name);
            if self.md.fifo {
                req = req
                    .attributes(QueueAttributeName::FifoQueue, "true")
                    .attributes(QueueAttributeName::ContentBasedDeduplication, "true");
            }
            within(limit, "creating the queue", async {
                req.send().await.map_err(|e| {
                    PubSubError::transient("snssqs", &format!("creating SQS queue {name}"), e)
                })
            })
            .await?
            .queue_url()
            .unwrap_or_default()
            .to_string()
        };
        let attrs = within(limit, "reading the queue attributes", async {
            self.sqs
                .get_queue_attributes()
                .queue_url(&url)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .map_err(|e| {
                    PubSubError::transient("snssqs", &format!("reading SQS queue {name}"), e)
                })
        })
        .await?;
        let arn = attrs
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .cloned()
            .unwrap_or_default();
        Ok(QueueInfo { url, arn })
    }

    async fn allow_topic(&self, queue: &QueueInfo, topic_arn: &str) -> Result<(), PubSubError> {
        let limit = self.md.assets_timeout;
        let current = within(limit, "reading the queue policy", async {
            self.sqs
                .get_queue_attributes()
                .queue_url(&queue.url)
                .attribute_names(QueueAttributeName::Policy)
                .send()
                .await
                .map_err(|e| PubSubError::transient("snssqs", "reading the SQS queue policy", e))
        })
        .await?;
        let policy = current
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::Policy))
            .map(String::as_str);
        if let Some(new_policy) = policy_with(policy, &queue.arn, topic_arn) {
            within(limit, "setting the queue policy", async {
                self.sqs
                    .set_queue_attributes()
                    .queue_url(&queue.url)
                    .attributes(QueueAttributeName::Policy, new_policy)
                    .send()
                    .await
                    .map_err(|e| {
                        PubSubError::transient("snssqs", "setting the SQS queue policy", e)
                    })
            })
            .await?;
        }
        Ok(())
    }

    async fn prepare(
        &self,
        state: &mut ConsumerState,
        topic_arn: &str,
    ) -> Result<QueueInfo, PubSubError> {
        let queue = match &state.queue {
            Some(q) => q.clone(),
            None => {
                let q = self.queue(&self.md.queue_name).await?;
                if let Some(dlq_name) = &self.md.dead_letters_queue {
                    let dlq = self.queue(dlq_name).await?;
                    if !self.md.disable_entity_management {
                        let redrive = serde_json::json!({
                            "deadLetterTargetArn": dlq.arn,
                            "maxReceiveCount": self.md.message_receive_limit.to_string(),
                        })
                        .to_string();
                        within(
                            self.md.assets_timeout,
                            "setting the redrive policy",
                            async {
                                self.sqs
                                    .set_queue_attributes()
                                    .queue_url(&q.url)
                                    .attributes(QueueAttributeName::RedrivePolicy, redrive)
                                    .send()
                                    .await
                                    .map_err(|e| {
                                        PubSubError::transient(
                                            "snssqs",
                                            "setting the SQS redrive policy",
                                            e,
                                        )
                                    })
                            },
                        )
                        .await?;
                    }
                    state.dead_letters = Some(dlq);
                }
                state.queue = Some(q.clone());
                q
            }
        };
        if self.md.disable_entity_management || state.subscribed.iter().any(|t| t == topic_arn) {
            return Ok(queue);
        }
        if !state.allowed.iter().any(|t| t == topic_arn) {
            self.allow_topic(&queue, topic_arn).await?;
            state.allowed.push(topic_arn.to_string());
        }
        // SNS Subscribe is idempotent: the same topic, protocol and endpoint give the
        // existing subscription.
        within(self.md.assets_timeout, "subscribing the queue", async {
            self.sns
                .subscribe()
                .topic_arn(topic_arn)
                .protocol("sqs")
                .endpoint(&queue.arn)
                .send()
                .await
                .map_err(|e| {
                    PubSubError::transient(
                        "snssqs",
                        "subscribing the SQS queue to the SNS topic",
                        e,
                    )
                })
        })
        .await?;
        state.subscribed.push(topic_arn.to_string());
        Ok(queue)
    }
}

const FEATURES: &[Feature] = &[];

#[async_trait]
impl PubSub for SnsSqsPubSub {
    fn features(&self) -> &[Feature] {
        FEATURES
    }

    async fn publish(&self, request: PublishRequest) -> Result<(), PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
        }
        let arn = self.topic_arn(&request.topic).await?;
        let mut req = self
            .sns
            .publish()
            .topic_arn(&arn)
            .message(String::from_utf8_lossy(&request.data));
        if self.md.fifo {
            req = req.message_group_id(&self.md.fifo_message_group_id);
        }
        req.send().await.map(|_| ()).map_err(|e| {
            PubSubError::transient(
                "snssqs",
                &format!("publishing to topic {}", request.topic),
                e,
            )
        })
    }

    async fn subscribe(
        &self,
        request: SubscribeRequest,
        handler: Handler,
    ) -> Result<Subscription, PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::Closed);
        }
        let topic_arn = self.topic_arn(&request.topic).await?;
        let sanitized = sanitized_name(&request.topic, self.md.fifo);
        let mut state = self.consumer.lock().await;
        let queue = self.prepare(&mut state, &topic_arn).await?;
        state.next_id += 1;
        let id = state.next_id;
        let (guard, drained) = daprd_core::pubsub::drain_tracker();
        self.handlers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(sanitized.clone())
            .or_default()
            .1
            .push(TopicHandler {
                id,
                topic: request.topic.clone(),
                handler,
                guard,
            });
        let running = state.running.as_ref().is_some_and(|r| !*r.borrow());
        if !running {
            let (tx, rx) = watch::channel(false);
            state.running = Some(tx);
            let poller = Poller {
                shared: Arc::new(PollerShared {
                    component: self.name.clone(),
                    md: self.md.clone(),
                    sqs: self.sqs.clone(),
                    queue,
                    has_dead_letters: state.dead_letters.is_some(),
                    handlers: self.handlers.clone(),
                    held: subscriber::Held::default(),
                }),
                cancelled: rx,
                stop: self.stop.subscribe(),
            };
            tokio::spawn(poller.run());
        }
        let running = state.running.clone();
        let handlers = self.handlers.clone();
        Ok(Subscription::new(move || {
            let mut map = handlers.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, list)) = map.get_mut(&sanitized) {
                list.retain(|h| h.id != id);
                if list.is_empty() {
                    map.remove(&sanitized);
                }
            }
            // No subscription left: stop reading, so messages are not received (and counted
            // towards messageRetryLimit) while nobody handles them.
            if map.is_empty() {
                if let Some(r) = &running {
                    let _ = r.send(true);
                }
            }
        })
        .with_drain(drained))
    }

    async fn close(&self) -> Result<(), PubSubError> {
        let _ = self.stop.send(true);
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_gets_one_statement_per_topic() {
        let p = policy_with(None, "arn:q", "arn:t1").unwrap();
        assert!(policy_with(Some(&p), "arn:q", "arn:t1").is_none());
        let p2 = policy_with(Some(&p), "arn:q", "arn:t2").unwrap();
        let v: serde_json::Value = serde_json::from_str(&p2).unwrap();
        assert_eq!(v["Statement"].as_array().unwrap().len(), 2);
        assert_eq!(v["Version"], "2012-10-17");
        assert_eq!(
            v["Statement"][1]["Condition"]["ArnEquals"]["aws:SourceArn"],
            "arn:t2"
        );
    }

    #[test]
    fn envelope_gives_message_and_topic_name() {
        let body = r#"{"Type":"Notification","TopicArn":"arn:aws:sns:us-east-1:123456789012:orders","Message":"{\"id\":1}"}"#;
        assert_eq!(
            parse_envelope(body),
            Some(("{\"id\":1}".to_string(), "orders".to_string()))
        );
        assert_eq!(parse_envelope("not json"), None);
    }
}
