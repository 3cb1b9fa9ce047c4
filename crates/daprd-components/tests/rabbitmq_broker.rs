//! `pubsub.rabbitmq` against the real broker: exchange, queue and binding names checked with
//! `rabbitmqctl`, message properties read back with a plain AMQP consumer.

#![cfg(feature = "rabbitmq")]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use daprd_core::pubsub::{Handler, Outcome, PubSubFactory, PublishRequest, SubscribeRequest};
use daprd_testkit::conformance::{metadata_with_group, random_name};
use futures::StreamExt;

fn uri() -> String {
    daprd_testkit::broker_address(
        "RABBITMQ_URI",
        "amqp://guest:guest@localhost:5672",
        "RabbitMQ",
    )
}

fn ctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_properties_match_dapr() {
    let topic = random_name("rmq-bytes");
    let group = random_name("app");
    let md = metadata_with_group(
        &group,
        &[("connectionString", &uri()), ("deliveryMode", "2")],
    );
    let c = daprd_components::rabbitmq::RabbitFactory
        .connect("pubsub", &md)
        .await
        .unwrap();
    let handler: Handler = Arc::new(|_m| Box::pin(async { Outcome::Success }));
    let _sub = c
        .subscribe(SubscribeRequest::new(topic.clone()), handler)
        .await
        .unwrap();

    let queue = format!("{group}-{topic}");
    let exchanges = ctl(&["list_exchanges", "name", "type", "durable", "auto_delete"]);
    assert!(
        exchanges
            .lines()
            .any(|l| l == format!("{topic}\tfanout\tfalse\ttrue")),
        "exchange {topic}: {exchanges}"
    );
    let queues = ctl(&["list_queues", "name", "durable", "auto_delete"]);
    assert!(
        queues.lines().any(|l| l == format!("{queue}\tfalse\ttrue")),
        "queue {queue}: {queues}"
    );
    let bindings = ctl(&["list_bindings", "source_name", "destination_name"]);
    assert!(
        bindings.lines().any(|l| l == format!("{topic}\t{queue}")),
        "binding: {bindings}"
    );

    // Read what a publish puts on the exchange with a separate plain consumer.
    let conn = lapin::Connection::connect(&uri(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let probe = random_name("probe");
    ch.queue_declare(
        probe.as_str().into(),
        lapin::options::QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        probe.as_str().into(),
        topic.as_str().into(),
        "".into(),
        Default::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            probe.as_str().into(),
            "probe".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let metadata: BTreeMap<String, String> = [
        ("ttlInSeconds".to_string(), "30".to_string()),
        ("priority".to_string(), "3".to_string()),
    ]
    .into_iter()
    .collect();
    c.publish(PublishRequest {
        pubsub_name: "pubsub".into(),
        topic: topic.clone(),
        data: Bytes::from_static(b"payload"),
        metadata,
        content_type: None,
    })
    .await
    .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"payload");
    assert_eq!(
        d.properties.content_type().as_ref().map(|s| s.as_str()),
        Some("text/plain")
    );
    assert_eq!(*d.properties.delivery_mode(), Some(2));
    assert_eq!(
        d.properties.expiration().as_ref().map(|s| s.as_str()),
        Some("30000")
    );
    assert_eq!(*d.properties.priority(), Some(3));
    c.close().await.unwrap();
}

/// Exchanges are declared once per connection (as Go's component does); when the broker has
/// deleted one since (auto-delete with its last queue), the publish declares it again
/// instead of failing. Concurrent publishes share the channel and all get confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_redeclares_a_deleted_exchange_and_confirms_concurrent_publishes() {
    let topic = random_name("rmq-redeclare");
    let md = metadata_with_group(
        &random_name("app"),
        &[("connectionString", &uri()), ("publisherConfirm", "true")],
    );
    let c = daprd_components::rabbitmq::RabbitFactory
        .connect("pubsub", &md)
        .await
        .unwrap();
    let request = || PublishRequest {
        pubsub_name: "pubsub".into(),
        topic: topic.clone(),
        data: Bytes::from_static(b"{}"),
        metadata: BTreeMap::new(),
        content_type: None,
    };
    let publishes: Vec<_> = (0..50).map(|_| c.publish(request())).collect();
    for r in futures::future::join_all(publishes).await {
        r.unwrap();
    }

    // Delete the (cached) exchange behind the component's back.
    let conn = lapin::Connection::connect(&uri(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_delete(topic.as_str().into(), Default::default())
        .await
        .unwrap();
    c.publish(request())
        .await
        .expect("a publish after the exchange was deleted declares it again");
    let passive = lapin::options::ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.exchange_declare(
        topic.as_str().into(),
        lapin::ExchangeKind::Fanout,
        passive,
        Default::default(),
    )
    .await
    .expect("the exchange exists again");
    ch.exchange_delete(topic.as_str().into(), Default::default())
        .await
        .unwrap();
    c.close().await.unwrap();
}

/// A TCP front for the broker that takes the first connection and never answers it (as a
/// RabbitMQ node that is still booting does) and forwards every later one.
async fn silent_first_connection(upstream: String) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            if held.is_empty() {
                held.push(client);
                continue;
            }
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_broker_never_answers_does_not_hold_connecting() {
    let broker = uri();
    let hostport = broker
        .rsplit('@')
        .next()
        .unwrap()
        .trim_start_matches("amqp://")
        .replace("localhost", "127.0.0.1");
    let port = silent_first_connection(hostport).await;
    let md = metadata_with_group(
        &random_name("app"),
        &[(
            "connectionString",
            &format!("amqp://guest:guest@127.0.0.1:{port}"),
        )],
    );
    // Without a second attempt beside the unanswered one this never completes.
    let c = tokio::time::timeout(
        Duration::from_secs(8),
        daprd_components::rabbitmq::RabbitFactory.connect("pubsub", &md),
    )
    .await
    .expect("connecting went on past the unanswered connection")
    .unwrap();
    c.publish(PublishRequest {
        pubsub_name: "pubsub".into(),
        topic: random_name("rmq-hedge"),
        data: Bytes::from_static(b"x"),
        metadata: BTreeMap::new(),
        content_type: None,
    })
    .await
    .unwrap();
}
