//! The `daprd` command line, flag for flag as Go daprd accepts it.
//!
//! Go daprd parses with pflag after rewriting single-dash long flags (`-app-id`) into
//! double-dash ones; [`normalise_args`] does the same. Boolean flags take an optional
//! `=value` (`--enable-metrics=false`). Flags that do not apply to a pub/sub sidecar
//! (actors, placement, mTLS, profiling, ...) are accepted and ignored.

use clap::{ArgAction, Parser};

/// Every daprd flag. Field docs are the `--help` text.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "daprd",
    about = "daprd-rs: a Dapr-compatible pub/sub sidecar",
    disable_version_flag = true
)]
pub struct Options {
    /// A unique ID for the application (required in standalone mode).
    #[arg(long = "app-id", default_value = "")]
    pub app_id: String,
    /// Runtime mode: standalone or kubernetes.
    #[arg(long, default_value = "standalone")]
    pub mode: String,
    /// HTTP port for the Dapr API.
    #[arg(long = "dapr-http-port", default_value = "3500")]
    pub dapr_http_port: String,
    /// gRPC port for the Dapr API.
    #[arg(long = "dapr-grpc-port", default_value = "50001")]
    pub dapr_grpc_port: String,
    /// Comma list of addresses the Dapr APIs listen on (default: all interfaces).
    #[arg(long = "dapr-listen-addresses", default_value = "")]
    pub dapr_listen_addresses: String,
    /// Public port exposing only health and metadata endpoints.
    #[arg(long = "dapr-public-port", default_value = "")]
    pub dapr_public_port: String,
    /// Listen address for the public port.
    #[arg(long = "dapr-public-listen-address", default_value = "")]
    pub dapr_public_listen_address: String,
    /// Internal gRPC port (sidecar to sidecar; not used by daprd-rs).
    #[arg(long = "dapr-internal-grpc-port", default_value = "")]
    pub dapr_internal_grpc_port: String,
    /// Internal gRPC listen address (not used by daprd-rs).
    #[arg(long = "dapr-internal-grpc-listen-address", default_value = "")]
    pub dapr_internal_grpc_listen_address: String,
    /// The port the application listens on.
    #[arg(long = "app-port", default_value = "")]
    pub app_port: String,
    /// Protocol of the app channel: http, https, h2c, grpc, grpcs.
    #[arg(long = "app-protocol", default_value = "http")]
    pub app_protocol: String,
    /// Host of the application.
    #[arg(long = "app-channel-address", default_value = "127.0.0.1")]
    pub app_channel_address: String,
    /// Maximum concurrent calls to the app (-1 = unlimited).
    #[arg(long = "app-max-concurrency", default_value_t = -1, allow_negative_numbers = true)]
    pub app_max_concurrency: i64,
    /// Deprecated: use --app-protocol https or grpcs.
    #[arg(long = "app-ssl", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub app_ssl: String,
    /// Directories with resource YAML files (repeatable, comma list).
    #[arg(long = "resources-path", value_delimiter = ',', action = ArgAction::Append)]
    pub resources_path: Vec<String>,
    /// Deprecated alias of --resources-path.
    #[arg(long = "components-path", default_value = "")]
    pub components_path: String,
    /// Configuration file(s).
    #[arg(long = "config", value_delimiter = ',', action = ArgAction::Append)]
    pub config: Vec<String>,
    /// Log level: debug, info, warn, error, fatal.
    #[arg(long = "log-level", default_value = "info")]
    pub log_level: String,
    /// Print logs as JSON.
    #[arg(long = "log-as-json", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub log_as_json: String,
    /// Write logs to this file instead of stderr.
    #[arg(long = "log-file", default_value = "")]
    pub log_file: String,
    /// Enable the Prometheus metrics exporter.
    #[arg(long = "enable-metrics", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "true", action = ArgAction::Set)]
    pub enable_metrics: String,
    /// Port of the metrics exporter.
    #[arg(long = "metrics-port", default_value = "9090")]
    pub metrics_port: String,
    /// Listen address of the metrics exporter.
    #[arg(long = "metrics-listen-address", default_value = "0.0.0.0")]
    pub metrics_listen_address: String,
    /// Log every API call.
    #[arg(long = "enable-api-logging", num_args = 0..=1, require_equals = true, default_missing_value = "true", action = ArgAction::Set)]
    pub enable_api_logging: Option<String>,
    /// Maximum request body size (resource quantity, e.g. 4Mi).
    #[arg(long = "max-body-size", default_value = "")]
    pub max_body_size: String,
    /// Deprecated: maximum request body size in MB.
    #[arg(long = "dapr-http-max-request-size", default_value = "")]
    pub dapr_http_max_request_size: String,
    /// HTTP header read buffer (resource quantity, e.g. 4Ki).
    #[arg(long = "read-buffer-size", default_value = "")]
    pub read_buffer_size: String,
    /// Deprecated: header read buffer in KB.
    #[arg(long = "dapr-http-read-buffer-size", default_value = "")]
    pub dapr_http_read_buffer_size: String,
    /// Grace period of the shutdown sequence, in seconds.
    #[arg(
        long = "dapr-graceful-shutdown-seconds",
        default_value_t = 5,
        allow_negative_numbers = true
    )]
    pub dapr_graceful_shutdown_seconds: i64,
    /// Keep outbound APIs up this long after SIGTERM (Go duration).
    #[arg(long = "dapr-block-shutdown-duration", default_value = "")]
    pub dapr_block_shutdown_duration: String,
    /// Probe the app's health.
    #[arg(long = "enable-app-health-check", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub enable_app_health_check: String,
    /// Path of the app health check (HTTP only).
    #[arg(long = "app-health-check-path", default_value = "/healthz")]
    pub app_health_check_path: String,
    /// Seconds between app health probes.
    #[arg(long = "app-health-probe-interval", default_value_t = 5)]
    pub app_health_probe_interval: i64,
    /// App health probe timeout in milliseconds.
    #[arg(long = "app-health-probe-timeout", default_value_t = 500)]
    pub app_health_probe_timeout: i64,
    /// Failed probes before the app is unhealthy.
    #[arg(long = "app-health-threshold", default_value_t = 3)]
    pub app_health_threshold: i64,
    /// Init endpoints not to call on the app: subscribe, config.
    #[arg(long = "disable-init-endpoints", value_delimiter = ',', action = ArgAction::Append)]
    pub disable_init_endpoints: Vec<String>,
    /// Serve the Dapr APIs on Unix domain sockets in this directory.
    #[arg(long = "unix-domain-socket", default_value = "")]
    pub unix_domain_socket: String,
    /// Comma list of allowed CORS origins for the HTTP API (* = all).
    #[arg(long = "allowed-origins", default_value = "")]
    pub allowed_origins: String,
    /// Operator address, `host:port` (Kubernetes mode).
    #[arg(long = "control-plane-address", default_value = "")]
    pub control_plane_address: String,
    /// Sentry address, `host:port` (Kubernetes mode: the workload certificate).
    #[arg(long = "sentry-address", default_value = "")]
    pub sentry_address: String,
    /// Enable mTLS (Kubernetes mode always uses it with the control plane).
    #[arg(long = "enable-mtls", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub enable_mtls: String,
    /// Control-plane trust domain (Kubernetes mode; default `DAPR_CONTROLPLANE_TRUST_DOMAIN`,
    /// else `localhost`).
    #[arg(long = "control-plane-trust-domain", default_value = "")]
    pub control_plane_trust_domain: String,
    /// Control-plane namespace (Kubernetes mode; default `DAPR_CONTROLPLANE_NAMESPACE`, else
    /// `default`).
    #[arg(long = "control-plane-namespace", default_value = "")]
    pub control_plane_namespace: String,
    /// Placement service addresses (actors; ignored).
    #[arg(long = "placement-host-address", default_value = "")]
    pub placement_host_address: String,
    /// Scheduler addresses (jobs; ignored).
    #[arg(long = "scheduler-host-address", value_delimiter = ',', action = ArgAction::Append)]
    pub scheduler_host_address: Vec<String>,
    /// Scheduler job streams (ignored).
    #[arg(long = "scheduler-job-streams", default_value = "")]
    pub scheduler_job_streams: String,
    /// Sentry JWT audiences (ignored).
    #[arg(long = "sentry-request-jwt-audiences", value_delimiter = ',', action = ArgAction::Append)]
    pub sentry_request_jwt_audiences: Vec<String>,
    /// Hot reload reconcile interval (ignored).
    #[arg(long = "hot-reload-reconcile-interval", default_value = "")]
    pub hot_reload_reconcile_interval: String,
    /// Actors dissemination timeout (ignored).
    #[arg(long = "actors-disseminate-timeout", default_value = "")]
    pub actors_disseminate_timeout: String,
    /// Binding options timeout (ignored).
    #[arg(long = "app-binding-options-timeout", default_value = "")]
    pub app_binding_options_timeout: String,
    /// Deprecated, no effect.
    #[arg(long = "actors-service", default_value = "", hide = true)]
    pub actors_service: String,
    /// Deprecated, no effect.
    #[arg(long = "reminders-service", default_value = "", hide = true)]
    pub reminders_service: String,
    /// Do not load the built-in Kubernetes secret store (ignored).
    #[arg(long = "disable-builtin-k8s-secret-store", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub disable_builtin_k8s_secret_store: String,
    /// Profiling port (ignored).
    #[arg(long = "profile-port", default_value = "7777")]
    pub profile_port: String,
    /// Enable profiling (ignored).
    #[arg(long = "enable-profiling", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub enable_profiling: String,
    /// Print the runtime version and exit.
    #[arg(long = "version", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub version: String,
    /// Print build information and exit.
    #[arg(long = "build-info", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub build_info: String,
    /// Wait for the control plane (ignored).
    #[arg(long = "wait", num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value = "false", action = ArgAction::Set)]
    pub wait: String,
    /// Stray positional arguments (pflag ignores them, so do we).
    #[arg(hide = true)]
    pub rest: Vec<String>,
}

/// Rewrites Go-style single-dash long flags (`-app-id`) to `--app-id`, as daprd does.
/// Negative numbers (`-1`) are left alone.
pub fn normalise_args<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    args.into_iter()
        .map(|a| {
            let b = a.as_bytes();
            if b.len() > 2 && b[0] == b'-' && b[1] != b'-' && !b[1].is_ascii_digit() {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

/// Parses a Go `strconv.ParseBool` flag value.
pub fn flag_bool(name: &str, value: &str) -> Result<bool, String> {
    daprd_core::metadata::parse_go_bool(value)
        .ok_or_else(|| format!("invalid boolean value {value:?} for flag --{name}"))
}

/// Flags that exist for compatibility only: (flag, value) pairs that were set.
pub fn ignored_flags(o: &Options) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut push = |name: &'static str, v: &str, default: &str| {
        if v != default {
            out.push((name, v.to_string()));
        }
    };
    push("dapr-internal-grpc-port", &o.dapr_internal_grpc_port, "");
    push(
        "dapr-internal-grpc-listen-address",
        &o.dapr_internal_grpc_listen_address,
        "",
    );
    if o.mode != "kubernetes" {
        push("control-plane-address", &o.control_plane_address, "");
        push("sentry-address", &o.sentry_address, "");
        push("enable-mtls", &o.enable_mtls, "false");
    }
    push("placement-host-address", &o.placement_host_address, "");
    push(
        "scheduler-host-address",
        &o.scheduler_host_address.join(","),
        "",
    );
    push("enable-profiling", &o.enable_profiling, "false");
    push(
        "hot-reload-reconcile-interval",
        &o.hot_reload_reconcile_interval,
        "",
    );
    push("log-file", &o.log_file, "");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Options {
        let argv = std::iter::once("daprd".to_string()).chain(args.iter().map(|s| s.to_string()));
        Options::try_parse_from(normalise_args(argv)).expect("parses")
    }

    #[test]
    fn go_style_single_dash_and_equals_forms() {
        for args in [
            &["-app-id", "x"][..],
            &["--app-id", "x"][..],
            &["--app-id=x"][..],
            &["-app-id=x"][..],
        ] {
            assert_eq!(parse(args).app_id, "x", "{args:?}");
        }
    }

    #[test]
    fn defaults_match_daprd() {
        let o = parse(&["--app-id", "a"]);
        assert_eq!(o.dapr_http_port, "3500");
        assert_eq!(o.dapr_grpc_port, "50001");
        assert_eq!(o.app_protocol, "http");
        assert_eq!(o.app_channel_address, "127.0.0.1");
        assert_eq!(o.app_max_concurrency, -1);
        assert_eq!(o.dapr_graceful_shutdown_seconds, 5);
        assert_eq!(o.log_level, "info");
        assert_eq!(o.enable_metrics, "true");
        assert!(o.resources_path.is_empty());
    }

    #[test]
    fn bool_flags_take_optional_value() {
        assert_eq!(parse(&["--log-as-json"]).log_as_json, "true");
        assert_eq!(parse(&["--enable-metrics=false"]).enable_metrics, "false");
        assert_eq!(parse(&["-enable-metrics=false"]).enable_metrics, "false");
        // pflag does not let a bool flag consume the next word: it is a stray positional.
        let o = parse(&["--log-as-json", "false"]);
        assert_eq!(o.log_as_json, "true");
        assert_eq!(o.rest, vec!["false".to_string()]);
        assert_eq!(
            parse(&["--enable-api-logging"])
                .enable_api_logging
                .as_deref(),
            Some("true")
        );
        assert_eq!(parse(&[]).enable_api_logging, None);
    }

    #[test]
    fn repeated_and_comma_lists() {
        let o = parse(&["--resources-path", "a,b", "-resources-path", "c"]);
        assert_eq!(o.resources_path, vec!["a", "b", "c"]);
        let o = parse(&["--disable-init-endpoints", "subscribe,config"]);
        assert_eq!(o.disable_init_endpoints, vec!["subscribe", "config"]);
    }

    #[test]
    fn negative_numbers_are_values() {
        let o = parse(&["--app-max-concurrency", "-1"]);
        assert_eq!(o.app_max_concurrency, -1);
        let o = parse(&["-app-max-concurrency", "-10"]);
        assert_eq!(o.app_max_concurrency, -10);
    }

    #[test]
    fn kubernetes_injector_command_line_is_accepted() {
        let o = parse(&[
            "--mode",
            "kubernetes",
            "--dapr-http-port",
            "3500",
            "--dapr-grpc-port",
            "50001",
            "--dapr-internal-grpc-port",
            "50002",
            "--dapr-listen-addresses",
            "[::1],127.0.0.1",
            "--dapr-public-port",
            "3501",
            "--app-port",
            "8080",
            "--app-id",
            "checkout",
            "--control-plane-address",
            "dapr-api.dapr-system.svc.cluster.local:443",
            "--app-protocol",
            "http",
            "--placement-host-address",
            "placement:50005",
            "--config",
            "appconfig",
            "--log-level",
            "info",
            "--app-max-concurrency",
            "-1",
            "--sentry-address",
            "dapr-sentry.dapr-system.svc.cluster.local:443",
            "--enable-metrics=true",
            "--metrics-port",
            "9090",
            "--dapr-graceful-shutdown-seconds",
            "-1",
            "--enable-mtls",
            "--disable-builtin-k8s-secret-store=false",
            "--scheduler-host-address",
            "dapr-scheduler-server-0:50006,dapr-scheduler-server-1:50006",
            "--dapr-block-shutdown-duration",
            "10s",
            "--disable-init-endpoints",
            "config",
            "--max-body-size",
            "8Mi",
            "--read-buffer-size",
            "8Ki",
        ]);
        assert_eq!(o.app_id, "checkout");
        assert_eq!(o.mode, "kubernetes");
        assert_eq!(o.scheduler_host_address.len(), 2);
        assert_eq!(o.dapr_graceful_shutdown_seconds, -1);
        assert_eq!(o.enable_mtls, "true");
        assert!(ignored_flags(&o)
            .iter()
            .any(|(n, _)| *n == "placement-host-address"));
    }

    #[test]
    fn dapr_cli_command_line_is_accepted() {
        let o = parse(&[
            "--app-id",
            "checkout",
            "--dapr-http-port",
            "3500",
            "--dapr-grpc-port",
            "50001",
            "--log-level",
            "info",
            "--app-max-concurrency",
            "-1",
            "--app-protocol",
            "http",
            "--dapr-internal-grpc-port",
            "40001",
            "--placement-host-address",
            "localhost:6050",
            "--scheduler-host-address",
            "localhost:6060",
            "--metrics-port",
            "9091",
            "--resources-path",
            "/root/.dapr/components",
            "--config",
            "/root/.dapr/config.yaml",
            "--app-port",
            "3000",
            "--enable-app-health-check=false",
            "--unix-domain-socket",
            "",
        ]);
        assert_eq!(o.resources_path, vec!["/root/.dapr/components"]);
        assert_eq!(o.app_port, "3000");
    }

    #[test]
    fn unknown_flag_is_an_error() {
        let argv = ["daprd", "--no-such-flag", "1"].map(String::from);
        assert!(Options::try_parse_from(argv).is_err());
    }

    #[test]
    fn flag_bool_is_go_parse_bool() {
        assert_eq!(flag_bool("x", "True"), Ok(true));
        assert!(flag_bool("x", "yes").is_err());
    }
}
