//! Soak (`--soak SECS`, `--soak-rate N`): publish → deliver at a steady rate through one
//! sidecar (Redis when it is up, else in-memory) for a configurable time, sampling the
//! sidecar's RSS and open file descriptors every 10 s. Memory must stay flat: the run fails
//! when the last third's highest RSS exceeds the first sample after warm-up by more than
//! 25 % + 4 MiB, or when a published message did not arrive.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;

use crate::e2e::{publish, start_app, wait_subscribed, AppStats};
use crate::proc::{cpu_ticks, rss_kib};
use crate::{port_open, start_sidecar, Broker, Opts};

const SAMPLE: Duration = Duration::from_secs(10);

fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Runs the soak for `secs` seconds at `rate` messages per second.
pub async fn run(opts: &Opts, secs: u64, rate: u64) -> Result<serde_json::Value> {
    let broker = if Broker::Redis
        .address(&opts.redis)
        .is_some_and(|a| port_open(&a))
    {
        Broker::Redis
    } else {
        Broker::Memory
    };
    let stats = Arc::new(AppStats::new()?);
    let topic = format!("soak-{}", std::process::id());
    let app_port = start_app(&topic, &format!("{topic}-slow"), stats.clone()).await?;
    let (sidecar, _) = start_sidecar(opts, &[broker], Some(app_port)).await?;
    let pid = sidecar.child.id();
    let http = reqwest::Client::new();
    wait_subscribed(&http, &sidecar.http).await?;
    let url = format!(
        "{}/v1.0/publish/{}/{topic}",
        sidecar.http,
        broker.component()
    );
    println!(
        "\nsoak: {} for {secs} s at {rate} msg/s (sample every {} s)",
        broker.component(),
        SAMPLE.as_secs()
    );
    println!(
        "{:>6} {:>10} {:>10} {:>6} {:>8}",
        "t s", "published", "delivered", "fds", "RSS MiB"
    );
    let published = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    // publishes sent and not answered yet: the count is read only once they are all in
    let in_flight = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let sender = {
        let (http, url, published, failed, stats, in_flight) = (
            http.clone(),
            url.clone(),
            published.clone(),
            failed.clone(),
            stats.clone(),
            in_flight.clone(),
        );
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let start = Instant::now();
            let mut i = 0u32;
            while Instant::now() < stop {
                let intended = start + interval * i;
                i = i.saturating_add(1);
                let now = Instant::now();
                if intended > now {
                    std::thread::sleep(intended - now);
                }
                let t = stats.now_us();
                let (http, url, published, failed, in_flight) = (
                    http.clone(),
                    url.clone(),
                    published.clone(),
                    failed.clone(),
                    in_flight.clone(),
                );
                in_flight.fetch_add(1, Ordering::SeqCst);
                handle.spawn(async move {
                    if publish(&http, &url, t).await.is_ok() {
                        published.fetch_add(1, Ordering::SeqCst);
                    } else {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                });
            }
        })
    };
    let started = Instant::now();
    let mut samples = Vec::new();
    while Instant::now() < stop {
        tokio::time::sleep(SAMPLE.min(stop.saturating_duration_since(Instant::now()))).await;
        let s = json!({
            "t_s": started.elapsed().as_secs(),
            "published": published.load(Ordering::Relaxed),
            "delivered": stats.received(),
            "fds": open_fds(pid),
            "rss_kib": rss_kib(pid),
        });
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        println!(
            "{:>6} {:>10} {:>10} {:>6} {:>8.1}",
            n("t_s"),
            n("published"),
            n("delivered"),
            n("fds"),
            n("rss_kib") as f64 / 1024.0
        );
        samples.push(s);
    }
    sender.await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let want = published.load(Ordering::SeqCst);
    while stats.received() < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered = stats.received();
    let cpu = cpu_ticks(pid);
    let rss: Vec<u64> = samples
        .iter()
        .filter_map(|s| s["rss_kib"].as_u64())
        .collect();
    let first = rss.first().copied().unwrap_or(0);
    let tail_max = rss[rss.len() * 2 / 3..].iter().copied().max().unwrap_or(0);
    let limit = first + first / 4 + 4096;
    println!(
        "soak: published {want} (failed {}), delivered {delivered}; RSS first {:.1} MiB, last third max {:.1} MiB (limit {:.1})",
        failed.load(Ordering::Relaxed),
        first as f64 / 1024.0,
        tail_max as f64 / 1024.0,
        limit as f64 / 1024.0
    );
    let doc = json!({"broker": broker.component(), "secs": secs, "rate": rate,
                     "published": want, "failed": failed.load(Ordering::Relaxed),
                     "delivered": delivered, "cpu_ticks": cpu, "samples": samples});
    if delivered < want {
        bail!(
            "soak: {} published messages were not delivered",
            want - delivered
        );
    }
    // a publish that failed on the client's side may still have reached the broker; more
    // deliveries than that are duplicates
    let sent = want + failed.load(Ordering::SeqCst);
    if delivered > sent {
        bail!(
            "soak: {} more deliveries than publishes (duplicates)",
            delivered - sent
        );
    }
    if rss.len() >= 3 && tail_max > limit {
        bail!("soak: RSS grew from {first} KiB to {tail_max} KiB");
    }
    Ok(doc)
}
