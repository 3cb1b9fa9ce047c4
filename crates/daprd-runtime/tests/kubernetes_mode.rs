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
use daprd_runtime::serve::Sidecar;
use daprd_testkit::controlplane::{
    Kind, OperatorState, SentryPolicy, TestCa, TestOperator, TestSentry,
};
use daprd_testkit::eventually;
use serde_json::json;

const NS: &str = "ns1";
const CP_TD: &str = "cluster.local";
const CP_NS: &str = "dapr-system";

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
        "--enable-metrics=false",
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
    let sentry = TestSentry::start(
        listener().await,
        ca.clone(),
        &ca,
        &format!("spiffe://{CP_TD}/ns/{CP_NS}/dapr-sentry"),
        SentryPolicy::default(),
    );
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
        &format!("spiffe://{CP_TD}/ns/{CP_NS}/dapr-operator"),
        NS,
        OperatorState {
            components: vec![
                component("pubsub", &[], &["app1"]),
                // scoped to another app: not loaded here
                component("other", &[], &["app2"]),
            ],
            subscriptions: vec![subscription("s1", "pubsub", "orders")],
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
            .all(|(_, peer)| peer.as_deref() == Some(&*format!("spiffe://public/ns/{NS}/app1"))),
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
