//! The conformance suite every pub/sub component passes (modelled on Dapr's
//! components-contrib conformance tests): bulk of messages delivered, bulk publish, ack
//! semantics, consumer groups, ordering, TTL. Topics and groups are random so suites share one broker in parallel.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use daprd_core::pubsub::{
    BulkEntry, BulkPublishRequest, Feature, Handler, Message, Outcome, PubSub, PubSubError,
    PublishRequest, SubscribeRequest,
};
use daprd_core::Metadata;
use tokio::sync::mpsc;

/// Builds a live component for a consumer group (`consumerID`).
pub type Connect =
    Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Arc<dyn PubSub>> + Send>> + Send + Sync>;

/// What the component promises.
#[derive(Debug, Clone, Copy)]
pub struct Traits {
    /// A `Retry` outcome makes the broker deliver the message again.
    pub redelivers_on_retry: bool,
    /// Subscriptions sharing a consumer group split the messages (else each gets all).
    pub competing_consumers: bool,
    /// How long a redelivery may take.
    pub redelivery_wait: Duration,
    /// One subscription receives messages in publish order (as configured for the suite).
    pub ordered: bool,
    /// The broker expires messages itself (`MESSAGE_TTL`; suite configured with prefetch 1).
    pub native_ttl: bool,
}

/// A random name for topics and groups.
pub fn random_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Every conformance topic starts with this (a NATS stream can capture `conf.>`).
pub const TOPIC_PREFIX: &str = "conf.";

fn random_topic(case: &str) -> String {
    format!("{TOPIC_PREFIX}{case}.{}", uuid::Uuid::new_v4().simple())
}

fn request(topic: &str, i: usize) -> PublishRequest {
    PublishRequest {
        pubsub_name: "conformance".into(),
        topic: topic.into(),
        data: Bytes::from(format!("{{\"n\":{i}}}")),
        metadata: BTreeMap::new(),
        content_type: None,
    }
}

fn number(m: &Message) -> usize {
    let s = String::from_utf8_lossy(&m.data);
    s.trim_start_matches("{\"n\":")
        .trim_end_matches('}')
        .parse()
        .unwrap_or(usize::MAX)
}

/// A handler answering `outcome(message, attempt)` (attempt counts deliveries of the same
/// `{"n":i}` payload from 1), and the receiver of every message it got.
pub fn collector(
    outcome: impl Fn(&Message, usize) -> Outcome + Send + Sync + 'static,
) -> (Handler, mpsc::UnboundedReceiver<Message>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let seen: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();
    let outcome = Arc::new(outcome);
    let handler: Handler = Arc::new(move |m: Message| {
        let tx = tx.clone();
        let seen = seen.clone();
        let outcome = outcome.clone();
        Box::pin(async move {
            let attempt = {
                let mut s = seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let c = s.entry(number(&m)).or_insert(0);
                *c += 1;
                *c
            };
            let o = outcome(&m, attempt);
            let _ = tx.send(m);
            o
        })
    });
    (handler, rx)
}

/// A shared count.
pub type Counter = Arc<AtomicUsize>;

/// Handler that counts calls in flight and answers once `n` are in flight together (or
/// after 10 s); returns the largest number seen in flight and the number answered.
pub fn in_flight_gate(n: usize) -> (Handler, Counter, Counter) {
    let now = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let (now2, most2, answered2) = (now.clone(), most.clone(), answered.clone());
    let h: Handler = Arc::new(move |_m| {
        let (now, most, answered) = (now2.clone(), most2.clone(), answered2.clone());
        Box::pin(async move {
            let mine = now.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(mine, Ordering::SeqCst);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while most.load(Ordering::SeqCst) < n && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            now.fetch_sub(1, Ordering::SeqCst);
            answered.fetch_add(1, Ordering::SeqCst);
            Outcome::Success
        })
    });
    (h, most, answered)
}

/// A handler answering `Success` to every message, and the receiver of what it got.
pub fn success_collector() -> (Handler, mpsc::UnboundedReceiver<Message>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let h: Handler = Arc::new(move |m| {
        let tx = tx.clone();
        Box::pin(async move {
            let _ = tx.send(m);
            Outcome::Success
        })
    });
    (h, rx)
}

/// The distinct message numbers of `got`, sorted.
fn distinct(got: &[Message]) -> Vec<usize> {
    let mut ns: Vec<usize> = got.iter().map(number).collect();
    ns.sort_unstable();
    ns.dedup();
    ns
}

async fn drain(
    rx: &mut mpsc::UnboundedReceiver<Message>,
    want: usize,
    timeout: Duration,
) -> Vec<Message> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while got.len() < want {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(m)) => got.push(m),
            _ => break,
        }
    }
    got
}

async fn quiet(rx: &mut mpsc::UnboundedReceiver<Message>, wait: Duration) -> Option<Message> {
    tokio::time::timeout(wait, rx.recv()).await.ok().flatten()
}

async fn subscribe(
    c: &Arc<dyn PubSub>,
    topic: &str,
    handler: Handler,
) -> daprd_core::pubsub::Subscription {
    c.subscribe(SubscribeRequest::new(topic), handler)
        .await
        .expect("subscribe")
}

/// Runs every case; panics with the case name on failure.
pub async fn run(connect: Connect, traits: Traits) {
    many_messages_arrive(&connect).await;
    bulk_publish(&connect).await;
    outcomes(&connect, traits).await;
    groups(&connect, traits).await;
    graceful_stop(&connect, traits.redelivers_on_retry, traits.redelivery_wait).await;
    if traits.ordered {
        ordering(&connect).await;
    }
    if traits.native_ttl {
        ttl(&connect).await;
    }
}

/// A message whose `ttlInSeconds` passes while it waits in the broker is never delivered.
pub async fn ttl(connect: &Connect) {
    let topic = random_topic("ttl");
    let c = connect(random_name("group")).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    // The first message holds the (single, prefetch 1) consumer long enough for the second
    // one to expire in the queue.
    let handler: Handler = Arc::new(move |m: Message| {
        let tx = tx.clone();
        Box::pin(async move {
            if number(&m) == 0 {
                tokio::time::sleep(Duration::from_millis(2500)).await;
            }
            let _ = tx.send(m);
            Outcome::Success
        })
    });
    let _sub = subscribe(&c, &topic, handler).await;
    c.publish(request(&topic, 0)).await.expect("publish");
    let mut short = request(&topic, 1);
    short.metadata.insert("ttlInSeconds".into(), "1".into());
    c.publish(short).await.expect("publish");
    let mut long = request(&topic, 2);
    long.metadata.insert("ttlInSeconds".into(), "60".into());
    c.publish(long).await.expect("publish");
    let got: Vec<usize> = drain(&mut rx, 3, Duration::from_secs(6))
        .await
        .iter()
        .map(number)
        .collect();
    assert_eq!(
        got,
        vec![0, 2],
        "ttl: the expired message must not be delivered, the others must"
    );
    c.close().await.expect("close");
}

/// With the component configured for it, one subscription sees publish order.
pub async fn ordering(connect: &Connect) {
    let topic = random_topic("ordering");
    let c = connect(random_name("group")).await;
    let (h, mut rx) = collector(|_, _| Outcome::Success);
    let _sub = subscribe(&c, &topic, h).await;
    const N: usize = 200;
    for i in 0..N {
        c.publish(request(&topic, i)).await.expect("publish");
    }
    let got: Vec<usize> = drain(&mut rx, N, Duration::from_secs(30))
        .await
        .iter()
        .map(number)
        .collect();
    assert_eq!(
        got,
        (0..N).collect::<Vec<_>>(),
        "ordering: messages out of order or missing"
    );
    c.close().await.expect("close");
}

/// Publish 1,000 messages, receive every one, each exactly once.
pub async fn many_messages_arrive(connect: &Connect) {
    let topic = random_topic("many");
    let c = connect(random_name("group")).await;
    let (h, mut rx) = collector(|_, _| Outcome::Success);
    let _sub = subscribe(&c, &topic, h).await;
    const N: usize = 1000;
    for i in 0..N {
        c.publish(request(&topic, i)).await.expect("publish");
    }
    let got = drain(&mut rx, N, Duration::from_secs(60)).await;
    let ns = distinct(&got);
    assert_eq!(
        ns.len(),
        N,
        "many_messages_arrive: received {} distinct of {N}",
        ns.len()
    );
    assert!(
        got.iter().all(|m| m.topic == topic),
        "many_messages_arrive: wrong topic"
    );
    assert!(
        quiet(&mut rx, Duration::from_millis(300)).await.is_none(),
        "many_messages_arrive: a success was redelivered"
    );
    c.close().await.expect("close");
}

/// Bulk publish of 100 entries arrives, each entry once. A component declaring
/// [`Feature::BulkPublish`] publishes them natively and reports no failed entry; any other
/// must answer [`PubSubError::Unsupported`] (the runtime then publishes entry by entry, which
/// the case does too).
pub async fn bulk_publish(connect: &Connect) {
    let topic = random_topic("bulk");
    let c = connect(random_name("group")).await;
    let (h, mut rx) = collector(|_, _| Outcome::Success);
    let _sub = subscribe(&c, &topic, h).await;
    const N: usize = 100;
    let requests: Vec<PublishRequest> = (0..N).map(|i| request(&topic, i)).collect();
    let bulk = BulkPublishRequest {
        pubsub_name: "conformance".into(),
        topic: topic.clone(),
        entries: requests
            .iter()
            .enumerate()
            .map(|(i, r)| BulkEntry {
                entry_id: i.to_string(),
                data: r.data.clone(),
                content_type: "application/json".into(),
                metadata: BTreeMap::new(),
            })
            .collect(),
        metadata: BTreeMap::new(),
    };
    if c.features().contains(&Feature::BulkPublish) {
        let failed = c.bulk_publish(bulk).await.expect("bulk publish");
        assert!(failed.is_empty(), "bulk_publish: failed entries {failed:?}");
    } else {
        let answer = c.bulk_publish(bulk).await;
        assert!(
            matches!(answer, Err(PubSubError::Unsupported(_))),
            "bulk_publish: a component without the BulkPublish feature must answer Unsupported"
        );
        for r in requests {
            c.publish(r).await.expect("publish");
        }
    }
    let got = drain(&mut rx, N, Duration::from_secs(30)).await;
    let ns = distinct(&got);
    assert_eq!(
        (got.len(), ns.len()),
        (N, N),
        "bulk_publish: every entry once"
    );
    assert!(
        quiet(&mut rx, Duration::from_millis(300)).await.is_none(),
        "bulk_publish: an entry arrived twice"
    );
    c.close().await.expect("close");
}

/// `Retry` is redelivered (when the component promises it); `Drop` and `Success` never are.
pub async fn outcomes(connect: &Connect, traits: Traits) {
    let topic = random_topic("outcomes");
    let c = connect(random_name("group")).await;
    // message 0: retry once then succeed; 1: drop; 2: success
    let (h, mut rx) = collector(|m, attempt| match (number(m), attempt) {
        (0, 1) => Outcome::Retry,
        (1, _) => Outcome::Drop,
        _ => Outcome::Success,
    });
    let _sub = subscribe(&c, &topic, h).await;
    for i in 0..3 {
        c.publish(request(&topic, i)).await.expect("publish");
    }
    // Redelivery may come before or after the other first deliveries: count per message.
    let want = if traits.redelivers_on_retry { 4 } else { 3 };
    let got = drain(
        &mut rx,
        want,
        Duration::from_secs(20) + traits.redelivery_wait,
    )
    .await;
    let mut counts = [0usize; 3];
    for m in &got {
        if let Some(c) = counts.get_mut(number(m)) {
            *c += 1;
        }
    }
    let expected = if traits.redelivers_on_retry {
        [2, 1, 1]
    } else {
        [1, 1, 1]
    };
    assert_eq!(
        counts, expected,
        "outcomes: deliveries per message (RETRY, DROP, SUCCESS)"
    );
    // The second delivery of the RETRY message says it is one; no first delivery does.
    let retried: Vec<bool> = got
        .iter()
        .filter(|m| number(m) == 0)
        .map(|m| m.redelivered)
        .collect();
    let want_flags: &[bool] = if traits.redelivers_on_retry {
        &[false, true]
    } else {
        &[false]
    };
    assert_eq!(
        retried, want_flags,
        "outcomes: redelivered flags of the RETRY message's deliveries"
    );
    assert!(
        got.iter()
            .filter(|m| number(m) != 0)
            .all(|m| !m.redelivered),
        "outcomes: a first delivery marked redelivered"
    );
    assert!(
        quiet(
            &mut rx,
            Duration::from_millis(500).max(traits.redelivery_wait / 2)
        )
        .await
        .is_none(),
        "outcomes: DROP/SUCCESS redelivered"
    );
    c.close().await.expect("close");
}

/// Two subscriptions in one group whose app takes `per_message` for each message, longer
/// than a whole received batch may wait in one consumer before the broker hands its messages
/// out again: every message still reaches the app once, and nothing more comes within
/// `quiet_for` after the last.
pub async fn slow_competing_consumers(
    connect: &Connect,
    per_message: Duration,
    quiet_for: Duration,
) {
    let topic = random_topic("slow");
    let group = random_name("slow");
    let (a, b) = (connect(group.clone()).await, connect(group).await);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = |tx: mpsc::UnboundedSender<Message>| -> Handler {
        Arc::new(move |m| {
            let tx = tx.clone();
            Box::pin(async move {
                let _ = tx.send(m);
                tokio::time::sleep(per_message).await;
                Outcome::Success
            })
        })
    };
    let _sa = subscribe(&a, &topic, handler(tx.clone())).await;
    let _sb = subscribe(&b, &topic, handler(tx)).await;
    const N: usize = 6;
    for i in 0..N {
        a.publish(request(&topic, i)).await.expect("publish");
    }
    let got = drain(&mut rx, N, Duration::from_secs(60)).await;
    let ns = distinct(&got);
    assert_eq!(
        (got.len(), ns.len()),
        (N, N),
        "slow competing consumers: each message once (got {ns:?})"
    );
    let late = quiet(&mut rx, quiet_for).await;
    assert!(
        late.is_none(),
        "slow competing consumers: message {:?} delivered again",
        late.as_ref().map(number)
    );
    a.close().await.expect("close");
    b.close().await.expect("close");
}

/// Two subscriptions in one group split the messages (or each gets all without groups);
/// another group gets every message.
pub async fn groups(connect: &Connect, traits: Traits) {
    let topic = random_topic("groups");
    let g1 = random_name("g1");
    let (a, b, other) = (
        connect(g1.clone()).await,
        connect(g1).await,
        connect(random_name("g2")).await,
    );
    let (ha, mut ra) = collector(|_, _| Outcome::Success);
    let (hb, mut rb) = collector(|_, _| Outcome::Success);
    let (ho, mut ro) = collector(|_, _| Outcome::Success);
    let _sa = subscribe(&a, &topic, ha).await;
    let _sb = subscribe(&b, &topic, hb).await;
    let _so = subscribe(&other, &topic, ho).await;
    const N: usize = 100;
    for i in 0..N {
        a.publish(request(&topic, i)).await.expect("publish");
    }
    let all_other = drain(&mut ro, N, Duration::from_secs(30)).await;
    assert_eq!(
        all_other.len(),
        N,
        "groups: another group gets every message"
    );
    if traits.competing_consumers {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while got.len() < N && tokio::time::Instant::now() < deadline {
            tokio::select! {
                Some(m) = ra.recv() => got.push(m),
                Some(m) = rb.recv() => got.push(m),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let ns = distinct(&got);
        assert_eq!(
            (got.len(), ns.len()),
            (N, N),
            "groups: one group receives each message once in all"
        );
    } else {
        assert_eq!(
            drain(&mut ra, N, Duration::from_secs(30)).await.len(),
            N,
            "groups: fan-out a"
        );
        assert_eq!(
            drain(&mut rb, N, Duration::from_secs(30)).await.len(),
            N,
            "groups: fan-out b"
        );
    }
    for c in [a, b, other] {
        c.close().await.expect("close");
    }
}

/// A subscription stopped mid-stream (as on SIGTERM): no delivery starts after
/// [`Subscription::stop`](daprd_core::pubsub::Subscription::stop), its future resolves only
/// once every delivery in the app's hands has been answered and settled, and — where the
/// broker keeps what was not settled (`resumes`) — a new subscriber of the same group then
/// gets every message the app had not accepted and none that it had (lost 0, dup 0).
pub async fn graceful_stop(connect: &Connect, resumes: bool, redelivery_wait: Duration) {
    const N: usize = 60;
    let topic = random_topic("stop");
    let group = random_name("stop");
    let c = connect(group.clone()).await;
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let late = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let accepted: Arc<Mutex<HashSet<usize>>> = Arc::default();
    let handler: Handler = {
        let (stopping, late, started, accepted) = (
            stopping.clone(),
            late.clone(),
            started.clone(),
            accepted.clone(),
        );
        Arc::new(move |m: Message| {
            // Counted when the component calls the handler, not when it polls the future.
            if stopping.load(Ordering::SeqCst) {
                late.fetch_add(1, Ordering::SeqCst);
            }
            started.fetch_add(1, Ordering::SeqCst);
            let accepted = accepted.clone();
            Box::pin(async move {
                // The app's work: long enough for the stop to find deliveries in hand.
                tokio::time::sleep(Duration::from_millis(20)).await;
                lock(&accepted).insert(number(&m));
                Outcome::Success
            })
        })
    };
    let sub = subscribe(&c, &topic, handler).await;
    for i in 0..N {
        c.publish(request(&topic, i)).await.expect("publish");
    }
    crate::eventually(
        Duration::from_secs(30) + redelivery_wait,
        "graceful stop: the first deliveries",
        || async { (lock(&accepted).len() >= 5).then_some(()) },
    )
    .await;
    // `stop` signals at once and returns the wait; from here no delivery may start.
    let settled = sub.stop();
    stopping.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(30), settled)
        .await
        .expect("graceful stop: the stop settles within 30 s");
    assert_eq!(
        late.load(Ordering::SeqCst),
        0,
        "graceful stop: deliveries started after the stop"
    );
    assert_eq!(
        started.load(Ordering::SeqCst),
        lock(&accepted).len(),
        "graceful stop: the stop resolved while deliveries were still in the app's hands"
    );
    c.close().await.expect("close");
    if !resumes {
        return;
    }
    let before: HashSet<usize> = lock(&accepted).clone();
    let rest: HashSet<usize> = (0..N).filter(|n| !before.contains(n)).collect();
    let c2 = connect(group).await;
    let (h2, mut rx2) = collector(|_, _| Outcome::Success);
    let _s2 = subscribe(&c2, &topic, h2).await;
    let got: Vec<usize> = drain(
        &mut rx2,
        rest.len(),
        Duration::from_secs(30) + redelivery_wait,
    )
    .await
    .iter()
    .map(number)
    .collect();
    let again: Vec<usize> = got.iter().copied().filter(|n| before.contains(n)).collect();
    assert!(
        again.is_empty(),
        "graceful stop: messages the app had accepted came again: {again:?}"
    );
    let got_set: HashSet<usize> = got.iter().copied().collect();
    let mut lost: Vec<usize> = rest.difference(&got_set).copied().collect();
    lost.sort_unstable();
    assert!(
        lost.is_empty(),
        "graceful stop: messages never accepted did not come to the next subscriber: {lost:?}"
    );
    assert_eq!(
        got.len(),
        got_set.len(),
        "graceful stop: duplicates {got:?}"
    );
    let extra = quiet(&mut rx2, redelivery_wait.max(Duration::from_secs(1))).await;
    assert!(
        extra.is_none(),
        "graceful stop: a message came again: {:?}",
        extra.map(|m| number(&m))
    );
    c2.close().await.expect("close");
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A publish of `data` to `topic` with no metadata.
pub fn publish_request(topic: &str, data: &'static [u8]) -> PublishRequest {
    PublishRequest {
        pubsub_name: "pubsub".into(),
        topic: topic.into(),
        data: Bytes::from_static(data),
        metadata: BTreeMap::new(),
        content_type: None,
    }
}

/// A publish of `data` to `topic` on the component `pubsub` carrying `metadata`.
pub fn publish_request_with(topic: &str, data: &str, metadata: &[(&str, &str)]) -> PublishRequest {
    PublishRequest {
        pubsub_name: "pubsub".into(),
        topic: topic.into(),
        data: Bytes::from(data.to_string()),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        content_type: None,
    }
}

/// Subscribes to `topic` on `c` (every message answered `Success`), publishes `data` and waits
/// up to 10 s for it: the smallest proof that a connection works both ways. Returns the live
/// subscription and the receiver of any further messages.
pub async fn round_trip(
    c: &Arc<dyn PubSub>,
    topic: &str,
    data: &'static [u8],
) -> (
    daprd_core::pubsub::Subscription,
    mpsc::UnboundedReceiver<Message>,
) {
    let (h, mut rx) = collector(|_, _| Outcome::Success);
    let sub = subscribe(c, topic, h).await;
    c.publish(publish_request(topic, data))
        .await
        .expect("publish");
    let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("round trip on {topic}: no delivery within 10 s"))
        .expect("subscription open");
    assert_eq!(
        &m.data[..],
        data,
        "round trip on {topic}: other bytes came back"
    );
    (sub, rx)
}

/// Metadata with `consumerID` set, plus `extra`.
pub fn metadata_with_group(group: &str, extra: &[(&str, &str)]) -> Metadata {
    let mut md: Metadata = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    md.insert("consumerID", group);
    md
}
