//! A Pulsar test broker: Apache Pulsar's binary protocol over TCP (the length-prefixed frames
//! and protobuf commands of `PulsarApi.proto`, through the frame codec of the `pulsar` crate),
//! for `pubsub.pulsar`'s tests. No Pulsar server is packaged in the registries this project
//! installs from; this broker is what the component, the SDK suites and the official Python
//! client (`pulsar-client`, a C++ client) are tested against.
//!
//! What it does, as Pulsar does it: connect and ping; topics unpartitioned unless a test made
//! one partitioned ([`TestBroker::create_partitioned_topic`]: its metadata answers the number
//! of partitions, and each partition `<topic>-partition-<i>` is a topic of its own), every topic
//! owned by this broker (lookup answers "connect here"); producers (a send is kept, then answered with a receipt carrying its message id);
//! subscriptions of the four types (exclusive and failover: one active consumer; shared:
//! round robin; key_shared: by key) with a cursor per subscription that starts at the latest or
//! the earliest message and outlives its consumers (durable) or not (non-durable); flow
//! permits; individual (also per batch index) and cumulative acks; redelivery on request, when
//! a consumer closes and when its connection ends, with the redelivery count; delayed delivery
//! (`deliver_at_time`) on shared and key_shared subscriptions; unsubscribe; the topics of a
//! namespace. It keeps every message it was sent ([`TestBroker::messages`]) so a test can
//! compare bytes, and drops every connection on request ([`TestBroker::drop_connections`]).
//!
//! Left out: schemas, transactions, TLS, persistence across a restart.
//! Authentication data is accepted whatever it is.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use pulsar::message::proto::{
    self, base_command::Type, command_ack::AckType, command_subscribe::SubType, BaseCommand,
    MessageIdData,
};
use pulsar::message::{Codec, Message, Payload};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::Framed;

/// A running test broker; it stops when dropped.
pub struct TestBroker {
    port: u16,
    inner: Arc<Inner>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_connections();
    }
}

struct Inner {
    state: Mutex<State>,
    /// Bumped to end every connection.
    generation: watch::Sender<u64>,
    url: String,
    /// Where lookups send clients.
    advertised: String,
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Topic>,
    /// Partitioned topics (full names) and their partition counts.
    partitioned: HashMap<String, u32>,
    /// (auth method name, auth data) of every Connect, in order.
    auths: Vec<(String, Vec<u8>)>,
    conns: HashMap<u64, mpsc::UnboundedSender<Message>>,
    next_conn: u64,
    next_ledger: u64,
    next_producer: u64,
}

struct Topic {
    ledger_id: u64,
    entries: Vec<Payload>,
    subs: HashMap<String, Sub>,
}

struct Sub {
    sub_type: SubType,
    durable: bool,
    /// The first entry never handed out.
    cursor: usize,
    /// Entries to hand out again, oldest first.
    redeliver: BTreeSet<usize>,
    acked: HashSet<usize>,
    /// Acked batch indexes of batch entries not wholly acked yet.
    batch_acks: HashMap<usize, HashSet<i32>>,
    /// Entries in a consumer's hands: (connection, consumer id).
    in_flight: HashMap<usize, (u64, u64)>,
    redeliveries: HashMap<usize, u32>,
    /// Entries whose `deliver_at_time` has not come, by that time (ms since the epoch).
    delayed: BTreeMap<i64, Vec<usize>>,
    consumers: Vec<Consumer>,
    next_rr: usize,
}

struct Consumer {
    conn: u64,
    id: u64,
    permits: u32,
}

/// What one connection has opened, to be closed when it ends.
#[derive(Default)]
struct ConnState {
    producers: HashMap<u64, String>,
    consumers: HashMap<u64, (String, String)>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `persistent://public/default/<topic>` for a short name, as Pulsar completes it.
pub fn full_topic_name(topic: &str) -> String {
    if topic.contains("://") {
        topic.to_string()
    } else if topic.matches('/').count() == 2 {
        format!("persistent://{topic}")
    } else {
        format!("persistent://public/default/{topic}")
    }
}

fn command(t: Type) -> BaseCommand {
    BaseCommand {
        r#type: t as i32,
        ..Default::default()
    }
}

fn error(request_id: u64, error: proto::ServerError, message: String) -> Message {
    Message {
        command: BaseCommand {
            error: Some(proto::CommandError {
                request_id,
                error: error as i32,
                message,
            }),
            ..command(Type::Error)
        },
        payload: None,
    }
}

fn success(request_id: u64) -> Message {
    Message {
        command: BaseCommand {
            success: Some(proto::CommandSuccess {
                request_id,
                schema: None,
            }),
            ..command(Type::Success)
        },
        payload: None,
    }
}

impl TestBroker {
    /// Starts a broker on `127.0.0.1:port` (0: any free port).
    pub async fn start(port: u16) -> std::io::Result<Self> {
        Self::start_advertised(port, None).await
    }

    /// Starts a broker on `127.0.0.1:port` whose lookups send clients to `advertised` (a
    /// `pulsar://` URL, such as a proxy's in front of it) instead of its own address.
    pub async fn start_advertised(port: u16, advertised: Option<String>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            generation: watch::channel(0).0,
            url: format!("pulsar://127.0.0.1:{port}"),
            advertised: advertised.unwrap_or_else(|| format!("pulsar://127.0.0.1:{port}")),
        });
        let accepting = inner.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(accepting.clone().serve(stream));
            }
        });
        Ok(Self {
            port,
            inner,
            accept,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `pulsar://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.inner.url.clone()
    }

    /// Ends every open connection (a broker outage as the clients see it; what was sent stays).
    pub fn drop_connections(&self) {
        self.inner.generation.send_modify(|g| *g += 1);
    }

    /// Every message sent to `topic` (short or full name), in order: metadata and payload as
    /// the producer sent them.
    pub fn messages(&self, topic: &str) -> Vec<Payload> {
        lock(&self.inner.state)
            .topics
            .get(&full_topic_name(topic))
            .map(|t| t.entries.clone())
            .unwrap_or_default()
    }

    /// Makes `topic` (short or full name) a partitioned topic of `partitions` partitions,
    /// `<full name>-partition-<i>`, as `pulsar-admin topics create-partitioned-topic` does.
    pub fn create_partitioned_topic(&self, topic: &str, partitions: u32) {
        lock(&self.inner.state)
            .partitioned
            .insert(full_topic_name(topic), partitions);
    }

    /// The authentication (method name, data) each connection opened with, in order.
    pub fn authentications(&self) -> Vec<(String, Vec<u8>)> {
        lock(&self.inner.state).auths.clone()
    }

    /// How many consumers `subscription` of `topic` has now.
    pub fn consumers(&self, topic: &str, subscription: &str) -> usize {
        lock(&self.inner.state)
            .topics
            .get(&full_topic_name(topic))
            .and_then(|t| t.subs.get(subscription))
            .map_or(0, |s| s.consumers.len())
    }
}

impl Inner {
    async fn serve(self: Arc<Self>, stream: TcpStream) {
        let (mut sink, mut frames) = Framed::new(stream, Codec).split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let conn = {
            let mut st = lock(&self.state);
            st.next_conn += 1;
            let id = st.next_conn;
            st.conns.insert(id, tx.clone());
            id
        };
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let mut generation = self.generation.subscribe();
        generation.mark_unchanged();
        let mut cs = ConnState::default();
        loop {
            let frame = tokio::select! {
                f = frames.next() => f,
                _ = generation.changed() => None,
            };
            let Some(Ok(frame)) = frame else { break };
            self.handle(conn, &tx, &mut cs, frame);
        }
        // The connection is gone: its consumers' messages go back to their subscriptions.
        {
            let mut st = lock(&self.state);
            st.conns.remove(&conn);
        }
        for (consumer, (topic, sub)) in cs.consumers {
            self.remove_consumer(&topic, &sub, conn, consumer);
        }
        writer.abort();
    }

    fn handle(
        self: &Arc<Self>,
        conn: u64,
        tx: &mpsc::UnboundedSender<Message>,
        cs: &mut ConnState,
        frame: Message,
    ) {
        let c = frame.command;
        let reply = |m: Message| {
            let _ = tx.send(m);
        };
        match Type::try_from(c.r#type) {
            Ok(Type::Connect) => {
                let connect = c.connect.unwrap_or_default();
                lock(&self.state).auths.push((
                    connect.auth_method_name.clone().unwrap_or_default(),
                    connect.auth_data.clone().unwrap_or_default(),
                ));
                let version = connect.protocol_version.unwrap_or(0).min(21);
                reply(Message {
                    command: BaseCommand {
                        connected: Some(proto::CommandConnected {
                            server_version: "daprd-rs pulsar test broker".into(),
                            protocol_version: Some(version),
                            max_message_size: Some(5 * 1024 * 1024),
                        }),
                        ..command(Type::Connected)
                    },
                    payload: None,
                });
            }
            Ok(Type::Ping) => reply(Message {
                command: BaseCommand {
                    pong: Some(proto::CommandPong {}),
                    ..command(Type::Pong)
                },
                payload: None,
            }),
            Ok(Type::PartitionedMetadata) => {
                let Some(p) = c.partition_metadata else {
                    return;
                };
                let partitions = lock(&self.state)
                    .partitioned
                    .get(&full_topic_name(&p.topic))
                    .copied()
                    .unwrap_or(0);
                reply(Message {
                    command: BaseCommand {
                        partition_metadata_response: Some(
                            proto::CommandPartitionedTopicMetadataResponse {
                                partitions: Some(partitions),
                                request_id: p.request_id,
                                response: Some(
                                    proto::command_partitioned_topic_metadata_response::LookupType::Success
                                        as i32,
                                ),
                                ..Default::default()
                            },
                        ),
                        ..command(Type::PartitionedMetadataResponse)
                    },
                    payload: None,
                });
            }
            Ok(Type::Lookup) => {
                let Some(l) = c.lookup_topic else { return };
                reply(Message {
                    command: BaseCommand {
                        lookup_topic_response: Some(proto::CommandLookupTopicResponse {
                            broker_service_url: Some(self.advertised.clone()),
                            response: Some(
                                proto::command_lookup_topic_response::LookupType::Connect as i32,
                            ),
                            request_id: l.request_id,
                            authoritative: Some(true),
                            ..Default::default()
                        }),
                        ..command(Type::LookupResponse)
                    },
                    payload: None,
                });
            }
            Ok(Type::GetTopicsOfNamespace) => {
                let Some(g) = c.get_topics_of_namespace else {
                    return;
                };
                let prefix = format!("persistent://{}/", g.namespace);
                let topics = lock(&self.state)
                    .topics
                    .keys()
                    .filter(|t| t.starts_with(&prefix))
                    .cloned()
                    .collect();
                reply(Message {
                    command: BaseCommand {
                        get_topics_of_namespace_response: Some(
                            proto::CommandGetTopicsOfNamespaceResponse {
                                request_id: g.request_id,
                                topics,
                                ..Default::default()
                            },
                        ),
                        ..command(Type::GetTopicsOfNamespaceResponse)
                    },
                    payload: None,
                });
            }
            Ok(Type::Producer) => {
                let Some(p) = c.producer else { return };
                let topic = full_topic_name(&p.topic);
                let name = {
                    let mut st = lock(&self.state);
                    st.topic(&topic);
                    st.next_producer += 1;
                    p.producer_name
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| format!("test-broker-{}", st.next_producer))
                };
                cs.producers.insert(p.producer_id, topic);
                reply(Message {
                    command: BaseCommand {
                        producer_success: Some(proto::CommandProducerSuccess {
                            request_id: p.request_id,
                            producer_name: name,
                            last_sequence_id: Some(-1),
                            producer_ready: Some(true),
                            ..Default::default()
                        }),
                        ..command(Type::ProducerSuccess)
                    },
                    payload: None,
                });
            }
            Ok(Type::Send) => {
                let Some(s) = c.send else { return };
                let (Some(topic), Some(payload)) =
                    (cs.producers.get(&s.producer_id).cloned(), frame.payload)
                else {
                    return;
                };
                let message_id = {
                    let mut st = lock(&self.state);
                    let t = st.topic(&topic);
                    t.entries.push(payload);
                    MessageIdData {
                        ledger_id: t.ledger_id,
                        entry_id: (t.entries.len() - 1) as u64,
                        ..Default::default()
                    }
                };
                reply(Message {
                    command: BaseCommand {
                        send_receipt: Some(proto::CommandSendReceipt {
                            producer_id: s.producer_id,
                            sequence_id: s.sequence_id,
                            message_id: Some(message_id),
                            highest_sequence_id: s.highest_sequence_id,
                        }),
                        ..command(Type::SendReceipt)
                    },
                    payload: None,
                });
                self.dispatch_topic(&topic);
            }
            Ok(Type::CloseProducer) => {
                let Some(p) = c.close_producer else { return };
                cs.producers.remove(&p.producer_id);
                reply(success(p.request_id));
            }
            Ok(Type::Subscribe) => {
                let Some(s) = c.subscribe else { return };
                let topic = full_topic_name(&s.topic);
                let refused = {
                    let mut st = lock(&self.state);
                    let t = st.topic(&topic);
                    let latest = t.entries.len();
                    let sub_type = SubType::try_from(s.sub_type).unwrap_or(SubType::Exclusive);
                    let sub = t.subs.entry(s.subscription.clone()).or_insert_with(|| Sub {
                        sub_type,
                        durable: s.durable.unwrap_or(true),
                        cursor: if s.initial_position
                            == Some(proto::command_subscribe::InitialPosition::Earliest as i32)
                        {
                            0
                        } else {
                            latest
                        },
                        redeliver: BTreeSet::new(),
                        acked: HashSet::new(),
                        batch_acks: HashMap::new(),
                        in_flight: HashMap::new(),
                        redeliveries: HashMap::new(),
                        delayed: BTreeMap::new(),
                        consumers: Vec::new(),
                        next_rr: 0,
                    });
                    if sub.sub_type != sub_type && !sub.consumers.is_empty() {
                        Some(format!(
                            "subscription {} is {:?}, not {sub_type:?}",
                            s.subscription, sub.sub_type
                        ))
                    } else if sub_type == SubType::Exclusive && !sub.consumers.is_empty() {
                        Some(format!(
                            "exclusive consumer for subscription {} exists",
                            s.subscription
                        ))
                    } else {
                        sub.sub_type = sub_type;
                        sub.consumers.push(Consumer {
                            conn,
                            id: s.consumer_id,
                            permits: 0,
                        });
                        None
                    }
                };
                match refused {
                    Some(why) => reply(error(s.request_id, proto::ServerError::ConsumerBusy, why)),
                    None => {
                        cs.consumers
                            .insert(s.consumer_id, (topic, s.subscription.clone()));
                        reply(success(s.request_id));
                    }
                }
            }
            Ok(Type::Flow) => {
                let Some(f) = c.flow else { return };
                let Some((topic, sub)) = cs.consumers.get(&f.consumer_id).cloned() else {
                    return;
                };
                self.with_sub(&topic, &sub, |s| {
                    if let Some(k) = s
                        .consumers
                        .iter_mut()
                        .find(|k| k.conn == conn && k.id == f.consumer_id)
                    {
                        k.permits = k.permits.saturating_add(f.message_permits);
                    }
                });
                self.dispatch(&topic, &sub);
            }
            Ok(Type::Ack) => {
                let Some(a) = c.ack else { return };
                if let Some((topic, sub)) = cs.consumers.get(&a.consumer_id).cloned() {
                    let cumulative = a.ack_type == AckType::Cumulative as i32;
                    let mut st = lock(&self.state);
                    if let Some(t) = st.topics.get_mut(&topic) {
                        if let Some(s) = t.subs.get_mut(&sub) {
                            for id in &a.message_id {
                                s.ack(&t.entries, id, cumulative, (conn, a.consumer_id));
                            }
                        }
                    }
                }
                if let Some(request_id) = a.request_id {
                    reply(Message {
                        command: BaseCommand {
                            ack_response: Some(proto::CommandAckResponse {
                                consumer_id: a.consumer_id,
                                request_id: Some(request_id),
                                ..Default::default()
                            }),
                            ..command(Type::AckResponse)
                        },
                        payload: None,
                    });
                }
            }
            Ok(Type::RedeliverUnacknowledgedMessages) => {
                let Some(r) = c.redeliver_unacknowledged_messages else {
                    return;
                };
                let Some((topic, sub)) = cs.consumers.get(&r.consumer_id).cloned() else {
                    return;
                };
                self.with_sub(&topic, &sub, |s| {
                    let ids: Vec<usize> = if r.message_ids.is_empty() {
                        s.in_flight
                            .iter()
                            .filter(|(_, owner)| **owner == (conn, r.consumer_id))
                            .map(|(e, _)| *e)
                            .collect()
                    } else {
                        r.message_ids.iter().map(|m| m.entry_id as usize).collect()
                    };
                    for e in ids {
                        s.give_back(e);
                    }
                });
                self.dispatch(&topic, &sub);
            }
            Ok(Type::CloseConsumer) => {
                let Some(cc) = c.close_consumer else { return };
                if let Some((topic, sub)) = cs.consumers.remove(&cc.consumer_id) {
                    self.remove_consumer(&topic, &sub, conn, cc.consumer_id);
                }
                reply(success(cc.request_id));
            }
            Ok(Type::Unsubscribe) => {
                let Some(u) = c.unsubscribe else { return };
                if let Some((topic, sub)) = cs.consumers.remove(&u.consumer_id) {
                    let mut st = lock(&self.state);
                    if let Some(t) = st.topics.get_mut(&topic) {
                        t.subs.remove(&sub);
                    }
                }
                reply(success(u.request_id));
            }
            _ => {}
        }
    }

    fn with_sub(&self, topic: &str, sub: &str, f: impl FnOnce(&mut Sub)) {
        let mut st = lock(&self.state);
        if let Some(s) = st.topics.get_mut(topic).and_then(|t| t.subs.get_mut(sub)) {
            f(s);
        }
    }

    fn remove_consumer(self: &Arc<Self>, topic: &str, sub: &str, conn: u64, consumer: u64) {
        {
            let mut st = lock(&self.state);
            let Some(t) = st.topics.get_mut(topic) else {
                return;
            };
            let Some(s) = t.subs.get_mut(sub) else { return };
            s.consumers
                .retain(|k| !(k.conn == conn && k.id == consumer));
            let theirs: Vec<usize> = s
                .in_flight
                .iter()
                .filter(|(_, owner)| **owner == (conn, consumer))
                .map(|(e, _)| *e)
                .collect();
            for e in theirs {
                s.give_back(e);
            }
            if s.consumers.is_empty() && !s.durable {
                t.subs.remove(sub);
                return;
            }
        }
        self.dispatch(topic, sub);
    }

    fn dispatch_topic(self: &Arc<Self>, topic: &str) {
        let subs: Vec<String> = lock(&self.state)
            .topics
            .get(topic)
            .map(|t| t.subs.keys().cloned().collect())
            .unwrap_or_default();
        for s in subs {
            self.dispatch(topic, &s);
        }
    }

    /// Hands out what `sub` of `topic` has to the consumers with permits.
    fn dispatch(self: &Arc<Self>, topic: &str, sub: &str) {
        let mut wake: Option<i64> = None;
        {
            let mut st = lock(&self.state);
            let State { topics, conns, .. } = &mut *st;
            let Some(t) = topics.get_mut(topic) else {
                return;
            };
            let Some(s) = t.subs.get_mut(sub) else { return };
            let now = now_ms();
            // delayed messages whose time came
            let due: Vec<i64> = s.delayed.range(..=now).map(|(k, _)| *k).collect();
            for k in due {
                for e in s.delayed.remove(&k).unwrap_or_default() {
                    s.redeliver.insert(e);
                }
            }
            let delays = matches!(s.sub_type, SubType::Shared | SubType::KeyShared);
            while let Some((entry, again)) = s.next_entry(t.entries.len()) {
                let payload = &t.entries[entry];
                if delays && !again {
                    if let Some(at) = payload.metadata.deliver_at_time.filter(|at| *at > now) {
                        s.delayed.entry(at).or_default().push(entry);
                        s.cursor += 1;
                        continue;
                    }
                }
                let Some(k) = s.pick(payload) else { break };
                let consumer = &mut s.consumers[k];
                let count = u32::try_from(payload.metadata.num_messages_in_batch.unwrap_or(1))
                    .unwrap_or(1)
                    .max(1);
                consumer.permits = consumer.permits.saturating_sub(count);
                let (conn, id) = (consumer.conn, consumer.id);
                if again {
                    s.redeliver.remove(&entry);
                } else {
                    s.cursor += 1;
                }
                s.in_flight.insert(entry, (conn, id));
                let message = Message {
                    command: BaseCommand {
                        message: Some(proto::CommandMessage {
                            consumer_id: id,
                            message_id: MessageIdData {
                                ledger_id: t.ledger_id,
                                entry_id: entry as u64,
                                ..Default::default()
                            },
                            redelivery_count: Some(
                                s.redeliveries.get(&entry).copied().unwrap_or(0),
                            ),
                            ..Default::default()
                        }),
                        ..command(Type::Message)
                    },
                    payload: Some(payload.clone()),
                };
                if let Some(tx) = conns.get(&conn) {
                    let _ = tx.send(message);
                }
            }
            if let Some((at, _)) = s.delayed.iter().next() {
                wake = Some(*at);
            }
        }
        if let Some(at) = wake {
            let inner = self.clone();
            let (topic, sub) = (topic.to_string(), sub.to_string());
            let wait = u64::try_from(at - now_ms()).unwrap_or(0);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(wait)).await;
                inner.dispatch(&topic, &sub);
            });
        }
    }
}

impl State {
    fn topic(&mut self, name: &str) -> &mut Topic {
        if !self.topics.contains_key(name) {
            self.next_ledger += 1;
            let ledger_id = self.next_ledger;
            self.topics.insert(
                name.to_string(),
                Topic {
                    ledger_id,
                    entries: Vec::new(),
                    subs: HashMap::new(),
                },
            );
        }
        self.topics
            .get_mut(name)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }
}

impl Sub {
    /// The next entry to hand out, and whether it is a redelivery: what was given back first,
    /// then what was never handed out. Acked and in-flight entries are passed over.
    fn next_entry(&mut self, len: usize) -> Option<(usize, bool)> {
        while let Some(&e) = self.redeliver.iter().next() {
            if self.acked.contains(&e) || self.in_flight.contains_key(&e) {
                self.redeliver.remove(&e);
                continue;
            }
            return Some((e, true));
        }
        while self.cursor < len {
            if self.acked.contains(&self.cursor) {
                self.cursor += 1;
                continue;
            }
            return Some((self.cursor, false));
        }
        None
    }

    /// The consumer that gets `payload`, if one has permits.
    fn pick(&mut self, payload: &Payload) -> Option<usize> {
        let n = self.consumers.len();
        if n == 0 {
            return None;
        }
        let k = match self.sub_type {
            SubType::Exclusive | SubType::Failover => 0,
            SubType::KeyShared => {
                let key = payload
                    .metadata
                    .ordering_key
                    .clone()
                    .or_else(|| {
                        payload
                            .metadata
                            .partition_key
                            .clone()
                            .map(String::into_bytes)
                    })
                    .unwrap_or_default();
                let hash = key
                    .iter()
                    .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(*b)));
                hash as usize % n
            }
            SubType::Shared => {
                let k = (0..n)
                    .map(|i| (self.next_rr + i) % n)
                    .find(|k| self.consumers[*k].permits > 0)?;
                self.next_rr = k + 1;
                k
            }
        };
        (self.consumers[k].permits > 0).then_some(k)
    }

    fn ack(
        &mut self,
        entries: &[Payload],
        id: &MessageIdData,
        cumulative: bool,
        owner: (u64, u64),
    ) {
        let entry = id.entry_id as usize;
        if cumulative {
            let upto: Vec<usize> = self
                .in_flight
                .iter()
                .filter(|(e, o)| **e <= entry && **o == owner)
                .map(|(e, _)| *e)
                .collect();
            for e in upto {
                self.settle(e);
            }
            return;
        }
        let in_batch = entries
            .get(entry)
            .and_then(|p| p.metadata.num_messages_in_batch)
            .unwrap_or(1);
        match id.batch_index {
            Some(index) if index >= 0 && in_batch > 1 => {
                let acked = self.batch_acks.entry(entry).or_default();
                acked.insert(index);
                if acked.len() >= in_batch as usize {
                    self.settle(entry);
                }
            }
            _ => self.settle(entry),
        }
    }

    fn settle(&mut self, entry: usize) {
        self.in_flight.remove(&entry);
        self.redeliver.remove(&entry);
        self.batch_acks.remove(&entry);
        self.redeliveries.remove(&entry);
        self.acked.insert(entry);
    }

    fn give_back(&mut self, entry: usize) {
        if self.in_flight.remove(&entry).is_some() {
            *self.redeliveries.entry(entry).or_default() += 1;
            self.redeliver.insert(entry);
        }
    }
}
