//! `pubsub.azure.eventhubs` against the test broker of `daprd_testkit::servicebus` (its event
//! hubs: partitions, offsets, selector filters, `$management` READ; no Event Hubs emulator can
//! run here) with checkpoints and partition ownership in a private Azurite (Microsoft's Azure
//! Storage emulator, the real Blob service). The conformance suite, then what is particular to
//! Event Hubs: the event on the wire and the metadata the app gets, the connection string's
//! `EntityPath`, and a restart that resumes after the checkpoint.

#![cfg(feature = "eventhubs")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use daprd_components::eventhubs::EventHubsFactory;
use daprd_core::metadata::Metadata;
use daprd_core::pubsub::{Outcome, PubSub, PubSubFactory, SubscribeRequest};
use daprd_testkit::azurite::Azurite;
use daprd_testkit::conformance::{self, collector, random_name, Connect, Traits};
use daprd_testkit::servicebus::TestBroker;

fn metadata(broker: &TestBroker, azurite: &Azurite, group: &str, container: &str) -> Metadata {
    let mut md = Metadata::new();
    md.insert("connectionString", broker.connection_string());
    md.insert("consumerID", group);
    md.insert("storageConnectionString", azurite.connection_string());
    md.insert("storageContainerName", container);
    md.insert("backOffDuration", "100ms");
    md
}

/// A test broker with a hub of its own, an Azurite, and the component's metadata for them.
struct Setup {
    broker: TestBroker,
    azurite: Azurite,
    hub: String,
    container: String,
    md: Metadata,
}

async fn setup(name: &str, partitions: usize) -> Setup {
    let broker = TestBroker::start(0).await.unwrap();
    let azurite = Azurite::start().await;
    let hub = random_name(name);
    broker.event_hub(&hub, partitions);
    let container = random_name(name).to_ascii_lowercase();
    let md = metadata(&broker, &azurite, "app", &container);
    Setup {
        broker,
        azurite,
        hub,
        container,
        md,
    }
}

async fn connect(md: &Metadata) -> Arc<dyn PubSub> {
    EventHubsFactory.connect("eventhubs", md).await.unwrap()
}

/// The next message the app got, within 10 s.
async fn next<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a message within 10 s")
        .expect("the handler is alive")
}

/// A publish of `{"n":<i>}` to `hub`.
fn numbered(hub: &str, i: usize) -> daprd_core::pubsub::PublishRequest {
    conformance::publish_request_with(hub, &format!("{{\"n\":{i}}}"), &[])
}

/// Nothing more comes within half a second.
async fn quiet<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> bool {
    tokio::time::timeout(Duration::from_millis(500), rx.recv())
        .await
        .is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventhubs_conformance() {
    let broker = Arc::new(TestBroker::start(0).await.unwrap());
    let azurite = Arc::new(Azurite::start().await);
    let container = random_name("conformance").to_ascii_lowercase();
    let connect_group: Connect = {
        let (broker, azurite) = (broker.clone(), azurite.clone());
        Arc::new(move |group| {
            let md = metadata(&broker, &azurite, &group, &container);
            Box::pin(async move { connect(&md).await })
        })
    };
    let traits = Traits {
        redelivers_on_retry: true,
        competing_consumers: true,
        redelivery_wait: Duration::from_secs(5),
        ordered: false,
        native_ttl: false,
    };
    conformance::run(connect_group, traits).await;
}

/// The event as Go daprd sends it (payload as one data section, content type, partition key
/// as `x-opt-partition-key`; other metadata not carried), and the metadata the app gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_on_the_wire_and_its_metadata() {
    let Setup {
        broker,
        azurite: _azurite,
        hub,
        md,
        ..
    } = setup("orders", 2).await;
    let c = connect(&md).await;
    let (h, mut rx) = collector(|_, _| Outcome::Success);
    let _sub = c.subscribe(SubscribeRequest::new(&hub), h).await.unwrap();
    assert_eq!(broker.event_receivers(&hub), 2, "both partitions read");
    let mut req = conformance::publish_request_with(
        &hub,
        "{\"n\":1}",
        &[("partitionKey", "k-1"), ("other", "x")],
    );
    req.content_type = Some("application/json".into());
    c.publish(req).await.unwrap();

    let events = broker.events(&hub);
    assert_eq!(events.len(), 1);
    let (partition, e) = &events[0];
    assert_eq!(
        daprd_components::servicebus::wire::body_bytes(e.body.clone()).as_ref(),
        b"{\"n\":1}"
    );
    assert_eq!(
        e.properties
            .as_ref()
            .and_then(|p| p.content_type.as_ref())
            .map(|c| c.as_str()),
        Some("application/json")
    );
    assert!(
        e.application_properties.is_none(),
        "other metadata is not carried"
    );

    let got = next(&mut rx).await;
    assert_eq!(got.data.as_ref(), b"{\"n\":1}");
    assert_eq!(got.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        got.metadata.get("x-opt-partition-key").map(String::as_str),
        Some("k-1")
    );
    assert_eq!(
        got.metadata
            .get("x-opt-sequence-number")
            .map(String::as_str),
        Some("0")
    );
    assert_eq!(
        got.metadata.get("x-opt-offset").map(String::as_str),
        Some("0")
    );
    assert!(
        got.metadata
            .get("x-opt-enqueued-time")
            .is_some_and(|t| t.ends_with('Z') && t.len() == 20),
        "RFC 3339 to the second: {:?}",
        got.metadata.get("x-opt-enqueued-time")
    );
    // one key, one partition
    let mut again =
        conformance::publish_request_with(&hub, "{\"n\":2}", &[("partitionKey", "k-1")]);
    again.content_type = None;
    c.publish(again).await.unwrap();
    let events = broker.events(&hub);
    assert_eq!(
        events[1].0, *partition,
        "a partition key keeps its partition"
    );
    c.close().await.unwrap();
}

/// With `EntityPath` in the connection string, another topic is refused (Go daprd's check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entity_path_is_the_only_topic() {
    let broker = TestBroker::start(0).await.unwrap();
    broker.event_hub("only", 1);
    let mut md = Metadata::new();
    md.insert(
        "connectionString",
        format!("{};EntityPath=only", broker.connection_string()),
    );
    let c = connect(&md).await;
    c.publish(conformance::publish_request("only", b"1"))
        .await
        .unwrap();
    let e = c
        .publish(conformance::publish_request("other", b"2"))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("does not match the Event Hub name"),
        "{e}"
    );
    assert_eq!(broker.events("only").len(), 1);
    // subscribing needs the consumer group and the checkpoint store
    let e = c
        .subscribe(
            SubscribeRequest::new("only"),
            collector(|_, _| Outcome::Success).0,
        )
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("consumerID"), "{e}");
}

/// A subscriber that stops resumes, in a new instance, after the checkpoint of what the app
/// accepted: nothing accepted comes again, nothing published meanwhile is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_after_the_checkpoint() {
    // the broker and Azurite live to the end of the test
    let Setup {
        broker: _broker,
        azurite: _azurite,
        hub,
        md,
        ..
    } = setup("resume", 1).await;
    let first = connect(&md).await;
    let (h, mut rx) = collector(|_, _| Outcome::Success);
    let sub = first
        .subscribe(SubscribeRequest::new(&hub), h)
        .await
        .unwrap();
    for i in 0..5 {
        first
            .publish(conformance::publish_request_with(
                &hub,
                &format!("{{\"n\":{i}}}"),
                &[],
            ))
            .await
            .unwrap();
    }
    for _ in 0..5 {
        next(&mut rx).await;
    }
    sub.stop().await;
    first.close().await.unwrap();
    // published while nobody reads
    let publisher = connect(&md).await;
    for i in 5..8 {
        publisher
            .publish(conformance::publish_request_with(
                &hub,
                &format!("{{\"n\":{i}}}"),
                &[],
            ))
            .await
            .unwrap();
    }
    let second = connect(&md).await;
    let (h, mut rx) = collector(|_, _| Outcome::Success);
    let _sub = second
        .subscribe(SubscribeRequest::new(&hub), h)
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = next(&mut rx).await;
        got.push(String::from_utf8_lossy(&m.data).into_owned());
    }
    assert_eq!(got, ["{\"n\":5}", "{\"n\":6}", "{\"n\":7}"]);
    assert!(quiet(&mut rx).await, "an accepted event came again");
    second.close().await.unwrap();
}

/// Two instances of one consumer group share the partitions (two each, after the second
/// took its share over from the first, whose receivers the broker detached), each event
/// reaches one of them once; when one stops, the other takes its partitions over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_a_group_share_the_partitions() {
    use daprd_components::eventhubs::checkpoints::{CheckpointStore, StorageAccount};
    let Setup {
        broker,
        azurite,
        hub,
        container,
        md,
    } = setup("shared", 4).await;
    let store = CheckpointStore::new(
        StorageAccount::from_connection_string(&azurite.connection_string()).unwrap(),
        &container,
        "127.0.0.1",
        &hub,
        "app",
    )
    .unwrap();
    let owners = || async {
        let mut per: std::collections::BTreeMap<String, usize> = Default::default();
        for o in store.ownership().await.unwrap() {
            if !o.owner.is_empty() {
                *per.entry(o.owner).or_default() += 1;
            }
        }
        per.into_values().collect::<Vec<_>>()
    };
    let (a, b) = (connect(&md).await, connect(&md).await);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = |who: &'static str| -> daprd_core::pubsub::Handler {
        let tx = tx.clone();
        Arc::new(move |m| {
            let _ = tx.send((who, m));
            Box::pin(async { Outcome::Success })
        })
    };
    let sa = a
        .subscribe(SubscribeRequest::new(&hub), handler("a"))
        .await
        .unwrap();
    assert_eq!(
        owners().await,
        [4],
        "the first instance takes every partition"
    );
    let _sb = b
        .subscribe(SubscribeRequest::new(&hub), handler("b"))
        .await
        .unwrap();
    // settled: two claims each, the second's two receivers attached (each took a partition's
    // reading over from the first's, which the broker detached) and the first's gone
    daprd_testkit::eventually(Duration::from_secs(40), "two partitions each", || async {
        (owners().await == [2, 2]
            && broker.event_takeovers(&hub) == 2
            && broker.event_receivers(&hub) == 4)
            .then_some(())
    })
    .await;
    const N: usize = 40;
    for i in 0..N {
        let key = format!("key-{i}");
        a.publish(conformance::publish_request_with(
            &hub,
            &format!("{{\"n\":{i}}}"),
            &[("partitionKey", &key)],
        ))
        .await
        .unwrap();
    }
    let mut seen = std::collections::HashMap::new();
    let mut by = std::collections::HashSet::new();
    while seen.len() < N {
        let (who, m) = next(&mut rx).await;
        by.insert(who);
        *seen.entry(m.data.clone()).or_insert(0) += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "each event once: {seen:?}");
    assert_eq!(by.len(), 2, "both instances got events");
    // the first stops: its partitions are given up and taken by the second
    sa.stop().await;
    a.close().await.unwrap();
    daprd_testkit::eventually(
        Duration::from_secs(30),
        "the second holds all four",
        || async { (owners().await == [4] && broker.event_receivers(&hub) == 4).then_some(()) },
    )
    .await;
    b.publish(conformance::publish_request_with(
        &hub,
        "{\"n\":99}",
        &[("partitionKey", "key-0")],
    ))
    .await
    .unwrap();
    let (who, m) = next(&mut rx).await;
    assert_eq!((who, m.data.as_ref()), ("b", b"{\"n\":99}".as_ref()));
    b.close().await.unwrap();
}

/// A partition read before it held any event starts, after a restart, where it stood then:
/// events published while nobody read reach the app (Go daprd's processor, without a
/// checkpoint, would start at the latest event and skip them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_while_nobody_reads_are_not_skipped() {
    let Setup {
        broker,
        azurite: _azurite,
        hub,
        md,
        ..
    } = setup("gap", 2).await;
    let c = connect(&md).await;
    let (h, _rx) = collector(|_, _| Outcome::Success);
    let sub = c.subscribe(SubscribeRequest::new(&hub), h).await.unwrap();
    sub.stop().await;
    for i in 0..4 {
        c.publish(conformance::publish_request_with(
            &hub,
            &format!("{{\"n\":{i}}}"),
            &[],
        ))
        .await
        .unwrap();
    }
    assert_eq!(
        broker
            .events(&hub)
            .iter()
            .map(|(p, _)| *p)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        2,
        "both partitions got events"
    );
    let (h, mut rx) = collector(|_, _| Outcome::Success);
    let _sub = c.subscribe(SubscribeRequest::new(&hub), h).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        let m = next(&mut rx).await;
        got.push(String::from_utf8_lossy(&m.data).into_owned());
    }
    got.sort();
    assert_eq!(got, ["{\"n\":0}", "{\"n\":1}", "{\"n\":2}", "{\"n\":3}"]);
    c.close().await.unwrap();
}

/// The broker cuts every connection mid-stream, twice: publishes go on (a 2xx only once the
/// event is stored), the receivers reconnect from where the app got, and every event reaches
/// the app — none lost, none that the app had accepted handed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_stream_lose_nothing() {
    let Setup {
        broker,
        azurite: _azurite,
        hub,
        md,
        ..
    } = setup("cut", 2).await;
    let c = connect(&md).await;
    let (h, mut rx) = collector(|_, _| Outcome::Success);
    let _sub = c.subscribe(SubscribeRequest::new(&hub), h).await.unwrap();
    const N: usize = 60;
    let mut published = 0;
    for i in 0..N {
        if i == 20 || i == 40 {
            broker.drop_connections();
        }
        // a publish the cut interrupted fails; the caller (the runtime's resiliency) retries
        let req = numbered(&hub, i);
        daprd_testkit::eventually(Duration::from_secs(20), "a publish to go through", || {
            let (c, req) = (c.clone(), req.clone());
            async move { c.publish(req).await.ok() }
        })
        .await;
        published += 1;
    }
    assert_eq!(published, N);
    // what the broker stored (a publish whose answer the cut took may be stored twice: the
    // retry is the caller's; each stored event is to reach the app once)
    let mut stored = std::collections::HashMap::new();
    for (_, e) in broker.events(&hub) {
        *stored
            .entry(daprd_components::servicebus::wire::body_bytes(e.body))
            .or_insert(0usize) += 1;
    }
    assert_eq!(stored.len(), N, "every event stored");
    let mut seen = std::collections::HashMap::new();
    while seen.values().sum::<usize>() < stored.values().sum::<usize>() {
        let m = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("every event reaches the app")
            .unwrap();
        *seen.entry(m.data.clone()).or_insert(0usize) += 1;
    }
    assert_eq!(seen, stored, "each stored event reaches the app once");
    assert!(quiet(&mut rx).await, "an accepted event came again");
    c.close().await.unwrap();
}

/// A persistent test broker started again has its event hubs and every event it accepted: a
/// subscriber that had read the first events resumes after its checkpoint with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_broker_started_again_still_has_its_events() {
    let dir = daprd_testkit::ScratchDir::new("eventhubs-data");
    let broker = TestBroker::start_persistent(0, dir.path()).await.unwrap();
    let port = broker.port();
    let azurite = Azurite::start().await;
    let hub = random_name("kept");
    broker.event_hub(&hub, 2);
    let container = random_name("kept").to_ascii_lowercase();
    let md = metadata(&broker, &azurite, "app", &container);
    let c = connect(&md).await;
    let (h, mut rx) = collector(|_, _| Outcome::Success);
    let sub = c.subscribe(SubscribeRequest::new(&hub), h).await.unwrap();
    c.publish(conformance::publish_request_with(&hub, "done", &[]))
        .await
        .unwrap();
    next(&mut rx).await;
    sub.stop().await;
    for n in 0..4 {
        c.publish(conformance::publish_request_with(
            &hub,
            &format!("kept-{n}"),
            &[],
        ))
        .await
        .unwrap();
    }
    c.close().await.unwrap();
    drop(broker);
    // the old listener goes a moment after its task was aborted: started again until it can
    let broker = daprd_testkit::eventually(Duration::from_secs(10), "the port free again", || {
        let dir = dir.path().to_path_buf();
        async move { TestBroker::start_persistent(port, &dir).await.ok() }
    })
    .await;
    assert_eq!(broker.events(&hub).len(), 5, "every event kept");
    let c = connect(&md).await;
    let (h, mut rx) = collector(|_, _| Outcome::Success);
    let _sub = c.subscribe(SubscribeRequest::new(&hub), h).await.unwrap();
    let mut got = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let m = next(&mut rx).await;
        got.insert(String::from_utf8_lossy(&m.data).into_owned());
    }
    let want: std::collections::BTreeSet<String> = (0..4).map(|n| format!("kept-{n}")).collect();
    assert_eq!(got, want);
    assert!(
        quiet(&mut rx).await,
        "the event read before the restart came again"
    );
    c.close().await.unwrap();
}

/// An event whose retries ran out is not checkpointed past (Go daprd checkpoints past it and
/// loses it: dapr/dapr#7549): the partition goes on, and after a restart it comes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_retries_ran_out_comes_again_after_a_restart() {
    let Setup {
        broker: _broker,
        azurite: _azurite,
        hub,
        mut md,
        ..
    } = setup("stuck", 1).await;
    md.insert("backOffMaxRetries", "1");
    md.insert("backOffDuration", "10ms");
    md.insert("enableInOrderMessageDelivery", "true");
    let c = connect(&md).await;
    // the app refuses event 1 every time
    let (h, mut rx) = collector(|m, _| {
        if m.data.as_ref() == b"{\"n\":1}" {
            Outcome::Retry
        } else {
            Outcome::Success
        }
    });
    let sub = c.subscribe(SubscribeRequest::new(&hub), h).await.unwrap();
    for i in 0..3 {
        c.publish(conformance::publish_request_with(
            &hub,
            &format!("{{\"n\":{i}}}"),
            &[],
        ))
        .await
        .unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 4 {
        let m = next(&mut rx).await;
        got.push(String::from_utf8_lossy(&m.data).into_owned());
    }
    // 0, 1 and its one retry, then the partition goes on to 2
    assert_eq!(got, ["{\"n\":0}", "{\"n\":1}", "{\"n\":1}", "{\"n\":2}"]);
    sub.stop().await;
    c.close().await.unwrap();
    let c = connect(&md).await;
    let (h, mut rx) = collector(|_, _| Outcome::Success);
    let _sub = c.subscribe(SubscribeRequest::new(&hub), h).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the event the app never took comes again")
        .unwrap();
    assert_eq!(first.data.as_ref(), b"{\"n\":1}");
    c.close().await.unwrap();
}
