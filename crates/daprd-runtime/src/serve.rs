//! Start-up and shutdown: load and build components, bind the API listeners, serve until
//! a shutdown signal, then drain within the grace period and close the components.

use daprd_core::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::api::ApiState;
use crate::config::resources::{load_resources, LoadContext};
use crate::config::RuntimeConfig;
use crate::inbound::subscriber::Subscriptions;
use crate::inbound::subscriptions::SubscriptionSpec;
use crate::state::RuntimeState;
use crate::store::{self, BuildContext, ComponentStore};

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The resources are invalid; one line per problem.
    #[error("{} problem(s) in the resources", .0.len())]
    Resources(Vec<String>),
    /// A Unix socket could not be bound (`--unix-domain-socket`).
    #[error("cannot listen on {} for the {what}: {source}", path.display())]
    BindUnix {
        /// Socket path.
        path: std::path::PathBuf,
        /// Which server.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr} for the {what}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Which server.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn build_context(
    config: &RuntimeConfig,
    configuration: &crate::config::configuration::Configuration,
    connect: bool,
) -> BuildContext {
    BuildContext {
        app_id: config.app_id.clone(),
        namespace: config.namespace().to_string(),
        pod_name: config.env.pod_name.clone(),
        connect,
        secret_scopes: configuration.secret_scopes.clone(),
    }
}

/// What the resources directories hold, built.
pub struct Loaded {
    /// The Configuration (`--config`; Dapr's defaults without one).
    pub configuration: crate::config::configuration::Configuration,
    /// The components.
    pub store: ComponentStore,
    /// Declarative subscriptions.
    pub subscriptions: Vec<SubscriptionSpec>,
    /// Resiliency policies.
    pub resiliency: crate::resiliency::Resiliency,
    /// The component manifests the store was built from (what hot reload compares with).
    pub components: Vec<crate::config::resources::ComponentManifest>,
    /// The registry the components were built through (hot reload builds with it too).
    pub registry: Registry,
    /// The Resiliency documents the policies came from (what hot reload compares with).
    pub resiliency_docs: Vec<serde_norway::Value>,
    /// Where changes come from, when not the resources directories (Kubernetes mode: the
    /// operator's update streams, followed whatever the HotReload feature says, as Go daprd).
    pub source: Option<Box<dyn crate::reload::ResourceSource>>,
    /// Told the sidecar's metrics once they exist (Kubernetes mode: the identity's events
    /// from before the Configuration was known).
    pub on_metrics: Option<Box<dyn FnOnce(Arc<crate::metrics::Metrics>) + Send>>,
}

/// Loads the resources directories, builds the components through `registry` (the
/// binary's: the runtime names no component) and parses the declarative subscriptions.
/// With `connect` false nothing connects to a broker (`daprd validate`).
///
/// # Errors
/// [`StartError::Resources`] with every problem found.
pub async fn load(
    config: &RuntimeConfig,
    registry: &Registry,
    connect: bool,
) -> Result<Loaded, StartError> {
    let ctx = LoadContext {
        app_id: &config.app_id,
        namespace: config.env.namespace.as_deref(),
    };
    let configuration = crate::config::configuration::load(&config.config_files);
    let resources = load_resources(&config.resources_paths, &ctx);
    build_loaded(config, configuration, resources, registry, connect).await
}

/// Builds what [`load`] read, or what another source (the operator) gave: the
/// Configuration's component deny list applied, the components built, the declarative
/// subscriptions and the resiliency policies parsed.
///
/// # Errors
/// [`StartError::Resources`] with every problem found.
pub async fn build_loaded(
    config: &RuntimeConfig,
    configuration: crate::config::configuration::Loaded,
    mut resources: crate::config::resources::Resources,
    registry: &Registry,
    connect: bool,
) -> Result<Loaded, StartError> {
    for w in configuration.warnings.iter().chain(&resources.warnings) {
        tracing::warn!("{w}");
    }
    let mut problems: Vec<String> = configuration
        .errors
        .iter()
        .chain(&resources.errors)
        .map(ToString::to_string)
        .collect();
    let configuration = configuration.configuration;
    resources.components.retain(|c| {
        if !configuration.denies(&c.ty, &c.version) {
            return true;
        }
        let refusal = format!(
            "{}: component {:?}: field spec.type: {} is in the Configuration's components.deny list",
            c.file.display(),
            c.name,
            c.ty
        );
        if c.ignore_errors {
            tracing::warn!("{refusal}; not loaded (ignoreErrors)");
        } else {
            problems.push(refusal);
        }
        false
    });
    let components = resources.components.clone();
    let resiliency_docs = crate::reload::resiliency_docs(&resources);
    let (subscriptions, sub_errors) =
        crate::inbound::subscriptions::parse_declarative(&resources.others);
    problems.extend(sub_errors.iter().map(ToString::to_string));
    let (resiliency, res_errors) =
        crate::resiliency::Resiliency::load(&resources.others, &config.app_id);
    problems.extend(res_errors.iter().map(ToString::to_string));
    match store::build(
        &resources,
        registry,
        &build_context(config, &configuration, connect),
    )
    .await
    {
        Ok(store) if problems.is_empty() => Ok(Loaded {
            configuration,
            store,
            subscriptions,
            resiliency,
            components,
            registry: registry.clone(),
            resiliency_docs,
            source: None,
            on_metrics: None,
        }),
        Ok(store) => {
            store.close_all().await;
            Err(StartError::Resources(problems))
        }
        Err(errs) => {
            problems.extend(errs.iter().map(ToString::to_string));
            Err(StartError::Resources(problems))
        }
    }
}

/// A running sidecar.
pub struct Sidecar {
    /// Shared state.
    pub state: Arc<RuntimeState>,
    /// The live subscriptions.
    pub subscriptions: Arc<Subscriptions>,
    /// Bound HTTP API addresses.
    pub http_addrs: Vec<SocketAddr>,
    /// Bound gRPC API addresses.
    pub grpc_addrs: Vec<SocketAddr>,
    /// Bound public-port address.
    pub public_addr: Option<SocketAddr>,
    /// Bound metrics-server address.
    pub metrics_addr: Option<SocketAddr>,
    servers: JoinSet<()>,
}

/// Serves the gRPC API on `incoming` (TCP or Unix socket connections) until `shutdown`.
async fn serve_grpc<I, IO, IE>(
    svc: crate::api::grpc::DaprService,
    incoming: I,
    shutdown: crate::state::Shutdown,
) where
    I: futures::Stream<Item = Result<IO, IE>>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let res = tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.wait().await;
        })
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "gRPC API server failed");
    }
}

/// Serves the Prometheus text format on every path until the API servers stop (Go daprd's
/// exporter answers on every path too, so `/` and `/metrics`).
async fn serve_metrics(listener: TcpListener, state: Arc<RuntimeState>) {
    let metrics = state.metrics.clone();
    let router = axum::Router::new().fallback(move || {
        let metrics = metrics.clone();
        async move {
            (
                [(
                    http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                metrics.render(),
            )
        }
    });
    let shutdown = state.api_stop.clone();
    let res = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.wait().await;
        })
        .await;
    if let Err(e) = res {
        tracing::error!(error = %e, "metrics server failed");
    }
}

/// A Unix socket at `path`, replacing a stale socket file a previous run left.
fn bind_unix(
    path: &std::path::Path,
    what: &'static str,
) -> Result<tokio::net::UnixListener, StartError> {
    use std::os::unix::fs::FileTypeExt as _;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
    tokio::net::UnixListener::bind(path).map_err(|source| StartError::BindUnix {
        path: path.to_path_buf(),
        what,
        source,
    })
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, what, source })
}

/// Disables Nagle's algorithm on an accepted API connection.
fn nodelay(stream: &mut tokio::net::TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
}

impl Sidecar {
    /// Binds every listener and starts serving.
    ///
    /// # Errors
    /// [`StartError::Bind`] naming the address that could not be bound.
    pub async fn start(config: RuntimeConfig, loaded: Loaded) -> Result<Self, StartError> {
        let state = RuntimeState::new(
            config,
            Arc::new(loaded.store),
            Arc::new(crate::resiliency::Policies::new(loaded.resiliency)),
            &loaded.configuration,
        );
        if let Some(tell) = loaded.on_metrics {
            tell(state.metrics.clone());
        }
        let types: Vec<String> = state
            .publisher
            .store()
            .registered()
            .iter()
            .map(|c| c.ty.clone())
            .collect();
        state
            .metrics
            .components_loaded(&types, state.publisher.store().failed());
        let subscriptions = Arc::new(Subscriptions::new(state.metrics.clone()));
        let api = ApiState::new(state.clone(), subscriptions.clone());
        let cfg = &state.config;
        let mut servers = JoinSet::new();
        let mut http_addrs = Vec::new();
        let mut grpc_addrs = Vec::new();

        let mut http_listeners = Vec::new();
        let mut grpc_listeners = Vec::new();
        let unix = match &cfg.unix_domain_socket {
            Some(dir) => Some((
                bind_unix(
                    &dir.join(format!("dapr-http-{}.socket", cfg.app_id)),
                    "HTTP API",
                )?,
                bind_unix(
                    &dir.join(format!("dapr-grpc-{}.socket", cfg.app_id)),
                    "gRPC API",
                )?,
            )),
            None => None,
        };
        // With a Unix domain socket the APIs listen there only, as in Go daprd.
        let tcp_ips: &[std::net::IpAddr] = if unix.is_some() {
            &[]
        } else {
            &cfg.listen_addresses
        };
        for ip in tcp_ips {
            http_listeners.push(bind(SocketAddr::new(*ip, cfg.http_port), "HTTP API").await?);
            grpc_listeners.push(bind(SocketAddr::new(*ip, cfg.grpc_port), "gRPC API").await?);
        }
        let metrics = match cfg.metrics_addr {
            Some(addr) => Some(bind(addr, "metrics server").await?),
            None => None,
        };
        let public = match cfg.public_port {
            Some(p) => Some(
                bind(
                    SocketAddr::new(cfg.public_listen_address, p),
                    "public HTTP port",
                )
                .await?,
            ),
            None => None,
        };

        let http_router = crate::api::http::with_clean_paths(
            crate::api::http::router(api.clone()),
            api.metrics.enabled().then(|| api.metrics.clone()),
        );
        if let Some((http_socket, grpc_socket)) = unix {
            let router = http_router.clone();
            let shutdown = state.api_stop.clone();
            servers.spawn(async move {
                let res = axum::serve(http_socket, router)
                    .with_graceful_shutdown(async move {
                        shutdown.wait().await;
                    })
                    .await;
                if let Err(e) = res {
                    tracing::error!(error = %e, "HTTP API server (Unix socket) failed");
                }
            });
            servers.spawn(serve_grpc(
                crate::api::grpc::service(api.clone()),
                // grpc-python's `:authority` for a socket path, made acceptable
                futures::StreamExt::map(
                    tokio_stream::wrappers::UnixListenerStream::new(grpc_socket),
                    |conn| conn.map(crate::api::grpc_authority::AuthorityFix::new),
                ),
                state.api_stop.clone(),
            ));
        }
        for l in http_listeners {
            http_addrs.push(l.local_addr().map_err(|source| StartError::Bind {
                addr: SocketAddr::new(cfg.listen_addresses[0], cfg.http_port),
                what: "HTTP API",
                source,
            })?);
            let router = http_router.clone();
            let shutdown = state.api_stop.clone();
            servers.spawn(async move {
                let res = axum::serve(l.tap_io(nodelay), router)
                    .with_graceful_shutdown(async move {
                        shutdown.wait().await;
                    })
                    .await;
                if let Err(e) = res {
                    tracing::error!(error = %e, "HTTP API server failed");
                }
            });
        }
        let public_addr = match public {
            Some(l) => {
                let addr = l.local_addr().ok();
                let router = crate::api::http::with_clean_paths(
                    crate::api::http::public_router(api.clone()),
                    None,
                );
                let shutdown = state.api_stop.clone();
                servers.spawn(async move {
                    let _ = axum::serve(l.tap_io(nodelay), router)
                        .with_graceful_shutdown(async move {
                            shutdown.wait().await;
                        })
                        .await;
                });
                addr
            }
            None => None,
        };
        let metrics_addr = match metrics {
            Some(l) => {
                let addr = l.local_addr().ok();
                servers.spawn(serve_metrics(l, state.clone()));
                tracing::info!(
                    "metrics server started on {}/",
                    addr.map(|a| a.to_string()).unwrap_or_default()
                );
                addr
            }
            None => None,
        };
        for l in grpc_listeners {
            if let Ok(a) = l.local_addr() {
                grpc_addrs.push(a);
            }
            // Small request/response exchanges: no Nagle delay.
            servers.spawn(serve_grpc(
                crate::api::grpc::service(api.clone()),
                tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true)),
                state.api_stop.clone(),
            ));
        }
        state.set_outbound_ready();
        if state.config.app.port == 0 {
            state.set_ready();
        }
        tokio::spawn(crate::inbound::subscriber::start_app_subscriptions(
            state.clone(),
            subscriptions.clone(),
            loaded.subscriptions,
        ));
        // The operator's streams are followed whatever the feature says (as Go daprd).
        if loaded.source.is_some() || loaded.configuration.hot_reload() {
            start_reloader(
                &state,
                &subscriptions,
                loaded.registry,
                loaded.configuration,
                (loaded.components, loaded.resiliency_docs),
                loaded.source,
            );
        } else {
            tracing::info!("hot reload is off (feature HotReload disabled in the Configuration)");
        }
        tracing::info!(
            app_id = %state.config.app_id,
            http = ?http_addrs,
            grpc = ?grpc_addrs,
            version = crate::config::RUNTIME_VERSION,
            "dapr initialized. Status: Running"
        );
        Ok(Self {
            state,
            subscriptions,
            http_addrs,
            grpc_addrs,
            public_addr,
            metrics_addr,
            servers,
        })
    }

    /// Waits for shutdown (signal, API or [`Sidecar::state`]'s trigger), lets in-flight
    /// API calls finish within the grace period, then closes the components.
    pub async fn run_until_shutdown(mut self) {
        let reason = self.state.shutdown.wait().await;
        let grace = self.state.config.graceful_shutdown;
        tracing::info!(?reason, grace = ?grace, "shutting down");
        // Stop fetching, then let in-flight deliveries, their acks and API calls finish.
        let settled = self.subscriptions.stop_all();
        if let (crate::state::ShutdownReason::Signal, Some(block)) =
            (reason, self.state.config.block_shutdown)
        {
            // Outbound APIs stay up until the duration elapses or the app turns unhealthy.
            tracing::info!(
                ?block,
                "blocking shutdown: subscriptions stopped, APIs stay up"
            );
            let mut health = self.state.app_health.subscribe();
            let unhealthy = async move {
                loop {
                    if *health.borrow_and_update() == Some(false) {
                        return;
                    }
                    if health.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(block) => {}
                _ = unhealthy => tracing::info!("app is unhealthy; ending the shutdown block"),
            }
        }
        self.state
            .api_stop
            .trigger(crate::state::ShutdownReason::Signal);
        let in_flight = self.subscriptions.in_flight.clone();
        let drained = tokio::time::timeout(grace, async {
            in_flight.wait_idle().await;
            settled.await;
            while self.servers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                deliveries = in_flight.current(),
                "grace period elapsed with work still in flight; stopping it"
            );
            self.servers.abort_all();
        }
        let close = tokio::time::timeout(
            grace.max(Duration::from_secs(1)),
            self.state.publisher.store().close_all(),
        )
        .await;
        if close.is_err() {
            tracing::warn!("components did not close within the grace period");
        }
        tracing::info!("daprd shutdown complete");
    }
}

/// Watches the resources directories and applies their changes (hot reload).
fn start_reloader(
    state: &Arc<RuntimeState>,
    subscriptions: &Arc<Subscriptions>,
    registry: Registry,
    configuration: crate::config::configuration::Configuration,
    (components, resiliency_docs): (
        Vec<crate::config::resources::ComponentManifest>,
        Vec<serde_norway::Value>,
    ),
    source: Option<Box<dyn crate::reload::ResourceSource>>,
) {
    let cfg = &state.config;
    let source = match source {
        Some(s) => s,
        None => match crate::reload::DirectoryWatcher::new(
            &cfg.resources_paths,
            &cfg.app_id,
            cfg.env.namespace.as_deref(),
        ) {
            Ok(w) => Box::new(w),
            Err(e) => {
                tracing::warn!("hot reload is off: {e}");
                return;
            }
        },
    };
    let reloader = crate::reload::Reloader::new(
        state.clone(),
        subscriptions.clone(),
        registry,
        build_context(cfg, &configuration, true),
        configuration,
        components,
    )
    .with_resiliency(resiliency_docs);
    tokio::spawn(reloader.run(source));
}

/// Serves the public port with every request answered 500 (not ready) until the returned task
/// is aborted: what the kubelet's probes see while Kubernetes mode waits for the control
/// plane. `None` without a public port or when it cannot be bound (the sidecar's own bind
/// then reports it).
pub async fn public_port_not_ready(config: &RuntimeConfig) -> Option<tokio::task::JoinHandle<()>> {
    let port = config.public_port?;
    let addr = SocketAddr::new(config.public_listen_address, port);
    let listener = tokio::net::TcpListener::bind(addr).await.ok()?;
    let router = axum::Router::new().fallback(|| async {
        (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "dapr is not ready: waiting for the control plane",
        )
    });
    Some(tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    }))
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
