//! Publish rows: A = the broker written directly (the Redis client itself, or the component
//! in process, i.e. the same client and code path without the sidecar hop), B = the same
//! publish through daprd-rs over HTTP and gRPC. Bulk rows publish 10 or 100 entries a call.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bytes::Bytes;
use daprd_core::pubsub::{PubSub, PublishRequest};
use daprd_proto::runtime::v1 as pb;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::proc::cpu_ticks;
use crate::{Broker, Sidecar};

/// One publish (or one bulk call) of a row.
pub type Op = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<()>> + Send>> + Send + Sync>;

/// A row of the publish table.
pub struct RowSpec {
    pub name: String,
    /// Which A row it is compared with (index into the rows), if any.
    pub baseline: Option<usize>,
    /// Whether the work runs in the sidecar (its CPU time is attributed to this row).
    pub sidecar: bool,
    /// The sidecar whose CPU is charged to this row, when not the main one.
    pub pid: Option<u32>,
    /// Messages per call (bulk rows).
    pub per_op: u64,
    pub op: Op,
}

/// Runs `op` with `concurrency` workers for `dur`; returns the latency histogram (µs) and
/// calls per second.
pub async fn run_block(concurrency: usize, dur: Duration, op: Op) -> Result<(Histogram<u64>, f64)> {
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
    let rate = total.len() as f64 / start.elapsed().as_secs_f64();
    Ok((total, rate))
}

/// The median of `v` (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub fn http_op(http: &reqwest::Client, url: String, body: Bytes, content_type: &'static str) -> Op {
    let http = http.clone();
    Arc::new(move || {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        Box::pin(async move {
            let r = http
                .post(&url)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await?;
            if r.status() != 204 {
                bail!("publish answered {}: {}", r.status(), r.text().await?);
            }
            Ok(())
        })
    })
}

fn grpc_op(
    grpc: &pb::dapr_client::DaprClient<tonic::transport::Channel>,
    pubsub: &str,
    topic: &str,
    body: &Bytes,
) -> Op {
    let (grpc, pubsub, topic, body) = (
        grpc.clone(),
        pubsub.to_string(),
        topic.to_string(),
        body.to_vec(),
    );
    Arc::new(move || {
        let (mut grpc, pubsub, topic, data) =
            (grpc.clone(), pubsub.clone(), topic.clone(), body.clone());
        Box::pin(async move {
            grpc.publish_event(pb::PublishEventRequest {
                pubsub_name: pubsub,
                topic,
                data,
                data_content_type: "application/json".into(),
                ..Default::default()
            })
            .await?;
            Ok(())
        })
    })
}

fn grpc_bulk_op(
    grpc: &pb::dapr_client::DaprClient<tonic::transport::Channel>,
    pubsub: &str,
    topic: &str,
    body: &Bytes,
    n: usize,
) -> Op {
    let request = pb::BulkPublishRequest {
        pubsub_name: pubsub.to_string(),
        topic: topic.to_string(),
        entries: (0..n)
            .map(|i| pb::BulkPublishRequestEntry {
                entry_id: i.to_string(),
                event: body.to_vec(),
                content_type: "application/json".into(),
                metadata: Default::default(),
            })
            .collect(),
        metadata: Default::default(),
    };
    let grpc = grpc.clone();
    Arc::new(move || {
        let (mut grpc, request) = (grpc.clone(), request.clone());
        Box::pin(async move {
            let r = grpc.bulk_publish_event(request).await?.into_inner();
            if !r.failed_entries.is_empty() {
                bail!("bulk publish failed {} entries", r.failed_entries.len());
            }
            Ok(())
        })
    })
}

fn component_op(c: Arc<dyn PubSub>, topic: &str, body: &Bytes) -> Op {
    let (topic, body) = (topic.to_string(), body.clone());
    Arc::new(move || {
        let (c, topic, data) = (c.clone(), topic.clone(), body.clone());
        Box::pin(async move {
            c.publish(PublishRequest {
                pubsub_name: "bench".into(),
                topic,
                data,
                metadata: BTreeMap::new(),
                content_type: Some("application/json".into()),
            })
            .await?;
            Ok(())
        })
    })
}

fn xadd(topic: &str, body: &[u8]) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(topic)
        .arg("MAXLEN")
        .arg("~")
        .arg(crate::REDIS_MAXLEN)
        .arg("*")
        .arg("data")
        .arg(body)
        .arg("metadata")
        .arg("{}");
    cmd
}

fn redis_op(conn: &redis::aio::ConnectionManager, topic: &str, body: &Bytes, n: usize) -> Op {
    let (conn, topic, body) = (conn.clone(), topic.to_string(), body.clone());
    Arc::new(move || {
        let (mut conn, topic, body) = (conn.clone(), topic.clone(), body.clone());
        Box::pin(async move {
            if n == 1 {
                let _: String = xadd(&topic, &body).query_async(&mut conn).await?;
            } else {
                let mut pipe = redis::pipe();
                for _ in 0..n {
                    pipe.add_command(xadd(&topic, &body));
                }
                let _: Vec<String> = pipe.query_async(&mut conn).await?;
            }
            Ok(())
        })
    })
}

/// The body of `POST /v1.0-alpha1/publish/bulk/...` with `n` entries of `event`.
fn bulk_body(event: &serde_json::Value, n: usize) -> Bytes {
    let entries: Vec<_> = (0..n)
        .map(|i| json!({"entryId": i.to_string(), "event": event, "contentType": "application/json"}))
        .collect();
    Bytes::from(serde_json::to_vec(&entries).unwrap_or_default())
}

/// Every row for the brokers that are up.
pub async fn rows(
    sidecar: &Sidecar,
    brokers: &[Broker],
    topic: &str,
    event: &serde_json::Value,
    redis_conn: Option<&redis::aio::ConnectionManager>,
    uds: Option<&Sidecar>,
) -> Result<Vec<RowSpec>> {
    let body = Bytes::from(serde_json::to_vec(event)?);
    let http = reqwest::Client::new();
    let grpc = pb::dapr_client::DaprClient::connect(sidecar.grpc.clone()).await?;
    let mut rows: Vec<RowSpec> = Vec::new();
    let url = |pubsub: &str, q: &str| format!("{}/v1.0/publish/{pubsub}/{topic}{q}", sidecar.http);
    // The same publishes over the APIs' Unix domain sockets, to a sidecar of their own.
    let uds = match uds {
        Some(s) => Some((s, s.uds_http()?, s.uds_grpc().await?)),
        None => None,
    };
    for b in brokers {
        let name = b.component();
        let baseline = if let (Broker::Redis, Some(conn)) = (b, redis_conn) {
            rows.push(RowSpec {
                name: "A   redis direct XADD".into(),
                baseline: None,
                sidecar: false,
                pid: None,
                per_op: 1,
                op: redis_op(conn, topic, &body, 1),
            });
            Some(rows.len() - 1)
        } else if let Some(c) = b.connect_in_process().await? {
            rows.push(RowSpec {
                name: format!("A   {name} component in process"),
                baseline: None,
                sidecar: false,
                pid: None,
                per_op: 1,
                op: component_op(c, topic, &body),
            });
            Some(rows.len() - 1)
        } else {
            None
        };
        let sidecar_row = |label: &str, op: Op, per_op: u64| RowSpec {
            name: format!(
                "{}{name} {label}",
                if baseline.is_some() { "B   " } else { "    " }
            ),
            baseline,
            sidecar: true,
            pid: None,
            per_op,
            op,
        };
        rows.push(sidecar_row(
            "HTTP CloudEvent",
            http_op(&http, url(name, ""), body.clone(), "application/json"),
            1,
        ));
        if matches!(b, Broker::Redis) {
            rows.push(sidecar_row(
                "HTTP raw",
                http_op(
                    &http,
                    url(name, "?metadata.rawPayload=true"),
                    body.clone(),
                    "application/json",
                ),
                1,
            ));
        }
        rows.push(sidecar_row(
            "gRPC CloudEvent",
            grpc_op(&grpc, name, topic, &body),
            1,
        ));
        if let (Broker::Redis, Some((uds, uds_http, uds_grpc))) = (b, &uds) {
            let pid = Some(uds.child.id());
            rows.push(RowSpec {
                pid,
                ..sidecar_row(
                    "HTTP/UDS CloudEvent",
                    http_op(
                        uds_http,
                        format!("{}/v1.0/publish/{name}/{topic}", uds.http),
                        body.clone(),
                        "application/json",
                    ),
                    1,
                )
            });
            rows.push(RowSpec {
                pid,
                ..sidecar_row(
                    "gRPC/UDS CloudEvent",
                    grpc_op(uds_grpc, name, topic, &body),
                    1,
                )
            });
        }
    }
    // Bulk rows (Redis has native bulk publish: one XADD pipeline a call).
    if let (true, Some(conn)) = (brokers.contains(&Broker::Redis), redis_conn) {
        rows.push(RowSpec {
            name: "A   redis direct pipeline x100".into(),
            baseline: None,
            sidecar: false,
            pid: None,
            per_op: 100,
            op: redis_op(conn, topic, &body, 100),
        });
        let baseline = Some(rows.len() - 1);
        for n in [10usize, 100] {
            rows.push(RowSpec {
                name: format!("B   redis HTTP bulk x{n}"),
                baseline: (n == 100).then_some(baseline).flatten(),
                sidecar: true,
                pid: None,
                per_op: n as u64,
                op: http_op(
                    &http,
                    format!("{}/v1.0-alpha1/publish/bulk/redis/{topic}", sidecar.http),
                    bulk_body(event, n),
                    "application/json",
                ),
            });
        }
        rows.push(RowSpec {
            name: "B   redis gRPC bulk x100".into(),
            baseline,
            sidecar: true,
            pid: None,
            per_op: 100,
            op: grpc_bulk_op(&grpc, "redis", topic, &body, 100),
        });
    }
    rows.push(RowSpec {
        name: "    in-memory HTTP bulk x100".into(),
        baseline: None,
        sidecar: true,
        pid: None,
        per_op: 100,
        op: http_op(
            &http,
            format!("{}/v1.0-alpha1/publish/bulk/memory/{topic}", sidecar.http),
            bulk_body(event, 100),
            "application/json",
        ),
    });
    Ok(rows)
}

#[derive(Default, Clone)]
struct Figures {
    p50: Vec<f64>,
    p99: Vec<f64>,
    p999: Vec<f64>,
    calls: Vec<f64>,
    ticks: u64,
    ops: u64,
}

/// Runs the rows in interleaved blocks at `concurrency` and prints the table; returns JSON rows.
pub async fn measure(
    rows: &[RowSpec],
    concurrency: usize,
    blocks: usize,
    block: Duration,
    sidecar_pid: u32,
) -> Result<Vec<serde_json::Value>> {
    let mut figures = vec![Figures::default(); rows.len()];
    for _ in 0..blocks {
        for (i, row) in rows.iter().enumerate() {
            let pid = row.pid.unwrap_or(sidecar_pid);
            let before = cpu_ticks(pid);
            let (h, calls) = run_block(concurrency, block, row.op.clone()).await?;
            let after = cpu_ticks(pid);
            let f = &mut figures[i];
            if let (Some(a), Some(b)) = (before, after) {
                f.ticks += b.saturating_sub(a);
            }
            f.ops += h.len() * row.per_op;
            f.p50.push(h.value_at_quantile(0.5) as f64);
            f.p99.push(h.value_at_quantile(0.99) as f64);
            f.p999.push(h.value_at_quantile(0.999) as f64);
            f.calls.push(calls);
        }
    }
    println!(
        "\nconcurrency {concurrency} ({blocks} interleaved blocks of {block:?}, 1 KB JSON events; medians of blocks)"
    );
    println!(
        "{:<36} {:>8} {:>8} {:>9} {:>10} {:>10} {:>10} {:>9}",
        "row", "p50 µs", "p99 µs", "p99.9 µs", "msg/s", "+p50 µs", "+p99 µs", "CPU µs/msg"
    );
    let medians: Vec<(f64, f64, f64, f64)> = figures
        .iter_mut()
        .map(|f| {
            (
                median(&mut f.p50),
                median(&mut f.p99),
                median(&mut f.p999),
                median(&mut f.calls),
            )
        })
        .collect();
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let (p50, p99, p999, calls) = medians[i];
        let msgs = calls * row.per_op as f64;
        let added = row
            .baseline
            .map(|b| (p50 - medians[b].0, p99 - medians[b].1));
        // one tick = 10 ms of CPU (USER_HZ 100)
        let cpu = (row.sidecar && figures[i].ops > 0)
            .then(|| figures[i].ticks as f64 * 10_000.0 / figures[i].ops as f64);
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<36} {:>8.0} {:>8.0} {:>9.0} {:>10.0} {:>10} {:>10} {:>9}",
            row.name,
            p50,
            p99,
            p999,
            msgs,
            opt(added.map(|a| a.0)),
            opt(added.map(|a| a.1)),
            cpu.map(|c| format!("{c:.1}")).unwrap_or_else(|| "-".into()),
        );
        out.push(json!({
            "concurrency": concurrency, "row": row.name.trim(), "p50_us": p50, "p99_us": p99,
            "p999_us": p999, "msgs_per_s": msgs, "entries_per_call": row.per_op,
            "added_p50_us": added.map(|a| a.0), "added_p99_us": added.map(|a| a.1),
            "ratio_p50": row.baseline.map(|b| p50 / medians[b].0.max(1.0)),
            "ratio_p99": row.baseline.map(|b| p99 / medians[b].1.max(1.0)),
            "sidecar_cpu_us_per_msg": cpu,
        }));
    }
    Ok(out)
}
