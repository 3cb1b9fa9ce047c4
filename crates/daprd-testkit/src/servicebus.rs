//! An Azure Service Bus test broker: AMQP 1.0 over TCP (`fe2o3-amqp`'s acceptor side) with
//! Service Bus's addressing and management nodes, for the tests of
//! `pubsub.azure.servicebus.topics` and `.queues`. Microsoft's Service Bus emulator is a
//! container image, which cannot run here; this broker is what the components and the SDK
//! suites are tested against.
//!
//! What it does, as Service Bus does it: SASL ANONYMOUS, then claims-based security — a
//! `put-token` on `$cbs` with a SAS token, checked (HMAC-SHA256 with the namespace key, expiry,
//! audience) and answered with `status-code`; a link to an entity without a token for it is
//! detached with `amqp:unauthorized-access`. Entities: a publish to a topic is copied to each
//! of its subscriptions (`<topic>/Subscriptions/<name>`), a publish to anything else goes to
//! the queue of that name; an entity comes into being when a link first names it (as the
//! component's entity management would have made it). Receivers get messages in peek-lock:
//! each carries a lock token (`x-opt-lock-token`), `x-opt-locked-until`,
//! `x-opt-sequence-number`, `x-opt-enqueued-time` and its delivery count; `accepted`
//! completes, `modified`/`released` abandon (back, delivery count + 1; past the maximum
//! delivery count to the dead-letter list), `rejected` dead-letters; a lock that expires
//! makes the message available again. `com.microsoft:renew-lock` on
//! `<entity>/$management` extends locks. A message's time to live and
//! `x-opt-scheduled-enqueue-time` are honoured. It keeps every message it was sent
//! ([`TestBroker::published`]) so a test can compare what the component put on the wire,
//! and cuts every TCP connection on request ([`TestBroker::drop_connections`]).
//!
//! The ATOM management API answers on the same port (a connection whose first byte is not the
//! `A` of AMQP's header is read as HTTP/1.1, as Azure's SDKs address the emulator's API with
//! plain HTTP): `GET /<entity>` answers an Atom entry, or Service Bus's empty feed when there
//! is none; `PUT /<entity>` with a `TopicDescription`, `QueueDescription` or
//! `SubscriptionDescription` creates it (409 when it exists, 404 for a subscription of a
//! missing topic), a queue's or subscription's `MaxDeliveryCount` and `LockDuration` taking
//! effect; every request needs a SAS token for its URL in `Authorization`. After
//! [`TestBroker::require_existing_entities`] a link to an entity nobody created is refused
//! with `amqp:not-found`, as Service Bus refuses it.
//!
//! Left out: sessions, transactions, TLS, persistence across a restart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, SaslAnonymousMechanism, SessionAcceptor,
    SupportedReceiverSettleModes,
};
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::types::definitions::{self, AmqpError};
use fe2o3_amqp::types::messaging::{
    annotations::OwnedKey, ApplicationProperties, Body, Header, Message, MessageAnnotations,
    MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Array, OrderedMap, SimpleValue, Symbol, Timestamp, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};

/// The shared access key name of the test namespace.
pub const KEY_NAME: &str = "RootManageSharedAccessKey";
/// The shared access key of the test namespace.
pub const KEY: &str = "dGVzdC1icm9rZXIta2V5LW5vdC1hLXNlY3JldA==";

/// One AMQP message as the broker holds it.
pub type AmqpMessage = Message<Body<Value>>;

/// A running test broker; it stops when dropped.
pub struct TestBroker {
    port: u16,
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.drop_connections();
    }
}

struct Inner {
    state: Mutex<State>,
    /// Woken when a message becomes available anywhere.
    available: Notify,
    /// Bumped to cut every connection.
    generation: watch::Sender<u64>,
}

struct State {
    /// Topics (lowercase name) and their subscriptions' full addresses.
    topics: HashMap<String, HashSet<String>>,
    /// Queues and subscriptions by lowercase address.
    queues: HashMap<String, Queue>,
    /// Every message received, with the entity it was sent to.
    published: Vec<(String, AmqpMessage)>,
    /// Audiences of accepted `put-token`s, in order.
    tokens: Vec<String>,
    /// Locks renewed so far.
    renewals: usize,
    /// Entities must be made through the management API before a link names them.
    strict: bool,
    /// The description each entity was created with (lowercase path → its XML element).
    descriptions: HashMap<String, String>,
    lock_duration: Duration,
    max_delivery_count: u32,
    next_sequence: i64,
}

#[derive(Default)]
struct Queue {
    /// Available messages by sequence number.
    ready: BTreeMap<i64, Stored>,
    /// Messages in a receiver's hands by lock token.
    locked: HashMap<[u8; 16], (Stored, i64)>,
    dead: Vec<Stored>,
    /// The entity's own `MaxDeliveryCount` (else the broker's).
    max_delivery_count: Option<u32>,
    /// The entity's own `LockDuration` (else the broker's).
    lock_duration: Option<Duration>,
}

#[derive(Clone)]
struct Stored {
    message: AmqpMessage,
    sequence: i64,
    enqueued_ms: i64,
    delivery_count: u32,
    expires_ms: Option<i64>,
    visible_ms: i64,
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

fn symbol_key(name: &str) -> OwnedKey {
    OwnedKey::Symbol(Symbol::from(name))
}

impl TestBroker {
    /// Starts a broker on 127.0.0.1:`port` (0: a free port).
    ///
    /// # Errors
    /// The port cannot be bound.
    pub async fn start(port: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                topics: HashMap::new(),
                queues: HashMap::new(),
                published: Vec::new(),
                tokens: Vec::new(),
                renewals: 0,
                strict: false,
                descriptions: HashMap::new(),
                lock_duration: Duration::from_secs(60),
                max_delivery_count: 10,
                next_sequence: 1,
            }),
            available: Notify::new(),
            generation: watch::channel(0).0,
        });
        let accept = {
            let inner = inner.clone();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    tokio::spawn(serve(inner.clone(), tcp));
                }
            })
        };
        // expired locks make their messages available again
        let sweep = {
            let inner = inner.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if inner.expire_locks() {
                        inner.available.notify_waiters();
                    }
                }
            })
        };
        Ok(Self {
            port,
            inner,
            tasks: vec![accept, sweep],
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection string for this broker (the emulator's form: plain AMQP).
    pub fn connection_string(&self) -> String {
        format!(
            "Endpoint=sb://127.0.0.1:{};SharedAccessKeyName={KEY_NAME};SharedAccessKey={KEY};UseDevelopmentEmulator=true",
            self.port
        )
    }

    /// Cuts every client connection (TCP, without a close frame); what was sent stays, what
    /// was locked becomes available when its lock expires.
    pub fn drop_connections(&self) {
        self.inner.generation.send_modify(|g| *g += 1);
    }

    /// Sets how long a lock lasts (60 s by default) and how often a message may be delivered
    /// before it is dead-lettered (10).
    pub fn configure(&self, lock_duration: Duration, max_delivery_count: u32) {
        let mut s = lock(&self.inner.state);
        s.lock_duration = lock_duration;
        s.max_delivery_count = max_delivery_count;
    }

    /// Every message sent to `entity` (a topic or queue name), as it arrived.
    pub fn published(&self, entity: &str) -> Vec<AmqpMessage> {
        lock(&self.inner.state)
            .published
            .iter()
            .filter(|(e, _)| e.eq_ignore_ascii_case(entity))
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// The audiences of the tokens put on `$cbs`.
    pub fn tokens(&self) -> Vec<String> {
        lock(&self.inner.state).tokens.clone()
    }

    /// From now on a link to an entity that was not created through the management API is
    /// refused (`amqp:not-found`), as Service Bus refuses it.
    pub fn require_existing_entities(&self) {
        lock(&self.inner.state).strict = true;
    }

    /// The description element (`<QueueDescription ...>...`) `path` was created with through
    /// the management API.
    pub fn description(&self, path: &str) -> Option<String> {
        lock(&self.inner.state)
            .descriptions
            .get(&path.to_ascii_lowercase())
            .cloned()
    }

    /// How many locks were renewed.
    pub fn renewals(&self) -> usize {
        lock(&self.inner.state).renewals
    }

    /// (available, locked, dead-lettered) messages of a queue or subscription address.
    pub fn counts(&self, address: &str) -> (usize, usize, usize) {
        let s = lock(&self.inner.state);
        s.queues
            .get(&address.to_ascii_lowercase())
            .map_or((0, 0, 0), |q| (q.ready.len(), q.locked.len(), q.dead.len()))
    }
}

impl Inner {
    /// Returns expired locks' messages to their queues; whether any was.
    fn expire_locks(&self) -> bool {
        let now = now_ms();
        let mut s = lock(&self.state);
        let max = s.max_delivery_count;
        let mut any = false;
        for q in s.queues.values_mut() {
            let expired: Vec<[u8; 16]> = q
                .locked
                .iter()
                .filter(|(_, (_, until))| *until <= now)
                .map(|(t, _)| *t)
                .collect();
            let max = q.max_delivery_count.unwrap_or(max);
            for t in expired {
                if let Some((m, _)) = q.locked.remove(&t) {
                    q.give_back(m, max);
                    any = true;
                }
            }
        }
        any
    }

    /// Stores a message sent to `entity`: to each subscription of a topic, else the queue.
    fn store(&self, entity: &str, message: AmqpMessage) {
        let now = now_ms();
        let mut s = lock(&self.state);
        s.published.push((entity.to_string(), message.clone()));
        let ttl = message
            .header
            .as_ref()
            .and_then(|h| h.ttl)
            .map(|ms| now + i64::from(ms));
        let visible = message
            .message_annotations
            .as_ref()
            .and_then(|a| a.0.get(&symbol_key("x-opt-scheduled-enqueue-time")))
            .and_then(|v| match v {
                Value::Timestamp(t) => Some(t.milliseconds()),
                _ => None,
            })
            .unwrap_or(now);
        let key = entity.to_ascii_lowercase();
        let targets: Vec<String> = match s.topics.get(&key) {
            Some(subs) => subs.iter().cloned().collect(),
            None => vec![key],
        };
        for t in targets {
            let sequence = s.next_sequence;
            s.next_sequence += 1;
            s.queues.entry(t).or_default().ready.insert(
                sequence,
                Stored {
                    message: message.clone(),
                    sequence,
                    enqueued_ms: now,
                    delivery_count: 0,
                    expires_ms: ttl,
                    visible_ms: visible,
                },
            );
        }
        drop(s);
        self.available.notify_waiters();
    }

    /// Whether a link may name `address`: it exists, or entities come into being on first
    /// use (the broker is not strict).
    fn may_link(&self, address: &str) -> bool {
        let key = address.to_ascii_lowercase();
        let s = lock(&self.state);
        !s.strict || s.topics.contains_key(&key) || s.queues.contains_key(&key)
    }

    /// Makes `address` exist (a subscription also makes its topic).
    fn ensure(&self, address: &str) {
        let key = address.to_ascii_lowercase();
        let mut s = lock(&self.state);
        if let Some((topic, _)) = key.split_once("/subscriptions/") {
            s.topics
                .entry(topic.to_string())
                .or_default()
                .insert(key.clone());
        }
        s.queues.entry(key).or_default();
    }

    /// Takes the next available message of `address` and locks it.
    fn take(&self, address: &str) -> Option<(AmqpMessage, [u8; 16])> {
        let now = now_ms();
        let mut s = lock(&self.state);
        let default_duration = s.lock_duration;
        let q = s.queues.get_mut(&address.to_ascii_lowercase())?;
        let duration = i64::try_from(q.lock_duration.unwrap_or(default_duration).as_millis())
            .unwrap_or(i64::MAX);
        q.ready.retain(|_, m| m.expires_ms.is_none_or(|e| e > now));
        let sequence = *q
            .ready
            .iter()
            .find(|(_, m)| m.visible_ms <= now)
            .map(|(k, _)| k)?;
        let m = q.ready.remove(&sequence)?;
        let token = *uuid::Uuid::new_v4().as_bytes();
        let until = now + duration;
        let mut out = m.message.clone();
        let header = out.header.get_or_insert_with(Header::default);
        header.delivery_count = m.delivery_count;
        let annotations = out
            .message_annotations
            .get_or_insert_with(|| MessageAnnotations(OrderedMap::new()));
        annotations.0.insert(
            symbol_key("x-opt-lock-token"),
            Value::Uuid(fe2o3_amqp::types::primitives::Uuid::from(token)),
        );
        annotations.0.insert(
            symbol_key("x-opt-locked-until"),
            Value::Timestamp(Timestamp::from_milliseconds(until)),
        );
        annotations
            .0
            .insert(symbol_key("x-opt-sequence-number"), Value::Long(m.sequence));
        annotations.0.insert(
            symbol_key("x-opt-enqueued-time"),
            Value::Timestamp(Timestamp::from_milliseconds(m.enqueued_ms)),
        );
        q.locked.insert(token, (m, until));
        Some((out, token))
    }

    /// Settles the message locked with `token` by the receiver's outcome.
    fn settle(&self, address: &str, token: [u8; 16], outcome: Option<&Outcome>) {
        let mut s = lock(&self.state);
        let max = s.max_delivery_count;
        let Some(q) = s.queues.get_mut(&address.to_ascii_lowercase()) else {
            return;
        };
        // a lock that expired meanwhile: the message is already available again
        let Some((m, _)) = q.locked.remove(&token) else {
            return;
        };
        match outcome {
            Some(Outcome::Accepted(_)) => {}
            Some(Outcome::Rejected(_)) => q.dead.push(m),
            Some(_) => {
                let max = q.max_delivery_count.unwrap_or(max);
                q.give_back(m, max);
            }
            // no outcome (the link went away): locked until the lock expires
            None => {
                let until = now_ms() + i64::try_from(s.lock_duration.as_millis()).unwrap_or(0);
                if let Some(q) = s.queues.get_mut(&address.to_ascii_lowercase()) {
                    q.locked.insert(token, (m, until));
                }
                return;
            }
        }
        drop(s);
        self.available.notify_waiters();
    }

    /// Puts back the message locked with `token` that was never sent.
    fn unsend(&self, address: &str, token: [u8; 16]) {
        let mut s = lock(&self.state);
        if let Some(q) = s.queues.get_mut(&address.to_ascii_lowercase()) {
            if let Some((m, _)) = q.locked.remove(&token) {
                q.ready.insert(m.sequence, m);
            }
        }
        drop(s);
        self.available.notify_waiters();
    }

    /// Extends the locks of `tokens` on `address`; their new expiry, or `None` for a lock
    /// that is gone.
    fn renew(&self, address: &str, tokens: &[[u8; 16]]) -> Vec<Option<i64>> {
        let mut s = lock(&self.state);
        let until = now_ms() + i64::try_from(s.lock_duration.as_millis()).unwrap_or(0);
        let mut renewed = 0;
        let out = match s.queues.get_mut(&address.to_ascii_lowercase()) {
            None => vec![None; tokens.len()],
            Some(q) => tokens
                .iter()
                .map(|t| {
                    q.locked.get_mut(t).map(|(_, u)| {
                        *u = until;
                        renewed += 1;
                        until
                    })
                })
                .collect(),
        };
        s.renewals += renewed;
        out
    }
}

/// When the message locked with `token` expires (its time to live).
fn message_expiry(inner: &Inner, address: &str, token: [u8; 16]) -> Option<i64> {
    let s = lock(&inner.state);
    s.queues
        .get(&address.to_ascii_lowercase())
        .and_then(|q| q.locked.get(&token))
        .and_then(|(m, _)| m.expires_ms)
}

impl Inner {
    /// Drops the message locked with `token` (it expired before it could be sent).
    fn discard(&self, address: &str, token: [u8; 16]) {
        let mut s = lock(&self.state);
        if let Some(q) = s.queues.get_mut(&address.to_ascii_lowercase()) {
            q.locked.remove(&token);
        }
    }
}

impl Queue {
    /// An abandoned or expired message: available again, or dead-lettered after the maximum
    /// delivery count.
    fn give_back(&mut self, mut m: Stored, max_delivery_count: u32) {
        m.delivery_count += 1;
        if m.delivery_count >= max_delivery_count {
            self.dead.push(m);
        } else {
            self.ready.insert(m.sequence, m);
        }
    }
}

/// What one client connection shares between its links.
#[derive(Default)]
struct ConnState {
    /// Audiences authorized on this connection.
    authorized: HashSet<String>,
    /// Answers by the client's reply address, and by `node:<node>` for requests that name
    /// none (Azure's Python SDK sends none: the answer goes to the node's other link). The
    /// channel is made by whichever comes first — an answer can be ready before the task of
    /// the client's reply link has run — and its receiver is taken by that task.
    replies: HashMap<String, ReplyChannel>,
}

type ReplyChannel = (
    mpsc::UnboundedSender<AmqpMessage>,
    Option<mpsc::UnboundedReceiver<AmqpMessage>>,
);

impl ConnState {
    fn reply_sender(&mut self, to: &str) -> mpsc::UnboundedSender<AmqpMessage> {
        self.replies
            .entry(to.to_string())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                (tx, Some(rx))
            })
            .0
            .clone()
    }

    /// The answers to `to` (what was answered before the reply link came included).
    fn reply_receiver(&mut self, to: &str) -> mpsc::UnboundedReceiver<AmqpMessage> {
        let _ = self.reply_sender(to);
        let entry = self.replies.get_mut(to).and_then(|(_, rx)| rx.take());
        entry.unwrap_or_else(|| {
            // a second reply link for the same address: it gets the answers from now on
            let (tx, rx) = mpsc::unbounded_channel();
            self.replies.insert(to.to_string(), (tx, None));
            rx
        })
    }
}

type Shared = Arc<Mutex<ConnState>>;

fn conn_lock(c: &Shared) -> MutexGuard<'_, ConnState> {
    c.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves one TCP connection: the AMQP engine runs on one end of an in-memory pipe whose other
/// end is shuttled to the socket, so a drop cuts the socket without a close frame.
async fn serve(inner: Arc<Inner>, mut tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    // AMQP's protocol header starts with `A`; no HTTP method does
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(1) if first[0] != b'A' => return serve_http(&inner, tcp).await,
        Ok(1) => {}
        _ => return,
    }
    let mut generation = inner.generation.subscribe();
    let (engine_side, mut pipe) = tokio::io::duplex(256 * 1024);
    let amqp = tokio::spawn(run_connection(inner.clone(), engine_side));
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut tcp, &mut pipe) => {}
        _ = generation.changed() => {}
    }
    amqp.abort();
    drop(tcp);
}

async fn run_connection(inner: Arc<Inner>, io: tokio::io::DuplexStream) {
    let acceptor = ConnectionAcceptor::builder()
        .container_id("servicebus-testbroker")
        .sasl_acceptor(SaslAnonymousMechanism::new())
        .build();
    let Ok(mut connection) = acceptor.accept(io).await else {
        return;
    };
    let shared: Shared = Arc::default();
    let sessions = SessionAcceptor::new();
    let mut tasks = Vec::new();
    while let Ok(session) = sessions.accept(&mut connection).await {
        tasks.push(tokio::spawn(run_session(
            inner.clone(),
            shared.clone(),
            session,
        )));
    }
    for t in tasks {
        t.abort();
    }
}

async fn run_session(
    inner: Arc<Inner>,
    shared: Shared,
    mut session: fe2o3_amqp::acceptor::ListenerSessionHandle,
) {
    // Where the client sends, the broker settles at once (rcv-settle-mode first, as Service
    // Bus answers a sender that asks for second); where it receives, either mode.
    let to_clients = LinkAcceptor::new();
    let from_clients = LinkAcceptor::builder()
        .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(definitions::ReceiverSettleMode::First)
        .build();
    let mut tasks = Vec::new();
    while let Some(attach) = session.next_incoming_attach().await {
        let acceptor = match attach.role {
            definitions::Role::Sender => &from_clients,
            definitions::Role::Receiver => &to_clients,
        };
        let Ok(link) = acceptor.accept_incoming_attach(attach, &mut session).await else {
            continue;
        };
        let (inner, shared) = (inner.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            match link {
                LinkEndpoint::Receiver(r) => incoming(inner, shared, r).await,
                LinkEndpoint::Sender(s) => outgoing(inner, shared, s).await,
            }
        }));
    }
    for t in tasks {
        t.abort();
    }
}

/// An entity's path in a link address: Azure's SDKs name entities by their full URI
/// (`amqps://<host>/<path>`), the Go SDK by the path alone; Service Bus takes both.
fn entity_path(address: &str) -> String {
    match address.split_once("://") {
        Some((_, rest)) => rest.split_once('/').map_or("", |(_, p)| p).to_string(),
        None => address.to_string(),
    }
}

fn target_address(r: &Receiver) -> String {
    entity_path(
        &r.target()
            .as_ref()
            .and_then(|t| t.address.clone())
            .unwrap_or_default(),
    )
}

fn source_address(s: &Sender) -> String {
    entity_path(
        &s.source()
            .as_ref()
            .and_then(|t| t.address.clone())
            .unwrap_or_default(),
    )
}

/// Whether a token for `address` (or an entity containing it) was put on this connection.
fn authorized(shared: &Shared, address: &str) -> bool {
    let address = address.to_ascii_lowercase();
    conn_lock(shared).authorized.iter().any(|aud| {
        let path = aud.split_once("://").map_or(aud.as_str(), |(_, r)| r);
        let path = path
            .split_once('/')
            .map_or("", |(_, p)| p)
            .to_ascii_lowercase();
        address == path || address.starts_with(&format!("{path}/"))
    })
}

fn not_found(address: &str) -> definitions::Error {
    definitions::Error::new(
        AmqpError::NotFound,
        Some(format!("the messaging entity {address} could not be found")),
        None,
    )
}

fn unauthorized(address: &str) -> definitions::Error {
    definitions::Error::new(
        AmqpError::UnauthorizedAccess,
        Some(format!("no token was put on $cbs for {address}")),
        None,
    )
}

/// A link on which the client sends: `$cbs` and `$management` requests, or messages.
async fn incoming(inner: Arc<Inner>, shared: Shared, mut r: Receiver) {
    let address = target_address(&r);
    if address == "$cbs" {
        while let Ok(d) = r.recv::<Body<Value>>().await {
            let _ = r.accept(&d).await;
            let request = d.into_message();
            let (status, description) = put_token(&inner, &shared, &request);
            let mut props = OrderedMap::new();
            props.insert("status-code".to_string(), SimpleValue::Int(status));
            props.insert(
                "status-description".to_string(),
                SimpleValue::String(description),
            );
            reply(&shared, "$cbs", &request, props, Value::Null);
        }
        return;
    }
    if let Some(entity) = address.strip_suffix("/$management") {
        if !authorized(&shared, entity) {
            let _ = r.close_with_error(unauthorized(&address)).await;
            return;
        }
        while let Ok(d) = r.recv::<Body<Value>>().await {
            let _ = r.accept(&d).await;
            let request = d.into_message();
            let (status, body) = management(&inner, entity, &request);
            let mut props = OrderedMap::new();
            props.insert("statusCode".to_string(), SimpleValue::Int(status));
            reply(&shared, &address, &request, props, body);
        }
        return;
    }
    if !authorized(&shared, &address) {
        let _ = r.close_with_error(unauthorized(&address)).await;
        return;
    }
    if !inner.may_link(&address) {
        let _ = r.close_with_error(not_found(&address)).await;
        return;
    }
    while let Ok(d) = r.recv::<Body<Value>>().await {
        // stored before the client hears it was accepted
        inner.store(&address, d.message().clone());
        let _ = r.accept(&d).await;
    }
}

/// Checks a `put-token` request; (status, description).
fn put_token(inner: &Inner, shared: &Shared, request: &AmqpMessage) -> (i32, String) {
    let prop = |k: &str| {
        request
            .application_properties
            .as_ref()
            .and_then(|a| a.0.get(k))
            .and_then(|v| match v {
                SimpleValue::String(s) => Some(s.clone()),
                _ => None,
            })
    };
    if prop("operation").as_deref() != Some("put-token") {
        return (400, "unknown operation".into());
    }
    let Some(audience) = prop("name") else {
        return (400, "no name".into());
    };
    let token = match &request.body {
        Body::Value(v) => match &v.0 {
            Value::String(s) => s.clone(),
            _ => String::new(),
        },
        _ => String::new(),
    };
    match check_sas(&token, &audience) {
        Ok(()) => {
            conn_lock(shared).authorized.insert(audience.clone());
            lock(&inner.state).tokens.push(audience);
            (200, "OK".into())
        }
        Err(why) => (401, why),
    }
}

/// Verifies a SAS token for `audience` against the namespace key.
fn check_sas(token: &str, audience: &str) -> Result<(), String> {
    let fields = token
        .strip_prefix("SharedAccessSignature ")
        .ok_or("not a SharedAccessSignature")?;
    let mut parts = HashMap::new();
    for kv in fields.split('&') {
        let (k, v) = kv.split_once('=').ok_or("malformed token")?;
        parts.insert(k, v);
    }
    let (sr, sig, se, skn) = match (
        parts.get("sr"),
        parts.get("sig"),
        parts.get("se"),
        parts.get("skn"),
    ) {
        (Some(a), Some(b), Some(c), Some(d)) => (*a, *b, *c, *d),
        _ => return Err("token lacks sr, sig, se or skn".into()),
    };
    if skn != KEY_NAME {
        return Err(format!("unknown key name {skn}"));
    }
    let expiry: i64 = se.parse().map_err(|_| "bad se")?;
    if expiry * 1000 <= now_ms() {
        return Err("token expired".into());
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, KEY.as_bytes());
    let signature = daprd_core::gocompat::query_unescape(sig).ok_or("bad sig escape")?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|_| "sig is not base64")?;
    ring::hmac::verify(&key, format!("{sr}\n{se}").as_bytes(), &signature)
        .map_err(|_| "signature mismatch")?;
    let resource = daprd_core::gocompat::query_unescape(sr).ok_or("bad sr escape")?;
    let strip = |s: &str| {
        s.split_once("://")
            .map_or(s, |(_, r)| r)
            .to_ascii_lowercase()
    };
    if !strip(audience).starts_with(&strip(&resource)) {
        return Err(format!("token for {resource} does not cover {audience}"));
    }
    Ok(())
}

/// Answers a request to an entity's `$management` node: (statusCode, body).
fn management(inner: &Inner, entity: &str, request: &AmqpMessage) -> (i32, Value) {
    let operation = request
        .application_properties
        .as_ref()
        .and_then(|a| a.0.get("operation"))
        .and_then(|v| match v {
            SimpleValue::String(s) => Some(s.as_str()),
            _ => None,
        });
    if operation != Some("com.microsoft:renew-lock") {
        return (501, Value::Null);
    }
    let tokens: Vec<[u8; 16]> = match &request.body {
        Body::Value(v) => match &v.0 {
            Value::Map(m) => match m.get(&Value::String("lock-tokens".into())) {
                Some(Value::Array(a)) => {
                    a.0.iter()
                        .filter_map(|t| match t {
                            Value::Uuid(u) => Some(*u.as_inner()),
                            _ => None,
                        })
                        .collect()
                }
                _ => Vec::new(),
            },
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let renewed = inner.renew(entity, &tokens);
    if renewed.iter().any(Option::is_none) {
        // Service Bus: 410 Gone, com.microsoft:message-lock-lost
        return (410, Value::Null);
    }
    let mut body = OrderedMap::new();
    body.insert(
        Value::String("expirations".into()),
        Value::Array(Array(
            renewed
                .into_iter()
                .map(|t| Value::Timestamp(Timestamp::from_milliseconds(t.unwrap_or(0))))
                .collect(),
        )),
    );
    (200, Value::Map(body))
}

/// Sends the answer to a request to `node` on the client's reply link.
fn reply(
    shared: &Shared,
    node: &str,
    request: &AmqpMessage,
    props: OrderedMap<String, SimpleValue>,
    body: Value,
) {
    let Some(p) = request.properties.as_ref() else {
        return;
    };
    let to = p.reply_to.clone().unwrap_or_else(|| format!("node:{node}"));
    let answer = Message::builder()
        .properties(Properties {
            correlation_id: p.message_id.clone().or(Some(MessageId::Ulong(0))),
            ..Default::default()
        })
        .application_properties(ApplicationProperties(props))
        .body(Body::Value(fe2o3_amqp::types::messaging::AmqpValue(body)))
        .build();
    let tx = conn_lock(shared).reply_sender(&to);
    let _ = tx.send(answer);
}

/// A link on which the client receives: a reply link of `$cbs`/`$management`, or an entity
/// in peek-lock.
async fn outgoing(inner: Arc<Inner>, shared: Shared, mut s: Sender) {
    let address = source_address(&s);
    if address == "$cbs" || address.ends_with("/$management") {
        let reply_to = s
            .target()
            .as_ref()
            .and_then(|t| t.address.clone())
            .unwrap_or_default();
        let (mut by_node, mut by_address) = {
            let mut c = conn_lock(&shared);
            (
                c.reply_receiver(&format!("node:{address}")),
                c.reply_receiver(&reply_to),
            )
        };
        loop {
            let answer = tokio::select! {
                Some(m) = by_node.recv() => m,
                Some(m) = by_address.recv() => m,
                else => break,
            };
            if s.send(answer).await.is_err() {
                break;
            }
        }
        return;
    }
    if !authorized(&shared, &address) {
        let _ = s.close_with_error(unauthorized(&address)).await;
        return;
    }
    if !inner.may_link(&address) {
        let _ = s.close_with_error(not_found(&address)).await;
        return;
    }
    inner.ensure(&address);
    loop {
        let notified = inner.available.notified();
        let Some((message, token)) = inner.take(&address) else {
            // woken by a new message, or a scheduled one's time coming
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            continue;
        };
        let expires = message_expiry(&inner, &address, token);
        // waiting for credit: a message that expires meanwhile is not sent (and is gone)
        let sent = match expires {
            Some(at) => {
                let wait = Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0));
                match tokio::time::timeout(wait, s.send_batchable(message)).await {
                    Ok(sent) => sent,
                    Err(_) => {
                        inner.discard(&address, token);
                        continue;
                    }
                }
            }
            None => s.send_batchable(message).await,
        };
        match sent {
            Ok(fut) => {
                let (inner, address) = (inner.clone(), address.clone());
                tokio::spawn(async move {
                    let outcome = fut.await.ok();
                    inner.settle(&address, token, outcome.as_ref());
                });
            }
            Err(_) => {
                // never sent (the link went away while it waited for credit): available again
                // at once, its delivery count as it was
                inner.unsend(&address, token);
                return;
            }
        }
    }
}

/// One request to the ATOM management API (the connection closes after it).
async fn serve_http(inner: &Inner, mut tcp: TcpStream) {
    let Some(request) = crate::http1::read_request(&mut tcp).await else {
        return;
    };
    let (status, body) = manage(inner, &request);
    crate::http1::respond(
        &mut tcp,
        status,
        "application/atom+xml;type=entry;charset=utf-8",
        &body,
    )
    .await;
}

const ATOM_ERROR: &str = "<Error><Code>{code}</Code><Detail>{detail}</Detail></Error>";

fn atom_error(status: &'static str, detail: &str) -> (&'static str, String) {
    let code = status.split(' ').next().unwrap_or_default();
    (
        status,
        ATOM_ERROR
            .replace("{code}", code)
            .replace("{detail}", detail),
    )
}

/// Answers a management request: (status line, body).
fn manage(inner: &Inner, request: &crate::http1::Request) -> (&'static str, String) {
    let host = request.header("host").unwrap_or_default();
    let audience = format!("http://{host}{}", request.path);
    if let Err(why) = check_sas(
        request.header("authorization").unwrap_or_default(),
        &audience,
    ) {
        return atom_error("401 Unauthorized", &why);
    }
    let path = request.path.trim_start_matches('/').to_ascii_lowercase();
    if path.is_empty() {
        return atom_error("400 Bad Request", "no entity path");
    }
    let mut s = lock(&inner.state);
    match request.method.as_str() {
        "GET" => get_entity(&s, &path),
        "PUT" => create_entity(&mut s, &path, &request.body),
        _ => atom_error("405 Method Not Allowed", &request.method),
    }
}

fn entity_exists(s: &State, path: &str) -> bool {
    s.topics.contains_key(path) || s.queues.contains_key(path)
}

/// `GET <path>`: the entity's entry, or (as Service Bus answers a missing entity) a feed of
/// nothing.
fn get_entity(s: &State, path: &str) -> (&'static str, String) {
    if entity_exists(s, path) {
        let description = s.descriptions.get(path).cloned().unwrap_or_default();
        return ("200 OK", atom_entry(path, &description));
    }
    (
        "200 OK",
        format!("<feed xmlns=\"http://www.w3.org/2005/Atom\"><title type=\"text\">Publicly Listed Services</title><id>uuid:{}</id><updated>1970-01-01T00:00:00Z</updated></feed>", uuid::Uuid::new_v4()),
    )
}

/// `PUT <path>` with an entry holding a topic, subscription or queue description: creates
/// it with the description's MaxDeliveryCount and LockDuration.
fn create_entity(s: &mut State, path: &str, body: &str) -> (&'static str, String) {
    if entity_exists(s, path) {
        return atom_error("409 Conflict", &format!("entity {path} already exists"));
    }
    let kind = [
        "SubscriptionDescription",
        "QueueDescription",
        "TopicDescription",
    ]
    .into_iter()
    .find(|k| body.contains(&format!("<{k} ")) || body.contains(&format!("<{k}>")));
    let Some(kind) = kind else {
        return atom_error("400 Bad Request", "the entry holds no entity description");
    };
    let Some(description) = element(body, kind) else {
        return atom_error("400 Bad Request", &format!("{kind} is not closed"));
    };
    match (kind, path.split_once("/subscriptions/")) {
        ("SubscriptionDescription", Some((topic, _))) => {
            let Some(subs) = s.topics.get_mut(topic) else {
                return atom_error("404 Not Found", &format!("topic {topic} does not exist"));
            };
            subs.insert(path.to_string());
        }
        ("SubscriptionDescription", None) | (_, Some(_)) => {
            return atom_error(
                "400 Bad Request",
                &format!("{kind} does not fit path {path}"),
            );
        }
        ("TopicDescription", None) => {
            s.topics.insert(path.to_string(), HashSet::new());
        }
        _ => {}
    }
    if kind != "TopicDescription" {
        let queue = Queue {
            max_delivery_count: value(&description, "MaxDeliveryCount")
                .and_then(|v| v.parse().ok()),
            lock_duration: value(&description, "LockDuration")
                .and_then(|v| iso_seconds(&v))
                .map(Duration::from_secs),
            ..Queue::default()
        };
        s.queues.insert(path.to_string(), queue);
    }
    s.descriptions.insert(path.to_string(), description.clone());
    ("201 Created", atom_entry(path, &description))
}

fn atom_entry(path: &str, description: &str) -> String {
    format!(
        "<entry xmlns=\"http://www.w3.org/2005/Atom\"><id>https://testbroker/{path}</id><title type=\"text\">{path}</title><content type=\"application/xml\">{description}</content></entry>"
    )
}

/// The element `name` of `xml` (its start tag to its end tag), if closed.
fn element(xml: &str, name: &str) -> Option<String> {
    let start = xml.find(&format!("<{name}"))?;
    let end_tag = format!("</{name}>");
    let end = xml[start..].find(&end_tag)? + start + end_tag.len();
    Some(xml[start..end].to_string())
}

/// The text of child element `name` in `xml`.
fn value(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(xml[start..end].to_string())
}

/// Seconds of an ISO 8601 duration of days, hours, minutes and seconds (`P1DT2H3M4S`).
fn iso_seconds(v: &str) -> Option<u64> {
    let rest = v.strip_prefix('P')?;
    let (days, time) = rest.split_once('T').unwrap_or((rest, ""));
    let mut total = 0u64;
    let mut number = String::new();
    for (part, units) in [
        (days, &[('D', 86_400)][..]),
        (time, &[('H', 3600), ('M', 60), ('S', 1)][..]),
    ] {
        for c in part.chars() {
            if c.is_ascii_digit() {
                number.push(c);
            } else {
                let size = units.iter().find(|(u, _)| *u == c)?.1;
                total += number.parse::<u64>().ok()? * size;
                number.clear();
            }
        }
    }
    number.is_empty().then_some(total)
}
