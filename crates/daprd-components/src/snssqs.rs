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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use bytes::Bytes;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    ErrorKind, Feature, Handler, Message, Outcome, PubSub, PubSubError, PubSubFactory,
    PublishRequest, SubscribeRequest, Subscription,
};
use tokio::sync::{watch, Semaphore};

pub use metadata::{sanitized_name, SnsSqsMetadata};

/// Builds `pubsub.aws.snssqs` components.
pub struct SnsSqsFactory;

fn aws_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> PubSubError {
    // The SDK's Display is terse ("service error"); the source chain has the reason.
    let mut message = format!("snssqs: {what}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    PubSubError::Broker {
        message,
        kind: ErrorKind::Transient,
        source: Some(Box::new(e)),
    }
}

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

/// The SQS queue the component consumes.
#[derive(Debug, Clone)]
struct QueueInfo {
    url: String,
    arn: String,
}

struct TopicHandler {
    id: u64,
    topic: String,
    handler: Handler,
    /// Cloned by each delivery to this subscription until its message is deleted (or left):
    /// the subscription's stop waits for those.
    guard: daprd_core::pubsub::DrainGuard,
}

/// Subscriptions by sanitized topic name. Several subscriptions to one topic (streams) share
/// the queue: each message goes to one of them, in turn.
type Handlers = Arc<Mutex<HashMap<String, (usize, Vec<TopicHandler>)>>>;

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

/// The message and topic name of an SNS notification as SQS delivers it.
pub fn parse_envelope(body: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let message = v.get("Message")?.as_str()?.to_string();
    let arn = v.get("TopicArn")?.as_str()?;
    let topic = arn.rsplit(':').next()?.to_string();
    Some((message, topic))
}

impl SnsSqsPubSub {
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
                    .map_err(|e| aws_error("tagging the topic", e))?,
            );
            if self.md.fifo {
                req = req
                    .attributes("FifoTopic", "true")
                    .attributes("ContentBasedDeduplication", "true");
            }
            let out = within(limit, "creating the topic", async {
                req.send()
                    .await
                    .map_err(|e| aws_error(&format!("creating SNS topic {name}"), e))
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
                .map_err(|e| aws_error("listing SNS topics", e))?;
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
                    .map_err(|e| aws_error(&format!("finding SQS queue {name}"), e))
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
                req.send()
                    .await
                    .map_err(|e| aws_error(&format!("creating SQS queue {name}"), e))
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
                .map_err(|e| aws_error(&format!("reading SQS queue {name}"), e))
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
                .map_err(|e| aws_error("reading the SQS queue policy", e))
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
                    .map_err(|e| aws_error("setting the SQS queue policy", e))
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
                                    .map_err(|e| aws_error("setting the SQS redrive policy", e))
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
                .map_err(|e| aws_error("subscribing the SQS queue to the SNS topic", e))
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
            return Err(PubSubError::closed_component());
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
        req.send()
            .await
            .map(|_| ())
            .map_err(|e| aws_error(&format!("publishing to topic {}", request.topic), e))
    }

    async fn subscribe(
        &self,
        request: SubscribeRequest,
        handler: Handler,
    ) -> Result<Subscription, PubSubError> {
        if *self.stop.borrow() {
            return Err(PubSubError::closed_component());
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

    async fn ping(&self) -> Result<(), PubSubError> {
        within(self.md.assets_timeout, "checking the SQS endpoint", async {
            self.sqs
                .list_queues()
                .max_results(1)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| aws_error("checking the SQS endpoint", e))
        })
        .await
    }

    async fn close(&self) -> Result<(), PubSubError> {
        let _ = self.stop.send(true);
        Ok(())
    }
}

struct Poller {
    shared: Arc<PollerShared>,
    cancelled: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
}

impl Poller {
    async fn run(mut self) {
        let this = self.shared.clone();
        let md = this.md.clone();
        let limit = (md.parallel && md.concurrency_limit > 0)
            .then(|| Arc::new(Semaphore::new(md.concurrency_limit)));
        let mut back_off = daprd_core::backoff::RETRY;
        loop {
            let receive = this
                .sqs
                .receive_message()
                .queue_url(&this.queue.url)
                .max_number_of_messages(md.max_number)
                .visibility_timeout(md.visibility_timeout)
                .wait_time_seconds(md.wait_time_seconds)
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .send();
            let res = tokio::select! {
                r = receive => r,
                _ = self.cancelled.wait_for(|c| *c) => return,
                _ = self.stop.wait_for(|c| *c) => return,
            };
            let out = match res {
                Ok(out) => {
                    back_off.reset();
                    out
                }
                Err(e) => {
                    let e = aws_error("receiving from the SQS queue", e);
                    tracing::warn!(component = %this.component, queue = %this.queue.arn, error = %e, "snssqs: receive failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(back_off.next_pause()) => {}
                        _ = self.cancelled.wait_for(|c| *c) => return,
                        _ = self.stop.wait_for(|c| *c) => return,
                    }
                    continue;
                }
            };
            for m in out.messages().iter().cloned() {
                let shared = this.clone();
                if md.parallel {
                    let permit = match &limit {
                        Some(s) => s.clone().acquire_owned().await.ok(),
                        None => None,
                    };
                    tokio::spawn(async move {
                        shared.handle(m).await;
                        drop(permit);
                    });
                } else {
                    shared.handle(m).await;
                }
            }
        }
    }
}

struct PollerShared {
    component: String,
    md: Arc<SnsSqsMetadata>,
    sqs: aws_sdk_sqs::Client,
    queue: QueueInfo,
    has_dead_letters: bool,
    handlers: Handlers,
}

impl PollerShared {
    async fn delete(&self, receipt: &str) {
        if let Err(e) = self
            .sqs
            .delete_message()
            .queue_url(&self.queue.url)
            .receipt_handle(receipt)
            .send()
            .await
        {
            let e = aws_error("deleting the message", e);
            tracing::warn!(component = %self.component, error = %e, "snssqs: the message will be received again");
        }
    }

    async fn handle(&self, m: aws_sdk_sqs::types::Message) {
        let Some(receipt) = m.receipt_handle() else {
            return;
        };
        let receives: i64 = m
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|c| c.parse().ok())
            .unwrap_or(1);
        let limit = self.md.retry_limit;
        if !self.has_dead_letters && receives >= limit {
            if !self.md.disable_delete_on_retry_limit {
                tracing::error!(component = %self.component, receives, "snssqs: message received {limit} times or more; deleted without processing");
                self.delete(receipt).await;
                return;
            }
        } else if self.has_dead_letters && receives > limit {
            tracing::error!(component = %self.component, receives, "snssqs: message received more than {limit} times; left for the dead-letters queue");
            return;
        }
        let Some((data, sanitized)) = m.body().and_then(parse_envelope) else {
            tracing::error!(component = %self.component, "snssqs: message body is not an SNS notification; left in the queue");
            return;
        };
        let target = {
            let mut map = self.handlers.lock().unwrap_or_else(|p| p.into_inner());
            map.get_mut(&sanitized).and_then(|(next, list)| {
                *next = next.wrapping_add(1);
                let h = list.get(*next % list.len().max(1))?;
                Some((h.topic.clone(), h.handler.clone(), h.guard.clone()))
            })
        };
        let Some((topic, handler, _settling)) = target else {
            tracing::warn!(component = %self.component, topic = %sanitized, "snssqs: no subscription for the message's topic; it will be received again");
            return;
        };
        let work = handler(Message {
            topic,
            data: Bytes::from(data),
            metadata: BTreeMap::new(),
            content_type: None,
        });
        // While the app works on it, keep the message invisible (every half
        // messageVisibilityTimeout): otherwise SQS hands it out again while the first handler
        // still runs.
        tokio::pin!(work);
        let timeout = self.md.visibility_timeout;
        let period = Duration::from_millis(u64::try_from(timeout).unwrap_or(10) * 500);
        let outcome = loop {
            tokio::select! {
                o = &mut work => break o,
                _ = tokio::time::sleep(period) => {
                    if let Err(e) = self
                        .sqs
                        .change_message_visibility()
                        .queue_url(&self.queue.url)
                        .receipt_handle(receipt)
                        .visibility_timeout(timeout)
                        .send()
                        .await
                    {
                        let e = aws_error("extending the message's visibility", e);
                        tracing::warn!(component = %self.component, error = %e, "snssqs: the message may be received again while it is handled");
                    }
                }
            }
        };
        match outcome {
            Outcome::Success | Outcome::Drop => self.delete(receipt).await,
            // Visible again after messageVisibilityTimeout.
            Outcome::Retry => {}
        }
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
