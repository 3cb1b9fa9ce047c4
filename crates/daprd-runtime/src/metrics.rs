//! Prometheus metrics with Go daprd's names, labels, units and buckets, plus a few series
//! Dapr users have asked for (in-flight deliveries, dead letters, drops by who dropped).
//! The list with labels is in the README ("Metrics").
//!
//! Latencies are milliseconds as in Dapr, recorded with sub-millisecond precision (Go daprd
//! truncates to whole milliseconds and skips zero). With `--enable-metrics=false` or
//! `spec.metric.enabled: false` nothing is recorded; the first still serves nothing, the second
//! serves `process_*` only (as Go daprd).

pub mod process;
pub mod registry;

use std::sync::Arc;
use std::time::Duration;

use regex::Regex;

use crate::config::configuration::Metric;
use registry::{Family, Kind};

/// Dapr's default latency buckets (milliseconds).
pub const LATENCY_BUCKETS_MS: [f64; 34] = [
    1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 13.0, 16.0, 20.0, 25.0, 30.0, 40.0, 50.0, 65.0, 80.0,
    100.0, 130.0, 160.0, 200.0, 250.0, 300.0, 400.0, 500.0, 650.0, 800.0, 1000.0, 2000.0, 5000.0,
    10000.0, 20000.0, 50000.0, 100000.0,
];

/// Dapr's default size buckets (bytes).
pub const SIZE_BUCKETS: [f64; 13] = [
    1024.0,
    2048.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
];

const EGRESS: &[&str] = &["app_id", "component", "namespace", "success", "topic"];
const INGRESS: &[&str] = &[
    "app_id",
    "component",
    "namespace",
    "process_status",
    "status",
    "topic",
];
const BULK_INGRESS: &[&str] = &[
    "app_id",
    "component",
    "namespace",
    "process_status",
    "topic",
];
const SUBSCRIPTION: &[&str] = &["app_id", "component", "namespace", "topic"];
const SUBSCRIPTION_KIND: &[&str] = &["app_id", "component", "namespace", "topic", "type"];
const DROPPED: &[&str] = &["app_id", "by", "component", "namespace", "reason", "topic"];
const HTTP: &[&str] = &["app_id", "method", "path", "status"];
const GRPC: &[&str] = &["app_id", "grpc_server_method", "grpc_server_status"];
const APP_ONLY: &[&str] = &["app_id"];
const ERROR_CODE: &[&str] = &["app_id", "category", "error_code"];
const GRPC_METHOD: &[&str] = &["app_id", "grpc_server_method"];
const GRPC_CLIENT: &[&str] = &["app_id", "grpc_client_method", "grpc_client_status"];
const GRPC_CLIENT_METHOD: &[&str] = &["app_id", "grpc_client_method"];
const COMPONENT_INIT: &[&str] = &["app_id", "component", "namespace"];
const RESILIENCY_LOADED: &[&str] = &["app_id", "name", "namespace"];
const APP_REASON: &[&str] = &["app_id", "reason"];
const RESILIENCY: &[&str] = &[
    "app_id",
    "flow_direction",
    "name",
    "namespace",
    "policy",
    "status",
    "target",
];

/// The counters Dapr keeps beside a latency histogram with the same labels, which the
/// histogram's own count serves here: (histogram, counter).
const COUNTED_BY: &[(&str, &str)] = &[
    (
        "dapr_component_pubsub_egress_latencies",
        "dapr_component_pubsub_egress_count",
    ),
    (
        "dapr_component_pubsub_egress_bulk_latencies",
        "dapr_component_pubsub_egress_bulk_count",
    ),
    (
        "dapr_component_pubsub_ingress_latencies",
        "dapr_component_pubsub_ingress_count",
    ),
    (
        "dapr_component_pubsub_ingress_bulk_latencies",
        "dapr_component_pubsub_ingress_bulk_count",
    ),
    ("dapr_http_server_latency", "dapr_http_server_request_count"),
    (
        "dapr_http_server_latency",
        "dapr_http_server_response_count",
    ),
    (
        "dapr_grpc_io_server_server_latency",
        "dapr_grpc_io_server_completed_rpcs",
    ),
    (
        "dapr_http_client_roundtrip_latency",
        "dapr_http_client_completed_count",
    ),
    (
        "dapr_grpc_io_client_roundtrip_latency",
        "dapr_grpc_io_client_completed_rpcs",
    ),
];

/// Who dropped a message (`by` label of `dapr_component_pubsub_ingress_dropped_count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DroppedBy {
    /// The app answered DROP (or 404 with a dead-letter topic missing).
    App,
    /// The sidecar: expired, no route matched, not a CloudEvent.
    Sidecar,
}

/// The app's answer to a delivery, as `process_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessStatus {
    /// SUCCESS.
    Success,
    /// RETRY or an error.
    Retry,
    /// DROP.
    Drop,
}

impl ProcessStatus {
    fn labels(self) -> (&'static str, &'static str) {
        match self {
            Self::Success => ("success", "success"),
            Self::Retry => ("retry", "retry"),
            Self::Drop => ("drop", "success"),
        }
    }
}

/// HTTP request labels as `spec.metric.http` shapes them.
#[derive(Debug, Clone, Default)]
struct HttpLabels {
    increased_cardinality: bool,
    path_matching: Vec<(String, Regex)>,
    exclude_verbs: bool,
}

/// The series whose only label is the app id, found once.
#[derive(Debug, Default)]
struct AppSeries {
    request_bytes: std::sync::OnceLock<Arc<registry::Series>>,
    response_bytes: std::sync::OnceLock<Arc<registry::Series>>,
}

/// Every metric family of the sidecar.
#[derive(Debug)]
pub struct Metrics {
    enabled: bool,
    /// `spec.metric.recordErrorCodes`: count the API's error answers by code.
    record_error_codes: bool,
    app_series: AppSeries,
    app_id: String,
    namespace: String,
    http: HttpLabels,
    egress_latency: Family,
    bulk_egress_event_count: Family,
    bulk_egress_latency: Family,
    ingress_latency: Family,
    bulk_ingress_event_count: Family,
    bulk_ingress_latency: Family,
    in_flight: Family,
    subscriptions: Family,
    dead_lettered: Family,
    redelivered: Family,
    dropped: Family,
    http_latency: Family,
    http_request_bytes: Family,
    http_response_bytes: Family,
    grpc_completed: Family,
    grpc_latency: Family,
    grpc_received_bytes: Family,
    grpc_sent_bytes: Family,
    grpc_client_latency: Family,
    grpc_client_sent_bytes: Family,
    grpc_client_received_bytes: Family,
    error_codes: Family,
    client_latency: Family,
    client_sent_bytes: Family,
    client_received_bytes: Family,
    component_loaded: Family,
    component_init: Family,
    component_init_fail: Family,
    resiliency_loaded: Family,
    resiliency_count: Family,
    resiliency_activations: Family,
    resiliency_cb_state: Family,
    mtls_init: Family,
    mtls_init_fail: Family,
    mtls_rotated: Family,
    mtls_rotated_fail: Family,
}

impl Metrics {
    /// Metrics that record nothing (`--enable-metrics=false`).
    pub fn disabled() -> Self {
        Self::build(false, "", "", &Metric::default())
    }

    /// Metrics for `app_id` in `namespace` as the Configuration's `spec.metric` says.
    pub fn new(app_id: &str, namespace: &str, spec: &Metric) -> Self {
        Self::build(spec.enabled, app_id, namespace, spec)
    }

    fn build(enabled: bool, app_id: &str, namespace: &str, spec: &Metric) -> Self {
        let latency: Arc<[f64]> = if spec.latency_buckets.is_empty() {
            Arc::from(LATENCY_BUCKETS_MS.to_vec())
        } else {
            let mut b: Vec<f64> = spec.latency_buckets.iter().map(|v| *v as f64).collect();
            b.sort_by(f64::total_cmp);
            b.dedup();
            Arc::from(b)
        };
        let sizes: Arc<[f64]> = Arc::from(SIZE_BUCKETS.to_vec());
        let none: Arc<[f64]> = Arc::from(Vec::new());
        let rules = compile_rules(spec);
        let family = |name: &str, help: &'static str, kind, labels, bounds: &Arc<[f64]>| {
            let mut f = Family::new(format!("dapr_{name}"), help, kind, labels, bounds.clone());
            // A latency histogram also serves the counter with its labels, so the counter's
            // rules apply to it as well.
            let serves = |n: &str| {
                n == f.name() || COUNTED_BY.iter().any(|(h, c)| *h == f.name() && *c == n)
            };
            let mine: Vec<_> = rules.iter().filter(|(n, _)| serves(n)).collect();
            for (_, r) in mine {
                f = f.with_rules(r);
            }
            f
        };
        use Kind::{Counter, Gauge, Histogram};
        Self {
            enabled,
            record_error_codes: enabled && spec.record_error_codes,
            app_series: AppSeries::default(),
            app_id: app_id.to_string(),
            namespace: namespace.to_string(),
            http: HttpLabels {
                increased_cardinality: spec.increased_cardinality,
                path_matching: spec
                    .path_matching
                    .iter()
                    .filter_map(|p| path_pattern(p).map(|re| (p.clone(), re)))
                    .collect(),
                exclude_verbs: spec.exclude_verbs,
            },
            egress_latency: family("component_pubsub_egress_latencies", "The latency of the response from the pub/sub component.", Histogram, EGRESS, &latency),
            bulk_egress_event_count: family("component_pubsub_egress_bulk_event_count", "The number of outgoing messages to the pub/sub component published through bulk publish API.", Counter, EGRESS, &none),
            bulk_egress_latency: family("component_pubsub_egress_bulk_latencies", "The latency of the response for the bulk publish call from the pub/sub component.", Histogram, EGRESS, &latency),
            ingress_latency: family("component_pubsub_ingress_latencies", "The consuming app event processing latency.", Histogram, INGRESS, &latency),
            bulk_ingress_event_count: family("component_pubsub_ingress_bulk_event_count", "Total number of incoming messages arriving from the bulk pub/sub component via Bulk Subscribe.", Counter, BULK_INGRESS, &none),
            bulk_ingress_latency: family("component_pubsub_ingress_bulk_latencies", "The consuming app event processing latency for the bulk pub/sub component.", Histogram, BULK_INGRESS, &latency),
            in_flight: family("component_pubsub_ingress_in_flight", "The number of messages currently being processed by the app for a subscription.", Gauge, SUBSCRIPTION, &none),
            subscriptions: family("component_pubsub_subscriptions", "The subscriptions this sidecar holds open, by type (declarative, programmatic, streaming); 0 once stopped (daprd-rs).", Gauge, SUBSCRIPTION_KIND, &none),
            dead_lettered: family("component_pubsub_ingress_dead_lettered_count", "The number of messages published to a subscription's dead-letter topic (daprd-rs).", Counter, SUBSCRIPTION, &none),
            redelivered: family("component_pubsub_ingress_redelivered_count", "The number of messages the component handed over again: the broker marked them redelivered, or the component retried them itself (daprd-rs).", Counter, SUBSCRIPTION, &none),
            dropped: family("component_pubsub_ingress_dropped_count", "The number of messages dropped, by the app or by the sidecar, with the reason (daprd-rs).", Counter, DROPPED, &none),
            http_latency: family("http_server_latency", "HTTP request end to end latency in server.", Histogram, HTTP, &latency),
            http_request_bytes: family("http_server_request_bytes", "HTTP request body size if set as ContentLength (uncompressed) in server.", Histogram, APP_ONLY, &sizes),
            http_response_bytes: family("http_server_response_bytes", "HTTP response body size (uncompressed) in server.", Histogram, APP_ONLY, &sizes),
            grpc_completed: family("grpc_io_server_completed_rpcs", "Count of RPCs by method and status.", Counter, GRPC, &none),
            grpc_latency: family("grpc_io_server_server_latency", "Distribution of server latency in milliseconds, by method.", Histogram, GRPC_METHOD, &latency),
            grpc_received_bytes: family("grpc_io_server_received_bytes_per_rpc", "Total bytes received across all messages per RPC.", Histogram, GRPC_METHOD, &sizes),
            grpc_sent_bytes: family("grpc_io_server_sent_bytes_per_rpc", "Total bytes sent in across all response messages per RPC.", Histogram, GRPC_METHOD, &sizes),
            grpc_client_latency: family("grpc_io_client_roundtrip_latency", "Time between first byte of request sent to last byte of response received, or terminal error.", Histogram, GRPC_CLIENT, &latency),
            grpc_client_sent_bytes: family("grpc_io_client_sent_bytes_per_rpc", "Total bytes sent across all request messages per RPC.", Histogram, GRPC_CLIENT_METHOD, &sizes),
            grpc_client_received_bytes: family("grpc_io_client_received_bytes_per_rpc", "Total bytes received across all response messages per RPC.", Histogram, GRPC_CLIENT_METHOD, &sizes),
            error_codes: family("error_code_total", "Total number of times an error with a specific error code was encountered.", Counter, ERROR_CODE, &none),
            client_latency: family("http_client_roundtrip_latency", "Time between first byte of request headers sent to last byte of response received, or terminal error", Histogram, HTTP, &latency),
            client_sent_bytes: family("http_client_sent_bytes", "Total bytes sent in request body (not including headers)", Histogram, HTTP, &sizes),
            client_received_bytes: family("http_client_received_bytes", "Total bytes received in response bodies (not including headers but including error responses with bodies)", Histogram, APP_ONLY, &sizes),
            component_loaded: family("runtime_component_loaded", "The number of successfully loaded components.", Gauge, APP_ONLY, &none),
            component_init: family("runtime_component_init_total", "The number of initialized components.", Counter, COMPONENT_INIT, &none),
            component_init_fail: family("runtime_component_init_fail_total", "The number of component initialization failures.", Counter, COMPONENT_INIT, &none),
            resiliency_loaded: family("resiliency_loaded", "Number of resiliency policies loaded.", Counter, RESILIENCY_LOADED, &none),
            resiliency_count: family("resiliency_count", "Number of times a resiliency policyKey has been applied to a building block.", Counter, RESILIENCY, &none),
            resiliency_activations: family("resiliency_activations_total", "Number of times a resiliency policyKey has been activated in a building block after a failure or after a state change.", Counter, RESILIENCY, &none),
            resiliency_cb_state: family("resiliency_cb_state", "A resiliency policy's current CircuitBreakerState state. 0 is closed, 1 is half-open, 2 is open, and -1 is unknown.", Gauge, RESILIENCY, &none),
            mtls_init: family("runtime_mtls_init_total", "The number of successful mTLS authenticator initialization.", Counter, APP_ONLY, &none),
            mtls_init_fail: family("runtime_mtls_init_fail_total", "The number of mTLS authenticator init failures.", Counter, APP_REASON, &none),
            mtls_rotated: family("runtime_mtls_workload_cert_rotated_total", "The number of the successful workload certificate rotations.", Counter, APP_ONLY, &none),
            mtls_rotated_fail: family("runtime_mtls_workload_cert_rotated_fail_total", "The number of the failed workload certificate rotations.", Counter, APP_REASON, &none),
        }
    }

    /// Whether anything is recorded.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The scrape answer: every `dapr_*` series, then `process_*`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in [
            &self.egress_latency,
            &self.bulk_egress_event_count,
            &self.bulk_egress_latency,
            &self.ingress_latency,
            &self.bulk_ingress_event_count,
            &self.bulk_ingress_latency,
            &self.in_flight,
            &self.subscriptions,
            &self.dead_lettered,
            &self.redelivered,
            &self.dropped,
            &self.http_latency,
            &self.http_request_bytes,
            &self.http_response_bytes,
            &self.grpc_completed,
            &self.grpc_latency,
            &self.grpc_received_bytes,
            &self.grpc_sent_bytes,
            &self.grpc_client_latency,
            &self.grpc_client_sent_bytes,
            &self.grpc_client_received_bytes,
            &self.error_codes,
            &self.client_latency,
            &self.client_sent_bytes,
            &self.client_received_bytes,
            &self.component_loaded,
            &self.component_init,
            &self.component_init_fail,
            &self.resiliency_loaded,
            &self.resiliency_count,
            &self.resiliency_activations,
            &self.resiliency_cb_state,
            &self.mtls_init,
            &self.mtls_init_fail,
            &self.mtls_rotated,
            &self.mtls_rotated_fail,
        ] {
            f.render(&mut out);
        }
        for (histogram, name, help) in [
            (&self.egress_latency, "dapr_component_pubsub_egress_count", "The number of outgoing messages published to the pub/sub component."),
            (&self.bulk_egress_latency, "dapr_component_pubsub_egress_bulk_count", "The number of bulk publish calls to the pub/sub component."),
            (&self.ingress_latency, "dapr_component_pubsub_ingress_count", "The number of incoming messages arriving from the pub/sub component."),
            (&self.bulk_ingress_latency, "dapr_component_pubsub_ingress_bulk_count", "The number of incoming bulk subscribe calls arriving from the bulk pub/sub component."),
            (&self.http_latency, "dapr_http_server_request_count", "Number of HTTP requests started in server."),
            (&self.http_latency, "dapr_http_server_response_count", "The number of HTTP responses"),
            (&self.client_latency, "dapr_http_client_completed_count", "Count of completed requests"),
            (&self.grpc_client_latency, "dapr_grpc_io_client_completed_rpcs", "Count of RPCs by method and status."),
        ] {
            histogram.render_count_as(name, help, &mut out);
        }
        process::render(&mut out);
        out
    }

    /// `[app_id, component, namespace, middle, topic]`: the label order of the pub/sub
    /// series with one label between the namespace and the topic.
    fn component_labels<'a>(
        &'a self,
        component: &'a str,
        middle: &'a str,
        topic: &'a str,
    ) -> [&'a str; 5] {
        [
            self.app_id.as_str(),
            component,
            &self.namespace,
            middle,
            topic,
        ]
    }

    /// One publish to `component`/`topic` finished.
    pub fn pubsub_egress(&self, component: &str, topic: &str, success: bool, elapsed: Duration) {
        if !self.enabled {
            return;
        }
        let labels = self.component_labels(component, bool_label(success), topic);
        self.egress_latency.observe(&labels, ms(elapsed));
    }

    /// One bulk publish call finished; `published` entries reached the broker.
    pub fn bulk_pubsub_egress(
        &self,
        component: &str,
        topic: &str,
        success: bool,
        published: u64,
        elapsed: Duration,
    ) {
        if !self.enabled {
            return;
        }
        let labels = self.component_labels(component, bool_label(success), topic);
        self.bulk_egress_latency.observe(&labels, ms(elapsed));
        if published > 0 {
            let ok = self.component_labels(component, "true", topic);
            self.bulk_egress_event_count.inc_by(&ok, published);
        }
    }

    /// The app answered one delivery of `topic` after `elapsed`.
    pub fn pubsub_ingress(
        &self,
        component: &str,
        topic: &str,
        status: ProcessStatus,
        elapsed: Duration,
    ) {
        if !self.enabled {
            return;
        }
        let (process_status, status) = status.labels();
        let labels = [
            self.app_id.as_str(),
            component,
            &self.namespace,
            process_status,
            status,
            topic,
        ];
        self.ingress_latency.observe(&labels, ms(elapsed));
    }

    /// The app answered one bulk delivery of `topic`: `entries` per answer.
    pub fn bulk_pubsub_ingress(
        &self,
        component: &str,
        topic: &str,
        entries: &[(ProcessStatus, u64)],
        elapsed: Duration,
    ) {
        if !self.enabled {
            return;
        }
        let worst = entries
            .iter()
            .find(|(s, n)| *s != ProcessStatus::Success && *n > 0)
            .map_or("success", |(s, _)| s.labels().0);
        let call = self.component_labels(component, worst, topic);
        self.bulk_ingress_latency.observe(&call, ms(elapsed));
        for (s, n) in entries {
            if *n > 0 {
                let labels = self.component_labels(component, s.labels().0, topic);
                self.bulk_ingress_event_count.inc_by(&labels, *n);
            }
        }
    }

    /// A delivery of `topic` is in the app's hands until the returned guard drops.
    pub fn in_flight(&self, component: &str, topic: &str) -> Option<GaugeGuard> {
        if !self.enabled {
            return None;
        }
        let s = self
            .in_flight
            .series(&[self.app_id.as_str(), component, &self.namespace, topic]);
        s.add(1);
        Some(GaugeGuard(s))
    }

    /// A subscription of `kind` to `topic` is open until the returned guard drops.
    pub fn subscription(&self, component: &str, topic: &str, kind: &str) -> Option<GaugeGuard> {
        if !self.enabled {
            return None;
        }
        let s = self.subscriptions.series(&[
            self.app_id.as_str(),
            component,
            &self.namespace,
            topic,
            kind,
        ]);
        s.add(1);
        Some(GaugeGuard(s))
    }

    /// A message of `topic` went to its dead-letter topic.
    pub fn dead_lettered(&self, component: &str, topic: &str) {
        if self.enabled {
            self.dead_lettered
                .inc(&[self.app_id.as_str(), component, &self.namespace, topic]);
        }
    }

    /// The component handed over a message of `topic` it had handed over before.
    pub fn redelivered(&self, component: &str, topic: &str) {
        if self.enabled {
            self.redelivered
                .inc(&[self.app_id.as_str(), component, &self.namespace, topic]);
        }
    }

    /// A message of `topic` was dropped by `by` for `reason`.
    pub fn dropped(&self, component: &str, topic: &str, by: DroppedBy, reason: &str) {
        if !self.enabled {
            return;
        }
        let by = match by {
            DroppedBy::App => "app",
            DroppedBy::Sidecar => "sidecar",
        };
        self.dropped.inc(&[
            self.app_id.as_str(),
            by,
            component,
            &self.namespace,
            reason,
            topic,
        ]);
    }

    /// One HTTP API request finished with `status` (`"204"`).
    pub fn http_request(
        &self,
        method: &str,
        path: &str,
        status: &str,
        request_bytes: u64,
        response_bytes: u64,
        elapsed: Duration,
    ) {
        if !self.enabled {
            return;
        }
        let path = self.http_path(path);
        let method = if self.http.exclude_verbs { "" } else { method };
        let labels = [self.app_id.as_str(), method, path, status];
        self.http_latency.observe(&labels, ms(elapsed));
        let app = [self.app_id.as_str()];
        let requests = self
            .app_series
            .request_bytes
            .get_or_init(|| self.http_request_bytes.series(&app));
        self.http_request_bytes
            .observe_in(requests, request_bytes as f64);
        let responses = self
            .app_series
            .response_bytes
            .get_or_init(|| self.http_response_bytes.series(&app));
        self.http_response_bytes
            .observe_in(responses, response_bytes as f64);
    }

    /// The `path` label: the first `pathMatching` pattern that matches, else the path itself
    /// (`increasedCardinality`, Dapr 1.18's default), else empty.
    fn http_path<'a>(&'a self, path: &'a str) -> &'a str {
        if let Some((pattern, _)) = self
            .http
            .path_matching
            .iter()
            .find(|(_, re)| re.is_match(path))
        {
            return pattern;
        }
        if self.http.increased_cardinality {
            path
        } else {
            ""
        }
    }

    /// One request of the app channel (HTTP) was answered with `status`.
    pub fn http_client(
        &self,
        method: &str,
        path: &str,
        status: u16,
        sent_bytes: u64,
        received_bytes: u64,
        elapsed: Duration,
    ) {
        if !self.enabled {
            return;
        }
        let code = status.to_string();
        let labels = [self.app_id.as_str(), method, path, code.as_str()];
        self.client_latency.observe(&labels, ms(elapsed));
        self.client_sent_bytes.observe(&labels, sent_bytes as f64);
        self.client_received_bytes
            .observe(&[self.app_id.as_str()], received_bytes as f64);
    }

    /// One gRPC API call finished with `code`.
    pub fn grpc_call(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        if !self.enabled {
            return;
        }
        // by status for the count, by method only for the latency: Go daprd's views
        let labels = [self.app_id.as_str(), method, grpc_status(code)];
        self.grpc_completed.inc_by(&labels, 1);
        self.grpc_latency.observe(&labels[..2], ms(elapsed));
    }

    /// One unary gRPC API call of `method` took a request message of `received` bytes and
    /// answered one of `sent` bytes (0 for an error), as Go daprd measures them (the encoded
    /// message, without gRPC framing). Streaming calls are not counted, as in Go daprd.
    pub fn grpc_bytes(&self, method: &str, received: usize, sent: usize) {
        if !self.enabled {
            return;
        }
        let labels = [self.app_id.as_str(), method];
        self.grpc_received_bytes.observe(&labels, received as f64);
        self.grpc_sent_bytes.observe(&labels, sent as f64);
    }

    /// One call of the gRPC app channel (`/dapr.proto.runtime.v1.AppCallback/OnTopicEvent`)
    /// finished with `code`, having sent `sent` and received `received` message bytes.
    pub fn grpc_client(
        &self,
        method: &str,
        code: tonic::Code,
        sent: usize,
        received: usize,
        elapsed: Duration,
    ) {
        if !self.enabled {
            return;
        }
        let labels = [self.app_id.as_str(), method, grpc_status(code)];
        self.grpc_client_latency.observe(&labels, ms(elapsed));
        let labels = [self.app_id.as_str(), method];
        self.grpc_client_sent_bytes.observe(&labels, sent as f64);
        self.grpc_client_received_bytes
            .observe(&labels, received as f64);
    }

    /// The API answered an error with Dapr's `code` (`ERR_PUBSUB_NOT_FOUND`) of `category`
    /// (`pubsub`); counted only with `spec.metric.recordErrorCodes`.
    pub fn error_code(&self, category: &str, code: &str) {
        if self.record_error_codes {
            self.error_codes
                .inc(&[self.app_id.as_str(), category, code]);
        }
    }

    /// The components were built: `loaded` of them, one `init` per component type.
    pub fn components_loaded(&self, types: &[String], failed: &[String]) {
        if !self.enabled {
            return;
        }
        self.component_loaded.set(
            &[self.app_id.as_str()],
            i64::try_from(types.len()).unwrap_or(i64::MAX),
        );
        for t in types {
            self.component_init
                .inc(&[self.app_id.as_str(), t, &self.namespace]);
        }
        for t in failed {
            self.component_init_fail
                .inc(&[self.app_id.as_str(), t, &self.namespace]);
        }
    }
}

impl Metrics {
    /// Kubernetes mode's workload certificate: the first one signed (`renewal` false) or a
    /// renewal, or (`failed` with Go daprd's reason) an attempt that failed.
    pub fn mtls(&self, renewal: bool, failed: Option<&str>) {
        if !self.enabled {
            return;
        }
        let app = self.app_id.as_str();
        match (renewal, failed) {
            (false, None) => self.mtls_init.inc(&[app]),
            (false, Some(reason)) => self.mtls_init_fail.inc(&[app, reason]),
            (true, None) => self.mtls_rotated.inc(&[app]),
            (true, Some(reason)) => self.mtls_rotated_fail.inc(&[app, reason]),
        }
    }

    /// A Resiliency resource named `name` was loaded.
    pub fn resiliency_loaded(&self, name: &str) {
        if self.enabled {
            self.resiliency_loaded
                .inc(&[self.app_id.as_str(), name, &self.namespace]);
        }
    }

    /// A policy of resource `name` ran (or, with `activated`, acted: a retry, a timeout, a
    /// circuit breaker changing state to `status`).
    pub fn resiliency(
        &self,
        name: &str,
        policy: &str,
        direction: &str,
        target: &str,
        status: &str,
        activated: bool,
    ) {
        if !self.enabled {
            return;
        }
        let labels = |status| {
            [
                self.app_id.as_str(),
                direction,
                name,
                &self.namespace,
                policy,
                status,
                target,
            ]
        };
        let labels_now = labels(status);
        if activated {
            self.resiliency_activations.inc(&labels_now);
        } else {
            self.resiliency_count.inc(&labels_now);
        }
        if policy == "circuitbreaker" {
            // One series per state, 1 for the current one (as Go daprd).
            for s in ["closed", "half-open", "open", "unknown"] {
                self.resiliency_cb_state
                    .set(&labels(s), i64::from(s == status));
            }
        }
    }
}

/// Counts one in a gauge (an in-flight delivery, an active subscription) until dropped.
pub struct GaugeGuard(Arc<registry::Series>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn bool_label(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

/// gRPC status names as OpenCensus's gRPC plugin writes them.
fn grpc_status(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A `pathMatching` pattern (`/v1.0/publish/{pubsub}/{topic}`) as an anchored regex: a
/// `{name}` segment matches one path segment.
fn path_pattern(pattern: &str) -> Option<Regex> {
    let mut re = String::from("^");
    for (i, seg) in pattern.split('/').enumerate() {
        if i > 0 {
            re.push('/');
        }
        if seg.starts_with('{') && seg.ends_with('}') {
            re.push_str("[^/]+");
        } else {
            re.push_str(&regex::escape(seg));
        }
    }
    re.push('$');
    Regex::new(&re).ok()
}

/// One metric's rules: its name and, per label, the replacements.
type FamilyRules = (String, Vec<(String, registry::Replacements)>);

/// `spec.metric.rules`, compiled: metric name (with `dapr_`) → label rules. Rules whose
/// regexes do not compile are refused when the Configuration is read.
fn compile_rules(spec: &Metric) -> Vec<FamilyRules> {
    spec.rules
        .iter()
        .map(|r| {
            let labels = r
                .labels
                .iter()
                .map(|(label, pairs)| {
                    let pairs = pairs
                        .iter()
                        .filter_map(|(to, re)| Regex::new(re).ok().map(|re| (to.clone(), re)))
                        .collect();
                    (label.clone(), pairs)
                })
                .collect();
            (r.name.clone(), labels)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::configuration::MetricRule;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in\n{text}"))
    }

    #[test]
    fn egress_and_ingress_series() {
        let m = Metrics::new("shop", "default", &Metric::default());
        m.pubsub_egress("pubsub", "orders", true, Duration::from_micros(1500));
        m.pubsub_egress("pubsub", "orders", false, Duration::from_millis(7));
        m.pubsub_ingress(
            "pubsub",
            "orders",
            ProcessStatus::Drop,
            Duration::from_millis(2),
        );
        let text = m.render();
        line(&text, "dapr_component_pubsub_egress_count{app_id=\"shop\",component=\"pubsub\",namespace=\"default\",success=\"true\",topic=\"orders\"} 1");
        line(&text, "dapr_component_pubsub_egress_latencies_bucket{app_id=\"shop\",component=\"pubsub\",namespace=\"default\",success=\"true\",topic=\"orders\",le=\"2\"} 1");
        line(&text, "dapr_component_pubsub_egress_latencies_bucket{app_id=\"shop\",component=\"pubsub\",namespace=\"default\",success=\"true\",topic=\"orders\",le=\"1\"} 0");
        line(&text, "dapr_component_pubsub_ingress_count{app_id=\"shop\",component=\"pubsub\",namespace=\"default\",process_status=\"drop\",status=\"success\",topic=\"orders\"} 1");
        line(&text, "process_resident_memory_bytes ");
    }

    #[test]
    fn disabled_records_nothing_but_process() {
        let spec = Metric {
            enabled: false,
            ..Metric::default()
        };
        let m = Metrics::new("shop", "default", &spec);
        m.pubsub_egress("pubsub", "orders", true, Duration::from_millis(1));
        let text = m.render();
        assert!(!text.contains("dapr_"), "{text}");
        line(&text, "process_cpu_seconds_total ");
    }

    #[test]
    fn custom_buckets_rules_and_paths() {
        let spec = Metric {
            latency_buckets: vec![50, 10],
            rules: vec![MetricRule {
                name: "dapr_http_server_request_count".into(),
                labels: vec![(
                    "method".into(),
                    vec![("WRITE".into(), "^(POST|PUT)$".into())],
                )],
            }],
            increased_cardinality: false,
            path_matching: vec!["/v1.0/publish/{pubsub}/{topic}".into()],
            ..Metric::default()
        };
        let m = Metrics::new("a", "ns", &spec);
        m.http_request(
            "POST",
            "/v1.0/publish/p/t",
            "204",
            10,
            0,
            Duration::from_millis(20),
        );
        m.http_request(
            "GET",
            "/v1.0/metadata",
            "200",
            0,
            100,
            Duration::from_millis(1),
        );
        let text = m.render();
        line(&text, "dapr_http_server_request_count{app_id=\"a\",method=\"WRITE\",path=\"/v1.0/publish/{pubsub}/{topic}\",status=\"204\"} 1");
        line(&text, "dapr_http_server_request_count{app_id=\"a\",method=\"GET\",path=\"\",status=\"200\"} 1");
        // the counter shares its series with the latency histogram: the rule applies to both
        line(&text, "dapr_http_server_latency_bucket{app_id=\"a\",method=\"WRITE\",path=\"/v1.0/publish/{pubsub}/{topic}\",status=\"204\",le=\"10\"} 0");
        line(&text, "dapr_http_server_latency_bucket{app_id=\"a\",method=\"WRITE\",path=\"/v1.0/publish/{pubsub}/{topic}\",status=\"204\",le=\"50\"} 1");
        line(&text, "dapr_http_server_response_count{app_id=\"a\",method=\"WRITE\",path=\"/v1.0/publish/{pubsub}/{topic}\",status=\"204\"} 1");
        line(
            &text,
            "dapr_http_server_response_bytes_bucket{app_id=\"a\",le=\"1024\"} 2",
        );
    }

    #[test]
    fn in_flight_gauge_follows_guards() {
        let m = Metrics::new("a", "ns", &Metric::default());
        let g1 = m.in_flight("p", "t");
        let g2 = m.in_flight("p", "t");
        assert!(m.render().contains("dapr_component_pubsub_ingress_in_flight{app_id=\"a\",component=\"p\",namespace=\"ns\",topic=\"t\"} 2\n"));
        drop(g1);
        drop(g2);
        assert!(m.render().contains("dapr_component_pubsub_ingress_in_flight{app_id=\"a\",component=\"p\",namespace=\"ns\",topic=\"t\"} 0\n"));
    }

    #[test]
    fn error_codes_only_when_asked() {
        let off = Metrics::new("a", "ns", &Metric::default());
        off.error_code("pubsub", "ERR_PUBSUB_NOT_FOUND");
        assert!(!off.render().contains("dapr_error_code_total{"));
        let spec = Metric {
            record_error_codes: true,
            ..Metric::default()
        };
        let on = Metrics::new("a", "ns", &spec);
        on.error_code("pubsub", "ERR_PUBSUB_NOT_FOUND");
        on.error_code("pubsub", "ERR_PUBSUB_NOT_FOUND");
        on.error_code("health", "ERR_HEALTH_NOT_READY");
        let text = on.render();
        line(&text, "dapr_error_code_total{app_id=\"a\",category=\"pubsub\",error_code=\"ERR_PUBSUB_NOT_FOUND\"} 2");
        line(&text, "dapr_error_code_total{app_id=\"a\",category=\"health\",error_code=\"ERR_HEALTH_NOT_READY\"} 1");
    }

    #[test]
    fn grpc_bytes_and_client_series() {
        let m = Metrics::new("a", "ns", &Metric::default());
        let method = "/dapr.proto.runtime.v1.Dapr/PublishEvent";
        m.grpc_bytes(method, 1500, 0);
        m.grpc_call(method, tonic::Code::Ok, Duration::from_millis(2));
        m.grpc_call(method, tonic::Code::NotFound, Duration::from_millis(1));
        let cb = "/dapr.proto.runtime.v1.AppCallback/OnTopicEvent";
        m.grpc_client(cb, tonic::Code::Ok, 300, 2, Duration::from_millis(3));
        m.grpc_client(
            cb,
            tonic::Code::Unavailable,
            300,
            0,
            Duration::from_millis(1),
        );
        let text = m.render();
        line(&text, &format!("dapr_grpc_io_server_received_bytes_per_rpc_bucket{{app_id=\"a\",grpc_server_method=\"{method}\",le=\"1024\"}} 0"));
        line(&text, &format!("dapr_grpc_io_server_received_bytes_per_rpc_bucket{{app_id=\"a\",grpc_server_method=\"{method}\",le=\"2048\"}} 1"));
        line(&text, &format!("dapr_grpc_io_server_sent_bytes_per_rpc_sum{{app_id=\"a\",grpc_server_method=\"{method}\"}} 0"));
        // the server's count by status, its latency by method only (Go daprd's views)
        line(&text, &format!("dapr_grpc_io_server_completed_rpcs{{app_id=\"a\",grpc_server_method=\"{method}\",grpc_server_status=\"OK\"}} 1"));
        line(&text, &format!("dapr_grpc_io_server_completed_rpcs{{app_id=\"a\",grpc_server_method=\"{method}\",grpc_server_status=\"NOT_FOUND\"}} 1"));
        line(&text, &format!("dapr_grpc_io_server_server_latency_count{{app_id=\"a\",grpc_server_method=\"{method}\"}} 2"));
        line(&text, &format!("dapr_grpc_io_client_completed_rpcs{{app_id=\"a\",grpc_client_method=\"{cb}\",grpc_client_status=\"OK\"}} 1"));
        line(&text, &format!("dapr_grpc_io_client_completed_rpcs{{app_id=\"a\",grpc_client_method=\"{cb}\",grpc_client_status=\"UNAVAILABLE\"}} 1"));
        line(&text, &format!("dapr_grpc_io_client_sent_bytes_per_rpc_sum{{app_id=\"a\",grpc_client_method=\"{cb}\"}} 600"));
        line(&text, &format!("dapr_grpc_io_client_received_bytes_per_rpc_count{{app_id=\"a\",grpc_client_method=\"{cb}\"}} 2"));
    }
}
