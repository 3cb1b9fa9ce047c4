//! The SQS consume loop: one poller per queue receives in long polls, hands each message to the
//! handler of its topic (in parallel up to concurrencyLimit, or in order), extends its visibility
//! while it waits for its turn and while the app works, deletes it once accepted and leaves it
//! to reappear otherwise.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::types::MessageSystemAttributeName;
use bytes::Bytes;
use daprd_core::pubsub::{Handler, Message, Outcome, PubSubError};
use tokio::sync::{watch, Semaphore};

use super::metadata::SnsSqsMetadata;

/// The SQS queue the component consumes.
#[derive(Debug, Clone)]
pub(super) struct QueueInfo {
    pub(super) url: String,
    pub(super) arn: String,
}

pub(super) struct TopicHandler {
    pub(super) id: u64,
    pub(super) topic: String,
    pub(super) handler: Handler,
    /// Cloned by each delivery to this subscription until its message is deleted (or left):
    /// the subscription's stop waits for those.
    pub(super) guard: daprd_core::pubsub::DrainGuard,
}

/// Subscriptions by sanitized topic name. Several subscriptions to one topic (streams) share
/// the queue: each message goes to one of them, in turn.
pub(super) type Handlers = Arc<Mutex<HashMap<String, (usize, Vec<TopicHandler>)>>>;

/// The message and topic name of an SNS notification as SQS delivers it.
pub fn parse_envelope(body: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let message = v.get("Message")?.as_str()?.to_string();
    let arn = v.get("TopicArn")?.as_str()?;
    let topic = arn.rsplit(':').next()?.to_string();
    Some((message, topic))
}

pub(super) struct Poller {
    pub(super) shared: Arc<PollerShared>,
    pub(super) cancelled: watch::Receiver<bool>,
    pub(super) stop: watch::Receiver<bool>,
}

impl Poller {
    pub(super) async fn run(mut self) {
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
                    let e = PubSubError::transient("snssqs", "receiving from the SQS queue", e);
                    tracing::warn!(component = %this.component, queue = %this.queue.arn, error = %e, "snssqs: receive failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(back_off.next_pause()) => {}
                        _ = self.cancelled.wait_for(|c| *c) => return,
                        _ = self.stop.wait_for(|c| *c) => return,
                    }
                    continue;
                }
            };
            // The messages of a batch that wait for their turn (in order, or for a permit)
            // stay invisible too: otherwise another consumer of the queue receives them
            // after messageVisibilityTimeout and the app gets them twice.
            let waiting = Arc::new(Mutex::new(
                out.messages()
                    .iter()
                    .filter_map(|m| m.receipt_handle().map(str::to_string))
                    .collect::<Vec<_>>(),
            ));
            let keeper = tokio::spawn(this.clone().keep_waiting_invisible(waiting.clone()));
            for m in out.messages().iter().cloned() {
                let shared = this.clone();
                let started = |m: &aws_sdk_sqs::types::Message| {
                    if let Some(r) = m.receipt_handle() {
                        waiting
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .retain(|w| w != r);
                    }
                };
                if md.parallel {
                    let permit = match &limit {
                        Some(s) => s.clone().acquire_owned().await.ok(),
                        None => None,
                    };
                    started(&m);
                    tokio::spawn(async move {
                        shared.handle(m).await;
                        drop(permit);
                    });
                } else {
                    started(&m);
                    shared.handle(m).await;
                }
            }
            keeper.abort();
        }
    }
}

pub(super) struct PollerShared {
    pub(super) component: String,
    pub(super) md: Arc<SnsSqsMetadata>,
    pub(super) sqs: aws_sdk_sqs::Client,
    pub(super) queue: QueueInfo,
    pub(super) has_dead_letters: bool,
    pub(super) handlers: Handlers,
}

impl PollerShared {
    pub(super) async fn delete(&self, receipt: &str) {
        if let Err(e) = self
            .sqs
            .delete_message()
            .queue_url(&self.queue.url)
            .receipt_handle(receipt)
            .send()
            .await
        {
            let e = PubSubError::transient("snssqs", "deleting the message", e);
            tracing::warn!(component = %self.component, error = %e, "snssqs: the message will be received again");
        }
    }

    /// Every half messageVisibilityTimeout, extends the visibility of the received messages
    /// in `waiting` (not handed to a handler yet, which extends its own); ends when none is
    /// left.
    async fn keep_waiting_invisible(self: Arc<Self>, waiting: Arc<Mutex<Vec<String>>>) {
        let timeout = self.md.visibility_timeout;
        let period = Duration::from_millis(u64::try_from(timeout).unwrap_or(10) * 500);
        loop {
            tokio::time::sleep(period).await;
            let receipts = waiting.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if receipts.is_empty() {
                return;
            }
            let entries: Result<Vec<_>, _> = receipts
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .visibility_timeout(timeout)
                        .build()
                })
                .collect();
            let Ok(entries) = entries else { return };
            if let Err(e) = self
                .sqs
                .change_message_visibility_batch()
                .queue_url(&self.queue.url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                let e = PubSubError::transient(
                    "snssqs",
                    "extending the visibility of waiting messages",
                    e,
                );
                tracing::warn!(component = %self.component, error = %e, "snssqs: messages waiting their turn may be received again");
            }
        }
    }

    pub(super) async fn handle(&self, m: aws_sdk_sqs::types::Message) {
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
            redelivered: receives > 1,
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
                        let e = PubSubError::transient("snssqs", "extending the message's visibility", e);
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
