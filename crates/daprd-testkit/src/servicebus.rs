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
//! Sessions, as Service Bus keeps them on an entity that requires them (`RequiresSession` in
//! its description, or made by a session receiver's link): a receiver whose source carries the
//! session filter (`com.microsoft:session-filter`) left empty is given the first free session
//! that has a message, its id in the filter of the source the broker answers with, and that
//! session is locked to the link; when none is free within [`SESSION_WAIT`] the attach is
//! answered with no source and detached with `com.microsoft:timeout`. The link gets only its
//! session's messages, in order, one at a time (the next once the last is settled, so an
//! abandoned one comes back first); the session lock
//! (`com.microsoft:renew-session-lock` on `$management` extends it) covers its messages; the
//! session is free again when the link goes (what it left unsettled is abandoned) or its lock
//! expires (the link is then detached with `com.microsoft:session-lock-lost`).
//!
//! With [`TestBroker::start_tls`] it speaks TLS on its one port (AMQP and the management API,
//! told apart by the first decrypted byte), as Service Bus does, and takes Microsoft Entra ID
//! tokens — a `put-token` of type `jwt`, an `Authorization: Bearer` on the API — that the
//! test's check ([`TestBroker::trust_jwt`]) says are good.
//!
//! [`TestBroker::start_persistent`] (the binary's `--data-dir`) keeps entities and messages in
//! a file rewritten before each change is answered, for the broker-restart fault test.
//!
//! Event hubs are served too ([`eventhubs`]: partitions, offsets, consumer groups' receivers).
//!
//! Left out: session state, transactions.

pub mod eventhubs;
mod framing;

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

/// How long a session receiver's attach waits for a free session before it is refused with
/// `com.microsoft:timeout` (Service Bus waits longer; the component asks again either way).
pub const SESSION_WAIT: Duration = Duration::from_secs(1);

/// Service Bus's session filter on a receiver's source, and its descriptor.
const SESSION_FILTER: &str = "com.microsoft:session-filter";
const SESSION_FILTER_CODE: u64 = 0x0000_0137_0000_000C;

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

/// Tells a good Microsoft Entra ID token (a `jwt` put on `$cbs`, a bearer token on the
/// management API) from a bad one.
pub type JwtCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

struct Inner {
    state: Mutex<State>,
    /// TLS (amqps and https on the one port), as Service Bus itself; else plain, as the
    /// emulator.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Entra ID tokens are taken when this says they are good (none are otherwise).
    jwt: Mutex<Option<JwtCheck>>,
    /// Where the entities and their messages are kept across a restart (rewritten after
    /// every change, before the change is answered), if anywhere.
    data_file: Option<std::path::PathBuf>,
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
    /// Event hubs by lowercase name.
    hubs: HashMap<String, eventhubs::Hub>,
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
    /// Whether it requires sessions.
    requires_session: bool,
    /// Locked sessions: id → locked until (ms since the epoch).
    sessions: HashMap<String, i64>,
}

/// A locked message's lock expiry when its session's lock covers it instead.
const SESSION_LOCKED: i64 = i64::MAX;

/// The session (group id) of a stored message.
fn group_of(m: &Stored) -> Option<&str> {
    m.message.properties.as_ref()?.group_id.as_deref()
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
        Self::start_with(port, None, None).await
    }

    /// Starts a broker that keeps its entities and messages in `dir` (a file rewritten after
    /// every change, before the client hears of it) and starts from what is there: one that is
    /// killed and started again on the same directory has every message it accepted and did
    /// not see completed (locks do not survive; what was locked is available again).
    ///
    /// # Errors
    /// The port cannot be bound, or the kept data cannot be read.
    pub async fn start_persistent(port: u16, dir: &std::path::Path) -> std::io::Result<Self> {
        Self::start_with(port, None, Some(dir.join("servicebus-testbroker.json"))).await
    }

    /// Starts a broker speaking TLS (AMQP and the management API), presenting `cert_pem`
    /// (with `key_pem`), as Service Bus does; reach it as [`TestBroker::namespace`].
    ///
    /// # Errors
    /// The port cannot be bound, or rustls refuses the certificate or key.
    pub async fn start_tls(port: u16, cert_pem: &str, key_pem: &str) -> std::io::Result<Self> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(e.to_string()))?;
        Self::start_with(
            port,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
            None,
        )
        .await
    }

    /// The namespace name of a TLS broker (`localhost:<port>`, the name its certificate is for).
    pub fn namespace(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// Takes Microsoft Entra ID tokens that `check` says are good.
    pub fn trust_jwt(&self, check: JwtCheck) {
        *self
            .inner
            .jwt
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(check);
    }

    async fn start_with(
        port: u16,
        tls: Option<tokio_rustls::TlsAcceptor>,
        data_file: Option<std::path::PathBuf>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let mut state = State {
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
            hubs: HashMap::new(),
        };
        if let Some(file) = data_file.as_deref().filter(|f| f.exists()) {
            let text = std::fs::read_to_string(file)?;
            persist::load(&text, &mut state).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", file.display()),
                )
            })?;
        }
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            available: Notify::new(),
            generation: watch::channel(0).0,
            tls,
            jwt: Mutex::new(None),
            data_file,
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
    /// Writes `s` to the data file (if the broker keeps one): to a new file, then renamed over
    /// the old one, so a kill leaves one or the other whole.
    fn save(&self, s: &State) {
        let Some(file) = &self.data_file else {
            return;
        };
        let tmp = file.with_extension("json.new");
        let written = std::fs::write(&tmp, persist::dump(s)).and_then(|()| {
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, file)
        });
        if let Err(e) = written {
            eprintln!(
                "servicebus-testbroker: keeping data in {}: {e}",
                file.display()
            );
        }
    }

    /// Whether an Entra ID token is good (by the check the test gave).
    fn check_jwt(&self, token: &str) -> Result<(), String> {
        let check = self
            .jwt
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match check {
            Some(check) if check(token) => Ok(()),
            Some(_) => Err("the Microsoft Entra ID token is not valid".into()),
            None => Err("this namespace takes no Microsoft Entra ID tokens".into()),
        }
    }

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
            let lapsed: Vec<String> = q
                .sessions
                .iter()
                .filter(|(_, until)| **until <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in lapsed {
                q.release_session(&id, max);
                any = true;
            }
        }
        if any {
            self.save(&s);
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
        self.save(&s);
        drop(s);
        self.available.notify_waiters();
    }

    /// Whether `address` requires sessions.
    fn requires_session(&self, address: &str) -> bool {
        let s = lock(&self.state);
        s.queues
            .get(&address.to_ascii_lowercase())
            .is_some_and(|q| q.requires_session)
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
        let mut made = false;
        if let Some((topic, _)) = key.split_once("/subscriptions/") {
            made |= s
                .topics
                .entry(topic.to_string())
                .or_default()
                .insert(key.clone());
        }
        if let std::collections::hash_map::Entry::Vacant(e) = s.queues.entry(key) {
            e.insert(Queue::default());
            made = true;
        }
        if made {
            self.save(&s);
        }
    }

    /// Takes the next available message of `address` (of its session `session`) and locks it.
    fn take(&self, address: &str, session: Option<&str>) -> Option<(AmqpMessage, [u8; 16])> {
        let now = now_ms();
        let mut s = lock(&self.state);
        let default_duration = s.lock_duration;
        let q = s.queues.get_mut(&address.to_ascii_lowercase())?;
        let duration = q.lock_ms(default_duration);
        q.ready.retain(|_, m| m.expires_ms.is_none_or(|e| e > now));
        let sequence = *q
            .ready
            .iter()
            .find(|(_, m)| m.visible_ms <= now && session.is_none_or(|id| group_of(m) == Some(id)))
            .map(|(k, _)| k)?;
        let m = q.ready.remove(&sequence)?;
        let token = *uuid::Uuid::new_v4().as_bytes();
        // a session's lock covers its messages
        let (until, lock) = match session.and_then(|id| q.sessions.get(id)) {
            Some(session_until) => (*session_until, SESSION_LOCKED),
            None => (now + duration, now + duration),
        };
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
        q.locked.insert(token, (m, lock));
        Some((out, token))
    }

    /// Makes `address` ready for a session receiver: an entity that comes into being here
    /// requires sessions; an existing one must.
    fn session_entity(&self, address: &str) -> Result<(), definitions::Error> {
        self.ensure(address);
        let mut s = lock(&self.state);
        let key = address.to_ascii_lowercase();
        let described = s.descriptions.contains_key(&key);
        let Some(q) = s.queues.get_mut(&key) else {
            return Err(not_found(address));
        };
        let fresh = q.ready.is_empty() && q.locked.is_empty() && q.dead.is_empty();
        if !q.requires_session && fresh && !described {
            q.requires_session = true;
        }
        if q.requires_session {
            Ok(())
        } else {
            Err(definitions::Error::new(
                AmqpError::NotAllowed,
                Some(format!(
                    "the entity {address} does not require sessions: a session receiver cannot read it"
                )),
                None,
            ))
        }
    }

    /// Locks the first free session of `address` that has a message available; its id.
    fn lock_next_session(&self, address: &str) -> Option<String> {
        let now = now_ms();
        let mut s = lock(&self.state);
        let default_duration = s.lock_duration;
        let q = s.queues.get_mut(&address.to_ascii_lowercase())?;
        let duration = q.lock_ms(default_duration);
        q.ready.retain(|_, m| m.expires_ms.is_none_or(|e| e > now));
        let id = q
            .ready
            .values()
            .filter(|m| m.visible_ms <= now)
            .filter_map(group_of)
            .find(|g| !q.sessions.contains_key(*g))?
            .to_string();
        q.sessions.insert(id.clone(), now + duration);
        Some(id)
    }

    /// Whether session `id` of `address` is still locked.
    fn holds_session(&self, address: &str, id: &str) -> bool {
        let now = now_ms();
        let s = lock(&self.state);
        s.queues
            .get(&address.to_ascii_lowercase())
            .and_then(|q| q.sessions.get(id))
            .is_some_and(|until| *until > now)
    }

    /// Frees session `id` of `address` (its link went): what it left unsettled is abandoned.
    fn release_session(&self, address: &str, id: &str) {
        let mut s = lock(&self.state);
        let max = s.max_delivery_count;
        if let Some(q) = s.queues.get_mut(&address.to_ascii_lowercase()) {
            let max = q.max_delivery_count.unwrap_or(max);
            q.release_session(id, max);
        }
        self.save(&s);
        drop(s);
        self.available.notify_waiters();
    }

    /// Extends the lock of session `id` of `address`; its new expiry, or `None` when the
    /// session is not locked.
    fn renew_session(&self, address: &str, id: &str) -> Option<i64> {
        let now = now_ms();
        let mut s = lock(&self.state);
        let default_duration = s.lock_duration;
        let q = s.queues.get_mut(&address.to_ascii_lowercase())?;
        let duration = q.lock_ms(default_duration);
        let until = q.sessions.get_mut(id).filter(|u| **u > now)?;
        *until = now + duration;
        let until = *until;
        s.renewals += 1;
        Some(until)
    }

    /// Settles the message locked with `token` by the receiver's outcome.
    fn settle(&self, address: &str, token: [u8; 16], outcome: Option<&Outcome>) {
        let mut s = lock(&self.state);
        let max = s.max_delivery_count;
        let Some(q) = s.queues.get_mut(&address.to_ascii_lowercase()) else {
            return;
        };
        // a lock that expired meanwhile: the message is already available again
        let Some((m, until)) = q.locked.remove(&token) else {
            return;
        };
        match outcome {
            Some(Outcome::Accepted(_)) => {}
            Some(Outcome::Rejected(_)) => q.dead.push(m),
            Some(_) => {
                let max = q.max_delivery_count.unwrap_or(max);
                q.give_back(m, max);
            }
            // no outcome, the link went away: a session's message is free with its session
            None if until == SESSION_LOCKED => {
                let max = q.max_delivery_count.unwrap_or(max);
                q.give_back(m, max);
            }
            // otherwise locked until the lock expires
            None => {
                let until = now_ms() + i64::try_from(s.lock_duration.as_millis()).unwrap_or(0);
                if let Some(q) = s.queues.get_mut(&address.to_ascii_lowercase()) {
                    q.locked.insert(token, (m, until));
                }
                return;
            }
        }
        self.save(&s);
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
                    // a session's message has no lock of its own to renew (its session's
                    // lock is renewed instead)
                    q.locked
                        .get_mut(t)
                        .filter(|(_, u)| *u != SESSION_LOCKED)
                        .map(|(_, u)| {
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
    /// How long a lock on this entity lasts, in milliseconds (its own `LockDuration`, else
    /// the broker's `default`).
    fn lock_ms(&self, default: Duration) -> i64 {
        i64::try_from(self.lock_duration.unwrap_or(default).as_millis()).unwrap_or(i64::MAX)
    }

    /// Frees session `id`; the messages it had locked are abandoned.
    fn release_session(&mut self, id: &str, max_delivery_count: u32) {
        self.sessions.remove(id);
        let held: Vec<[u8; 16]> = self
            .locked
            .iter()
            .filter(|(_, (m, until))| *until == SESSION_LOCKED && group_of(m) == Some(id))
            .map(|(t, _)| *t)
            .collect();
        for t in held {
            if let Some((m, _)) = self.locked.remove(&t) {
                self.give_back(m, max_delivery_count);
            }
        }
    }

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
async fn serve(inner: Arc<Inner>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    if let Some(acceptor) = inner.tls.clone() {
        return serve_tls(inner, acceptor, tcp).await;
    }
    // AMQP's protocol header starts with `A`; no HTTP method does
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(1) if first[0] != b'A' => return serve_http(&inner, tcp).await,
        Ok(1) => {}
        _ => return,
    }
    let mut generation = inner.generation.subscribe();
    let (engine_side, pipe) = tokio::io::duplex(256 * 1024);
    let amqp = tokio::spawn(run_connection(inner.clone(), engine_side));
    tokio::select! {
        () = shuttle(tcp, pipe) => {}
        _ = generation.changed() => {}
    }
    amqp.abort();
}

/// Copies between the client and the engine's end of the pipe until either ends; what the
/// engine writes goes out with every performative's fields ([`framing`]).
async fn shuttle<S>(client: S, pipe: tokio::io::DuplexStream)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut client_in, client_out) = tokio::io::split(client);
    let (engine_out, mut engine_in) = tokio::io::split(pipe);
    tokio::select! {
        _ = tokio::io::copy(&mut client_in, &mut engine_in) => {}
        _ = framing::copy_padded(engine_out, client_out) => {}
    }
}

/// [`serve`] behind TLS: the first decrypted byte tells AMQP (`A`) from HTTP.
async fn serve_tls(inner: Arc<Inner>, acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut tls) = acceptor.accept(tcp).await else {
        return;
    };
    let mut first = [0u8; 1];
    if tls.read_exact(&mut first).await.is_err() {
        return;
    }
    if first[0] != b'A' {
        let mut reader = (&first[..]).chain(&mut tls);
        let Some(request) = crate::http1::read_request(&mut reader).await else {
            return;
        };
        let (status, content_type, body) = answer(&inner, &request);
        crate::http1::respond(&mut tls, status, content_type, &body).await;
        return;
    }
    let mut generation = inner.generation.subscribe();
    let (engine_side, mut pipe) = tokio::io::duplex(256 * 1024);
    if pipe.write_all(&first).await.is_err() {
        return;
    }
    let amqp = tokio::spawn(run_connection(inner.clone(), engine_side));
    tokio::select! {
        () = shuttle(tls, pipe) => {}
        _ = generation.changed() => {}
    }
    amqp.abort();
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
    // handle-max said explicitly (as Azure says it): left at its default it is not written,
    // and Microsoft's Python Event Hubs client needs a number there
    let sessions = SessionAcceptor::builder().handle_max(4095u32).build();
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
    while let Some(mut attach) = session.next_incoming_attach().await {
        let acceptor = match attach.role {
            definitions::Role::Sender => &from_clients,
            definitions::Role::Receiver => &to_clients,
        };
        // a session receiver waits here for its session (this session's other attaches wait
        // behind it, as they would behind Service Bus's answer)
        let epoch = eventhubs::epoch_of(&attach);
        let choice = match attach.role {
            definitions::Role::Receiver if wants_session(&attach) => {
                Some(choose_session(&inner, &shared, &mut attach).await)
            }
            _ => None,
        };
        let Ok(link) = acceptor.accept_incoming_attach(attach, &mut session).await else {
            continue;
        };
        let (inner, shared) = (inner.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            match (link, choice) {
                (LinkEndpoint::Receiver(r), _) => incoming(inner, shared, r).await,
                (LinkEndpoint::Sender(s), None) => outgoing(inner, shared, s, None, epoch).await,
                (LinkEndpoint::Sender(s), Some(Choice::Held(id))) => {
                    let address = source_address(&s);
                    outgoing(inner.clone(), shared, s, Some(&id), None).await;
                    inner.release_session(&address, &id);
                }
                (LinkEndpoint::Sender(s), Some(Choice::Refused(e))) => {
                    let _ = s.close_with_error(e).await;
                }
            }
        }));
    }
    for t in tasks {
        t.abort();
    }
}

/// What a session receiver's attach gets.
enum Choice {
    /// This session, locked to the link.
    Held(String),
    /// Detached at once with this error (no session free in time, or the link may not read).
    Refused(definitions::Error),
}

/// Whether a receiver's attach carries Service Bus's session filter.
fn wants_session(attach: &fe2o3_amqp::types::performatives::Attach) -> bool {
    attach
        .source
        .as_ref()
        .and_then(|s| s.filter.as_ref())
        .is_some_and(|f| f.contains_key(&Symbol::from(SESSION_FILTER)))
}

/// Finds a session for a session receiver's attach, waiting up to [`SESSION_WAIT`], and writes
/// its id into the source the broker answers with; with none, the answer has no source.
async fn choose_session(
    inner: &Inner,
    shared: &Shared,
    attach: &mut fe2o3_amqp::types::performatives::Attach,
) -> Choice {
    let address = entity_path(
        &attach
            .source
            .as_ref()
            .and_then(|s| s.address.clone())
            .unwrap_or_default(),
    );
    let refused = |attach: &mut fe2o3_amqp::types::performatives::Attach, e| {
        attach.source = None;
        Choice::Refused(e)
    };
    if !authorized(shared, &address) {
        return refused(attach, unauthorized(&address));
    }
    if !inner.may_link(&address) {
        return refused(attach, not_found(&address));
    }
    if let Err(e) = inner.session_entity(&address) {
        return refused(attach, e);
    }
    let deadline = tokio::time::Instant::now() + SESSION_WAIT;
    loop {
        let notified = inner.available.notified();
        if let Some(id) = inner.lock_next_session(&address) {
            if let Some(filter) = attach.source.as_mut().and_then(|s| s.filter.as_mut()) {
                filter.insert(
                    Symbol::from(SESSION_FILTER),
                    Value::Described(Box::new(serde_amqp::described::Described {
                        descriptor: serde_amqp::descriptor::Descriptor::Code(SESSION_FILTER_CODE),
                        value: Value::String(id.clone()),
                    })),
                );
            }
            return Choice::Held(id);
        }
        if tokio::time::Instant::now() >= deadline {
            let e = definitions::Error::new(
                definitions::ErrorCondition::Custom(Symbol::from("com.microsoft:timeout")),
                Some(format!("no session of {address} is available")),
                None,
            );
            return refused(attach, e);
        }
        // woken by a new message, or a scheduled one's time coming
        let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
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
    if address == "$management" {
        // the namespace's node: Event Hubs' READ of a hub or a partition
        while let Ok(d) = r.recv::<Body<Value>>().await {
            let _ = r.accept(&d).await;
            let request = d.into_message();
            let (status, body) =
                eventhubs::management(&inner, &request, |hub| authorized(&shared, hub));
            let mut props = OrderedMap::new();
            props.insert("status-code".to_string(), SimpleValue::Int(status));
            reply(&shared, &address, &request, props, body);
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
    if let Some((hub, partition)) = eventhubs::send_target(&inner, &address) {
        while let Ok(d) = r.recv::<Body<Value>>().await {
            // appended before the client hears it was accepted; a batch (Azure's SDKs send
            // one message whose data sections are the events) event by event
            for event in eventhubs::unbatch(*d.message_format(), d.message()) {
                eventhubs::append(&inner, &hub, partition, event);
            }
            let _ = r.accept(&d).await;
        }
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
    // by what the token is, not the `type` it is put with: Azure's Python client puts its
    // shared access signatures as `jwt` too, and Service Bus takes them
    let checked = if token.starts_with("SharedAccessSignature ") {
        check_sas(&token, &audience)
    } else {
        inner.check_jwt(&token)
    };
    match checked {
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
    if operation == Some("com.microsoft:renew-session-lock") {
        let session = match &request.body {
            Body::Value(v) => match &v.0 {
                Value::Map(m) => match m.get(&Value::String("session-id".into())) {
                    Some(Value::String(id)) => Some(id.clone()),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        let Some(until) = session.and_then(|id| inner.renew_session(entity, &id)) else {
            // Service Bus: 410 Gone, com.microsoft:session-lock-lost
            return (410, Value::Null);
        };
        let mut body = OrderedMap::new();
        body.insert(
            Value::String("expiration".into()),
            Value::Timestamp(Timestamp::from_milliseconds(until)),
        );
        return (200, Value::Map(body));
    }
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
/// in peek-lock (only the messages of `session`, when the link holds one).
async fn outgoing(
    inner: Arc<Inner>,
    shared: Shared,
    mut s: Sender,
    session: Option<&str>,
    epoch: Option<i64>,
) {
    let address = source_address(&s);
    if address == "$cbs" || address == "$management" || address.ends_with("/$management") {
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
    if let Some(source) = eventhubs::receive_source(&inner, &address) {
        eventhubs::stream(inner, s, source, epoch).await;
        return;
    }
    if !inner.may_link(&address) {
        let _ = s.close_with_error(not_found(&address)).await;
        return;
    }
    inner.ensure(&address);
    if session.is_none() && inner.requires_session(&address) {
        let e = definitions::Error::new(
            AmqpError::NotAllowed,
            Some(format!(
                "the entity {address} requires sessions: a receiver without a session filter cannot read it"
            )),
            None,
        );
        let _ = s.close_with_error(e).await;
        return;
    }
    loop {
        if let Some(id) = session {
            if !inner.holds_session(&address, id) {
                let e = definitions::Error::new(
                    definitions::ErrorCondition::Custom(Symbol::from(
                        "com.microsoft:session-lock-lost",
                    )),
                    Some(format!("the lock of session {id} expired")),
                    None,
                );
                let _ = s.close_with_error(e).await;
                return;
            }
        }
        let notified = inner.available.notified();
        let Some((message, token)) = inner.take(&address, session) else {
            // woken by a new message, or a scheduled one's time coming; a session link also
            // by its client letting it go
            if session.is_some() {
                tokio::select! {
                    _ = tokio::time::timeout(Duration::from_millis(100), notified) => {}
                    _ = s.on_detach() => return,
                }
            } else {
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            }
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
            // a session's next message is taken once this one is settled: an abandoned
            // message goes back ahead of the rest of its session
            Ok(fut) if session.is_some() => {
                let outcome = fut.await.ok();
                inner.settle(&address, token, outcome.as_ref());
            }
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
    let (status, content_type, body) = answer(inner, &request);
    crate::http1::respond(&mut tcp, status, content_type, &body).await;
}

/// One HTTP request: Azure Resource Manager's Event Hubs API (`/subscriptions/...`, JSON), or
/// Service Bus's ATOM management API; (status, content type, body).
fn answer(inner: &Inner, request: &crate::http1::Request) -> (&'static str, &'static str, String) {
    if request.path.starts_with("/subscriptions/") {
        let (status, body) = eventhubs::arm(inner, request);
        return (status, "application/json; charset=utf-8", body);
    }
    let (status, body) = manage(inner, request);
    (
        status,
        "application/atom+xml;type=entry;charset=utf-8",
        body,
    )
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
    let scheme = if inner.tls.is_some() { "https" } else { "http" };
    let audience = format!("{scheme}://{host}{}", request.path);
    let authorization = request.header("authorization").unwrap_or_default();
    let checked = match authorization.strip_prefix("Bearer ") {
        Some(token) => inner.check_jwt(token),
        None => check_sas(authorization, &audience),
    };
    if let Err(why) = checked {
        return atom_error("401 Unauthorized", &why);
    }
    let path = request.path.trim_start_matches('/').to_ascii_lowercase();
    if path.is_empty() {
        return atom_error("400 Bad Request", "no entity path");
    }
    let mut s = lock(&inner.state);
    match request.method.as_str() {
        "GET" => get_entity(&s, &path),
        "PUT" => {
            let made = create_entity(&mut s, &path, &request.body);
            inner.save(&s);
            made
        }
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
            requires_session: value(&description, "RequiresSession").as_deref() == Some("true"),
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

/// The broker's data as JSON: entities, their descriptions and settings, and every message
/// not completed (the AMQP message in its wire encoding, base64), with its sequence number,
/// times and delivery count. Locks are not kept.
mod persist {
    use std::collections::HashMap;
    use std::time::Duration;

    use base64::Engine as _;
    use fe2o3_amqp::types::messaging::message::__private::{Deserializable, Serializable};
    use serde_json::{json, Value as Json};

    use super::{AmqpMessage, Queue, State, Stored};

    fn b64() -> base64::engine::GeneralPurpose {
        base64::engine::general_purpose::STANDARD
    }

    fn stored(m: &Stored) -> Json {
        let bytes = serde_amqp::to_vec(&Serializable(m.message.clone())).unwrap_or_default();
        json!({
            "message": b64().encode(bytes),
            "sequence": m.sequence,
            "enqueued_ms": m.enqueued_ms,
            "delivery_count": m.delivery_count,
            "expires_ms": m.expires_ms,
            "visible_ms": m.visible_ms,
        })
    }

    /// `s` as JSON text.
    pub(super) fn dump(s: &State) -> String {
        let queues: serde_json::Map<String, Json> = s
            .queues
            .iter()
            .map(|(name, q)| {
                // what is locked is available again after a restart
                let ready: Vec<Json> = q
                    .ready
                    .values()
                    .chain(q.locked.values().map(|(m, _)| m))
                    .map(stored)
                    .collect();
                let value = json!({
                    "ready": ready,
                    "dead": q.dead.iter().map(stored).collect::<Vec<_>>(),
                    "max_delivery_count": q.max_delivery_count,
                    "lock_duration_ms": q.lock_duration.map(|d| d.as_millis() as u64),
                    "requires_session": q.requires_session,
                });
                (name.clone(), value)
            })
            .collect();
        json!({
            "topics": s.topics.iter().map(|(t, subs)| (t.clone(), subs.iter().cloned().collect::<Vec<_>>())).collect::<HashMap<_, _>>(),
            "queues": queues,
            "descriptions": s.descriptions,
            "strict": s.strict,
            "lock_duration_ms": s.lock_duration.as_millis() as u64,
            "max_delivery_count": s.max_delivery_count,
            "next_sequence": s.next_sequence,
            "hubs": super::eventhubs::dump(&s.hubs),
        })
        .to_string()
    }

    fn message(v: &Json) -> Result<Stored, String> {
        let bytes = b64()
            .decode(v["message"].as_str().ok_or("a message without its bytes")?)
            .map_err(|e| e.to_string())?;
        let Deserializable(message): Deserializable<AmqpMessage> =
            serde_amqp::from_slice(&bytes).map_err(|e| e.to_string())?;
        Ok(Stored {
            message,
            sequence: v["sequence"].as_i64().ok_or("no sequence")?,
            enqueued_ms: v["enqueued_ms"].as_i64().unwrap_or_default(),
            delivery_count: u32::try_from(v["delivery_count"].as_u64().unwrap_or_default())
                .unwrap_or(u32::MAX),
            expires_ms: v["expires_ms"].as_i64(),
            visible_ms: v["visible_ms"].as_i64().unwrap_or_default(),
        })
    }

    /// Fills `s` from JSON text made by [`dump`].
    pub(super) fn load(text: &str, s: &mut State) -> Result<(), String> {
        let v: Json = serde_json::from_str(text).map_err(|e| e.to_string())?;
        for (topic, subs) in v["topics"].as_object().into_iter().flatten() {
            let subs = subs
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect();
            s.topics.insert(topic.clone(), subs);
        }
        for (name, q) in v["queues"].as_object().into_iter().flatten() {
            let mut queue = Queue {
                max_delivery_count: q["max_delivery_count"]
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok()),
                lock_duration: q["lock_duration_ms"].as_u64().map(Duration::from_millis),
                requires_session: q["requires_session"].as_bool().unwrap_or_default(),
                ..Queue::default()
            };
            for m in q["ready"].as_array().into_iter().flatten() {
                let m = message(m)?;
                queue.ready.insert(m.sequence, m);
            }
            for m in q["dead"].as_array().into_iter().flatten() {
                queue.dead.push(message(m)?);
            }
            s.queues.insert(name.clone(), queue);
        }
        for (path, d) in v["descriptions"].as_object().into_iter().flatten() {
            if let Some(d) = d.as_str() {
                s.descriptions.insert(path.clone(), d.to_string());
            }
        }
        s.strict = v["strict"].as_bool().unwrap_or_default();
        if let Some(ms) = v["lock_duration_ms"].as_u64() {
            s.lock_duration = Duration::from_millis(ms);
        }
        if let Some(n) = v["max_delivery_count"].as_u64() {
            s.max_delivery_count = u32::try_from(n).unwrap_or(u32::MAX);
        }
        s.next_sequence = v["next_sequence"].as_i64().unwrap_or(1);
        s.hubs = super::eventhubs::load(&v["hubs"])?;
        Ok(())
    }
}
