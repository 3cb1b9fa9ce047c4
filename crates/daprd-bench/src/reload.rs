//! Hot reload cost (`--reload`): HTTP publish latency to Redis at concurrency 1 while the
//! component file is rewritten every second (each rewrite a new component instance: connect,
//! switch, drain, close) vs the same sidecar left alone, in interleaved blocks.

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::publish::{http_op, run_block};
use crate::{start_sidecar_with, Broker, Opts};

pub async fn run(opts: &Opts) -> Result<serde_json::Value> {
    let (sidecar, _) = start_sidecar_with(opts, &[Broker::Redis], None, &[]).await?;
    let file = sidecar.dir().join("c.yaml");
    let original = std::fs::read_to_string(&file)?;
    // the same component with a harmless setting that differs: a new instance each time
    let variant = |n: u64| {
        original.replacen(
            "metadata: [",
            &format!(
                "metadata: [{{name: concurrency, value: \"{}\"}}, ",
                10 + n % 2
            ),
            1,
        )
    };
    let http = reqwest::Client::new();
    let body = Bytes::from(serde_json::to_vec(
        &json!({"orderId": 1, "pad": "x".repeat(1000)}),
    )?);
    let op = http_op(
        &http,
        format!("{}/v1.0/publish/redis/bench.reload", sidecar.http),
        body,
        "application/json",
    );
    // each applied reload connects a new instance: the server's connection count shows that
    // the rewrites were reloads
    let mut redis = redis::Client::open(format!("redis://{}", opts.redis))?
        .get_multiplexed_async_connection()
        .await?;
    let connections_before = connections_received(&mut redis).await?;
    let mut steady = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut reloading = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut rewrites = 0u64;
    for _ in 0..opts.blocks {
        steady.add(run_block(1, opts.block, op.clone()).await?.0)?;
        let writer = {
            let (file, variants): (_, Vec<String>) = (file.clone(), (0..2).map(variant).collect());
            let block = opts.block;
            tokio::spawn(async move {
                let start = std::time::Instant::now();
                let mut n = 0u64;
                while start.elapsed() < block {
                    std::fs::write(&file, &variants[(n % 2) as usize])?;
                    n += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Ok::<_, anyhow::Error>(n)
            })
        };
        reloading.add(run_block(1, opts.block, op.clone()).await?.0)?;
        rewrites += writer.await.context("rewriter")??;
    }
    let connections = connections_received(&mut redis).await? - connections_before;
    std::fs::write(&file, &original)?;
    println!(
        "\nhot reload cost (Redis, HTTP publish, concurrency 1, {} interleaved blocks of {:?}; the component rewritten every second: {rewrites} rewrites, {connections} connections opened meanwhile)",
        opts.blocks, opts.block
    );
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9}",
        "variant", "p50 µs", "p99 µs", "p99.9 µs", "max µs"
    );
    let mut rows = Vec::new();
    for (name, h) in [("no reload", &steady), ("reload every second", &reloading)] {
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>9}",
            name,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
        rows.push(json!({"variant": name, "publishes": h.len(), "p50_us": h.value_at_quantile(0.5),
            "p99_us": h.value_at_quantile(0.99), "p999_us": h.value_at_quantile(0.999), "max_us": h.max()}));
    }
    Ok(json!({"rewrites": rewrites, "redis_connections_opened": connections, "rows": rows}))
}

/// Redis's `total_connections_received`.
async fn connections_received(conn: &mut redis::aio::MultiplexedConnection) -> Result<u64> {
    let info: String = redis::cmd("INFO").arg("stats").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .context("INFO stats without total_connections_received")
}
