//! Broker restarts for MQTT, JetStream, RabbitMQ and Kafka: a private broker process (own port, own data
//! directory) is stopped and started again; the component reconnects by itself, a publish
//! during the outage fails, and deliveries resume.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use daprd_core::pubsub::{Message, PubSub, PublishRequest, SubscribeRequest};
use daprd_testkit::{eventually, free_port, ScratchDir};
use tokio::sync::mpsc;

struct Broker {
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    /// When the command forks the real server (RabbitMQ), it is killed by its listening port.
    kill_port: Option<u16>,
    child: Option<Child>,
}

impl Broker {
    fn start(cmd: Vec<String>) -> Self {
        Self::start_with(cmd, Vec::new(), None)
    }

    fn start_with(cmd: Vec<String>, env: Vec<(String, String)>, kill_port: Option<u16>) -> Self {
        let mut b = Self {
            cmd,
            env,
            kill_port,
            child: None,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        self.child = Some(
            Command::new(&self.cmd[0])
                .args(&self.cmd[1..])
                .envs(self.env.iter().cloned())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("broker runs"),
        );
    }

    fn stop(&mut self) {
        if let Some(port) = self.kill_port {
            let _ = Command::new("fuser")
                .args(["-s", "-k", "-9", &format!("{port}/tcp")])
                .status();
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn port_open(port: u16) {
    daprd_testkit::listening(port, Duration::from_secs(60)).await;
}

use daprd_testkit::conformance::success_collector as collector;

/// Runs a test's scenario on a runtime of its own and bounds it: a scenario still running after
/// `limit` fails the test, naming the limit, instead of hanging the suite; and a component's
/// blocking close still running afterwards (a client library waiting on a broker that is gone)
/// is left after 10 s rather than waited for, as a runtime dropped the usual way would.
fn bounded(limit: Duration, scenario: impl std::future::Future<Output = ()>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async { tokio::time::timeout(limit, scenario).await })
    }));
    rt.shutdown_timeout(Duration::from_secs(10));
    match outcome {
        Err(panic) => std::panic::resume_unwind(panic),
        Ok(finished) => assert!(
            finished.is_ok(),
            "the scenario did not finish within {limit:?}"
        ),
    }
}

fn req(topic: &str, n: u32) -> PublishRequest {
    PublishRequest {
        pubsub_name: "p".into(),
        topic: topic.into(),
        data: Bytes::from(n.to_string()),
        metadata: BTreeMap::new(),
        content_type: None,
    }
}

/// Publishes `n` until a delivery carrying `n` arrives, or panics after `timeout`.
async fn publish_until_delivered(
    c: &Arc<dyn PubSub>,
    rx: &mut mpsc::UnboundedReceiver<Message>,
    topic: &str,
    n: u32,
    timeout: Duration,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let want = n.to_string();
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        if c.publish(req(topic, n)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            if m.data[..] == *want.as_bytes() {
                return;
            }
        }
    }
}

async fn restart_scenario(c: Arc<dyn PubSub>, topic: &str, broker: &mut Broker, port: u16) {
    restart_scenario_within(c, topic, broker, port, Duration::from_secs(30)).await;
}

/// [`restart_scenario`] with `resume` for deliveries to come back after the restart.
async fn restart_scenario_within(
    c: Arc<dyn PubSub>,
    topic: &str,
    broker: &mut Broker,
    port: u16,
    resume: Duration,
) {
    let (h, mut rx) = collector();
    let _sub = c.subscribe(SubscribeRequest::new(topic), h).await.unwrap();
    publish_until_delivered(
        &c,
        &mut rx,
        topic,
        1,
        Duration::from_secs(10),
        "the first delivery",
    )
    .await;
    eprintln!("restart scenario ({topic}): first delivery seen; stopping the broker");
    broker.stop();
    let outage = c.clone();
    let topic_owned = topic.to_string();
    eventually(
        Duration::from_secs(10),
        "a publish during the outage to fail",
        move || {
            let c = outage.clone();
            let t = topic_owned.clone();
            async move { c.publish(req(&t, 2)).await.err().map(|_| ()) }
        },
    )
    .await;
    eprintln!("restart scenario ({topic}): a publish failed during the outage; restarting");
    broker.spawn();
    port_open(port).await;
    eprintln!("restart scenario ({topic}): the broker listens again");
    publish_until_delivered(&c, &mut rx, topic, 3, resume, "deliveries to resume").await;
    eprintln!("restart scenario ({topic}): deliveries resumed");
}

#[cfg(feature = "mqtt3")]
#[test]
fn mqtt_reconnects_after_a_broker_restart() {
    bounded(Duration::from_secs(120), async {
        use daprd_core::pubsub::PubSubFactory;
        let port = free_port();
        let mut broker = Broker::start(vec!["mosquitto".into(), "-p".into(), port.to_string()]);
        port_open(port).await;
        let md = daprd_testkit::conformance::metadata_with_group(
            &daprd_testkit::conformance::random_name("c"),
            &[("url", &format!("tcp://127.0.0.1:{port}"))],
        );
        let c = daprd_components::mqtt3::MqttFactory
            .connect("p", &md)
            .await
            .unwrap();
        restart_scenario(c, "restart/topic", &mut broker, port).await;
    });
}

#[cfg(feature = "jetstream")]
#[test]
fn jetstream_reconnects_after_a_broker_restart() {
    bounded(Duration::from_secs(120), async {
        use daprd_core::pubsub::PubSubFactory;
        let port = free_port();
        let dir = ScratchDir::new("nats");
        let mut broker = Broker::start(vec![
            "nats-server".into(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-js".into(),
            "-sd".into(),
            dir.path().to_string_lossy().into_owned(),
        ]);
        port_open(port).await;
        let url = format!("nats://127.0.0.1:{port}");
        let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "restart".into(),
            subjects: vec!["restart.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let md = daprd_testkit::conformance::metadata_with_group(
            "unused",
            &[("natsURL", &url), ("durableName", "restart-app")],
        );
        let c = daprd_components::jetstream::JetStreamFactory
            .connect("p", &md)
            .await
            .unwrap();
        restart_scenario(c, "restart.topic", &mut broker, port).await;
    });
}

/// A private RabbitMQ node (own ports, data and log dirs) with `extra_config` in its
/// rabbitmq.conf; killed by its plain AMQP port. Returns it and that port.
#[cfg(feature = "rabbitmq")]
async fn private_rabbitmq(
    dir: &ScratchDir,
    extra_config: &str,
    wait_port: Option<u16>,
) -> (Broker, u16) {
    let port = free_port();
    let node = format!("daprdrs{port}@localhost");
    let base = dir.path().to_string_lossy().into_owned();
    dir.write("rabbitmq.conf", extra_config);
    let env = vec![
        ("RABBITMQ_NODE_PORT".to_string(), port.to_string()),
        ("RABBITMQ_NODENAME".to_string(), node.clone()),
        ("RABBITMQ_DIST_PORT".to_string(), free_port().to_string()),
        ("RABBITMQ_MNESIA_BASE".to_string(), format!("{base}/mnesia")),
        ("RABBITMQ_LOG_BASE".to_string(), format!("{base}/log")),
        (
            "RABBITMQ_ENABLED_PLUGINS_FILE".to_string(),
            format!("{base}/plugins"),
        ),
        (
            "RABBITMQ_CONFIG_FILE".to_string(),
            format!("{base}/rabbitmq"),
        ),
    ];
    let server = if std::path::Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").exists() {
        "/usr/lib/rabbitmq/bin/rabbitmq-server".to_string()
    } else {
        "rabbitmq-server".to_string()
    };
    let broker = Broker::start_with(vec![server], env, Some(port));
    let wait = wait_port.unwrap_or(port);
    daprd_testkit::listening(wait, Duration::from_secs(60)).await;
    (broker, port)
}

#[cfg(feature = "rabbitmq")]
#[test]
fn rabbitmq_reconnects_after_a_broker_restart() {
    bounded(Duration::from_secs(240), async {
        use daprd_core::pubsub::PubSubFactory;
        let dir = ScratchDir::new("rabbitmq");
        let (mut broker, port) = private_rabbitmq(&dir, "", None).await;
        let md = daprd_testkit::conformance::metadata_with_group(
            &daprd_testkit::conformance::random_name("c"),
            &[
                (
                    "connectionString",
                    &format!("amqp://guest:guest@127.0.0.1:{port}"),
                ),
                ("reconnectWaitSeconds", "1"),
            ],
        );
        let c = daprd_components::rabbitmq::RabbitFactory
            .connect("p", &md)
            .await
            .unwrap();
        restart_scenario(c, "restart-topic", &mut broker, port).await;
    });
}

/// `amqps://` with `caCert`/`clientCert`/`clientKey` against a private node whose TLS
/// listener requires client certificates: publish and delivery work, with a password and
/// with `saslExternal` (the user is the certificate's common name); without the client
/// certificate the connection is refused.
#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_amqps_with_client_certificates() {
    use daprd_core::pubsub::PubSubFactory;
    let certs = daprd_testkit::certs::TestCerts::generate();
    let tls_port = free_port();
    let dir = ScratchDir::new("rabbitmq-tls");
    dir.write("plugins", "[rabbitmq_auth_mechanism_ssl].\n");
    let config = format!(
        "default_user = daprd-rs-test-client\ndefault_pass = secret\nauth_mechanisms.1 = PLAIN\nauth_mechanisms.2 = EXTERNAL\nssl_cert_login_from = common_name\nlisteners.ssl.default = {tls_port}\nssl_options.cacertfile = {}\nssl_options.certfile = {}\nssl_options.keyfile = {}\nssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n",
        certs.ca_file.display(),
        certs.server_cert_file.display(),
        certs.server_key_file.display()
    );
    let (_broker, _) = private_rabbitmq(&dir, &config, Some(tls_port)).await;
    let uri = format!("amqps://daprd-rs-test-client:secret@localhost:{tls_port}");
    let external_uri = format!("amqps://localhost:{tls_port}");
    let connect = |with_client: bool| {
        let mut pairs: Vec<(&str, &str)> = vec![
            ("connectionString", uri.as_str()),
            ("caCert", certs.ca_pem.as_str()),
        ];
        if with_client {
            pairs.push(("clientCert", certs.client_cert_pem.as_str()));
            pairs.push(("clientKey", certs.client_key_pem.as_str()));
        }
        let md = daprd_testkit::conformance::metadata_with_group(
            &daprd_testkit::conformance::random_name("tls"),
            &pairs,
        );
        async move {
            daprd_components::rabbitmq::RabbitFactory
                .connect("p", &md)
                .await
        }
    };
    let c = connect(true)
        .await
        .expect("amqps with a client certificate");
    let _ = daprd_testkit::conformance::round_trip(&c, "tls-topic", b"over amqps").await;
    c.close().await.unwrap();
    assert!(
        connect(false).await.is_err(),
        "the node requires a client certificate"
    );

    // SASL EXTERNAL: no password in the URI, the certificate names the user.
    let md = daprd_testkit::conformance::metadata_with_group(
        &daprd_testkit::conformance::random_name("ext"),
        &[
            ("connectionString", external_uri.as_str()),
            ("caCert", certs.ca_pem.as_str()),
            ("clientCert", certs.client_cert_pem.as_str()),
            ("clientKey", certs.client_key_pem.as_str()),
            ("saslExternal", "true"),
            ("publisherConfirm", "true"),
        ],
    );
    let c = daprd_components::rabbitmq::RabbitFactory
        .connect("p", &md)
        .await
        .expect("SASL EXTERNAL with the client certificate");
    c.publish(daprd_testkit::conformance::publish_request(
        "tls-topic",
        b"{}",
    ))
    .await
    .expect("publish as the certificate's user");
    c.close().await.unwrap();
    let md = daprd_testkit::conformance::metadata_with_group(
        "no-ext",
        &[
            ("connectionString", external_uri.as_str()),
            ("caCert", certs.ca_pem.as_str()),
            ("clientCert", certs.client_cert_pem.as_str()),
            ("clientKey", certs.client_key_pem.as_str()),
        ],
    );
    assert!(
        daprd_components::rabbitmq::RabbitFactory
            .connect("p", &md)
            .await
            .is_err(),
        "without saslExternal and without a password the login fails"
    );
}

#[cfg(feature = "kafka")]
#[test]
fn kafka_recovers_after_a_broker_restart() {
    bounded(Duration::from_secs(240), async {
        use daprd_core::pubsub::PubSubFactory;
        // tansu with in-memory storage: the restarted broker has lost its topics and groups, the
        // harder case. The component creates the topic again (autoCreateTopics) and its consumer
        // rejoins the group by itself.
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let mut broker = Broker::start(vec![
            "tansu".into(),
            "broker".into(),
            "--listener-url".into(),
            url.clone(),
            "--advertised-listener-url".into(),
            url,
            "--storage-engine".into(),
            "memory://tansu/".into(),
        ]);
        port_open(port).await;
        let md = daprd_testkit::conformance::metadata_with_group(
            &daprd_testkit::conformance::random_name("restart"),
            &[
                ("brokers", &format!("127.0.0.1:{port}")),
                ("authType", "none"),
                ("initialOffset", "oldest"),
                ("autoCreateTopics", "true"),
                ("clientConnectionTopicMetadataRefreshInterval", "1s"),
            ],
        );
        let c = daprd_components::kafka::KafkaFactory
            .connect("p", &md)
            .await
            .unwrap();
        // A group coordinator that lost its state: the consumer rejoins after its session
        // times out and librdkafka's reconnect back-off, which takes longer than a reconnect.
        restart_scenario_within(
            c,
            "restart-topic",
            &mut broker,
            port,
            Duration::from_secs(60),
        )
        .await;
    });
}
