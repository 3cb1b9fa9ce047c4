//! The AMQP 1.0 framing of the Service Bus component (and of Event Hubs' events, which it
//! shares its client with) checked against a real AMQP 1.0 broker
//! that is not ours: Debian's RabbitMQ with its `rabbitmq_amqp1_0` plugin, on a private node
//! (its own port and enabled-plugins file; the machine's shared broker is never changed).
//! The component's tests otherwise run against the test broker of `daprd_testkit::servicebus`,
//! which is written with the same AMQP library as the component: here a message the
//! component encodes crosses another implementation's decoder and encoder, and the
//! component's peek-lock receiver and its `accepted` settle a message there. (The abandon,
//! `modified`, is not checked here: RabbitMQ 3.10's plugin refuses that outcome altogether,
//! 3.13 and later take it.)

#![cfg(feature = "servicebus")]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use daprd_components::servicebus::wire;
use daprd_testkit::conformance::random_name;
use daprd_testkit::rabbitmq::Node;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{ReceiverSettleMode, SenderSettleMode};
use fe2o3_amqp::types::messaging::{Body, Message, Outcome};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Sender, Session};

const WITHIN: Duration = Duration::from_secs(20);

async fn open(node: &Node) -> (ConnectionHandle<()>, SessionHandle<()>) {
    // as the component connects: SASL ANONYMOUS (RabbitMQ maps it to its default user)
    let mut conn = Connection::builder()
        .container_id(format!("daprd-{}", uuid::Uuid::new_v4()))
        .hostname("localhost")
        .sasl_profile(SaslProfile::Anonymous)
        .open(format!("amqp://127.0.0.1:{}", node.port).as_str())
        .await
        .unwrap();
    let session = Session::begin(&mut conn).await.unwrap();
    (conn, session)
}

/// A receiver as the component attaches one: peek-lock (settled by the receiver, first),
/// credit given by hand.
async fn peek_lock(session: &mut SessionHandle<()>, address: &str) -> Receiver {
    let mut r = Receiver::builder()
        .name(format!("receiver-{}", uuid::Uuid::new_v4()))
        .source(address)
        .target(format!("daprd-{}", uuid::Uuid::new_v4()))
        .receiver_settle_mode(ReceiverSettleMode::First)
        .sender_settle_mode(SenderSettleMode::Unsettled)
        .credit_mode(CreditMode::Manual)
        .auto_accept(false)
        .attach(session)
        .await
        .unwrap();
    r.set_credit(10).await.unwrap();
    r
}

async fn next(r: &mut Receiver) -> (DeliveryInfo, Message<Body<Value>>) {
    let d = tokio::time::timeout(WITHIN, r.recv::<Body<Value>>())
        .await
        .expect("a delivery from rabbitmq")
        .unwrap();
    d.into_parts()
}

fn metadata(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_crosses_rabbitmq_amqp_1_0_unchanged_and_an_accept_settles_it() {
    let node = Node::start(&["rabbitmq_amqp1_0"]).await;
    let (conn, mut session) = open(&node).await;
    let address = format!("/queue/{}", random_name("framing"));
    let mut sender = Sender::attach(&mut session, "framing-sender", address.as_str())
        .await
        .unwrap();
    let published = metadata(&[
        ("MessageId", "m-1"),
        ("CorrelationId", "c-1"),
        ("SessionId", "s-1"),
        ("PartitionKey", "s-1"),
        ("Label", "a label"),
        ("To", "somewhere"),
        ("ReplyTo", "back"),
        ("ScheduledEnqueueTimeUtc", "Tue, 01 Dec 2026 10:00:00 GMT"),
        ("ttlInSeconds", "3600"),
        ("custom", "value"),
    ]);
    let data = br#"{"specversion":"1.0","data":{"n":1}}"#;
    let message = wire::outgoing(data, &published, Some("application/cloudevents+json")).unwrap();
    let outcome = tokio::time::timeout(WITHIN, sender.send(message))
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(outcome, Outcome::Accepted(_)),
        "rabbitmq did not accept the message: {outcome:?}"
    );

    let mut receiver = peek_lock(&mut session, &address).await;
    let (info, message) = next(&mut receiver).await;
    let got = wire::incoming_metadata(&message, None);
    let want = metadata(&[
        ("metadata.MessageId", "m-1"),
        ("metadata.CorrelationId", "c-1"),
        ("metadata.SessionId", "s-1"),
        ("metadata.PartitionKey", "s-1"),
        ("metadata.Label", "a label"),
        ("metadata.To", "somewhere"),
        ("metadata.ReplyTo", "back"),
        (
            "metadata.ScheduledEnqueueTimeUtc",
            "Tue, 01 Dec 2026 10:00:00 GMT",
        ),
        ("metadata.ContentType", "application/cloudevents+json"),
        ("metadata.custom", "value"),
        ("metadata.DeliveryCount", "1"),
    ]);
    assert_eq!(got, want);
    assert_eq!(
        message.header.as_ref().and_then(|h| h.ttl),
        Some(3_600_000),
        "the time to live"
    );
    assert_eq!(&wire::body_bytes(message.body)[..], &data[..]);
    // what the component sends once the app accepted a message
    receiver.accept(info).await.unwrap();

    // accepted means gone: behind a marker sent now, nothing older comes to a receiver on a
    // new connection (an unsettled message would go back to the queue, ahead of it, when
    // this connection closes)
    let marker = wire::outgoing(br#"{"n":2}"#, &BTreeMap::new(), None).unwrap();
    sender
        .send(marker)
        .await
        .unwrap()
        .accepted_or("rejected")
        .unwrap();
    // the links detach first (RabbitMQ 3.10 may answer a receiver's detach with an
    // illegal-state error; that is its business, the link is gone either way)
    let _ = tokio::time::timeout(WITHIN, receiver.close()).await;
    let _ = tokio::time::timeout(WITHIN, sender.close()).await;
    shut(conn, session).await;
    let (conn, mut session) = open(&node).await;
    let mut again = peek_lock(&mut session, &address).await;
    let (info, m) = next(&mut again).await;
    assert_eq!(
        &wire::body_bytes(m.body)[..],
        br#"{"n":2}"#,
        "an accepted message came back"
    );
    again.accept(info).await.unwrap();
    let _ = tokio::time::timeout(WITHIN, again.close()).await;
    shut(conn, session).await;
}

/// Ends the session and closes the connection, each within `WITHIN`: fe2o3-amqp's session
/// waits for the peer's End without limit, and a test must fail rather than hang.
async fn shut(mut conn: ConnectionHandle<()>, mut session: SessionHandle<()>) {
    tokio::time::timeout(WITHIN, session.end())
        .await
        .expect("rabbitmq answered the session's end")
        .unwrap();
    tokio::time::timeout(WITHIN, conn.close())
        .await
        .expect("rabbitmq answered the connection's close")
        .unwrap();
}

/// An Event Hubs event (as `pubsub.azure.eventhubs` encodes it) crosses RabbitMQ unchanged,
/// read as the component reads events: a receiver the broker sends settled deliveries to.
#[cfg(feature = "eventhubs")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_hubs_event_crosses_rabbitmq_amqp_1_0_unchanged() {
    use daprd_components::eventhubs::wire as events;
    let node = Node::start(&["rabbitmq_amqp1_0"]).await;
    let (conn, mut session) = open(&node).await;
    let address = format!("/queue/{}", random_name("events"));
    let mut sender = Sender::attach(&mut session, "events-sender", address.as_str())
        .await
        .unwrap();
    let data = br#"{"specversion":"1.0","data":{"n":1}}"#;
    let event = events::event(data, Some("application/json"), Some("customer-7"));
    let outcome = tokio::time::timeout(WITHIN, sender.send(event))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    let mut receiver = Receiver::builder()
        .name(format!("receiver-{}", uuid::Uuid::new_v4()))
        .source(address.as_str())
        .target(format!("daprd-{}", uuid::Uuid::new_v4()))
        .receiver_settle_mode(ReceiverSettleMode::First)
        .sender_settle_mode(SenderSettleMode::Settled)
        .credit_mode(CreditMode::Auto(10))
        .attach(&mut session)
        .await
        .unwrap();
    let (_, message) = next(&mut receiver).await;
    assert_eq!(
        message
            .properties
            .as_ref()
            .and_then(|p| p.content_type.as_ref())
            .map(|c| c.as_str()),
        Some("application/json")
    );
    let got = events::incoming_metadata(&message, false);
    assert_eq!(
        got.get("x-opt-partition-key").map(String::as_str),
        Some("customer-7"),
        "{got:?}"
    );
    assert_eq!(&wire::body_bytes(message.body)[..], &data[..]);
    let _ = tokio::time::timeout(WITHIN, receiver.close()).await;
    let _ = tokio::time::timeout(WITHIN, sender.close()).await;
    shut(conn, session).await;
}
