//! Kubernetes mode end to end against the test control plane (a Sentry and an operator
//! speaking Dapr's protocols over mTLS with SPIFFE ids): the identity, the resources from the
//! operator (scopes applied), delivery through them, live updates and deletions from the
//! update streams, a broken stream reopened, and an operator that is down at start.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::{get, post};
use clap::Parser;
use daprd_runtime::config::{Env, Options, RuntimeConfig};
use daprd_runtime::kubernetes::operator::{OperatorClient, OperatorError, OperatorOptions};
use daprd_runtime::serve::Sidecar;
use daprd_testkit::controlplane::{
    operator_id, Kind, OperatorState, SentryPolicy, TestCa, TestOperator, TestSentry, CP_NAMESPACE,
    CP_TRUST_DOMAIN,
};
use daprd_testkit::eventually;
use serde_json::json;

const NS: &str = "ns1";
const CP_TD: &str = CP_TRUST_DOMAIN;
const CP_NS: &str = CP_NAMESPACE;

fn component(name: &str, extra: &[(&str, &str)], scopes: &[&str]) -> serde_json::Value {
    let mut metadata: Vec<serde_json::Value> = extra
        .iter()
        .map(|(k, v)| json!({"name": k, "value": v}))
        .collect();
    metadata.push(json!({"name": "note", "value": "from the operator"}));
    json!({
        "apiVersion": "dapr.io/v1alpha1",
        "kind": "Component",
        "metadata": {"name": name, "namespace": NS, "creationTimestamp": null},
        "spec": {"type": "pubsub.in-memory", "version": "v1", "metadata": metadata},
        "auth": {"secretStore": ""},
        "scopes": scopes,
    })
}

fn subscription(name: &str, pubsub: &str, topic: &str) -> serde_json::Value {
    json!({
        "apiVersion": "dapr.io/v2alpha1",
        "kind": "Subscription",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"pubsubname": pubsub, "topic": topic, "routes": {"default": "/in"}},
        "scopes": ["app1"],
    })
}

async fn listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// The app: records each delivered event's data.
async fn app() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let seen = got.clone();
    let router = axum::Router::new()
        .route("/dapr/subscribe", get(|| async { "[]" }))
        .route(
            "/in",
            post(move |body: axum::Json<serde_json::Value>| {
                seen.lock().unwrap().push(body.0["data"].clone());
                async { "" }
            }),
        );
    let l = listener().await;
    let port = l.local_addr().unwrap().port().to_string();
    tokio::spawn(async move { axum::serve(l, router).await.unwrap() });
    (port, got)
}

fn config(sentry: &str, operator: &str, anchors: &str, app_port: &str) -> RuntimeConfig {
    let argv = [
        "daprd",
        "--app-id",
        "app1",
        "--mode",
        "kubernetes",
        "--dapr-http-port",
        "0",
        "--dapr-grpc-port",
        "0",
        "--dapr-listen-addresses",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--metrics-listen-address",
        "127.0.0.1",
        "--app-port",
        app_port,
        "--control-plane-address",
        operator,
        "--sentry-address",
        sentry,
        "--control-plane-trust-domain",
        CP_TD,
        "--control-plane-namespace",
        CP_NS,
        "--enable-mtls",
        "--config",
        "appconfig",
    ];
    let opts = Options::try_parse_from(argv.iter().map(|s| s.to_string())).unwrap();
    let env = Env {
        namespace: Some(NS.into()),
        trust_anchors: Some(anchors.into()),
        ..Env::default()
    };
    RuntimeConfig::from_options(&opts, env, true).unwrap()
}

async fn publish(http: &str, pubsub: &str, topic: &str, n: u64) -> u16 {
    reqwest::Client::new()
        .post(format!("{http}/v1.0/publish/{pubsub}/{topic}"))
        .json(&json!({ "n": n }))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn delivered(got: &Arc<Mutex<Vec<serde_json::Value>>>, n: u64) {
    eventually(
        Duration::from_secs(15),
        &format!("message {n} delivered"),
        || async {
            got.lock()
                .unwrap()
                .iter()
                .any(|d| d["n"] == n)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_come_from_the_operator_and_follow_its_update_streams() {
    let ca = Arc::new(TestCa::ed25519());
    let sentry = TestSentry::spawn(&ca, SentryPolicy::default()).await;
    // The operator is down at start: its port stays closed until the sidecar has asked.
    let operator_port = daprd_testkit::free_port();
    let operator_addr = format!("127.0.0.1:{operator_port}");
    let (app_port, got) = app().await;
    let cfg = config(&sentry.addr.to_string(), &operator_addr, &ca.pem, &app_port);
    let k8s = cfg.kubernetes.clone().unwrap();
    let loading = tokio::spawn(async move {
        let registry = daprd_components::builtin_registry();
        let loaded = daprd_runtime::kubernetes::load(&cfg, &k8s, &registry).await;
        (cfg, loaded)
    });
    eventually(Duration::from_secs(10), "the identity signed", || async {
        (!sentry.signed().is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        sentry.signed()[0].id,
        format!("spiffe://public/ns/{NS}/app1")
    );
    assert!(!loading.is_finished(), "waits for the operator");
    let operator = TestOperator::start(
        tokio::net::TcpListener::bind(&operator_addr).await.unwrap(),
        &ca,
        &operator_id(),
        NS,
        OperatorState {
            components: vec![
                component("pubsub", &[], &["app1"]),
                // scoped to another app: not loaded here
                component("other", &[], &["app2"]),
            ],
            subscriptions: vec![subscription("s1", "pubsub", "orders")],
            configurations: vec![app_config()],
            ..OperatorState::default()
        },
    );
    let (cfg, loaded) = tokio::time::timeout(Duration::from_secs(20), loading)
        .await
        .expect("loaded once the operator is up")
        .unwrap();
    let loaded = loaded.expect("resources");
    assert_eq!(loaded.store.registered().len(), 1, "scopes applied");
    let calls = operator.calls();
    assert!(
        calls
            .iter()
            .all(|c| c.peer.id.as_deref() == Some(&*format!("spiffe://public/ns/{NS}/app1"))),
        "every call presents the workload identity: {calls:?}"
    );
    let sidecar = Sidecar::start(cfg, loaded).await.expect("start");
    let http = format!("http://{}", sidecar.http_addrs[0]);
    let subs = sidecar.subscriptions.clone();
    tokio::spawn(sidecar.run_until_shutdown());
    eventually(Duration::from_secs(10), "subscribed", || async {
        (!subs.list().is_empty()).then_some(())
    })
    .await;
    assert_eq!(publish(&http, "pubsub", "orders", 1).await, 204);
    delivered(&got, 1).await;
    assert_eq!(
        publish(&http, "other", "orders", 2).await,
        404,
        "scoped out"
    );
    // The Configuration named by --config came from the operator: its HTTP allow list.
    let metadata = reqwest::get(format!("{http}/v1.0/metadata")).await.unwrap();
    assert_eq!(
        metadata.status(),
        404,
        "not in the Configuration's allow list"
    );

    // A component update and a new subscription from the streams apply live.
    eventually(
        Duration::from_secs(10),
        "the update streams open",
        || async { (operator.stream_opens() >= 1).then_some(()) },
    )
    .await;
    operator.push(
        Kind::Component,
        2,
        component("pubsub", &[("maxConcurrency", "3")], &["app1"]),
    );
    operator.push(
        Kind::Subscription,
        1,
        subscription("s2", "pubsub", "invoices"),
    );
    eventually(Duration::from_secs(10), "the new subscription", || async {
        (subs.list().len() == 2).then_some(())
    })
    .await;
    assert_eq!(publish(&http, "pubsub", "invoices", 3).await, 204);
    delivered(&got, 3).await;
    assert_eq!(publish(&http, "pubsub", "orders", 4).await, 204);
    delivered(&got, 4).await;

    // A broken stream is reopened, and what changed meanwhile is listed again.
    let opens = operator.stream_opens();
    operator.break_streams();
    eventually(Duration::from_secs(10), "the streams reopened", || async {
        (operator.stream_opens() > opens).then_some(())
    })
    .await;
    // A deletion pushed on the new streams removes the component.
    operator.push(Kind::Component, 3, component("pubsub", &[], &["app1"]));
    eventually(Duration::from_secs(10), "the component removed", || async {
        (publish(&http, "pubsub", "orders", 5).await == 404).then_some(())
    })
    .await;
}

/// The Configuration `appconfig`: the HTTP API limited to publishing (and health).
fn app_config() -> serde_json::Value {
    json!({
        "apiVersion": "dapr.io/v1alpha1",
        "kind": "Configuration",
        "metadata": {"name": "appconfig", "namespace": NS},
        "spec": {"api": {"allowed": [
            {"name": "publish", "version": "v1.0", "protocol": "http"},
            {"name": "healthz", "version": "v1.0", "protocol": "http"},
        ]}},
    })
}

/// Loads a sidecar's resources from the test control plane (at most 20 s).
async fn load(
    ca: &TestCa,
    sentry: &TestSentry,
    operator: &TestOperator,
    app_port: &str,
) -> (
    RuntimeConfig,
    Result<daprd_runtime::serve::Loaded, daprd_runtime::kubernetes::KubernetesError>,
) {
    let cfg = config(
        &sentry.addr.to_string(),
        &operator.addr.to_string(),
        &ca.pem,
        app_port,
    );
    let k8s = cfg.kubernetes.clone().unwrap();
    let registry = daprd_components::builtin_registry();
    let loaded = tokio::time::timeout(
        Duration::from_secs(20),
        daprd_runtime::kubernetes::load(&cfg, &k8s, &registry),
    )
    .await
    .expect("loaded or failed in time");
    (cfg, loaded)
}

/// Starts a loaded sidecar; its HTTP and metrics addresses and subscriptions.
async fn start(
    cfg: RuntimeConfig,
    loaded: daprd_runtime::serve::Loaded,
) -> (
    String,
    String,
    Arc<daprd_runtime::inbound::subscriber::Subscriptions>,
) {
    let sidecar = Sidecar::start(cfg, loaded).await.expect("start");
    let http = format!("http://{}", sidecar.http_addrs[0]);
    let metrics = format!("http://{}/metrics", sidecar.metrics_addr.unwrap());
    let subs = sidecar.subscriptions.clone();
    tokio::spawn(sidecar.run_until_shutdown());
    (http, metrics, subs)
}

/// A sidecar loaded from the test control plane, started.
async fn sidecar(
    ca: &TestCa,
    sentry: &TestSentry,
    operator: &TestOperator,
    app_port: &str,
) -> (
    String,
    String,
    Arc<daprd_runtime::inbound::subscriber::Subscriptions>,
) {
    let (cfg, loaded) = load(ca, sentry, operator, app_port).await;
    start(cfg, loaded.expect("loaded")).await
}

/// The value of the series `name{app_id="app1"...}` (0 when absent).
async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_presented_on_the_next_operator_connection_and_counted() {
    let ca = Arc::new(TestCa::ed25519());
    let sentry = TestSentry::spawn(
        &ca,
        SentryPolicy {
            validity: Duration::from_secs(10),
            ..SentryPolicy::default()
        },
    )
    .await;
    let operator = TestOperator::spawn(
        &ca,
        NS,
        OperatorState {
            components: vec![component("pubsub", &[], &[])],
            configurations: vec![app_config()],
            ..OperatorState::default()
        },
    )
    .await;
    let (app_port, _got) = app().await;
    let (_http, metrics, _subs) = sidecar(&ca, &sentry, &operator, &app_port).await;
    assert_eq!(metric(&metrics, "dapr_runtime_mtls_init_total").await, 1.0);
    // A Resiliency from the operator's stream is put in force.
    eventually(
        Duration::from_secs(10),
        "the update streams open",
        || async { (operator.stream_opens() >= 1).then_some(()) },
    )
    .await;
    assert_eq!(metric(&metrics, "dapr_resiliency_loaded").await, 0.0);
    operator.push(
        Kind::Resiliency,
        1,
        json!({
            "apiVersion": "dapr.io/v1alpha1",
            "kind": "Resiliency",
            "metadata": {"name": "retries", "namespace": NS},
            "spec": {
                "policies": {"retries": {"three": {"policy": "constant", "duration": "1s", "maxRetries": 3}}},
                "targets": {"components": {"pubsub": {"outbound": {"retry": "three"}}}},
            },
        }),
    );
    eventually(Duration::from_secs(10), "the resiliency loaded", || async {
        (metric(&metrics, "dapr_resiliency_loaded").await == 1.0).then_some(())
    })
    .await;
    let first = operator.calls()[0]
        .peer
        .cert
        .clone()
        .expect("a client certificate");
    // Renewed halfway through the 10 s (about 5 s in), counted.
    eventually(Duration::from_secs(15), "a renewal", || async {
        (metric(&metrics, "dapr_runtime_mtls_workload_cert_rotated_total").await >= 1.0)
            .then_some(())
    })
    .await;
    let renewed = sentry.signed()[1].pem.clone();
    // The connection made before keeps its handshake; the next one presents the new
    // certificate.
    let before = operator.calls().len();
    operator.drop_connections();
    let presented = eventually(Duration::from_secs(15), "a new connection", || async {
        operator.calls()[before..]
            .iter()
            .find_map(|c| c.peer.cert.clone())
    })
    .await;
    assert_ne!(presented, first, "not the first certificate");
    let renewed_der = rustls::pki_types::pem::PemObject::from_pem_slice(renewed.as_bytes())
        .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
        .expect("PEM");
    let later: Vec<Vec<u8>> = sentry.signed()[1..]
        .iter()
        .map(|s| {
            rustls::pki_types::pem::PemObject::from_pem_slice(s.pem.as_bytes())
                .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
                .expect("PEM")
        })
        .collect();
    assert!(
        later.contains(&presented),
        "the new connection presents a renewed certificate"
    );
    assert!(later.contains(&renewed_der));
}

#[tokio::test]
async fn an_operator_that_refuses_the_namespace_is_a_clear_error() {
    let ca = Arc::new(TestCa::ed25519());
    let sentry = TestSentry::spawn(&ca, SentryPolicy::default()).await;
    // This operator serves another namespace only.
    let operator = TestOperator::spawn(&ca, "other", OperatorState::default()).await;
    let client = daprd_runtime::kubernetes::identity::SentryClient::new(
        daprd_runtime::kubernetes::identity::SentryOptions {
            address: sentry.addr.to_string(),
            anchors: daprd_runtime::kubernetes::spiffe::TrustAnchors::from_pem(&ca.pem).unwrap(),
            sentry_id: daprd_runtime::kubernetes::spiffe::SpiffeId::sentry(CP_TD, CP_NS),
            app_id: "app1".into(),
            namespace: NS.into(),
            token_file: None,
        },
    );
    let identity = daprd_runtime::kubernetes::identity::Identity::new(client.sign().await.unwrap());
    let op = OperatorClient::new(
        OperatorOptions {
            address: operator.addr.to_string(),
            anchors: daprd_runtime::kubernetes::spiffe::TrustAnchors::from_pem(&ca.pem).unwrap(),
            operator_id: daprd_runtime::kubernetes::spiffe::SpiffeId::operator(CP_TD, CP_NS),
            namespace: NS.into(),
        },
        &identity,
    )
    .unwrap();
    let err = op.snapshot().await.expect_err("refused");
    assert!(!err.is_fatal(), "tried again: {err}");
    assert!(
        matches!(
            &err,
            OperatorError::Refused {
                code: tonic::Code::PermissionDenied,
                call: "ListComponents",
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(NS) && text.contains("ListComponents"),
        "{text}"
    );
}

fn redis_component(tag: &str, note: &str) -> serde_json::Value {
    json!({
        "apiVersion": "dapr.io/v1alpha1",
        "kind": "Component",
        "metadata": {"name": "redis", "namespace": NS},
        "spec": {"type": "pubsub.redis", "version": "v1", "metadata": [
            {"name": "redisHost", "value": "localhost:6379"},
            {"name": "redisDB", "value": "6"},
            {"name": "consumerID", "value": tag},
            {"name": "note", "value": note},
        ]},
    })
}

/// Publishes 0, 1, 2, ... until `stop`; the numbers the sidecar accepted (2xx).
fn publisher(
    http: String,
    topic: String,
    from: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    tokio::spawn(async move {
        let mut accepted = Vec::new();
        let mut n = from;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            if publish(&http, "redis", &topic, n).await / 100 == 2 {
                accepted.push(n);
            }
            n += 1;
            tokio::task::yield_now().await;
        }
        accepted
    })
}

fn count(got: &Arc<Mutex<Vec<serde_json::Value>>>) -> usize {
    got.lock().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_updates_and_a_deletion_from_the_operator_lose_nothing_under_traffic() {
    let tag = format!("k8s{}", std::process::id());
    let topic = format!("{tag}-orders");
    let ca = Arc::new(TestCa::ed25519());
    let sentry = TestSentry::spawn(&ca, SentryPolicy::default()).await;
    let operator = TestOperator::spawn(
        &ca,
        NS,
        OperatorState {
            components: vec![redis_component(&tag, "v0")],
            subscriptions: vec![subscription("orders", "redis", &topic)],
            configurations: vec![app_config()],
            ..OperatorState::default()
        },
    )
    .await;
    let (app_port, got) = app().await;
    let (http, _metrics, subs) = sidecar(&ca, &sentry, &operator, &app_port).await;
    eventually(Duration::from_secs(10), "subscribed", || async {
        (!subs.list().is_empty()).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "the update streams open",
        || async { (operator.stream_opens() >= 1).then_some(()) },
    )
    .await;

    // Three updates of the component, each applied while publishes go on.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let running = publisher(http.clone(), topic.clone(), 0, stop.clone());
    for v in 1..=3 {
        let before = count(&got);
        operator.push(Kind::Component, 2, redis_component(&tag, &format!("v{v}")));
        eventually(
            Duration::from_secs(15),
            "deliveries go on after the update",
            || async { (count(&got) > before + 20).then_some(()) },
        )
        .await;
    }
    // A deletion under traffic: publishes are refused once it applied; what was accepted
    // before waits in Redis and is delivered when the component comes back. Each probe is a
    // message of its own (numbered apart from the publisher's), and those accepted count too.
    operator.push(Kind::Component, 3, redis_component(&tag, "v3"));
    let probes = Arc::new(Mutex::new(Vec::new()));
    eventually(Duration::from_secs(15), "the component removed", || async {
        let n = 1_000_000_000 + probes.lock().unwrap().len() as u64;
        let status = publish(&http, "redis", &topic, n).await;
        probes.lock().unwrap().push((n, status));
        (status == 404).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut accepted = running.await.unwrap();
    accepted.extend(
        probes
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, status)| status / 100 == 2)
            .map(|(n, _)| *n),
    );
    operator.push(Kind::Component, 1, redis_component(&tag, "v4"));
    eventually(Duration::from_secs(15), "subscribed again", || async {
        (!subs.list().is_empty()).then_some(())
    })
    .await;
    assert!(accepted.len() > 60, "traffic ran: {}", accepted.len());
    eventually(
        Duration::from_secs(30),
        "every accepted message delivered",
        || async {
            let got = got.lock().unwrap();
            accepted
                .iter()
                .all(|n| got.iter().any(|d| d["n"] == *n))
                .then_some(())
        },
    )
    .await;
    let got = got.lock().unwrap();
    let mut seen = std::collections::HashSet::new();
    let twice: Vec<_> = got
        .iter()
        .filter(|d| !seen.insert(d["n"].to_string()))
        .collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_between_the_first_list_and_the_streams_is_not_missed() {
    let ca = Arc::new(TestCa::ed25519());
    let sentry = TestSentry::spawn(&ca, SentryPolicy::default()).await;
    let operator = TestOperator::spawn(
        &ca,
        NS,
        OperatorState {
            components: vec![component("pubsub", &[], &[])],
            configurations: vec![app_config()],
            ..OperatorState::default()
        },
    )
    .await;
    let (app_port, got) = app().await;
    let (cfg, loaded) = load(&ca, &sentry, &operator, &app_port).await;
    let loaded = loaded.expect("loaded");
    // Listed, streams not open yet: this event reaches no stream, only the next list.
    assert_eq!(operator.stream_opens(), 0);
    operator.push(
        Kind::Subscription,
        1,
        subscription("late", "pubsub", "late"),
    );
    let (http, _metrics, subs) = start(cfg, loaded).await;
    eventually(Duration::from_secs(10), "the late subscription", || async {
        (!subs.list().is_empty()).then_some(())
    })
    .await;
    assert_eq!(publish(&http, "pubsub", "late", 7).await, 204);
    delivered(&got, 7).await;
}

#[tokio::test]
async fn an_operator_with_another_spiffe_id_is_a_fatal_trust_failure() {
    let ca = Arc::new(TestCa::ed25519());
    let sentry = TestSentry::spawn(&ca, SentryPolicy::default()).await;
    // An impostor: a certificate of the right CA for another identity.
    let impostor = format!("spiffe://{CP_TD}/ns/{CP_NS}/dapr-placement");
    let operator = TestOperator::start(
        listener().await,
        &ca,
        &impostor,
        NS,
        OperatorState::default(),
    );
    let (app_port, _got) = app().await;
    let err = load(&ca, &sentry, &operator, &app_port)
        .await
        .1
        .err()
        .expect("refused at once, not after retries");
    let text = err.to_string();
    assert!(
        matches!(
            err,
            daprd_runtime::kubernetes::KubernetesError::Operator(ref e) if e.is_fatal()
        ),
        "{text}"
    );
    assert!(
        text.contains(&operator_id()) && text.contains(&impostor),
        "{text}"
    );
}
