//! The AMQP 1.0 side of the Service Bus components: a connection to the namespace (TLS, or
//! plain for the development emulator), claims-based security (a SAS token put on `$cbs` for
//! each entity before its links attach), request/response on an entity's `$management` node
//! (lock renewal), and the mapping between Dapr's messages and Service Bus's AMQP messages as
//! Go daprd (through Azure's Go SDK) reads and writes them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{
    annotations::OwnedKey, ApplicationProperties, Body, Data, Header, Message, MessageAnnotations,
    MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{
    Array, Binary, OrderedMap, SimpleValue, Symbol, Timestamp, Uuid, Value,
};
use fe2o3_amqp::{Connection, Session};
use tokio::net::TcpStream;

use super::metadata::ConnectionString;
use super::sas::{now_secs, sas_token, TOKEN_LIFETIME};

/// What went wrong talking to the namespace.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The connection could not be opened.
    #[error("connecting to {endpoint}: {message}")]
    Connect {
        /// `host:port`.
        endpoint: String,
        /// Why.
        message: String,
    },
    /// A link, a session or a transfer failed (the connection is not to be trusted).
    #[error("{what}: {message}")]
    Link {
        /// What was being done.
        what: String,
        /// The client's error.
        message: String,
    },
    /// A management request was answered with an error status.
    #[error("{what}: the broker answered {status}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Status {
        /// The request.
        what: String,
        /// The status code.
        status: i64,
        /// The status description, if any.
        description: Option<String>,
    },
    /// The broker refused a message (a `rejected` outcome).
    #[error("{what}: the broker refused the message: {reason}")]
    Refused {
        /// What was sent.
        what: String,
        /// The broker's error.
        reason: String,
    },
    /// A bad publish request (metadata the message cannot carry).
    #[error("{0}")]
    BadMessage(String),
    /// Looking up or creating an entity through the management API failed.
    #[error(transparent)]
    Management(#[from] super::admin::AdminError),
    /// No answer in time.
    #[error("{what}: no answer in {timeout:?}")]
    Timeout {
        /// What was being done.
        what: String,
        /// The limit.
        timeout: Duration,
    },
    /// No session of the entity was free to lock (the broker waited for one, then said so).
    #[error("no session of {address} is available")]
    NoSession {
        /// The entity.
        address: String,
    },
    /// The broker detached a receiver because a newer one took its source over
    /// (`amqp:link:stolen`: Event Hubs' epoch receivers).
    #[error("receiving from {address}: another receiver took it over")]
    Stolen {
        /// The source.
        address: String,
    },
}

impl AmqpError {
    fn link(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self::Link {
            what: what.into(),
            message: e.to_string(),
        }
    }

    /// Whether retrying on a fresh connection may help.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Link { .. } | Self::Timeout { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 408,
            Self::Refused { reason, .. } => {
                reason.contains("server-busy") || reason.contains("timeout")
            }
            Self::BadMessage(_) | Self::NoSession { .. } | Self::Stolen { .. } => false,
            Self::Management(e) => e.is_transient(),
        }
    }
}

/// `fut`, or [`AmqpError::Timeout`] after `limit`.
pub(crate) async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, AmqpError>>,
) -> Result<T, AmqpError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(AmqpError::Timeout {
            what: what.to_string(),
            timeout: limit,
        }),
    }
}

/// The `$cbs` token type of a shared access signature (an Entra ID token's is `jwt`).
const SAS_TOKEN_TYPE: &str = "servicebus.windows.net:sastoken";

/// One AMQP connection to the namespace with one session, and its `$cbs` node.
pub(crate) struct Conn {
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    cbs: Rpc,
    cs: ConnectionString,
    timeout: Duration,
}

impl Conn {
    /// Connects (TCP, TLS unless the emulator's plain AMQP, SASL ANONYMOUS as Azure expects
    /// with CBS), begins a session and attaches `$cbs`.
    pub(crate) async fn open(cs: &ConnectionString, timeout: Duration) -> Result<Self, AmqpError> {
        let endpoint = format!("{}:{}", cs.host, cs.port);
        let fail = |message: String| AmqpError::Connect {
            endpoint: endpoint.clone(),
            message,
        };
        within(timeout, &format!("connecting to {endpoint}"), async {
            let tcp = TcpStream::connect((cs.host.as_str(), cs.port))
                .await
                .map_err(|e| fail(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let builder = Connection::builder()
                .container_id(format!("daprd-{}", uuid::Uuid::new_v4()))
                .hostname(cs.host.as_str())
                .sasl_profile(SaslProfile::Anonymous)
                .max_frame_size(65_536u32);
            let mut connection = if cs.tls {
                let config = daprd_core::tls::PemMaterial::default()
                    .client_config(false)
                    .map_err(|e| fail(e.to_string()))?;
                let name = rustls::pki_types::ServerName::try_from(cs.host.clone())
                    .map_err(|e| fail(format!("host name: {e}")))?;
                let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| fail(format!("tls: {e}")))?;
                builder.open_with_stream(stream).await
            } else {
                builder.open_with_stream(tcp).await
            }
            .map_err(|e| fail(e.to_string()))?;
            let mut session = match Session::begin(&mut connection).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = connection.close().await;
                    return Err(fail(format!("beginning a session: {e}")));
                }
            };
            let cbs = Rpc::attach(&mut session, "$cbs").await?;
            Ok(Self {
                connection,
                session,
                cbs,
                cs: cs.clone(),
                timeout,
            })
        })
        .await
    }

    /// Puts a token for `entity` on `$cbs` (the key's own token, or the connection string's
    /// signature as it is).
    pub(crate) async fn authorize(&mut self, entity: &str) -> Result<(), AmqpError> {
        let audience = format!("amqps://{}/{entity}", self.cs.host);
        let (token, kind) = self.token(entity).await?;
        let mut props = OrderedMap::new();
        props.insert(
            "operation".to_string(),
            SimpleValue::String("put-token".into()),
        );
        props.insert("type".to_string(), SimpleValue::String(kind.into()));
        props.insert("name".to_string(), SimpleValue::String(audience));
        props.insert(
            "expiration".to_string(),
            SimpleValue::String((now_secs() + TOKEN_LIFETIME.as_secs()).to_string()),
        );
        let what = format!("authorizing {entity} (put-token on $cbs)");
        within(
            self.timeout,
            &what,
            self.cbs.call(&what, props, Value::String(token)),
        )
        .await
        .map(|_| ())
    }

    /// A token for `entity` and its `$cbs` type: the key's own token, the connection
    /// string's signature as it is, or an Entra ID token for the namespace's scope.
    pub(crate) async fn token(&self, entity: &str) -> Result<(String, &'static str), AmqpError> {
        let audience = format!("amqps://{}/{entity}", self.cs.host);
        Ok(
            match (
                &self.cs.entra,
                &self.cs.signature,
                &self.cs.key_name,
                &self.cs.key,
            ) {
                (Some(entra), _, _, _) => {
                    let token = entra
                        .token(self.cs.scope)
                        .await
                        .map_err(|e| AmqpError::Link {
                            what: format!("authorizing {entity} with Microsoft Entra ID"),
                            message: e.to_string(),
                        })?;
                    (token, "jwt")
                }
                (None, Some(sig), _, _) => (sig.clone(), SAS_TOKEN_TYPE),
                (None, None, Some(name), Some(key)) => (
                    sas_token(&audience, name, key, now_secs() + TOKEN_LIFETIME.as_secs()),
                    SAS_TOKEN_TYPE,
                ),
                _ => (String::new(), SAS_TOKEN_TYPE),
            },
        )
    }

    /// A sender link to `entity`.
    pub(crate) async fn sender(&mut self, entity: &str) -> Result<Sender, AmqpError> {
        let what = format!("attaching a sender to {entity}");
        within(self.timeout, &what, async {
            Sender::attach(
                &mut self.session,
                format!("{entity}-sender-{}", uuid::Uuid::new_v4()),
                entity,
            )
            .await
            .map_err(|e| AmqpError::link(&what, e))
        })
        .await
    }

    /// A peek-lock receiver link from `address` (`<topic>/Subscriptions/<name>` or a queue),
    /// given `credit` to begin with; deliveries are settled, and credit given again, by the
    /// caller (a message taken counts until it is settled, as `maxActiveMessages` means).
    pub(crate) async fn receiver(
        &mut self,
        address: &str,
        credit: u32,
    ) -> Result<Receiver, AmqpError> {
        let what = format!("attaching a receiver to {address}");
        within(self.timeout, &what, async {
            let mut receiver = Receiver::builder()
                .name(format!("{address}-receiver-{}", uuid::Uuid::new_v4()))
                .source(address)
                .target(format!("daprd-{}", uuid::Uuid::new_v4()))
                .receiver_settle_mode(fe2o3_amqp::types::definitions::ReceiverSettleMode::First)
                .sender_settle_mode(fe2o3_amqp::types::definitions::SenderSettleMode::Unsettled)
                .credit_mode(fe2o3_amqp::link::receiver::CreditMode::Manual)
                .auto_accept(false)
                .attach(&mut self.session)
                .await
                .map_err(|e| AmqpError::link(&what, e))?;
            receiver
                .set_credit(credit)
                .await
                .map_err(|e| AmqpError::link(&what, e))?;
            Ok(receiver)
        })
        .await
    }

    /// A peek-lock receiver of the next free session of `address`, and that session's id:
    /// the receiver asks with Service Bus's session filter left empty and the broker answers
    /// with the session it locked for this link ([`AmqpError::NoSession`] when it had none).
    /// Given one credit: a session's messages come one at a time, so a message that is
    /// abandoned comes back before the next one is read.
    pub(crate) async fn session_receiver(
        &mut self,
        address: &str,
    ) -> Result<(Receiver, String), AmqpError> {
        let what = format!("accepting a session of {address}");
        let attached = within(self.timeout, &what, async {
            Receiver::builder()
                .name(format!("{address}-session-{}", uuid::Uuid::new_v4()))
                .source(
                    fe2o3_amqp::types::messaging::Source::builder()
                        .address(address)
                        .filter(session_filter(None))
                        .build(),
                )
                .target(format!("daprd-{}", uuid::Uuid::new_v4()))
                .receiver_settle_mode(fe2o3_amqp::types::definitions::ReceiverSettleMode::First)
                .sender_settle_mode(fe2o3_amqp::types::definitions::SenderSettleMode::Unsettled)
                .credit_mode(fe2o3_amqp::link::receiver::CreditMode::Manual)
                .auto_accept(false)
                .attach(&mut self.session)
                .await
                .map_err(|e| {
                    if no_session_available(&e) {
                        AmqpError::NoSession {
                            address: address.to_string(),
                        }
                    } else {
                        AmqpError::link(&what, e)
                    }
                })
        })
        .await?;
        let mut receiver = attached;
        let Some(id) = locked_session(&receiver) else {
            let _ = tokio::time::timeout(Duration::from_secs(1), receiver.close()).await;
            return Err(AmqpError::NoSession {
                address: address.to_string(),
            });
        };
        receiver
            .set_credit(1)
            .await
            .map_err(|e| AmqpError::link(&what, e))?;
        Ok((receiver, id))
    }

    #[cfg_attr(not(feature = "eventhubs"), allow(dead_code))]
    /// A receiver of the events of `address` (an Event Hubs partition of a consumer group),
    /// from where `filter` (an `apache.org:selector-filter:string`) says; the service sends
    /// them settled, `credit` ahead, given again as they are read.
    pub(crate) async fn event_receiver(
        &mut self,
        address: &str,
        filter: &str,
        credit: u32,
    ) -> Result<Receiver, AmqpError> {
        let what = format!("attaching a receiver to {address}");
        let mut filters = fe2o3_amqp::types::messaging::FilterSet::new();
        filters.insert(
            Symbol::from(SELECTOR_FILTER),
            Value::Described(Box::new(serde_amqp::described::Described {
                descriptor: serde_amqp::descriptor::Descriptor::Code(SELECTOR_FILTER_CODE),
                value: Value::String(filter.to_string()),
            })),
        );
        // epoch 0, as Azure's processors: a newer receiver of the group's partition (the
        // partition's next owner) detaches this one with `amqp:link:stolen`
        let mut properties = fe2o3_amqp::types::definitions::Fields::new();
        properties.insert(Symbol::from("com.microsoft:epoch"), Value::Long(0));
        within(self.timeout, &what, async {
            Receiver::builder()
                .name(format!("{address}-receiver-{}", uuid::Uuid::new_v4()))
                .properties(properties)
                .source(
                    fe2o3_amqp::types::messaging::Source::builder()
                        .address(address)
                        .filter(filters)
                        .build(),
                )
                .target(format!("daprd-{}", uuid::Uuid::new_v4()))
                .receiver_settle_mode(fe2o3_amqp::types::definitions::ReceiverSettleMode::First)
                .sender_settle_mode(fe2o3_amqp::types::definitions::SenderSettleMode::Settled)
                .credit_mode(fe2o3_amqp::link::receiver::CreditMode::Auto(credit))
                .attach(&mut self.session)
                .await
                .map_err(|e| AmqpError::link(&what, e))
        })
        .await
    }

    #[cfg_attr(not(feature = "eventhubs"), allow(dead_code))]
    /// The namespace's own `$management` node (Event Hubs' hub and partition queries).
    pub(crate) async fn namespace_management(&mut self) -> Result<Rpc, AmqpError> {
        within(
            self.timeout,
            "attaching $management",
            Rpc::attach(&mut self.session, "$management"),
        )
        .await
    }

    /// The `$management` node of `entity`.
    pub(crate) async fn management(&mut self, entity: &str) -> Result<Rpc, AmqpError> {
        let node = format!("{entity}/$management");
        within(
            self.timeout,
            &format!("attaching {node}"),
            Rpc::attach(&mut self.session, &node),
        )
        .await
    }

    /// Whether the connection or its session has stopped (the peer went away).
    pub(crate) fn is_closed(&self) -> bool {
        self.connection.is_closed() || self.session.is_ended()
    }

    /// Ends the session and closes the connection (errors ignored: it is going away), waiting
    /// at most a second for each answer. The bound matters: fe2o3-amqp's session engine, once
    /// it has sent its End, waits for the peer's without limit (spinning on a closed channel
    /// meanwhile), and a peer that never answers would hold a shutdown forever.
    pub(crate) async fn close(mut self) {
        let limit = Duration::from_secs(1);
        self.cbs.close().await;
        let _ = tokio::time::timeout(limit, self.session.end()).await;
        let _ = tokio::time::timeout(limit, self.connection.close()).await;
    }
}

/// Request/response on a management node: a sender to it, a receiver of its answers.
pub(crate) struct Rpc {
    node: String,
    sender: Sender,
    receiver: Receiver,
    reply_to: String,
}

impl Rpc {
    async fn attach(session: &mut SessionHandle<()>, node: &str) -> Result<Self, AmqpError> {
        let id = uuid::Uuid::new_v4();
        let reply_to = format!("{node}-reply-{id}");
        let sender = Sender::attach(session, format!("{node}-sender-{id}"), node)
            .await
            .map_err(|e| AmqpError::link(format!("attaching a sender to {node}"), e))?;
        let receiver = Receiver::builder()
            .name(format!("{node}-receiver-{id}"))
            .source(node)
            .target(reply_to.as_str())
            .attach(session)
            .await
            .map_err(|e| AmqpError::link(format!("attaching a receiver to {node}"), e))?;
        Ok(Self {
            node: node.to_string(),
            sender,
            receiver,
            reply_to,
        })
    }

    /// Sends a request and waits for its answer (the message whose correlation id is the
    /// request's id); a status other than 200/202/204 is an error. Returns the answer's body.
    pub(crate) async fn call(
        &mut self,
        what: &str,
        properties: OrderedMap<String, SimpleValue>,
        body: Value,
    ) -> Result<Value, AmqpError> {
        let id = uuid::Uuid::new_v4().to_string();
        let request = Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::String(id.clone())),
                reply_to: Some(self.reply_to.clone()),
                ..Default::default()
            })
            .application_properties(ApplicationProperties(properties))
            .value(body)
            .build();
        let outcome = self
            .sender
            .send(request)
            .await
            .map_err(|e| AmqpError::link(format!("{what}: sending to {}", self.node), e))?;
        if !matches!(outcome, Outcome::Accepted(_)) {
            return Err(AmqpError::Refused {
                what: what.to_string(),
                reason: format!("{outcome:?}"),
            });
        }
        loop {
            let delivery = self
                .receiver
                .recv::<Body<Value>>()
                .await
                .map_err(|e| AmqpError::link(format!("{what}: reading {}", self.node), e))?;
            let _ = self.receiver.accept(&delivery).await;
            let message = delivery.into_message();
            let correlated = message
                .properties
                .as_ref()
                .and_then(|p| p.correlation_id.as_ref())
                .is_some_and(|c| message_id_text(c) == id);
            if !correlated {
                continue;
            }
            let props = message.application_properties.map(|a| a.0);
            let get = |k: &str| props.as_ref().and_then(|p| p.get(k));
            let status = get("statusCode")
                .or_else(|| get("status-code"))
                .and_then(simple_int)
                .unwrap_or(0);
            if ![200, 202, 204].contains(&status) {
                let description = get("statusDescription")
                    .or_else(|| get("status-description"))
                    .map(simple_text);
                return Err(AmqpError::Status {
                    what: what.to_string(),
                    status,
                    description,
                });
            }
            return Ok(match message.body {
                Body::Value(v) => v.0,
                _ => Value::Null,
            });
        }
    }

    /// Detaches both links (errors ignored: the connection is going away), waiting at most
    /// a second for each answer.
    pub(crate) async fn close(self) {
        let limit = Duration::from_secs(1);
        let _ = tokio::time::timeout(limit, self.sender.close()).await;
        let _ = tokio::time::timeout(limit, self.receiver.close()).await;
    }
}

fn simple_int(v: &SimpleValue) -> Option<i64> {
    match v {
        SimpleValue::Int(i) => Some(i64::from(*i)),
        SimpleValue::Long(i) => Some(*i),
        SimpleValue::Uint(i) => Some(i64::from(*i)),
        SimpleValue::Short(i) => Some(i64::from(*i)),
        SimpleValue::Ulong(i) => i64::try_from(*i).ok(),
        SimpleValue::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A value as Go's `cast.ToString` writes it (what daprd puts into a message's metadata).
pub(crate) fn simple_text(v: &SimpleValue) -> String {
    match v {
        SimpleValue::Null => String::new(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Char(c) => c.to_string(),
        SimpleValue::Timestamp(t) => daprd_core::gocompat::format_http_date_ms(t.milliseconds()),
        SimpleValue::Uuid(u) => uuid::Uuid::from_bytes(*u.as_inner()).to_string(),
        SimpleValue::Binary(b) => String::from_utf8_lossy(b).into_owned(),
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        other => format!("{other:?}"),
    }
}

/// A receive failed because the broker detached the link as `amqp:link:stolen`: [`AmqpError::Stolen`]
/// then, else [`AmqpError::Link`].
#[cfg_attr(not(feature = "eventhubs"), allow(dead_code))]
pub(crate) fn receive_error(address: &str, e: &fe2o3_amqp::link::RecvError) -> AmqpError {
    use fe2o3_amqp::link::{LinkStateError, RecvError};
    use fe2o3_amqp::types::definitions::{ErrorCondition, LinkError};
    let stolen = matches!(
        e,
        RecvError::LinkStateError(
            LinkStateError::RemoteDetachedWithError(err) | LinkStateError::RemoteClosedWithError(err)
        ) if err.condition == ErrorCondition::LinkError(LinkError::Stolen)
    );
    if stolen {
        AmqpError::Stolen {
            address: address.to_string(),
        }
    } else {
        AmqpError::link(format!("receiving from {address}"), e)
    }
}

#[cfg_attr(not(feature = "eventhubs"), allow(dead_code))]
/// An annotation's or a map's value as text (a timestamp as Go's RFC 3339, to the second).
pub(crate) fn value_text(v: &Value) -> String {
    match v {
        Value::Timestamp(t) => {
            let ms = u64::try_from(t.milliseconds()).unwrap_or(0);
            daprd_core::cloudevent::format_time(std::time::UNIX_EPOCH + Duration::from_millis(ms))
        }
        other => SimpleValue::try_from(other.clone())
            .map(|s| simple_text(&s))
            .unwrap_or_else(|_| format!("{other:?}")),
    }
}

/// A message id as text: a string as it is, a UUID in its usual form, a number in decimal.
pub(crate) fn message_id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Uuid(u) => uuid::Uuid::from_bytes(*u.as_inner()).to_string(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Binary(b) => String::from_utf8_lossy(b).into_owned(),
    }
}

/// The lock-renewal request for `tokens` on an entity's `$management` node.
pub(crate) fn renew_lock_request(link_name: &str) -> OrderedMap<String, SimpleValue> {
    let mut props = OrderedMap::new();
    props.insert(
        "operation".to_string(),
        SimpleValue::String("com.microsoft:renew-lock".into()),
    );
    props.insert(
        "associated-link-name".to_string(),
        SimpleValue::String(link_name.to_string()),
    );
    props
}

/// Service Bus's session filter (`com.microsoft:session-filter`, descriptor
/// `0x00000137:0x0000000C`) on a receiver's source: the session wanted, or `None` for the
/// next free one.
pub(crate) const SESSION_FILTER: &str = "com.microsoft:session-filter";

#[cfg_attr(not(feature = "eventhubs"), allow(dead_code))]
/// Event Hubs' position filter on a receiver's source, and its descriptor code.
const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";
#[cfg_attr(not(feature = "eventhubs"), allow(dead_code))]
const SELECTOR_FILTER_CODE: u64 = 0x0000_468C_0000_0004;
const SESSION_FILTER_CODE: u64 = 0x0000_0137_0000_000C;

fn session_filter(session: Option<&str>) -> fe2o3_amqp::types::messaging::FilterSet {
    let value = session.map_or(Value::Null, |s| Value::String(s.to_string()));
    let mut filter = OrderedMap::new();
    filter.insert(
        Symbol::from(SESSION_FILTER),
        Value::Described(Box::new(serde_amqp::described::Described {
            descriptor: serde_amqp::descriptor::Descriptor::Code(SESSION_FILTER_CODE),
            value,
        })),
    );
    filter
}

/// The session an attached receiver holds: the session filter of the source the broker
/// answered with.
fn locked_session(receiver: &Receiver) -> Option<String> {
    let filter = receiver.source().as_ref()?.filter.as_ref()?;
    let value = filter.get(&Symbol::from(SESSION_FILTER))?;
    let value = match value {
        Value::Described(d) => &d.value,
        v => v,
    };
    match value {
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Whether a session receiver's attach failed because no session was free: the broker
/// answers such an attach with no source and detaches it (`com.microsoft:timeout` after
/// waiting for one, `com.microsoft:session-cannot-be-locked` when the one asked for is held).
fn no_session_available(e: &fe2o3_amqp::link::ReceiverAttachError) -> bool {
    use fe2o3_amqp::link::ReceiverAttachError as E;
    use fe2o3_amqp::types::definitions::ErrorCondition;
    match e {
        E::IncomingSourceIsNone => true,
        E::RemoteClosedWithError(error) => match &error.condition {
            ErrorCondition::Custom(c) => {
                c.as_str() == "com.microsoft:timeout"
                    || c.as_str() == "com.microsoft:session-cannot-be-locked"
            }
            _ => false,
        },
        _ => false,
    }
}

/// The application properties of a `com.microsoft:renew-session-lock` request.
pub(crate) fn renew_session_lock_request(link_name: &str) -> OrderedMap<String, SimpleValue> {
    let mut props = renew_lock_request(link_name);
    props.insert(
        "operation".to_string(),
        SimpleValue::String("com.microsoft:renew-session-lock".into()),
    );
    props
}

/// The body of a renew-session-lock request: `{"session-id": id}`.
pub(crate) fn session_id_body(session: &str) -> Value {
    let mut map = OrderedMap::new();
    map.insert(
        Value::String("session-id".into()),
        Value::String(session.to_string()),
    );
    Value::Map(map)
}

/// The body of a renew-lock request: `{"lock-tokens": [uuid...]}`.
pub(crate) fn lock_tokens_body(tokens: &[[u8; 16]]) -> Value {
    let mut map = OrderedMap::new();
    map.insert(
        Value::String("lock-tokens".into()),
        Value::Array(Array(
            tokens.iter().map(|t| Value::Uuid(Uuid::from(*t))).collect(),
        )),
    );
    Value::Map(map)
}

// ---- messages ------------------------------------------------------------------------

/// Service Bus's message keys in Dapr's metadata (read and write, as Go daprd names them).
pub(crate) mod keys {
    pub const MESSAGE_ID: &str = "MessageId";
    pub const MESSAGE_ID_ALIAS: &str = "id";
    pub const CORRELATION_ID: &str = "CorrelationId";
    pub const CORRELATION_ID_ALIAS: &str = "correlationID";
    pub const SESSION_ID: &str = "SessionId";
    pub const LABEL: &str = "Label";
    pub const REPLY_TO: &str = "ReplyTo";
    pub const TO: &str = "To";
    pub const PARTITION_KEY: &str = "PartitionKey";
    pub const CONTENT_TYPE: &str = "ContentType";
    pub const DELIVERY_COUNT: &str = "DeliveryCount";
    pub const LOCKED_UNTIL: &str = "LockedUntilUtc";
    pub const LOCK_TOKEN: &str = "LockToken";
    pub const ENQUEUED_TIME: &str = "EnqueuedTimeUtc";
    pub const SEQUENCE_NUMBER: &str = "SequenceNumber";
    pub const SCHEDULED_ENQUEUE_TIME: &str = "ScheduledEnqueueTimeUtc";
}

/// Service Bus's message annotations.
mod annotation {
    pub const PARTITION_KEY: &str = "x-opt-partition-key";
    pub const SCHEDULED_ENQUEUE_TIME: &str = "x-opt-scheduled-enqueue-time";
    pub const ENQUEUED_TIME: &str = "x-opt-enqueued-time";
    pub const SEQUENCE_NUMBER: &str = "x-opt-sequence-number";
    pub const LOCKED_UNTIL: &str = "x-opt-locked-until";
    pub const LOCK_TOKEN: &str = "x-opt-lock-token";
}

/// The AMQP message Go daprd sends for a publish of `data` with `metadata`: Service Bus's
/// keys become the message's properties and annotations, `ttl`/`ttlInSeconds` its time to
/// live, every other non-empty entry an application property (a string).
///
/// # Errors
/// A `ScheduledEnqueueTimeUtc` that is neither an HTTP date nor RFC 3339, a `PartitionKey`
/// that differs from `SessionId`.
pub fn outgoing(
    data: &[u8],
    metadata: &BTreeMap<String, String>,
    content_type: Option<&str>,
) -> Result<Message<Data>, AmqpError> {
    let mut props = Properties::default();
    let mut annotations: OrderedMap<OwnedKey, Value> = OrderedMap::new();
    let mut app: OrderedMap<String, SimpleValue> = OrderedMap::new();
    let mut header = None;
    let mut partition_key = None;
    for (k, v) in metadata {
        if v.is_empty() && k != keys::SESSION_ID {
            continue;
        }
        match k.as_str() {
            "ttl" | "ttlInSeconds" => {
                if let Some(ttl) = daprd_core::cloudevent::ttl_from_metadata(metadata) {
                    header = Some(Header {
                        ttl: Some(u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX)),
                        ..Default::default()
                    });
                }
            }
            keys::MESSAGE_ID | keys::MESSAGE_ID_ALIAS => {
                if props.message_id.is_none() {
                    props.message_id = Some(MessageId::String(v.clone()));
                }
            }
            keys::CORRELATION_ID | keys::CORRELATION_ID_ALIAS => {
                if props.correlation_id.is_none() {
                    props.correlation_id = Some(MessageId::String(v.clone()));
                }
            }
            keys::SESSION_ID => props.group_id = Some(v.clone()),
            keys::LABEL => props.subject = Some(v.clone()),
            keys::REPLY_TO => props.reply_to = Some(v.clone()),
            keys::TO => props.to = Some(v.clone()),
            keys::PARTITION_KEY => {
                partition_key = Some(v.clone());
                annotations.insert(
                    OwnedKey::Symbol(Symbol::from(annotation::PARTITION_KEY)),
                    Value::String(v.clone()),
                );
            }
            keys::CONTENT_TYPE => props.content_type = Some(Symbol::from(v.as_str())),
            keys::SCHEDULED_ENQUEUE_TIME => {
                let ms = daprd_core::gocompat::parse_http_date_ms(v)
                    .or_else(|| daprd_core::gocompat::parse_rfc3339_ms(v))
                    .ok_or_else(|| {
                        AmqpError::BadMessage(format!(
                            "invalid time format for {k}; expected HTTP time format or RFC3339"
                        ))
                    })?;
                annotations.insert(
                    OwnedKey::Symbol(Symbol::from(annotation::SCHEDULED_ENQUEUE_TIME)),
                    Value::Timestamp(Timestamp::from_milliseconds(ms)),
                );
            }
            _ => {
                app.insert(k.clone(), SimpleValue::String(v.clone()));
            }
        }
    }
    if let (Some(pk), Some(session)) = (&partition_key, &props.group_id) {
        if pk != session {
            return Err(AmqpError::BadMessage(format!(
                "session id {session} and partition key {pk} should be equal when both present"
            )));
        }
    }
    if props.content_type.is_none() {
        props.content_type = content_type.filter(|c| !c.is_empty()).map(Symbol::from);
    }
    let message = Message::builder()
        .header(header)
        .message_annotations((!annotations.is_empty()).then_some(MessageAnnotations(annotations)))
        .properties(props)
        .application_properties((!app.is_empty()).then_some(ApplicationProperties(app)))
        .data(Binary::from(data.to_vec()))
        .build();
    Ok(message)
}

/// A received message's body: its data sections joined (an `amqp-value` string or binary
/// as its bytes).
pub fn body_bytes(body: Body<Value>) -> Bytes {
    match body {
        Body::Data(batch) => {
            let mut sections = batch.into_iter();
            match (sections.next(), sections.next()) {
                (None, _) => Bytes::new(),
                (Some(only), None) => Bytes::from(only.0.into_vec()),
                (Some(first), Some(second)) => {
                    let mut all = first.0.into_vec();
                    all.extend_from_slice(&second.0);
                    for s in sections {
                        all.extend_from_slice(&s.0);
                    }
                    Bytes::from(all)
                }
            }
        }
        Body::Value(v) => match v.0 {
            Value::String(s) => Bytes::from(s),
            Value::Binary(b) => Bytes::from(b.into_vec()),
            Value::Null => Bytes::new(),
            other => Bytes::from(format!("{other:?}")),
        },
        _ => Bytes::new(),
    }
}

/// A received message's lock token: the `x-opt-lock-token` annotation, else its 16-byte
/// delivery tag (Service Bus sends the lock token as the tag).
pub(crate) fn lock_token(
    annotations: Option<&MessageAnnotations>,
    delivery_tag: &[u8],
) -> Option<[u8; 16]> {
    annotations
        .and_then(|a| {
            a.0.get(&OwnedKey::Symbol(Symbol::from(annotation::LOCK_TOKEN)))
        })
        .and_then(|v| match v {
            Value::Uuid(u) => Some(*u.as_inner()),
            _ => None,
        })
        .or_else(|| <[u8; 16]>::try_from(delivery_tag).ok())
}

/// The metadata Go daprd gives a received message: each application property and each of
/// Service Bus's properties as `metadata.<key>`.
pub fn incoming_metadata(
    message: &Message<Body<Value>>,
    lock_token: Option<[u8; 16]>,
) -> BTreeMap<String, String> {
    let mut md = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        md.insert(format!("metadata.{k}"), v);
    };
    if let Some(app) = &message.application_properties {
        for (k, v) in app.0.iter() {
            put(k, simple_text(v));
        }
    }
    let props = message.properties.as_ref();
    if let Some(id) = props.and_then(|p| p.message_id.as_ref()) {
        let id = message_id_text(id);
        if !id.is_empty() {
            put(keys::MESSAGE_ID, id);
        }
    }
    if let Some(s) = props.and_then(|p| p.group_id.as_ref()) {
        put(keys::SESSION_ID, s.clone());
    }
    let non_empty = |s: Option<&String>| s.filter(|s| !s.is_empty()).cloned();
    if let Some(c) = props.and_then(|p| p.correlation_id.as_ref()) {
        let c = message_id_text(c);
        if !c.is_empty() {
            put(keys::CORRELATION_ID, c);
        }
    }
    if let Some(s) = non_empty(props.and_then(|p| p.subject.as_ref())) {
        put(keys::LABEL, s);
    }
    if let Some(s) = non_empty(props.and_then(|p| p.reply_to.as_ref())) {
        put(keys::REPLY_TO, s);
    }
    if let Some(s) = non_empty(props.and_then(|p| p.to.as_ref())) {
        put(keys::TO, s);
    }
    if let Some(s) = props
        .and_then(|p| p.content_type.as_ref())
        .map(|c| c.0.clone())
        .filter(|c| !c.is_empty())
    {
        put(keys::CONTENT_TYPE, s);
    }
    if let Some(t) = lock_token {
        put(
            keys::LOCK_TOKEN,
            base64::engine::general_purpose::STANDARD.encode(t),
        );
    }
    let count = message.header.as_ref().map_or(0, |h| h.delivery_count);
    put(keys::DELIVERY_COUNT, (u64::from(count) + 1).to_string());
    let ann = |name: &str| {
        message
            .message_annotations
            .as_ref()
            .and_then(|a| a.0.get(&OwnedKey::Symbol(Symbol::from(name))))
    };
    let time = |v: &Value| match v {
        Value::Timestamp(t) => Some(daprd_core::gocompat::format_http_date_ms(t.milliseconds())),
        _ => None,
    };
    if let Some(t) = ann(annotation::ENQUEUED_TIME).and_then(time) {
        put(keys::ENQUEUED_TIME, t);
    }
    if let Some(Value::Long(n)) = ann(annotation::SEQUENCE_NUMBER) {
        put(keys::SEQUENCE_NUMBER, n.to_string());
    }
    if let Some(t) = ann(annotation::SCHEDULED_ENQUEUE_TIME).and_then(time) {
        put(keys::SCHEDULED_ENQUEUE_TIME, t);
    }
    if let Some(Value::String(k)) = ann(annotation::PARTITION_KEY) {
        put(keys::PARTITION_KEY, k.clone());
    }
    if let Some(t) = ann(annotation::LOCKED_UNTIL).and_then(time) {
        put(keys::LOCKED_UNTIL, t);
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn publish_metadata_maps_as_go_daprd_does() {
        let m = outgoing(
            b"{}",
            &md(&[
                ("MessageId", "m1"),
                ("id", "ignored"),
                ("correlationID", "c1"),
                ("SessionId", "s1"),
                ("PartitionKey", "s1"),
                ("Label", "lbl"),
                ("To", "to"),
                ("ReplyTo", "rt"),
                ("ContentType", "text/plain"),
                ("ScheduledEnqueueTimeUtc", "Tue, 10 Nov 2009 23:00:00 GMT"),
                ("ttlInSeconds", "30"),
                ("custom", "v"),
                ("blank", ""),
            ]),
            None,
        )
        .unwrap();
        let p = m.properties.as_ref().unwrap();
        assert_eq!(p.message_id, Some(MessageId::String("m1".into())));
        assert_eq!(p.correlation_id, Some(MessageId::String("c1".into())));
        assert_eq!(p.group_id.as_deref(), Some("s1"));
        assert_eq!(p.subject.as_deref(), Some("lbl"));
        assert_eq!(p.to.as_deref(), Some("to"));
        assert_eq!(p.reply_to.as_deref(), Some("rt"));
        assert_eq!(p.content_type, Some(Symbol::from("text/plain")));
        assert_eq!(m.header.as_ref().unwrap().ttl, Some(30_000));
        let a = &m.message_annotations.as_ref().unwrap().0;
        assert_eq!(
            a.get(&OwnedKey::Symbol(Symbol::from(
                "x-opt-scheduled-enqueue-time"
            ))),
            Some(&Value::Timestamp(Timestamp::from_milliseconds(
                1_257_894_000_000
            )))
        );
        let app = &m.application_properties.as_ref().unwrap().0;
        assert_eq!(app.get("custom"), Some(&SimpleValue::String("v".into())));
        assert_eq!(
            app.len(),
            1,
            "Service Bus keys and blanks stay out: {app:?}"
        );
        assert_eq!(m.body.0.as_slice(), b"{}");
    }

    #[test]
    fn bad_publish_metadata_is_refused() {
        let e = outgoing(b"", &md(&[("ScheduledEnqueueTimeUtc", "soon")]), None).unwrap_err();
        assert!(
            e.to_string()
                .contains("expected HTTP time format or RFC3339"),
            "{e}"
        );
        assert!(!e.is_transient());
        let e = outgoing(b"", &md(&[("SessionId", "a"), ("PartitionKey", "b")]), None).unwrap_err();
        assert!(e.to_string().contains("should be equal"), "{e}");
    }

    #[test]
    fn received_messages_carry_go_daprd_metadata() {
        let mut ann = OrderedMap::new();
        ann.insert(
            OwnedKey::Symbol(Symbol::from("x-opt-enqueued-time")),
            Value::Timestamp(Timestamp::from_milliseconds(1_257_894_000_000)),
        );
        ann.insert(
            OwnedKey::Symbol(Symbol::from("x-opt-sequence-number")),
            Value::Long(42),
        );
        let mut app = OrderedMap::new();
        app.insert("n".to_string(), SimpleValue::Int(7));
        let m: Message<Body<Value>> = Message {
            header: Some(Header {
                delivery_count: 2,
                ..Default::default()
            }),
            delivery_annotations: None,
            message_annotations: Some(MessageAnnotations(ann)),
            properties: Some(Properties {
                message_id: Some(MessageId::String("m1".into())),
                subject: Some("lbl".into()),
                ..Default::default()
            }),
            application_properties: Some(ApplicationProperties(app)),
            body: Body::Empty,
            footer: None,
        };
        let md = incoming_metadata(&m, Some([1; 16]));
        assert_eq!(md["metadata.MessageId"], "m1");
        assert_eq!(md["metadata.Label"], "lbl");
        assert_eq!(md["metadata.n"], "7");
        assert_eq!(md["metadata.DeliveryCount"], "3");
        assert_eq!(md["metadata.SequenceNumber"], "42");
        assert_eq!(
            md["metadata.EnqueuedTimeUtc"],
            "Tue, 10 Nov 2009 23:00:00 GMT"
        );
        assert_eq!(md["metadata.LockToken"], "AQEBAQEBAQEBAQEBAQEBAQ==");
        assert!(!md.contains_key("metadata.SessionId"));
    }
}
