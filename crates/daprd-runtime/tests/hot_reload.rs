//! Hot reload leaks nothing: 500 reloads of a Redis and a RabbitMQ component (each one a new
//! instance, its subscription moved over) leave the process's tasks, its memory, the Redis
//! server's client connections and the RabbitMQ queue's consumers where they were after the
//! first reloads (within a margin far below one per reload). The reloads are applied straight
//! through `Reloader::apply` (the file watcher's 200 ms quiet period would make this minutes
//! long; the watcher has its own tests in `tests/e2e/python/test_hot_reload.py`). Needs Redis
//! and RabbitMQ on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/sidecar.rs"]
mod sidecar;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use axum::routing::{get, post};
use daprd_runtime::config::resources::{parse_file, LoadContext, Resources};
use daprd_runtime::config::Env;
use daprd_runtime::reload::Reloader;
use daprd_runtime::store::BuildContext;

const RELOADS: usize = 500;
/// Connection pools and closing connections settle within the first reloads (measured: the
/// task count levels off after ~150); a leak of one thing per reload then shows 350 times.
const WARM_UP: usize = 150;

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// The reading once the tasks of replaced instances have ended: a retired instance's
/// connection tasks wind down for a few seconds after the reload (measured: after 500 reloads
/// back to back the count falls by ~120 a second for 5 s, then stays), so a reading taken right
/// after a burst of reloads counts them in proportion to the reload rate. Settled = the same
/// count for 3 s.
async fn settled(queue: &str) -> Reading {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut count, mut since) = (alive_tasks(), std::time::Instant::now());
    while since.elapsed() < Duration::from_secs(3) {
        assert!(
            std::time::Instant::now() < deadline,
            "the task count did not settle within 60 s (now {count})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = alive_tasks();
        if now != count {
            (count, since) = (now, std::time::Instant::now());
        }
    }
    read(queue)
}

fn resources(tag: &str, value: usize) -> Resources {
    let docs = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: redis}}\nspec:\n  type: pubsub.redis\n  version: v1\n  metadata: [{{name: redisHost, value: 'localhost:6379'}}, {{name: redisDB, value: '8'}}, {{name: consumerID, value: '{tag}'}}, {{name: concurrency, value: '{}'}}]\n---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: rabbit}}\nspec:\n  type: pubsub.rabbitmq\n  version: v1\n  metadata: [{{name: connectionString, value: 'amqp://guest:guest@localhost:5672'}}, {{name: consumerID, value: '{tag}'}}, {{name: prefetchCount, value: '{}'}}]\n---\napiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {{name: s1}}\nspec: {{pubsubname: redis, topic: 'leak-{tag}', routes: {{default: /in}}}}\n---\napiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {{name: s2}}\nspec: {{pubsubname: rabbit, topic: 'leak-{tag}', routes: {{default: /in}}}}\n",
        2 + value % 2,
        1 + value % 2,
    );
    let mut r = Resources::default();
    parse_file(
        Path::new("reload.yaml"),
        docs.as_bytes(),
        &LoadContext {
            app_id: "leak",
            namespace: None,
        },
        &mut r,
    );
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    r
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Connections to the Redis database this test alone uses.
fn redis_clients() -> usize {
    let out = Command::new("redis-cli")
        .args(["CLIENT", "LIST"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().any(|f| f == "db=8"))
        .count()
}

fn rabbit_consumers(queue: &str) -> usize {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "name",
            "consumers",
            "--quiet",
            "--no-table-headers",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(queue)).then(|| f.next().and_then(|c| c.parse().ok()))?
        })
        .unwrap_or(0)
}

struct Reading {
    tasks: usize,
    rss_kib: u64,
    redis_clients: usize,
    rabbit_consumers: usize,
}

fn read(queue: &str) -> Reading {
    Reading {
        tasks: alive_tasks(),
        rss_kib: rss_kib(),
        redis_clients: redis_clients(),
        rabbit_consumers: rabbit_consumers(queue),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_reloads_leak_no_task_connection_consumer_or_memory() {
    let tag = format!("leak{}", std::process::id());
    let delivered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = delivered.clone();
    let app = axum::Router::new()
        .route("/dapr/subscribe", get(|| async { "[]" }))
        .route(
            "/in",
            post(move || {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { "" }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = listener.local_addr().unwrap().port().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // the sidecar starts with no resources: the reloader below adds them all
    let r = sidecar::start(&[], "leak", Env::default(), &["--app-port", &app_port]).await;
    let state = r.state.clone();
    daprd_testkit::eventually(Duration::from_secs(10), "the sidecar ready", || async {
        state.is_ready().then_some(())
    })
    .await;
    let mut reloader = Reloader::new(
        r.state.clone(),
        r.subscriptions.clone(),
        daprd_components::builtin_registry(),
        BuildContext {
            app_id: "leak".into(),
            namespace: "default".into(),
            pod_name: None,
            connect: true,
            secret_scopes: Vec::new(),
        },
        Default::default(),
        Vec::new(),
    );
    let queue = format!("{tag}-leak-{tag}");
    let mut before = None;
    for i in 0..RELOADS {
        reloader.apply(resources(&tag, i)).await;
        if i == 0 {
            let subs = r.subscriptions.list();
            assert_eq!(subs.len(), 2, "both subscriptions started: {subs:?}");
        }
        if i + 1 == WARM_UP {
            before = Some(settled(&queue).await);
        }
    }
    let before = before.unwrap();
    let after = settled(&queue).await;
    assert_eq!(r.subscriptions.list().len(), 2);
    assert_eq!(
        after.rabbit_consumers, 1,
        "one consumer on the queue after {RELOADS} reloads"
    );
    assert_eq!(before.rabbit_consumers, 1);
    assert!(
        after.redis_clients <= before.redis_clients,
        "Redis connections grew: {} after {WARM_UP} reloads, {} after {RELOADS}",
        before.redis_clients,
        after.redis_clients
    );
    assert!(
        after.tasks <= before.tasks + 20,
        "tasks grew: {} after {WARM_UP} reloads, {} after {RELOADS}",
        before.tasks,
        after.tasks
    );
    assert!(
        after.rss_kib < before.rss_kib + 8 * 1024,
        "memory grew: {} KiB after {WARM_UP} reloads, {} KiB after {RELOADS}",
        before.rss_kib,
        after.rss_kib
    );
    // still delivering, through both
    let client = reqwest::Client::new();
    for pubsub in ["redis", "rabbit"] {
        let resp = client
            .post(format!("{}/v1.0/publish/{pubsub}/leak-{tag}", r.http))
            .json(&serde_json::json!({"n": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204, "{pubsub}");
    }
    daprd_testkit::eventually(Duration::from_secs(20), "both deliveries", || async {
        (delivered.load(std::sync::atomic::Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    println!(
        "after {WARM_UP} reloads: {} tasks, {} KiB, {} Redis clients; after {RELOADS}: {} tasks, {} KiB, {} Redis clients",
        before.tasks, before.rss_kib, before.redis_clients, after.tasks, after.rss_kib, after.redis_clients
    );
}
