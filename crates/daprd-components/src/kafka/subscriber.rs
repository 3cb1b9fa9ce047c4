//! The Kafka consume loop: one consumer per subscription in its group; each partition is handled
//! in order by a worker of its own (paused when its queue is full), an offset is stored only after
//! the app's answer, and a revocation lets the message in flight finish (as sarama does).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use daprd_core::gocompat::query_escape;
use daprd_core::pubsub::{Handler, Message, Outcome};
use rdkafka::consumer::{Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers, Message as _, OwnedMessage};
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::mpsc;

use super::metadata::KafkaMetadata;
use crate::stop::Stop;

/// Counts partition revocations, so queued messages of a revoked partition are not handled
/// (the partition's next owner reads them from the committed offset).
#[derive(Default)]
pub(super) struct RebalanceContext {
    pub(super) epochs: Arc<Mutex<HashMap<i32, u64>>>,
    /// Messages queued or in flight, per partition.
    pub(super) pending: Arc<Mutex<HashMap<i32, Arc<AtomicUsize>>>>,
    /// How long a revocation waits for the partition's message in flight (`sessionTimeout`).
    pub(super) drain_wait: Duration,
}

/// The client library's log lines and errors go to the sidecar's log (its defaults write to
/// the `log` crate, which the sidecar does not read).
impl ClientContext for RebalanceContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        super::producer::forward_log(level, facility, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", "kafka consumer: {error}: {reason}");
    }
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let revoked: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        {
            let mut epochs = self.epochs.lock().unwrap_or_else(|p| p.into_inner());
            for p in &revoked {
                *epochs.entry(*p).or_default() += 1;
            }
        }
        // Like sarama, let the message in flight finish (and its offset be stored, so the
        // commit before the revocation includes it) instead of having the partition's next
        // owner deliver it again; queued messages are skipped by the epoch bump above.
        let counters: Vec<Arc<AtomicUsize>> = {
            let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            revoked
                .iter()
                .filter_map(|p| pending.get(p).cloned())
                .collect()
        };
        let deadline = Instant::now() + self.drain_wait;
        let wait = || {
            while counters.iter().any(|c| c.load(Ordering::SeqCst) > 0) && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // The callback runs inside the consume loop's poll: on a multi-thread runtime the
        // workers go on elsewhere meanwhile; elsewhere waiting would only stall them.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => {}
        }
    }
}

pub(super) fn epoch(epochs: &Mutex<HashMap<i32, u64>>, partition: i32) -> u64 {
    epochs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&partition)
        .copied()
        .unwrap_or(0)
}

pub(super) type SharedConsumer = Arc<StreamConsumer<RebalanceContext>>;

pub(super) struct ConsumeLoop {
    pub(super) component: String,
    pub(super) topic: String,
    pub(super) md: Arc<KafkaMetadata>,
    pub(super) consumer: SharedConsumer,
    pub(super) handler: Handler,
    /// Bulk subscription batch size ([`SubscribeRequest::bulk`]).
    pub(super) bulk: Option<usize>,
    pub(super) epochs: Arc<Mutex<HashMap<i32, u64>>>,
    pub(super) pending: Arc<Mutex<HashMap<i32, Arc<AtomicUsize>>>>,
    pub(super) stop: Stop,
    /// Held until the loop has stopped its workers and committed their offsets.
    pub(super) guard: daprd_core::pubsub::DrainGuard,
}

/// One partition's queue: handled in order by its own task.
pub(super) struct PartitionWorker {
    pub(super) tx: mpsc::UnboundedSender<(OwnedMessage, u64)>,
    pub(super) flow: Arc<Flow>,
}

/// Pauses a partition whose queue is full and resumes it once half drained.
pub(super) struct Flow {
    pub(super) pending: Arc<AtomicUsize>,
    pub(super) paused: Mutex<bool>,
    pub(super) high: usize,
    pub(super) consumer: SharedConsumer,
    pub(super) topic: String,
    pub(super) partition: i32,
}

impl Flow {
    pub(super) fn tpl(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, self.partition);
        tpl
    }

    pub(super) fn queued(&self) {
        let n = self.pending.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= self.high {
            let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
            if !*paused && self.pending.load(Ordering::SeqCst) >= self.high {
                if let Err(e) = self.consumer.pause(&self.tpl()) {
                    tracing::warn!(topic = %self.topic, partition = self.partition, error = %e, "kafka: pausing a partition failed");
                } else {
                    *paused = true;
                }
            }
        }
    }

    pub(super) fn done(&self) {
        let n = self.pending.fetch_sub(1, Ordering::SeqCst) - 1;
        if n <= self.high / 2 {
            let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
            if *paused {
                if let Err(e) = self.consumer.resume(&self.tpl()) {
                    tracing::warn!(topic = %self.topic, partition = self.partition, error = %e, "kafka: resuming a partition failed");
                }
                *paused = false;
            }
        }
    }
}

impl ConsumeLoop {
    pub(super) async fn run(mut self) {
        let mut workers: HashMap<i32, PartitionWorker> = HashMap::new();
        loop {
            let Some(next) = self.stop.or(self.consumer.recv()).await else {
                break;
            };
            let msg = match next {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::debug!(component = %self.component, topic = %self.topic, error = %e, "kafka consumer error");
                    if self.stop.sleep(Duration::from_millis(200)).await {
                        break;
                    }
                    continue;
                }
            };
            let partition = msg.partition();
            let worker = workers
                .entry(partition)
                .or_insert_with(|| self.spawn_worker(partition));
            worker.flow.queued();
            let current = epoch(&self.epochs, partition);
            if worker.tx.send((msg, current)).is_err() {
                worker.flow.done();
            }
        }
        // The workers saw the same stop (queued messages are left for redelivery); wait for
        // the message each is handling, commit what was stored and leave the group.
        drop(workers);
        let consumer = self.consumer;
        let guard = self.guard;
        let _ = tokio::task::spawn_blocking(move || {
            // Workers hold clones of the consumer; wait (bounded) until they let go.
            let deadline = Instant::now() + Duration::from_secs(30);
            while Arc::strong_count(&consumer) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
                tracing::debug!(error = %e, "kafka: final offset commit");
            }
            drop(consumer);
        })
        .await;
        drop(guard);
    }

    /// A partition's worker. It watches the subscription's stop itself (not a signal the
    /// consume loop passes on once it runs again), so no delivery starts after the stop.
    pub(super) fn spawn_worker(&self, partition: i32) -> PartitionWorker {
        let mut stop = self.stop.clone();
        let (tx, mut rx) = mpsc::unbounded_channel::<(OwnedMessage, u64)>();
        let pending = Arc::new(AtomicUsize::new(0));
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(partition, pending.clone());
        let flow = Arc::new(Flow {
            pending,
            paused: Mutex::new(false),
            high: self.md.channel_buffer_size.max(1),
            consumer: self.consumer.clone(),
            topic: self.topic.clone(),
            partition,
        });
        let worker_flow = flow.clone();
        let handler = self.handler.clone();
        let md = self.md.clone();
        let epochs = self.epochs.clone();
        let component = self.component.clone();
        let bulk = self.bulk;
        tokio::spawn(async move {
            let flow = worker_flow;
            loop {
                let Some(Some(first)) = stop.or(rx.recv()).await else {
                    break;
                };
                // A bulk subscription gets what is already queued (up to its batch size)
                // at once, so the runtime can batch it; otherwise one message at a time.
                let mut batch = vec![first];
                while batch.len() < bulk.unwrap_or(1) {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                let current = epoch(&epochs, partition);
                let live: Vec<&OwnedMessage> = batch
                    .iter()
                    .filter(|(_, at)| *at == current)
                    .map(|(m, _)| m)
                    .collect();
                let settled = futures::future::join_all(live.iter().map(|m| {
                    // a revocation ends retries in place: the next owner retries
                    let revoked = || epoch(&epochs, partition) != current;
                    handle_one(m, &handler, &md, stop.clone(), &component, revoked)
                }))
                .await;
                // Commit up to the last message of the settled run from the start: a message
                // behind an unsettled one (shutting down) is delivered again, never skipped.
                let last = live
                    .iter()
                    .zip(&settled)
                    .take_while(|(_, ok)| **ok)
                    .map(|(m, _)| *m)
                    .last();
                if let Some(msg) = last {
                    if let Err(e) =
                        flow.consumer
                            .store_offset(msg.topic(), msg.partition(), msg.offset())
                    {
                        tracing::debug!(%component, topic = msg.topic(), partition, offset = msg.offset(), error = %e, "kafka: storing the offset failed (partition revoked?)");
                    }
                }
                for _ in &batch {
                    flow.done();
                }
            }
            // Stopped: what is still queued will not be handled here, so a revocation (the
            // group leave when the consumer closes) must not wait for it.
            flow.pending.store(0, Ordering::SeqCst);
            drop(flow);
        });
        PartitionWorker { tx, flow }
    }
}

/// The metadata the runtime gets with a consumed record.
pub(super) fn inbound_metadata(msg: &OwnedMessage, md: &KafkaMetadata) -> BTreeMap<String, String> {
    let escape = |v: &[u8]| {
        let s = String::from_utf8_lossy(v);
        if md.escape_headers {
            query_escape(&s)
        } else {
            s.into_owned()
        }
    };
    let mut out = BTreeMap::new();
    if let Some(headers) = msg.headers() {
        for h in headers.iter() {
            if md
                .exclude_header_meta
                .as_ref()
                .is_some_and(|re| re.is_match(h.key))
            {
                continue;
            }
            out.insert(h.key.to_string(), escape(h.value.unwrap_or_default()));
        }
    }
    if let Some(k) = msg.key() {
        out.insert("__key".into(), escape(k));
    }
    out.insert("__offset".into(), msg.offset().to_string());
    out.insert("__topic".into(), msg.topic().to_string());
    out.insert(
        "__timestamp".into(),
        msg.timestamp().to_millis().unwrap_or(0).to_string(),
    );
    out.insert("__partition".into(), msg.partition().to_string());
    out
}

/// Hands `msg` to the runtime until it is settled; `true` when its offset may be committed.
pub(super) async fn handle_one(
    msg: &OwnedMessage,
    handler: &Handler,
    md: &KafkaMetadata,
    mut stop: Stop,
    component: &str,
    revoked: impl Fn() -> bool,
) -> bool {
    let mut message = Message {
        topic: msg.topic().to_string(),
        data: Bytes::copy_from_slice(msg.payload().unwrap_or_default()),
        metadata: inbound_metadata(msg, md),
        content_type: None,
        redelivered: false,
    };
    let started = Instant::now();
    let mut attempt = 0u64;
    loop {
        if stop.is_set() {
            // Shutting down: not committed, so the group redelivers it.
            return false;
        }
        match handler(message.clone()).await {
            Outcome::Success | Outcome::Drop => return true,
            Outcome::Retry => {}
        }
        let Some(back_off) = &md.consume_retry else {
            tracing::error!(%component, topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), "kafka: message not processed; skipped (consumeRetryEnabled is false)");
            return false;
        };
        let Some(delay) = back_off.next_delay(attempt, started.elapsed()) else {
            tracing::error!(%component, topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), "kafka: too many failed attempts at processing the message; skipped");
            return false;
        };
        attempt += 1;
        tracing::warn!(%component, topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), attempt, "kafka: message not processed; retrying");
        if stop.sleep(delay).await {
            return false;
        }
        if revoked() {
            return false;
        }
        // retried in place: the same message again
        message.redelivered = true;
    }
}
