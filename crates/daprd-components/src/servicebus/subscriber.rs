//! The consume loop of one Service Bus subscription (or queue): takes a message when a handler
//! slot is free, hands it to the app in a task of its own, completes or abandons it by the
//! outcome, renews the locks of what the app still has, and reopens its connection when it is
//! lost. The loop owns the receiver link, so every settlement goes through it; at a stop it
//! takes no more messages, settles what the app still has, abandons what the client had read
//! ahead, then closes the link.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use daprd_core::backoff::Backoff;
use daprd_core::pubsub::{DrainGuard, Handler, Message, Outcome};
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::{Receiver, RecvError};
use fe2o3_amqp::types::messaging::{Body, Modified};
use fe2o3_amqp::types::primitives::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::amqp::{self, AmqpError, Conn, Rpc};
use super::metadata::ServiceBusMetadata;
use super::TOKEN_REFRESH;
use crate::stop::Stop;

/// How long a stopping receiver waits for messages still on their way after it drained its
/// link (each is abandoned, not left locked).
const STRAGGLERS: Duration = Duration::from_millis(100);

/// A subscription's connection: its receiver link and the entity's `$management` node.
pub(super) struct Link {
    conn: Conn,
    receiver: Receiver,
    management: Option<Rpc>,
    authorized: Instant,
    /// The session the receiver holds (a session subscription's).
    session: Option<String>,
}

/// How long a session slot waits before asking again when the broker had no free session
/// (Service Bus itself waits for one before it answers; this only keeps a broker that answers
/// at once from being asked in a busy loop).
const NO_SESSION_PAUSE: Duration = Duration::from_millis(100);

impl Link {
    /// Connects, puts the entity's token and attaches the receiver of `address` (and its
    /// `$management` node when locks are renewed).
    pub(super) async fn open(md: &ServiceBusMetadata, address: &str) -> Result<Self, AmqpError> {
        let mut conn = Conn::open(&md.connection, md.timeout).await?;
        let attached = async {
            conn.authorize(address).await?;
            let receiver = conn.receiver(address, md.max_active_messages).await?;
            let management = match md.lock_renewal {
                Some(_) => Some(conn.management(address).await?),
                None => None,
            };
            Ok::<_, AmqpError>((receiver, management))
        }
        .await;
        match attached {
            Ok((receiver, management)) => Ok(Self {
                conn,
                receiver,
                management,
                authorized: Instant::now(),
                session: None,
            }),
            Err(e) => {
                conn.close().await;
                Err(e)
            }
        }
    }

    /// A connection authorized for `address`, ready for [`Link::open_session`].
    pub(super) async fn connect(md: &ServiceBusMetadata, address: &str) -> Result<Conn, AmqpError> {
        let mut conn = Conn::open(&md.connection, md.timeout).await?;
        match conn.authorize(address).await {
            Ok(()) => Ok(conn),
            Err(e) => {
                conn.close().await;
                Err(e)
            }
        }
    }

    /// A receiver of the next free session of `address` on `conn` (a new connection when
    /// `None`), asking again on the same connection while the broker has none; `Ok(None)` when
    /// the stop came first.
    pub(super) async fn open_session(
        md: &ServiceBusMetadata,
        address: &str,
        conn: Option<Conn>,
        stop: &mut Stop,
    ) -> Result<Option<Self>, AmqpError> {
        let mut conn = match conn {
            Some(c) => c,
            None => Self::connect(md, address).await?,
        };
        let mut authorized = Instant::now();
        let accepted = loop {
            if authorized.elapsed() >= TOKEN_REFRESH {
                if let Err(e) = conn.authorize(address).await {
                    break Err(e);
                }
                authorized = Instant::now();
            }
            match stop.or(conn.session_receiver(address)).await {
                None => break Ok(None),
                Some(Ok(accepted)) => break Ok(Some(accepted)),
                Some(Err(AmqpError::NoSession { .. })) if !conn.is_closed() => {
                    if stop.sleep(NO_SESSION_PAUSE).await {
                        break Ok(None);
                    }
                }
                Some(Err(e)) => break Err(e),
            }
        };
        let (receiver, session) = match accepted {
            Ok(Some(a)) => a,
            Ok(None) => {
                conn.close().await;
                return Ok(None);
            }
            Err(e) => {
                conn.close().await;
                return Err(e);
            }
        };
        let management = match md.lock_renewal {
            Some(_) => match conn.management(address).await {
                Ok(m) => Some(m),
                Err(e) => {
                    Self {
                        conn,
                        receiver,
                        management: None,
                        authorized,
                        session: None,
                    }
                    .close()
                    .await;
                    return Err(e);
                }
            },
            None => None,
        };
        Ok(Some(Self {
            conn,
            receiver,
            management,
            authorized,
            session: Some(session),
        }))
    }

    /// Detaches the receiver (waiting at most a second for the broker's answer) and closes the
    /// connection.
    async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.receiver.close()).await;
        self.conn.close().await;
    }
}

/// How many messages the app may have at once: `maxConcurrentHandlers` handler calls (else
/// `maxActiveMessages` messages). A bulk subscription's handler call is a batch of up to its
/// batch size (at most `maxActiveMessages`, as Go daprd's `maxBulkSubCount`), so the app may
/// have that many times as many messages: the runtime batches what the loop hands over.
fn handler_slots(md: &ServiceBusMetadata, bulk: Option<usize>) -> usize {
    let active = usize::try_from(md.max_active_messages).unwrap_or(1000);
    match md.max_concurrent_handlers {
        None => active,
        Some(handlers) => handlers
            .saturating_mul(bulk.unwrap_or(1).max(1))
            .min(active)
            .max(handlers),
    }
}

/// What a delivery asks of the loop once the app answered.
struct Settle {
    /// The connection the message came on (a later one cannot settle it).
    generation: u64,
    id: u64,
    info: DeliveryInfo,
    complete: bool,
}

/// One subscription's consume loop.
pub(super) struct ConsumeLoop {
    pub(super) md: Arc<ServiceBusMetadata>,
    /// The receiving entity: `<topic>/Subscriptions/<consumerID>` or the queue.
    pub(super) address: String,
    pub(super) stop: Stop,
    pub(super) component: String,
    /// The subscription's topic as the app knows it.
    pub(super) topic: String,
    pub(super) handler: Handler,
    /// A bulk subscription's batch size ([`daprd_core::pubsub::SubscribeRequest::bulk`]).
    pub(super) bulk: Option<usize>,
    /// A session subscription's `sessionIdleTimeoutInSec`: this loop is one session slot. It
    /// holds one session at a time, hands its messages to the app one at a time, in order,
    /// and lets the session go when nothing came for this long (then takes the next one).
    pub(super) session_idle: Option<Duration>,
    /// Held until every message taken is settled and the link is closed.
    pub(super) guard: DrainGuard,
}

enum Event {
    Settled(Settle),
    Stopped,
    Slot(OwnedSemaphorePermit),
    Renew,
    Reauthorize,
    /// A session slot's session had nothing for its idle timeout.
    Idle,
    Next(Result<Box<fe2o3_amqp::link::delivery::Delivery<Body<Value>>>, RecvError>),
}

impl ConsumeLoop {
    /// Runs until the stop: from `first` (a link already open), else from `conn` (a connection
    /// for a session slot's first session), else from a new connection.
    pub(super) async fn run(mut self, first: Option<Link>, mut conn: Option<Conn>) {
        let sessions = self.session_idle.is_some();
        let idle = self.session_idle.unwrap_or(Duration::from_secs(86_400));
        // a session's messages go to the app one at a time, in order
        let handlers = if sessions {
            1
        } else {
            handler_slots(&self.md, self.bulk)
        };
        let slots = Arc::new(Semaphore::new(handlers));
        let (settle_tx, mut settled) = mpsc::unbounded_channel::<Settle>();
        let mut outstanding = 0usize;
        // lock tokens of the messages the app has, by delivery number, for renewal
        let mut locks: HashMap<u64, [u8; 16]> = HashMap::new();
        let mut next_id = 0u64;
        let mut generation = 0u64;
        let mut slot: Option<OwnedSemaphorePermit> = None;
        let renewal = self.md.lock_renewal.unwrap_or(Duration::from_secs(86_400));
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + renewal, renewal);
        let mut link = first;
        // the next connection opens without a pause: the first, and after a session was let go
        let mut quick = true;
        // at least 100 ms apart when failing, however low the minimum is set
        let floor = Duration::from_millis(100);
        let mut pause = Backoff::new(
            self.md.min_recovery.max(floor),
            self.md.max_recovery.max(floor),
        );
        // Credit: the link may hand out `credit` more messages; it is topped up to
        // `maxActiveMessages` minus what is taken and unsettled once a few were settled.
        // (a session receiver is given one credit at a time: an abandoned message comes
        // back before the next is read)
        let max_active = if sessions {
            1
        } else {
            self.md.max_active_messages
        };
        let top_up_at = (max_active / 8).max(1);
        let mut credit: u32;
        let mut unsettled: u32;
        'connection: loop {
            let mut l = match link.take() {
                Some(l) => l,
                None => {
                    if !quick && self.stop.sleep(pause.next_pause()).await {
                        break 'connection;
                    }
                    let opened = if sessions {
                        match Link::open_session(
                            &self.md,
                            &self.address,
                            conn.take(),
                            &mut self.stop,
                        )
                        .await
                        {
                            Ok(Some(l)) => Ok(l),
                            Ok(None) => break 'connection,
                            Err(e) => Err(e),
                        }
                    } else {
                        Link::open(&self.md, &self.address).await
                    };
                    match opened {
                        Ok(l) => {
                            match &l.session {
                                Some(id) => {
                                    tracing::debug!(component = %self.component, topic = %self.topic, session = %id, "azure service bus: session accepted")
                                }
                                None => {
                                    tracing::info!(component = %self.component, topic = %self.topic, "azure service bus: receiver reconnected")
                                }
                            }
                            pause.reset();
                            l
                        }
                        Err(e) => {
                            tracing::warn!(component = %self.component, topic = %self.topic, error = %e, "azure service bus: reconnecting the receiver failed");
                            quick = false;
                            continue 'connection;
                        }
                    }
                }
            };
            quick = false;
            let mut idle_at = tokio::time::Instant::now() + idle;
            generation += 1;
            locks.clear();
            credit = max_active;
            unsettled = 0;
            loop {
                let reauthorize = tokio::time::Instant::from_std(l.authorized + TOKEN_REFRESH);
                let event = if slot.is_some() {
                    tokio::select! {
                        biased;
                        Some(s) = settled.recv() => Event::Settled(s),
                        () = self.stop.wait() => Event::Stopped,
                        _ = renew.tick(), if self.md.lock_renewal.is_some() => Event::Renew,
                        () = tokio::time::sleep_until(reauthorize) => Event::Reauthorize,
                        () = tokio::time::sleep_until(idle_at), if sessions && outstanding == 0 => Event::Idle,
                        d = l.receiver.recv::<Body<Value>>() => Event::Next(d.map(Box::new)),
                    }
                } else {
                    tokio::select! {
                        biased;
                        Some(s) = settled.recv() => Event::Settled(s),
                        () = self.stop.wait() => Event::Stopped,
                        _ = renew.tick(), if self.md.lock_renewal.is_some() => Event::Renew,
                        () = tokio::time::sleep_until(reauthorize) => Event::Reauthorize,
                        () = tokio::time::sleep_until(idle_at), if sessions && outstanding == 0 => Event::Idle,
                        p = slots.clone().acquire_owned() => match p {
                            Ok(p) => Event::Slot(p),
                            Err(_) => Event::Stopped,
                        },
                    }
                };
                match event {
                    Event::Settled(s) => {
                        outstanding -= 1;
                        idle_at = tokio::time::Instant::now() + idle;
                        if s.generation == generation {
                            locks.remove(&s.id);
                            unsettled = unsettled.saturating_sub(1);
                            if let Err(e) = settle(&l.receiver, s).await {
                                tracing::warn!(component = %self.component, topic = %self.topic, error = %e, "azure service bus: settling failed; the broker hands the message out again");
                            }
                            let wanted = max_active.saturating_sub(unsettled);
                            if wanted.saturating_sub(credit) >= top_up_at {
                                match l.receiver.set_credit(wanted).await {
                                    Ok(()) => credit = wanted,
                                    Err(e) => {
                                        tracing::warn!(component = %self.component, topic = %self.topic, error = %e, "azure service bus: the receiver link failed; reconnecting");
                                        tokio::spawn(l.close());
                                        continue 'connection;
                                    }
                                }
                            }
                        }
                    }
                    Event::Stopped => {
                        link = Some(l);
                        break 'connection;
                    }
                    Event::Slot(p) => slot = Some(p),
                    Event::Renew => {
                        let renewed = if sessions {
                            self.renew_session(&mut l).await
                        } else {
                            self.renew(&mut l, &locks).await
                        };
                        if let Err(e) = renewed {
                            tracing::warn!(component = %self.component, topic = %self.topic, error = %e, "azure service bus: renewing locks failed");
                        }
                    }
                    Event::Idle => {
                        tracing::debug!(component = %self.component, topic = %self.topic, session = ?l.session, "azure service bus: the session had nothing for its idle timeout; letting it go");
                        let _ = l.receiver.drain().await;
                        release(l, generation).await;
                        quick = true;
                        continue 'connection;
                    }
                    Event::Reauthorize => match l.conn.authorize(&self.address).await {
                        Ok(()) => l.authorized = Instant::now(),
                        Err(e) => {
                            tracing::warn!(component = %self.component, topic = %self.topic, error = %e, "azure service bus: renewing the token failed; reconnecting");
                            tokio::spawn(l.close());
                            continue 'connection;
                        }
                    },
                    Event::Next(Ok(d)) => {
                        let Some(p) = slot.take() else { continue };
                        idle_at = tokio::time::Instant::now() + idle;
                        next_id += 1;
                        outstanding += 1;
                        unsettled += 1;
                        credit = credit.saturating_sub(1);
                        let (info, message) = (*d).into_parts();
                        let token = amqp::lock_token(
                            message.message_annotations.as_ref(),
                            info.delivery_tag(),
                        );
                        if let Some(t) = token {
                            locks.insert(next_id, t);
                        }
                        self.deliver(message, token, info, generation, next_id, p, &settle_tx);
                    }
                    Event::Next(Err(e)) => {
                        tracing::warn!(component = %self.component, topic = %self.topic, error = %e, "azure service bus: the receiver link failed; reconnecting");
                        tokio::spawn(l.close());
                        continue 'connection;
                    }
                }
            }
        }
        // Stopped. A drain first: the broker uses up the link credit and sends nothing more
        // (a transfer already on its way still fits the credit; withdrawing the credit
        // instead would make the client refuse it, leaving it locked on the broker).
        if let Some(l) = link.as_mut() {
            let _ = l.receiver.drain().await;
        }
        // Settle what the app still has.
        while outstanding > 0 {
            let Some(s) = settled.recv().await else { break };
            outstanding -= 1;
            if let Some(l) = &link {
                if s.generation == generation {
                    let _ = settle(&l.receiver, s).await;
                }
            }
        }
        if let Some(l) = link {
            release(l, generation).await;
        }
        drop(self.guard);
    }

    /// Renews the lock of the session a session slot holds (its messages' locks with it).
    async fn renew_session(&self, l: &mut Link) -> Result<(), AmqpError> {
        let (Some(session), Some(management)) = (l.session.as_deref(), l.management.as_mut())
        else {
            return Ok(());
        };
        let what = format!("renewing the lock of session {session} of {}", self.address);
        amqp::within(
            self.md.timeout,
            &what,
            management.call(
                &what,
                amqp::renew_session_lock_request(l.receiver.name()),
                amqp::session_id_body(session),
            ),
        )
        .await
        .map(|_| ())
    }

    /// Renews the locks of the messages the app has.
    async fn renew(&self, l: &mut Link, locks: &HashMap<u64, [u8; 16]>) -> Result<(), AmqpError> {
        if locks.is_empty() {
            return Ok(());
        }
        let Some(management) = l.management.as_mut() else {
            return Ok(());
        };
        let tokens: Vec<[u8; 16]> = locks.values().copied().collect();
        let what = format!(
            "renewing {} message locks on {}",
            tokens.len(),
            self.address
        );
        amqp::within(
            self.md.timeout,
            &what,
            management.call(
                &what,
                amqp::renew_lock_request(l.receiver.name()),
                amqp::lock_tokens_body(&tokens),
            ),
        )
        .await
        .map(|_| ())
    }

    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &self,
        m: fe2o3_amqp::types::messaging::Message<Body<Value>>,
        token: Option<[u8; 16]>,
        info: DeliveryInfo,
        generation: u64,
        id: u64,
        slot: OwnedSemaphorePermit,
        settle: &mpsc::UnboundedSender<Settle>,
    ) {
        let metadata = amqp::incoming_metadata(&m, token);
        let redelivered = m.header.as_ref().is_some_and(|h| h.delivery_count > 0);
        let message = Message {
            topic: self.topic.clone(),
            data: amqp::body_bytes(m.body),
            metadata,
            content_type: None,
            redelivered,
        };
        let handler = self.handler.clone();
        let stop = self.stop.clone();
        let limit = self.md.handler_timeout;
        let settle = settle.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // No delivery starts after the stop: the message goes back.
            let complete = !stop.is_set() && {
                let outcome = match limit {
                    Some(limit) => tokio::time::timeout(limit, handler(message))
                        .await
                        .unwrap_or(Outcome::Retry),
                    None => handler(message).await,
                };
                matches!(outcome, Outcome::Success | Outcome::Drop)
            };
            let _ = settle.send(Settle {
                generation,
                id,
                info,
                complete,
            });
        });
    }
}

/// Lets a drained link go: what the client read ahead and the app never saw, and what was on
/// its way when the drain reached the broker, is abandoned — available at once instead of when
/// its lock expires — until nothing more comes for [`STRAGGLERS`]; then the link is closed.
async fn release(mut l: Link, generation: u64) {
    while let Ok(Ok(d)) = tokio::time::timeout(STRAGGLERS, l.receiver.recv::<Body<Value>>()).await {
        let (info, _) = d.into_parts();
        let abandon = Settle {
            generation,
            id: 0,
            info,
            complete: false,
        };
        let _ = settle(&l.receiver, abandon).await;
    }
    l.close().await;
}

/// Completes (`accepted`) or abandons (`modified`, as Azure's SDKs abandon) a message.
async fn settle(receiver: &Receiver, s: Settle) -> Result<(), AmqpError> {
    let done = if s.complete {
        receiver.accept(s.info).await
    } else {
        receiver
            .modify(
                s.info,
                Modified {
                    delivery_failed: None,
                    undeliverable_here: None,
                    message_annotations: None,
                },
            )
            .await
    };
    done.map_err(|e| AmqpError::Link {
        what: "settling a message".into(),
        message: e.to_string(),
    })
}
