//! `pubsub.kafka` against the Kafka-protocol broker on loopback (`KAFKA_BROKERS`, default
//! tansu on `127.0.0.1:9092`): per-key order across partitions, partitions handled concurrently,
//! inbound metadata, a revocation waiting for the message in flight, what happens without
//! `autoCreateTopics`, and init against an unreachable broker.

#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use daprd_components::kafka::KafkaFactory;
use daprd_core::metadata::Metadata;
use daprd_core::pubsub::{
    Handler, Message, Outcome, PubSub, PubSubFactory, PublishRequest, SubscribeRequest,
};
use daprd_testkit::conformance::{in_flight_gate, metadata_with_group, random_name};
use tokio::sync::mpsc;

fn brokers() -> String {
    daprd_testkit::broker_address("KAFKA_BROKERS", "127.0.0.1:9092", "tansu (Kafka)")
}

fn metadata(extra: &[(&str, &str)]) -> Metadata {
    let brokers = brokers();
    let mut pairs = vec![
        ("brokers", brokers.as_str()),
        ("authType", "none"),
        ("initialOffset", "oldest"),
    ];
    pairs.extend_from_slice(extra);
    metadata_with_group(&random_name("kafka"), &pairs)
}

async fn connect(md: &Metadata) -> Arc<dyn PubSub> {
    KafkaFactory.connect("kafka", md).await.unwrap()
}

use daprd_testkit::conformance::success_collector as collector;

fn keyed(topic: &str, key: &str, n: usize) -> PublishRequest {
    PublishRequest {
        pubsub_name: "kafka".into(),
        topic: topic.into(),
        data: Bytes::from(format!("{key}:{n}")),
        metadata: BTreeMap::from([("partitionKey".to_string(), key.to_string())]),
        content_type: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_one_key_arrive_in_order_across_partitions() {
    let c = connect(&metadata(&[
        ("autoCreateTopics", "true"),
        ("autoCreateTopicPartitions", "4"),
    ]))
    .await;
    let topic = random_name("keys");
    let (h, mut rx) = collector();
    let _sub = c
        .subscribe(SubscribeRequest::new(topic.clone()), h)
        .await
        .unwrap();
    let keys = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"];
    const PER_KEY: usize = 25;
    for n in 0..PER_KEY {
        for key in keys {
            c.publish(keyed(&topic, key, n)).await.unwrap();
        }
    }
    let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
    let mut partitions = HashSet::new();
    let mut key_partition: HashMap<String, String> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for _ in 0..keys.len() * PER_KEY {
        let m = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("every message within 30 s")
            .unwrap();
        let text = String::from_utf8(m.data.to_vec()).unwrap();
        let (key, n) = text.split_once(':').unwrap();
        assert_eq!(m.metadata["__key"], key);
        assert_eq!(m.metadata["__topic"], topic);
        assert!(m.metadata["__timestamp"].parse::<i64>().unwrap() > 1_600_000_000_000);
        let p = m.metadata["__partition"].clone();
        let first = key_partition.entry(key.to_string()).or_insert(p.clone());
        assert_eq!(*first, p, "one key, one partition");
        partitions.insert(p);
        seen.entry(key.to_string())
            .or_default()
            .push(n.parse().unwrap());
    }
    for key in keys {
        assert_eq!(
            seen[key],
            (0..PER_KEY).collect::<Vec<_>>(),
            "{key}: in publish order"
        );
    }
    assert!(
        partitions.len() > 1,
        "six keys on four partitions use more than one: {partitions:?}"
    );
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_create_a_missing_topic_is_a_clear_publish_error() {
    // As Go daprd on a broker that does not create topics on demand.
    let c = connect(&metadata(&[])).await;
    let topic = random_name("missing");
    let err = c.publish(keyed(&topic, "k", 0)).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("topic {topic} does not exist")),
        "{text}"
    );
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_fails_when_no_broker_answers() {
    let port = daprd_testkit::free_port();
    let addr = format!("127.0.0.1:{port}");
    let md = metadata_with_group("g", &[("brokers", &addr), ("authType", "none")]);
    let err = match KafkaFactory.connect("kafka", &md).await {
        Ok(_) => panic!("connected to a closed port"),
        Err(e) => e,
    };
    assert!(err.to_string().contains(&addr), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_partition_does_not_hold_up_the_others() {
    let c = connect(&metadata(&[
        ("autoCreateTopics", "true"),
        ("autoCreateTopicPartitions", "3"),
    ]))
    .await;
    let topic = random_name("busy");
    let release = Arc::new(tokio::sync::Notify::new());
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let h = gated(tx, release.clone(), b"slow");
    let _sub = c
        .subscribe(SubscribeRequest::new(topic.clone()), h)
        .await
        .unwrap();
    let on = |partition: &str, data: &'static str| PublishRequest {
        pubsub_name: "kafka".into(),
        topic: topic.clone(),
        data: Bytes::from_static(data.as_bytes()),
        metadata: BTreeMap::from([("partitionNumber".to_string(), partition.to_string())]),
        content_type: None,
    };
    c.publish(on("0", "slow")).await.unwrap();
    c.publish(on("0", "behind-slow")).await.unwrap();
    // Partition 0 is now busy with "slow"; only then do the other partitions get messages.
    let first = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("the first message")
        .unwrap();
    assert_eq!(&first.data[..], b"slow");
    for p in ["1", "2"] {
        c.publish(on(p, "other")).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut got = vec!["slow".to_string()];
    while got.iter().filter(|d: &&String| *d == "other").count() < 2 {
        let m = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("the other partitions deliver while partition 0 is busy")
            .unwrap();
        got.push(String::from_utf8(m.data.to_vec()).unwrap());
    }
    assert!(got.contains(&"slow".to_string()), "{got:?}");
    assert!(
        !got.contains(&"behind-slow".to_string()),
        "partition 0 is handled in order: {got:?}"
    );
    release.notify_one();
    let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("partition 0 goes on once released")
        .unwrap();
    assert_eq!(&m.data[..], b"behind-slow");
    c.close().await.unwrap();
}

/// A handler that reports each message on `tx` and answers `Success`, holding the message
/// whose data is `held` until `gate` is notified.
fn gated(
    tx: mpsc::UnboundedSender<Message>,
    gate: Arc<tokio::sync::Notify>,
    held: &'static [u8],
) -> Handler {
    Arc::new(move |m: Message| {
        let tx = tx.clone();
        let gate = gate.clone();
        Box::pin(async move {
            let hold = m.data[..] == *held;
            let _ = tx.send(m);
            if hold {
                gate.notified().await;
            }
            Outcome::Success
        })
    })
}

/// A member joining the group revokes the partition while its message is with the app. The
/// revocation waits for the app's answer (as sarama does), so that message's offset is
/// committed and the partition's next owner does not deliver it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_waits_for_the_message_in_flight() {
    let brokers = brokers();
    let md = metadata_with_group(
        &random_name("drain"),
        &[
            ("brokers", brokers.as_str()),
            ("authType", "none"),
            ("initialOffset", "oldest"),
            ("autoCreateTopics", "true"),
            ("heartbeatInterval", "1s"),
            // the longest a revocation waits for the app; the test holds well below it
            ("sessionTimeout", "30s"),
        ],
    );
    let topic = random_name("drain");
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let release = Arc::new(tokio::sync::Notify::new());
    let first = connect(&md).await;
    let _a = first
        .subscribe(
            SubscribeRequest::new(topic.clone()),
            gated(tx.clone(), release.clone(), b"held"),
        )
        .await
        .unwrap();
    first
        .publish(daprd_testkit::conformance::publish_request(&topic, b"held"))
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("the first member gets the message")
        .unwrap();
    assert_eq!(&m.data[..], b"held");

    // A second member of the group: the partition is revoked from the first one while
    // "held" is with its app. Without the wait, the rebalance ends within a few heartbeats and
    // the partition's owner reads from the last commit, before "held": it comes again.
    let second = connect(&md).await;
    let (tx2, rx2) = (tx.clone(), release.clone());
    let _b = second
        .subscribe(
            SubscribeRequest::new(topic.clone()),
            gated(tx2, rx2, b"never held"),
        )
        .await
        .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
    assert!(
        again.is_err(),
        "nothing is delivered while the revoked partition's message is held: {again:?}"
    );
    release.notify_one();
    first
        .publish(daprd_testkit::conformance::publish_request(
            &topic, b"after",
        ))
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("the group goes on after the answer")
        .unwrap();
    assert_eq!(
        &m.data[..],
        b"after",
        "the held message was committed, not delivered again"
    );
    first.close().await.unwrap();
    second.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_subscription_gets_a_partition_s_queued_messages_together() {
    use std::sync::atomic::Ordering;
    let md = metadata(&[
        ("autoCreateTopics", "true"),
        ("autoCreateTopicPartitions", "1"),
    ]);
    let c = connect(&md).await;
    let topic = random_name("bulk");
    for n in 0..10 {
        c.publish(keyed(&topic, "k", n)).await.unwrap();
    }
    // one partition, ten messages waiting: a bulk subscription of 10 has them all in
    // flight at once; a plain one handles them one by one
    let (h, most, _) = in_flight_gate(10);
    let sub = c
        .subscribe(
            SubscribeRequest {
                topic: topic.clone(),
                metadata: BTreeMap::new(),
                bulk: Some(10),
            },
            h,
        )
        .await
        .unwrap();
    daprd_testkit::eventually(Duration::from_secs(30), "ten messages in flight", || {
        let most = most.clone();
        async move { (most.load(Ordering::SeqCst) == 10).then_some(()) }
    })
    .await;
    sub.close();
    let plain = connect(&metadata(&[])).await;
    let (h, most, answered) = in_flight_gate(1);
    let _sub = plain
        .subscribe(SubscribeRequest::new(topic.clone()), h)
        .await
        .unwrap();
    daprd_testkit::eventually(Duration::from_secs(30), "ten messages answered", || {
        let answered = answered.clone();
        async move { (answered.load(Ordering::SeqCst) == 10).then_some(()) }
    })
    .await;
    assert_eq!(most.load(Ordering::SeqCst), 1, "one at a time without bulk");
    c.close().await.unwrap();
    plain.close().await.unwrap();
}
