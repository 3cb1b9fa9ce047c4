//! App health checks (`--enable-app-health-check`): probe the app every interval through
//! the app channel (so `https`, `h2c` and `grpcs` apps are probed as they are reached, as in
//! Go daprd): HTTP `GET <path>` answering 2xx, or gRPC `AppCallbackHealthCheck.HealthCheck`;
//! after `threshold` failures in a row the app is unhealthy, after one success healthy
//! again. Subscriptions to the app follow this state.

use std::sync::Arc;

use crate::inbound::channel::AppChannel;
use crate::state::RuntimeState;

/// Probes the app through `channel` until shutdown, publishing the health in
/// `state.app_health`.
pub async fn monitor(state: Arc<RuntimeState>, channel: Arc<dyn AppChannel>) {
    let Some(health) = state.config.app.health.clone() else {
        return;
    };
    let mut failures: i64 = 0;
    let shutdown = state.shutdown.clone();
    loop {
        if channel.health_probe(&health.path, health.timeout).await {
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
