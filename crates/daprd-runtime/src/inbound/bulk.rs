//! Bulk subscribe (Dapr's `bulkSubscribe`): the default bulk subscriber buffers messages from a normal
//! subscription and flushes a batch when `maxMessagesCount` is reached or
//! `maxAwaitDurationMs` has passed since the batch's first message. Each message's ack
//! waits for its own entry's result. Entries are decoded and routed one by one, grouped by
//! route path, and sent in one request per path (HTTP `POST /<path>` with a bulk envelope,
//! gRPC `OnBulkTopicEvent` falling back to `OnBulkTopicEventAlpha1`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use daprd_core::pubsub::{Handler, Message, Outcome};
use serde_json::Value as Json;
use tokio::sync::{mpsc, oneshot};

use crate::inbound::channel::{AppReply, BulkDelivery, BulkEntryOut, BulkReply};
use crate::inbound::delivery::{process_status, PipelineSlot, SubscriptionPipeline};
use crate::inbound::subscriptions::BulkSubscribe;
use crate::metrics::ProcessStatus;
use crate::resiliency::AttemptError;

struct Item {
    msg: Message,
    done: oneshot::Sender<Outcome>,
}

/// The component handler for a bulk subscription: queues each message for the batcher and
/// waits for its entry's result.
pub fn handler(slot: Arc<PipelineSlot>, cfg: BulkSubscribe) -> Handler {
    let (tx, rx) = mpsc::unbounded_channel::<Item>();
    tokio::spawn(batcher(slot, cfg, rx));
    Arc::new(move |msg| {
        let tx = tx.clone();
        Box::pin(async move {
            let (done, wait) = oneshot::channel();
            if tx.send(Item { msg, done }).is_err() {
                return Outcome::Retry;
            }
            wait.await.unwrap_or(Outcome::Retry)
        })
    })
}

async fn batcher(
    slot: Arc<PipelineSlot>,
    cfg: BulkSubscribe,
    mut rx: mpsc::UnboundedReceiver<Item>,
) {
    let max = cfg.max_messages.max(1);
    let wait = Duration::from_millis(cfg.max_await_ms.max(1));
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + wait;
        while batch.len() < max {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(item) => batch.push(item),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        // a batch goes through the pipeline current when it is complete
        process(&slot.current(), batch).await;
    }
}

/// One message of a batch, decoded and routed.
struct Ready {
    item: Item,
    metadata: BTreeMap<String, String>,
    out: BulkEntryOut,
    span: crate::trace::ActiveSpan,
}

async fn process(p: &Arc<SubscriptionPipeline>, batch: Vec<Item>) {
    let _guards: Vec<_> = batch.iter().map(|_| p.in_flight_guard()).collect();
    let ready = prepare(p, batch).await;
    // One request per route path.
    let mut groups: BTreeMap<String, Vec<BulkEntryOut>> = BTreeMap::new();
    for r in &ready {
        groups
            .entry(r.out.delivery.path.clone())
            .or_default()
            .push(r.out.clone());
    }
    let mut results = HashMap::new();
    for (path, entries) in groups {
        let first = &entries[0].delivery;
        let batch = BulkDelivery {
            id: crate::trace::random_uuid(),
            path,
            topic: first.topic.clone(),
            pubsub: first.pubsub.clone(),
            metadata: [("pubsubName".to_string(), first.pubsub.clone())]
                .into_iter()
                .collect(),
            entries,
        };
        let topic = batch.topic.clone();
        let started = std::time::Instant::now();
        let replies = deliver(p, batch).await;
        record_bulk(p, &topic, &replies, started.elapsed());
        results.extend(replies);
    }
    for r in ready {
        let reply = results
            .remove(&r.out.entry_id)
            .unwrap_or_else(|| Err(AttemptError::new("no result")));
        let error = r
            .span
            .is_recorded()
            .then(|| reply.as_ref().err().map(|e| e.message.clone()))
            .flatten();
        let outcome = p.settle(&r.item.msg, &r.metadata, reply).await;
        p.end_span(r.span, &r.out.delivery.topic, outcome, error);
        let _ = r.item.done.send(outcome);
    }
}

/// Counts one bulk request's entries by the app's final answer.
fn record_bulk(
    p: &SubscriptionPipeline,
    topic: &str,
    replies: &HashMap<String, Result<AppReply, AttemptError>>,
    elapsed: Duration,
) {
    let mut counts = [
        (ProcessStatus::Success, 0u64),
        (ProcessStatus::Retry, 0),
        (ProcessStatus::Drop, 0),
    ];
    for r in replies.values() {
        let status = match r {
            Ok(reply) => process_status(reply),
            Err(_) => ProcessStatus::Retry,
        };
        if let Some(c) = counts.iter_mut().find(|(s, _)| *s == status) {
            c.1 += 1;
        }
    }
    p.metrics
        .bulk_pubsub_ingress(&p.entry.name, topic, &counts, elapsed);
}

/// Decodes and routes each message; one that cannot be delivered is settled here.
async fn prepare(p: &SubscriptionPipeline, batch: Vec<Item>) -> Vec<Ready> {
    let raw = p.is_raw();
    let mut ready = Vec::with_capacity(batch.len());
    for item in batch {
        let (delivery, metadata, span) = match p.prepare(&item.msg).await {
            Ok(prepared) => prepared,
            Err(outcome) => {
                let _ = item.done.send(outcome);
                continue;
            }
        };
        let (event, content_type, raw_bytes) = if raw {
            (
                Json::String(base64::engine::general_purpose::STANDARD.encode(&item.msg.data)),
                "application/octet-stream".to_string(),
                Some(item.msg.data.clone()),
            )
        } else {
            (
                Json::Object(delivery.event.clone()),
                "application/cloudevents+json".to_string(),
                None,
            )
        };
        let out = BulkEntryOut {
            entry_id: crate::trace::random_uuid(),
            event,
            content_type,
            raw: raw_bytes,
            delivery,
        };
        ready.push(Ready {
            item,
            metadata,
            out,
            span,
        });
    }
    ready
}

/// What the attempts at one bulk request have settled so far.
struct Attempts {
    /// The entries still to deliver (the app asked to retry them, or not yet tried).
    pending: BulkDelivery,
    /// Final answers per entry id.
    settled: HashMap<String, AppReply>,
    /// The latest retry reason per entry id, for entries that end unsettled.
    retries: HashMap<String, AttemptError>,
}

impl Attempts {
    /// Takes the app's answers to `sent`: settled entries leave `pending`; an error when
    /// some must be tried again (the first such entry's reason).
    fn absorb(&mut self, sent: &BulkDelivery, replies: &BulkReply) -> Result<(), AttemptError> {
        let mut retry = Vec::new();
        for e in &sent.entries {
            match replies.get(&e.entry_id).cloned().unwrap_or(AppReply::Retry(
                "entry missing from the app's statuses".into(),
                None,
            )) {
                AppReply::Retry(reason, code) => {
                    self.retries.insert(
                        e.entry_id.clone(),
                        AttemptError::new(reason).with_code(code),
                    );
                    retry.push(e.entry_id.as_str());
                }
                other => {
                    self.settled.insert(e.entry_id.clone(), other);
                }
            }
        }
        self.pending
            .entries
            .retain(|e| retry.contains(&e.entry_id.as_str()));
        match self.pending.entries.first() {
            None => Ok(()),
            Some(first) => Err(self
                .retries
                .get(&first.entry_id)
                .cloned()
                .unwrap_or_else(|| AttemptError::new("retry"))),
        }
    }
}

/// Delivers one bulk request under the inbound policy: entries the app asks to retry are
/// retried on their own. Returns each entry's final answer, or why it stayed unsettled.
async fn deliver(
    p: &SubscriptionPipeline,
    batch: BulkDelivery,
) -> HashMap<String, Result<AppReply, AttemptError>> {
    let attempts = Mutex::new(Attempts {
        pending: batch,
        settled: HashMap::new(),
        retries: HashMap::new(),
    });
    let lock = || attempts.lock().unwrap_or_else(PoisonError::into_inner);
    let _ = p
        .policy
        .run(|| async {
            let sent = lock().pending.clone();
            let replies = p.channel.deliver_bulk(&sent).await;
            lock().absorb(&sent, &replies)
        })
        .await;
    let Attempts {
        settled, retries, ..
    } = attempts
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    let mut results: HashMap<_, _> = settled.into_iter().map(|(id, r)| (id, Ok(r))).collect();
    for (id, err) in retries {
        results.entry(id).or_insert(Err(err));
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::channel::Delivery;
    use crate::resiliency::StatusCode;

    fn entry(id: &str) -> BulkEntryOut {
        BulkEntryOut {
            entry_id: id.into(),
            event: Json::Null,
            content_type: "application/cloudevents+json".into(),
            raw: None,
            delivery: Delivery {
                path: "/p".into(),
                body: bytes::Bytes::new(),
                event: serde_json::Map::new(),
                metadata: BTreeMap::new(),
                topic: "t".into(),
                pubsub: "ps".into(),
                traceparent: String::new(),
                tracestate: String::new(),
            },
        }
    }

    #[test]
    fn only_the_entries_to_retry_stay_pending() {
        let batch = BulkDelivery {
            id: "b".into(),
            path: "/p".into(),
            topic: "t".into(),
            pubsub: "ps".into(),
            metadata: BTreeMap::new(),
            entries: vec![entry("ok"), entry("again"), entry("drop"), entry("missing")],
        };
        let mut attempts = Attempts {
            pending: batch.clone(),
            settled: HashMap::new(),
            retries: HashMap::new(),
        };
        let replies: BulkReply = [
            ("ok".to_string(), AppReply::Success),
            (
                "again".to_string(),
                AppReply::Retry("busy".into(), Some(StatusCode::Http(503))),
            ),
            (
                "drop".to_string(),
                AppReply::Drop {
                    dead_letter: true,
                    reason: "no".into(),
                },
            ),
        ]
        .into_iter()
        .collect();
        let err = attempts.absorb(&batch, &replies).unwrap_err();
        assert_eq!(err.message, "busy");
        assert_eq!(err.code, Some(StatusCode::Http(503)));
        let pending: Vec<&str> = attempts
            .pending
            .entries
            .iter()
            .map(|e| e.entry_id.as_str())
            .collect();
        assert_eq!(
            pending,
            ["again", "missing"],
            "an entry without a status is retried"
        );
        assert_eq!(attempts.settled.len(), 2);
        // the second attempt sends only what is pending; both succeed
        let sent = attempts.pending.clone();
        let replies: BulkReply = ["again", "missing"]
            .into_iter()
            .map(|id| (id.to_string(), AppReply::Success))
            .collect();
        assert!(attempts.absorb(&sent, &replies).is_ok());
        assert!(attempts.pending.entries.is_empty());
        assert_eq!(attempts.settled.len(), 4);
    }
}
