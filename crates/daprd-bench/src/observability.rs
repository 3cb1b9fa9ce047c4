//! What metrics and tracing cost: in-memory sidecars side by side — metrics off
//! (`--enable-metrics=false`), metrics on (the default), metrics on with tracing at
//! `samplingRate: "0"` (an OTLP exporter configured), and with every span exported over
//! OTLP/HTTP to a collector stand-in — loaded in interleaved blocks of HTTP publishes at
//! concurrency 16. Reported per variant: publish throughput (median of blocks) and the
//! sidecar's CPU per publish (`/proc/<pid>/stat` deltas over all blocks); then the RSS of both
//! after publishing to 100 topics (100 label sets in every pub/sub series). Then, where
//! valgrind is installed, the instructions the sidecar executes per publish with metrics off
//! and on, counted by callgrind over sequential publishes (a count that machine noise does
//! not move, unlike CPU time).

use anyhow::{Context as _, Result};
use bytes::Bytes;
use serde_json::json;

use crate::proc::{cpu_ticks, rss_kib};
use crate::publish::{http_op, run_block};
use crate::{start_sidecar_under, start_sidecar_with, Broker, Opts};

/// One sidecar set-up: its name and extra flags.
struct Variant {
    name: &'static str,
    flags: Vec<String>,
}

/// An OTLP/HTTP collector stand-in on loopback: accepts every export with 200.
async fn collector() -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(|| async { axum::http::StatusCode::OK });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// The variants: metrics off, metrics on, metrics on with tracing at rate 0 (an exporter
/// configured), metrics on with every span exported over OTLP/HTTP.
fn variants(dir: &std::path::Path, collector: std::net::SocketAddr) -> Result<Vec<Variant>> {
    let config = |name: &str, rate: &str| -> Result<Vec<String>> {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!(
                "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata: {{name: bench}}\nspec:\n  tracing:\n    samplingRate: \"{rate}\"\n    otel: {{endpointAddress: \"{collector}\", protocol: http, isSecure: false}}\n"
            ),
        )?;
        Ok(vec!["--config".into(), path.to_string_lossy().into_owned()])
    };
    Ok(vec![
        Variant {
            name: "metrics off",
            flags: vec!["--enable-metrics=false".into()],
        },
        Variant {
            name: "metrics on",
            flags: vec![],
        },
        Variant {
            name: "+ tracing 0",
            flags: config("rate0.yaml", "0")?,
        },
        Variant {
            name: "+ tracing 1",
            flags: config("rate1.yaml", "1")?,
        },
    ])
}

/// The recording work metrics add to one HTTP publish, in this process: the API request
/// (latency histogram with its counters, request and response sizes) and the component call
/// (egress histogram with its counter). Returns nanoseconds per publish (the mean of
/// `iterations`, after as many to warm up).
fn recording_ns(iterations: u32) -> f64 {
    use daprd_runtime::config::configuration::Metric;
    let m = daprd_runtime::metrics::Metrics::new("bench", "default", &Metric::default());
    let one = |i: u32| {
        let elapsed = std::time::Duration::from_micros(u64::from(i % 2000));
        m.http_request(
            "POST",
            "/v1.0/publish/memory/bench.observability",
            "204",
            1030,
            0,
            elapsed,
        );
        m.pubsub_egress("memory", "bench.observability", true, elapsed);
    };
    for i in 0..iterations {
        one(i);
    }
    let started = std::time::Instant::now();
    for i in 0..iterations {
        one(std::hint::black_box(i));
    }
    started.elapsed().as_nanos() as f64 / f64::from(iterations)
}

/// Instructions per publish of one sidecar started with `flags` under callgrind: `publishes`
/// sequential HTTP publishes after a warm-up, counted between a zeroing and a dump of
/// callgrind's counters (`callgrind_control`), so start-up and shutdown are left out.
async fn instructions_per_publish(
    opts: &Opts,
    flags: &[&str],
    body: &Bytes,
    publishes: u32,
) -> Result<f64> {
    let dir = std::env::temp_dir().join(format!("daprd-bench-cg-{}", daprd_testkit::free_port()));
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("callgrind.out");
    let out_flag = format!("--callgrind-out-file={}", out.display());
    let wrapper = ["valgrind", "--tool=callgrind", out_flag.as_str()];
    let (s, _) = start_sidecar_under(opts, &wrapper, &[Broker::Memory], None, flags).await?;
    let pid = s.child.id().to_string();
    let http = reqwest::Client::new();
    let url = format!("{}/v1.0/publish/memory/bench.instructions", s.http);
    let publish = || async {
        let r = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        anyhow::ensure!(r.status() == 204, "publish answered {}", r.status());
        Ok(())
    };
    for _ in 0..50 {
        publish().await?;
    }
    let control = |arg: &str| -> Result<()> {
        let st = std::process::Command::new("callgrind_control")
            .args([arg, pid.as_str()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "callgrind_control {arg} failed");
        Ok(())
    };
    control("-z")?;
    for _ in 0..publishes {
        publish().await?;
    }
    control("-d")?;
    drop(s);
    // the dump is `callgrind.out.1`; its `summary:` line is the instruction count
    let dump = std::fs::read_to_string(dir.join("callgrind.out.1"))
        .with_context(|| format!("reading the callgrind dump in {}", dir.display()))?;
    let _ = std::fs::remove_dir_all(&dir);
    let total: f64 = dump
        .lines()
        .find_map(|l| l.strip_prefix("summary: "))
        .context("no summary line in the callgrind dump")?
        .trim()
        .parse()?;
    Ok(total / f64::from(publishes))
}

/// Whether valgrind and callgrind_control can be run.
fn have_callgrind() -> bool {
    ["valgrind", "callgrind_control"].iter().all(|p| {
        std::process::Command::new(p)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Runs the rows and prints them; returns them as JSON.
pub async fn run(opts: &Opts) -> Result<serde_json::Value> {
    let recording = recording_ns(if opts.quick { 100_000 } else { 2_000_000 });
    let dir = std::env::temp_dir().join(format!("daprd-bench-obs-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let variants = variants(&dir, collector().await?)?;
    let mut sidecars = Vec::new();
    for v in &variants {
        let flags: Vec<&str> = v.flags.iter().map(String::as_str).collect();
        sidecars.push(
            start_sidecar_with(opts, &[Broker::Memory], None, &flags)
                .await?
                .0,
        );
    }
    let http = reqwest::Client::new();
    let body = Bytes::from(serde_json::to_vec(
        &json!({"orderId": 1, "pad": "x".repeat(1000)}),
    )?);
    let ops: Vec<_> = sidecars
        .iter()
        .map(|s| {
            http_op(
                &http,
                format!("{}/v1.0/publish/memory/bench.observability", s.http),
                body.clone(),
                "application/json",
            )
        })
        .collect();
    let mut rates = vec![Vec::new(); variants.len()];
    let mut ticks = vec![0u64; variants.len()];
    let mut msgs = vec![0u64; variants.len()];
    for _ in 0..opts.blocks {
        for (i, s) in sidecars.iter().enumerate() {
            let pid = s.child.id();
            let before = cpu_ticks(pid);
            let (h, rate) = run_block(16, opts.block, ops[i].clone()).await?;
            if let (Some(a), Some(b)) = (before, cpu_ticks(pid)) {
                ticks[i] += b.saturating_sub(a);
            }
            msgs[i] += h.len();
            rates[i].push(rate);
        }
    }
    // 100 topics: every pub/sub series gets 100 label sets.
    for s in &sidecars {
        for t in 0..100 {
            let r = http
                .post(format!("{}/v1.0/publish/memory/bench.topic.{t}", s.http))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await?;
            anyhow::ensure!(r.status() == 204, "publish answered {}", r.status());
        }
    }
    println!(
        "\nobservability cost (in-memory, HTTP publish, concurrency 16, {} interleaved blocks of {:?})",
        opts.blocks, opts.block
    );
    println!(
        "{:<14} {:>10} {:>12} {:>14}",
        "variant", "msg/s", "CPU µs/msg", "RSS KiB (100 topics)"
    );
    let mut rows = Vec::new();
    for (i, v) in variants.iter().enumerate() {
        rates[i].sort_by(f64::total_cmp);
        let rate = rates[i].get(rates[i].len() / 2).copied().unwrap_or(0.0);
        // one tick = 10 ms of CPU (USER_HZ 100)
        let cpu = (msgs[i] > 0).then(|| ticks[i] as f64 * 10_000.0 / msgs[i] as f64);
        let rss = rss_kib(sidecars[i].child.id());
        println!(
            "{:<14} {:>10.0} {:>12} {:>14}",
            v.name,
            rate,
            cpu.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into()),
            rss.map(|r| r.to_string()).unwrap_or_else(|| "-".into())
        );
        rows.push(json!({
            "variant": v.name, "msgs_per_s": rate, "sidecar_cpu_us_per_msg": cpu,
            "rss_kib_after_100_topics": rss,
        }));
    }
    println!("metrics recording per HTTP publish, in process: {recording:.0} ns");
    let _ = std::fs::remove_dir_all(&dir);
    let instructions = if have_callgrind() {
        let n = if opts.quick { 200 } else { 2000 };
        let off = instructions_per_publish(opts, &["--enable-metrics=false"], &body, n).await?;
        let on = instructions_per_publish(opts, &[], &body, n).await?;
        println!(
            "instructions per HTTP publish (callgrind, {n} sequential): metrics off {off:.0}, on {on:.0}, difference {:.0} ({:.1} %)",
            on - off,
            (on - off) * 100.0 / off
        );
        json!({"publishes": n, "metrics_off": off, "metrics_on": on})
    } else {
        println!("instructions per publish: skipped (valgrind is not installed)");
        serde_json::Value::Null
    };
    Ok(
        json!({"variants": rows, "recording_ns_per_publish": recording, "instructions_per_publish": instructions}),
    )
}
