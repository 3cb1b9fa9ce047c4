//! Starts an in-process sidecar on 127.0.0.1 with ports picked by the OS (shared by the
//! integration tests through `#[path]`).

#![allow(dead_code)]

use std::sync::Arc;

use clap::Parser;
use daprd_runtime::config::{Env, Options, RuntimeConfig};
use daprd_runtime::serve::{self, Sidecar};
use daprd_runtime::state::RuntimeState;
use daprd_testkit::ScratchDir;

/// A running in-process sidecar.
pub struct Running {
    pub state: Arc<RuntimeState>,
    pub subscriptions: Arc<daprd_runtime::inbound::subscriber::Subscriptions>,
    pub http: String,
    pub grpc: String,
    pub _dir: ScratchDir,
}

/// Starts a sidecar with `resources` (one YAML document each), `env` and `extra` flags.
pub async fn start(resources: &[&str], app_id: &str, env: Env, extra: &[&str]) -> Running {
    let dir = ScratchDir::new("sidecar");
    for (i, doc) in resources.iter().enumerate() {
        dir.write(&format!("c{i}.yaml"), doc);
    }
    let mut argv: Vec<String> = [
        "daprd",
        "--app-id",
        app_id,
        "--dapr-http-port",
        "0",
        "--dapr-grpc-port",
        "0",
        "--dapr-listen-addresses",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--metrics-listen-address",
        "127.0.0.1",
    ]
    .iter()
    .chain(extra.iter())
    .map(|s| s.to_string())
    .collect();
    argv.push("--resources-path".into());
    argv.push(dir.path().to_string_lossy().into_owned());
    let opts = Options::try_parse_from(argv).expect("flags");
    let config = RuntimeConfig::from_options(&opts, env, true).expect("config");
    let loaded = serve::load(&config, &daprd_components::builtin_registry(), true)
        .await
        .expect("components");
    let sidecar = Sidecar::start(config, loaded).await.expect("start");
    let running = Running {
        state: sidecar.state.clone(),
        subscriptions: sidecar.subscriptions.clone(),
        http: format!("http://{}", sidecar.http_addrs[0]),
        grpc: format!("http://{}", sidecar.grpc_addrs[0]),
        _dir: dir,
    };
    tokio::spawn(sidecar.run_until_shutdown());
    running
}
