//! `pubsub.mqtt3` against the real broker, with `mosquitto_pub`/`mosquitto_sub` as the
//! independent client: topic, payload and retain flag on the wire, and wildcards.

#![cfg(feature = "mqtt3")]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use daprd_core::pubsub::{Handler, Outcome, PubSubFactory, PublishRequest, SubscribeRequest};
use daprd_testkit::conformance::{metadata_with_group, random_name};
use tokio::sync::mpsc;

fn url() -> String {
    daprd_testkit::broker_address("MQTT_URL", "tcp://localhost:1883", "Mosquitto (MQTT)")
}

fn host_port() -> (String, String) {
    let u = url();
    let hp = u.trim_start_matches("tcp://").to_string();
    let (h, p) = hp.rsplit_once(':').unwrap();
    (h.to_string(), p.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_publish_is_read_by_another_client() {
    let topic = format!("daprd-rs/{}", random_name("retain"));
    let c = daprd_components::mqtt3::MqttFactory
        .connect(
            "pubsub",
            &metadata_with_group(&random_name("pub"), &[("url", &url())]),
        )
        .await
        .unwrap();
    let md: BTreeMap<String, String> = [("retain".to_string(), "true".to_string())]
        .into_iter()
        .collect();
    c.publish(PublishRequest {
        pubsub_name: "pubsub".into(),
        topic: topic.clone(),
        data: Bytes::from_static(b"kept"),
        metadata: md,
        content_type: None,
    })
    .await
    .unwrap();
    let (h, p) = host_port();
    // A retained message reaches a subscriber that connects afterwards.
    let out = tokio::task::spawn_blocking(move || {
        Command::new("mosquitto_sub")
            .args(["-h", &h, "-p", &p, "-t", &topic, "-C", "1", "-W", "5", "-v"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.trim().ends_with(" kept"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_subscription_receives_messages_from_another_client() {
    let base = format!("daprd-rs/{}", random_name("wild"));
    let c = daprd_components::mqtt3::MqttFactory
        .connect(
            "pubsub",
            &metadata_with_group(&random_name("sub"), &[("url", &url())]),
        )
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler: Handler = Arc::new(move |m| {
        let tx = tx.clone();
        Box::pin(async move {
            let _ = tx.send(m);
            Outcome::Success
        })
    });
    let _sub = c
        .subscribe(SubscribeRequest::new(format!("{base}/+/events")), handler)
        .await
        .unwrap();
    let (h, p) = host_port();
    let target = format!("{base}/orders/events");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // The SUBACK may still be in flight: publish until the first message arrives.
    let m = loop {
        let (h, p, t) = (h.clone(), p.clone(), target.clone());
        tokio::task::spawn_blocking(move || {
            Command::new("mosquitto_pub")
                .args([
                    "-h",
                    &h,
                    "-p",
                    &p,
                    "-t",
                    &t,
                    "-q",
                    "1",
                    "-m",
                    "from-mosquitto",
                ])
                .status()
                .unwrap()
        })
        .await
        .unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no message through the wildcard subscription"
        );
    };
    assert_eq!(m.topic, target);
    assert_eq!(&m.data[..], b"from-mosquitto");
    assert_eq!(
        m.metadata.get("retained").map(String::as_str),
        Some("false")
    );
}

/// `ssl://` with `caCert`/`clientCert`/`clientKey` against a private mosquitto whose only
/// listener is TLS and requires client certificates: messages flow; without the client
/// certificate, or without the CA (the test CA is no system root), the connection is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_url_with_ca_and_client_certificates() {
    let certs = daprd_testkit::certs::TestCerts::generate();
    let port = daprd_testkit::free_port();
    let conf = certs.dir.write(
        "mosquitto.conf",
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nrequire_certificate true\ncafile {}\ncertfile {}\nkeyfile {}\n",
            certs.ca_file.display(),
            certs.server_cert_file.display(),
            certs.server_key_file.display()
        ),
    );
    let mut broker = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto runs");
    daprd_testkit::eventually(
        Duration::from_secs(10),
        "mosquitto to listen",
        || async move { std::net::TcpStream::connect(("127.0.0.1", port)).ok() },
    )
    .await;
    let url = format!("ssl://127.0.0.1:{port}");
    let connect = |with_ca: bool, with_client: bool| {
        let mut pairs: Vec<(&str, &str)> = vec![("url", url.as_str())];
        if with_ca {
            pairs.push(("caCert", certs.ca_pem.as_str()));
        }
        if with_client {
            pairs.push(("clientCert", certs.client_cert_pem.as_str()));
            pairs.push(("clientKey", certs.client_key_pem.as_str()));
        }
        let md = metadata_with_group(&random_name("tls"), &pairs);
        async move {
            daprd_components::mqtt3::MqttFactory
                .connect("pubsub", &md)
                .await
        }
    };
    let c = connect(true, true)
        .await
        .expect("TLS connect with client certificate");
    let topic = format!("daprd-rs/{}", random_name("tls"));
    let _ = daprd_testkit::conformance::round_trip(&c, &topic, b"over tls").await;
    c.close().await.unwrap();

    assert!(
        connect(true, false).await.is_err(),
        "the broker requires a client certificate"
    );
    assert!(
        connect(false, true).await.is_err(),
        "without caCert the server certificate is checked against the system roots"
    );
    let _ = broker.kill();
    let _ = broker.wait();
}
