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

use crate::channel::{AppReply, Delivery};
use crate::delivery::SubscriptionPipeline;
use crate::resiliency::AttemptError;
use crate::subscriptions::BulkSubscribe;

/// One entry of a bulk delivery.
#[derive(Debug, Clone)]
pub struct BulkEntryOut {
    /// Generated entry id.
    pub entry_id: String,
    /// The event: the CloudEvent object, or for raw subscriptions the base64 payload.
    pub event: Json,
    /// `application/cloudevents+json`, or `application/octet-stream` for raw.
    pub content_type: String,
    /// Raw payload bytes (raw subscriptions).
    pub raw: Option<bytes::Bytes>,
    /// The single-event view (for the gRPC CloudEvent mapping).
    pub delivery: Delivery,
}

/// A batch for one route path.
#[derive(Debug, Clone)]
pub struct BulkDelivery {
    /// Batch id.
    pub id: String,
    /// Route path.
    pub path: String,
    /// Topic.
    pub topic: String,
    /// Component name.
    pub pubsub: String,
    /// Batch metadata.
    pub metadata: BTreeMap<String, String>,
    /// Entries.
    pub entries: Vec<BulkEntryOut>,
}

/// Per-entry answers of the app; an entry missing from the map is a retry.
pub type BulkReply = HashMap<String, AppReply>;

/// What Go daprd makes of an app's 2xx answer to a bulk delivery (per-entry statuses).
pub fn interpret_bulk_body(body: &[u8]) -> Result<BulkReply, String> {
    let v: Json =
        serde_json::from_slice(body).map_err(|e| format!("invalid bulk response: {e}"))?;
    let Json::Object(obj) = v else {
        return Err("invalid bulk response: not an object".into());
    };
    let find = |o: &serde_json::Map<String, Json>, k: &str| {
        o.iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    let mut out = HashMap::new();
    if let Some(Json::Array(statuses)) = find(&obj, "statuses") {
        for s in statuses {
            let Json::Object(so) = s else { continue };
            let Some(Json::String(id)) = find(&so, "entryId") else {
                continue;
            };
            let reply = match find(&so, "status") {
                Some(Json::String(st)) if st == "SUCCESS" => AppReply::Success,
                Some(Json::String(st)) if st == "DROP" => AppReply::Drop {
                    dead_letter: true,
                    reason: "app dropped the entry".into(),
                },
                other => AppReply::Retry(format!("entry status {other:?}"), None),
            };
            out.insert(id, reply);
        }
    }
    Ok(out)
}

/// Replies for every entry of `b`.
pub fn all(b: &BulkDelivery, reply: &AppReply) -> BulkReply {
    b.entries
        .iter()
        .map(|e| (e.entry_id.clone(), reply.clone()))
        .collect()
}

/// The HTTP bulk request body.
pub fn http_body(b: &BulkDelivery) -> Json {
    let entries: Vec<Json> = b
        .entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "entryId": e.entry_id,
                "event": e.event,
                "metadata": e.delivery.metadata,
                "contentType": e.content_type,
            })
        })
        .collect();
    serde_json::json!({
        "id": b.id,
        "type": daprd_core::cloudevent::DEFAULT_BULK_TYPE,
        "topic": b.topic,
        "pubsubname": b.pubsub,
        "metadata": b.metadata,
        "entries": entries,
    })
}

struct Item {
    msg: Message,
    done: oneshot::Sender<Outcome>,
}

/// The component handler for a bulk subscription: queues each message for the batcher and
/// waits for its entry's result.
pub fn handler(pipeline: Arc<SubscriptionPipeline>, cfg: BulkSubscribe) -> Handler {
    let (tx, rx) = mpsc::unbounded_channel::<Item>();
    tokio::spawn(batcher(pipeline, cfg, rx));
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
    pipeline: Arc<SubscriptionPipeline>,
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
        process(&pipeline, batch).await;
    }
}

async fn process(p: &Arc<SubscriptionPipeline>, batch: Vec<Item>) {
    let _guards: Vec<_> = batch.iter().map(|_| p.in_flight_guard()).collect();
    let raw = p.is_raw();
    // entry id → (item, metadata, path)
    let mut ready: Vec<(String, Item, BTreeMap<String, String>, BulkEntryOut)> = Vec::new();
    for item in batch {
        match p.prepare(&item.msg).await {
            Err(outcome) => {
                let _ = item.done.send(outcome);
            }
            Ok((delivery, md)) => {
                let entry_id = crate::trace::random_uuid();
                let (event, content_type, raw_bytes) = if raw {
                    (
                        Json::String(
                            base64::engine::general_purpose::STANDARD.encode(&item.msg.data),
                        ),
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
                    entry_id: entry_id.clone(),
                    event,
                    content_type,
                    raw: raw_bytes,
                    delivery,
                };
                ready.push((entry_id, item, md, out));
            }
        }
    }
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, (_, _, _, out)) in ready.iter().enumerate() {
        groups.entry(out.delivery.path.clone()).or_default().push(i);
    }
    let mut results: HashMap<String, Result<AppReply, AttemptError>> = HashMap::new();
    for (path, indexes) in groups {
        let first = &ready[indexes[0]].3.delivery;
        let batch = BulkDelivery {
            id: crate::trace::random_uuid(),
            path,
            topic: first.topic.clone(),
            pubsub: first.pubsub.clone(),
            metadata: [("pubsubName".to_string(), first.pubsub.clone())]
                .into_iter()
                .collect(),
            entries: indexes.iter().map(|i| ready[*i].3.clone()).collect(),
        };
        // Entries the app asks to retry are retried (per the inbound policy) on their own.
        let pending = Mutex::new(batch);
        let settled: Mutex<HashMap<String, AppReply>> = Mutex::default();
        let last_retry: Mutex<HashMap<String, AttemptError>> = Mutex::default();
        let _ = p
            .policy
            .run(|| async {
                let current = pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                let replies = p.channel.deliver_bulk(&current).await;
                let mut retry = Vec::new();
                for e in &current.entries {
                    match replies.get(&e.entry_id).cloned().unwrap_or(AppReply::Retry(
                        "entry missing from the app's statuses".into(),
                        None,
                    )) {
                        AppReply::Retry(reason, code) => {
                            last_retry
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(
                                    e.entry_id.clone(),
                                    AttemptError {
                                        message: reason.clone(),
                                        code,
                                    },
                                );
                            retry.push(e.entry_id.clone());
                        }
                        other => {
                            settled
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(e.entry_id.clone(), other);
                        }
                    }
                }
                let mut pend = pending.lock().unwrap_or_else(PoisonError::into_inner);
                pend.entries.retain(|e| retry.contains(&e.entry_id));
                if pend.entries.is_empty() {
                    Ok(())
                } else {
                    let first = last_retry
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .get(&pend.entries[0].entry_id)
                        .cloned();
                    Err(first.unwrap_or(AttemptError {
                        message: "retry".into(),
                        code: None,
                    }))
                }
            })
            .await;
        for (id, reply) in settled.into_inner().unwrap_or_else(PoisonError::into_inner) {
            results.insert(id, Ok(reply));
        }
        for (id, err) in last_retry
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
        {
            results.entry(id).or_insert(Err(err));
        }
    }
    for (entry_id, item, md, _) in ready {
        let reply = results.remove(&entry_id).unwrap_or(Err(AttemptError {
            message: "no result".into(),
            code: None,
        }));
        let outcome = p.settle(&item.msg, &md, reply).await;
        let _ = item.done.send(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_statuses_table() {
        let r = interpret_bulk_body(br#"{"statuses":[{"entryId":"a","status":"SUCCESS"},{"entryId":"b","status":"DROP"},{"entryId":"c","status":"RETRY"},{"entryId":"d","status":""},{"EntryID":"e","Status":"SUCCESS"}]}"#).unwrap();
        assert_eq!(r["a"], AppReply::Success);
        assert!(matches!(
            r["b"],
            AppReply::Drop {
                dead_letter: true,
                ..
            }
        ));
        assert!(matches!(r["c"], AppReply::Retry(..)));
        assert!(
            matches!(r["d"], AppReply::Retry(..)),
            "empty status is a retry in bulk"
        );
        assert_eq!(r["e"], AppReply::Success, "keys match case-insensitively");
        assert!(!r.contains_key("f"));
        assert!(interpret_bulk_body(b"nope").is_err());
    }
}
