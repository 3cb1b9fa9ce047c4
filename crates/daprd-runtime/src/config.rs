//! Runtime configuration: the command line ([`cli`]) and the environment resolved into a
//! validated [`RuntimeConfig`], and the resources directories ([`resources`]).

pub mod cli;
pub mod configuration;
pub mod resources;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use daprd_core::duration::parse_go_duration;

pub use cli::Options;

/// Version this build reports as `runtimeVersion` and for `--version`: the Dapr release
/// whose contract it implements, with daprd-rs's own version as semver build metadata.
pub const RUNTIME_VERSION: &str = concat!("1.18.3+daprd-rs.", env!("CARGO_PKG_VERSION"));

/// Default maximum request body (4Mi).
pub const DEFAULT_MAX_BODY: usize = 4 << 20;

/// Grace period of the shutdown sequence when `--dapr-graceful-shutdown-seconds` is negative
/// (as Go daprd).
pub const DEFAULT_GRACEFUL_SHUTDOWN: Duration = Duration::from_secs(5);

/// What the process reads from its environment.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// `DAPR_API_TOKEN`.
    pub api_token: Option<String>,
    /// `APP_API_TOKEN`.
    pub app_api_token: Option<String>,
    /// `NAMESPACE`.
    pub namespace: Option<String>,
    /// `POD_NAME`.
    pub pod_name: Option<String>,
    /// `DAPR_HTTP_DISABLE_H2C`.
    pub disable_h2c: bool,
    /// `DAPR_TRUST_ANCHORS` (PEM; Kubernetes mode).
    pub trust_anchors: Option<String>,
    /// `DAPR_CONTROLPLANE_TRUST_DOMAIN`.
    pub control_plane_trust_domain: Option<String>,
    /// `DAPR_CONTROLPLANE_NAMESPACE`.
    pub control_plane_namespace: Option<String>,
    /// `DAPR_SENTRY_TOKEN_FILE`.
    pub sentry_token_file: Option<String>,
}

impl Env {
    /// Reads the variables of this process.
    pub fn from_process() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            api_token: get("DAPR_API_TOKEN"),
            app_api_token: get("APP_API_TOKEN"),
            namespace: get("NAMESPACE"),
            pod_name: get("POD_NAME"),
            disable_h2c: get("DAPR_HTTP_DISABLE_H2C")
                .and_then(|v| daprd_core::metadata::parse_loose_bool(&v))
                .unwrap_or(false),
            trust_anchors: get("DAPR_TRUST_ANCHORS"),
            control_plane_trust_domain: get("DAPR_CONTROLPLANE_TRUST_DOMAIN"),
            control_plane_namespace: get("DAPR_CONTROLPLANE_NAMESPACE"),
            sentry_token_file: get("DAPR_SENTRY_TOKEN_FILE"),
        }
    }
}

/// `--mode`: where the resources come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Files in `--resources-path`.
    Standalone,
    /// The Dapr operator, with an identity from Sentry.
    Kubernetes,
}

/// Where the control plane is, in Kubernetes mode.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// `--control-plane-address`: the operator.
    pub control_plane_address: String,
    /// `--sentry-address`.
    pub sentry_address: String,
    /// `--control-plane-trust-domain`, else `DAPR_CONTROLPLANE_TRUST_DOMAIN`, else `localhost`.
    pub control_plane_trust_domain: String,
    /// `--control-plane-namespace`, else `DAPR_CONTROLPLANE_NAMESPACE`, else `default`.
    pub control_plane_namespace: String,
    /// `DAPR_TRUST_ANCHORS`.
    pub trust_anchors: String,
    /// `NAMESPACE`.
    pub namespace: String,
    /// `DAPR_SENTRY_TOKEN_FILE`.
    pub sentry_token_file: Option<PathBuf>,
    /// `--config`: the name of the Configuration the operator serves.
    pub config_name: Option<String>,
}

/// `--log-level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Everything, down to debug lines.
    Debug,
    /// The default.
    Info,
    /// Warnings and errors.
    Warn,
    /// Errors.
    Error,
    /// Go daprd's most severe level; here the same as `error`.
    Fatal,
}

impl LogLevel {
    /// Parses a flag value (case-insensitive, as Go daprd's logger).
    pub fn parse(value: &str) -> Option<Self> {
        match value.to_ascii_lowercase().as_str() {
            "debug" => Some(Self::Debug),
            "info" => Some(Self::Info),
            "warn" => Some(Self::Warn),
            "error" => Some(Self::Error),
            "fatal" => Some(Self::Fatal),
            _ => None,
        }
    }

    /// The `tracing` filter directive for this level.
    pub fn filter(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error | Self::Fatal => "error",
        }
    }
}

/// `--app-protocol`: how daprd talks to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    /// HTTP/1.1.
    Http,
    /// HTTP over TLS (the app's certificate is not verified, as in Go daprd).
    Https,
    /// HTTP/2 without TLS.
    H2c,
    /// gRPC (`AppCallback`).
    Grpc,
    /// gRPC over TLS.
    Grpcs,
}

impl AppProtocol {
    /// Parses a flag value (case-insensitive).
    pub fn parse(value: &str) -> Option<Self> {
        match value.to_ascii_lowercase().as_str() {
            "http" => Some(Self::Http),
            "https" => Some(Self::Https),
            "h2c" => Some(Self::H2c),
            "grpc" => Some(Self::Grpc),
            "grpcs" => Some(Self::Grpcs),
            _ => None,
        }
    }

    /// The flag's spelling (also what the metadata API reports).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::H2c => "h2c",
            Self::Grpc => "grpc",
            Self::Grpcs => "grpcs",
        }
    }

    /// With `--app-ssl`: the TLS form of the protocol (`http` → `https`, `grpc` → `grpcs`).
    pub fn with_tls(self) -> Self {
        match self {
            Self::Http => Self::Https,
            Self::Grpc => Self::Grpcs,
            other => other,
        }
    }

    /// gRPC or gRPC over TLS.
    pub fn is_grpc(self) -> bool {
        matches!(self, Self::Grpc | Self::Grpcs)
    }
}

/// How daprd reaches the app (reported in metadata; the app channel is built from it).
#[derive(Debug, Clone)]
pub struct AppConnection {
    /// `--app-port` (0 = none).
    pub port: u16,
    /// `--app-protocol`.
    pub protocol: AppProtocol,
    /// `--app-channel-address`.
    pub channel_address: String,
    /// `--app-max-concurrency` (-1 = unlimited).
    pub max_concurrency: i64,
    /// App health checking, when enabled.
    pub health: Option<AppHealth>,
}

/// `--enable-app-health-check` settings.
#[derive(Debug, Clone)]
pub struct AppHealth {
    /// `--app-health-check-path`.
    pub path: String,
    /// `--app-health-probe-interval`.
    pub interval: Duration,
    /// `--app-health-probe-timeout`.
    pub timeout: Duration,
    /// `--app-health-threshold`.
    pub threshold: i64,
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// `--app-id`.
    pub app_id: String,
    /// `--mode`.
    pub mode: Mode,
    /// HTTP API port.
    pub http_port: u16,
    /// gRPC API port.
    pub grpc_port: u16,
    /// Bind addresses for both APIs.
    pub listen_addresses: Vec<IpAddr>,
    /// Public (health + metadata) port.
    pub public_port: Option<u16>,
    /// Bind address of the public port.
    pub public_listen_address: IpAddr,
    /// Where the Prometheus metrics are served (`--metrics-listen-address`,
    /// `--metrics-port`); `None` with `--enable-metrics=false`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Resources directories.
    pub resources_paths: Vec<PathBuf>,
    /// `--unix-domain-socket`: the HTTP and gRPC APIs listen on sockets in this directory
    /// instead of TCP ports.
    pub unix_domain_socket: Option<PathBuf>,
    /// `--config`: Configuration files (standalone mode).
    pub config_files: Vec<PathBuf>,
    /// Maximum request body in bytes.
    pub max_body_size: usize,
    /// Grace period for shutdown.
    pub graceful_shutdown: Duration,
    /// `--dapr-block-shutdown-duration`.
    pub block_shutdown: Option<Duration>,
    /// CORS origins (`None` = CORS off).
    pub allowed_origins: Option<Vec<String>>,
    /// App connection.
    pub app: AppConnection,
    /// `--log-level`.
    pub log_level: LogLevel,
    /// `--log-as-json`.
    pub log_as_json: bool,
    /// `--enable-api-logging` (`None`: not given; the Configuration decides).
    pub api_logging: Option<bool>,
    /// `--disable-init-endpoints`.
    pub disable_init_endpoints: Vec<String>,
    /// The control plane (Kubernetes mode only).
    pub kubernetes: Option<KubernetesConfig>,
    /// Environment.
    pub env: Env,
}

impl RuntimeConfig {
    /// The namespace (`NAMESPACE`, default `default`).
    pub fn namespace(&self) -> &str {
        self.env.namespace.as_deref().unwrap_or("default")
    }
}

fn parse_port(name: &str, v: &str, errors: &mut Vec<String>) -> Option<u16> {
    if v.is_empty() {
        return None;
    }
    match v.parse::<u16>() {
        Ok(p) => Some(p),
        Err(_) => {
            errors.push(format!(
                "invalid value {v:?} for flag --{name}: not a port number"
            ));
            None
        }
    }
}

/// Parses a Kubernetes resource quantity (`4Mi`, `4M`, `4096`, `1.5Gi`) into bytes.
pub fn parse_quantity(v: &str) -> Option<usize> {
    let v = v.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        _ => return None,
    };
    let bytes = n * mult;
    (bytes.is_finite() && bytes >= 0.0 && bytes < usize::MAX as f64).then_some(bytes as usize)
}

impl RuntimeConfig {
    /// Validates `opts` and `env`. `require_app_id` is false for `daprd validate`.
    ///
    /// # Errors
    /// One line per problem, naming the flag.
    pub fn from_options(
        opts: &Options,
        env: Env,
        require_app_id: bool,
    ) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let mode = mode(opts, &mut errors);
        let kubernetes = (mode == Mode::Kubernetes).then(|| kubernetes(opts, &env, &mut errors));
        if require_app_id && opts.app_id.is_empty() {
            errors.push("parameter app-id cannot be empty".into());
        }
        if mode == Mode::Standalone && opts.app_id.contains('.') {
            errors.push(format!(
                "invalid app id {:?}: must not contain dots in standalone mode",
                opts.app_id
            ));
        }
        let http_port =
            parse_port("dapr-http-port", &opts.dapr_http_port, &mut errors).unwrap_or(3500);
        let grpc_port =
            parse_port("dapr-grpc-port", &opts.dapr_grpc_port, &mut errors).unwrap_or(50001);
        let public_port = parse_port("dapr-public-port", &opts.dapr_public_port, &mut errors);
        let app_port = parse_port("app-port", &opts.app_port, &mut errors).unwrap_or(0);
        let listen_addresses = listen_addresses(opts, &mut errors);
        let public_listen_address = public_listen_address(opts, &mut errors);
        let metrics_port =
            parse_port("metrics-port", &opts.metrics_port, &mut errors).unwrap_or(9090);
        let metrics_ip = listen_ip(
            "metrics-listen-address",
            &opts.metrics_listen_address,
            &mut errors,
        );

        let mut resources_paths: Vec<PathBuf> = opts
            .resources_path
            .iter()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        if resources_paths.is_empty() && !opts.components_path.is_empty() {
            resources_paths.push(PathBuf::from(&opts.components_path));
        }
        let max_body_size = max_body_size(opts, &mut errors);
        // Go daprd reads a negative grace period (the Kubernetes injector passes -1) as its
        // default of 5 s, not as "no grace".
        let graceful_shutdown = match u64::try_from(opts.dapr_graceful_shutdown_seconds) {
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => DEFAULT_GRACEFUL_SHUTDOWN,
        };
        let block_shutdown = block_shutdown(opts, &mut errors);

        let mut bool_flag = |name: &str, v: &str| {
            cli::flag_bool(name, v).unwrap_or_else(|e| {
                errors.push(e);
                false
            })
        };
        let log_as_json = bool_flag("log-as-json", &opts.log_as_json);
        let health_on = bool_flag("enable-app-health-check", &opts.enable_app_health_check);
        let app_ssl = bool_flag("app-ssl", &opts.app_ssl);
        let api_logging = opts
            .enable_api_logging
            .as_deref()
            .map(|v| bool_flag("enable-api-logging", v));
        let metrics_on = bool_flag("enable-metrics", &opts.enable_metrics);
        // accepted and checked; what they switch has no effect here yet
        for (name, v) in [
            ("enable-mtls", &opts.enable_mtls),
            ("enable-profiling", &opts.enable_profiling),
            ("build-info", &opts.build_info),
            ("wait", &opts.wait),
            (
                "disable-builtin-k8s-secret-store",
                &opts.disable_builtin_k8s_secret_store,
            ),
        ] {
            bool_flag(name, v);
        }

        let mut protocol = AppProtocol::parse(&opts.app_protocol).unwrap_or_else(|| {
            errors.push(format!(
                "invalid value {:?} for flag --app-protocol: use http, https, h2c, grpc or grpcs",
                opts.app_protocol
            ));
            AppProtocol::Http
        });
        if app_ssl {
            protocol = protocol.with_tls();
        }
        let log_level = LogLevel::parse(&opts.log_level).unwrap_or_else(|| {
            errors.push(format!(
                "invalid value {:?} for flag --log-level: use debug, info, warn, error or fatal",
                opts.log_level
            ));
            LogLevel::Info
        });
        let allowed_origins = match opts.allowed_origins.trim() {
            "" => None,
            list => Some(
                list.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            ),
        };
        let health = health_on.then(|| AppHealth {
            path: opts.app_health_check_path.clone(),
            interval: Duration::from_secs(opts.app_health_probe_interval.max(1).unsigned_abs()),
            timeout: Duration::from_millis(opts.app_health_probe_timeout.max(1).unsigned_abs()),
            threshold: opts.app_health_threshold.max(1),
        });
        for e in &opts.disable_init_endpoints {
            if e != "subscribe" && e != "config" {
                errors.push(format!("invalid value {e:?} for flag --disable-init-endpoints: use subscribe or config"));
            }
        }

        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            app_id: opts.app_id.clone(),
            mode,
            http_port,
            grpc_port,
            listen_addresses,
            public_port,
            public_listen_address,
            metrics_addr: metrics_on.then(|| std::net::SocketAddr::new(metrics_ip, metrics_port)),
            resources_paths,
            unix_domain_socket: (!opts.unix_domain_socket.trim().is_empty())
                .then(|| PathBuf::from(opts.unix_domain_socket.trim())),
            // In Kubernetes mode `--config` names a Configuration of the operator.
            config_files: opts
                .config
                .iter()
                .filter(|_| mode == Mode::Standalone)
                .map(|c| c.trim())
                .filter(|c| !c.is_empty())
                .map(PathBuf::from)
                .collect(),
            max_body_size,
            graceful_shutdown,
            block_shutdown,
            allowed_origins,
            app: AppConnection {
                port: app_port,
                protocol,
                channel_address: opts.app_channel_address.clone(),
                max_concurrency: opts.app_max_concurrency,
                health,
            },
            log_level,
            log_as_json,
            api_logging,
            disable_init_endpoints: opts.disable_init_endpoints.clone(),
            kubernetes,
            env,
        })
    }
}

/// `--mode`.
fn mode(opts: &Options, errors: &mut Vec<String>) -> Mode {
    match opts.mode.as_str() {
        "standalone" => Mode::Standalone,
        "kubernetes" => Mode::Kubernetes,
        other => {
            errors.push(format!(
                "invalid value {other:?} for flag --mode: use standalone or kubernetes"
            ));
            Mode::Standalone
        }
    }
}

/// Kubernetes mode's control plane: flags, else environment, else Go daprd's defaults.
fn kubernetes(opts: &Options, env: &Env, errors: &mut Vec<String>) -> KubernetesConfig {
    let pick = |flag: &str, var: &Option<String>, default: &str| {
        if flag.trim().is_empty() {
            var.clone().unwrap_or_else(|| default.to_string())
        } else {
            flag.trim().to_string()
        }
    };
    let mut need = |what: &str, v: &str| {
        if v.trim().is_empty() {
            errors.push(format!("kubernetes mode needs {what}"));
        }
    };
    need(
        "--control-plane-address (the operator)",
        &opts.control_plane_address,
    );
    need("--sentry-address", &opts.sentry_address);
    need(
        "the environment variable DAPR_TRUST_ANCHORS (the control plane's root certificates, PEM)",
        env.trust_anchors.as_deref().unwrap_or(""),
    );
    need(
        "the environment variable NAMESPACE (the pod's namespace)",
        env.namespace.as_deref().unwrap_or(""),
    );
    let names: Vec<&str> = opts
        .config
        .iter()
        .map(|c| c.trim())
        .filter(|c| !c.is_empty())
        .collect();
    if names.len() > 1 {
        errors.push(format!(
            "kubernetes mode takes one --config (a Configuration name), got {}",
            names.len()
        ));
    }
    KubernetesConfig {
        control_plane_address: opts.control_plane_address.trim().to_string(),
        sentry_address: opts.sentry_address.trim().to_string(),
        control_plane_trust_domain: pick(
            &opts.control_plane_trust_domain,
            &env.control_plane_trust_domain,
            "localhost",
        ),
        control_plane_namespace: pick(
            &opts.control_plane_namespace,
            &env.control_plane_namespace,
            "default",
        ),
        trust_anchors: env.trust_anchors.clone().unwrap_or_default(),
        namespace: env.namespace.clone().unwrap_or_default(),
        sentry_token_file: env.sentry_token_file.as_ref().map(PathBuf::from),
        config_name: names.first().map(ToString::to_string),
    }
}

/// `--dapr-listen-addresses` (comma list; `localhost` is 127.0.0.1; default all interfaces).
fn listen_addresses(opts: &Options, errors: &mut Vec<String>) -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    for a in opts
        .dapr_listen_addresses
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        let bare = a.trim_start_matches('[').trim_end_matches(']');
        let parsed = if bare == "localhost" {
            Ok(IpAddr::from([127, 0, 0, 1]))
        } else {
            bare.parse()
        };
        match parsed {
            Ok(ip) => addresses.push(ip),
            Err(_) => errors.push(format!(
                "invalid address {a:?} in flag --dapr-listen-addresses"
            )),
        }
    }
    if addresses.is_empty() {
        addresses.push(IpAddr::from([0, 0, 0, 0]));
    }
    addresses
}

/// `--dapr-public-listen-address` (default all interfaces).
fn public_listen_address(opts: &Options, errors: &mut Vec<String>) -> IpAddr {
    listen_ip(
        "dapr-public-listen-address",
        &opts.dapr_public_listen_address,
        errors,
    )
}

/// One IP address flag (`[::1]` accepted); empty: all IPv4 interfaces.
fn listen_ip(flag: &str, value: &str, errors: &mut Vec<String>) -> IpAddr {
    let any = IpAddr::from([0, 0, 0, 0]);
    if value.is_empty() {
        return any;
    }
    value
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .unwrap_or_else(|_| {
            errors.push(format!("invalid address {value:?} for flag --{flag}"));
            any
        })
}

/// `--max-body-size` (a resource quantity), else the older `--dapr-http-max-request-size`
/// (MB).
fn max_body_size(opts: &Options, errors: &mut Vec<String>) -> usize {
    if !opts.max_body_size.is_empty() {
        return parse_quantity(&opts.max_body_size).unwrap_or_else(|| {
            errors.push(format!(
                "invalid value {:?} for flag --max-body-size: not a resource quantity",
                opts.max_body_size
            ));
            DEFAULT_MAX_BODY
        });
    }
    if opts.dapr_http_max_request_size.is_empty() {
        return DEFAULT_MAX_BODY;
    }
    match opts.dapr_http_max_request_size.parse::<usize>() {
        Ok(mb) => mb << 20,
        Err(_) => {
            errors.push(format!(
                "invalid value {:?} for flag --dapr-http-max-request-size",
                opts.dapr_http_max_request_size
            ));
            DEFAULT_MAX_BODY
        }
    }
}

/// `--dapr-block-shutdown-duration` (a Go duration).
fn block_shutdown(opts: &Options, errors: &mut Vec<String>) -> Option<Duration> {
    if opts.dapr_block_shutdown_duration.is_empty() {
        return None;
    }
    parse_go_duration(&opts.dapr_block_shutdown_duration)
        .map_err(|e| errors.push(format!("flag --dapr-block-shutdown-duration: {e}")))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn cfg(args: &[&str]) -> Result<RuntimeConfig, Vec<String>> {
        let argv = std::iter::once("daprd".to_string()).chain(args.iter().map(|s| s.to_string()));
        let opts = Options::try_parse_from(cli::normalise_args(argv)).unwrap();
        RuntimeConfig::from_options(&opts, Env::default(), true)
    }

    #[test]
    fn kubernetes_control_plane_flags_win_over_the_environment() {
        let k8s = |extra: &[&str], env: Env| {
            let mut args = vec![
                "daprd",
                "--app-id",
                "a",
                "--mode",
                "kubernetes",
                "--control-plane-address",
                "op:443",
                "--sentry-address",
                "sentry:443",
                "--config",
                "appconfig",
            ];
            args.extend_from_slice(extra);
            let opts =
                Options::try_parse_from(cli::normalise_args(args.iter().map(|s| s.to_string())))
                    .unwrap();
            RuntimeConfig::from_options(&opts, env, true)
        };
        let env = Env {
            namespace: Some("ns1".into()),
            trust_anchors: Some("PEM".into()),
            control_plane_trust_domain: Some("env.td".into()),
            control_plane_namespace: Some("env-ns".into()),
            sentry_token_file: Some("/tok".into()),
            ..Env::default()
        };
        let c = k8s(&[], env.clone()).unwrap();
        let k = c.kubernetes.unwrap();
        assert_eq!(
            (
                k.control_plane_trust_domain.as_str(),
                k.control_plane_namespace.as_str()
            ),
            ("env.td", "env-ns")
        );
        assert_eq!(k.config_name.as_deref(), Some("appconfig"));
        assert!(c.config_files.is_empty(), "--config is a name here");
        assert_eq!(k.sentry_token_file, Some(PathBuf::from("/tok")));
        let k = k8s(
            &[
                "--control-plane-trust-domain",
                "flag.td",
                "--control-plane-namespace",
                "flag-ns",
            ],
            env,
        )
        .unwrap()
        .kubernetes
        .unwrap();
        assert_eq!(
            (
                k.control_plane_trust_domain.as_str(),
                k.control_plane_namespace.as_str()
            ),
            ("flag.td", "flag-ns")
        );
        let bare = Env {
            namespace: Some("ns1".into()),
            trust_anchors: Some("PEM".into()),
            ..Env::default()
        };
        let k = k8s(&[], bare).unwrap().kubernetes.unwrap();
        assert_eq!(
            (
                k.control_plane_trust_domain.as_str(),
                k.control_plane_namespace.as_str()
            ),
            ("localhost", "default")
        );
    }

    #[test]
    fn app_id_is_required_and_dotless() {
        let e = cfg(&[]).unwrap_err();
        assert!(e.iter().any(|l| l == "parameter app-id cannot be empty"));
        let e = cfg(&["--app-id", "a.b"]).unwrap_err();
        assert!(e[0].contains("must not contain dots"));
    }

    #[test]
    fn every_problem_is_reported() {
        let e = cfg(&[
            "--dapr-http-port",
            "x",
            "--app-protocol",
            "ftp",
            "--log-level",
            "loud",
            "--max-body-size",
            "lots",
        ])
        .unwrap_err();
        assert_eq!(e.len(), 5, "{e:?}");
    }

    #[test]
    fn sizes_and_paths() {
        let c = cfg(&[
            "--app-id",
            "a",
            "--max-body-size",
            "8Mi",
            "--components-path",
            "old",
        ])
        .unwrap();
        assert_eq!(c.max_body_size, 8 << 20);
        assert_eq!(c.resources_paths, vec![PathBuf::from("old")]);
        let c = cfg(&[
            "--app-id",
            "a",
            "--dapr-http-max-request-size",
            "2",
            "--resources-path",
            "new",
            "--components-path",
            "old",
        ])
        .unwrap();
        assert_eq!(c.max_body_size, 2 << 20);
        assert_eq!(c.resources_paths, vec![PathBuf::from("new")]);
        assert_eq!(parse_quantity("4Ki"), Some(4096));
        assert_eq!(parse_quantity("1M"), Some(1_000_000));
        assert_eq!(parse_quantity("x"), None);
    }

    #[test]
    fn listen_addresses_accept_brackets() {
        let c = cfg(&[
            "--app-id",
            "a",
            "--dapr-listen-addresses",
            "[::1],127.0.0.1",
        ])
        .unwrap();
        assert_eq!(c.listen_addresses.len(), 2);
        assert!(c.listen_addresses[0].is_ipv6());
    }

    #[test]
    fn negative_grace_period_is_the_default() {
        let grace = |v: &str| {
            cfg(&["--app-id", "a", "--dapr-graceful-shutdown-seconds", v])
                .unwrap()
                .graceful_shutdown
        };
        assert_eq!(grace("-1"), Duration::from_secs(5));
        assert_eq!(grace("-30"), Duration::from_secs(5));
        assert_eq!(grace("0"), Duration::ZERO);
        assert_eq!(grace("12"), Duration::from_secs(12));
    }

    #[test]
    fn mode_is_checked() {
        assert_eq!(cfg(&["--app-id", "a"]).unwrap().mode, Mode::Standalone);
        let errs = cfg(&["--app-id", "a", "--mode", "kubernetes"]).unwrap_err();
        assert!(
            errs.iter().any(|e| e.contains("--control-plane-address"))
                && errs.iter().any(|e| e.contains("DAPR_TRUST_ANCHORS")),
            "{errs:?}"
        );
        let errs = cfg(&["--app-id", "a", "--mode", "cloud"]).unwrap_err();
        assert!(errs[0].contains("flag --mode"), "{errs:?}");
        let errs = cfg(&["--app-id", "a.b"]).unwrap_err();
        assert!(errs[0].contains("must not contain dots"), "{errs:?}");
    }

    #[test]
    fn app_protocol_is_checked() {
        let c = cfg(&["--app-id", "a", "--app-protocol", "H2C"]).unwrap();
        assert_eq!(c.app.protocol, AppProtocol::H2c);
        let errs = cfg(&["--app-id", "a", "--app-protocol", "ftp"]).unwrap_err();
        assert!(errs[0].contains("--app-protocol"), "{errs:?}");
    }

    #[test]
    fn log_level_is_checked() {
        assert_eq!(cfg(&["--app-id", "a"]).unwrap().log_level, LogLevel::Info);
        let c = cfg(&["--app-id", "a", "--log-level", "Fatal"]).unwrap();
        assert_eq!(c.log_level, LogLevel::Fatal);
        assert_eq!(c.log_level.filter(), "error");
        let errs = cfg(&["--app-id", "a", "--log-level", "verbose"]).unwrap_err();
        assert!(errs[0].contains("--log-level"), "{errs:?}");
    }

    #[test]
    fn app_ssl_upgrades_protocol() {
        let c = cfg(&["--app-id", "a", "--app-ssl", "--app-protocol", "grpc"]).unwrap();
        assert_eq!(c.app.protocol, AppProtocol::Grpcs);
    }
}
