//! `pubsub.pulsar` against the test broker of `daprd_testkit::pulsar` (Pulsar's binary
//! protocol): the message on the broker (payload, key, properties, delivery time), batches,
//! redelivery after `redeliveryDelay`, delayed delivery, the subscription types, and an
//! outage (the broker drops every connection) in the middle of a stream.

#![cfg(feature = "pulsar")]
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use daprd_core::pubsub::{Handler, Outcome, PubSub, PubSubFactory, SubscribeRequest};
use daprd_testkit::conformance::{
    metadata_with_group, publish_request_with as request, random_name, success_collector,
};
use daprd_testkit::pulsar::TestBroker;
use tokio::sync::mpsc;

async fn component(broker: &TestBroker, group: &str, extra: &[(&str, &str)]) -> Arc<dyn PubSub> {
    let mut md = metadata_with_group(group, &[("host", &broker.url())]);
    for (k, v) in extra {
        md.insert(*k, *v);
    }
    daprd_components::pulsar::PulsarFactory
        .connect("pubsub", &md)
        .await
        .unwrap()
}

/// A component of `group` subscribed to `topic`: the component, its subscription and what
/// it receives.
async fn subscriber(
    broker: &TestBroker,
    group: &str,
    extra: &[(&str, &str)],
    topic: &str,
) -> (
    Arc<dyn PubSub>,
    daprd_core::pubsub::Subscription,
    mpsc::UnboundedReceiver<daprd_core::pubsub::Message>,
) {
    let c = component(broker, group, extra).await;
    let (h, rx) = success_collector();
    let sub = c
        .subscribe(SubscribeRequest::new(topic.to_string()), h)
        .await
        .unwrap();
    (c, sub, rx)
}

/// The message Go daprd sends: the payload as given, `partitionKey` as the key, every other
/// non-empty publish metadata entry a property; on `persistent://public/default/<topic>`.
#[tokio::test]
async fn publish_stores_payload_key_and_properties() {
    let broker = TestBroker::start(0).await.unwrap();
    let c = component(&broker, "app", &[("disableBatching", "true")]).await;
    let topic = random_name("bytes");
    let ce = r#"{"specversion":"1.0","id":"1","data":{"n":1}}"#;
    c.publish(request(
        &topic,
        ce,
        &[
            ("partitionKey", "order-7"),
            ("tenantHint", "eu"),
            ("blank", ""),
        ],
    ))
    .await
    .unwrap();
    let stored = broker.messages(&format!("persistent://public/default/{topic}"));
    assert_eq!(stored.len(), 1);
    let m = &stored[0];
    assert_eq!(m.data, ce.as_bytes());
    assert_eq!(m.metadata.partition_key.as_deref(), Some("order-7"));
    let props: BTreeMap<&str, &str> = m
        .metadata
        .properties
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_str()))
        .collect();
    assert_eq!(props, BTreeMap::from([("tenantHint", "eu")]));
    assert_eq!(m.metadata.num_messages_in_batch, None, "not batched");
    assert_eq!(m.metadata.deliver_at_time, None);
    // tenant, namespace and persistence name the topic
    let c2 = component(
        &broker,
        "app",
        &[
            ("tenant", "acme"),
            ("namespace", "orders"),
            ("persistent", "false"),
            ("disableBatching", "true"),
        ],
    )
    .await;
    c2.publish(request(&topic, "x", &[])).await.unwrap();
    assert_eq!(
        broker
            .messages(&format!("non-persistent://acme/orders/{topic}"))
            .len(),
        1
    );
}

/// With batching (the default), concurrent publishes share batches, and a subscriber gets
/// every message once, with its properties as metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_publishes_arrive_once_each() {
    let broker = TestBroker::start(0).await.unwrap();
    let c = component(&broker, "app", &[]).await;
    let topic = random_name("batch");
    let (h, mut rx) = success_collector();
    let _sub = c
        .subscribe(SubscribeRequest::new(topic.clone()), h)
        .await
        .unwrap();
    const N: usize = 200;
    let publishes = (0..N).map(|i| {
        let c = c.clone();
        let topic = topic.clone();
        async move {
            c.publish(request(&topic, &i.to_string(), &[("n", &i.to_string())]))
                .await
                .unwrap()
        }
    });
    futures::future::join_all(publishes).await;
    let entries = broker.messages(&topic);
    assert!(
        entries.len() < N,
        "{} entries for {N} concurrent publishes: no batch was made",
        entries.len()
    );
    assert!(entries
        .iter()
        .any(|e| e.metadata.num_messages_in_batch.unwrap_or(1) > 1));
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < N {
        let m = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {N} arrived", got.len()))
            .unwrap();
        let n = String::from_utf8(m.data.to_vec()).unwrap();
        assert_eq!(m.metadata.get("n"), Some(&n), "the property travels");
        assert!(got.insert(n.clone()), "{n} arrived twice");
    }
}

/// A refused message comes back after `redeliveryDelay`, marked redelivered; an accepted one
/// is not handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_message_comes_back_after_the_redelivery_delay() {
    let broker = TestBroker::start(0).await.unwrap();
    let c = component(
        &broker,
        "app",
        &[("redeliveryDelay", "700ms"), ("disableBatching", "true")],
    )
    .await;
    let topic = random_name("nack");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let h: Handler = Arc::new(move |m| {
        let tx = tx.clone();
        Box::pin(async move {
            let first = !m.redelivered;
            let _ = tx.send((Instant::now(), m.redelivered));
            if first {
                Outcome::Retry
            } else {
                Outcome::Success
            }
        })
    });
    let _sub = c
        .subscribe(SubscribeRequest::new(topic.clone()), h)
        .await
        .unwrap();
    c.publish(request(&topic, "again", &[])).await.unwrap();
    let (t0, r0) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(!r0);
    let (t1, r1) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(r1, "the second copy is marked redelivered");
    assert!(
        t1 - t0 >= Duration::from_millis(650),
        "redelivered after {:?}, before redeliveryDelay",
        t1 - t0
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), rx.recv())
            .await
            .is_err(),
        "an accepted message came back"
    );
}

/// `deliverAfter` sets the message's delivery time; the subscription gets it no sooner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_after_holds_the_message_back() {
    let broker = TestBroker::start(0).await.unwrap();
    let c = component(&broker, "app", &[("disableBatching", "true")]).await;
    let topic = random_name("later");
    let (h, mut rx) = success_collector();
    let _sub = c
        .subscribe(SubscribeRequest::new(topic.clone()), h)
        .await
        .unwrap();
    let sent = Instant::now();
    c.publish(request(&topic, "later", &[("deliverAfter", "1s")]))
        .await
        .unwrap();
    let at = broker.messages(&topic)[0].metadata.deliver_at_time;
    assert!(at.is_some(), "deliver_at_time is set");
    let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.data[..], b"later");
    assert!(
        sent.elapsed() >= Duration::from_millis(950),
        "{:?}",
        sent.elapsed()
    );
    let bad = c
        .publish(request(&topic, "x", &[("deliverAt", "next tuesday")]))
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("deliverAt"), "{bad}");
}

/// `subscribeType: exclusive` refuses a second consumer of the subscription by name;
/// `failover` keeps one active and hands over when it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_and_failover_subscriptions() {
    let broker = TestBroker::start(0).await.unwrap();
    let topic = random_name("excl");
    let a = component(&broker, "one", &[("subscribeType", "exclusive")]).await;
    let b = component(&broker, "one", &[("subscribeType", "exclusive")]).await;
    let (h, _rx) = success_collector();
    let _sa = a
        .subscribe(SubscribeRequest::new(topic.clone()), h.clone())
        .await
        .unwrap();
    let err = b
        .subscribe(SubscribeRequest::new(topic.clone()), h)
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&topic), "{err}");

    let topic = random_name("failover");
    let md = [("subscribeType", "failover"), ("disableBatching", "true")];
    let (a, sa, mut ra) = subscriber(&broker, "two", &md, &topic).await;
    let (_b, _sb, mut rb) = subscriber(&broker, "two", &md, &topic).await;
    for i in 0..5 {
        a.publish(request(&topic, &format!("a{i}"), &[]))
            .await
            .unwrap();
    }
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(5), ra.recv())
            .await
            .unwrap()
            .unwrap();
    }
    assert!(rb.try_recv().is_err(), "the standby got a message");
    sa.stop().await;
    a.publish(request(&topic, "after", &[])).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), rb.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.data[..], b"after");
}

/// The broker drops every connection in the middle of a stream: publishes after it succeed
/// (the client reconnects), and the subscription gets every message that had a 2xx, with
/// nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_mid_stream_loses_nothing() {
    let broker = TestBroker::start(0).await.unwrap();
    let c = component(
        &broker,
        "app",
        &[("disableBatching", "true"), ("redeliveryDelay", "100ms")],
    )
    .await;
    let topic = random_name("outage");
    let (h, mut rx) = success_collector();
    let _sub = c
        .subscribe(SubscribeRequest::new(topic.clone()), h)
        .await
        .unwrap();
    let mut published = BTreeSet::new();
    for i in 0..40 {
        if i == 20 {
            broker.drop_connections();
        }
        // a publish may fail while the client reconnects; a failed one is retried, as an
        // app (or Dapr's resiliency) would
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match c.publish(request(&topic, &i.to_string(), &[])).await {
                Ok(()) => break,
                Err(e) => {
                    assert!(Instant::now() < deadline, "publish {i} kept failing: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        published.insert(i.to_string());
    }
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !published.is_subset(&got) {
        let m = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "missing after the outage: {:?}",
                    published.difference(&got).collect::<Vec<_>>()
                )
            })
            .unwrap();
        got.insert(String::from_utf8(m.data.to_vec()).unwrap());
    }
}

/// A host nobody listens on fails the component's start with the address named.
#[tokio::test]
async fn an_unreachable_broker_fails_component_init() {
    let port = daprd_testkit::free_port();
    let md = metadata_with_group("app", &[("host", &format!("127.0.0.1:{port}"))]);
    let err = match daprd_components::pulsar::PulsarFactory
        .connect("pubsub", &md)
        .await
    {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => e,
    };
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}

/// `token` is sent as Pulsar's `token` authentication on every connection.
#[tokio::test]
async fn the_token_authenticates_every_connection() {
    let broker = TestBroker::start(0).await.unwrap();
    let c = component(&broker, "app", &[("token", "eyJhbGciOiJIUzI1NiJ9.e30.sig")]).await;
    c.publish(request(&random_name("auth"), "x", &[]))
        .await
        .unwrap();
    let auths = broker.authentications();
    assert!(auths.len() >= 2, "{auths:?}");
    for (method, data) in auths {
        assert_eq!(method, "token");
        assert_eq!(data, b"eyJhbGciOiJIUzI1NiJ9.e30.sig");
    }
}

/// OAuth2 (Dapr's client-credentials metadata): the token endpoint's access token is the
/// `token` authentication of every connection; scopes and audiences go to the endpoint; a
/// server that wants the client in the form gets it there; a refused client fails the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_client_credentials_authenticate_every_connection() {
    use daprd_testkit::tokens::{TokenServer, CLIENT_ID, CLIENT_SECRET};
    let broker = TestBroker::start(0).await.unwrap();
    let tokens = TokenServer::start().await;
    let url = tokens.token_url();
    let oauth = |secret: &'static str| -> Vec<(&'static str, String)> {
        vec![
            ("oauth2TokenURL", url.clone()),
            ("oauth2ClientID", CLIENT_ID.to_string()),
            ("oauth2ClientSecret", secret.to_string()),
            ("oauth2Scopes", "pulsar-produce, pulsar-consume".to_string()),
            ("oauth2Audiences", "urn:pulsar:test".to_string()),
        ]
    };
    let pairs = oauth(CLIENT_SECRET);
    let extra: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let c = component(&broker, "app", &extra).await;
    c.publish(request(&random_name("oauth2"), "x", &[]))
        .await
        .unwrap();
    let issued = tokens.issued();
    assert_eq!(
        issued.len(),
        1,
        "one token, shared by both clients: {issued:?}"
    );
    let auths = broker.authentications();
    assert!(auths.len() >= 2, "{auths:?}");
    for (method, data) in &auths {
        assert_eq!(method, "token");
        assert_eq!(data, issued[0].as_bytes());
    }
    let grants = tokens.grants();
    assert_eq!(grants[0].client_auth, "header");
    assert_eq!(grants[0].scope, "pulsar-produce pulsar-consume");
    assert_eq!(grants[0].audiences, ["urn:pulsar:test"]);
    c.close().await.unwrap();

    // a server that refuses the Basic header: the client goes in the form
    tokens.accept_form_only();
    let c = component(&broker, "app", &extra).await;
    c.close().await.unwrap();
    assert_eq!(tokens.grants().last().unwrap().client_auth, "form");

    // a wrong secret: the start fails, naming the endpoint and its answer
    let pairs = oauth("wrong");
    let mut md = metadata_with_group("app", &[("host", &broker.url())]);
    for (k, v) in &pairs {
        md.insert(*k, v.as_str());
    }
    let err = match daprd_components::pulsar::PulsarFactory
        .connect("pubsub", &md)
        .await
    {
        Ok(_) => panic!("connected with a refused client"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&url) && err.contains("invalid_client"),
        "{err}"
    );
}

/// `oauth2CredentialsFile` gives the client and the token URL (`issuer_url`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_credentials_file_gives_client_and_endpoint() {
    use daprd_testkit::tokens::{TokenServer, CLIENT_ID, CLIENT_SECRET};
    let broker = TestBroker::start(0).await.unwrap();
    let tokens = TokenServer::start().await;
    let file = std::env::temp_dir().join(format!("{}.json", random_name("oauth2")));
    std::fs::write(
        &file,
        format!(
            r#"{{"client_id": "{CLIENT_ID}", "client_secret": "{CLIENT_SECRET}", "issuer_url": "{}"}}"#,
            tokens.token_url()
        ),
    )
    .unwrap();
    let path = file.display().to_string();
    let c = component(
        &broker,
        "app",
        &[
            ("oauth2CredentialsFile", path.as_str()),
            ("oauth2Scopes", "s"),
            ("oauth2Audiences", "a"),
        ],
    )
    .await;
    c.publish(request(&random_name("oauth2"), "x", &[]))
        .await
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let issued = tokens.issued();
    assert_eq!(issued.len(), 1);
    assert!(broker
        .authentications()
        .iter()
        .all(|(m, d)| m == "token" && d == issued[0].as_bytes()));
}

/// A partitioned topic: a keyed message goes to partition `JavaStringHash(key) % n` (Go
/// daprd's router; Java's `"a".hashCode()` is 97, `"b"` 98, `"c"` 99, `"d"` 100, `"hello"`
/// 99162322), unkeyed ones spread over the partitions, and a subscription gets every
/// partition's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_topic_routes_keys_as_go_daprd_and_delivers_every_partition() {
    let broker = TestBroker::start(0).await.unwrap();
    let topic = random_name("parts");
    broker.create_partitioned_topic(&topic, 4);
    // one message per entry, so each entry's key is the message's
    let (c, _sub, mut rx) =
        subscriber(&broker, "app", &[("disableBatching", "true")], &topic).await;
    let keys = [("a", 1), ("b", 2), ("c", 3), ("d", 0), ("hello", 2)];
    let mut sent = BTreeSet::new();
    for round in 0..3 {
        for (key, _) in keys {
            let data = format!("{key}-{round}");
            c.publish(request(&topic, &data, &[("partitionKey", key)]))
                .await
                .unwrap();
            sent.insert(data);
        }
    }
    for i in 0..8 {
        let data = format!("unkeyed-{i}");
        c.publish(request(&topic, &data, &[])).await.unwrap();
        sent.insert(data);
    }
    let full = format!("persistent://public/default/{topic}");
    let on = |partition: u32| -> Vec<(Option<String>, String)> {
        broker
            .messages(&format!("{full}-partition-{partition}"))
            .iter()
            .map(|p| {
                (
                    p.metadata.partition_key.clone(),
                    String::from_utf8(p.data.clone()).unwrap(),
                )
            })
            .collect()
    };
    assert!(
        broker.messages(&full).is_empty(),
        "nothing on the partitioned name itself"
    );
    let mut unkeyed_partitions = BTreeSet::new();
    let mut keyed = 0;
    for partition in 0..4 {
        for (key, data) in on(partition) {
            match key {
                Some(key) => {
                    keyed += 1;
                    let want = keys.iter().find(|(k, _)| *k == key).unwrap().1;
                    assert_eq!(
                        partition, want,
                        "key {key} ({data}) on partition {partition}"
                    );
                }
                None => {
                    unkeyed_partitions.insert(partition);
                }
            }
        }
    }
    assert_eq!(keyed, keys.len() * 3, "every keyed message on a partition");
    assert!(
        unkeyed_partitions.len() >= 2,
        "unkeyed on {unkeyed_partitions:?}"
    );
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < sent.len() && Instant::now() < deadline {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            got.insert(String::from_utf8(m.data.to_vec()).unwrap());
        }
    }
    assert_eq!(got, sent, "every partition's messages delivered");
    c.close().await.unwrap();
}

/// Each `compressionType` publishes compressed messages that a subscriber reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_messages_arrive() {
    let broker = TestBroker::start(0).await.unwrap();
    for (kind, code) in [("lz4", 1), ("zlib", 2), ("zstd", 3)] {
        let c = component(
            &broker,
            "app",
            &[("compressionType", kind), ("disableBatching", "true")],
        )
        .await;
        let topic = random_name(kind);
        let (h, mut rx) = success_collector();
        let _sub = c
            .subscribe(SubscribeRequest::new(topic.clone()), h)
            .await
            .unwrap();
        let body = format!("{{\"codec\":\"{kind}\",\"pad\":\"{}\"}}", "x".repeat(2000));
        c.publish(request(&topic, &body, &[])).await.unwrap();
        let stored = broker.messages(&topic);
        assert_eq!(stored[0].metadata.compression, Some(code), "{kind}");
        assert!(stored[0].data.len() < body.len(), "{kind}: not compressed");
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.data, body.as_bytes(), "{kind}");
    }
}

/// `topicsPattern` subscribes to every topic of the namespace whose name matches, and tells
/// the app which topic each message came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topics_pattern_subscribes_to_the_matching_topics() {
    let broker = TestBroker::start(0).await.unwrap();
    let c = component(&broker, "app", &[("disableBatching", "true")]).await;
    let prefix = random_name("pat").replace('-', "");
    let (eu, us, other) = (
        format!("{prefix}-eu"),
        format!("{prefix}-us"),
        random_name("other"),
    );
    // the topics exist before the subscription looks for them
    for t in [&eu, &us, &other] {
        c.publish(request(t, "before", &[])).await.unwrap();
    }
    let (h, mut rx) = success_collector();
    let mut req = SubscribeRequest::new(format!("{prefix}-.*"));
    req.metadata
        .insert("topicsPattern".into(), format!("{prefix}-.*"));
    let _sub = c.subscribe(req, h).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = BTreeSet::new();
    // publish until both matching topics delivered (the consumer's topics are found at once,
    // but its subscriptions start at the latest message)
    while got.len() < 2 {
        assert!(Instant::now() < deadline, "pattern deliveries: {got:?}");
        for t in [&eu, &us, &other] {
            c.publish(request(t, t, &[])).await.unwrap();
        }
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            assert_eq!(
                m.data,
                m.topic.as_bytes(),
                "the message's own topic is told"
            );
            assert_ne!(m.topic, other, "a topic that does not match was delivered");
            got.insert(m.topic);
        }
    }
    assert_eq!(got, BTreeSet::from([eu, us]));
}

/// `key_shared`: messages of one key go to one consumer of the subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_shared_keeps_a_key_on_one_consumer() {
    let broker = TestBroker::start(0).await.unwrap();
    let md = [("subscribeType", "key_shared"), ("disableBatching", "true")];
    let topic = random_name("keys");
    let (a, _sa, mut ra) = subscriber(&broker, "ks", &md, &topic).await;
    let (_b, _sb, mut rb) = subscriber(&broker, "ks", &md, &topic).await;
    const N: usize = 40;
    for i in 0..N {
        let key = format!("k{}", i % 8);
        a.publish(request(&topic, &key, &[("partitionKey", &key)]))
            .await
            .unwrap();
    }
    let mut owner: BTreeMap<String, char> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while n < N {
        assert!(Instant::now() < deadline, "{n} of {N} arrived");
        let (m, who) = tokio::select! {
            Some(m) = ra.recv() => (m, 'a'),
            Some(m) = rb.recv() => (m, 'b'),
            () = tokio::time::sleep_until(deadline.into()) => continue,
        };
        let key = String::from_utf8(m.data.to_vec()).unwrap();
        let first = *owner.entry(key.clone()).or_insert(who);
        assert_eq!(first, who, "key {key} went to both consumers");
        n += 1;
    }
    assert_eq!(owner.len(), 8);
}
