//! Binary-mode CloudEvents (Dapr 1.17 and later): a broker message with content type
//! `application/octet-stream` and `ce_*` metadata is rebuilt into a CloudEvent for the app.
//! No built-in component produces such messages yet (Kafka will), so the pipeline is driven
//! directly with the message a component would hand it.

#![allow(clippy::unwrap_used)]

#[path = "support/sidecar.rs"]
mod sidecar;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use bytes::Bytes;
use daprd_core::pubsub::{Message, Outcome};
use daprd_runtime::config::Env;
use daprd_runtime::inbound::channel::HttpChannel;
use daprd_runtime::inbound::delivery::SubscriptionPipeline;
use daprd_runtime::inbound::routing::Rule;
use daprd_runtime::inbound::subscriptions::{BulkSubscribe, SubscriptionKind, SubscriptionSpec};
use daprd_testkit::in_memory_component;
use tokio::sync::mpsc;

#[tokio::test]
async fn binary_mode_message_is_rebuilt_into_a_cloudevent() {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let app = axum::Router::new().route(
        "/orders",
        post(move |body: Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body.to_vec());
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let r = sidecar::start(
        &[&in_memory_component("pubsub", &[])],
        "checkout",
        Env::default(),
        &[],
    )
    .await;
    let entry = r.state.publisher.store().pubsub("pubsub").unwrap();
    let spec = SubscriptionSpec {
        name: String::new(),
        pubsub: "pubsub".into(),
        topic: "orders".into(),
        rules: vec![Rule::new("", "/orders").unwrap()],
        metadata: BTreeMap::new(),
        dead_letter_topic: String::new(),
        bulk: BulkSubscribe::default(),
        kind: SubscriptionKind::Programmatic,
        scopes: Vec::new(),
    };
    let channel = Arc::new(
        HttpChannel::new(
            "127.0.0.1",
            app_port,
            daprd_runtime::config::AppProtocol::Http,
            "checkout",
            None,
            -1,
        )
        .unwrap(),
    );
    let pipeline = SubscriptionPipeline::new(
        &r.state,
        r.subscriptions.in_flight.clone(),
        spec,
        entry,
        channel,
    );
    let metadata: BTreeMap<String, String> = [
        ("ce_id", "bin-1"),
        ("ce_source", "producer"),
        ("ce_type", "order.created"),
        ("ce_specversion", "1.0"),
        ("ce_datacontenttype", "application/json"),
        ("other", "kept as a header"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let outcome = pipeline
        .handle(Message {
            topic: "orders".into(),
            data: Bytes::from_static(br#"{"orderId":7}"#),
            metadata,
            content_type: Some("application/octet-stream".into()),
            redelivered: false,
        })
        .await;
    assert_eq!(outcome, Outcome::Success);
    let body = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let ce: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(ce["id"], "bin-1");
    assert_eq!(ce["source"], "producer");
    assert_eq!(ce["type"], "order.created");
    assert_eq!(ce["datacontenttype"], "application/json");
    assert_eq!(
        ce["data"]["orderId"], 7,
        "the body becomes data, embedded by its content type"
    );
}
