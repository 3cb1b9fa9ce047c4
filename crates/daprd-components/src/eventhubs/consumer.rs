//! One Event Hubs subscription: the partitions this instance owns (claimed in the checkpoint
//! store beside the other instances of the consumer group, as Azure's event processors claim
//! them) and, for each, a receiver that hands the partition's events to the app and
//! checkpoints how far the app got.
//!
//! Ownership: every [`BALANCE_EVERY`] the loop lists the ownership blobs; a claim not renewed
//! for [`OWNERSHIP_EXPIRES`] is free. Each instance's fair share is the partition count over
//! the active owners (rounded up for as many as the remainder); this one claims free
//! partitions up to its share and, while below the lower share, takes one partition a cycle
//! from an owner above the upper share. It renews its claims each cycle (a claim that fails
//! means another instance took the partition: its receiver stops), and gives them up when it
//! stops.
//!
//! A partition's receiver starts after its checkpoint (`x-opt-offset > '<offset>'`), or, when
//! there is none, after the partition's last event (Go daprd's processor starts at the latest
//! event too) — a position written as the checkpoint at once, so that what is published while
//! no instance reads is delivered after a restart (Go's processor would skip it). Events go to the app in order; up to [`IN_FLIGHT`] at once unless
//! `enableInOrderMessageDelivery`. An event the app did not take is handed again after
//! `backOffDuration`, up to `backOffMaxRetries` times, then left (logged) while the partition
//! goes on. The checkpoint moves to the last event of an unbroken run of events the app took,
//! every `checkPointFrequencyPerPartition` events and when the receiver stops — never past an
//! event it did not take (Go daprd checkpoints past one whose retries ran out, and loses it:
//! dapr/dapr#7549); what is past the checkpoint is read again after a restart or by the
//! partition's next owner.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use daprd_core::backoff::Backoff;
use daprd_core::pubsub::{DrainGuard, Handler, Message, Outcome};
use fe2o3_amqp::types::messaging::{Body, Message as AmqpMessage};
use fe2o3_amqp::types::primitives::{OrderedMap, SimpleValue, Value};
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{oneshot, watch};

use super::checkpoints::{Checkpoint, CheckpointStore, Ownership};
use super::metadata::{EventHubsMetadata, SubscribeOptions, IN_FLIGHT};
use crate::servicebus::amqp::{self, AmqpError, Conn};
use crate::servicebus::TOKEN_REFRESH;
use crate::stop::Stop;

/// How often ownership is balanced and renewed (the SDKs' processors: 10 s).
pub(super) const BALANCE_EVERY: Duration = Duration::from_secs(10);
/// A claim not renewed for this long is free (the SDKs' processors: 60 s).
pub(super) const OWNERSHIP_EXPIRES: Duration = Duration::from_secs(60);
/// Events a receiver asks for ahead of the app (the SDKs' prefetch: 300).
const PREFETCH: u32 = 300;

/// What a subscription's loops share.
pub(super) struct Consumer {
    pub(super) md: Arc<EventHubsMetadata>,
    pub(super) options: SubscribeOptions,
    pub(super) hub: String,
    pub(super) topic: String,
    pub(super) group: String,
    pub(super) store: CheckpointStore,
    pub(super) owner: String,
    pub(super) handler: Handler,
    pub(super) bulk: Option<usize>,
    pub(super) component: String,
}

/// A partition this instance owns, and its receiver's stop.
struct Owned {
    etag: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Consumer {
    /// The partition ids of the hub, read on the namespace's `$management` node.
    pub(super) async fn partitions(&self) -> Result<Vec<String>, AmqpError> {
        let mut conn = Conn::open(&self.md.connection, self.md.timeout).await?;
        let result = async {
            conn.authorize(&self.hub).await?;
            let body = self.read_entity(&mut conn, None).await?;
            let ids: Vec<String> = match field(&body, "partition_ids") {
                Some(Value::Array(a)) => a.0.iter().map(amqp::value_text).collect(),
                Some(Value::List(l)) => l.iter().map(amqp::value_text).collect(),
                _ => Vec::new(),
            };
            if ids.is_empty() {
                return Err(AmqpError::BadMessage(format!(
                    "reading event hub {}: the answer names no partitions",
                    self.hub
                )));
            }
            Ok(ids)
        }
        .await;
        conn.close().await;
        result
    }

    /// `READ` of the hub (`partition` `None`) or one of its partitions on the namespace's
    /// `$management` node, on `conn` (authorized for the hub); the answer's body.
    async fn read_entity(
        &self,
        conn: &mut Conn,
        partition: Option<&str>,
    ) -> Result<Value, AmqpError> {
        let (token, _) = conn.token(&self.hub).await?;
        let mut rpc = conn.namespace_management().await?;
        let mut props = OrderedMap::new();
        let kind = match partition {
            Some(_) => "com.microsoft:partition",
            None => "com.microsoft:eventhub",
        };
        for (k, v) in [
            ("operation", "READ"),
            ("name", self.hub.as_str()),
            ("type", kind),
            ("security_token", token.as_str()),
        ]
        .into_iter()
        .chain(partition.map(|p| ("partition", p)))
        {
            props.insert(k.to_string(), SimpleValue::String(v.to_string()));
        }
        let what = match partition {
            Some(p) => format!("reading partition {p} of event hub {}", self.hub),
            None => format!("reading event hub {}", self.hub),
        };
        let body = amqp::within(self.md.timeout, &what, rpc.call(&what, props, Value::Null)).await;
        rpc.close().await;
        body
    }

    /// Where a partition without a checkpoint starts: after its last event now (Go daprd's
    /// processor starts at the latest event too), recorded at once as the group's checkpoint,
    /// so that what arrives while no instance reads is not skipped after a restart.
    async fn start_at_end(
        &self,
        conn: &mut Conn,
        partition: &str,
    ) -> Result<(String, i64), AmqpError> {
        let body = self.read_entity(conn, Some(partition)).await?;
        let empty = matches!(field(&body, "is_partition_empty"), Some(Value::Bool(true)));
        let position = match (
            field(&body, "last_enqueued_offset"),
            field(&body, "last_enqueued_sequence_number"),
        ) {
            (Some(offset), Some(Value::Long(seq))) if !empty => (amqp::value_text(offset), *seq),
            // nothing in it yet: from its start
            _ => ("-1".to_string(), -1),
        };
        self.checkpoint(partition, Some(&position)).await;
        Ok(position)
    }

    /// Claims this instance's first partitions and waits (up to the timeout) until their
    /// receivers are attached, so that what is published from now on reaches the app; then
    /// balances in the background.
    pub(super) async fn start(
        self: Arc<Self>,
        partitions: Vec<String>,
        stop: Stop,
        guard: DrainGuard,
    ) {
        let mut owned = HashMap::new();
        let mut attached = Vec::new();
        if let Err(e) = self
            .balance(&partitions, &mut owned, &stop, &guard, &mut attached)
            .await
        {
            tracing::warn!(component = %self.component, hub = %self.hub, error = %e, "azure event hubs: claiming partitions failed; trying again");
        }
        for a in attached {
            let _ = tokio::time::timeout(self.md.timeout, a).await;
        }
        tokio::spawn(self.run(partitions, owned, stop, guard));
    }

    /// Balances and renews ownership until the stop, then stops the receivers and gives
    /// their partitions up.
    async fn run(
        self: Arc<Self>,
        partitions: Vec<String>,
        mut owned: HashMap<String, Owned>,
        mut stop: Stop,
        guard: DrainGuard,
    ) {
        loop {
            if stop.sleep(BALANCE_EVERY).await {
                break;
            }
            if let Err(e) = self
                .balance(&partitions, &mut owned, &stop, &guard, &mut Vec::new())
                .await
            {
                tracing::warn!(component = %self.component, hub = %self.hub, error = %e, "azure event hubs: balancing partition ownership failed; trying again");
            }
        }
        for o in owned.values() {
            let _ = o.stop.send(true);
        }
        for (partition, o) in owned {
            let _ = o.task.await;
            // given up, so that another instance takes it at once
            if let Err(e) = self.store.claim(&partition, "", Some(&o.etag)).await {
                tracing::debug!(component = %self.component, partition, error = %e, "azure event hubs: giving a partition up failed");
            }
        }
        drop(guard);
    }

    async fn balance(
        self: &Arc<Self>,
        partitions: &[String],
        owned: &mut HashMap<String, Owned>,
        stop: &Stop,
        guard: &DrainGuard,
        attached: &mut Vec<oneshot::Receiver<()>>,
    ) -> Result<(), super::checkpoints::CheckpointError> {
        // receivers that ended by themselves (the partition was taken) are forgotten
        owned.retain(|_, o| !o.task.is_finished());
        let now = now_ms();
        let expires = i64::try_from(OWNERSHIP_EXPIRES.as_millis()).unwrap_or(i64::MAX);
        let listed: HashMap<String, Ownership> = self
            .store
            .ownership()
            .await?
            .into_iter()
            .map(|o| (o.partition.clone(), o))
            .collect();
        let active = |o: &Ownership| !o.owner.is_empty() && now - o.last_modified_ms < expires;
        // renew what this instance holds; a lost claim stops its receiver
        let mine: Vec<String> = owned.keys().cloned().collect();
        for p in mine {
            let etag = owned.get(&p).map(|o| o.etag.clone()).unwrap_or_default();
            match self.store.claim(&p, &self.owner, Some(&etag)).await? {
                Some(renewed) => {
                    if let Some(o) = owned.get_mut(&p) {
                        o.etag = renewed.etag;
                    }
                }
                None => {
                    if let Some(o) = owned.remove(&p) {
                        tracing::info!(component = %self.component, hub = %self.hub, partition = p, "azure event hubs: another instance took the partition");
                        let _ = o.stop.send(true);
                    }
                }
            }
        }
        let mut per_owner: HashMap<&str, Vec<&str>> = HashMap::new();
        for p in partitions {
            if let Some(o) = listed.get(p).filter(|o| active(o) && o.owner != self.owner) {
                per_owner.entry(o.owner.as_str()).or_default().push(p);
            }
        }
        let owners = per_owner.len() + 1;
        let low = partitions.len() / owners;
        let high = low + usize::from(!partitions.len().is_multiple_of(owners));
        let mut wanted: Vec<&String> = partitions
            .iter()
            .filter(|p| !owned.contains_key(*p))
            .filter(|p| listed.get(*p).is_none_or(|o| !active(o)))
            .collect();
        if owned.len() < low && wanted.is_empty() {
            // steal one from an owner above its share
            if let Some((_, ps)) = per_owner
                .iter()
                .filter(|(_, ps)| ps.len() > high)
                .max_by_key(|(_, ps)| ps.len())
            {
                if let Some(p) = partitions.iter().find(|p| ps.contains(&p.as_str())) {
                    wanted.push(p);
                }
            }
        }
        for p in wanted {
            if owned.len() >= high {
                break;
            }
            let etag = listed.get(p).map(|o| o.etag.as_str());
            let Some(claimed) = self.store.claim(p, &self.owner, etag).await? else {
                continue; // another instance was faster
            };
            let (tx, rx) = watch::channel(false);
            // a receiver stops with the subscription, or when its own sender says so or is
            // dropped (the partition is no longer this instance's)
            let partition_stop = stop.or_part(rx);
            let (ready, ready_rx) = oneshot::channel();
            attached.push(ready_rx);
            let task =
                tokio::spawn(
                    self.clone()
                        .receive(p.clone(), partition_stop, guard.clone(), ready),
                );
            tracing::info!(component = %self.component, hub = %self.hub, partition = %p, "azure event hubs: partition claimed");
            owned.insert(
                p.clone(),
                Owned {
                    etag: claimed.etag,
                    stop: tx,
                    task,
                },
            );
        }
        Ok(())
    }

    /// Reads one partition until the stop (or the loss of its claim), reconnecting after
    /// failures.
    async fn receive(
        self: Arc<Self>,
        partition: String,
        mut stop: Stop,
        guard: DrainGuard,
        ready: oneshot::Sender<()>,
    ) {
        let mut ready = Some(ready);
        // quick to come back (the service returning is seen within a second), and no busier
        // than one attempt a second while it is away
        let mut pause = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        // the last event settled (offset, sequence number) and whether it is checkpointed
        let mut position: Option<(String, i64)> = None;
        let mut checkpointed = true;
        loop {
            if position.is_none() {
                position = match self.store.checkpoints().await {
                    Ok(all) => all
                        .into_iter()
                        .find(|c| c.partition == partition)
                        .and_then(|c| Some((c.offset?, c.sequence_number.unwrap_or(-1)))),
                    Err(e) => {
                        tracing::warn!(component = %self.component, partition, error = %e, "azure event hubs: reading the checkpoint failed");
                        if stop.sleep(pause.next_pause()).await {
                            break;
                        }
                        continue;
                    }
                };
            }
            let ended = self
                .read(
                    &partition,
                    &mut position,
                    &mut checkpointed,
                    &mut stop,
                    &mut pause,
                    &mut ready,
                )
                .await;
            if !checkpointed {
                self.checkpoint(&partition, position.as_ref()).await;
                checkpointed = true;
            }
            match ended {
                Ok(()) => break,
                Err(AmqpError::Stolen { .. }) => {
                    // another instance's receiver took the partition (it claimed it): this
                    // one lets it go; the balance loop sees the claim gone
                    tracing::info!(component = %self.component, hub = %self.hub, partition, "azure event hubs: another instance took the partition over");
                    break;
                }
                Err(e) => {
                    tracing::warn!(component = %self.component, hub = %self.hub, partition, error = %e, "azure event hubs: receiving failed; reconnecting");
                    if stop.sleep(pause.next_pause()).await {
                        break;
                    }
                }
            }
        }
        drop(guard);
    }

    /// One connection's worth of reading; `Ok` at the stop.
    async fn read(
        &self,
        partition: &str,
        position: &mut Option<(String, i64)>,
        checkpointed: &mut bool,
        stop: &mut Stop,
        pause: &mut Backoff,
        ready: &mut Option<oneshot::Sender<()>>,
    ) -> Result<(), AmqpError> {
        let address = format!(
            "{}/ConsumerGroups/{}/Partitions/{partition}",
            self.hub, self.group
        );
        let mut conn = Conn::open(&self.md.connection, self.md.timeout).await?;
        let mut receiver = match async {
            conn.authorize(&self.hub).await?;
            let (offset, _) = match position.as_ref() {
                Some(p) => p.clone(),
                None => position
                    .insert(self.start_at_end(&mut conn, partition).await?)
                    .clone(),
            };
            let filter = format!("amqp.annotation.x-opt-offset > '{offset}'");
            conn.event_receiver(&address, &filter, PREFETCH).await
        }
        .await
        {
            Ok(r) => r,
            Err(e) => {
                conn.close().await;
                return Err(e);
            }
        };
        pause.reset();
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
        let window = if self.md.in_order {
            1
        } else {
            IN_FLIGHT.max(self.bulk.unwrap_or(1))
        };
        let mut authorized = tokio::time::Instant::now();
        let mut in_flight = FuturesOrdered::new();
        // once an event is left unsettled (the stop came), nothing after it is checkpointed
        let mut broken = false;
        let mut since_checkpoint = 0u64;
        let result = loop {
            if authorized.elapsed() >= TOKEN_REFRESH {
                if let Err(e) = conn.authorize(&self.hub).await {
                    break Err(e);
                }
                authorized = tokio::time::Instant::now();
            }
            tokio::select! {
                biased;
                () = stop.wait(), if in_flight.is_empty() => break Ok(()),
                Some(done) = in_flight.next() => {
                    let done: Option<(String, i64)> = done;
                    match done {
                        Some(p) if !broken => {
                            *position = Some(p);
                            *checkpointed = false;
                            since_checkpoint += 1;
                            if since_checkpoint >= self.options.checkpoint_every {
                                self.checkpoint(partition, position.as_ref()).await;
                                *checkpointed = true;
                                since_checkpoint = 0;
                            }
                        }
                        _ => broken = true,
                    }
                }
                delivery = receiver.recv::<Body<Value>>(), if in_flight.len() < window && !stop.is_set() => {
                    match delivery {
                        Ok(d) => {
                            let event = d.into_message();
                            in_flight.push_back(self.deliver(event, stop.clone()));
                        }
                        Err(e) => break Err(amqp::receive_error(&address, &e)),
                    }
                }
            }
        };
        // what the app still has is settled before the link goes
        while let Some(done) = in_flight.next().await {
            match done {
                Some(p) if !broken => {
                    *position = Some(p);
                    *checkpointed = false;
                }
                _ => broken = true,
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), receiver.close()).await;
        conn.close().await;
        result
    }

    /// Hands one event to the app until it is settled; its (offset, sequence number) once the
    /// app took it (or dropped it), `None` when the stop came first or the retries ran out:
    /// then no checkpoint passes it, and it is read again later.
    fn deliver(
        &self,
        event: AmqpMessage<Body<Value>>,
        stop: Stop,
    ) -> impl std::future::Future<Output = Option<(String, i64)>> + Send + 'static {
        let handler = self.handler.clone();
        let (max_retries, retry_pause) = (self.md.max_retries, self.md.retry_pause);
        let component = self.component.clone();
        let mut message = Message {
            topic: self.topic.clone(),
            data: Bytes::new(),
            metadata: incoming_metadata(&event, self.options.all_properties),
            content_type: event
                .properties
                .as_ref()
                .and_then(|p| p.content_type.as_ref())
                .map(|c| c.as_str().to_string()),
            redelivered: false,
        };
        let offset = message
            .metadata
            .get("x-opt-offset")
            .cloned()
            .unwrap_or_default();
        let sequence = message
            .metadata
            .get("x-opt-sequence-number")
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1);
        message.data = amqp::body_bytes(event.body);
        async move {
            let mut stop = stop;
            let mut attempt = 0u64;
            loop {
                if stop.is_set() {
                    return None;
                }
                match handler(message.clone()).await {
                    Outcome::Success | Outcome::Drop => return Some((offset, sequence)),
                    Outcome::Retry => {}
                }
                if max_retries.is_some_and(|max| attempt >= max) {
                    // Go daprd checkpoints past it here and loses it (dapr/dapr#7549): the
                    // checkpoint stays before it instead
                    tracing::error!(%component, offset, sequence, "azure event hubs: too many failed attempts at processing the event; the partition goes on, and the checkpoint stays before the event, so it is handed again after a restart or to the partition's next owner");
                    return None;
                }
                attempt += 1;
                tracing::warn!(%component, offset, sequence, attempt, "azure event hubs: event not processed; retrying");
                if stop.sleep(retry_pause).await {
                    return None;
                }
                message.redelivered = true;
            }
        }
    }

    /// Records that the consumer group got past `position` in `partition`.
    async fn checkpoint(&self, partition: &str, position: Option<&(String, i64)>) {
        let Some((offset, sequence)) = position else {
            return;
        };
        let checkpoint = Checkpoint {
            partition: partition.to_string(),
            offset: Some(offset.clone()),
            sequence_number: Some(*sequence),
        };
        if let Err(e) = self.store.set_checkpoint(&checkpoint).await {
            // the events past the last checkpoint are read again later: not lost
            tracing::warn!(component = %self.component, hub = %self.hub, partition, error = %e, "azure event hubs: writing the checkpoint failed");
        }
    }
}

/// A field of a `$management` answer's map.
fn field<'a>(body: &'a Value, key: &str) -> Option<&'a Value> {
    match body {
        Value::Map(m) => m.get(&Value::String(key.into())),
        _ => None,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The metadata the app gets with an event, as Go daprd gives it: `x-opt-sequence-number`,
/// `x-opt-enqueued-time` (RFC 3339), `x-opt-offset`, `x-opt-partition-key`, `message-id`,
/// IoT Hub's system properties, and with `all_properties` the application properties.
pub fn incoming_metadata(
    event: &AmqpMessage<Body<Value>>,
    all_properties: bool,
) -> BTreeMap<String, String> {
    let mut md = BTreeMap::new();
    if let Some(a) = &event.message_annotations {
        for (k, v) in &a.0 {
            let key = match k {
                fe2o3_amqp::types::messaging::annotations::OwnedKey::Symbol(s) => s.as_str(),
                _ => continue,
            };
            if matches!(
                key,
                "x-opt-sequence-number"
                    | "x-opt-enqueued-time"
                    | "x-opt-offset"
                    | "x-opt-partition-key"
                    | "iothub-enqueuedtime"
                    | "iothub-connection-device-id"
                    | "iothub-connection-auth-generation-id"
                    | "iothub-connection-auth-method"
                    | "iothub-connection-module-id"
            ) {
                md.insert(key.to_string(), amqp::value_text(v));
            }
        }
    }
    if let Some(id) = event
        .properties
        .as_ref()
        .and_then(|p| p.message_id.as_ref())
    {
        let id = amqp::message_id_text(id);
        if !id.is_empty() {
            md.insert("message-id".to_string(), id);
        }
    }
    if all_properties {
        if let Some(props) = &event.application_properties {
            for (k, v) in &props.0 {
                md.insert(k.clone(), amqp::simple_text(v));
            }
        }
    }
    md
}
