//! Starts and tracks subscriptions: waits for the app port, discovers programmatic
//! subscriptions, merges them with the declarative ones, checks scoping, subscribes to the
//! components (retrying failed starts with backoff), and stops them all on shutdown.

use daprd_core::backoff::Backoff;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use daprd_core::pubsub::{SubscribeRequest, Subscription};

use crate::config::AppProtocol;
use crate::inbound::channel::{AppChannel, ChannelError, GrpcChannel, HttpChannel};
use crate::inbound::delivery::{InFlight, PipelineSlot, SubscriptionPipeline};
use crate::inbound::subscriptions::{merge, SubscriptionSpec};
use crate::state::RuntimeState;
use crate::store::PubSubEntry;

struct Active {
    id: u64,
    spec: SubscriptionSpec,
    handle: Option<Subscription>,
    /// Where its deliveries go (kept to subscribe again on a new component instance).
    channel: Arc<dyn AppChannel>,
    /// Its pipeline (swapped in place when only routing or dead-lettering changes).
    slot: Arc<PipelineSlot>,
    /// Counts the subscription in `dapr_component_pubsub_subscriptions` while it lives.
    _gauge: Option<crate::metrics::GaugeGuard>,
}

/// What the app's subscriptions should be, as far as known.
#[derive(Default)]
struct AppSubscriptions {
    /// The app channel, once the app listens.
    channel: Option<Arc<dyn AppChannel>>,
    /// The declarative subscriptions (the resources as last loaded).
    declarative: Vec<SubscriptionSpec>,
    /// The programmatic subscriptions (the app's answer at start).
    programmatic: Vec<SubscriptionSpec>,
    /// Whether the app's subscriptions run (the app listens and is healthy).
    running: bool,
}

/// The subscriptions of this sidecar.
#[derive(Default)]
pub struct Subscriptions {
    active: Mutex<Vec<Active>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Deliveries in flight (all subscriptions).
    pub in_flight: Arc<InFlight>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    app: Mutex<AppSubscriptions>,
    /// Held by whoever starts or stops app subscriptions (start-up, app health, hot reload),
    /// so that two of them never work on the same subscriptions at once.
    pub(crate) changing: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
        lock(&self.active).iter().map(|a| a.spec.clone()).collect()
    }

    /// Records a started subscription; returns its id for [`Subscriptions::remove`].
    pub fn add(
        &self,
        spec: SubscriptionSpec,
        handle: Subscription,
        channel: Arc<dyn AppChannel>,
        slot: Arc<PipelineSlot>,
    ) -> u64 {
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
        lock(&self.active).push(Active {
            id,
            spec,
            handle: Some(handle),
            channel,
            slot,
            _gauge: gauge,
        });
        id
    }

    /// Stops and forgets one subscription.
    pub fn remove(&self, id: u64) {
        drop(self.take(id));
    }

    /// Forgets one subscription and hands back its handle (to stop it and wait for its
    /// drain).
    pub(crate) fn take(&self, id: u64) -> Option<Subscription> {
        let mut active = lock(&self.active);
        let at = active.iter().position(|a| a.id == id)?;
        active.remove(at).handle
    }

    /// The subscriptions on component `pubsub`: id, spec and app channel.
    pub(crate) fn on_component(
        &self,
        pubsub: &str,
    ) -> Vec<(u64, SubscriptionSpec, Arc<dyn AppChannel>)> {
        lock(&self.active)
            .iter()
            .filter(|a| a.spec.pubsub == pubsub)
            .map(|a| (a.id, a.spec.clone(), a.channel.clone()))
            .collect()
    }

    /// Every subscription: id, spec and channel.
    pub(crate) fn all(&self) -> Vec<(u64, SubscriptionSpec, Arc<dyn AppChannel>)> {
        lock(&self.active)
            .iter()
            .map(|a| (a.id, a.spec.clone(), a.channel.clone()))
            .collect()
    }

    /// The app's subscriptions (not the streaming ones): id and spec.
    pub(crate) fn app_active(&self) -> Vec<(u64, SubscriptionSpec, Arc<dyn AppChannel>)> {
        lock(&self.active)
            .iter()
            .filter(|a| a.spec.kind != crate::inbound::subscriptions::SubscriptionKind::Streaming)
            .map(|a| (a.id, a.spec.clone(), a.channel.clone()))
            .collect()
    }

    /// Gives subscription `id` a new component subscription and pipeline; returns the old
    /// handle (to stop it and wait for its drain).
    pub(crate) fn replace(
        &self,
        id: u64,
        handle: Subscription,
        slot: Arc<PipelineSlot>,
    ) -> Option<Subscription> {
        let mut active = lock(&self.active);
        let a = active.iter_mut().find(|a| a.id == id)?;
        a.slot = slot;
        a.handle.replace(handle)
    }

    /// Sends subscription `id`'s next messages through `pipeline` (same component
    /// subscription, new spec).
    pub(crate) fn swap_pipeline(&self, id: u64, pipeline: Arc<SubscriptionPipeline>) {
        let mut active = lock(&self.active);
        if let Some(a) = active.iter_mut().find(|a| a.id == id) {
            a.spec = pipeline.spec.clone();
            a.slot.replace(pipeline);
        }
    }

    /// Sets the declarative subscriptions (start-up and every reload).
    pub(crate) fn set_declarative(&self, specs: Vec<SubscriptionSpec>) {
        lock(&self.app).declarative = specs;
    }

    /// The app's subscriptions as they should run, with the app channel: `None` while the
    /// app's subscriptions do not run (no app yet, or unhealthy).
    pub(crate) fn desired_app(
        &self,
        app_id: &str,
    ) -> Option<(Vec<SubscriptionSpec>, Arc<dyn AppChannel>)> {
        let app = lock(&self.app);
        let channel = app.channel.clone().filter(|_| app.running)?;
        Some((
            merge(app.declarative.clone(), app.programmatic.clone(), app_id),
            channel,
        ))
    }

    /// The app channel, once the app listens.
    pub(crate) fn app_channel(&self) -> Option<Arc<dyn AppChannel>> {
        lock(&self.app).channel.clone()
    }

    /// Replaces the programmatic subscriptions on the components `changed` with those of
    /// `listed` on them (the app asked again after those components changed).
    pub(crate) fn replace_programmatic(&self, changed: &[String], listed: Vec<SubscriptionSpec>) {
        let mut app = lock(&self.app);
        app.programmatic.retain(|s| !changed.contains(&s.pubsub));
        app.programmatic
            .extend(listed.into_iter().filter(|s| changed.contains(&s.pubsub)));
    }

    fn set_app(&self, channel: Arc<dyn AppChannel>, programmatic: Vec<SubscriptionSpec>) {
        let mut app = lock(&self.app);
        app.channel = Some(channel);
        app.programmatic = programmatic;
    }

    fn set_running(&self, running: bool) {
        lock(&self.app).running = running;
    }

    /// Stops and forgets the app-channel subscriptions (not the streaming ones); returns
    /// their specs so they can be started again.
    pub fn stop_app(&self) -> Vec<SubscriptionSpec> {
        let removed: Vec<Active> = {
            let mut active = lock(&self.active);
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
        let mut active = lock(&self.active);
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

/// Subscribes `spec` on `entry`'s component, its deliveries going to `channel`.
///
/// # Errors
/// The component's refusal.
pub(crate) async fn subscribe_on(
    state: &RuntimeState,
    in_flight: &Arc<InFlight>,
    spec: &SubscriptionSpec,
    entry: &Arc<PubSubEntry>,
    channel: Arc<dyn AppChannel>,
) -> Result<(Subscription, Arc<PipelineSlot>), daprd_core::pubsub::PubSubError> {
    let pipeline = Arc::new(SubscriptionPipeline::new(
        state,
        in_flight.clone(),
        spec.clone(),
        entry.clone(),
        channel,
    ));
    let slot = PipelineSlot::new(pipeline);
    let request = SubscribeRequest {
        topic: entry.broker_topic(&spec.topic),
        metadata: spec.metadata.clone(),
        bulk: spec.bulk.enabled.then(|| spec.bulk.max_messages.max(1)),
    };
    let handler = if spec.bulk.enabled {
        crate::inbound::bulk::handler(slot.clone(), spec.bulk)
    } else {
        slot.clone().handler()
    };
    let handle = entry.component.subscribe(request, handler).await?;
    Ok((handle, slot))
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
            .with_metrics(state.metrics.clone())
            .with_shutdown(state.shutdown.clone()),
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
            .with_metrics(state.metrics.clone())
            .with_shutdown(state.shutdown.clone()),
        ))
    }
}

async fn wait_for_app_port(state: &RuntimeState) -> bool {
    // (an IPv6 channel address in brackets, as the channels write it)
    let addr = format!(
        "{}:{}",
        super::channel::uri_host(&state.config.app.channel_address),
        state.config.app.port
    );
    tracing::info!(%addr, "waiting for the app to listen");
    loop {
        if state.shutdown.is_triggered() {
            return false;
        }
        if super::channel::reach::accepts(&addr).await {
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
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match subscribe_on(
            state,
            &subscriptions.in_flight,
            &spec,
            &entry,
            channel.clone(),
        )
        .await
        {
            Ok((handle, slot)) => {
                tracing::info!(pubsub = %spec.pubsub, topic = %spec.topic, kind = ?spec.kind, "subscribed");
                return Some(subscriptions.add(spec, handle, channel, slot));
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
    // a reload from here on replaces them
    subscriptions.set_declarative(declarative);
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
    subscriptions.set_app(channel.clone(), programmatic);
    if state.config.app.health.is_none() {
        start_desired(&state, &subscriptions).await;
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
            start_desired(&state, &subscriptions).await;
            running = true;
            state.set_ready();
        } else if !healthy && running {
            let _changing = subscriptions.changing.lock().await;
            subscriptions.set_running(false);
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

/// Marks the app's subscriptions running and starts them as they are now desired.
async fn start_desired(state: &Arc<RuntimeState>, subscriptions: &Subscriptions) {
    let _changing = subscriptions.changing.lock().await;
    subscriptions.set_running(true);
    let Some((specs, channel)) = subscriptions.desired_app(&state.config.app_id) else {
        return;
    };
    for spec in specs {
        start_one(state, subscriptions, spec, channel.clone()).await;
    }
}
