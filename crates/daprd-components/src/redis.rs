//! `pubsub.redis`: Redis Streams, with the same keys and bytes as Dapr's component.
//!
//! * Publish: `XADD <topic> [MAXLEN ~ n] [MINID ~ t] * data <bytes> metadata <json>`.
//! * Subscribe: consumer group and consumer name = `consumerID` (`XGROUP CREATE <topic>
//!   <consumerID> 0 MKSTREAM`), `XREADGROUP ... COUNT queueDepth BLOCK readTimeout`,
//!   `concurrency` workers, `XACK` after `Success` or `Drop`.
//! * A `Retry` leaves the message pending; the reclaim loop (`XPENDING` every
//!   `redeliverInterval`, `XCLAIM` of entries idle ≥ `processingTimeout`) redelivers it.
//!   (Dapr 1.17+ acks a failed message; daprd-rs keeps it for redelivery, so nothing the
//!   app did not accept is lost.)

mod conn;
mod metadata;
mod subscriber;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::pubsub::{
    BulkPublishRequest, ErrorKind, FailedEntry, Feature, Handler, PubSub, PubSubError,
    PubSubFactory, PublishRequest, SubscribeRequest, Subscription,
};

pub use metadata::RedisMetadata;

/// Builds `pubsub.redis` components.
pub struct RedisFactory;

#[async_trait]
impl PubSubFactory for RedisFactory {
    fn component_type(&self) -> &'static str {
        "pubsub.redis"
    }

    fn validate(&self, metadata: &Metadata) -> Vec<MetadataError> {
        RedisMetadata::parse(metadata).err().unwrap_or_default()
    }

    async fn connect(
        &self,
        name: &str,
        metadata: &Metadata,
    ) -> Result<Arc<dyn PubSub>, PubSubError> {
        let md = RedisMetadata::parse(metadata)?;
        let source = conn::Source::new(&md).map_err(|e| PubSubError::Connect {
            message: format!("invalid redis address {:?}", md.host),
            source: Some(Box::new(e)),
        })?;
        let conn = tokio::time::timeout(md.dial_timeout, source.shared(&md))
            .await
            .map_err(|_| PubSubError::Connect {
                message: format!("connecting to redis at {} timed out", md.host),
                source: None,
            })?
            .map_err(|e| PubSubError::Connect {
                message: format!("connecting to redis at {}", md.host),
                source: Some(Box::new(e)),
            })?;
        Ok(Arc::new(RedisPubSub {
            name: name.to_string(),
            md: Arc::new(md),
            source,
            conn,
            closed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            stop: tokio::sync::watch::channel(false).0,
        }))
    }
}

/// A live `pubsub.redis` component.
pub struct RedisPubSub {
    name: String,
    md: Arc<RedisMetadata>,
    source: conn::Source,
    conn: conn::Conn,
    closed: Arc<std::sync::atomic::AtomicBool>,
    stop: tokio::sync::watch::Sender<bool>,
}

/// The `XADD` command daprd-rs sends for a publish (exposed for the broker-bytes tests).
pub fn xadd_command(
    md: &RedisMetadata,
    topic: &str,
    data: &[u8],
    metadata: &BTreeMap<String, String>,
    now: SystemTime,
) -> Result<redis::Cmd, PubSubError> {
    let meta = serde_json::to_vec(metadata).map_err(|e| {
        PubSubError::broker(ErrorKind::Permanent, format!("encoding metadata: {e}"))
    })?;
    let mut cmd = redis::cmd("XADD");
    cmd.arg(topic);
    if let Some(n) = md.max_len_approx {
        cmd.arg("MAXLEN").arg("~").arg(n);
    }
    if let Some(ttl) = md.stream_ttl {
        let min = now.checked_sub(ttl).unwrap_or(SystemTime::UNIX_EPOCH);
        let ms = min
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        cmd.arg("MINID").arg("~").arg(format!("{ms}-1"));
    }
    cmd.arg("*").arg("data").arg(data).arg("metadata").arg(meta);
    Ok(cmd)
}

/// Bulk publish is native: one pipeline of `XADD`s, one round trip (the bytes per entry are
/// those of a single publish, as Dapr's default bulk publisher sends them).
const FEATURES: &[Feature] = &[Feature::BulkPublish];

/// Entries per pipeline of a bulk publish.
const BULK_PIPELINE: usize = 1000;

#[async_trait]
impl PubSub for RedisPubSub {
    fn features(&self) -> &[Feature] {
        FEATURES
    }

    async fn publish(&self, request: PublishRequest) -> Result<(), PubSubError> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(PubSubError::Closed);
        }
        let cmd = xadd_command(
            &self.md,
            &request.topic,
            &request.data,
            &request.metadata,
            SystemTime::now(),
        )?;
        let mut conn = self.conn.clone();
        let _: String = tokio::time::timeout(self.md.write_timeout, cmd.query_async(&mut conn))
            .await
            .map_err(|_| {
                PubSubError::broker(
                    ErrorKind::Transient,
                    "redis streams: error from publish: timed out",
                )
            })?
            .map_err(|e| PubSubError::transient("redis streams", "error from publish", e))?;
        Ok(())
    }

    async fn bulk_publish(
        &self,
        request: BulkPublishRequest,
    ) -> Result<Vec<FailedEntry>, PubSubError> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(PubSubError::Closed);
        }
        let now = SystemTime::now();
        let mut failed = Vec::new();
        let mut entries = request.entries.into_iter().peekable();
        // Pipelines of BULK_PIPELINE entries, one after the other: a 50,000-entry request
        // never holds 50,000 encoded commands and replies at once.
        while entries.peek().is_some() {
            let mut pipe = redis::pipe();
            let mut sent = Vec::with_capacity(BULK_PIPELINE);
            for entry in entries.by_ref().take(BULK_PIPELINE) {
                match xadd_command(&self.md, &request.topic, &entry.data, &entry.metadata, now) {
                    Ok(cmd) => {
                        pipe.add_command(cmd);
                        sent.push(entry.entry_id);
                    }
                    Err(e) => failed.push(FailedEntry {
                        entry_id: entry.entry_id,
                        error: e.to_string(),
                    }),
                }
            }
            if sent.is_empty() {
                continue;
            }
            let mut conn = self.conn.clone();
            let results: Result<Vec<redis::RedisResult<String>>, PubSubError> =
                match tokio::time::timeout(
                    self.md.write_timeout,
                    pipe.ignore_errors().query_async(&mut conn),
                )
                .await
                {
                    Err(_) => Err(PubSubError::broker(
                        ErrorKind::Transient,
                        "redis streams: error from bulk publish: timed out",
                    )),
                    Ok(r) => r.map_err(|e| {
                        PubSubError::transient("redis streams", "error from bulk publish", e)
                    }),
                };
            match results {
                Ok(results) => {
                    for (entry_id, result) in sent.into_iter().zip(results) {
                        if let Err(e) = result {
                            failed.push(FailedEntry {
                                entry_id,
                                error: format!("redis streams: error from publish: {e}"),
                            });
                        }
                    }
                }
                // A pipeline that failed as a whole fails its entries (and the ones after
                // it: the connection is gone); earlier pipelines stay published.
                Err(e) => {
                    let error = e.to_string();
                    failed.extend(
                        sent.into_iter()
                            .chain(entries.by_ref().map(|e| e.entry_id))
                            .map(|entry_id| FailedEntry {
                                entry_id,
                                error: error.clone(),
                            }),
                    );
                }
            }
        }
        Ok(failed)
    }

    async fn subscribe(
        &self,
        request: SubscribeRequest,
        handler: Handler,
    ) -> Result<Subscription, PubSubError> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(PubSubError::Closed);
        }
        subscriber::create_group(&mut self.conn.clone(), &request.topic, &self.md.consumer_id)
            .await
            .map_err(|e| PubSubError::transient("redis streams", "creating consumer group", e))?;
        // The subscription's own stop flag, set at once by its `stop` (so no worker takes a
        // new entry after it) or when the component closes.
        let (cancel, cancelled) = tokio::sync::watch::channel(false);
        let cancel = Arc::new(cancel);
        // Set with the stop, or alone by a quiesce: no more reads from the stream.
        let (fetch_stop, fetch_stopped) = tokio::sync::watch::channel(false);
        let fetch_stop = Arc::new(fetch_stop);
        let mut component_stop = self.stop.subscribe();
        let (on_close, fetch_on_close) = (cancel.clone(), fetch_stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = component_stop.wait_for(|s| *s) => {
                    let _ = fetch_on_close.send(true);
                    let _ = on_close.send(true);
                }
                _ = on_close.closed() => {}
            }
        });
        let (guard, drained) = daprd_core::pubsub::drain_tracker();
        let (queued, fetching) = subscriber::start(
            subscriber::Context {
                component: self.name.clone(),
                md: self.md.clone(),
                source: self.source.clone(),
                conn: self.conn.clone(),
                topic: request.topic,
                handler,
                holding: std::sync::Mutex::default(),
            },
            cancelled,
            fetch_stopped,
            guard,
        );
        let quiesce = fetch_stop.clone();
        Ok(Subscription::new(move || {
            let _ = fetch_stop.send(true);
            let _ = cancel.send(true);
        })
        .with_drain(drained)
        .with_quiesce(move || {
            let _ = quiesce.send(true);
        })
        // idle: nothing more can arrive (reader and reclaim loop done) and nothing is queued
        .with_idle(move || {
            fetching.load(std::sync::atomic::Ordering::Acquire) == 0
                && queued.capacity() == queued.max_capacity()
        }))
    }

    async fn close(&self) -> Result<(), PubSubError> {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        let _ = self.stop.send(true);
        Ok(())
    }
}
