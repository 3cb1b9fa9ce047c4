//! `pubsub.jetstream` against the real server: subject and `Nats-Msg-Id` on the stored
//! message, read back from the stream directly.

#![cfg(feature = "jetstream")]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use daprd_core::pubsub::{PubSubFactory, PublishRequest, SubscribeRequest};
use daprd_testkit::conformance::{metadata_with_group, random_name};

/// A durable consumer serves one subject: a second topic on the same `durableName` is refused
/// by name instead of being handed the first topic's messages.
#[tokio::test]
async fn one_durable_name_for_two_topics_is_refused() {
    let url = daprd_testkit::broker_address("NATS_URL", "nats://localhost:4222", "NATS JetStream");
    let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
    let tag = random_name("durable");
    let (a, b) = (format!("{tag}.a"), format!("{tag}.b"));
    let stream = random_name("daprd-rs-durable");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{tag}.*")],
        max_age: Duration::from_secs(300),
        ..Default::default()
    })
    .await
    .unwrap();
    let md = metadata_with_group("unused", &[("natsURL", &url), ("durableName", &tag)]);
    let c = daprd_components::jetstream::JetStreamFactory
        .connect("pubsub", &md)
        .await
        .unwrap();
    let (h, _rx) = daprd_testkit::conformance::success_collector();
    let _first = c
        .subscribe(SubscribeRequest::new(a.clone()), h.clone())
        .await
        .unwrap();
    let err = c
        .subscribe(SubscribeRequest::new(b.clone()), h)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("durableName"), "{err}");
    assert!(err.to_string().contains(&a), "{err}");
    js.delete_stream(&stream).await.unwrap();
}

#[tokio::test]
async fn publish_stores_the_subject_and_the_cloudevent_id() {
    let url = daprd_testkit::broker_address("NATS_URL", "nats://localhost:4222", "NATS JetStream");
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

/// A private nats-server from a config file, killed on drop.
struct PrivateNats {
    child: std::process::Child,
    port: u16,
    _dir: daprd_testkit::ScratchDir,
}

impl PrivateNats {
    async fn start(config: impl Fn(u16, &std::path::Path) -> String) -> Self {
        let port = daprd_testkit::free_port();
        let dir = daprd_testkit::ScratchDir::new("nats");
        let conf = dir.write("nats.conf", &config(port, dir.path()));
        let log = std::fs::File::create(dir.path().join("nats.log")).unwrap();
        let mut child = std::process::Command::new("nats-server")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server runs");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = child.try_wait().ok().flatten().is_some();
            if exited || std::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.path().join("nats.log")).unwrap_or_default();
                panic!("nats-server did not start (exited: {exited}): {log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `domain` and `apiPrefix` pick the JetStream API the component talks to: on a server
/// whose JetStream domain is `hub`, `domain: hub` and `apiPrefix: $JS.hub.API` subscribe and
/// receive, `domain: elsewhere` finds no JetStream and the subscribe fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_and_api_prefix_select_the_jetstream_api() {
    let nats = PrivateNats::start(|port, dir| {
        format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\", domain: hub }}\n",
            dir.display()
        )
    })
    .await;
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "domain-test".into(),
        subjects: vec!["dom.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for (n, (key, value)) in [("domain", "hub"), ("apiPrefix", "$JS.hub.API")]
        .into_iter()
        .enumerate()
    {
        let md = metadata_with_group("unused", &[("natsURL", &url), (key, value)]);
        let c = daprd_components::jetstream::JetStreamFactory
            .connect("pubsub", &md)
            .await
            .unwrap();
        let _ =
            daprd_testkit::conformance::round_trip(&c, &format!("dom.{n}"), b"via domain").await;
        c.close().await.unwrap();
    }
    let md = metadata_with_group("unused", &[("natsURL", &url), ("domain", "elsewhere")]);
    let c = daprd_components::jetstream::JetStreamFactory
        .connect("pubsub", &md)
        .await
        .unwrap();
    let handler: daprd_core::pubsub::Handler =
        std::sync::Arc::new(|_m| Box::pin(async { daprd_core::pubsub::Outcome::Success }));
    let wrong = tokio::time::timeout(
        Duration::from_secs(20),
        c.subscribe(daprd_core::pubsub::SubscribeRequest::new("dom.x"), handler),
    )
    .await
    .expect("the subscribe answers");
    assert!(wrong.is_err(), "no JetStream in domain \"elsewhere\"");
}

/// `tls_client_cert` / `tls_client_key` against a private nats-server that requires client
/// certificates. The server certificate is checked against the system roots (as in Dapr), so
/// the check runs in a child test process whose `SSL_CERT_FILE` names the test CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificate() {
    let certs = daprd_testkit::certs::TestCerts::generate();
    let (cert, key, ca) = (
        certs.server_cert_file.clone(),
        certs.server_key_file.clone(),
        certs.ca_file.clone(),
    );
    let nats = PrivateNats::start(move |port, dir| {
        format!(
            "listen: 127.0.0.1:{port}\ntls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}\njetstream {{ store_dir: \"{}\" }}\n",
            cert.display(),
            key.display(),
            ca.display(),
            dir.display()
        )
    })
    .await;
    let exe = std::env::current_exe().unwrap();
    let nats_url = format!("nats://127.0.0.1:{}", nats.port);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .args([
                "--exact",
                "tls_client_certificate_child",
                "--ignored",
                "--nocapture",
            ])
            .env("SSL_CERT_FILE", &certs.ca_file)
            .env("JS_TLS_URL", nats_url)
            .env("JS_TLS_CERT", &certs.client_cert_file)
            .env("JS_TLS_KEY", &certs.client_key_file)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child test failed:\n{text}");
    assert!(text.contains("1 passed"), "the child test ran:\n{text}");
}

/// Run by [`tls_client_certificate`] (needs its environment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by tls_client_certificate with SSL_CERT_FILE set"]
async fn tls_client_certificate_child() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set by the parent"));
    let (url, cert, key) = (var("JS_TLS_URL"), var("JS_TLS_CERT"), var("JS_TLS_KEY"));
    let js = async_nats::jetstream::new(
        async_nats::ConnectOptions::new()
            .add_client_certificate(cert.clone().into(), key.clone().into())
            .connect(url.as_str())
            .await
            .unwrap(),
    );
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "tls-test".into(),
        subjects: vec!["tls.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let md = metadata_with_group(
        "unused",
        &[
            ("natsURL", &url),
            ("tls_client_cert", &cert),
            ("tls_client_key", &key),
        ],
    );
    let c = daprd_components::jetstream::JetStreamFactory
        .connect("pubsub", &md)
        .await
        .expect("connect with the client certificate");
    c.publish(daprd_testkit::conformance::publish_request("tls.a", b"{}"))
        .await
        .expect("publish over TLS");
    let info = js
        .get_stream("tls-test")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(info.state.messages, 1);
    // Without the certificate the server refuses the connection: the component (which keeps
    // retrying in the background, as for a broker that is down) cannot publish.
    let without = metadata_with_group("unused", &[("natsURL", &url)]);
    let refused = match daprd_components::jetstream::JetStreamFactory
        .connect("pubsub", &without)
        .await
    {
        Err(_) => true,
        Ok(c) => c
            .publish(daprd_testkit::conformance::publish_request("tls.b", b"{}"))
            .await
            .is_err(),
    };
    assert!(refused, "the server requires a client certificate");
    let info = js
        .get_stream("tls-test")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(
        info.state.messages, 1,
        "nothing got in without a certificate"
    );
}

/// A NATS JWT (`ed25519-nkey`), signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "jti": random_name("jti"), "iat": iat, "iss": issuer.public_key(), "name": name,
        "sub": subject, "nats": nats,
    });
    let body = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let sig = issuer.sign(body.as_bytes()).unwrap();
    format!("{body}.{}", b64(&sig))
}

/// `jwt` + `seedKey` against a private nats-server in operator mode (operator, account and
/// user JWTs made here): the component signs the server's nonce with the seed and publishes
/// to a stream; without credentials the server refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_and_seed_key_authenticate() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "op",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "acct",
        serde_json::json!({"type": "account", "version": 2, "limits": {
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}}),
    );
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        "user",
        serde_json::json!({"type": "user", "version": 2, "pub": {}, "sub": {},
                           "subs": -1, "data": -1, "payload": -1}),
    );
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = nats_jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2}),
    );
    let (account_pub, system_pub) = (account.public_key(), system.public_key());
    let nats = PrivateNats::start(move |port, dir| {
        format!(
            "listen: 127.0.0.1:{port}\noperator: {operator_jwt}\nsystem_account: {system_pub}\nresolver: MEMORY\nresolver_preload: {{ {account_pub}: {account_jwt}, {system_pub}: {system_jwt} }}\njetstream {{ store_dir: \"{}\" }}\n",
            dir.display()
        )
    })
    .await;
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let seed = user.seed().unwrap();
    let signer = std::sync::Arc::new(nkeys::KeyPair::from_seed(&seed).unwrap());
    let js = async_nats::jetstream::new(
        async_nats::ConnectOptions::new()
            .jwt(user_jwt.clone(), move |nonce| {
                let signer = signer.clone();
                async move { signer.sign(&nonce).map_err(async_nats::AuthError::new) }
            })
            .connect(url.as_str())
            .await
            .unwrap(),
    );
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "jwt-test".into(),
        subjects: vec!["jwt.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let request = |topic: &str| daprd_testkit::conformance::publish_request(topic, b"{}");
    let md = metadata_with_group(
        "unused",
        &[("natsURL", &url), ("jwt", &user_jwt), ("seedKey", &seed)],
    );
    let c = daprd_components::jetstream::JetStreamFactory
        .connect("pubsub", &md)
        .await
        .unwrap();
    c.publish(request("jwt.a"))
        .await
        .expect("publish as the JWT user");
    let stored = js
        .get_stream("jwt-test")
        .await
        .unwrap()
        .cached_info()
        .state
        .messages;
    assert_eq!(stored, 1);
    let anonymous = metadata_with_group("unused", &[("natsURL", &url)]);
    let refused = match daprd_components::jetstream::JetStreamFactory
        .connect("pubsub", &anonymous)
        .await
    {
        Err(_) => true,
        Ok(c) => c.publish(request("jwt.b")).await.is_err(),
    };
    assert!(
        refused,
        "an operator-mode server refuses a client without credentials"
    );
}

/// As in Dapr, a server that cannot be reached fails component init with an error naming it
/// (later outages are reconnected: `broker_restarts.rs`).
#[tokio::test]
async fn an_unreachable_server_fails_component_init() {
    let url = format!("nats://127.0.0.1:{}", daprd_testkit::free_port());
    let md = metadata_with_group("unused", &[("natsURL", &url)]);
    let err = match daprd_components::jetstream::JetStreamFactory
        .connect("pubsub", &md)
        .await
    {
        Ok(_) => panic!("connected to nothing at {url}"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&url), "{err}");
}
