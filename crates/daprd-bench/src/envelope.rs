//! What the CloudEvent envelope of a publish costs, in this process, side by side: the tree
//! path (`new_envelope` + `apply_ttl` + Go's JSON encoding of the tree: what the publisher did
//! before) and the one-pass path the publisher uses (`envelope_bytes`), for a 1 KB JSON body
//! with sorted keys, the same body with its keys out of order (as `JSON.stringify` of an
//! object built in another order sends it), a 1 MB JSON body and a 1 KB text body. Both paths
//! give the same bytes (checked here once per body, and by the unit and fuzz tests).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Result};
use daprd_core::cloudevent::{self, EnvelopeRequest};
use serde_json::json;

/// The publish of `data` to `topic` on the Redis component, as the harness's sidecar (app id
/// `bench`) sees it; the other large-message rows write the same envelope directly.
pub fn request<'a>(
    topic: &'a str,
    content_type: &'a str,
    data: &'a [u8],
    md: &'a BTreeMap<String, String>,
) -> EnvelopeRequest<'a> {
    EnvelopeRequest {
        source: "bench",
        topic,
        pubsub_name: "redis",
        data_content_type: content_type,
        data,
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate: "",
        metadata: Some(md),
        new_id: "5b0c3b8e-7d3f-4d0e-9f44-2d2b8f0c1a77",
        now: SystemTime::now(),
    }
}

fn by_tree(req: &EnvelopeRequest<'_>, md: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut ce = cloudevent::new_envelope(req)?;
    cloudevent::apply_ttl(&mut ce, md, false, req.now);
    Ok(daprd_core::json::to_vec_go(&ce)?)
}

/// Mean time of `f` over `iterations` runs, after as many to warm up.
fn mean(iterations: u32, mut f: impl FnMut() -> Result<Vec<u8>>) -> Result<Duration> {
    for _ in 0..iterations {
        std::hint::black_box(f()?);
    }
    let started = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(f()?);
    }
    Ok(started.elapsed() / iterations)
}

/// Runs the rows and prints them; returns them as JSON.
pub fn run(quick: bool) -> Result<serde_json::Value> {
    let pad = "x".repeat(1000);
    let sorted = serde_json::to_vec(&json!({"orderId": 1, "pad": pad}))?;
    let unsorted = format!(r#"{{"pad":"{pad}","orderId":1,"customer":{{"name":"n","id":7}}}}"#);
    let big = serde_json::to_vec(&json!({
        "items": (0..10_000).map(|i| json!({"sku": i, "note": "y".repeat(90)})).collect::<Vec<_>>()
    }))?;
    let text = pad.clone().into_bytes();
    let md = BTreeMap::new();
    let bodies: [(&str, &str, &[u8], u32); 4] = [
        (
            "1 KB JSON, keys sorted",
            "application/json",
            &sorted,
            20_000,
        ),
        (
            "1 KB JSON, keys out of order",
            "application/json",
            unsorted.as_bytes(),
            20_000,
        ),
        ("1 MB JSON (10,000 objects)", "application/json", &big, 20),
        ("1 KB text", "text/plain", &text, 20_000),
    ];
    println!("\nCloudEvent envelope of one publish, in process (tree = before, one pass = now)");
    println!(
        "{:<32} {:>12} {:>12} {:>8}",
        "body", "tree", "one pass", "ratio"
    );
    let mut rows = Vec::new();
    for (name, ct, data, iterations) in bodies {
        let iterations = if quick {
            iterations / 20 + 1
        } else {
            iterations
        };
        let req = request("orders", ct, data, &md);
        ensure!(
            by_tree(&req, &md)? == cloudevent::envelope_bytes(&req, false)?,
            "the two envelope paths differ for {name}"
        );
        let tree = mean(iterations, || by_tree(&req, &md))?;
        let one_pass = mean(iterations, || Ok(cloudevent::envelope_bytes(&req, false)?))?;
        let ratio = tree.as_secs_f64() / one_pass.as_secs_f64();
        println!("{name:<32} {tree:>12.1?} {one_pass:>12.1?} {ratio:>7.1}×");
        rows.push(json!({
            "body": name,
            "bytes": data.len(),
            "tree_ns": tree.as_nanos(),
            "one_pass_ns": one_pass.as_nanos(),
        }));
    }
    Ok(json!(rows))
}
