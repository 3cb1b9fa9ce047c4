//! Bulk publish memory: a fresh sidecar per broker gets three bulk publishes of 50,000 small
//! entries (a body just under the 4 MiB default limit); its RSS is read before, after each
//! request and a second after the last. The peak of a request must not stay with the process.

use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use crate::{proc, start_sidecar, Broker, Opts};

/// Entries per request (full mode) and the requests sent.
const ENTRIES: usize = 50_000;
const REQUESTS: usize = 3;

/// Runs the measurement for each of `brokers` that is in-memory or Redis.
pub async fn run(opts: &Opts, brokers: &[Broker]) -> Result<serde_json::Value> {
    let entries = if opts.quick { 5_000 } else { ENTRIES };
    let body = serde_json::to_vec(
        &(0..entries)
            .map(|i| json!({"entryId": i.to_string(), "event": "x".repeat(20), "contentType": "text/plain"}))
            .collect::<Vec<_>>(),
    )?;
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    println!(
        "\nbulk publish memory ({entries} entries, body {:.2} MiB, {REQUESTS} requests)",
        body.len() as f64 / (1 << 20) as f64
    );
    println!(
        "{:<10} {:>10} {:>24} {:>10}",
        "broker", "idle MiB", "after each request MiB", "after MiB"
    );
    for b in brokers
        .iter()
        .copied()
        .filter(|b| matches!(b, Broker::Memory | Broker::Redis))
    {
        let (sidecar, _) = start_sidecar(opts, &[b], None).await?;
        let pid = sidecar.child.id();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = proc::rss_mib(pid);
        let mut each = Vec::new();
        let url = format!(
            "{}/v1.0-alpha1/publish/bulk/{}/bench.bulkmem",
            sidecar.http,
            b.component()
        );
        for _ in 0..REQUESTS {
            proc::post_json(&client, &url, body.clone(), "bulk publish").await?;
            each.push(proc::rss_mib(pid));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = proc::rss_mib(pid);
        println!(
            "{:<10} {:>10.1} {:>24} {:>10.1}",
            b.component(),
            idle,
            proc::mib_list(&each),
            after
        );
        out.push(
            json!({"broker": b.component(), "entries": entries, "body_bytes": body.len(),
                        "idle_mib": idle, "after_each_mib": each, "after_mib": after}),
        );
    }
    Ok(json!(out))
}
