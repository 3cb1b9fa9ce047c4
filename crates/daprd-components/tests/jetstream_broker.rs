//! `pubsub.jetstream` against the real server: subject and `Nats-Msg-Id` on the stored
//! message, read back from the stream directly.

#![cfg(feature = "jetstream")]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use daprd_core::pubsub::{PubSubFactory, PublishRequest};
use daprd_testkit::conformance::{metadata_with_group, random_name};

#[tokio::test]
async fn publish_stores_the_subject_and_the_cloudevent_id() {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://localhost:4222".into());
    let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
    let subject = format!("bytes.{}", random_name("js"));
    let stream = random_name("daprd-rs-bytes");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![subject.clone()],
        max_age: Duration::from_secs(300),
        ..Default::default()
    })
    .await
    .unwrap();
    let md = metadata_with_group("unused", &[("natsURL", &url)]);
    let c = daprd_components::jetstream::JetStreamFactory
        .connect("pubsub", &md)
        .await
        .unwrap();
    let body = br#"{"id":"ce-42","specversion":"1.0","data":"x"}"#;
    for _ in 0..2 {
        c.publish(PublishRequest {
            pubsub_name: "pubsub".into(),
            topic: subject.clone(),
            data: Bytes::from_static(body),
            metadata: BTreeMap::new(),
            content_type: None,
        })
        .await
        .unwrap();
    }
    let s = js.get_stream(&stream).await.unwrap();
    let raw = s.get_last_raw_message_by_subject(&subject).await.unwrap();
    assert_eq!(&raw.payload[..], body);
    assert_eq!(
        raw.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
        Some("ce-42")
    );
    let mut s = s;
    assert_eq!(
        s.info().await.unwrap().state.messages,
        1,
        "Nats-Msg-Id deduplicates a republish"
    );
    js.delete_stream(&stream).await.unwrap();
}
