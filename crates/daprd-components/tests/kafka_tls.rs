//! `pubsub.kafka` over TLS: tansu 0.6 has no working TLS listener, so a private tansu is put
//! behind `socat` terminating TLS (the certificate authority, server and client certificates
//! come from `openssl`); tansu advertises the TLS port, so every connection librdkafka makes
//! goes through it. `authType: mtls` (client certificate required) and `certificate` (server
//! verified with `caCert`) work; a missing client certificate, an unknown CA and plaintext
//! are refused.

#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use daprd_components::kafka::KafkaFactory;
use daprd_core::metadata::Metadata;
use daprd_core::pubsub::PubSubFactory;
use daprd_testkit::certs::TestCerts;
use daprd_testkit::conformance::{metadata_with_group, random_name, round_trip};
use daprd_testkit::{eventually, free_port};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &str, args: &[String]) -> Killed {
    Killed(
        Command::new(cmd)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd} runs: {e}")),
    )
}

async fn listening(port: u16) {
    eventually(Duration::from_secs(20), "a listening port", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

/// tansu on a plain port advertising `tls_port`, and socat terminating TLS on `tls_port`
/// (`verify`: client certificates required).
async fn tls_broker(certs: &TestCerts, verify: bool) -> (u16, Vec<Killed>) {
    let (plain, tls) = (free_port(), free_port());
    let tansu = spawn(
        "tansu",
        &[
            "broker".into(),
            "--listener-url".into(),
            format!("tcp://127.0.0.1:{plain}"),
            "--advertised-listener-url".into(),
            format!("tcp://127.0.0.1:{tls}"),
            "--storage-engine".into(),
            "memory://tansu/".into(),
        ],
    );
    listening(plain).await;
    let file = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let socat = spawn(
        "socat",
        &[
            format!(
                "OPENSSL-LISTEN:{tls},bind=127.0.0.1,reuseaddr,fork,cert={},key={},cafile={},verify={}",
                file(&certs.server_cert_file),
                file(&certs.server_key_file),
                file(&certs.ca_file),
                u8::from(verify)
            ),
            format!("TCP:127.0.0.1:{plain}"),
        ],
    );
    listening(tls).await;
    (tls, vec![socat, tansu])
}

fn metadata(port: u16, extra: &[(&str, &str)]) -> Metadata {
    let brokers = format!("127.0.0.1:{port}");
    let mut pairs = vec![
        ("brokers", brokers.as_str()),
        ("initialOffset", "oldest"),
        ("autoCreateTopics", "true"),
    ];
    pairs.extend_from_slice(extra);
    metadata_with_group(&random_name("tls"), &pairs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_round_trip_and_refusals() {
    let certs = TestCerts::generate();
    let (port, _procs) = tls_broker(&certs, true).await;
    let md = metadata(
        port,
        &[
            ("authType", "mtls"),
            ("caCert", &certs.ca_pem),
            ("clientCert", &certs.client_cert_pem),
            ("clientKey", &certs.client_key_pem),
        ],
    );
    let c = KafkaFactory.connect("kafka", &md).await.unwrap();
    let (_sub, _rx) = round_trip(&c, &random_name("mtls"), b"over mutual tls").await;
    c.close().await.unwrap();

    // no client certificate: the server ends the handshake
    let md = metadata(
        port,
        &[("authType", "certificate"), ("caCert", &certs.ca_pem)],
    );
    assert!(KafkaFactory.connect("kafka", &md).await.is_err());
    // plaintext against the TLS port
    let md = metadata(port, &[("authType", "none")]);
    assert!(KafkaFactory.connect("kafka", &md).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_auth_verifies_the_server_with_ca_cert() {
    let certs = TestCerts::generate();
    let (port, _procs) = tls_broker(&certs, false).await;
    let md = metadata(
        port,
        &[("authType", "certificate"), ("caCert", &certs.ca_pem)],
    );
    let c = KafkaFactory.connect("kafka", &md).await.unwrap();
    let (_sub, _rx) = round_trip(&c, &random_name("cert"), b"over tls").await;
    c.close().await.unwrap();
    // another CA does not vouch for this server; skipVerify accepts it anyway
    let other = TestCerts::generate();
    let md = metadata(
        port,
        &[("authType", "certificate"), ("caCert", &other.ca_pem)],
    );
    assert!(KafkaFactory.connect("kafka", &md).await.is_err());
    let md = metadata(
        port,
        &[
            ("authType", "certificate"),
            ("caCert", &other.ca_pem),
            ("skipVerify", "true"),
        ],
    );
    let c = KafkaFactory.connect("kafka", &md).await.unwrap();
    let (_sub, _rx) = round_trip(&c, &random_name("skip"), b"unverified").await;
    c.close().await.unwrap();
}
