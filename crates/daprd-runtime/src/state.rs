//! Shared runtime state (what the API servers read and change) and the shutdown signal.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::RuntimeConfig;
use crate::outbound::publish::Publisher;
use crate::store::ComponentStore;

/// Why the process is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    /// SIGTERM / SIGINT.
    Signal,
    /// `POST /v1.0/shutdown` or gRPC `Shutdown`.
    Api,
}

/// A shutdown signal that any number of tasks can wait on.
#[derive(Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<Option<ShutdownReason>>>,
    rx: watch::Receiver<Option<ShutdownReason>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        let (tx, rx) = watch::channel(None);
        Self {
            tx: Arc::new(tx),
            rx,
        }
    }
}

impl Shutdown {
    /// Starts the shutdown (the first reason is kept).
    pub fn trigger(&self, reason: ShutdownReason) {
        self.tx.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// Resolves once shutdown has started.
    pub async fn wait(&self) -> ShutdownReason {
        let mut rx = self.rx.clone();
        loop {
            if let Some(r) = *rx.borrow_and_update() {
                return r;
            }
            if rx.changed().await.is_err() {
                return ShutdownReason::Signal;
            }
        }
    }

    /// Whether shutdown has started.
    pub fn is_triggered(&self) -> bool {
        self.rx.borrow().is_some()
    }
}

/// State shared by the HTTP and gRPC APIs.
pub struct RuntimeState {
    /// Validated configuration.
    pub config: RuntimeConfig,
    /// The publish pipeline (and, through it, the components).
    pub publisher: Publisher,
    /// `extended` metadata set through the metadata API.
    pub extended: RwLock<BTreeMap<String, String>>,
    /// `/v1.0/healthz` readiness.
    pub ready: AtomicBool,
    /// `/v1.0/healthz/outbound` readiness.
    pub outbound_ready: AtomicBool,
    /// The shutdown signal.
    pub shutdown: Shutdown,
    /// Resiliency policies.
    pub resiliency: Arc<crate::resiliency::Policies>,
    /// Stops the API servers (after any `--dapr-block-shutdown-duration`).
    pub api_stop: Shutdown,
    /// App health as last probed (`None` until known or when not checked).
    pub app_health: watch::Sender<Option<bool>>,
    /// The Configuration's API allow and deny lists.
    pub api_access: crate::config::configuration::ApiAccess,
    /// API call logging (`--enable-api-logging`, `logging.apiLogging`); `None`: off.
    pub api_logging: Option<crate::config::configuration::ApiLogging>,
    /// Prometheus metrics (recording nothing with `--enable-metrics=false`).
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl RuntimeState {
    /// State for `config` over `store`; not ready until [`RuntimeState::set_ready`].
    pub fn new(
        config: RuntimeConfig,
        store: Arc<ComponentStore>,
        resiliency: Arc<crate::resiliency::Policies>,
        configuration: &crate::config::configuration::Configuration,
    ) -> Arc<Self> {
        let api_logging = configuration
            .api_logging
            .on(config.api_logging)
            .then_some(configuration.api_logging);
        let mut extended = BTreeMap::new();
        extended.insert(
            "daprRuntimeVersion".to_string(),
            crate::config::RUNTIME_VERSION.to_string(),
        );
        let metrics = Arc::new(match config.metrics_addr {
            Some(_) => crate::metrics::Metrics::new(
                &config.app_id,
                config.namespace(),
                &configuration.metric,
            ),
            None => crate::metrics::Metrics::disabled(),
        });
        resiliency.observe(metrics.clone());
        Arc::new(Self {
            publisher: Publisher::new(
                config.app_id.clone(),
                store,
                resiliency.clone(),
                metrics.clone(),
                Arc::new(crate::trace::Tracer::new(
                    &configuration.tracing,
                    &config.app_id,
                )),
            ),
            metrics,
            config,
            extended: RwLock::new(extended),
            ready: AtomicBool::new(false),
            outbound_ready: AtomicBool::new(false),
            shutdown: Shutdown::default(),
            resiliency,
            api_access: configuration.api.clone(),
            api_logging,
            api_stop: Shutdown::default(),
            app_health: watch::channel(None).0,
        })
    }

    /// Marks the outbound side (publishing) ready.
    pub fn set_outbound_ready(&self) {
        self.outbound_ready.store(true, Ordering::Release);
    }

    /// Marks the runtime fully ready (subscriptions started).
    pub fn set_ready(&self) {
        self.outbound_ready.store(true, Ordering::Release);
        self.ready.store(true, Ordering::Release);
    }

    /// Whether `/v1.0/healthz` answers 204.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.shutdown.is_triggered()
    }

    /// Whether `/v1.0/healthz/outbound` answers 204.
    pub fn is_outbound_ready(&self) -> bool {
        self.outbound_ready.load(Ordering::Acquire)
    }

    /// Records the app's health (notifies watchers on change).
    pub fn set_app_health(&self, healthy: bool) {
        self.app_health.send_if_modified(|h| {
            if *h == Some(healthy) {
                false
            } else {
                tracing::info!(healthy, "app health changed");
                *h = Some(healthy);
                true
            }
        });
    }

    /// Starts shutdown; with `force` the process exits with code 1 after ~100 ms, as daprd.
    pub fn request_shutdown(&self, force: bool) {
        if force {
            tracing::warn!("forced shutdown requested; exiting");
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                std::process::exit(1);
            });
        }
        self.shutdown.trigger(ShutdownReason::Api);
    }
}
