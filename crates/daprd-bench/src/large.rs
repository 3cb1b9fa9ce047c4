//! Large messages: a 1 MB JSON body published through the sidecar (HTTP, Redis component)
//! against a direct `XADD` of the envelope the sidecar writes for it, one publish at a time,
//! in interleaved blocks; and the sidecar's RSS idle, after each block and a second after the
//! last, for a 1 MB and a 3 MB body (under the 4 MiB default body limit). Each block's
//! streams are deleted after it, so Redis holds at most one block of bodies.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use daprd_core::cloudevent;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::{proc, start_sidecar, Broker, Opts};

/// Publishes per block and row (full mode).
const PER_BLOCK: usize = 20;

/// A JSON body of about `mib` MiB: objects of a number and a 90-byte string.
fn body(mib: usize) -> Result<Vec<u8>> {
    let items = mib * 10_000;
    Ok(serde_json::to_vec(&json!({
        "items": (0..items).map(|i| json!({"sku": i, "note": "y".repeat(90)})).collect::<Vec<_>>()
    }))?)
}

/// The envelope the sidecar's publisher writes for `data` (attributes of the same length).
fn envelope(data: &[u8], topic: &str) -> Result<Vec<u8>> {
    let md = BTreeMap::new();
    let req = crate::envelope::request(topic, "application/json", data, &md);
    Ok(cloudevent::envelope_bytes(&req, false)?)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Runs the rows and prints them; returns them as JSON.
pub async fn run(opts: &Opts) -> Result<serde_json::Value> {
    let (sidecar, _) = start_sidecar(opts, &[Broker::Redis], None).await?;
    let pid = sidecar.child.id();
    let client = redis::Client::open(format!("redis://{}", opts.redis))?;
    let mut conn = redis::aio::ConnectionManager::new(client).await?;
    let http = reqwest::Client::new();
    let topic = format!("bench.large.{}", std::process::id());
    let direct_key = format!("{topic}.direct");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = proc::rss_mib(pid);
    let (blocks, per_block) = if opts.quick {
        (1, 3)
    } else {
        (opts.blocks, PER_BLOCK)
    };
    let mut out = Vec::new();
    println!("\nlarge messages (HTTP publish, Redis; direct = XADD of the same envelope)");
    println!(
        "{:<8} {:>14} {:>14} {:>8} {:>10} {:>22} {:>10}",
        "body",
        "direct p50 µs",
        "sidecar p50 µs",
        "ratio",
        "idle MiB",
        "after each block MiB",
        "after MiB"
    );
    for size in [1usize, 3] {
        let data = body(size)?;
        let env = envelope(&data, &topic)?;
        let url = format!("{}/v1.0/publish/redis/{topic}", sidecar.http);
        let mut direct = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut through = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut each = Vec::new();
        for _ in 0..blocks {
            for _ in 0..per_block {
                let t = Instant::now();
                let _: String = redis::cmd("XADD")
                    .arg(&direct_key)
                    .arg("*")
                    .arg("data")
                    .arg(&env)
                    .arg("metadata")
                    .arg("{}")
                    .query_async(&mut conn)
                    .await?;
                direct.record(micros(t.elapsed()))?;
            }
            for _ in 0..per_block {
                let t = Instant::now();
                let what = format!("a {size} MiB publish");
                proc::post_json(&http, &url, data.clone(), &what).await?;
                through.record(micros(t.elapsed()))?;
            }
            each.push(proc::rss_mib(pid));
            let _: i64 = redis::cmd("DEL")
                .arg(&direct_key)
                .arg(&topic)
                .query_async(&mut conn)
                .await?;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = proc::rss_mib(pid);
        let (d50, s50) = (
            direct.value_at_quantile(0.5),
            through.value_at_quantile(0.5),
        );
        let ratio = s50 as f64 / d50 as f64;
        println!(
            "{:<8} {:>14} {:>14} {:>7.2}× {:>10.1} {:>22} {:>10.1}",
            format!("{:.2} MiB", data.len() as f64 / (1 << 20) as f64),
            d50,
            s50,
            ratio,
            idle,
            proc::mib_list(&each),
            after
        );
        out.push(json!({
            "body_bytes": data.len(), "envelope_bytes": env.len(), "publishes": direct.len(),
            "direct_p50_us": d50, "direct_p99_us": direct.value_at_quantile(0.99),
            "sidecar_p50_us": s50, "sidecar_p99_us": through.value_at_quantile(0.99),
            "idle_mib": idle, "after_each_block_mib": each, "after_mib": after,
        }));
    }
    Ok(json!(out))
}
