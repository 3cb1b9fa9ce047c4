//! Delivery over `--app-protocol h2c` to a real HTTP/2 (prior knowledge) app server.

#![allow(clippy::unwrap_used)]

#[path = "support/sidecar.rs"]
mod sidecar;

use std::time::Duration;

use axum::routing::{get, post};
use daprd_runtime::config::Env;
use daprd_testkit::in_memory_component;
use tokio::sync::mpsc;

#[tokio::test]
async fn h2c_app_receives_over_http2() {
    let (tx, mut rx) = mpsc::unbounded_channel::<(http::Version, String, Vec<u8>)>();
    let app = axum::Router::new()
        .route(
            "/dapr/subscribe",
            get(|| async { r#"[{"pubsubname":"pubsub","topic":"orders","route":"/orders"}]"# }),
        )
        .route(
            "/orders",
            post(move |req: axum::extract::Request| {
                let tx = tx.clone();
                async move {
                    let version = req.version();
                    let ct = req
                        .headers()
                        .get("content-type")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                        .await
                        .unwrap()
                        .to_vec();
                    let _ = tx.send((version, ct, body));
                    ""
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let port = app_port.to_string();
    let r = sidecar::start(
        &[&in_memory_component("pubsub", &[])],
        "a",
        Env::default(),
        &["--app-port", &port, "--app-protocol", "h2c"],
    )
    .await;
    let (http, state) = (r.http.clone(), r.state.clone());
    daprd_testkit::eventually(
        Duration::from_secs(10),
        "subscriptions to start",
        || async { state.is_ready().then_some(()) },
    )
    .await;

    let resp = reqwest::Client::new()
        .post(format!("{http}/v1.0/publish/pubsub/orders"))
        .header("content-type", "application/json")
        .body(r#"{"n":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let (version, ct, body) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(ct, "application/cloudevents+json");
    let ce: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(ce["data"]["n"], 1);
}
