//! Rows driven by C load generators, so the harness's own client does not compete with the
//! sidecar for the cores: `redis-benchmark` writing `XADD` straight to Redis (the direct
//! path), `wrk` (HTTP/1.1, one thread) publishing through the sidecar, `h2load` (HTTP/2,
//! gRPC `Dapr/PublishEvent`) publishing through it, each at 1 and 16 connections, in
//! interleaved blocks. Every row is reported as a ratio to the direct path of the same run:
//! added p50, p99 ratio, throughput ratio, and the sidecar's CPU per publish over Redis's CPU
//! per `XADD` (`/proc/<pid>/stat` of both, Redis's pid from `INFO server`).
//!
//! Install the generators with `apt-get install wrk nghttp2-client redis-tools`; a missing one
//! skips these rows and says so.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context as _, Result};
use daprd_core::cloudevent::{self, EnvelopeRequest};
use daprd_proto::runtime::v1 as pb;
use prost::Message as _;
use serde_json::json;

use crate::proc::cpu_ticks;
use crate::publish::median;
use crate::{start_sidecar, Broker, Opts, REDIS_MAXLEN};

/// What one block of a row measured.
#[derive(Clone, Copy, Debug)]
struct Block {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
}

/// How a row loads its target.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    /// `redis-benchmark` sending `XADD` of the envelope to Redis.
    Direct,
    /// `wrk` posting to a sidecar route.
    Wrk(&'static str),
    /// `h2load` calling `PublishEvent` on the sidecar's gRPC port.
    H2load,
}

struct Row {
    name: &'static str,
    tool: Tool,
    connections: u32,
    blocks: Vec<Block>,
    ticks: u64,
    /// `redis-benchmark -n` for the next block, so that it lasts about a block.
    requests_next: u64,
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A duration as wrk prints it (`812.00us`, `1.23ms`, `2.00s`), in µs.
fn wrk_duration_us(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        _ => return None,
    })
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One `wrk --latency` block.
fn wrk(connections: u32, secs: u64, script: &Path, url: &str) -> Result<Block> {
    let out = output(Command::new("wrk").args([
        "-t1",
        &format!("-c{connections}"),
        &format!("-d{secs}s"),
        "--latency",
        "-s",
        &script.to_string_lossy(),
        url,
    ]))?;
    ensure!(
        !out.contains("Non-2xx"),
        "wrk saw error answers from {url}:\n{out}"
    );
    let field = |prefix: &str| -> Option<String> {
        out.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
    };
    let requests: u64 = out
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no request count in wrk's output")?;
    Ok(Block {
        rate: field("Requests/sec:")
            .and_then(|r| r.parse().ok())
            .context("no rate in wrk's output")?,
        p50_us: field("50%")
            .and_then(|d| wrk_duration_us(&d))
            .context("no p50 in wrk's output")?,
        p99_us: field("99%")
            .and_then(|d| wrk_duration_us(&d))
            .context("no p99 in wrk's output")?,
        requests,
    })
}

/// One `h2load` block of gRPC calls with `body` (a length-prefixed message); latencies from
/// its per-request log.
fn h2load(connections: u32, secs: u64, body: &Path, url: &str, log: &Path) -> Result<Block> {
    let out = output(Command::new("h2load").args([
        "-c",
        &connections.to_string(),
        "-m",
        "1",
        "-D",
        &secs.to_string(),
        "--warm-up-time",
        "0",
        "-d",
        &body.to_string_lossy(),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--log-file",
        &log.to_string_lossy(),
        url,
    ]))?;
    let counts = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .context("no request counts in h2load's output")?;
    let count = |label: &str| -> Option<u64> {
        counts
            .split(',')
            .find(|p| p.trim().ends_with(label))?
            .split_whitespace()
            .find_map(|w| w.parse().ok())
    };
    let succeeded = count("succeeded").context("no success count from h2load")?;
    ensure!(
        count("failed") == Some(0) && count("errored") == Some(0),
        "h2load saw failures: {counts}"
    );
    let mut latencies: Vec<f64> = std::fs::read_to_string(log)?
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    latencies.sort_by(f64::total_cmp);
    ensure!(!latencies.is_empty(), "h2load logged no request");
    Ok(Block {
        rate: succeeded as f64 / secs as f64,
        p50_us: percentile(&latencies, 0.5),
        p99_us: percentile(&latencies, 0.99),
        requests: succeeded,
    })
}

/// One `redis-benchmark` block of `requests` XADDs of `payload` to `key`.
fn redis_benchmark(
    redis: &str,
    connections: u32,
    requests: u64,
    key: &str,
    payload: &str,
) -> Result<Block> {
    let (host, port) = redis.rsplit_once(':').context("redis address host:port")?;
    let maxlen = REDIS_MAXLEN.to_string();
    let out = output(Command::new("redis-benchmark").args([
        "-h",
        host,
        "-p",
        port,
        "-c",
        &connections.to_string(),
        "-n",
        &requests.to_string(),
        "--csv",
        "XADD",
        key,
        "MAXLEN",
        "~",
        &maxlen,
        "*",
        "data",
        payload,
    ]))?;
    // The last line: "<command>","rps","avg","min","p50","p95","p99","max" (ms).
    let line = out
        .lines()
        .last()
        .context("no output from redis-benchmark")?;
    let fields: Vec<f64> = line
        .rsplitn(8, ',')
        .take(7)
        .map(|f| f.trim_matches('"').parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading redis-benchmark's line {line:?}"))?;
    // rsplitn gives them last first: max, p99, p95, p50, min, avg, rps
    Ok(Block {
        rate: fields[6],
        p50_us: fields[3] * 1e3,
        p99_us: fields[1] * 1e3,
        requests,
    })
}

/// `body` as a gRPC message frame (no compression, 4-byte length).
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8];
    frame.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    frame.extend_from_slice(message);
    frame
}

/// Runs the rows and prints them; returns them as JSON (null when a tool or Redis is missing).
pub async fn run(opts: &Opts) -> Result<serde_json::Value> {
    let missing: Vec<&str> = ["wrk", "h2load", "redis-benchmark"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        println!("\nskipping the load-generator rows: {} not installed (apt-get install wrk nghttp2-client redis-tools)", missing.join(", "));
        return Ok(json!(null));
    }
    if !crate::port_open(&opts.redis) {
        println!("\nskipping the load-generator rows: Redis is not reachable");
        return Ok(json!(null));
    }
    let client = redis::Client::open(format!("redis://{}", opts.redis))?;
    let mut conn = redis::aio::ConnectionManager::new(client).await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let redis_pid: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .context("no process_id in Redis's INFO server")?;

    let (sidecar, _) = start_sidecar(opts, &[Broker::Redis, Broker::Memory], None).await?;
    let pid = sidecar.child.id();
    let dir = sidecar.dir().to_path_buf();
    let topic = format!("bench-loadgen.{}", std::process::id());
    let key = format!("bench-loadgen-direct.{}", std::process::id());
    let event = serde_json::to_vec(&json!({"orderId": 1, "pad": "x".repeat(1000)}))?;
    // The direct path writes what the sidecar writes: the envelope of the same event.
    let md = Default::default();
    let payload = String::from_utf8(cloudevent::envelope_bytes(
        &EnvelopeRequest {
            source: "bench",
            topic: &topic,
            pubsub_name: "redis",
            data_content_type: "application/json",
            data: &event,
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            tracestate: "",
            metadata: Some(&md),
            new_id: "5b0c3b8e-7d3f-4d0e-9f44-2d2b8f0c1a77",
            now: std::time::SystemTime::now(),
        },
        false,
    )?)?;
    let script = dir.join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = {}\nwrk.headers[\"Content-Type\"] = \"application/json\"\n",
            serde_json::to_string(&String::from_utf8_lossy(&event))?
        ),
    )?;
    let body = dir.join("publish.grpc");
    let message = |topic: &str| {
        pb::PublishEventRequest {
            pubsub_name: "redis".into(),
            topic: topic.into(),
            data: event.clone(),
            data_content_type: "application/json".into(),
            ..Default::default()
        }
        .encode_to_vec()
    };
    std::fs::write(&body, grpc_frame(&message(&topic)))?;
    let grpc_url = format!("{}/dapr.proto.runtime.v1.Dapr/PublishEvent", sidecar.grpc);
    // h2load counts a gRPC error (HTTP 200 with a grpc-status trailer) as a success: check
    // once that its calls publish, by counting what three of them put on a stream of their own.
    let check_topic = format!("{topic}.check");
    let check_body = dir.join("check.grpc");
    std::fs::write(&check_body, grpc_frame(&message(&check_topic)))?;
    let log = dir.join("h2load.log");
    output(Command::new("h2load").args([
        "-n",
        "3",
        "-c",
        "1",
        "-d",
        &check_body.to_string_lossy(),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        &grpc_url,
    ]))?;
    let published: u64 = redis::cmd("XLEN")
        .arg(&check_topic)
        .query_async(&mut conn)
        .await?;
    let _: i64 = redis::cmd("DEL")
        .arg(&check_topic)
        .query_async(&mut conn)
        .await?;
    if published != 3 {
        bail!("3 gRPC publishes by h2load put {published} entries on Redis");
    }

    let mut rows = Vec::new();
    for connections in [1u32, 16] {
        for (name, tool) in [
            ("direct XADD (redis-benchmark)", Tool::Direct),
            ("HTTP, Redis (wrk)", Tool::Wrk("redis")),
            ("gRPC, Redis (h2load)", Tool::H2load),
            ("HTTP, in-memory (wrk)", Tool::Wrk("memory")),
        ] {
            rows.push(Row {
                name,
                tool,
                connections,
                blocks: Vec::new(),
                ticks: 0,
                requests_next: if connections == 1 { 20_000 } else { 100_000 },
            });
        }
    }
    let secs = opts.block.as_secs().max(1);
    for _ in 0..opts.blocks {
        for row in &mut rows {
            let measured = match row.tool {
                Tool::Direct => redis_pid,
                _ => pid,
            };
            let before = cpu_ticks(measured).unwrap_or(0);
            let block = match row.tool {
                Tool::Direct => {
                    let b = redis_benchmark(
                        &opts.redis,
                        row.connections,
                        row.requests_next,
                        &key,
                        &payload,
                    )?;
                    row.requests_next = ((b.rate * secs as f64) as u64).max(1_000);
                    b
                }
                Tool::Wrk(component) => wrk(
                    row.connections,
                    secs,
                    &script,
                    &format!("{}/v1.0/publish/{component}/{topic}", sidecar.http),
                )?,
                Tool::H2load => h2load(row.connections, secs, &body, &grpc_url, &log)?,
            };
            row.ticks += cpu_ticks(measured).unwrap_or(0).saturating_sub(before);
            row.blocks.push(block);
        }
    }
    drop(sidecar);
    let _: i64 = redis::cmd("DEL")
        .arg(&topic)
        .arg(&key)
        .query_async(&mut conn)
        .await?;

    struct Summary {
        rate: f64,
        p50: f64,
        p99: f64,
        cpu_us: f64,
    }
    let summarise = |row: &Row| Summary {
        rate: median(&mut row.blocks.iter().map(|b| b.rate).collect::<Vec<_>>()),
        p50: median(&mut row.blocks.iter().map(|b| b.p50_us).collect::<Vec<_>>()),
        p99: median(&mut row.blocks.iter().map(|b| b.p99_us).collect::<Vec<_>>()),
        cpu_us: row.ticks as f64 * 10_000.0
            / row.blocks.iter().map(|b| b.requests).sum::<u64>().max(1) as f64,
    };
    println!("\nload generators in C ({} blocks of {secs} s, interleaved; CPU: Redis's for the direct row, the sidecar's for the others)", opts.blocks);
    println!(
        "{:<32} {:>3} {:>10} {:>9} {:>9} {:>8}",
        "row", "c", "msg/s", "p50 µs", "p99 µs", "CPU µs"
    );
    let mut doc = Vec::new();
    let mut summaries = Vec::new();
    for row in &rows {
        let s = summarise(row);
        println!(
            "{:<32} {:>3} {:>10.0} {:>9.0} {:>9.0} {:>8.1}",
            row.name, row.connections, s.rate, s.p50, s.p99, s.cpu_us
        );
        doc.push(json!({
            "row": row.name,
            "connections": row.connections,
            "rate": s.rate,
            "p50_us": s.p50,
            "p99_us": s.p99,
            "cpu_us_per_msg": s.cpu_us,
            "blocks": row.blocks.iter().map(|b| json!({"rate": b.rate, "p50_us": b.p50_us, "p99_us": b.p99_us})).collect::<Vec<_>>(),
        }));
        summaries.push(((row.tool, row.connections), s));
    }
    let get = |tool: Tool, c: u32| {
        summaries
            .iter()
            .find(|((t, n), _)| *t == tool && *n == c)
            .map(|(_, s)| s)
            .context("a load-generator row is missing")
    };
    let (d1, d16) = (get(Tool::Direct, 1)?, get(Tool::Direct, 16)?);
    let (h1, h16) = (get(Tool::Wrk("redis"), 1)?, get(Tool::Wrk("redis"), 16)?);
    let g16 = get(Tool::H2load, 16)?;
    let m16 = get(Tool::Wrk("memory"), 16)?;
    let ratios = [
        (
            "HTTP c=1: added p50 over direct XADD (µs)",
            h1.p50 - d1.p50,
            "≤ 50",
        ),
        ("HTTP c=1: p99 / direct p99", h1.p99 / d1.p99, "≤ 2.5"),
        (
            "HTTP c=16: throughput / direct",
            h16.rate / d16.rate,
            "≥ 0.60",
        ),
        (
            "gRPC c=16: throughput / direct",
            g16.rate / d16.rate,
            "≥ 0.55",
        ),
        (
            "gRPC c=16: throughput / HTTP c=16",
            g16.rate / h16.rate,
            "≥ 0.90",
        ),
        (
            "sidecar CPU per HTTP publish / Redis CPU per XADD (c=16)",
            h16.cpu_us / d16.cpu_us,
            "≤ 2.0",
        ),
        (
            "in-memory HTTP c=16 / direct XADD",
            m16.rate / d16.rate,
            "≥ 1.2",
        ),
    ];
    println!("\nagainst the direct path of this run");
    let mut ratio_doc = Vec::new();
    for (name, value, target) in ratios {
        println!("{name:<58} {value:>8.2}   target {target}");
        ratio_doc.push(json!({"measure": name, "value": value, "target": target}));
    }
    Ok(json!({"rows": doc, "ratios": ratio_doc, "block_secs": secs, "blocks": opts.blocks}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_units() {
        assert_eq!(wrk_duration_us("812.00us"), Some(812.0));
        assert_eq!(wrk_duration_us("1.50ms"), Some(1500.0));
        assert_eq!(wrk_duration_us("2.00s"), Some(2e6));
        assert_eq!(wrk_duration_us("3x"), None);
    }

    #[test]
    fn grpc_frames_are_length_prefixed() {
        assert_eq!(grpc_frame(b"ab"), vec![0, 0, 0, 0, 2, b'a', b'b']);
    }
}
