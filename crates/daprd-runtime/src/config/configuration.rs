//! The Configuration resource (`--config FILE`): `apiVersion: dapr.io/v1alpha1`,
//! `kind: Configuration`. The whole `spec` is read into types, every problem is reported at
//! once with file and field (as the resources loader does), and whatever this runtime does not
//! act on is named in a warning instead of being ignored silently.
//!
//! As Go daprd, `$VAR` and `${VAR}` in the file are replaced by the environment before it is
//! parsed, and keys are matched exactly (Go's YAML decoding is case-sensitive).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_norway::Value;

use super::resources::ResourceError;

/// A parsed Configuration: the parts this runtime reads.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Configuration {
    /// `metadata.name`.
    pub name: String,
    /// `spec.tracing`.
    pub tracing: Tracing,
    /// `spec.metric` (or `spec.metrics`).
    pub metric: Metric,
    /// `spec.api`.
    pub api: ApiAccess,
    /// `spec.logging.apiLogging`.
    pub api_logging: ApiLogging,
    /// `spec.features`: name and enabled, in file order.
    pub features: Vec<(String, bool)>,
    /// `spec.components.deny`: `type` or `type/version` that may not be loaded.
    pub components_deny: Vec<String>,
    /// `spec.secrets.scopes`.
    pub secret_scopes: Vec<SecretScope>,
}

/// `spec.tracing`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tracing {
    /// `samplingRate` (0 to 1; absent = 0, no tracing).
    pub sampling_rate: f64,
    /// `stdout`.
    pub stdout: bool,
    /// `zipkin.endpointAddress`.
    pub zipkin_endpoint: Option<String>,
    /// `otel`.
    pub otel: Option<Otel>,
}

/// `spec.tracing.otel`.
#[derive(Debug, Clone, PartialEq)]
pub struct Otel {
    /// `endpointAddress`.
    pub endpoint: String,
    /// `protocol`.
    pub protocol: OtelProtocol,
    /// `isSecure` (default true, as Go daprd).
    pub is_secure: bool,
    /// `headers` (`key=value` pairs, comma-separated).
    pub headers: Vec<(String, String)>,
    /// `timeout` (a Go duration).
    pub timeout: Option<Duration>,
}

/// `spec.tracing.otel.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtelProtocol {
    /// OTLP over gRPC.
    Grpc,
    /// OTLP over HTTP/protobuf.
    Http,
}

/// `spec.metric`.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// `enabled` (default true).
    pub enabled: bool,
    /// `rules`: label values rewritten by regular expressions.
    pub rules: Vec<MetricRule>,
    /// `latencyDistributionBuckets` (milliseconds; empty = Dapr's defaults).
    pub latency_buckets: Vec<u64>,
    /// `recordErrorCodes`.
    pub record_error_codes: bool,
    /// `http.increasedCardinality` (default true in Dapr 1.18).
    pub increased_cardinality: bool,
    /// `http.pathMatching`.
    pub path_matching: Vec<String>,
    /// `http.excludeVerbs`.
    pub exclude_verbs: bool,
}

impl Default for Metric {
    fn default() -> Self {
        Self {
            enabled: true,
            rules: Vec::new(),
            latency_buckets: Vec::new(),
            record_error_codes: false,
            increased_cardinality: true,
            path_matching: Vec::new(),
            exclude_verbs: false,
        }
    }
}

/// One `spec.metric.rules` entry: for metric `name`, each label's values matching a regex
/// are replaced by the regex's key.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricRule {
    /// The metric.
    pub name: String,
    /// Label → (replacement, regular expression) pairs.
    pub labels: Vec<(String, Vec<(String, String)>)>,
}

/// `spec.api`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ApiAccess {
    /// `allowed` (`None` = every API).
    pub allowed: Option<Vec<ApiRule>>,
    /// `denied`.
    pub denied: Vec<ApiRule>,
}

/// One `spec.api.allowed` / `denied` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRule {
    /// API name (`publish`, `subscribe`, `metadata`, ...).
    pub name: String,
    /// `v1`, `v1.0`, `v1.0-alpha1`, ...
    pub version: String,
    /// `http` or `grpc`; a rule without one restricts neither API (as in Go daprd).
    pub protocol: Option<ApiProtocol>,
}

/// The protocol of an API rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiProtocol {
    /// The HTTP API.
    Http,
    /// The gRPC API.
    Grpc,
}

/// `spec.logging.apiLogging`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApiLogging {
    /// `enabled` (`None`: the `--enable-api-logging` flag decides).
    pub enabled: Option<bool>,
    /// `obfuscateURLs`.
    pub obfuscate_urls: bool,
    /// `omitHealthChecks`.
    pub omit_health_checks: bool,
}

/// One `spec.secrets.scopes` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretScope {
    /// `storeName`.
    pub store: String,
    /// `defaultAccess` is `deny`.
    pub default_deny: bool,
    /// `allowedSecrets`.
    pub allowed: Vec<String>,
    /// `deniedSecrets`.
    pub denied: Vec<String>,
}

impl Configuration {
    /// Whether hot reload is on: it is unless `spec.features` turns `HotReload` off (the
    /// last entry of that name counts).
    pub fn hot_reload(&self) -> bool {
        self.features
            .iter()
            .rev()
            .find(|(name, _)| name == "HotReload")
            .is_none_or(|(_, enabled)| *enabled)
    }

    /// Whether `spec.components.deny` refuses a component of type `ty` at `version` (an entry
    /// `type` refuses every version, `type/version` that version; no version is `v1`).
    pub fn denies(&self, ty: &str, version: &str) -> bool {
        let version = if version.is_empty() { "v1" } else { version };
        self.components_deny
            .iter()
            .any(|d| match d.split_once('/') {
                Some((t, v)) => t == ty && v == version,
                None => d == ty,
            })
    }
}

/// Go daprd's gRPC API groups (`<name>.<version>` of an API rule) and the methods of each
/// that daprd-rs serves; a group whose methods it does not serve still makes an allow list
/// restrictive, as in Go.
const GRPC_GROUPS: &[(&str, &[&str])] = &[
    ("publish.v1", &["PublishEvent", "BulkPublishEvent"]),
    ("publish.v1alpha1", &["BulkPublishEventAlpha1"]),
    ("subscribe.v1alpha1", &["SubscribeTopicEventsAlpha1"]),
    ("metadata.v1", &["GetMetadata", "SetMetadata"]),
    ("shutdown.v1", &["Shutdown"]),
    ("invoke.v1", &[]),
    ("state.v1", &[]),
    ("state.v1alpha1", &[]),
    ("bindings.v1", &[]),
    ("secrets.v1", &[]),
    ("actors.v1", &[]),
    ("actors.v1alpha1", &[]),
    ("configuration.v1", &[]),
    ("configuration.v1alpha1", &[]),
    ("lock.v1alpha1", &[]),
    ("unlock.v1alpha1", &[]),
    ("crypto.v1alpha1", &[]),
    ("subtlecrypto.v1alpha1", &[]),
    ("workflows.v1alpha1", &[]),
    ("workflows.v1beta1", &[]),
    ("jobs.v1", &[]),
    ("jobs.v1alpha1", &[]),
    ("conversation.v1alpha1", &[]),
    ("conversation.v1alpha2", &[]),
];

/// The gRPC service whose methods the API rules restrict.
const DAPR_RUNTIME: &str = "/dapr.proto.runtime.";

impl ApiAccess {
    fn of(rules: &[ApiRule], protocol: ApiProtocol) -> impl Iterator<Item = &ApiRule> {
        rules.iter().filter(move |r| r.protocol == Some(protocol))
    }

    /// Whether an HTTP endpoint is served. `group` and `group_version` name its API group as
    /// Go daprd does (`publish`, `v1`); `route` is its versioned route as Go writes it
    /// (`v1.0/publish/{pubsubname}/{topic}`), which a rule also matches by prefix. Denied
    /// wins; an allow list, when it has HTTP rules, admits only what it names.
    pub fn http_allows(&self, group: &str, group_version: &str, route: &str) -> bool {
        let matches = |rules: &[ApiRule]| {
            Self::of(rules, ApiProtocol::Http).any(|r| {
                let key = format!("{}/{}", r.version, r.name);
                key == format!("{group_version}/{group}") || route.starts_with(&key)
            })
        };
        if matches(&self.denied) {
            return false;
        }
        match &self.allowed {
            Some(allowed) if Self::of(allowed, ApiProtocol::Http).next().is_some() => {
                matches(allowed)
            }
            _ => true,
        }
    }

    /// The gRPC methods refused, as a check of a request path.
    pub fn grpc(&self) -> GrpcAccess {
        let groups = |rules: &[ApiRule]| -> Vec<&'static (&'static str, &'static [&'static str])> {
            Self::of(rules, ApiProtocol::Grpc)
                .filter_map(|r| {
                    let key = format!("{}.{}", r.name, r.version);
                    GRPC_GROUPS.iter().find(|(k, _)| *k == key)
                })
                .collect()
        };
        let methods = |groups: &[&(&str, &[&str])]| -> Vec<String> {
            groups
                .iter()
                .flat_map(|(_, methods)| methods.iter())
                .map(|m| format!("{DAPR_RUNTIME}v1.Dapr/{m}"))
                .collect()
        };
        let allowed = self.allowed.as_deref().map(groups).unwrap_or_default();
        let denied = groups(&self.denied);
        GrpcAccess {
            allowed: (!allowed.is_empty()).then(|| methods(&allowed)),
            denied: methods(&denied),
        }
    }
}

/// Which gRPC methods the API rules refuse (Go daprd answers those `UNIMPLEMENTED`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrpcAccess {
    /// Full method paths an allow list admits (`None`: no gRPC allow list).
    allowed: Option<Vec<String>>,
    /// Full method paths denied.
    denied: Vec<String>,
}

impl GrpcAccess {
    /// Whether any rule restricts gRPC.
    pub fn restricts(&self) -> bool {
        self.allowed.is_some() || !self.denied.is_empty()
    }

    /// Whether a request for `path` (`/dapr.proto.runtime.v1.Dapr/PublishEvent`) is served.
    pub fn allows(&self, path: &str) -> bool {
        if !path.starts_with(DAPR_RUNTIME) {
            return true;
        }
        if self.denied.iter().any(|m| m == path) {
            return false;
        }
        self.allowed
            .as_ref()
            .is_none_or(|allowed| allowed.iter().any(|m| m == path))
    }
}

impl ApiLogging {
    /// Whether API calls are logged: the `--enable-api-logging` flag when given, else
    /// `enabled`, else off.
    pub fn on(&self, flag: Option<bool>) -> bool {
        flag.or(self.enabled).unwrap_or(false)
    }
}

impl SecretScope {
    /// Whether `key` may be read from this store (Go daprd's `IsSecretAllowed`).
    pub fn allows(&self, key: &str) -> bool {
        if !self.allowed.is_empty() {
            return self.allowed.iter().any(|k| k == key);
        }
        if self.denied.iter().any(|k| k == key) {
            return false;
        }
        !self.default_deny
    }
}

/// What reading `--config` files gave: the configuration (later files override earlier
/// ones field by field), the problems, and warnings for what has no effect here.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The configuration.
    pub configuration: Configuration,
    /// Problems, each naming file and field.
    pub errors: Vec<ResourceError>,
    /// One line per field that is accepted but has no effect in daprd-rs.
    pub warnings: Vec<String>,
}

/// Reads the `--config` files (none: Dapr's defaults).
pub fn load(paths: &[PathBuf]) -> Loaded {
    let mut out = Loaded::default();
    for path in paths {
        match std::fs::read_to_string(path) {
            Ok(text) => parse(path, &expand_env(&text), &mut out),
            Err(e) => out.errors.push(ResourceError {
                file: path.clone(),
                component: None,
                field: None,
                message: format!("cannot read the configuration file: {e}"),
            }),
        }
    }
    out
}

/// Reads one Configuration document's text (already expanded), as [`load`] does a file.
pub fn read(file: &Path, text: &str) -> Loaded {
    let mut out = Loaded::default();
    parse(file, text, &mut out);
    out
}

/// `$VAR` and `${VAR}` replaced by the environment (unset: empty), as Go's `os.ExpandEnv`.
pub fn expand_env(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, used) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        if used == 0 {
            // a lone `$` (or `${` never closed) stays as it is
            out.push('$');
            rest = after;
            continue;
        }
        out.push_str(&std::env::var(name).unwrap_or_default());
        rest = &after[used..];
    }
    out.push_str(rest);
    out
}

/// Fields of `spec` that configure parts of Dapr this runtime does not have.
const NOT_SERVED: &[(&str, &str)] = &[
    ("httpPipeline", "HTTP middleware"),
    ("appHttpPipeline", "app HTTP middleware"),
    ("nameResolution", "service invocation"),
    ("accessControl", "service invocation"),
    ("mtls", "mTLS between sidecars (standalone mode)"),
    ("wasm", "WebAssembly"),
    ("workflow", "workflows"),
];

struct Reader<'a> {
    file: &'a Path,
    name: String,
    out: &'a mut Loaded,
}

impl Reader<'_> {
    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.out.errors.push(ResourceError {
            file: self.file.to_path_buf(),
            component: Some(format!("configuration {}", self.name)),
            field: Some(field.to_string()),
            message: message.into(),
        });
    }

    fn warn(&mut self, field: &str, message: &str) {
        self.out.warnings.push(format!(
            "{}: configuration {}: field {field}: {message}",
            self.file.display(),
            self.name
        ));
    }

    /// A string field (numbers and booleans are read as their text).
    fn text(&mut self, v: Option<&Value>, field: &str) -> Option<String> {
        match v? {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => {
                self.fail(field, "must be a string");
                None
            }
        }
    }

    fn boolean(&mut self, v: Option<&Value>, field: &str) -> Option<bool> {
        match v? {
            Value::Null => None,
            Value::Bool(b) => Some(*b),
            Value::String(s) => match daprd_core::metadata::parse_go_bool(s) {
                Some(b) => Some(b),
                None => {
                    self.fail(field, format!("{s:?} is not a boolean"));
                    None
                }
            },
            _ => {
                self.fail(field, "must be a boolean");
                None
            }
        }
    }

    fn list<'v>(&mut self, v: Option<&'v Value>, field: &str) -> &'v [Value] {
        match v {
            None | Some(Value::Null) => &[],
            Some(Value::Sequence(items)) => items,
            Some(_) => {
                self.fail(field, "must be a list");
                &[]
            }
        }
    }

    fn strings(&mut self, v: Option<&Value>, field: &str) -> Vec<String> {
        let items = self.list(v, field);
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            if let Some(s) = self.text(Some(item), &format!("{field}[{i}]")) {
                out.push(s);
            }
        }
        out
    }

    /// A mapping field; anything else is reported.
    fn mapping<'v>(&mut self, v: Option<&'v Value>, field: &str) -> Option<&'v Value> {
        match v? {
            Value::Null => None,
            m @ Value::Mapping(_) => Some(m),
            _ => {
                self.fail(field, "must be a mapping");
                None
            }
        }
    }
}

fn parse(file: &Path, text: &str, out: &mut Loaded) {
    let doc: Value = match serde_norway::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            out.errors.push(ResourceError {
                file: file.to_path_buf(),
                component: None,
                field: None,
                message: format!("invalid YAML: {e}"),
            });
            return;
        }
    };
    let name = doc
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut r = Reader { file, name, out };
    match doc.get("kind").and_then(Value::as_str) {
        Some("Configuration") => {}
        other => {
            r.fail(
                "kind",
                format!("is {other:?}; a --config file holds a Configuration"),
            );
            return;
        }
    }
    let mut c = std::mem::take(&mut r.out.configuration);
    c.name = r.name.clone();
    let Some(spec) = r.mapping(doc.get("spec"), "spec") else {
        r.out.configuration = c;
        return;
    };
    if let Value::Mapping(m) = spec {
        for key in m.keys().filter_map(Value::as_str) {
            if let Some((_, what)) = NOT_SERVED.iter().find(|(k, _)| *k == key) {
                r.warn(
                    &format!("spec.{key}"),
                    &format!("{what} is not part of daprd-rs; the field has no effect"),
                );
            } else if ![
                "features",
                "components",
                "secrets",
                "api",
                "logging",
                "metric",
                "metrics",
                "tracing",
            ]
            .contains(&key)
            {
                r.warn(&format!("spec.{key}"), "unknown field; ignored");
            }
        }
    }
    if let Some(t) = r.mapping(spec.get("tracing"), "spec.tracing") {
        c.tracing = tracing(&mut r, t);
    }
    for key in ["metric", "metrics"] {
        if let Some(m) = r.mapping(spec.get(key), &format!("spec.{key}")) {
            c.metric = metric(&mut r, m, key);
        }
    }
    if let Some(a) = r.mapping(spec.get("api"), "spec.api") {
        c.api = api(&mut r, a);
    }
    if let Some(l) = r.mapping(spec.get("logging"), "spec.logging") {
        if let Some(a) = r.mapping(l.get("apiLogging"), "spec.logging.apiLogging") {
            c.api_logging = ApiLogging {
                enabled: r.boolean(a.get("enabled"), "spec.logging.apiLogging.enabled"),
                obfuscate_urls: r
                    .boolean(
                        a.get("obfuscateURLs"),
                        "spec.logging.apiLogging.obfuscateURLs",
                    )
                    .unwrap_or(false),
                omit_health_checks: r
                    .boolean(
                        a.get("omitHealthChecks"),
                        "spec.logging.apiLogging.omitHealthChecks",
                    )
                    .unwrap_or(false),
            };
        }
    }
    let features = r.list(spec.get("features"), "spec.features");
    for (i, f) in features.iter().enumerate() {
        let field = format!("spec.features[{i}]");
        let Some(name) = r.text(f.get("name"), &format!("{field}.name")) else {
            r.fail(&format!("{field}.name"), "is required");
            continue;
        };
        let enabled = r
            .boolean(f.get("enabled"), &format!("{field}.enabled"))
            .unwrap_or(false);
        c.features.push((name, enabled));
    }
    if let Some(comp) = r.mapping(spec.get("components"), "spec.components") {
        c.components_deny = r.strings(comp.get("deny"), "spec.components.deny");
    }
    if let Some(s) = r.mapping(spec.get("secrets"), "spec.secrets") {
        c.secret_scopes = secret_scopes(&mut r, s);
    }
    r.out.configuration = c;
}

fn tracing(r: &mut Reader<'_>, t: &Value) -> Tracing {
    let mut out = Tracing::default();
    if let Some(rate) = r.text(t.get("samplingRate"), "spec.tracing.samplingRate") {
        match rate.trim().parse::<f64>() {
            Ok(v) if (0.0..=1.0).contains(&v) => out.sampling_rate = v,
            _ => r.fail(
                "spec.tracing.samplingRate",
                format!("{rate:?} is not a number from 0 to 1"),
            ),
        }
    }
    out.stdout = r
        .boolean(t.get("stdout"), "spec.tracing.stdout")
        .unwrap_or(false);
    if let Some(z) = r.mapping(t.get("zipkin"), "spec.tracing.zipkin") {
        out.zipkin_endpoint = r
            .text(
                z.get("endpointAddress"),
                "spec.tracing.zipkin.endpointAddress",
            )
            .filter(|s| !s.is_empty());
    }
    if let Some(o) = r.mapping(t.get("otel"), "spec.tracing.otel") {
        let endpoint = r
            .text(
                o.get("endpointAddress"),
                "spec.tracing.otel.endpointAddress",
            )
            .unwrap_or_default();
        let protocol = match r
            .text(o.get("protocol"), "spec.tracing.otel.protocol")
            .as_deref()
        {
            None | Some("grpc") => OtelProtocol::Grpc,
            Some("http") => OtelProtocol::Http,
            Some(other) => {
                r.fail(
                    "spec.tracing.otel.protocol",
                    format!("{other:?} is not grpc or http"),
                );
                OtelProtocol::Grpc
            }
        };
        let is_secure = r
            .boolean(o.get("isSecure"), "spec.tracing.otel.isSecure")
            .unwrap_or(true);
        let mut headers = Vec::new();
        if let Some(h) = r.text(o.get("headers"), "spec.tracing.otel.headers") {
            for pair in h.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some((k, v)) if !k.trim().is_empty() => {
                        headers.push((k.trim().to_string(), v.trim().to_string()));
                    }
                    _ => r.fail(
                        "spec.tracing.otel.headers",
                        format!("{pair:?} is not key=value"),
                    ),
                }
            }
        }
        let timeout = r
            .text(o.get("timeout"), "spec.tracing.otel.timeout")
            .and_then(|t| match daprd_core::duration::parse_go_duration(&t) {
                Ok(d) => Some(d),
                Err(e) => {
                    r.fail("spec.tracing.otel.timeout", e.to_string());
                    None
                }
            });
        if endpoint.is_empty() {
            r.fail("spec.tracing.otel.endpointAddress", "is required");
        } else {
            out.otel = Some(Otel {
                endpoint,
                protocol,
                is_secure,
                headers,
                timeout,
            });
        }
    }
    out
}

fn metric(r: &mut Reader<'_>, m: &Value, key: &str) -> Metric {
    let field = |f: &str| format!("spec.{key}.{f}");
    let mut out = Metric {
        enabled: r
            .boolean(m.get("enabled"), &field("enabled"))
            .unwrap_or(true),
        record_error_codes: r
            .boolean(m.get("recordErrorCodes"), &field("recordErrorCodes"))
            .unwrap_or(false),
        ..Metric::default()
    };
    let buckets = r.list(
        m.get("latencyDistributionBuckets"),
        &field("latencyDistributionBuckets"),
    );
    for (i, b) in buckets.iter().enumerate() {
        match b.as_u64() {
            Some(v) if v > 0 => out.latency_buckets.push(v),
            _ => r.fail(
                &field(&format!("latencyDistributionBuckets[{i}]")),
                "must be a positive whole number of milliseconds",
            ),
        }
    }
    if out.latency_buckets.windows(2).any(|w| w[0] >= w[1]) {
        r.fail(
            &field("latencyDistributionBuckets"),
            "must be in increasing order",
        );
    }
    if let Some(h) = r.mapping(m.get("http"), &field("http")) {
        out.increased_cardinality = r
            .boolean(
                h.get("increasedCardinality"),
                &field("http.increasedCardinality"),
            )
            .unwrap_or(true);
        out.path_matching = r.strings(h.get("pathMatching"), &field("http.pathMatching"));
        out.exclude_verbs = r
            .boolean(h.get("excludeVerbs"), &field("http.excludeVerbs"))
            .unwrap_or(false);
    }
    let rules = r.list(m.get("rules"), &field("rules"));
    for (i, rule) in rules.iter().enumerate() {
        let rf = field(&format!("rules[{i}]"));
        let Some(name) = r.text(rule.get("name"), &format!("{rf}.name")) else {
            r.fail(&format!("{rf}.name"), "is required");
            continue;
        };
        let mut labels = Vec::new();
        let items = r.list(rule.get("labels"), &format!("{rf}.labels"));
        for (j, label) in items.iter().enumerate() {
            let lf = format!("{rf}.labels[{j}]");
            let Some(label_name) = r.text(label.get("name"), &format!("{lf}.name")) else {
                r.fail(&format!("{lf}.name"), "is required");
                continue;
            };
            let mut rewrites = Vec::new();
            if let Some(Value::Mapping(re)) = r.mapping(label.get("regex"), &format!("{lf}.regex"))
            {
                for (k, v) in re {
                    let (Some(k), Some(v)) = (k.as_str(), v.as_str()) else {
                        r.fail(&format!("{lf}.regex"), "must map strings to strings");
                        continue;
                    };
                    if let Err(e) = regex::Regex::new(v) {
                        r.fail(&format!("{lf}.regex.{k}"), format!("invalid regex: {e}"));
                        continue;
                    }
                    rewrites.push((k.to_string(), v.to_string()));
                }
            }
            labels.push((label_name, rewrites));
        }
        out.rules.push(MetricRule { name, labels });
    }
    out
}

fn api(r: &mut Reader<'_>, a: &Value) -> ApiAccess {
    let rules = |r: &mut Reader<'_>, key: &str| -> Vec<ApiRule> {
        let field = format!("spec.api.{key}");
        let items = r.list(a.get(key), &field);
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let f = format!("{field}[{i}]");
            let Some(name) = r.text(item.get("name"), &format!("{f}.name")) else {
                r.fail(&format!("{f}.name"), "is required");
                continue;
            };
            let version = r
                .text(item.get("version"), &format!("{f}.version"))
                .unwrap_or_default();
            let protocol = match r
                .text(item.get("protocol"), &format!("{f}.protocol"))
                .map(|p| p.to_ascii_lowercase())
                .as_deref()
            {
                None | Some("") => {
                    r.warn(
                        &format!("{f}.protocol"),
                        "absent: the rule restricts neither the HTTP nor the gRPC API (as in Go daprd); give http or grpc",
                    );
                    None
                }
                Some("http") => Some(ApiProtocol::Http),
                Some("grpc") => Some(ApiProtocol::Grpc),
                Some(other) => {
                    r.fail(
                        &format!("{f}.protocol"),
                        format!("{other:?} is not http or grpc"),
                    );
                    continue;
                }
            };
            out.push(ApiRule {
                name,
                version,
                protocol,
            });
        }
        out
    };
    let allowed = a.get("allowed").is_some().then(|| rules(r, "allowed"));
    let denied = rules(r, "denied");
    ApiAccess { allowed, denied }
}

fn secret_scopes(r: &mut Reader<'_>, s: &Value) -> Vec<SecretScope> {
    let items = r.list(s.get("scopes"), "spec.secrets.scopes");
    let mut out: Vec<SecretScope> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let f = format!("spec.secrets.scopes[{i}]");
        let Some(store) = r.text(item.get("storeName"), &format!("{f}.storeName")) else {
            r.fail(&format!("{f}.storeName"), "is required");
            continue;
        };
        if out.iter().any(|s| s.store == store) {
            r.fail(
                &format!("{f}.storeName"),
                format!("{store:?} is repeated in the secrets scopes"),
            );
            continue;
        }
        let default_deny = match r
            .text(item.get("defaultAccess"), &format!("{f}.defaultAccess"))
            .map(|a| a.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("") | Some("allow") => false,
            Some("deny") => true,
            Some(other) => {
                r.fail(
                    &format!("{f}.defaultAccess"),
                    format!("{other:?} is not allow or deny"),
                );
                continue;
            }
        };
        let allowed = r.strings(item.get("allowedSecrets"), &format!("{f}.allowedSecrets"));
        let denied = r.strings(item.get("deniedSecrets"), &format!("{f}.deniedSecrets"));
        out.push(SecretScope {
            store,
            default_deny,
            allowed,
            denied,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Loaded {
        super::read(Path::new("config.yaml"), text)
    }

    const FULL: &str = r#"apiVersion: dapr.io/v1alpha1
kind: Configuration
metadata:
  name: appconfig
spec:
  tracing:
    samplingRate: "0.5"
    stdout: true
    zipkin: {endpointAddress: "http://localhost:9411/api/v2/spans"}
    otel: {endpointAddress: "localhost:4317", protocol: http, isSecure: false, headers: "a=1, b=2", timeout: 3s}
  metric:
    enabled: false
    recordErrorCodes: true
    latencyDistributionBuckets: [1, 5, 50]
    http: {increasedCardinality: false, pathMatching: ["/v1.0/publish/{p}/{t}"], excludeVerbs: true}
    rules:
    - name: dapr_runtime_service_invocation_req_sent_total
      labels:
      - name: method
        regex: {"orders/": "orders/.+"}
  api:
    allowed: [{name: publish, version: v1.0, protocol: http}]
    denied: [{name: metadata, version: v1.0}]
  logging: {apiLogging: {enabled: true, obfuscateURLs: true, omitHealthChecks: true}}
  features: [{name: HotReload, enabled: true}]
  components: {deny: [pubsub.kafka, pubsub.redis/v1]}
  secrets:
    scopes:
    - {storeName: local, defaultAccess: deny, allowedSecrets: [a]}
  httpPipeline: {handlers: [{name: oauth, type: middleware.http.oauth2}]}
"#;

    #[test]
    fn reads_every_field() {
        let out = read(FULL);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let c = out.configuration;
        assert_eq!(c.name, "appconfig");
        assert!((c.tracing.sampling_rate - 0.5).abs() < f64::EPSILON);
        assert!(c.tracing.stdout);
        let otel = c.tracing.otel.expect("otel");
        assert_eq!(otel.protocol, OtelProtocol::Http);
        assert!(!otel.is_secure);
        assert_eq!(
            otel.headers,
            vec![("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(otel.timeout, Some(Duration::from_secs(3)));
        assert!(!c.metric.enabled && c.metric.record_error_codes && c.metric.exclude_verbs);
        assert_eq!(c.metric.latency_buckets, vec![1, 5, 50]);
        assert_eq!(c.metric.rules[0].labels[0].1[0].0, "orders/");
        assert_eq!(c.api.allowed.as_ref().map(Vec::len), Some(1));
        assert_eq!(c.api.denied[0].protocol, None);
        assert_eq!(c.api_logging.enabled, Some(true));
        assert_eq!(c.features, vec![("HotReload".to_string(), true)]);
        assert_eq!(c.components_deny, vec!["pubsub.kafka", "pubsub.redis/v1"]);
        assert!(c.secret_scopes[0].allows("a") && !c.secret_scopes[0].allows("b"));
        // nothing is ignored silently: the middleware and every part not applied say so
        assert!(out.warnings.iter().any(|w| w.contains("spec.httpPipeline")));
        assert!(!out.warnings.iter().any(|w| w.contains("recordErrorCodes")));
        assert!(!out.warnings.iter().any(|w| w.contains("spec.tracing")));
    }

    #[test]
    fn every_problem_is_named() {
        let out = read(
            "kind: Configuration\nmetadata: {name: bad}\nspec:\n  tracing: {samplingRate: \"2\", otel: {protocol: udp}}\n  metric: {enabled: maybe, latencyDistributionBuckets: [5, 1, -3], rules: [{name: m, labels: [{name: l, regex: {x: \"(\"}}]}]}\n  api: {allowed: [{version: v1}], denied: [{name: publish, protocol: ftp}]}\n  secrets: {scopes: [{storeName: s, defaultAccess: maybe}, {storeName: t}, {storeName: t}]}\n  features: {HotReload: true}\n",
        );
        let fields: Vec<&str> = out
            .errors
            .iter()
            .filter_map(|e| e.field.as_deref())
            .collect();
        for f in [
            "spec.tracing.samplingRate",
            "spec.tracing.otel.protocol",
            "spec.tracing.otel.endpointAddress",
            "spec.metric.enabled",
            "spec.metric.latencyDistributionBuckets[2]",
            "spec.metric.latencyDistributionBuckets",
            "spec.metric.rules[0].labels[0].regex.x",
            "spec.api.allowed[0].name",
            "spec.api.denied[0].protocol",
            "spec.secrets.scopes[0].defaultAccess",
            "spec.secrets.scopes[2].storeName",
            "spec.features",
        ] {
            assert!(fields.contains(&f), "{f} not reported: {fields:?}");
        }
        assert!(out.errors[0]
            .to_string()
            .starts_with("config.yaml: component \"configuration bad\""));
    }

    #[test]
    fn not_a_configuration_or_not_yaml() {
        let out = read("kind: Component\nmetadata: {name: x}\n");
        assert_eq!(out.errors[0].field.as_deref(), Some("kind"));
        let out = read("spec: [unclosed\n");
        assert!(out.errors[0].message.starts_with("invalid YAML"));
    }

    #[test]
    fn environment_variables_are_expanded() {
        std::env::set_var("DAPRD_RS_TEST_RATE", "0.25");
        assert_eq!(expand_env("a: $DAPRD_RS_TEST_RATE"), "a: 0.25");
        assert_eq!(
            expand_env("a: \"${DAPRD_RS_TEST_RATE}\" $"),
            "a: \"0.25\" $"
        );
        assert_eq!(expand_env("${DAPRD_RS_TEST_UNSET_VAR}x"), "x");
    }

    fn rule(name: &str, version: &str, protocol: Option<ApiProtocol>) -> ApiRule {
        ApiRule {
            name: name.into(),
            version: version.into(),
            protocol,
        }
    }

    #[test]
    fn http_rules_as_go() {
        use ApiProtocol::{Grpc, Http};
        let publish = ("publish", "v1", "v1.0/publish/{pubsubname}/{topic}");
        let metadata = ("metadata", "v1", "v1.0/metadata");
        let allows = |a: &ApiAccess, e: (&str, &str, &str)| a.http_allows(e.0, e.1, e.2);
        let none = ApiAccess::default();
        assert!(allows(&none, publish) && allows(&none, metadata));
        // an allow list admits what it names, by group or by route prefix
        let by_group = ApiAccess {
            allowed: Some(vec![rule("publish", "v1", Some(Http))]),
            denied: Vec::new(),
        };
        assert!(allows(&by_group, publish) && !allows(&by_group, metadata));
        let by_route = ApiAccess {
            allowed: Some(vec![rule("publish", "v1.0", Some(Http))]),
            denied: Vec::new(),
        };
        assert!(allows(&by_route, publish) && !allows(&by_route, metadata));
        // deny wins over allow; gRPC rules and rules without a protocol do not touch HTTP
        let both = ApiAccess {
            allowed: Some(vec![rule("publish", "v1", Some(Http))]),
            denied: vec![rule("publish", "v1.0", Some(Http))],
        };
        assert!(!allows(&both, publish));
        let other = ApiAccess {
            allowed: Some(vec![
                rule("publish", "v1", Some(Grpc)),
                rule("metadata", "v1", None),
            ]),
            denied: vec![rule("publish", "v1", None)],
        };
        assert!(allows(&other, publish) && allows(&other, metadata));
    }

    #[test]
    fn grpc_rules_as_go() {
        use ApiProtocol::{Grpc, Http};
        let publish = "/dapr.proto.runtime.v1.Dapr/PublishEvent";
        let metadata = "/dapr.proto.runtime.v1.Dapr/GetMetadata";
        assert!(!ApiAccess::default().grpc().restricts());
        let allowed = ApiAccess {
            allowed: Some(vec![rule("publish", "v1", Some(Grpc))]),
            denied: Vec::new(),
        }
        .grpc();
        assert!(allowed.allows(publish) && !allowed.allows(metadata));
        assert!(
            allowed.allows("/grpc.health.v1.Health/Check"),
            "only Dapr's runtime API"
        );
        // an allow list of a group daprd-rs does not serve still restricts
        let state_only = ApiAccess {
            allowed: Some(vec![rule("state", "v1", Some(Grpc))]),
            denied: Vec::new(),
        }
        .grpc();
        assert!(state_only.restricts() && !state_only.allows(publish));
        let denied = ApiAccess {
            allowed: Some(vec![rule("publish", "v1", Some(Http))]),
            denied: vec![rule("metadata", "v1", Some(Grpc))],
        }
        .grpc();
        assert!(denied.allows(publish) && !denied.allows(metadata));
    }

    #[test]
    fn deny_by_type_or_version() {
        let c = Configuration {
            components_deny: vec!["pubsub.kafka".into(), "pubsub.redis/v2".into()],
            ..Configuration::default()
        };
        assert!(c.denies("pubsub.kafka", "v1") && c.denies("pubsub.kafka", ""));
        assert!(c.denies("pubsub.redis", "v2"));
        assert!(!c.denies("pubsub.redis", "v1") && !c.denies("pubsub.redis", ""));
        assert!(!c.denies("pubsub.mqtt3", "v1"));
    }

    #[test]
    fn secret_scope_precedence_as_go() {
        let s = |deny: bool, allowed: &[&str], denied: &[&str]| SecretScope {
            store: "s".into(),
            default_deny: deny,
            allowed: allowed.iter().map(ToString::to_string).collect(),
            denied: denied.iter().map(ToString::to_string).collect(),
        };
        assert!(s(false, &[], &[]).allows("x"));
        assert!(!s(true, &[], &[]).allows("x"));
        assert!(!s(false, &[], &["x"]).allows("x"));
        assert!(s(true, &["x"], &[]).allows("x"));
        assert!(
            !s(false, &["y"], &[]).allows("x"),
            "an allow list is exclusive"
        );
    }
}
