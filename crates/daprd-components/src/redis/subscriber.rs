//! The Redis Streams consume loop: reader, workers and the reclaim loop of one subscription.
//!
//! Entries this subscription holds (queued for a worker or in the app's hands) are in
//! [`Context::holding`]: the reclaim loop never takes them back, and a refresher resets their
//! idle time on the broker (`XCLAIM ... JUSTID`, which does not count a delivery) well within
//! `processingTimeout`, so another sidecar of the same consumer group takes one over only
//! when its holder is really gone. A slow handler never gets its own message a second time.
//!
//! On stop, workers take no new entry, finish the one in hand including its `XACK`, and
//! only then drop their [`DrainGuard`]; queued entries stay pending and are reclaimed later.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use daprd_core::pubsub::{DrainGuard, Handler, Message, Outcome};
use redis::{RedisError, Value};
use tokio::sync::mpsc;

use super::metadata::RedisMetadata;

pub(super) struct Context {
    pub component: String,
    pub md: Arc<RedisMetadata>,
    pub source: super::conn::Source,
    pub conn: super::conn::Conn,
    pub topic: String,
    pub handler: Handler,
    /// Ids read or claimed by this subscription and not yet acked or given up.
    pub holding: std::sync::Mutex<HashSet<String>>,
}

impl Context {
    fn holding(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.holding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records `id` as held; false when it already was (a second copy must not be queued).
    fn hold(&self, id: &str) -> bool {
        self.holding().insert(id.to_string())
    }

    fn release(&self, id: &str) {
        self.holding().remove(id);
    }
}

/// `XGROUP CREATE <topic> <group> 0 MKSTREAM`, ignoring BUSYGROUP.
pub(super) async fn create_group(
    conn: &mut super::conn::Conn,
    topic: &str,
    group: &str,
) -> Result<(), RedisError> {
    let res: Result<String, RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(topic)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match res {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e),
    }
}

/// A stream reply from Redis that does not have the shape of `XREADGROUP` or `XCLAIM`.
#[derive(Debug, thiserror::Error)]
#[error("unexpected {0} in a redis stream reply")]
pub(super) struct ReplyShape(&'static str);

/// The entries of an `XREADGROUP` reply (nil when the read timed out): per stream, as an
/// array of `[key, entries]` (RESP2) or a map of key to entries (RESP3). Taken apart by
/// value, so the entries' field bytes move into the messages instead of being copied.
fn read_entries(reply: Value) -> Result<Vec<Value>, ReplyShape> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Array(mut kv) if kv.len() == 2 => Ok(kv.swap_remove(1)),
                _ => Err(ReplyShape("stream item")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(ReplyShape("read reply")),
    };
    let mut entries = Vec::new();
    for stream in streams {
        match stream {
            Value::Array(items) => entries.extend(items),
            Value::Nil => {}
            _ => return Err(ReplyShape("entry list")),
        }
    }
    Ok(entries)
}

/// The id and message of one stream entry, `[id, [field, value, ...]]`: read new
/// (`redelivered` false) or claimed from the pending list (true). `None` for an entry
/// deleted from the stream while pending (its fields are nil).
fn entry_message(
    topic: &str,
    entry: Value,
    redelivered: bool,
) -> Result<Option<(String, Message)>, ReplyShape> {
    let Value::Array(parts) = entry else {
        return Err(ReplyShape("entry"));
    };
    let mut parts = parts.into_iter();
    let id = match parts.next() {
        Some(Value::BulkString(b)) => String::from_utf8(b).map_err(|_| ReplyShape("entry id"))?,
        Some(Value::SimpleString(s)) => s,
        _ => return Err(ReplyShape("entry id")),
    };
    let fields = match parts.next() {
        Some(Value::Array(f)) => f,
        Some(Value::Map(pairs)) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        Some(Value::Nil) | None => return Ok(None),
        _ => return Err(ReplyShape("entry fields")),
    };
    let (mut data, mut metadata) = (Vec::new(), BTreeMap::new());
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        let value = match value {
            Value::BulkString(b) => b,
            Value::SimpleString(s) => s.into_bytes(),
            _ => continue,
        };
        match name {
            Value::BulkString(n) if n == b"data" => data = value,
            Value::BulkString(n) if n == b"metadata" => {
                metadata = serde_json::from_slice(&value).unwrap_or_default();
            }
            _ => {}
        }
    }
    let message = Message {
        topic: topic.to_string(),
        data: Bytes::from(data),
        metadata,
        content_type: None,
        redelivered,
    };
    Ok(Some((id, message)))
}

/// Starts the tasks of one subscription; they end once `stop_rx` turns true (workers after
/// settling the entry in hand), and each holds a clone of `guard` until then. The reader and
/// the reclaim loop also end once `fetch_rx` turns true (a quiesce), the reader after the
/// read in flight (cancelling it would leave what Redis just handed this consumer pending
/// until a reclaim): the workers then deliver what is queued. Returns a sender of the queue
/// and the number of those two still running, to tell when nothing more can arrive.
pub(super) fn start(
    ctx: Context,
    stop_rx: tokio::sync::watch::Receiver<bool>,
    fetch_rx: tokio::sync::watch::Receiver<bool>,
    guard: DrainGuard,
) -> (
    mpsc::Sender<(String, Message)>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let ctx = Arc::new(ctx);
    let (tx, rx) = mpsc::channel::<(String, Message)>(ctx.md.queue_depth);
    // for the caller to measure the queue (the workers end at the stop, not when the
    // reader's and the reclaim loop's senders go)
    let queued = tx.clone();
    let fetching = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    for _ in 0..ctx.md.concurrency {
        tokio::spawn(worker(
            ctx.clone(),
            rx.clone(),
            stop_rx.clone(),
            guard.clone(),
        ));
    }
    let reader_fetching = Fetching::new(&fetching);
    tokio::spawn(reader(
        ctx.clone(),
        tx.clone(),
        Flags {
            fetch: fetch_rx.clone(),
            stop: stop_rx.clone(),
        },
        (guard.clone(), reader_fetching),
    ));
    if !ctx.md.processing_timeout.is_zero() && !ctx.md.redeliver_interval.is_zero() {
        let reclaim_fetching = Fetching::new(&fetching);
        tokio::spawn(refresher(ctx.clone(), stop_rx));
        tokio::spawn(reclaimer(ctx, tx, fetch_rx, (guard, reclaim_fetching)));
    }
    (queued, fetching)
}

/// Counts a task that may still put entries in the queue; uncounts it when dropped.
struct Fetching(Arc<std::sync::atomic::AtomicUsize>);

impl Fetching {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for Fetching {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The reader's two flags: `fetch` (no new read; set by a quiesce and by a stop) and `stop`
/// (also give up the read in flight).
struct Flags {
    fetch: tokio::sync::watch::Receiver<bool>,
    stop: tokio::sync::watch::Receiver<bool>,
}

async fn worker(
    ctx: Arc<Context>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<(String, Message)>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    _guard: DrainGuard,
) {
    loop {
        let next = {
            let mut rx = rx.lock().await;
            // A stop wins over a queued entry: no new delivery starts after it.
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => None,
                m = rx.recv() => m,
            }
        };
        let Some((id, msg)) = next else { return };
        if *stop.borrow() {
            return;
        }
        let outcome = (ctx.handler)(msg).await;
        match outcome {
            Outcome::Success | Outcome::Drop => {
                let mut conn = ctx.conn.clone();
                let acked: Result<i64, RedisError> = redis::cmd("XACK")
                    .arg(&ctx.topic)
                    .arg(&ctx.md.consumer_id)
                    .arg(&id)
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = acked {
                    tracing::error!(component = %ctx.component, topic = %ctx.topic, %id, error = %e, "XACK failed; the message will be redelivered");
                }
            }
            Outcome::Retry => {
                tracing::debug!(component = %ctx.component, topic = %ctx.topic, %id, "message left pending for redelivery");
            }
        }
        ctx.release(&id);
    }
}

/// Keeps the entries this subscription holds fresh on the broker: resets their idle time
/// (`XCLAIM <min-idle 0> ... JUSTID`, no delivery counted) a few times per
/// `processingTimeout`, so no other consumer's reclaim loop takes them over.
async fn refresher(ctx: Arc<Context>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let period = (ctx.md.processing_timeout / 3).max(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let ids: Vec<String> = ctx.holding().iter().cloned().collect();
        for chunk in ids.chunks(1000) {
            let mut conn = ctx.conn.clone();
            let refreshed: Result<Value, RedisError> = redis::cmd("XCLAIM")
                .arg(&ctx.topic)
                .arg(&ctx.md.consumer_id)
                .arg(&ctx.md.consumer_id)
                .arg(0)
                .arg(chunk)
                .arg("JUSTID")
                .query_async(&mut conn)
                .await;
            if let Err(e) = refreshed {
                tracing::warn!(component = %ctx.component, topic = %ctx.topic, error = %e, "refreshing held entries failed");
            }
        }
    }
}

async fn reader(
    ctx: Arc<Context>,
    tx: mpsc::Sender<(String, Message)>,
    flags: Flags,
    _held: (DrainGuard, Fetching),
) {
    let Flags {
        fetch: mut stop,
        stop: mut hard_stop,
    } = flags;
    let block_ms = u64::try_from(ctx.md.read_timeout.as_millis())
        .unwrap_or(3000)
        .max(1);
    let mut conn: Option<super::conn::Conn> = None;
    // the reader connection's CLIENT ID, to end its blocking read at a quiesce
    let mut client_id: Option<i64> = None;
    let mut backoff = daprd_core::backoff::RECONNECT;
    loop {
        if *stop.borrow() {
            return;
        }
        let c = match &mut conn {
            Some(c) => c,
            None => match ctx.source.dedicated(&ctx.md).await {
                Ok(mut c) => {
                    backoff.reset();
                    client_id = redis::cmd("CLIENT")
                        .arg("ID")
                        .query_async(&mut c)
                        .await
                        .ok();
                    conn.insert(c)
                }
                Err(e) => {
                    tracing::warn!(component = %ctx.component, error = %e, "redis reader cannot connect; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_pause()) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    continue;
                }
            },
        };
        let cmd = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&ctx.md.consumer_id)
            .arg(&ctx.md.consumer_id)
            .arg("COUNT")
            .arg(ctx.md.queue_depth)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&ctx.topic)
            .arg(">")
            .to_owned();
        // Only a stop gives up the read in flight. A quiesce lets it complete, and what it
        // brings is queued and delivered; a read still blocked then is ended at once with
        // `CLIENT UNBLOCK` (as a timeout: nothing handed over), so a quiet stream does not hold
        // the quiesce for the whole BLOCK time.
        let read: Result<Value, RedisError> = {
            let read_in_flight = cmd.query_async(c);
            tokio::pin!(read_in_flight);
            let mut unblocked = false;
            loop {
                tokio::select! {
                    r = &mut read_in_flight => break r,
                    () = async { let _ = hard_stop.wait_for(|s| *s).await; } => return,
                    () = async { let _ = stop.wait_for(|s| *s).await; }, if !unblocked => {
                        unblocked = true;
                        if let Some(id) = client_id {
                            let _: Result<i64, RedisError> = redis::cmd("CLIENT")
                                .arg("UNBLOCK")
                                .arg(id)
                                .query_async(&mut ctx.conn.clone())
                                .await;
                        }
                    }
                }
            }
        };
        match read {
            Ok(reply) => {
                let entries = read_entries(reply).unwrap_or_else(|e| {
                    // left pending: the reclaim loop takes them over after processingTimeout
                    tracing::warn!(component = %ctx.component, topic = %ctx.topic, error = %e, "unreadable XREADGROUP reply");
                    Vec::new()
                });
                for entry in entries {
                    match entry_message(&ctx.topic, entry, false) {
                        Ok(Some((id, msg))) => {
                            ctx.hold(&id);
                            if tx.send((id, msg)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(component = %ctx.component, topic = %ctx.topic, error = %e, "unreadable stream entry")
                        }
                    }
                }
            }
            Err(e) => {
                if e.code() == Some("NOGROUP") {
                    tracing::warn!(component = %ctx.component, topic = %ctx.topic, "consumer group missing; recreating it");
                    let _ =
                        create_group(&mut ctx.conn.clone(), &ctx.topic, &ctx.md.consumer_id).await;
                } else {
                    tracing::warn!(component = %ctx.component, topic = %ctx.topic, error = %e, "error reading from stream; reconnecting");
                    conn = None;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_pause()) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

async fn reclaimer(
    ctx: Arc<Context>,
    tx: mpsc::Sender<(String, Message)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    _held: (DrainGuard, Fetching),
) {
    loop {
        reclaim_once(&ctx, &tx).await;
        tokio::select! {
            _ = tokio::time::sleep(ctx.md.redeliver_interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One pass: `XPENDING` → entries idle ≥ processingTimeout → `XCLAIM` → redeliver; ids that
/// no longer exist in the stream are acked away.
async fn reclaim_once(ctx: &Context, tx: &mpsc::Sender<(String, Message)>) {
    let mut conn = ctx.conn.clone();
    let min_idle = u64::try_from(ctx.md.processing_timeout.as_millis()).unwrap_or(u64::MAX);
    let pending: Result<Vec<(String, String, u64, u64)>, RedisError> = redis::cmd("XPENDING")
        .arg(&ctx.topic)
        .arg(&ctx.md.consumer_id)
        .arg("IDLE")
        .arg(min_idle)
        .arg("-")
        .arg("+")
        .arg(ctx.md.queue_depth)
        .query_async(&mut conn)
        .await;
    // Entries this subscription holds are not idle, whatever the broker's clock says.
    let ids: Vec<String> = match pending {
        Ok(p) => {
            let holding = ctx.holding();
            p.into_iter()
                .map(|(id, _, _, _)| id)
                .filter(|id| !holding.contains(id))
                .collect()
        }
        Err(e) => {
            tracing::warn!(component = %ctx.component, topic = %ctx.topic, error = %e, "XPENDING failed");
            return;
        }
    };
    if ids.is_empty() {
        return;
    }
    let claimed: Result<Value, RedisError> = redis::cmd("XCLAIM")
        .arg(&ctx.topic)
        .arg(&ctx.md.consumer_id)
        .arg(&ctx.md.consumer_id)
        .arg(min_idle)
        .arg(&ids)
        .query_async(&mut conn)
        .await;
    match claimed {
        Ok(reply) => {
            let entries = match reply {
                Value::Array(entries) => entries,
                Value::Nil => Vec::new(),
                _ => {
                    tracing::warn!(component = %ctx.component, topic = %ctx.topic, error = %ReplyShape("claim reply"), "unreadable XCLAIM reply");
                    return;
                }
            };
            let mut claimed = Vec::with_capacity(entries.len());
            for entry in entries {
                match entry_message(&ctx.topic, entry, true) {
                    Ok(Some(m)) => claimed.push(m),
                    // deleted while pending (nil fields; Redis 7 leaves it out instead)
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(component = %ctx.component, topic = %ctx.topic, error = %e, "unreadable claimed entry");
                        return;
                    }
                }
            }
            let found: HashSet<&str> = claimed.iter().map(|(id, _)| id.as_str()).collect();
            for gone in ids.iter().filter(|id| !found.contains(id.as_str())) {
                let _: Result<i64, RedisError> = redis::cmd("XACK")
                    .arg(&ctx.topic)
                    .arg(&ctx.md.consumer_id)
                    .arg(gone)
                    .query_async(&mut conn)
                    .await;
            }
            for (id, msg) in claimed {
                if !ctx.hold(&id) {
                    // Read again by this subscription since the XPENDING: already queued.
                    continue;
                }
                tracing::debug!(component = %ctx.component, topic = %ctx.topic, %id, "redelivering a pending message");
                if tx.send((id, msg)).await.is_err() {
                    return;
                }
            }
        }
        Err(e) => {
            tracing::warn!(component = %ctx.component, topic = %ctx.topic, error = %e, "XCLAIM failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, data: &str) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(vec![
                bulk("data"),
                bulk(data),
                bulk("metadata"),
                bulk(r#"{"traceparent":"00-ab"}"#),
            ]),
        ])
    }

    fn messages(entries: Vec<Value>) -> Vec<(String, Message)> {
        entries
            .into_iter()
            .filter_map(|e| entry_message("orders", e, false).unwrap())
            .collect()
    }

    #[test]
    fn resp2_and_resp3_read_replies_give_the_same_messages() {
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("orders"),
            Value::Array(vec![entry("1-0", "a"), entry("2-0", "b")]),
        ])]);
        let resp3 = Value::Map(vec![(
            bulk("orders"),
            Value::Array(vec![entry("1-0", "a"), entry("2-0", "b")]),
        )]);
        for reply in [resp2, resp3] {
            let got = messages(read_entries(reply).unwrap());
            let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
            assert_eq!(ids, ["1-0", "2-0"]);
            assert_eq!(&got[1].1.data[..], b"b");
            assert_eq!(got[0].1.metadata["traceparent"], "00-ab");
            assert!(!got[0].1.redelivered);
        }
        assert!(read_entries(Value::Nil).unwrap().is_empty());
    }

    #[test]
    fn a_deleted_pending_entry_is_none_and_a_bad_shape_an_error() {
        let deleted = Value::Array(vec![bulk("3-0"), Value::Nil]);
        assert!(entry_message("orders", deleted, true).unwrap().is_none());
        let err = read_entries(Value::Int(3)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unexpected read reply in a redis stream reply"
        );
        assert!(entry_message("orders", Value::Array(vec![Value::Int(1)]), true).is_err());
        assert!(read_entries(Value::Array(vec![bulk("orders")])).is_err());
    }

    #[test]
    fn fields_other_than_data_and_metadata_are_ignored() {
        let e = Value::Array(vec![
            bulk("4-0"),
            Value::Array(vec![bulk("x"), bulk("y"), bulk("data"), bulk("z")]),
        ]);
        let (id, msg) = entry_message("orders", e, true).unwrap().unwrap();
        assert_eq!((id.as_str(), &msg.data[..]), ("4-0", &b"z"[..]));
        assert!(msg.metadata.is_empty() && msg.redelivered);
    }
}
