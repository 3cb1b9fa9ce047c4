//! End to end: publish → daprd-rs → app (an axum app in this process) → 2xx → ack.
//! The app records receive time minus the event's `data.t`. Open-loop runs schedule sends at a
//! fixed rate from a dedicated thread and put the *intended* send time in `t`, so a stalled
//! sidecar shows up as latency (coordinated omission corrected).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::proc::{cpu_ticks, rss_kib};
use crate::{start_sidecar, Opts};

/// What the app records.
pub struct AppStats {
    base: Instant,
    latency: Mutex<Histogram<u64>>,
    received: AtomicU64,
    slow_received: AtomicU64,
    slow_busy_us: AtomicU64,
    slow_first_last: Mutex<Option<(Instant, Instant)>>,
}

impl AppStats {
    /// Fresh counters.
    pub fn new() -> Result<Self> {
        Ok(Self {
            base: Instant::now(),
            latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
            received: AtomicU64::new(0),
            slow_received: AtomicU64::new(0),
            slow_busy_us: AtomicU64::new(0),
            slow_first_last: Mutex::new(None),
        })
    }

    /// Messages the app received on its main route.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Microseconds since the stats were made (the clock of the events' `t`).
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

pub(crate) async fn start_app(topic: &str, slow_topic: &str, stats: Arc<AppStats>) -> Result<u16> {
    use axum::routing::{get, post};
    let subs = json!([
        {"pubsubname": "memory", "topic": topic, "route": "/e2e"},
        {"pubsubname": "redis", "topic": topic, "route": "/e2e"},
        {"pubsubname": "redis", "topic": slow_topic, "route": "/slow"},
    ])
    .to_string();
    let (s1, s2) = (stats.clone(), stats);
    let app = axum::Router::new()
        .route("/dapr/subscribe", get(move || async move { subs }))
        .route(
            "/e2e",
            post(move |body: bytes::Bytes| {
                let stats = s1.clone();
                async move {
                    let now = stats.now_us();
                    if let Ok(ce) = serde_json::from_slice::<serde_json::Value>(&body) {
                        if let Some(t) = ce["data"]["t"].as_u64() {
                            if let Ok(mut h) = stats.latency.lock() {
                                let _ = h.record(now.saturating_sub(t).max(1));
                            }
                        }
                    }
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    ""
                }
            }),
        )
        .route(
            "/slow",
            post(move || {
                let stats = s2.clone();
                async move {
                    // A precise 10 ms of work (tokio's timer rounds up to whole milliseconds).
                    let t = Instant::now();
                    let _ = tokio::task::spawn_blocking(|| {
                        std::thread::sleep(Duration::from_millis(10))
                    })
                    .await;
                    let done = Instant::now();
                    stats.slow_busy_us.fetch_add(
                        u64::try_from((done - t).as_micros()).unwrap_or(0),
                        Ordering::Relaxed,
                    );
                    if let Ok(mut fl) = stats.slow_first_last.lock() {
                        let (first, _) = fl.unwrap_or((t, done));
                        *fl = Some((first, done));
                    }
                    stats.slow_received.fetch_add(1, Ordering::Relaxed);
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

async fn wait_for(counter: &AtomicU64, want: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let got = counter.load(Ordering::Relaxed);
        if got >= want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn take_histogram(stats: &AppStats) -> Histogram<u64> {
    let mut h = stats
        .latency
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = h.clone();
    h.reset();
    out
}

pub(crate) async fn publish(http: &reqwest::Client, url: &str, t: u64) -> Result<()> {
    let r = http
        .post(url)
        .header("content-type", "application/json")
        .body(format!("{{\"t\":{t}}}"))
        .send()
        .await?;
    if r.status() != 204 {
        bail!("publish answered {}", r.status());
    }
    Ok(())
}

/// Sends `rate` msg/s for `dur` from a dedicated thread (open loop); returns how many were
/// published successfully.
async fn open_loop(
    http: &reqwest::Client,
    url: &str,
    rate: u64,
    dur: Duration,
    stats: &Arc<AppStats>,
) -> Result<u64> {
    let n = (rate as f64 * dur.as_secs_f64()) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let ok = Arc::new(AtomicU64::new(0));
    let handle = tokio::runtime::Handle::current();
    let (http, url, stats, ok2) = (http.clone(), url.to_string(), stats.clone(), ok.clone());
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        for i in 0..n {
            let intended = start + interval * u32::try_from(i).unwrap_or(u32::MAX);
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            let t = u64::try_from(intended.duration_since(stats.base).as_micros()).unwrap_or(0);
            let (http, url, ok) = (http.clone(), url.clone(), ok2.clone());
            handle.spawn(async move {
                if publish(&http, &url, t).await.is_ok() {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    })
    .await?;
    // let the last sends finish
    let deadline = Instant::now() + Duration::from_secs(10);
    while ok.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(ok.load(Ordering::Relaxed))
}

/// Waits (up to 20 s) until the sidecar at `base` answers `/v1.0/healthz` with 204: its
/// subscriptions have started.
pub(crate) async fn wait_subscribed(http: &reqwest::Client, base: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http
        .get(format!("{base}/v1.0/healthz"))
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
    Ok(())
}

/// Runs the end-to-end rows and the idle footprint of a sidecar with subscriptions.
pub async fn run(opts: &Opts) -> Result<serde_json::Value> {
    let stats = Arc::new(AppStats::new()?);
    let topic = format!("e2e-{}", std::process::id());
    let slow_topic = format!("e2e-slow-{}", std::process::id());
    let app_port = start_app(&topic, &slow_topic, stats.clone()).await?;
    let brokers = [crate::Broker::Memory, crate::Broker::Redis];
    let (sidecar, _) = start_sidecar(opts, &brokers, Some(app_port)).await?;
    let pid = sidecar.child.id();
    let http = reqwest::Client::new();
    wait_subscribed(&http, &sidecar.http).await?;

    // Idle: CPU over the idle period, RSS at 10 s (or 1 s quick) and at the end.
    let (idle_secs, first_sample) = if opts.quick { (2, 1) } else { (60, 10) };
    let ticks0 = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(first_sample)).await;
    let rss_first = rss_kib(pid);
    tokio::time::sleep(Duration::from_secs(idle_secs - first_sample)).await;
    let rss_end = rss_kib(pid);
    let idle_cpu_pct = match (ticks0, cpu_ticks(pid)) {
        (Some(a), Some(b)) => Some((b - a) as f64 * 0.01 / idle_secs as f64 * 100.0),
        _ => None,
    };
    println!("\nidle sidecar with 3 subscriptions (memory + redis, app connected)");
    println!(
        "idle CPU over {idle_secs} s: {:.3} %; RSS after {first_sample} s: {} KiB, after {idle_secs} s: {} KiB",
        idle_cpu_pct.unwrap_or(f64::NAN),
        rss_first.unwrap_or(0),
        rss_end.unwrap_or(0)
    );

    let dur = if opts.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(10)
    };
    let mut rows = Vec::new();
    println!("\nend to end, open loop (intended send time → app receive; coordinated omission corrected)");
    println!(
        "{:<24} {:>8} {:>8} {:>8} {:>9} {:>10} {:>6} {:>9}",
        "component @ rate",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "delivered",
        "lost",
        "RSS KiB"
    );
    let mut rss_at_1k = None;
    for pubsub in ["redis", "memory"] {
        for rate in [100u64, 1000, 5000] {
            take_histogram(&stats);
            let before = stats.received.load(Ordering::Relaxed);
            let url = format!("{}/v1.0/publish/{pubsub}/{topic}", sidecar.http);
            let published = open_loop(&http, &url, rate, dur, &stats).await?;
            let rss = rss_kib(pid);
            if pubsub == "redis" && rate == 1000 {
                rss_at_1k = rss;
            }
            let got = wait_for(&stats.received, before + published, Duration::from_secs(30)).await
                - before;
            let h = take_histogram(&stats);
            let lost = published.saturating_sub(got);
            println!(
                "{:<24} {:>8} {:>8} {:>8} {:>9} {:>10} {:>6} {:>9}",
                format!("{pubsub} @ {rate}/s"),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
                h.max(),
                got,
                lost,
                rss.unwrap_or(0)
            );
            rows.push(json!({"e2e": pubsub, "open_loop_rate": rate, "p50_us": h.value_at_quantile(0.5),
                "p99_us": h.value_at_quantile(0.99), "p999_us": h.value_at_quantile(0.999), "max_us": h.max(),
                "published": published, "delivered": got, "lost": lost, "rss_kib": rss}));
        }
    }

    // Closed loop: as fast as 16 publishers go, every message acked only after the app's 2xx.
    println!("\nend to end, closed loop (16 HTTP publishers, ack after the app's 2xx)");
    for pubsub in ["redis", "memory"] {
        take_histogram(&stats);
        let before = stats.received.load(Ordering::Relaxed);
        let url = format!("{}/v1.0/publish/{pubsub}/{topic}", sidecar.http);
        let started = Instant::now();
        let base = stats.base;
        let op: crate::publish::Op = {
            let (http, url) = (http.clone(), url.clone());
            Arc::new(move || {
                let (http, url) = (http.clone(), url.clone());
                Box::pin(async move {
                    let t = u64::try_from(base.elapsed().as_micros()).unwrap_or(0);
                    publish(&http, &url, t).await
                })
            })
        };
        let (published, _) = crate::publish::run_block(16, dur, op).await?;
        let got = wait_for(
            &stats.received,
            before + published.len(),
            Duration::from_secs(60),
        )
        .await
            - before;
        let rate = got as f64 / started.elapsed().as_secs_f64();
        let h = take_histogram(&stats);
        let lost = published.len().saturating_sub(got);
        println!(
            "{pubsub:<8} {rate:>8.0} delivered/s, {got}/{} delivered, {lost} lost; latency p50 {} µs, p99 {} µs",
            published.len(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99)
        );
        rows.push(
            json!({"e2e": pubsub, "closed_loop_publishers": 16, "delivered_per_s": rate,
            "published": published.len(), "delivered": got, "lost": lost,
            "p50_us": h.value_at_quantile(0.5), "p99_us": h.value_at_quantile(0.99)}),
        );
    }

    // A 10 ms handler behind Redis `concurrency` 10: the ceiling is 10 / 10 ms = 1000 msg/s.
    let n: u64 = if opts.quick { 300 } else { 3000 };
    let url = format!("{}/v1.0/publish/redis/{slow_topic}", sidecar.http);
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                let _ = publish(&http, &url, 0).await;
                i += 16;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let got = wait_for(&stats.slow_received, n, Duration::from_secs(60)).await;
    let (first, last) = stats
        .slow_first_last
        .lock()
        .ok()
        .and_then(|g| *g)
        .unwrap_or((Instant::now(), Instant::now()));
    let rate = got.saturating_sub(1) as f64 / (last - first).as_secs_f64().max(1e-9);
    let mean_handler_ms =
        stats.slow_busy_us.load(Ordering::Relaxed) as f64 / got.max(1) as f64 / 1000.0;
    let ceiling = 10.0 / (mean_handler_ms / 1000.0);
    println!(
        "\n10 ms handler, redis concurrency 10: {rate:.0} delivered/s ({got}/{n}); handler mean {mean_handler_ms:.2} ms → ceiling {ceiling:.0}/s; target ≥ 900"
    );
    rows.push(json!({"e2e": "redis-10ms-handler", "delivered_per_s": rate, "delivered": got, "published": n,
        "handler_mean_ms": mean_handler_ms, "ceiling_per_s": ceiling}));
    drop(sidecar);
    Ok(json!({
        "rows": rows,
        "idle": {"seconds": idle_secs, "cpu_pct": idle_cpu_pct, "rss_first_kib": rss_first,
                 "rss_first_after_s": first_sample, "rss_end_kib": rss_end},
        "rss_at_1k_per_s_kib": rss_at_1k,
    }))
}
