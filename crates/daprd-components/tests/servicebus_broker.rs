//! `pubsub.azure.servicebus.topics` and `.queues` against the test broker of
//! `daprd_testkit::servicebus` (AMQP 1.0 with Service Bus's CBS, addressing and peek-lock):
//! the message on the wire and the metadata a received one carries, the SAS token, lock
//! renewal while the app works, abandon and dead-lettering, and an outage (the broker cuts
//! every connection) in the middle of a stream.

#![cfg(feature = "servicebus")]
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use daprd_components::servicebus::ServiceBusFactory;
use daprd_core::pubsub::{Handler, Message, Outcome, PubSub, PubSubFactory, SubscribeRequest};
use daprd_testkit::conformance::{
    collector, in_flight_gate, metadata_with_group, publish_request_with as request, random_name,
    success_collector,
};
use daprd_testkit::eventually;
use daprd_testkit::servicebus::TestBroker;
use fe2o3_amqp::types::messaging::{annotations::OwnedKey, Body, MessageId};
use fe2o3_amqp::types::primitives::{SimpleValue, Symbol, Value};
use tokio::sync::mpsc;

async fn component(
    factory: ServiceBusFactory,
    connection_string: &str,
    group: &str,
    extra: &[(&str, &str)],
) -> Arc<dyn PubSub> {
    let mut md = metadata_with_group(group, &[("connectionString", connection_string)]);
    for (k, v) in extra {
        md.insert(*k, *v);
    }
    factory.connect("pubsub", &md).await.unwrap()
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Message>, within: Duration) -> Option<Message> {
    tokio::time::timeout(within, rx.recv()).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_puts_go_daprds_message_on_the_wire() {
    let broker = TestBroker::start(0).await.unwrap();
    let c = component(
        ServiceBusFactory::TOPICS,
        &broker.connection_string(),
        "app",
        &[],
    )
    .await;
    let topic = random_name("orders");
    c.publish(request(
        &topic,
        r#"{"specversion":"1.0","data":{"n":1}}"#,
        &[
            ("MessageId", "m-1"),
            ("CorrelationId", "c-1"),
            ("Label", "created"),
            ("PartitionKey", "p-1"),
            ("ScheduledEnqueueTimeUtc", "2009-11-10T23:00:00Z"),
            ("ttlInSeconds", "120"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ],
    ))
    .await
    .unwrap();
    let sent = broker.published(&topic);
    assert_eq!(sent.len(), 1);
    let m = &sent[0];
    match &m.body {
        Body::Data(batch) => {
            let sections: Vec<&[u8]> = batch.iter().map(|d| d.0.as_slice()).collect();
            assert_eq!(
                sections,
                vec![br#"{"specversion":"1.0","data":{"n":1}}"#.as_slice()],
                "one data section, the payload's bytes"
            );
        }
        other => panic!("body {other:?}"),
    }
    let p = m.properties.as_ref().unwrap();
    assert_eq!(p.message_id, Some(MessageId::String("m-1".into())));
    assert_eq!(p.correlation_id, Some(MessageId::String("c-1".into())));
    assert_eq!(p.subject.as_deref(), Some("created"));
    assert_eq!(m.header.as_ref().unwrap().ttl, Some(120_000));
    let ann = &m.message_annotations.as_ref().unwrap().0;
    assert_eq!(
        ann.get(&OwnedKey::Symbol(Symbol::from("x-opt-partition-key"))),
        Some(&Value::String("p-1".into()))
    );
    assert!(ann.contains_key(&OwnedKey::Symbol(Symbol::from(
        "x-opt-scheduled-enqueue-time"
    ))));
    let app = &m.application_properties.as_ref().unwrap().0;
    assert_eq!(
        app.get("traceparent"),
        Some(&SimpleValue::String(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()
        ))
    );
    assert!(app.get("MessageId").is_none() && app.get("ttlInSeconds").is_none());
    // the token was put for the topic before its link attached
    assert!(
        broker
            .tokens()
            .contains(&format!("amqps://127.0.0.1/{topic}")),
        "{:?}",
        broker.tokens()
    );
    // a message the broker cannot carry is refused before it is sent
    let e = c
        .publish(request(
            &topic,
            "x",
            &[("SessionId", "a"), ("PartitionKey", "b")],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), daprd_core::pubsub::ErrorKind::Permanent, "{e}");
    assert_eq!(broker.published(&topic).len(), 1);
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_received_message_carries_service_bus_metadata() {
    let broker = TestBroker::start(0).await.unwrap();
    let topic = random_name("orders");
    let c = component(
        ServiceBusFactory::TOPICS,
        &broker.connection_string(),
        "app",
        &[],
    )
    .await;
    let (h, mut rx) = success_collector();
    let _sub = c.subscribe(SubscribeRequest::new(&topic), h).await.unwrap();
    c.publish(request(
        &topic,
        "hello",
        &[
            ("MessageId", "m-7"),
            ("Label", "greeting"),
            ("customer", "42"),
        ],
    ))
    .await
    .unwrap();
    let m = next(&mut rx, Duration::from_secs(10)).await.unwrap();
    assert_eq!(m.data, Bytes::from("hello"));
    assert_eq!(m.topic, topic);
    let md = &m.metadata;
    assert_eq!(md["metadata.MessageId"], "m-7");
    assert_eq!(md["metadata.Label"], "greeting");
    assert_eq!(md["metadata.customer"], "42");
    assert_eq!(md["metadata.DeliveryCount"], "1");
    assert!(!m.redelivered);
    for key in [
        "metadata.SequenceNumber",
        "metadata.LockToken",
        "metadata.EnqueuedTimeUtc",
        "metadata.LockedUntilUtc",
    ] {
        assert!(md.contains_key(key), "{key} in {md:?}");
    }
    assert!(md["metadata.EnqueuedTimeUtc"].ends_with(" GMT"));
    // completed: nothing left in the subscription
    let address = format!("{topic}/Subscriptions/app");
    eventually(Duration::from_secs(5), "the subscription emptied", || {
        let empty = broker.counts(&address) == (0, 0, 0);
        async move { empty.then_some(()) }
    })
    .await;
    c.close().await.unwrap();
}

/// The app takes 3 s over a message whose lock lasts 1 s: renewed every second, the lock
/// holds and the message is delivered once; with renewal off it is handed out again.
/// An app that takes 3 s over each message, and how many it was handed.
fn slow_app() -> (Handler, Arc<AtomicUsize>) {
    let deliveries = Arc::new(AtomicUsize::new(0));
    let d = deliveries.clone();
    let handler: Handler = Arc::new(move |_m| {
        let d = d.clone();
        Box::pin(async move {
            d.fetch_add(1, Ordering::SeqCst);
            // the app at work
            tokio::time::sleep(Duration::from_secs(3)).await;
            Outcome::Success
        })
    });
    (handler, deliveries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_are_renewed_while_the_app_works() {
    let broker = TestBroker::start(0).await.unwrap();
    broker.configure(Duration::from_millis(1500), 10);
    for renewal in ["1", "0"] {
        let topic = random_name("slow");
        let c = component(
            ServiceBusFactory::QUEUES,
            &broker.connection_string(),
            "app",
            &[("lockRenewalInSec", renewal)],
        )
        .await;
        let (handler, deliveries) = slow_app();
        let renewals_before = broker.renewals();
        let _sub = c
            .subscribe(SubscribeRequest::new(&topic), handler)
            .await
            .unwrap();
        c.publish(request(&topic, "slow", &[])).await.unwrap();
        if renewal == "1" {
            // completed once the app answered, the lock having held all along
            eventually(Duration::from_secs(15), "the message completed", || {
                let done =
                    broker.counts(&topic) == (0, 0, 0) && deliveries.load(Ordering::SeqCst) >= 1;
                async move { done.then_some(()) }
            })
            .await;
            assert_eq!(deliveries.load(Ordering::SeqCst), 1, "delivered once");
            assert!(
                broker.renewals() >= renewals_before + 2,
                "locks were renewed"
            );
        } else {
            // the lock lapses while the app works: handed out again
            eventually(Duration::from_secs(10), "a second delivery", || {
                let again = deliveries.load(Ordering::SeqCst) >= 2;
                async move { again.then_some(()) }
            })
            .await;
        }
        c.close().await.unwrap();
    }
}

/// A message the app refuses is abandoned (delivered again, its delivery count rising) until
/// the entity's maximum delivery count dead-letters it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_is_abandoned_until_it_is_dead_lettered() {
    let broker = TestBroker::start(0).await.unwrap();
    broker.configure(Duration::from_secs(30), 3);
    let topic = random_name("poison");
    let c = component(
        ServiceBusFactory::QUEUES,
        &broker.connection_string(),
        "app",
        &[],
    )
    .await;
    let (handler, mut rx) = collector(|_, _| Outcome::Retry);
    let _sub = c
        .subscribe(SubscribeRequest::new(&topic), handler)
        .await
        .unwrap();
    c.publish(request(&topic, "poison", &[])).await.unwrap();
    let mut counts = Vec::new();
    for _ in 0..3 {
        let m = next(&mut rx, Duration::from_secs(10)).await.unwrap();
        counts.push(m.metadata["metadata.DeliveryCount"].clone());
    }
    assert_eq!(counts, ["1", "2", "3"]);
    eventually(Duration::from_secs(5), "the message dead-lettered", || {
        let dead = broker.counts(&topic) == (0, 0, 1);
        async move { dead.then_some(()) }
    })
    .await;
    assert!(next(&mut rx, Duration::from_millis(500)).await.is_none());
    c.close().await.unwrap();
}

/// The broker cuts every connection twice while messages flow: publishes are retried on a
/// new connection, the receiver reconnects, and every message arrives (lost 0); none is
/// left on the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_mid_stream_loses_nothing() {
    let broker = TestBroker::start(0).await.unwrap();
    broker.configure(Duration::from_secs(2), 100);
    let topic = random_name("outage");
    let cs = broker.connection_string();
    let extra = [
        ("minConnectionRecoveryInSec", "0"),
        ("publishInitialRetryIntervalInMs", "50"),
    ];
    let sub_c = component(ServiceBusFactory::TOPICS, &cs, "app", &extra).await;
    let pub_c = component(ServiceBusFactory::TOPICS, &cs, "app", &extra).await;
    let (h, mut rx) = success_collector();
    let _sub = sub_c
        .subscribe(SubscribeRequest::new(&topic), h)
        .await
        .unwrap();
    const N: usize = 60;
    let mut got = BTreeSet::new();
    for i in 0..N {
        if i == 20 || i == 40 {
            broker.drop_connections();
        }
        pub_c
            .publish(request(&topic, &format!("m{i}"), &[]))
            .await
            .unwrap_or_else(|e| panic!("publish {i}: {e}"));
        while let Ok(m) = rx.try_recv() {
            got.insert(String::from_utf8_lossy(&m.data).into_owned());
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < N && tokio::time::Instant::now() < deadline {
        if let Some(m) = next(&mut rx, Duration::from_millis(200)).await {
            got.insert(String::from_utf8_lossy(&m.data).into_owned());
        }
    }
    assert_eq!(got.len(), N, "every message arrives");
    let address = format!("{topic}/Subscriptions/app");
    eventually(Duration::from_secs(10), "the subscription emptied", || {
        let empty = broker.counts(&address) == (0, 0, 0);
        async move { empty.then_some(()) }
    })
    .await;
    for c in [sub_c, pub_c] {
        c.close().await.unwrap();
    }
}

/// A key the namespace does not know: the token is refused, and the subscribe and the
/// publish say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_refused_with_a_clear_error() {
    let broker = TestBroker::start(0).await.unwrap();
    let cs = broker
        .connection_string()
        .replace(daprd_testkit::servicebus::KEY, "d3Jvbmcta2V5");
    // entity management off: the AMQP side's refusal (the management side's is tested below)
    let c = component(
        ServiceBusFactory::TOPICS,
        &cs,
        "app",
        &[
            ("publishMaxRetries", "0"),
            ("disableEntityManagement", "true"),
        ],
    )
    .await;
    let (h, _rx) = success_collector();
    let e = c
        .subscribe(SubscribeRequest::new("orders"), h)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("put-token") && e.contains("401"), "{e}");
    let e = c.publish(request("orders", "x", &[])).await.unwrap_err();
    assert!(e.to_string().contains("401"), "{e}");
    assert!(broker.published("orders").is_empty());
    assert!(broker.tokens().is_empty());
}

/// Entity management (Go daprd's default): on a namespace where nothing exists, subscribing
/// creates the topic and the `consumerID` subscription with the component's properties
/// through the management API, and they take effect (the subscription dead-letters at the
/// `maxDeliveryCount` it was created with); a publish to a new topic creates it; a queue is
/// created with its properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_entities_are_created_with_the_components_properties() {
    let broker = TestBroker::start(0).await.unwrap();
    broker.require_existing_entities();
    let topic = random_name("managed");
    let props = [
        ("maxDeliveryCount", "2"),
        ("lockDurationInSec", "30"),
        ("defaultMessageTimeToLiveInSec", "86400"),
    ];
    let c = component(
        ServiceBusFactory::TOPICS,
        &broker.connection_string(),
        "app",
        &props,
    )
    .await;
    let (handler, mut rx) = collector(|_, _| Outcome::Retry);
    let _sub = c
        .subscribe(SubscribeRequest::new(&topic), handler)
        .await
        .unwrap();
    assert!(broker
        .description(&topic)
        .unwrap()
        .starts_with("<TopicDescription"));
    let address = format!("{topic}/Subscriptions/app");
    let sub = broker.description(&address).unwrap();
    assert!(sub.starts_with("<SubscriptionDescription"), "{sub}");
    assert!(
        sub.contains("<LockDuration>PT30S</LockDuration><DefaultMessageTimeToLive>P1D</DefaultMessageTimeToLive><MaxDeliveryCount>2</MaxDeliveryCount>"),
        "{sub}"
    );
    c.publish(request(&topic, "poison", &[])).await.unwrap();
    for expected in ["1", "2"] {
        let m = next(&mut rx, Duration::from_secs(10)).await.unwrap();
        assert_eq!(m.metadata["metadata.DeliveryCount"], expected);
    }
    eventually(
        Duration::from_secs(5),
        "dead-lettered at the created maximum",
        || {
            let dead = broker.counts(&address) == (0, 0, 1);
            async move { dead.then_some(()) }
        },
    )
    .await;

    // a publish to a topic nobody subscribed to yet creates it (and a subscriber made later
    // is created empty, as on Service Bus)
    let fresh = random_name("fresh");
    c.publish(request(&fresh, "first", &[])).await.unwrap();
    assert!(broker
        .description(&fresh)
        .unwrap()
        .starts_with("<TopicDescription"));
    c.close().await.unwrap();

    let queue = random_name("managed-queue");
    let q = component(
        ServiceBusFactory::QUEUES,
        &broker.connection_string(),
        "app",
        &[("maxDeliveryCount", "4"), ("autoDeleteOnIdleInSec", "3600")],
    )
    .await;
    let (h, mut rx) = success_collector();
    let _sub = q.subscribe(SubscribeRequest::new(&queue), h).await.unwrap();
    let d = broker.description(&queue).unwrap();
    assert!(
        d.starts_with("<QueueDescription")
            && d.contains(
                "<MaxDeliveryCount>4</MaxDeliveryCount><AutoDeleteOnIdle>PT1H</AutoDeleteOnIdle>"
            ),
        "{d}"
    );
    q.publish(request(&queue, "hello", &[])).await.unwrap();
    assert_eq!(
        next(&mut rx, Duration::from_secs(10)).await.unwrap().data,
        Bytes::from("hello")
    );
    q.close().await.unwrap();
}

/// With `disableEntityManagement: true` nothing is created: a publish to a topic that does
/// not exist fails, naming it (a subscription to one keeps reattaching, as Go daprd's does);
/// with entity management on, a wrong key is refused by the management API with a clear
/// error before anything is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_entity_management_a_missing_entity_is_a_clear_error() {
    let broker = TestBroker::start(0).await.unwrap();
    broker.require_existing_entities();
    let topic = random_name("unmanaged");
    let c = component(
        ServiceBusFactory::TOPICS,
        &broker.connection_string(),
        "app",
        &[
            ("disableEntityManagement", "true"),
            ("publishMaxRetries", "0"),
        ],
    )
    .await;
    let e = c
        .publish(request(&topic, "x", &[]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("could not be found") && e.contains(&topic),
        "{e}"
    );
    assert!(broker.published(&topic).is_empty());
    assert!(broker.description(&topic).is_none());
    c.close().await.unwrap();

    let wrong = broker
        .connection_string()
        .replace(daprd_testkit::servicebus::KEY, "d3Jvbmcta2V5");
    let c = component(ServiceBusFactory::TOPICS, &wrong, "app", &[]).await;
    let (h, _rx) = success_collector();
    let e = c
        .subscribe(SubscribeRequest::new(&topic), h)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("getting topic {topic}")) && e.contains("401"),
        "{e}"
    );
    assert!(broker.description(&topic).is_none());
}

/// A subscription stopped while a message the app refuses goes round and round (abandoned,
/// handed straight back) leaves nothing locked: what the app had and what was on its way are
/// abandoned, so the message is available at once, not when its lock (60 s) expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_subscription_leaves_nothing_locked() {
    let broker = TestBroker::start(0).await.unwrap();
    // no maximum delivery count to speak of: the message keeps going round
    broker.configure(Duration::from_secs(60), 1_000_000);
    let queue = random_name("stop");
    let c = component(
        ServiceBusFactory::QUEUES,
        &broker.connection_string(),
        "app",
        &[],
    )
    .await;
    for round in 0..5 {
        let deliveries = Arc::new(AtomicUsize::new(0));
        let seen = deliveries.clone();
        let handler: Handler = Arc::new(move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Outcome::Retry })
        });
        let sub = c
            .subscribe(SubscribeRequest::new(&queue), handler)
            .await
            .unwrap();
        if round == 0 {
            c.publish(request(&queue, "poison", &[])).await.unwrap();
        }
        eventually(Duration::from_secs(10), "the message going round", || {
            let n = deliveries.load(Ordering::SeqCst);
            async move { (n >= 20).then_some(()) }
        })
        .await;
        sub.stop().await;
        eventually(
            Duration::from_secs(5),
            "the message available again",
            || {
                let available = broker.counts(&queue) == (1, 0, 0);
                async move { available.then_some(()) }
            },
        )
        .await;
    }
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_subscription_gets_a_batch_per_handler() {
    let broker = TestBroker::start(0).await.unwrap();
    let queue = random_name("bulk");
    let c = component(
        ServiceBusFactory::QUEUES,
        &broker.connection_string(),
        "app",
        &[("maxConcurrentHandlers", "1")],
    )
    .await;
    let publish_ten = || async {
        for n in 0..10 {
            c.publish(request(&queue, &format!("{{\"n\":{n}}}"), &[]))
                .await
                .unwrap();
        }
    };
    publish_ten().await;
    // one handler, ten messages waiting: a bulk subscription of 10 has them all in the app's
    // hands at once (one batch, as Go daprd's bulk receive); a plain one handles them one by one
    let (h, most, answered) = in_flight_gate(10);
    let sub = c
        .subscribe(
            SubscribeRequest {
                topic: queue.clone(),
                metadata: BTreeMap::new(),
                bulk: Some(10),
            },
            h,
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "ten messages answered", || {
        let n = answered.load(Ordering::SeqCst);
        async move { (n == 10).then_some(()) }
    })
    .await;
    assert_eq!(
        most.load(Ordering::SeqCst),
        10,
        "the batch in the app's hands at once"
    );
    sub.stop().await;
    publish_ten().await;
    let (h, most, answered) = in_flight_gate(1);
    let _sub = c.subscribe(SubscribeRequest::new(&queue), h).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "ten more messages answered",
        || {
            let n = answered.load(Ordering::SeqCst);
            async move { (n == 10).then_some(()) }
        },
    )
    .await;
    assert_eq!(most.load(Ordering::SeqCst), 1, "one at a time without bulk");
    c.close().await.unwrap();
}

fn session_request(topic: &str, extra: &[(&str, &str)]) -> SubscribeRequest {
    let mut metadata: BTreeMap<String, String> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    metadata.insert("requireSessions".into(), "true".into());
    SubscribeRequest {
        topic: topic.to_string(),
        metadata,
        bulk: None,
    }
}

/// What a session test's app saw: every delivery in order (session, number), and how many
/// deliveries were in its hands at once, per session and in all.
#[derive(Default)]
struct SessionLog {
    deliveries: Vec<(String, usize)>,
    busy: BTreeMap<String, usize>,
    most_per_session: usize,
    most_sessions: usize,
}

/// Sessions `a`, `b` and `c` (five messages each, interleaved) on a subscription with two
/// session slots: each session's messages reach the app one at a time and in order — the
/// third, refused once, comes again before the fourth — two sessions at once, and the third
/// session once a slot let its idle session go. The subscription was made requiring sessions,
/// and every message carries its session id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_delivered_in_order_two_at_once() {
    let broker = TestBroker::start(0).await.unwrap();
    let topic = random_name("sessions");
    let c = component(
        ServiceBusFactory::TOPICS,
        &broker.connection_string(),
        "app",
        &[],
    )
    .await;
    let log = Arc::new(std::sync::Mutex::new(SessionLog::default()));
    let seen = log.clone();
    let handler: Handler = Arc::new(move |m: Message| {
        let seen = seen.clone();
        Box::pin(async move {
            let body = String::from_utf8_lossy(&m.data).into_owned();
            let (session, n) = body.split_once('-').unwrap();
            let (session, n) = (session.to_string(), n.parse::<usize>().unwrap());
            assert_eq!(m.metadata["metadata.SessionId"], session);
            let first = {
                let mut l = seen.lock().unwrap();
                let first = !l.deliveries.contains(&(session.clone(), n));
                l.deliveries.push((session.clone(), n));
                let busy = l.busy.entry(session.clone()).or_default();
                *busy += 1;
                let here = *busy;
                let sessions = l.busy.values().filter(|b| **b > 0).count();
                l.most_per_session = l.most_per_session.max(here);
                l.most_sessions = l.most_sessions.max(sessions);
                first
            };
            // the app at work, long enough for the other slot's session to overlap
            tokio::time::sleep(Duration::from_millis(100)).await;
            *seen.lock().unwrap().busy.get_mut(&session).unwrap() -= 1;
            if n == 2 && first {
                Outcome::Retry
            } else {
                Outcome::Success
            }
        })
    });
    let _sub = c
        .subscribe(
            session_request(
                &topic,
                &[
                    ("maxConcurrentSessions", "2"),
                    ("sessionIdleTimeoutInSec", "1"),
                ],
            ),
            handler,
        )
        .await
        .unwrap();
    let description = broker
        .description(&format!("{topic}/Subscriptions/app"))
        .unwrap();
    assert!(
        description.contains("<RequiresSession>true</RequiresSession>"),
        "{description}"
    );
    for n in 0..5 {
        for session in ["a", "b", "c"] {
            c.publish(request(
                &topic,
                &format!("{session}-{n}"),
                &[("SessionId", session)],
            ))
            .await
            .unwrap();
        }
    }
    eventually(Duration::from_secs(30), "18 deliveries", || {
        let n = log.lock().unwrap().deliveries.len();
        async move { (n >= 18).then_some(()) }
    })
    .await;
    {
        let l = log.lock().unwrap();
        for session in ["a", "b", "c"] {
            let order: Vec<usize> = l
                .deliveries
                .iter()
                .filter(|(s, _)| s == session)
                .map(|(_, n)| *n)
                .collect();
            assert_eq!(order, [0, 1, 2, 2, 3, 4], "session {session}");
        }
        assert_eq!(l.most_per_session, 1, "one message of a session at a time");
        assert_eq!(l.most_sessions, 2, "two sessions at once, no more");
    }
    let address = format!("{topic}/Subscriptions/app");
    eventually(Duration::from_secs(10), "the subscription emptied", || {
        let empty = broker.counts(&address) == (0, 0, 0);
        async move { empty.then_some(()) }
    })
    .await;
    c.close().await.unwrap();
}

/// The session lock is renewed while the app works (the broker's lock lasts 1.5 s, the app
/// takes 3 s): the message is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lock_is_renewed_while_the_app_works() {
    let broker = TestBroker::start(0).await.unwrap();
    broker.configure(Duration::from_millis(1500), 10);
    let topic = random_name("slow-session");
    let c = component(
        ServiceBusFactory::TOPICS,
        &broker.connection_string(),
        "app",
        &[("lockRenewalInSec", "1")],
    )
    .await;
    let (handler, deliveries) = slow_app();
    let renewals_before = broker.renewals();
    let _sub = c
        .subscribe(session_request(&topic, &[]), handler)
        .await
        .unwrap();
    c.publish(request(&topic, "slow", &[("SessionId", "s")]))
        .await
        .unwrap();
    let address = format!("{topic}/Subscriptions/app");
    eventually(Duration::from_secs(15), "the message completed", || {
        let done = broker.counts(&address) == (0, 0, 0) && deliveries.load(Ordering::SeqCst) >= 1;
        async move { done.then_some(()) }
    })
    .await;
    assert_eq!(deliveries.load(Ordering::SeqCst), 1, "delivered once");
    assert!(
        broker.renewals() >= renewals_before + 2,
        "the session lock was renewed"
    );
    c.close().await.unwrap();
}

/// Sessions asked of a subscription that exists without them, or of a queue, are a clear
/// error at subscribe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_where_they_cannot_be_are_a_clear_error() {
    let broker = TestBroker::start(0).await.unwrap();
    let topic = random_name("plain");
    let cs = broker.connection_string();
    let c = component(ServiceBusFactory::TOPICS, &cs, "app", &[]).await;
    let (h, _rx) = success_collector();
    let sub = c
        .subscribe(SubscribeRequest::new(&topic), h.clone())
        .await
        .unwrap();
    sub.stop().await;
    let e = c
        .subscribe(session_request(&topic, &[]), h.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("asks for sessions") && e.contains(&topic), "{e}");
    let q = component(ServiceBusFactory::QUEUES, &cs, "app", &[]).await;
    let e = q
        .subscribe(session_request(&random_name("queue"), &[]), h)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("requireSessions") && e.contains("queues"), "{e}");
    for c in [c, q] {
        c.close().await.unwrap();
    }
}

/// A broker that keeps its data, stopped and started again on it: every message it accepted
/// and nobody completed is still there, the completed one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_broker_started_again_still_has_what_it_accepted() {
    let dir = daprd_testkit::ScratchDir::new("servicebus-data");
    let broker = TestBroker::start_persistent(0, dir.path()).await.unwrap();
    let port = broker.port();
    let cs = broker.connection_string();
    let queue = random_name("kept");
    let extra = [
        ("minConnectionRecoveryInSec", "0"),
        ("maxConnectionRecoveryInSec", "0"),
    ];
    let c = component(ServiceBusFactory::QUEUES, &cs, "app", &extra).await;
    // one completed before the restart
    let (h, mut rx) = success_collector();
    let sub = c.subscribe(SubscribeRequest::new(&queue), h).await.unwrap();
    c.publish(request(&queue, "done", &[])).await.unwrap();
    next(&mut rx, Duration::from_secs(10)).await.unwrap();
    sub.stop().await;
    eventually(
        Duration::from_secs(5),
        "the first message completed",
        || {
            let done = broker.counts(&queue) == (0, 0, 0);
            async move { done.then_some(()) }
        },
    )
    .await;
    for n in 0..5 {
        c.publish(request(&queue, &format!("kept-{n}"), &[]))
            .await
            .unwrap();
    }
    c.close().await.unwrap();
    drop(broker);
    // the old listener closes once its aborted task is dropped by the runtime: bind again
    // until the port is free
    let broker = eventually(Duration::from_secs(10), "the port free again", || {
        let dir = dir.path().to_path_buf();
        async move { TestBroker::start_persistent(port, &dir).await.ok() }
    })
    .await;
    assert_eq!(broker.counts(&queue).0, 5, "the five waiting messages kept");
    let c = component(ServiceBusFactory::QUEUES, &cs, "app", &extra).await;
    let (h, mut rx) = success_collector();
    let _sub = c.subscribe(SubscribeRequest::new(&queue), h).await.unwrap();
    let mut got = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while got.len() < 5 && tokio::time::Instant::now() < deadline {
        if let Some(m) = next(&mut rx, Duration::from_millis(200)).await {
            got.insert(String::from_utf8_lossy(&m.data).into_owned());
        }
    }
    let want: BTreeSet<String> = (0..5).map(|n| format!("kept-{n}")).collect();
    assert_eq!(got, want);
    c.close().await.unwrap();
}
