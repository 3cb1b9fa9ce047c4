//! Hot reload: components and declarative subscriptions change while the sidecar runs.
//!
//! A [`ResourceSource`] says what the resources are now (standalone: [`DirectoryWatcher`],
//! which reads the `--resources-path` directories again after a debounced burst of file
//! events; Kubernetes mode will stream them from the operator). The [`Reloader`] compares
//! them with what it applied ([`plan`], pure) and applies the difference:
//!
//! - a changed component is built and connected first; if that fails, the old instance keeps
//!   serving and the error names file, component and field. Otherwise every subscription on
//!   it subscribes on the new instance, publishing switches to the new instance (one map
//!   write: a publish goes to exactly one instance), the old subscriptions stop fetching and
//!   drain as at shutdown, and the old instance closes once nothing uses it. Subscribing on
//!   the new instance before the old one stops means a broker without retention (in-memory)
//!   loses nothing in between; on brokers with consumer groups or queues both consumers
//!   share the one group for that moment, so nothing is delivered twice;
//! - a removed component drains and closes; publishing to it answers "pubsub not found";
//! - a subscription whose change leaves the component's side alone (routes, rules,
//!   dead-letter topic) gets its new pipeline in place, without resubscribing; one with new
//!   metadata or bulk settings drains and subscribes again;
//! - an unchanged component is not touched (the parsed spec is compared, not file times);
//! - a file that cannot be read or parsed keeps what it held before.

pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use daprd_core::pubsub::Subscription;
use daprd_core::registry::Registry;

use crate::config::configuration::Configuration;
use crate::config::resources::{load_resources, ComponentManifest, LoadContext, Resources};
use crate::inbound::delivery::SubscriptionPipeline;
use crate::inbound::subscriber::{start_one, subscribe_on, Subscriptions};
use crate::state::RuntimeState;
use crate::store::{build_one, BuildContext, Built, PubSubEntry};

/// How long the directories must be quiet before they are read: one save (a temporary file
/// renamed over the old one, or a truncate and a write) is one burst of events, one reload.
const QUIET: Duration = Duration::from_millis(200);

/// Where the reloader learns what the resources are now.
#[async_trait::async_trait]
pub trait ResourceSource: Send {
    /// The resources as they are after the next change; `None` when no more changes come.
    async fn next(&mut self) -> Option<Resources>;
}

#[async_trait::async_trait]
impl ResourceSource for Box<dyn ResourceSource> {
    async fn next(&mut self) -> Option<Resources> {
        (**self).next().await
    }
}

/// Why the resources directories cannot be watched.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch the resources directory {}: {source}", path.display())]
pub struct WatchError {
    /// The directory.
    pub path: PathBuf,
    /// Cause.
    #[source]
    pub source: notify::Error,
}

/// Counts file events; wakes the reader.
#[derive(Default)]
struct Events {
    count: std::sync::atomic::AtomicU64,
    wake: tokio::sync::Notify,
}

impl Events {
    fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The standalone source: the `--resources-path` directories, read again once they have been
/// quiet for a moment after a change. A read that a later write overlapped (an editor that
/// truncates and then writes could be caught half way) is thrown away and done again, so a
/// reload never sees a file half written. (This is why the debouncing is ours rather than a
/// debouncer crate's: those report when events stopped, not whether a read raced a write.)
pub struct DirectoryWatcher {
    paths: Vec<PathBuf>,
    app_id: String,
    namespace: Option<String>,
    events: Arc<Events>,
    /// The event count the last snapshot was read at.
    read_at: u64,
    _watcher: notify::RecommendedWatcher,
}

impl DirectoryWatcher {
    /// Watches `paths` (not their subdirectories: the loader does not read those).
    ///
    /// # Errors
    /// A directory cannot be watched.
    pub fn new(
        paths: &[PathBuf],
        app_id: &str,
        namespace: Option<&str>,
    ) -> Result<Self, WatchError> {
        use notify::Watcher as _;
        let events = Arc::new(Events::default());
        let seen = events.clone();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            match res {
                // reading a file (ours included) changes nothing
                Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => {}
                Ok(_) => {
                    seen.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    seen.wake.notify_one();
                }
                Err(e) => tracing::warn!(error = %e, "watching the resources directories failed"),
            }
        })
        .map_err(|source| WatchError {
            path: paths.first().cloned().unwrap_or_default(),
            source,
        })?;
        for path in paths {
            watcher
                .watch(path, notify::RecursiveMode::NonRecursive)
                .map_err(|source| WatchError {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(Self {
            paths: paths.to_vec(),
            app_id: app_id.to_string(),
            namespace: namespace.map(str::to_string),
            events,
            read_at: 0,
            _watcher: watcher,
        })
    }
}

#[async_trait::async_trait]
impl ResourceSource for DirectoryWatcher {
    async fn next(&mut self) -> Option<Resources> {
        loop {
            if self.events.count() == self.read_at {
                self.events.wake.notified().await;
                continue;
            }
            // quiet for QUIET
            loop {
                let before = self.events.count();
                tokio::time::sleep(QUIET).await;
                if self.events.count() == before {
                    break;
                }
            }
            let at = self.events.count();
            let ctx = LoadContext {
                app_id: &self.app_id,
                namespace: self.namespace.as_deref(),
            };
            let resources = load_resources(&self.paths, &ctx);
            if self.events.count() == at {
                self.read_at = at;
                return Some(resources);
            }
        }
    }
}

/// Polls `done` until it holds or `deadline` passes (what it waits for, publishes ending and
/// queues emptying, has no notification of its own).
/// Returns whether `done` held in time.
async fn wait_until(deadline: tokio::time::Instant, done: impl Fn() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Applies each new state of the resources to the running sidecar, one at a time.
pub struct Reloader {
    state: Arc<RuntimeState>,
    subscriptions: Arc<Subscriptions>,
    registry: Registry,
    build: BuildContext,
    configuration: Configuration,
    /// The component manifests applied, by name.
    applied: BTreeMap<String, ComponentManifest>,
    /// The Resiliency documents the policies in force came from.
    resiliency: Vec<serde_norway::Value>,
}

/// The Resiliency documents of `resources`, in load order (what a reload compares).
pub fn resiliency_docs(resources: &Resources) -> Vec<serde_norway::Value> {
    resources
        .others
        .iter()
        .filter(|m| m.kind == "Resiliency")
        .map(|m| m.doc.clone())
        .collect()
}

impl Reloader {
    /// A reloader for the sidecar whose components were built from `applied`.
    pub fn new(
        state: Arc<RuntimeState>,
        subscriptions: Arc<Subscriptions>,
        registry: Registry,
        build: BuildContext,
        configuration: Configuration,
        applied: Vec<ComponentManifest>,
    ) -> Self {
        Self {
            state,
            subscriptions,
            registry,
            build,
            configuration,
            applied: applied.into_iter().map(|c| (c.name.clone(), c)).collect(),
            resiliency: Vec::new(),
        }
    }

    /// The Resiliency documents the running policies came from.
    #[must_use]
    pub fn with_resiliency(mut self, docs: Vec<serde_norway::Value>) -> Self {
        self.resiliency = docs;
        self
    }

    /// Applies every change `source` reports until it ends or shutdown begins.
    pub async fn run(mut self, mut source: impl ResourceSource) {
        loop {
            let next = tokio::select! {
                r = source.next() => r,
                _ = self.state.shutdown.wait() => None,
            };
            match next {
                Some(resources) => self.apply(resources).await,
                None => return,
            }
        }
    }

    /// Applies one new state of the resources.
    pub async fn apply(&mut self, mut resources: Resources) {
        let broken: BTreeSet<PathBuf> = resources.errors.iter().map(|e| e.file.clone()).collect();
        for e in &resources.errors {
            tracing::error!("hot reload: {e}; what the file held before is kept");
        }
        let configuration = &self.configuration;
        resources.components.retain(|c| {
            let denied = configuration.denies(&c.ty, &c.version);
            if denied {
                tracing::error!(
                    "hot reload: {}: component {:?}: field spec.type: {} is in the Configuration's components.deny list",
                    c.file.display(),
                    c.name,
                    c.ty
                );
            }
            !denied
        });
        let plan = plan::components(&self.applied, &resources.components, &broken);
        if !plan.is_empty() {
            let switched = self.apply_components(&resources, plan).await;
            if !switched.is_empty() {
                self.reread_programmatic(&switched).await;
            }
        }
        let (declarative, errors) =
            crate::inbound::subscriptions::parse_declarative(&resources.others);
        if errors.is_empty() && broken.is_empty() {
            self.subscriptions.set_declarative(declarative);
        } else {
            for e in &errors {
                tracing::error!("hot reload: {e}; the subscriptions are kept as they were");
            }
        }
        self.reconcile_subscriptions().await;
        if broken.is_empty() {
            self.apply_resiliency(&resources).await;
        }
    }

    /// New Resiliency documents: the policies are rebuilt and put in force, and every
    /// subscription's pipeline is rebuilt in place to take its new inbound policy.
    async fn apply_resiliency(&mut self, resources: &Resources) {
        let docs = resiliency_docs(resources);
        if docs == self.resiliency {
            return;
        }
        let (policies, errors) =
            crate::resiliency::Resiliency::load(&resources.others, &self.state.config.app_id);
        if !errors.is_empty() {
            for e in &errors {
                tracing::error!("hot reload: {e}; the resiliency policies are kept as they were");
            }
            return;
        }
        self.state.resiliency.replace(policies);
        self.resiliency = docs;
        let _changing = self.subscriptions.changing.lock().await;
        let store = self.state.publisher.store();
        for (id, spec, channel) in self.subscriptions.all() {
            if let Some(entry) = store.pubsub(&spec.pubsub) {
                self.subscriptions.swap_pipeline(
                    id,
                    Arc::new(SubscriptionPipeline::new(
                        &self.state,
                        self.subscriptions.in_flight.clone(),
                        spec,
                        entry,
                        channel,
                    )),
                );
            }
        }
        tracing::info!("hot reload: resiliency policies updated");
    }

    /// Asks the app again for its programmatic subscriptions, and takes those on the
    /// components just added or changed.
    async fn reread_programmatic(&self, components: &[String]) {
        let cfg = &self.state.config;
        if cfg.app.port == 0 || cfg.disable_init_endpoints.iter().any(|e| e == "subscribe") {
            return;
        }
        let Some(channel) = self.subscriptions.app_channel() else {
            return;
        };
        match channel.list_subscriptions().await {
            Ok(listed) => self.subscriptions.replace_programmatic(components, listed),
            Err(e) => tracing::warn!(
                error = %e,
                "hot reload: asking the app for its subscriptions failed; its programmatic subscriptions are kept"
            ),
        }
    }

    /// Applies `plan`; returns the names of the pub/subs added or changed.
    async fn apply_components(
        &mut self,
        resources: &Resources,
        plan: plan::ComponentPlan,
    ) -> Vec<String> {
        let mut switched = Vec::new();
        for name in &plan.removed {
            self.remove(name).await;
            self.applied.remove(name);
            tracing::info!(component = %name, "hot reload: component removed");
        }
        let targets: BTreeMap<&str, bool> = plan
            .added
            .iter()
            .map(|c| (c.name.as_str(), true))
            .chain(plan.changed.iter().map(|c| (c.name.as_str(), false)))
            .collect();
        // every desired component is planned, so that secret-store references resolve
        let (planned, errors) = crate::store::plan(resources, &self.registry);
        let mut refused = BTreeSet::new();
        for e in errors {
            if let Some(name) = e.component.as_deref().filter(|n| targets.contains_key(n)) {
                tracing::error!("hot reload: {e}; the component is kept as it was");
                refused.insert(name.to_string());
            }
        }
        for p in planned {
            let name = p.manifest.name.as_str();
            let Some(&added) = targets.get(name) else {
                continue;
            };
            if refused.contains(name) {
                continue;
            }
            let stores = self.state.publisher.store().secret_stores();
            let mut errors = Vec::new();
            match build_one(&p, &stores, &self.build, &mut errors).await {
                Ok(Some(built)) => {
                    let pubsub = matches!(built, Built::PubSub(_));
                    if self.switch(&p.manifest, built).await {
                        if pubsub {
                            switched.push(name.to_string());
                        }
                        self.applied.insert(name.to_string(), p.manifest.clone());
                        tracing::info!(
                            component = %name,
                            r#type = %p.manifest.ty,
                            file = %p.manifest.file.display(),
                            "hot reload: component {}",
                            if added { "added" } else { "updated" }
                        );
                    }
                }
                Ok(None) => {
                    for e in errors {
                        tracing::error!("hot reload: {e}; the component is kept as it was");
                    }
                }
                Err(crate::store::Ignored) => {}
            }
        }
        switched
    }

    /// Puts a built component in place of the one of the same name; false when the new
    /// instance could not take over the subscriptions (then the old one stays).
    async fn switch(&self, manifest: &ComponentManifest, built: Built) -> bool {
        let store = self.state.publisher.store();
        let entry = match built {
            Built::SecretStore(s) => {
                let handles = self.take_subscriptions_on(&manifest.name);
                match store.put(manifest, Built::SecretStore(s)) {
                    Some(old) => self.retire(old, handles).await,
                    None => self.drain(handles).await,
                }
                return true;
            }
            Built::PubSub(entry) => entry,
        };
        // the subscriptions on the new instance first
        let mut fresh = Vec::new();
        for (id, spec, channel) in self.subscriptions.on_component(&manifest.name) {
            if !entry
                .scoping
                .may_subscribe(&self.state.config.app_id, &spec.topic)
            {
                fresh.push((id, None));
                continue;
            }
            match subscribe_on(
                &self.state,
                &self.subscriptions.in_flight,
                &spec,
                &entry,
                channel,
            )
            .await
            {
                Ok(started) => fresh.push((id, Some(started))),
                Err(e) => {
                    tracing::error!(
                        component = %manifest.name,
                        topic = %spec.topic,
                        error = %e,
                        "hot reload: subscribing on the new instance failed; the old instance is kept"
                    );
                    self.drain(
                        fresh
                            .into_iter()
                            .filter_map(|(_, f)| f.map(|(handle, _)| handle))
                            .collect(),
                    )
                    .await;
                    if let Err(e) = entry.component.close().await {
                        tracing::warn!(component = %manifest.name, error = %e, "closing the unused new instance failed");
                    }
                    return false;
                }
            }
        }
        let old = store.put(manifest, Built::PubSub(entry));
        let mut handles = Vec::new();
        for (id, started) in fresh {
            handles.extend(match started {
                Some((handle, slot)) => self.subscriptions.replace(id, handle, slot),
                None => self.subscriptions.take(id),
            });
        }
        match old {
            Some(old) => self.retire(old, handles).await,
            None => self.drain(handles).await,
        }
        true
    }

    /// Takes the subscriptions on `pubsub` out (their handles, still running).
    fn take_subscriptions_on(&self, pubsub: &str) -> Vec<Subscription> {
        self.subscriptions
            .on_component(pubsub)
            .into_iter()
            .filter_map(|(id, _, _)| self.subscriptions.take(id))
            .collect()
    }

    async fn remove(&self, name: &str) {
        let handles = self.take_subscriptions_on(name);
        match self.state.publisher.store().remove(name) {
            Some(old) => self.retire(old, handles).await,
            None => self.drain(handles).await,
        }
    }

    /// Stops subscriptions and waits, within the grace period, for them to settle what they
    /// took.
    async fn drain(&self, handles: Vec<Subscription>) {
        let grace = self.state.config.graceful_shutdown;
        let drains = handles.into_iter().map(Subscription::stop);
        if tokio::time::timeout(grace, futures::future::join_all(drains))
            .await
            .is_err()
        {
            tracing::warn!(
                ?grace,
                "hot reload: subscriptions did not drain within the grace period"
            );
        }
    }

    /// Retires an instance no longer in the store, whose subscriptions `handles` still run:
    /// lets the publishes that hold it finish, quiesces its subscriptions (no more reads from
    /// the broker) and lets them deliver what they had taken, stops and drains them, and
    /// closes the instance once nothing holds it. Each wait is bounded by the grace period.
    async fn retire(&self, old: Arc<PubSubEntry>, mut handles: Vec<Subscription>) {
        let deadline = tokio::time::Instant::now() + self.state.config.graceful_shutdown;
        // the store's reference is gone: what is left is ours, one per subscription
        // pipeline, and one per publish in progress
        let pipelines = handles.len();
        if !wait_until(deadline, || Arc::strong_count(&old) <= 1 + pipelines).await {
            tracing::warn!(component = %old.name, "hot reload: publishes to the replaced instance still running after the grace period");
        }
        for h in &mut handles {
            h.quiesce();
        }
        if !wait_until(deadline, || handles.iter().all(Subscription::is_idle)).await {
            tracing::warn!(component = %old.name, "hot reload: the replaced instance still holds queued messages after the grace period");
        }
        self.drain(handles).await;
        if !wait_until(deadline, || Arc::strong_count(&old) == 1).await {
            tracing::warn!(component = %old.name, holders = Arc::strong_count(&old) - 1, "hot reload: the replaced instance is still in use after the grace period; closing it");
        }
        if let Err(e) = old.component.close().await {
            tracing::warn!(component = %old.name, error = %e, "closing the replaced instance failed");
        }
    }

    /// Brings the app's running subscriptions to the desired ones.
    async fn reconcile_subscriptions(&self) {
        let subs = &self.subscriptions;
        let _changing = subs.changing.lock().await;
        let Some((desired, channel)) = subs.desired_app(&self.state.config.app_id) else {
            return;
        };
        let store = self.state.publisher.store();
        let desired: Vec<_> = desired
            .into_iter()
            .filter(|s| store.pubsub(&s.pubsub).is_some())
            .collect();
        let running: Vec<_> = subs
            .app_active()
            .into_iter()
            .map(|(id, spec, _)| (id, spec))
            .collect();
        let plan = plan::subscriptions(&running, &desired);
        let mut handles = Vec::new();
        for id in &plan.removed {
            if let Some(spec) = running.iter().find(|(i, _)| i == id).map(|(_, s)| s) {
                tracing::info!(pubsub = %spec.pubsub, topic = %spec.topic, "hot reload: subscription removed");
            }
            handles.extend(subs.take(*id));
        }
        for (id, _) in &plan.restarted {
            handles.extend(subs.take(*id));
        }
        self.drain(handles).await;
        for (id, spec) in plan.swapped {
            let Some(entry) = store.pubsub(&spec.pubsub) else {
                continue;
            };
            tracing::info!(pubsub = %spec.pubsub, topic = %spec.topic, "hot reload: subscription updated in place");
            subs.swap_pipeline(
                id,
                Arc::new(SubscriptionPipeline::new(
                    &self.state,
                    subs.in_flight.clone(),
                    spec,
                    entry,
                    channel.clone(),
                )),
            );
        }
        for spec in plan.restarted.into_iter().map(|(_, s)| s).chain(plan.added) {
            tracing::info!(pubsub = %spec.pubsub, topic = %spec.topic, "hot reload: subscription started");
            start_one(&self.state, subs, spec, channel.clone()).await;
        }
    }
}
