//! The Redis Streams consume loop: reader, workers and the reclaim loop of one subscription.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use daprd_core::pubsub::{Handler, Message, Outcome};
use redis::streams::{StreamId, StreamReadReply};
use redis::{RedisError, Value};
use tokio::sync::mpsc;

use super::RedisMetadata;

pub(super) struct Context {
    pub component: String,
    pub md: Arc<RedisMetadata>,
    pub source: super::conn::Source,
    pub conn: super::conn::Conn,
    pub topic: String,
    pub handler: Handler,
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

fn to_message(topic: &str, entry: &StreamId) -> Message {
    let field = |name: &str| -> Option<Vec<u8>> {
        match entry.map.get(name)? {
            Value::BulkString(b) => Some(b.clone()),
            Value::SimpleString(s) => Some(s.clone().into_bytes()),
            _ => None,
        }
    };
    let metadata: BTreeMap<String, String> = field("metadata")
        .and_then(|m| serde_json::from_slice(&m).ok())
        .unwrap_or_default();
    Message {
        topic: topic.to_string(),
        data: Bytes::from(field("data").unwrap_or_default()),
        metadata,
        content_type: None,
    }
}

type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

pub(super) fn start(ctx: Context, stop: Stop) {
    let ctx = Arc::new(ctx);
    let (tx, rx) = mpsc::channel::<(String, Message)>(ctx.md.queue_depth);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stop.await;
        let _ = stop_tx.send(true);
    });
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    for _ in 0..ctx.md.concurrency {
        tokio::spawn(worker(ctx.clone(), rx.clone(), stop_rx.clone()));
    }
    tokio::spawn(reader(ctx.clone(), tx.clone(), stop_rx.clone()));
    if !ctx.md.processing_timeout.is_zero() && !ctx.md.redeliver_interval.is_zero() {
        tokio::spawn(reclaimer(ctx, tx, stop_rx));
    }
}

async fn worker(
    ctx: Arc<Context>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<(String, Message)>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let next = {
            let mut rx = rx.lock().await;
            tokio::select! {
                m = rx.recv() => m,
                _ = stop.wait_for(|s| *s) => None,
            }
        };
        let Some((id, msg)) = next else { return };
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
    }
}

async fn reader(
    ctx: Arc<Context>,
    tx: mpsc::Sender<(String, Message)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let block_ms = u64::try_from(ctx.md.read_timeout.as_millis())
        .unwrap_or(3000)
        .max(1);
    let mut conn: Option<super::conn::Conn> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        if *stop.borrow() {
            return;
        }
        let c = match &mut conn {
            Some(c) => c,
            None => match ctx.source.dedicated(&ctx.md).await {
                Ok(c) => {
                    backoff = Duration::from_millis(100);
                    conn.insert(c)
                }
                Err(e) => {
                    tracing::warn!(component = %ctx.component, error = %e, "redis reader cannot connect; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
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
        let read: Result<Option<StreamReadReply>, RedisError> = tokio::select! {
            r = cmd.query_async(c) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match read {
            Ok(Some(reply)) => {
                for key in reply.keys {
                    for entry in key.ids {
                        let msg = to_message(&ctx.topic, &entry);
                        if tx.send((entry.id.clone(), msg)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            Ok(None) => {}
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
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn reclaimer(
    ctx: Arc<Context>,
    tx: mpsc::Sender<(String, Message)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
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
    let ids: Vec<String> = match pending {
        Ok(p) => p.into_iter().map(|(id, _, _, _)| id).collect(),
        Err(e) => {
            tracing::warn!(component = %ctx.component, topic = %ctx.topic, error = %e, "XPENDING failed");
            return;
        }
    };
    if ids.is_empty() {
        return;
    }
    let claimed: Result<redis::streams::StreamClaimReply, RedisError> = redis::cmd("XCLAIM")
        .arg(&ctx.topic)
        .arg(&ctx.md.consumer_id)
        .arg(&ctx.md.consumer_id)
        .arg(min_idle)
        .arg(&ids)
        .query_async(&mut conn)
        .await;
    match claimed {
        Ok(reply) => {
            let found: std::collections::HashSet<&str> =
                reply.ids.iter().map(|e| e.id.as_str()).collect();
            for gone in ids.iter().filter(|id| !found.contains(id.as_str())) {
                let _: Result<i64, RedisError> = redis::cmd("XACK")
                    .arg(&ctx.topic)
                    .arg(&ctx.md.consumer_id)
                    .arg(gone)
                    .query_async(&mut conn)
                    .await;
            }
            for entry in &reply.ids {
                tracing::debug!(component = %ctx.component, topic = %ctx.topic, id = %entry.id, "redelivering a pending message");
                if tx
                    .send((entry.id.clone(), to_message(&ctx.topic, entry)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        Err(e) => {
            tracing::warn!(component = %ctx.component, topic = %ctx.topic, error = %e, "XCLAIM failed")
        }
    }
}
