//! `pubsub.redis` against real Redis: the bytes and names on the broker (read and written
//! with `redis-cli`, an independent client), and broker restarts (a private `redis-server`
//! on its own port and data directory, started by the test).

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use daprd_core::pubsub::{
    BulkEntry, BulkPublishRequest, PubSub, PubSubFactory, PublishRequest, SubscribeRequest,
};
use daprd_testkit::conformance::{metadata_with_group, publish_request, random_name, round_trip};
use daprd_testkit::{eventually, free_port, ScratchDir};

fn host() -> String {
    daprd_testkit::broker_address("REDIS_HOST", "localhost:6379", "Redis")
}

fn cli(host: &str, args: &[&str]) -> String {
    let (h, p) = host.rsplit_once(':').unwrap();
    let out = Command::new("redis-cli")
        .args(["-h", h, "-p", p])
        .args(args)
        .output()
        .expect("redis-cli runs");
    assert!(
        out.status.success(),
        "redis-cli {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn connect(host: &str, group: &str) -> Arc<dyn PubSub> {
    let md = metadata_with_group(
        group,
        &[
            ("redisHost", host),
            ("processingTimeout", "500"),
            ("redeliverInterval", "200"),
            ("readTimeout", "1s"),
        ],
    );
    daprd_components::redis::RedisFactory
        .connect("pubsub", &md)
        .await
        .unwrap()
}

use daprd_testkit::conformance::success_collector as collector;

#[tokio::test]
async fn publish_writes_the_same_stream_entry_as_dapr() {
    let topic = random_name("bytes");
    let c = connect(&host(), "bytes-app").await;
    let md: BTreeMap<String, String> = [("ttlInSeconds".to_string(), "10".to_string())]
        .into_iter()
        .collect();
    c.publish(PublishRequest {
        pubsub_name: "pubsub".into(),
        topic: topic.clone(),
        data: Bytes::from_static(b"{\"a\":1}"),
        metadata: md,
        content_type: None,
    })
    .await
    .unwrap();
    let range = cli(&host(), &["XRANGE", &topic, "-", "+"]);
    let lines: Vec<&str> = range.lines().collect();
    // id, then field/value pairs in order: data, metadata
    assert_eq!(
        &lines[1..],
        ["data", "{\"a\":1}", "metadata", "{\"ttlInSeconds\":\"10\"}"],
        "{range}"
    );
}

#[tokio::test]
async fn bulk_publish_pipelines_one_xadd_per_entry_and_reports_failed_entries() {
    let topic = random_name("bulk-bytes");
    let c = connect(&host(), "bulk-app").await;
    let entry = |id: &str, data: &'static [u8], md: &[(&str, &str)]| BulkEntry {
        entry_id: id.into(),
        data: Bytes::from_static(data),
        content_type: "application/json".into(),
        metadata: md
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let request = |topic: &str| BulkPublishRequest {
        pubsub_name: "pubsub".into(),
        topic: topic.into(),
        entries: vec![
            entry("a", b"{\"n\":1}", &[("k", "v")]),
            entry("b", b"{\"n\":2}", &[]),
        ],
        metadata: BTreeMap::new(),
    };
    let failed = c.bulk_publish(request(&topic)).await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    // each entry is the stream entry a single publish writes, in entry order
    let range = cli(&host(), &["XRANGE", &topic, "-", "+"]);
    let fields: Vec<&str> = range
        .lines()
        .filter(|l| !l.chars().all(|c| c.is_ascii_digit() || c == '-')) // entry ids
        .collect();
    assert_eq!(
        fields,
        [
            "data",
            "{\"n\":1}",
            "metadata",
            "{\"k\":\"v\"}",
            "data",
            "{\"n\":2}",
            "metadata",
            "{}"
        ],
        "{range}"
    );
    // A key of the wrong type makes every XADD fail: each entry comes back failed, by id.
    let wrong = random_name("bulk-wrongtype");
    cli(&host(), &["SET", &wrong, "not a stream"]);
    let failed = c.bulk_publish(request(&wrong)).await.unwrap();
    let ids: Vec<&str> = failed.iter().map(|f| f.entry_id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert!(failed[0].error.contains("WRONGTYPE"), "{failed:?}");
    cli(&host(), &["DEL", &wrong]);
}

#[tokio::test]
async fn subscribe_uses_consumer_id_as_group_and_reads_go_daprd_entries() {
    let topic = random_name("group");
    let c = connect(&host(), "checkout").await;
    let (h, mut rx) = collector();
    let _sub = c
        .subscribe(SubscribeRequest::new(topic.clone()), h)
        .await
        .unwrap();
    let groups = cli(&host(), &["XINFO", "GROUPS", &topic]);
    assert!(
        groups
            .lines()
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w == ["name", "checkout"]),
        "{groups}"
    );
    // an entry as Go daprd writes it
    cli(
        &host(),
        &[
            "XADD",
            &topic,
            "*",
            "data",
            "hello from go",
            "metadata",
            "{\"k\":\"v\"}",
        ],
    );
    let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.data[..], b"hello from go");
    assert_eq!(m.metadata.get("k").map(String::as_str), Some("v"));
    assert_eq!(m.topic, topic);
    eventually(Duration::from_secs(5), "the entry to be acked", || async {
        let pending = cli(&host(), &["XPENDING", &topic, "checkout"]);
        pending
            .lines()
            .next()
            .is_some_and(|l| l == "0")
            .then_some(())
    })
    .await;
}

struct PrivateRedis {
    port: u16,
    dir: ScratchDir,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start(port: u16, dir: ScratchDir) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        Self {
            port,
            dir,
            child: Some(child),
        }
    }

    async fn ready(&self) {
        let host = format!("127.0.0.1:{}", self.port);
        eventually(Duration::from_secs(10), "private redis to answer", || {
            let host = host.clone();
            async move {
                let (h, p) = host.rsplit_once(':').unwrap();
                let out = Command::new("redis-cli")
                    .args(["-h", h, "-p", p, "PING"])
                    .output()
                    .ok()?;
                (String::from_utf8_lossy(&out.stdout).trim() == "PONG").then_some(())
            }
        })
        .await;
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_broker_restart_without_losing_acknowledged_publishes() {
    let port = free_port();
    let mut redis = PrivateRedis::start(port, ScratchDir::new("redis-restart"));
    redis.ready().await;
    let host = format!("127.0.0.1:{port}");
    let topic = random_name("restart");
    let c = connect(&host, "restart-app").await;
    let (h, mut rx) = collector();
    let _sub = c
        .subscribe(SubscribeRequest::new(topic.clone()), h)
        .await
        .unwrap();
    let publish = |n: u32| {
        let c = c.clone();
        let topic = topic.clone();
        async move {
            c.publish(PublishRequest {
                pubsub_name: "pubsub".into(),
                topic,
                data: Bytes::from(n.to_string()),
                metadata: BTreeMap::new(),
                content_type: None,
            })
            .await
        }
    };
    publish(1).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&first.data[..], b"1");

    redis.stop();
    assert!(
        publish(2).await.is_err(),
        "a publish during the outage is an error, never a false success"
    );

    let dir = std::mem::replace(&mut redis.dir, ScratchDir::new("unused"));
    let redis = PrivateRedis::start(port, dir);
    redis.ready().await;
    // the component reconnects by itself
    let ok = eventually(Duration::from_secs(20), "publishing to work again", || {
        let p = publish(3);
        async move { p.await.ok() }
    })
    .await;
    let () = ok;
    let mut seen = Vec::new();
    while !seen.contains(&"3".to_string()) {
        let m = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("deliveries resume")
            .unwrap();
        seen.push(String::from_utf8_lossy(&m.data).into_owned());
    }
    assert!(
        !seen.contains(&"2".to_string()),
        "the failed publish was not silently stored"
    );
}

/// A handler slower than `processingTimeout` is not given its own message a second time,
/// nor is the message taken by another sidecar of the same consumer group while it runs
/// (Go daprd redelivers it concurrently: components-contrib#4599).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_is_not_given_its_message_again() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let topic = random_name("slow");
    let group = random_name("slow-app");
    // processingTimeout 500 ms, reclaim every 200 ms (connect's settings).
    let (a, b) = (
        connect(&host(), &group).await,
        connect(&host(), &group).await,
    );
    let deliveries = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let slow = || -> daprd_core::pubsub::Handler {
        let (deliveries, done) = (deliveries.clone(), done.clone());
        Arc::new(move |_m| {
            deliveries.fetch_add(1, Ordering::SeqCst);
            let done = done.clone();
            Box::pin(async move {
                // Three times processingTimeout.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                done.fetch_add(1, Ordering::SeqCst);
                daprd_core::pubsub::Outcome::Success
            })
        })
    };
    let _sa = a
        .subscribe(SubscribeRequest::new(topic.clone()), slow())
        .await
        .unwrap();
    let _sb = b
        .subscribe(SubscribeRequest::new(topic.clone()), slow())
        .await
        .unwrap();
    a.publish(publish_request(&topic, b"slow")).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the slow handler to finish",
        || async { (done.load(Ordering::SeqCst) >= 1).then_some(()) },
    )
    .await;
    // Two more reclaim rounds past processingTimeout: nothing may come again.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        deliveries.load(Ordering::SeqCst),
        1,
        "the message was delivered again while (or after) its handler ran"
    );
    let pending = cli(&host(), &["XPENDING", &topic, &group]);
    assert!(pending.starts_with('0'), "acked: {pending}");
}

/// A subscription that is gone (stopped with its handler still holding a message) no longer
/// keeps the message fresh: another member of the group takes it after `processingTimeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_holder_is_gone_is_taken_over() {
    let topic = random_name("gone");
    let group = random_name("gone-app");
    let (a, b) = (
        connect(&host(), &group).await,
        connect(&host(), &group).await,
    );
    let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    let hang: daprd_core::pubsub::Handler = Arc::new(move |_m| {
        let _ = got_tx.send(());
        Box::pin(std::future::pending())
    });
    let sa = a
        .subscribe(SubscribeRequest::new(topic.clone()), hang)
        .await
        .unwrap();
    a.publish(publish_request(&topic, b"held")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), got.recv())
        .await
        .expect("the first holder gets the message");
    drop(sa);
    a.close().await.unwrap();
    let (h, mut rx) = collector();
    let _sb = b
        .subscribe(SubscribeRequest::new(topic.clone()), h)
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("another member takes the message over")
        .unwrap();
    assert_eq!(&m.data[..], b"held");
}

/// After a 5 s outage, during which every publish fails, publishing works again within
/// 1 s of the broker's return (the shared connection's reconnect pauses have a ceiling).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_resumes_within_a_second_of_the_broker_returning() {
    let port = free_port();
    let mut redis = PrivateRedis::start(port, ScratchDir::new("redis-recover"));
    redis.ready().await;
    let c = connect(&format!("127.0.0.1:{port}"), "recover-app").await;
    let topic = random_name("recover");
    let publish = || {
        c.publish(PublishRequest {
            pubsub_name: "pubsub".into(),
            topic: topic.clone(),
            data: Bytes::from_static(b"x"),
            metadata: BTreeMap::new(),
            content_type: None,
        })
    };
    publish().await.unwrap();
    redis.stop();
    let down = std::time::Instant::now();
    let mut failures = 0;
    while down.elapsed() < Duration::from_secs(5) {
        assert!(
            publish().await.is_err(),
            "no publish succeeds while the broker is down"
        );
        failures += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(failures > 0);
    let dir = std::mem::replace(&mut redis.dir, ScratchDir::new("unused"));
    let redis = PrivateRedis::start(port, dir);
    redis.ready().await;
    let back = std::time::Instant::now();
    eventually(
        Duration::from_secs(10),
        "publishing to work again",
        || async { publish().await.ok() },
    )
    .await;
    let took = back.elapsed();
    assert!(
        took <= Duration::from_secs(1),
        "publishing resumed {took:?} after the broker answered again (want ≤ 1 s)"
    );
    drop(redis);
}

/// `enableTLS`: a private `redis-server` with only a TLS port that requires client
/// certificates. With `insecureSkipTLSVerify` and `clientCert`/`clientKey` the component
/// publishes and receives; without the client certificate, or verifying a server certificate
/// the system roots do not trust, it refuses to connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_tls_with_client_certificates() {
    let certs = daprd_testkit::certs::TestCerts::generate();
    let port = free_port();
    let dir = ScratchDir::new("redis-tls");
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--tls-port",
        ])
        .arg(port.to_string())
        .arg("--tls-cert-file")
        .arg(&certs.server_cert_file)
        .arg("--tls-key-file")
        .arg(&certs.server_key_file)
        .arg("--tls-ca-cert-file")
        .arg(&certs.ca_file)
        .args(["--tls-auth-clients", "yes", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server runs");
    let host = format!("127.0.0.1:{port}");
    let connect = |extra: Vec<(&'static str, String)>| {
        let host = host.clone();
        async move {
            let mut pairs: Vec<(&str, &str)> = vec![("redisHost", host.as_str())];
            pairs.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
            let md = metadata_with_group("tls-app", &pairs);
            daprd_components::redis::RedisFactory
                .connect("pubsub", &md)
                .await
        }
    };
    let full = vec![
        ("enableTLS", "true".to_string()),
        ("insecureSkipTLSVerify", "true".to_string()),
        ("clientCert", certs.client_cert_pem.clone()),
        ("clientKey", certs.client_key_pem.clone()),
        ("dialTimeout", "2s".to_string()),
    ];
    let c = eventually(Duration::from_secs(10), "the TLS redis to accept", || {
        let attempt = connect(full.clone());
        async move { attempt.await.ok() }
    })
    .await;
    let _ = round_trip(&c, &random_name("tls"), b"over tls").await;

    let no_client_cert = full[..2].iter().cloned().chain([full[4].clone()]).collect();
    assert!(
        connect(no_client_cert).await.is_err(),
        "the server requires a client certificate"
    );
    let verifying = vec![
        full[0].clone(),
        full[2].clone(),
        full[3].clone(),
        full[4].clone(),
    ];
    assert!(
        connect(verifying).await.is_err(),
        "the test CA is not a system root: verification must fail"
    );
    c.close().await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
}

/// `redisType: cluster`: three private cluster nodes (own ports and directories), joined with
/// `redis-cli --cluster create`; the component passes the conformance suite against the
/// cluster, its random topics spread over the nodes' slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_passes_the_conformance_suite() {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let dirs: Vec<ScratchDir> = (0..3).map(|_| ScratchDir::new("redis-cluster")).collect();
    let mut nodes: Vec<Child> = ports
        .iter()
        .zip(&dirs)
        .map(|(port, dir)| {
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args(["--cluster-config-file", "nodes.conf", "--dir"])
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server runs")
        })
        .collect();
    for port in &ports {
        let host = format!("127.0.0.1:{port}");
        eventually(Duration::from_secs(10), "cluster node to listen", || {
            let host = host.clone();
            async move { std::net::TcpStream::connect(host.as_str()).ok().map(|_| ()) }
        })
        .await;
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );
    for host in &addrs {
        eventually(Duration::from_secs(20), "cluster_state:ok", || {
            let host = host.clone();
            async move {
                cli(&host, &["CLUSTER", "INFO"])
                    .contains("cluster_state:ok")
                    .then_some(())
            }
        })
        .await;
    }
    let hosts = addrs.join(",");
    let connect: daprd_testkit::conformance::Connect = Arc::new(move |group| {
        let hosts = hosts.clone();
        Box::pin(async move {
            let md = metadata_with_group(
                &group,
                &[
                    ("redisHost", &hosts),
                    ("redisType", "cluster"),
                    ("processingTimeout", "500"),
                    ("redeliverInterval", "200"),
                    ("concurrency", "1"),
                ],
            );
            daprd_components::redis::RedisFactory
                .connect("conformance", &md)
                .await
                .unwrap()
        })
    });
    daprd_testkit::conformance::run(
        connect,
        daprd_testkit::conformance::Traits {
            redelivers_on_retry: true,
            competing_consumers: true,
            redelivery_wait: Duration::from_secs(5),
            ordered: true,
            native_ttl: false,
        },
    )
    .await;
    for n in &mut nodes {
        let _ = n.kill();
        let _ = n.wait();
    }
}

/// `failover: true`: a private master, its replica and a Sentinel. The component finds the
/// master through Sentinel; after the master dies and Sentinel promotes the replica, publishing
/// works again and the subscription receives from the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_moves_to_the_promoted_replica() {
    let (mport, rport, sport) = (free_port(), free_port(), free_port());
    let dirs: Vec<ScratchDir> = (0..3).map(|_| ScratchDir::new("redis-sentinel")).collect();
    let spawn = |args: Vec<String>, dir: &ScratchDir| {
        Command::new("redis-server")
            .args(args)
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs")
    };
    let base = |port: u16| {
        vec![
            "--port".to_string(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
        ]
    };
    let mut master = spawn(base(mport), &dirs[0]);
    let mut replica_args = base(rport);
    replica_args.extend([
        "--replicaof".to_string(),
        "127.0.0.1".into(),
        mport.to_string(),
    ]);
    let mut replica = spawn(replica_args, &dirs[1]);
    let conf = dirs[2].write(
        "sentinel.conf",
        &format!(
            "port {sport}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {mport} 1\nsentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n"
        ),
    );
    let mut sentinel = Command::new("redis-server")
        .arg(&conf)
        .arg("--sentinel")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server --sentinel runs");
    let try_cli = |port: u16, args: &[&str]| {
        Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    eventually(
        Duration::from_secs(20),
        "the replica to be in sync",
        || async move {
            try_cli(rport, &["INFO", "replication"])
                .contains("master_link_status:up")
                .then_some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "Sentinel to see the replica",
        || async move {
            try_cli(sport, &["SENTINEL", "replicas", "mymaster"])
                .contains(&rport.to_string())
                .then_some(())
        },
    )
    .await;

    let md = metadata_with_group(
        "sentinel-app",
        &[
            ("redisHost", &format!("127.0.0.1:{sport}")),
            ("failover", "true"),
            ("sentinelMasterName", "mymaster"),
            ("dialTimeout", "1s"),
            ("readTimeout", "1s"),
            ("writeTimeout", "1s"),
        ],
    );
    let c = daprd_components::redis::RedisFactory
        .connect("pubsub", &md)
        .await
        .expect("connect through Sentinel");
    let topic = random_name("sentinel");
    let (_sub, mut rx) = round_trip(&c, &topic, b"before").await;
    let publish = |data: &'static [u8]| {
        let (c, topic) = (c.clone(), topic.clone());
        async move { c.publish(publish_request(&topic, data)).await }
    };
    // the stream (and its consumer group) must reach the replica before the master goes
    eventually(Duration::from_secs(10), "the stream on the replica", || {
        let topic = topic.clone();
        async move { (try_cli(rport, &["XLEN", &topic]).trim() == "1").then_some(()) }
    })
    .await;

    let _ = master.kill();
    let _ = master.wait();
    eventually(
        Duration::from_secs(30),
        "Sentinel to promote the replica",
        || async move {
            try_cli(sport, &["SENTINEL", "get-master-addr-by-name", "mymaster"])
                .contains(&rport.to_string())
                .then_some(())
        },
    )
    .await;
    eventually(Duration::from_secs(30), "publishing to work again", || {
        let p = publish(b"after");
        async move { p.await.ok() }
    })
    .await;
    // "before" may come again if its XACK had not reached the replica (at least once).
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("delivery from the promoted replica")
            .unwrap();
        match &m.data[..] {
            b"after" => break,
            b"before" => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
    c.close().await.unwrap();
    for p in [&mut replica, &mut sentinel] {
        let _ = p.kill();
        let _ = p.wait();
    }
}
