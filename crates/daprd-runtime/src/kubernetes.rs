//! Kubernetes mode: the sidecar's identity from the control plane's Sentry ([`identity`],
//! checked by SPIFFE id, [`spiffe`]) and its resources from the operator ([`operator`]).
//!
//! [`load`] is the start-up: it waits (with backoff, logging why) for Sentry and the operator
//! rather than exiting into a restart loop, and fails at once only on what waiting cannot
//! fix: the control plane is not who it should be, or the resources are invalid.

pub mod identity;
pub mod operator;
pub mod spiffe;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use daprd_core::registry::Registry;

use crate::config::resources::LoadContext;
use crate::config::{KubernetesConfig, RuntimeConfig};
use crate::metrics::Metrics;
use crate::serve::{Loaded, StartError};
use identity::{IdentityError, IdentityEvents, SentryClient, SentryOptions, Svid};
use operator::{OperatorClient, OperatorError, OperatorOptions, OperatorResources};
use spiffe::{SpiffeError, SpiffeId, TrustAnchors};

/// Longest pause between two attempts to reach Sentry or the operator at start.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Why Kubernetes mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// `DAPR_TRUST_ANCHORS` is not usable.
    #[error("DAPR_TRUST_ANCHORS: {0}")]
    Anchors(SpiffeError),
    /// No workload identity (a trust failure).
    #[error(transparent)]
    Identity(IdentityError),
    /// The operator is not trusted.
    #[error(transparent)]
    Operator(OperatorError),
    /// The resources from the operator are invalid.
    #[error(transparent)]
    Start(StartError),
    /// Running as root without the override.
    #[error("current user UID(0) is root: Dapr must run as a non-root user in Kubernetes; to override this check set DAPR_UNSAFE_SKIP_CONTAINER_UID_GID_CHECK=true")]
    Root,
}

/// Refuses to run as root in Kubernetes mode unless
/// `DAPR_UNSAFE_SKIP_CONTAINER_UID_GID_CHECK=true` (as Go daprd).
///
/// # Errors
/// [`KubernetesError::Root`].
pub fn check_not_root() -> Result<(), KubernetesError> {
    if std::env::var("DAPR_UNSAFE_SKIP_CONTAINER_UID_GID_CHECK").as_deref() == Ok("true") {
        tracing::warn!(
            "skipping the container UID/GID check (DAPR_UNSAFE_SKIP_CONTAINER_UID_GID_CHECK)"
        );
        return Ok(());
    }
    if effective_uid() == Some(0) {
        return Err(KubernetesError::Root);
    }
    Ok(())
}

/// The process's effective uid: the second number of /proc/self/status's `Uid:` line.
pub fn effective_uid() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The identity's events: logged, and counted in `dapr_runtime_mtls_*` once the sidecar's
/// metrics exist (the events before that are kept and counted then).
#[derive(Default)]
pub struct MtlsEvents {
    metrics: std::sync::OnceLock<Arc<Metrics>>,
    pending: std::sync::Mutex<Vec<(bool, Option<&'static str>)>>,
}

impl MtlsEvents {
    /// Counts into `metrics` from now on, and what happened before.
    pub fn attach(&self, metrics: Arc<Metrics>) {
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (renewal, failed) in pending.drain(..) {
            metrics.mtls(renewal, failed);
        }
        let _ = self.metrics.set(metrics);
    }

    fn record(&self, renewal: bool, failed: Option<&'static str>) {
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match self.metrics.get() {
            Some(m) => m.mtls(renewal, failed),
            None => pending.push((renewal, failed)),
        }
    }
}

impl IdentityEvents for MtlsEvents {
    fn signed(&self, svid: &Svid, renewal: bool) {
        let until = humantime::format_rfc3339_seconds(svid.not_after);
        if renewal {
            tracing::info!(id = %svid.id, %until, "workload certificate renewed");
        } else {
            tracing::info!(id = %svid.id, %until, "workload certificate signed by sentry");
        }
        self.record(renewal, None);
    }

    fn failed(&self, error: &IdentityError, renewal: bool) {
        if renewal {
            tracing::error!("renewing the workload certificate failed, trying again: {error}");
        } else if !error.is_fatal() {
            tracing::warn!("no workload certificate yet, trying again: {error}");
        }
        self.record(renewal, Some(error.reason()));
    }
}

/// Gets the identity from Sentry, then the Configuration and resources from the operator,
/// and builds them; the operator's update streams become the hot reload source.
///
/// # Errors
/// See [`KubernetesError`]; everything else is tried again.
pub async fn load(
    config: &RuntimeConfig,
    k8s: &KubernetesConfig,
    registry: &Registry,
) -> Result<Loaded, KubernetesError> {
    let anchors = TrustAnchors::from_pem(&k8s.trust_anchors).map_err(KubernetesError::Anchors)?;
    let td = &k8s.control_plane_trust_domain;
    let cp_ns = &k8s.control_plane_namespace;
    let sentry = SentryClient::new(SentryOptions {
        address: k8s.sentry_address.clone(),
        anchors: anchors.clone(),
        sentry_id: SpiffeId::sentry(td, cp_ns),
        app_id: config.app_id.clone(),
        namespace: k8s.namespace.clone(),
        token_file: k8s.sentry_token_file.clone(),
    });
    let events = Arc::new(MtlsEvents::default());
    let identity = identity::obtain(&sentry, events.as_ref(), MAX_PAUSE)
        .await
        .map_err(KubernetesError::Identity)?;
    tokio::spawn(identity::renew_forever(
        identity.clone(),
        sentry,
        events.clone(),
    ));
    let client = OperatorClient::new(
        OperatorOptions {
            address: k8s.control_plane_address.clone(),
            anchors,
            operator_id: SpiffeId::operator(td, cp_ns),
            namespace: k8s.namespace.clone(),
        },
        &identity,
    )
    .map_err(KubernetesError::Operator)?;
    let mut pause = Duration::from_millis(100);
    let (configuration, snapshot) = loop {
        let listed = async {
            let configuration = match &k8s.config_name {
                Some(name) => client.configuration(name).await?.map(|c| (name, c)),
                None => None,
            };
            Ok::<_, OperatorError>((configuration, client.snapshot().await?))
        };
        match listed.await {
            Ok(r) => break r,
            Err(e) if e.is_fatal() => return Err(KubernetesError::Operator(e)),
            Err(e) => tracing::warn!("no resources from the operator yet, trying again: {e}"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
    };
    let configuration = match configuration {
        Some((name, json)) => crate::config::configuration::read(
            Path::new(&format!("operator/configurations/{name}")),
            &String::from_utf8_lossy(&json),
        ),
        None => crate::config::configuration::Loaded::default(),
    };
    let resources = snapshot.resources(&LoadContext {
        app_id: &config.app_id,
        namespace: Some(&k8s.namespace),
    });
    tracing::info!(
        components = resources.components.len(),
        others = resources.others.len(),
        "resources loaded from the operator"
    );
    let mut loaded = crate::serve::build_loaded(config, configuration, resources, registry, true)
        .await
        .map_err(KubernetesError::Start)?;
    loaded.source = Some(Box::new(OperatorResources {
        source: client.watch(snapshot),
        app_id: config.app_id.clone(),
        namespace: k8s.namespace.clone(),
    }));
    loaded.on_metrics = Some(Box::new(move |metrics| events.attach(metrics)));
    Ok(loaded)
}
