//! App health checks (`--enable-app-health-check`): probe the app every interval (HTTP
//! `GET <path>` answering 2xx, or gRPC `AppCallbackHealthCheck.HealthCheck`); after
//! `threshold` failures in a row the app is unhealthy, after one success healthy again.
//! Subscriptions to the app follow this state.

use std::sync::Arc;
use std::time::Duration;

use daprd_proto::runtime::v1 as pb;

use crate::runtime::RuntimeState;

async fn probe_http(client: &reqwest::Client, url: &str, timeout: Duration) -> bool {
    matches!(tokio::time::timeout(timeout, client.get(url).send()).await, Ok(Ok(r)) if r.status().is_success())
}

/// Probes the app until shutdown, publishing the health in `state.app_health`.
pub async fn monitor(state: Arc<RuntimeState>) {
    let Some(health) = state.config.app.health.clone() else {
        return;
    };
    let app = &state.config.app;
    let host = if app.channel_address.contains(':') {
        format!("[{}]", app.channel_address)
    } else {
        app.channel_address.clone()
    };
    let grpc = app.protocol.starts_with("grpc");
    let client = reqwest::Client::new();
    let url = format!(
        "http://{host}:{}/{}",
        app.port,
        health.path.trim_start_matches('/')
    );
    let grpc_client =
        tonic::transport::Endpoint::from_shared(format!("http://{host}:{}", app.port))
            .ok()
            .map(|e| {
                pb::app_callback_health_check_client::AppCallbackHealthCheckClient::new(
                    e.connect_lazy(),
                )
            });
    let mut failures: i64 = 0;
    let shutdown = state.shutdown.clone();
    loop {
        let ok = if grpc {
            match &grpc_client {
                Some(c) => matches!(
                    tokio::time::timeout(health.timeout, c.clone().health_check(())).await,
                    Ok(Ok(_))
                ),
                None => false,
            }
        } else {
            probe_http(&client, &url, health.timeout).await
        };
        if ok {
            failures = 0;
            state.set_app_health(true);
        } else {
            failures += 1;
            if failures >= health.threshold {
                state.set_app_health(false);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(health.interval) => {}
            _ = shutdown.wait() => return,
        }
    }
}
