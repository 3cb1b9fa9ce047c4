//! `pubsub.kafka` authentication against private tansu brokers.
//!
//! TLS: tansu 0.6 has no working TLS listener, so tansu is put behind `socat` terminating TLS
//! (the certificate authority, server and client certificates come from `openssl`); tansu
//! advertises the TLS port, so every connection librdkafka makes goes through it.
//! `authType: mtls` (client certificate required) and `certificate` (server verified with
//! `caCert`) work; a missing client certificate, an unknown CA and plaintext are refused.
//!
//! SASL (`authType: password`): tansu 0.6 offers SCRAM-SHA-256 and SCRAM-SHA-512 (its SASL
//! library is built without PLAIN), with the users kept in its storage. A broker that requires
//! authentication takes no user administration before a login, so the users are created on an
//! open broker over a SQLite file and the broker is restarted on that file with
//! `--authentication`.

#![cfg(feature = "kafka")]
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use daprd_components::kafka::KafkaFactory;
use daprd_core::metadata::Metadata;
use daprd_core::pubsub::PubSubFactory;
use daprd_testkit::certs::TestCerts;
use daprd_testkit::conformance::{metadata_with_group, random_name, round_trip};
use daprd_testkit::{free_port, ScratchDir};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &str, args: &[String]) -> Killed {
    spawn_in(Path::new("."), cmd, args)
}

fn spawn_in(dir: &Path, cmd: &str, args: &[String]) -> Killed {
    Killed(
        Command::new(cmd)
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd} runs: {e}")),
    )
}

async fn listening(port: u16) {
    daprd_testkit::listening(port, Duration::from_secs(20)).await;
}

/// tansu listening on `listen` and advertising `advertise`, storing in `storage`, run from
/// `dir` (a SQLite storage URL is relative to it).
fn tansu(dir: &Path, listen: u16, advertise: u16, storage: &str, authentication: bool) -> Killed {
    let mut args = vec![
        "broker".into(),
        "--listener-url".into(),
        format!("tcp://127.0.0.1:{listen}"),
        "--advertised-listener-url".into(),
        format!("tcp://127.0.0.1:{advertise}"),
        "--storage-engine".into(),
        storage.into(),
    ];
    if authentication {
        args.push("--authentication".into());
    }
    spawn_in(dir, "tansu", &args)
}

/// socat terminating TLS on `tls` and forwarding to `plain` (`verify`: client certificates
/// required).
fn socat_tls(certs: &TestCerts, verify: bool, tls: u16, plain: u16) -> Killed {
    let file = |p: &Path| p.to_string_lossy().into_owned();
    spawn(
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
    )
}

/// tansu on a plain port advertising `tls_port`, and socat terminating TLS on `tls_port`
/// (`verify`: client certificates required).
async fn tls_broker(certs: &TestCerts, verify: bool) -> (u16, Vec<Killed>) {
    let (plain, tls) = (free_port(), free_port());
    let broker = tansu(Path::new("."), plain, tls, "memory://tansu/", false);
    listening(plain).await;
    let socat = socat_tls(certs, verify, tls, plain);
    listening(tls).await;
    (tls, vec![socat, broker])
}

/// tansu keeps its SCRAM users in this SQLite file, relative to the broker's directory.
const SQLITE: &str = "sqlite://tansu.db";

/// Creates SCRAM users `(name, password, scram256|scram512)` with `tansu user create` on an
/// open broker over `dir`'s SQLite file; that broker is stopped before this returns, so a
/// broker started on the file with `--authentication` knows the users.
async fn scram_users(dir: &Path, users: &[(&str, &str, &str)]) {
    let port = free_port();
    let _open = tansu(dir, port, port, SQLITE, false);
    listening(port).await;
    for (name, password, mechanism) in users {
        let out = Command::new("tansu")
            .args(["user", "create", "--broker"])
            .arg(format!("tcp://127.0.0.1:{port}"))
            .args([name, password, "--mechanism", mechanism])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tansu user create {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// SASL metadata for `user` / `password` with Dapr's `saslMechanism` spelling.
fn sasl<'a>(user: &'a str, password: &'a str, mechanism: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("authType", "password"),
        ("saslUsername", user),
        ("saslPassword", password),
        ("saslMechanism", mechanism),
    ]
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_round_trips_and_refusals() {
    let dir = ScratchDir::new("kafka-sasl");
    scram_users(
        dir.path(),
        &[
            ("alice", "wonder land", "scram256"),
            ("bob", "the builder", "scram512"),
        ],
    )
    .await;
    let port = free_port();
    let _broker = tansu(dir.path(), port, port, SQLITE, true);
    listening(port).await;
    let plaintext = [("disableTls", "true")];

    for (user, password, mechanism) in [
        ("alice", "wonder land", "SHA-256"),
        ("bob", "the builder", "SHA-512"),
    ] {
        let mut pairs = sasl(user, password, mechanism);
        pairs.extend_from_slice(&plaintext);
        let c = KafkaFactory
            .connect("kafka", &metadata(port, &pairs))
            .await
            .unwrap_or_else(|e| panic!("{user} logs in with SCRAM-{mechanism}: {e}"));
        let (_sub, _rx) = round_trip(&c, &random_name("sasl"), b"over sasl").await;
        c.close().await.unwrap();
    }

    // a wrong password, an unknown user, a user's password under the other mechanism: the
    // component fails to start at once with librdkafka's reason; with no login at all the
    // broker closes the connection, and the start fails after the brokers' time-out
    let address = format!("127.0.0.1:{port}");
    for (what, pairs, says) in [
        (
            "a wrong password",
            sasl("alice", "wonderland", "SHA-256"),
            "SASL authentication error",
        ),
        (
            "an unknown user",
            sasl("carol", "wonder land", "SHA-256"),
            "SASL authentication error",
        ),
        (
            "another mechanism",
            sasl("alice", "wonder land", "SHA-512"),
            "SASL authentication error",
        ),
        (
            "no authentication",
            vec![("authType", "none")],
            "no broker of",
        ),
    ] {
        let mut pairs = pairs;
        pairs.extend_from_slice(&plaintext);
        let err = match KafkaFactory.connect("kafka", &metadata(port, &pairs)).await {
            Ok(_) => panic!("{what} is refused"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(&address) && err.contains(says),
            "{what}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_over_tls_verifies_the_server_and_logs_in() {
    let certs = TestCerts::generate();
    let dir = ScratchDir::new("kafka-sasl-tls");
    scram_users(dir.path(), &[("dave", "s3cret", "scram512")]).await;
    let (plain, tls) = (free_port(), free_port());
    let _broker = tansu(dir.path(), plain, tls, SQLITE, true);
    listening(plain).await;
    let _socat = socat_tls(&certs, false, tls, plain);
    listening(tls).await;

    // authType password is SASL over TLS unless disableTls
    let mut pairs = sasl("dave", "s3cret", "SHA-512");
    pairs.push(("caCert", &certs.ca_pem));
    let c = KafkaFactory
        .connect("kafka", &metadata(tls, &pairs))
        .await
        .unwrap();
    let (_sub, _rx) = round_trip(&c, &random_name("sasl-tls"), b"sasl over tls").await;
    c.close().await.unwrap();
    // the same login in plaintext against the TLS port is refused
    let mut pairs = sasl("dave", "s3cret", "SHA-512");
    pairs.push(("disableTls", "true"));
    assert!(KafkaFactory
        .connect("kafka", &metadata(tls, &pairs))
        .await
        .is_err());
}
