//! Starts and tracks subscriptions: waits for the app port, discovers programmatic
//! subscriptions, merges them with the declarative ones, checks scoping, subscribes to the
//! components (retrying failed starts with backoff), and stops them all on shutdown.

use daprd_core::backoff::Backoff;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use daprd_core::pubsub::{SubscribeRequest, Subscription};

use crate::config::AppProtocol;
use crate::inbound::channel::{AppChannel, ChannelError, GrpcChannel, HttpChannel};
use crate::inbound::delivery::{InFlight, SubscriptionPipeline};
use crate::inbound::subscriptions::{merge, SubscriptionSpec};
use crate::state::RuntimeState;

struct Active {
    id: u64,
    spec: SubscriptionSpec,
    handle: Option<Subscription>,
    /// Counts the subscription in `dapr_component_pubsub_subscriptions` while it lives.
    _gauge: Option<crate::metrics::GaugeGuard>,
}

/// The subscriptions of this sidecar.
#[derive(Default)]
pub struct Subscriptions {
    active: Mutex<Vec<Active>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Deliveries in flight (all subscriptions).
    pub in_flight: Arc<InFlight>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Subscriptions {
    /// No subscription yet; each one added is counted in `metrics`.
    pub fn new(metrics: Arc<crate::metrics::Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..Self::default()
        }
    }

    /// Every subscription (for the metadata API), in start order.
    pub fn list(&self) -> Vec<SubscriptionSpec> {
        self.active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|a| a.spec.clone())
            .collect()
    }

    /// Records a started subscription; returns its id for [`Subscriptions::remove`].
    pub fn add(&self, spec: SubscriptionSpec, handle: Subscription) -> u64 {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kind = match spec.kind {
            crate::inbound::subscriptions::SubscriptionKind::Declarative => "declarative",
            crate::inbound::subscriptions::SubscriptionKind::Programmatic => "programmatic",
            crate::inbound::subscriptions::SubscriptionKind::Streaming => "streaming",
        };
        let gauge = self
            .metrics
            .as_ref()
            .and_then(|m| m.subscription(&spec.pubsub, &spec.topic, kind));
        self.active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Active {
                id,
                spec,
                handle: Some(handle),
                _gauge: gauge,
            });
        id
    }

    /// Stops and forgets one subscription.
    pub fn remove(&self, id: u64) {
        let removed: Vec<Active> = {
            let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
            let (gone, keep): (Vec<Active>, Vec<Active>) =
                active.drain(..).partition(|a| a.id == id);
            *active = keep;
            gone
        };
        drop(removed);
    }

    /// Stops and forgets the app-channel subscriptions (not the streaming ones); returns
    /// their specs so they can be started again.
    pub fn stop_app(&self) -> Vec<SubscriptionSpec> {
        let removed: Vec<Active> = {
            let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
            let (gone, keep): (Vec<Active>, Vec<Active>) = active.drain(..).partition(|a| {
                a.spec.kind != crate::inbound::subscriptions::SubscriptionKind::Streaming
            });
            *active = keep;
            gone
        };
        removed.into_iter().map(|a| a.spec).collect()
    }

    /// Stops every subscription (no new messages are fetched); the returned future resolves
    /// once the components have settled (acked or nacked) every message they handed over.
    pub fn stop_all(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        let drains: Vec<_> = active
            .iter_mut()
            .filter_map(|a| a.handle.take())
            .map(Subscription::stop)
            .collect();
        async move {
            futures::future::join_all(drains).await;
        }
    }
}

/// The app channel for the configured protocol.
///
/// # Errors
/// An unsupported protocol or an unusable address.
pub fn app_channel(state: &RuntimeState) -> Result<Arc<dyn AppChannel>, ChannelError> {
    let app = &state.config.app;
    let token = state.config.env.app_api_token.clone();
    if app.protocol.is_grpc() {
        Ok(Arc::new(
            GrpcChannel::new(
                &app.channel_address,
                app.port,
                app.protocol == AppProtocol::Grpcs,
                token,
                app.max_concurrency,
            )?
            .with_metrics(state.metrics.clone()),
        ))
    } else {
        Ok(Arc::new(
            HttpChannel::new(
                &app.channel_address,
                app.port,
                app.protocol,
                &state.config.app_id,
                token,
                app.max_concurrency,
            )?
            .with_metrics(state.metrics.clone()),
        ))
    }
}

async fn wait_for_app_port(state: &RuntimeState) -> bool {
    let addr = format!(
        "{}:{}",
        state.config.app.channel_address, state.config.app.port
    );
    tracing::info!(%addr, "waiting for the app to listen");
    loop {
        if state.shutdown.is_triggered() {
            return false;
        }
        let attempt = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(&addr),
        )
        .await;
        if matches!(attempt, Ok(Ok(_))) {
            tracing::info!(%addr, "app is listening");
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Subscribes `spec` through `channel`; retries a failed start with exponential backoff
/// until it works or shutdown begins. Returns whether it started.
pub async fn start_one(
    state: &Arc<RuntimeState>,
    subscriptions: &Subscriptions,
    spec: SubscriptionSpec,
    channel: Arc<dyn AppChannel>,
) -> Option<u64> {
    let Some(entry) = state.publisher.store().pubsub(&spec.pubsub) else {
        tracing::warn!(pubsub = %spec.pubsub, topic = %spec.topic, "subscription skipped: no such pubsub component");
        return None;
    };
    if !entry
        .scoping
        .may_subscribe(&state.config.app_id, &spec.topic)
    {
        tracing::warn!(
            "subscription to topic '{}' on pubsub '{}' is not allowed",
            spec.topic,
            spec.pubsub
        );
        return None;
    }
    let pipeline = Arc::new(SubscriptionPipeline::new(
        state,
        subscriptions.in_flight.clone(),
        spec.clone(),
        entry.clone(),
        channel,
    ));
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let request = SubscribeRequest {
            topic: entry.broker_topic(&spec.topic),
            metadata: spec.metadata.clone(),
            bulk: if spec.bulk.enabled {
                Some(spec.bulk.max_messages.max(1))
            } else {
                None
            },
        };
        let handler = if spec.bulk.enabled {
            crate::inbound::bulk::handler(pipeline.clone(), spec.bulk)
        } else {
            pipeline.clone().handler()
        };
        match entry.component.subscribe(request, handler).await {
            Ok(handle) => {
                tracing::info!(pubsub = %spec.pubsub, topic = %spec.topic, kind = ?spec.kind, "subscribed");
                return Some(subscriptions.add(spec, handle));
            }
            Err(e) => {
                let pause = backoff.next_pause();
                tracing::error!(pubsub = %spec.pubsub, topic = %spec.topic, error = %e, retry_in = ?pause, "subscribing failed");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = state.shutdown.wait() => return None,
                }
            }
        }
    }
}

/// Starts the app's declarative and programmatic subscriptions once its port answers,
/// then marks the runtime ready. Without `--app-port` there is no app channel: only
/// streaming subscriptions can receive.
pub async fn start_app_subscriptions(
    state: Arc<RuntimeState>,
    subscriptions: Arc<Subscriptions>,
    declarative: Vec<SubscriptionSpec>,
) {
    if state.config.app.port == 0 {
        if !declarative.is_empty() {
            tracing::warn!(
                count = declarative.len(),
                "declarative subscriptions not started: no --app-port"
            );
        }
        state.set_ready();
        return;
    }
    if !wait_for_app_port(&state).await {
        return;
    }
    let channel = match app_channel(&state) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no app channel; subscriptions not started");
            state.set_ready();
            return;
        }
    };
    let programmatic = if state
        .config
        .disable_init_endpoints
        .iter()
        .any(|e| e == "subscribe")
    {
        Vec::new()
    } else {
        match channel.list_subscriptions().await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "subscription discovery failed; no programmatic subscriptions");
                Vec::new()
            }
        }
    };
    let specs = merge(declarative, programmatic, &state.config.app_id);
    if state.config.app.health.is_none() {
        for spec in specs {
            start_one(&state, &subscriptions, spec, channel.clone()).await;
        }
        state.set_ready();
        return;
    }
    // With app health checks, subscriptions run only while the app is healthy.
    tokio::spawn(crate::inbound::health::monitor(
        state.clone(),
        channel.clone(),
    ));
    let mut health = state.app_health.subscribe();
    let mut running = false;
    loop {
        let healthy = *health.borrow_and_update() == Some(true);
        if healthy && !running {
            for spec in specs.iter().cloned() {
                start_one(&state, &subscriptions, spec, channel.clone()).await;
            }
            running = true;
            state.set_ready();
        } else if !healthy && running {
            let stopped = subscriptions.stop_app();
            tracing::warn!(
                count = stopped.len(),
                "app is unhealthy: its subscriptions are stopped until it recovers"
            );
            running = false;
        }
        tokio::select! {
            changed = health.changed() => if changed.is_err() { return },
            _ = state.shutdown.wait() => return,
        }
    }
}
