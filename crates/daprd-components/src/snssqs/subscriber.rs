//! The SQS consume loop: one poller per queue receives in long polls, hands each message to the
//! handler of its topic (in parallel up to concurrencyLimit, or in order), keeps it invisible
//! while it waits for its turn and while the app works (one keeper per poller extends every
//! held message, ten to a `ChangeMessageVisibilityBatch` call), deletes it once accepted and
//! leaves it to reappear otherwise.

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
        tokio::spawn(this.clone().keep_invisible());
        // Handlers still at work when the poller ends stay invisible until they are done.
        let _close = CloseOnDrop(&this.held);
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
            // Every message of the batch stays invisible, while it waits for its turn (in
            // order, or for a permit) and while the app works on it: otherwise SQS hands it
            // out again after messageVisibilityTimeout and the app gets it twice.
            this.held
                .add(out.messages().iter().filter_map(|m| m.receipt_handle()));
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

/// The receipts of the messages a poller holds (received, not yet deleted or given up), kept
/// invisible by one task that extends them all every half messageVisibilityTimeout.
#[derive(Default)]
pub(super) struct Held {
    receipts: Mutex<std::collections::HashSet<String>>,
    /// Wakes the keeper when the first receipt comes in, or the poller ends.
    arrived: tokio::sync::Notify,
    /// The poller ended: the keeper ends once nothing is held.
    closed: std::sync::atomic::AtomicBool,
}

impl Held {
    fn add<'a>(&self, receipts: impl Iterator<Item = &'a str>) {
        let mut set = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
        set.extend(receipts.map(str::to_string));
        if !set.is_empty() {
            self.arrived.notify_one();
        }
    }

    fn remove(&self, receipt: &str) {
        self.receipts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(receipt);
    }

    fn is_empty(&self) -> bool {
        self.receipts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn snapshot(&self) -> Vec<String> {
        let set = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
        set.iter().cloned().collect()
    }
}

/// Takes a message's receipt out of [`Held`] when its handling ends, however it ends.
struct Release<'a>(&'a Held, &'a str);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

/// Tells the keeper that the poller ended.
struct CloseOnDrop<'a>(&'a Held);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.0.arrived.notify_one();
    }
}

pub(super) struct PollerShared {
    pub(super) component: String,
    pub(super) md: Arc<SnsSqsMetadata>,
    pub(super) sqs: aws_sdk_sqs::Client,
    pub(super) queue: QueueInfo,
    pub(super) has_dead_letters: bool,
    pub(super) handlers: Handlers,
    pub(super) held: Held,
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

    /// Every half messageVisibilityTimeout, extends the visibility of every held message
    /// (ten to a call); sleeps while none is held, and ends when none is held after the
    /// poller ended.
    async fn keep_invisible(self: Arc<Self>) {
        let timeout = self.md.visibility_timeout;
        let period = Duration::from_millis(u64::try_from(timeout).unwrap_or(10) * 500);
        loop {
            while self.held.is_empty() {
                if self.held.closed.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                self.held.arrived.notified().await;
            }
            tokio::time::sleep(period).await;
            for chunk in self.held.snapshot().chunks(10) {
                let entries: Result<Vec<_>, _> = chunk
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
                let Ok(entries) = entries else { continue };
                // An entry whose message was deleted meanwhile fails alone; the call does not.
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
                        "extending the visibility of held messages",
                        e,
                    );
                    tracing::warn!(component = %self.component, error = %e, "snssqs: messages waiting for the app may be received again");
                }
            }
        }
    }

    pub(super) async fn handle(&self, m: aws_sdk_sqs::types::Message) {
        let Some(receipt) = m.receipt_handle() else {
            return;
        };
        let _release = Release(&self.held, receipt);
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
        // Kept invisible meanwhile by keep_invisible.
        let outcome = work.await;
        match outcome {
            Outcome::Success | Outcome::Drop => self.delete(receipt).await,
            // Visible again after messageVisibilityTimeout.
            Outcome::Retry => {}
        }
    }
}
