//! `daprd-bench`: measures daprd-rs on loopback and prints a table plus a JSON file.
//!
//! * Publish overhead, side by side in one run: A = `XADD` straight to Redis with the same
//!   client the component uses; B-HTTP = `POST /v1.0/publish` through daprd-rs; B-gRPC =
//!   `Dapr/PublishEvent`. Blocks are interleaved (A, B, A, B...) so machine drift hits every
//!   row alike. Concurrency 1 gives latency percentiles, concurrency 16 throughput.
//!   In-memory rows show the sidecar's own cost with no broker at all.
//! * Footprint: exec → `/v1.0/healthz/outbound` 204 time, idle RSS, binary size, and the
//!   sidecar's CPU time per publish (from `/proc/<pid>/stat`).
//!
//! `--quick` runs a few seconds (CI keeps the harness from rotting); the default full mode
//! is what `docs/BENCHMARKS.md` records. `--daprd PATH` picks the binary (default: the
//! release build, else the debug build, next to this executable).

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use daprd_proto::runtime::v1 as pb;
use hdrhistogram::Histogram;
use serde_json::json;

struct Opts {
    quick: bool,
    daprd: PathBuf,
    out: PathBuf,
    redis: String,
}

fn parse_args() -> Result<Opts> {
    let mut quick = false;
    let mut daprd = None;
    let mut out = PathBuf::from("target/bench-results.json");
    let mut redis = std::env::var("REDIS_HOST").unwrap_or_else(|_| "127.0.0.1:6379".into());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--daprd" => daprd = Some(PathBuf::from(args.next().context("--daprd needs a path")?)),
            "--out" => out = PathBuf::from(args.next().context("--out needs a path")?),
            "--redis" => redis = args.next().context("--redis needs host:port")?,
            "-h" | "--help" => {
                println!("daprd-bench [--quick] [--daprd PATH] [--out FILE] [--redis HOST:PORT]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    let daprd = match daprd {
        Some(p) => p,
        None => {
            let me = std::env::current_exe()?;
            let dir = me.parent().context("executable dir")?;
            let release = dir.join("../release/daprd");
            let beside = dir.join("daprd");
            if dir.ends_with("release") && beside.exists() {
                beside
            } else if release.exists() {
                release
            } else {
                beside
            }
        }
    };
    Ok(Opts {
        quick,
        daprd,
        out,
        redis,
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Sidecar {
    child: Child,
    http: String,
    grpc: String,
    _dir: PathBuf,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

async fn start_sidecar(
    daprd: &PathBuf,
    redis: &str,
    app_port: Option<u16>,
) -> Result<(Sidecar, Duration)> {
    let dir = std::env::temp_dir().join(format!(
        "daprd-bench-{}-{}",
        std::process::id(),
        free_port()?
    ));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("c.yaml"),
        format!(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: memory}}\nspec: {{type: pubsub.in-memory, version: v1, metadata: []}}\n---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: redis}}\nspec:\n  type: pubsub.redis\n  version: v1\n  metadata:\n  - {{name: redisHost, value: \"{redis}\"}}\n"
        ),
    )?;
    let (hp, gp) = (free_port()?, free_port()?);
    let started = Instant::now();
    let child = Command::new(daprd)
        .args(
            app_port
                .map(|p| vec!["--app-port".to_string(), p.to_string()])
                .unwrap_or_default(),
        )
        .args([
            "--app-id",
            "bench",
            "--dapr-http-port",
            &hp.to_string(),
            "--dapr-grpc-port",
            &gp.to_string(),
            "--dapr-listen-addresses",
            "127.0.0.1",
            "--log-level",
            "warn",
            "--resources-path",
        ])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", daprd.display()))?;
    let http = format!("http://127.0.0.1:{hp}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client
            .get(format!("{http}/v1.0/healthz/outbound"))
            .send()
            .await
        {
            if r.status() == 204 {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("daprd did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let ready = started.elapsed();
    Ok((
        Sidecar {
            child,
            http,
            grpc: format!("http://127.0.0.1:{gp}"),
            _dir: dir,
        },
        ready,
    ))
}

/// Runs `op` with `concurrency` workers for `dur`; returns the latency histogram (µs) and
/// operations per second.
async fn run_block<F, Fut>(
    concurrency: usize,
    dur: Duration,
    op: Arc<F>,
) -> Result<(Histogram<u64>, f64)>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            while start.elapsed() < dur {
                let t = Instant::now();
                op().await?;
                h.record(
                    u64::try_from(t.elapsed().as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1),
                )?;
            }
            Ok::<_, anyhow::Error>(h)
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        total.add(t.await??)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = total.len() as f64 / secs;
    Ok((total, rate))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// What the in-process benchmark app records.
struct AppStats {
    base: Instant,
    latency: std::sync::Mutex<Histogram<u64>>,
    received: std::sync::atomic::AtomicU64,
    slow_received: std::sync::atomic::AtomicU64,
}

/// Starts the subscriber app: `/e2e` records publish→delivery latency from the event's
/// `data.t` (µs since `base`), `/slow` takes 10 ms per event.
async fn start_app(topic: String, slow_topic: String, stats: Arc<AppStats>) -> Result<u16> {
    use axum::routing::{get, post};
    let subs = json!([
        {"pubsubname": "memory", "topic": topic, "route": "/e2e"},
        {"pubsubname": "redis", "topic": topic, "route": "/e2e"},
        {"pubsubname": "redis", "topic": slow_topic, "route": "/slow"},
    ])
    .to_string();
    let (s1, s2) = (stats.clone(), stats.clone());
    let app = axum::Router::new()
        .route("/dapr/subscribe", get(move || async move { subs }))
        .route(
            "/e2e",
            post(move |body: bytes::Bytes| {
                let stats = s1.clone();
                async move {
                    let now = u64::try_from(stats.base.elapsed().as_micros()).unwrap_or(u64::MAX);
                    if let Ok(ce) = serde_json::from_slice::<serde_json::Value>(&body) {
                        if let Some(t) = ce["data"]["t"].as_u64() {
                            if let Ok(mut h) = stats.latency.lock() {
                                let _ = h.record(now.saturating_sub(t).max(1));
                            }
                        }
                    }
                    stats
                        .received
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    ""
                }
            }),
        )
        .route(
            "/slow",
            post(move || {
                let stats = s2.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    stats
                        .slow_received
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    ""
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}

/// End to end through a sidecar with an app: delivery latency per component (closed-loop
/// publishers, ack after the app's 2xx), and a 10 ms handler behind Redis `concurrency` 10.
async fn end_to_end(opts: &Opts, quick: bool) -> Result<Vec<serde_json::Value>> {
    let stats = Arc::new(AppStats {
        base: Instant::now(),
        latency: std::sync::Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        received: Default::default(),
        slow_received: Default::default(),
    });
    let topic = format!("e2e-{}", std::process::id());
    let slow_topic = format!("e2e-slow-{}", std::process::id());
    let app_port = start_app(topic.clone(), slow_topic.clone(), stats.clone()).await?;
    let (sidecar, _) = start_sidecar(&opts.daprd, &opts.redis, Some(app_port)).await?;
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http
        .get(format!("{}/v1.0/healthz", sidecar.http))
        .send()
        .await
        .map(|r| r.status() != 204)
        .unwrap_or(true)
    {
        if Instant::now() > deadline {
            bail!("subscriptions did not start");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let dur = if quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(10)
    };
    let mut out = Vec::new();
    println!("\nend to end: publish (HTTP, 4 closed-loop publishers) -> app 2xx -> ack");
    println!(
        "{:<32} {:>9} {:>9} {:>9} {:>11}",
        "component", "p50 µs", "p99 µs", "p99.9 µs", "delivered/s"
    );
    for pubsub in ["memory", "redis"] {
        if let Ok(mut h) = stats.latency.lock() {
            h.reset();
        }
        let before = stats.received.load(std::sync::atomic::Ordering::Relaxed);
        let url = format!("{}/v1.0/publish/{pubsub}/{topic}", sidecar.http);
        let started = Instant::now();
        let base = stats.base;
        let op = {
            let (http, url) = (http.clone(), url.clone());
            Arc::new(move || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let t = u64::try_from(base.elapsed().as_micros()).unwrap_or(0);
                    let r = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(format!("{{\"t\":{t}}}"))
                        .send()
                        .await?;
                    if r.status() != 204 {
                        bail!("publish answered {}", r.status());
                    }
                    Ok(())
                }
            })
        };
        let (published, _) = run_block(4, dur, op).await?;
        let want = before + published.len();
        let wait_until = Instant::now() + Duration::from_secs(30);
        while stats.received.load(std::sync::atomic::Ordering::Relaxed) < want
            && Instant::now() < wait_until
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let delivered = stats.received.load(std::sync::atomic::Ordering::Relaxed) - before;
        let rate = delivered as f64 / started.elapsed().as_secs_f64();
        let h = stats
            .latency
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|e| e.into_inner().clone());
        let (p50, p99, p999) = (
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
        );
        println!(
            "{:<32} {:>9} {:>9} {:>9} {:>11.0}   ({delivered}/{} delivered)",
            pubsub,
            p50,
            p99,
            p999,
            rate,
            published.len()
        );
        out.push(json!({"e2e": pubsub, "p50_us": p50, "p99_us": p99, "p999_us": p999, "delivered_per_s": rate, "published": published.len(), "delivered": delivered}));
    }
    let n: u64 = if quick { 300 } else { 3000 };
    let started = Instant::now();
    let url = format!("{}/v1.0/publish/redis/{slow_topic}", sidecar.http);
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                let _ = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body("{}")
                    .send()
                    .await;
                i += 16;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let wait_until = Instant::now() + Duration::from_secs(60);
    while stats
        .slow_received
        .load(std::sync::atomic::Ordering::Relaxed)
        < n
        && Instant::now() < wait_until
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = stats
        .slow_received
        .load(std::sync::atomic::Ordering::Relaxed);
    let rate = got as f64 / started.elapsed().as_secs_f64();
    println!(
        "10 ms handler, redis concurrency 10: {rate:.0} delivered/s ({got}/{n}; target ≥ 900)"
    );
    out.push(json!({"e2e": "redis-10ms-handler", "delivered_per_s": rate, "delivered": got, "published": n}));
    drop(sidecar);
    Ok(out)
}

#[derive(Default)]
struct Row {
    name: String,
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    rate: Vec<f64>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let opts = parse_args()?;
    let (blocks, block_dur, startups) = if opts.quick {
        (2, Duration::from_millis(500), 3)
    } else {
        (5, Duration::from_secs(10), 20)
    };
    let body = serde_json::to_vec(&json!({"orderId": 1, "pad": "x".repeat(1000)}))?;
    let body = bytes::Bytes::from(body);

    // Footprint: startup time (exec → outbound ready).
    let mut starts = Vec::new();
    for _ in 0..startups {
        let (s, t) = start_sidecar(&opts.daprd, &opts.redis, None).await?;
        starts.push(t.as_secs_f64() * 1000.0);
        drop(s);
    }
    let (sidecar, _) = start_sidecar(&opts.daprd, &opts.redis, None).await?;
    let pid = sidecar.child.id();
    tokio::time::sleep(if opts.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(10)
    })
    .await;
    let idle_rss = rss_kib(pid);

    let redis_client = redis::Client::open(format!("redis://{}", opts.redis))?;
    let redis_conn = redis::aio::ConnectionManager::new(redis_client).await?;
    let http = reqwest::Client::new();
    let grpc = pb::dapr_client::DaprClient::connect(sidecar.grpc.clone()).await?;
    let topic = format!("bench-{}", std::process::id());

    type Op =
        Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send>> + Send + Sync>;
    let direct: Op = {
        let (conn, body, topic) = (redis_conn.clone(), body.clone(), topic.clone());
        Arc::new(move || {
            let (mut conn, body, topic) = (conn.clone(), body.clone(), topic.clone());
            Box::pin(async move {
                let _: String = redis::cmd("XADD")
                    .arg(&topic)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(10000)
                    .arg("*")
                    .arg("data")
                    .arg(body.as_ref())
                    .arg("metadata")
                    .arg("{}")
                    .query_async(&mut conn)
                    .await?;
                Ok(())
            })
        })
    };
    let via_http = |pubsub: &'static str, raw: bool| -> Op {
        let (http, body, url) = (
            http.clone(),
            body.clone(),
            format!(
                "{}/v1.0/publish/{pubsub}/{topic}{}",
                sidecar.http,
                if raw { "?metadata.rawPayload=true" } else { "" }
            ),
        );
        Arc::new(move || {
            let (http, body, url) = (http.clone(), body.clone(), url.clone());
            Box::pin(async move {
                let r = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                if r.status() != 204 {
                    bail!("publish answered {}", r.status());
                }
                Ok(())
            })
        })
    };
    let via_grpc = |pubsub: &'static str| -> Op {
        let (grpc, body, topic) = (grpc.clone(), body.clone(), topic.clone());
        Arc::new(move || {
            let (mut grpc, body, topic) = (grpc.clone(), body.clone(), topic.clone());
            Box::pin(async move {
                grpc.publish_event(pb::PublishEventRequest {
                    pubsub_name: pubsub.into(),
                    topic,
                    data: body.to_vec(),
                    data_content_type: "application/json".into(),
                    ..Default::default()
                })
                .await?;
                Ok(())
            })
        })
    };
    let rows_spec: Vec<(&str, Op)> = vec![
        ("A   redis direct XADD", direct.clone()),
        ("B   redis HTTP CloudEvent", via_http("redis", false)),
        ("B   redis HTTP raw", via_http("redis", true)),
        ("B   redis gRPC CloudEvent", via_grpc("redis")),
        ("    in-memory HTTP CloudEvent", via_http("memory", false)),
        ("    in-memory gRPC CloudEvent", via_grpc("memory")),
    ];
    let mut results = Vec::new();
    for concurrency in [1usize, 16] {
        let mut rows: Vec<Row> = rows_spec
            .iter()
            .map(|(n, _)| Row {
                name: n.to_string(),
                ..Default::default()
            })
            .collect();
        let cpu_before = cpu_ticks(pid);
        let mut sidecar_ops = 0u64;
        for _ in 0..blocks {
            for (i, (_, op)) in rows_spec.iter().enumerate() {
                let op = op.clone();
                let (h, rate) = run_block(concurrency, block_dur, Arc::new(move || op())).await?;
                if i > 0 {
                    sidecar_ops += h.len();
                }
                rows[i].p50.push(h.value_at_quantile(0.5) as f64);
                rows[i].p99.push(h.value_at_quantile(0.99) as f64);
                rows[i].p999.push(h.value_at_quantile(0.999) as f64);
                rows[i].rate.push(rate);
            }
        }
        let cpu_us_per_op = match (cpu_before, cpu_ticks(pid)) {
            (Some(a), Some(b)) if sidecar_ops > 0 => {
                Some((b - a) as f64 * 10_000.0 / sidecar_ops as f64)
            }
            _ => None,
        };
        println!("\nconcurrency {concurrency} ({blocks} interleaved blocks of {block_dur:?}, 1 KB JSON body; medians of blocks)");
        println!(
            "{:<32} {:>9} {:>9} {:>9} {:>11}",
            "row", "p50 µs", "p99 µs", "p99.9 µs", "msg/s"
        );
        let a50 = median(&mut rows[0].p50.clone());
        let a99 = median(&mut rows[0].p99.clone());
        for r in &mut rows {
            let (p50, p99, p999, rate) = (
                median(&mut r.p50),
                median(&mut r.p99),
                median(&mut r.p999),
                median(&mut r.rate),
            );
            println!(
                "{:<32} {:>9.0} {:>9.0} {:>9.0} {:>11.0}",
                r.name, p50, p99, p999, rate
            );
            results.push(json!({"concurrency": concurrency, "row": r.name.trim(), "p50_us": p50, "p99_us": p99, "p999_us": p999, "msgs_per_s": rate,
                                "added_p50_us": p50 - a50, "added_p99_us": p99 - a99}));
        }
        if let Some(cpu) = cpu_us_per_op {
            println!("sidecar CPU per publish (all B and in-memory rows): {cpu:.1} µs");
            results.push(json!({"concurrency": concurrency, "sidecar_cpu_us_per_publish": cpu}));
        }
    }
    let loaded_rss = rss_kib(pid);
    let e2e = end_to_end(&opts, opts.quick).await?;
    let binary = std::fs::metadata(&opts.daprd).map(|m| m.len()).unwrap_or(0);
    let mut s = starts.clone();
    let p50_start = median(&mut s);
    let max_start = starts.iter().cloned().fold(0.0, f64::max);
    println!("\nfootprint");
    println!(
        "exec → outbound ready: p50 {p50_start:.1} ms, max {max_start:.1} ms ({} runs)",
        starts.len()
    );
    println!(
        "idle RSS: {} KiB; RSS after the load: {} KiB",
        idle_rss.unwrap_or(0),
        loaded_rss.unwrap_or(0)
    );
    println!(
        "binary: {} ({:.1} MB, not stripped)",
        opts.daprd.display(),
        binary as f64 / 1e6
    );
    let doc = json!({
        "quick": opts.quick,
        "daprd": opts.daprd.display().to_string(),
        "publish": results,
        "end_to_end": e2e,
        "startup_ms": {"p50": p50_start, "max": max_start, "runs": starts.len()},
        "idle_rss_kib": idle_rss,
        "rss_after_load_kib": loaded_rss,
        "binary_bytes": binary,
    });
    if let Some(parent) = opts.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&doc)?)?;
    println!("results written to {}", opts.out.display());
    let mut conn = redis_conn;
    let _: Result<i64, _> = redis::cmd("DEL").arg(&topic).query_async(&mut conn).await;
    Ok(())
}
