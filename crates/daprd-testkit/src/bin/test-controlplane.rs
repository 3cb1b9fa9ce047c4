//! The test control plane as a process, for the SDK end-to-end tests of Kubernetes mode: a
//! CA, a Sentry and an operator (see `daprd_testkit::controlplane`) on loopback ports.
//!
//! `test-controlplane --resources DIR [--namespace NS] [--validity SECS]` serves every
//! `*.json` file of DIR (one Kubernetes object each: Component, Subscription, Resiliency,
//! Configuration) to NAMESPACE (default `default`), prints one JSON line —
//! `{"sentry", "operator", "trust_anchors", "trust_domain", "control_plane_namespace"}` — and
//! then reads commands, one JSON object per line, until its input closes:
//! `{"push": "Component"|"Subscription"|"Resiliency", "type": 1|2|3, "doc": {...}}`,
//! `{"break": true}` (end the update streams), `{"drop_connections": true}`.

use std::io::BufRead;
use std::sync::Arc;
use std::time::Duration;

use daprd_testkit::controlplane::{
    Kind, OperatorState, SentryPolicy, TestCa, TestOperator, TestSentry, CP_NAMESPACE,
    CP_TRUST_DOMAIN,
};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let resources = arg(&args, "--resources").ok_or("--resources DIR is required")?;
    let namespace = arg(&args, "--namespace").unwrap_or_else(|| "default".into());
    let validity = arg(&args, "--validity")
        .map(|v| v.parse::<u64>())
        .transpose()?
        .unwrap_or(3600);
    let mut state = OperatorState::default();
    let mut files: Vec<_> = std::fs::read_dir(&resources)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for file in files {
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&file)?)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        match doc["kind"].as_str() {
            Some("Component") => state.components.push(doc),
            Some("Subscription") => state.subscriptions.push(doc),
            Some("Resiliency") => state.resiliencies.push(doc),
            Some("Configuration") => state.configurations.push(doc),
            other => return Err(format!("{}: unknown kind {other:?}", file.display()).into()),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let ca = Arc::new(TestCa::ed25519());
        let sentry = TestSentry::spawn(
            &ca,
            SentryPolicy {
                validity: Duration::from_secs(validity),
                namespaces: vec![namespace.clone()],
                ..SentryPolicy::default()
            },
        )
        .await;
        let operator = TestOperator::spawn(&ca, &namespace, state).await;
        println!(
            "{}",
            serde_json::json!({
                "sentry": sentry.addr.to_string(),
                "operator": operator.addr.to_string(),
                "trust_anchors": ca.pem,
                "trust_domain": CP_TRUST_DOMAIN,
                "control_plane_namespace": CP_NAMESPACE,
            })
        );
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        while let Some(line) = rx.recv().await {
            let Ok(cmd) = serde_json::from_str::<serde_json::Value>(&line) else {
                eprintln!("test-controlplane: not JSON: {line}");
                continue;
            };
            if cmd["break"] == true {
                operator.break_streams();
            } else if cmd["drop_connections"] == true {
                operator.drop_connections();
            } else if let Some(kind) = cmd["push"].as_str() {
                let kind = match kind {
                    "Component" => Kind::Component,
                    "Subscription" => Kind::Subscription,
                    _ => Kind::Resiliency,
                };
                let ty = cmd["type"]
                    .as_i64()
                    .and_then(|t| i32::try_from(t).ok())
                    .unwrap_or(2);
                operator.push(kind, ty, cmd["doc"].clone());
            }
            println!("{}", serde_json::json!({"ok": true}));
        }
        drop(sentry);
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
