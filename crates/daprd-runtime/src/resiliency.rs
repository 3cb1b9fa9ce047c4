//! Resiliency policies (Dapr's `Resiliency` resource): retries (constant / exponential, `maxRetries`,
//! `matching` on HTTP status and gRPC codes), timeouts and circuit breakers, applied to a
//! pub/sub component's `inbound` (delivery to the app) and `outbound` (publish, bulk
//! publish, dead-letter publish) operations, with Dapr's default-policy names. Without a
//! Resiliency resource nothing is retried, as in Dapr.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::config::resources::{OtherManifest, ResourceError};
use crate::metrics::Metrics;

/// Direction of a component operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Delivery to the app.
    Inbound,
    /// Publishing to the broker.
    Outbound,
}

/// How to back off between retries.
#[derive(Debug, Clone, PartialEq)]
pub enum Backoff {
    /// The same delay every time.
    Constant(Duration),
    /// Growing delays.
    Exponential {
        /// First delay (default 500ms).
        initial: Duration,
        /// Largest delay (default 60s).
        max: Duration,
        /// Growth factor (default 1.5).
        multiplier: f64,
        /// Jitter (default 0.5).
        randomization: f64,
        /// Give up after this long (None = never).
        max_elapsed: Option<Duration>,
    },
}

/// A retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Backoff.
    pub backoff: Backoff,
    /// Retries after the first attempt (-1 = forever).
    pub max_retries: i64,
    /// Retriable HTTP status ranges (None = all).
    pub http_codes: Option<Vec<(i32, i32)>>,
    /// Retriable gRPC code ranges (None = all).
    pub grpc_codes: Option<Vec<(i32, i32)>>,
}

impl RetryPolicy {
    fn code_is_retriable(&self, code: StatusCode) -> bool {
        let (ranges, code) = match code {
            StatusCode::Http(status) => (&self.http_codes, i32::from(status)),
            StatusCode::Grpc(code) => (&self.grpc_codes, code as i32),
        };
        match ranges {
            None => true,
            Some(r) => r.iter().any(|(a, b)| *a <= code && code <= *b),
        }
    }

    fn delay(&self, attempt: u32) -> Duration {
        match &self.backoff {
            Backoff::Constant(d) => *d,
            Backoff::Exponential {
                initial,
                max,
                multiplier,
                randomization,
                ..
            } => {
                let base = initial.as_secs_f64()
                    * multiplier.powi(i32::try_from(attempt).unwrap_or(i32::MAX));
                let jitter = 1.0 + randomization * (fastrand::f64() * 2.0 - 1.0);
                Duration::from_secs_f64((base * jitter).clamp(0.0, max.as_secs_f64()))
            }
        }
    }
}

/// Circuit breaker settings and state.
pub struct CircuitBreaker {
    max_requests: u32,
    interval: Duration,
    timeout: Duration,
    trip: Arc<cel::Program>,
    trip_text: String,
    state: Mutex<BreakerState>,
}

#[derive(Default)]
struct Counts {
    requests: u32,
    total_successes: u32,
    total_failures: u32,
    consecutive_successes: u32,
    consecutive_failures: u32,
}

enum Phase {
    Closed { since: Instant },
    Open { until: Instant },
    HalfOpen { in_flight: u32 },
}

struct BreakerState {
    phase: Phase,
    counts: Counts,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("trip", &self.trip_text)
            .finish()
    }
}

impl CircuitBreaker {
    /// The state's name, as gobreaker spells it (`closed`, `half-open`, `open`).
    fn state_name(&self) -> &'static str {
        match self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .phase
        {
            Phase::Closed { .. } => "closed",
            Phase::Open { .. } => "open",
            Phase::HalfOpen { .. } => "half-open",
        }
    }

    fn allow(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match s.phase {
            Phase::Closed { since } => {
                if !self.interval.is_zero() && now.duration_since(since) >= self.interval {
                    s.counts = Counts::default();
                    s.phase = Phase::Closed { since: now };
                }
                true
            }
            Phase::Open { until } if now >= until => {
                s.phase = Phase::HalfOpen { in_flight: 1 };
                s.counts = Counts::default();
                true
            }
            Phase::Open { .. } => false,
            Phase::HalfOpen { ref mut in_flight } => {
                if *in_flight < self.max_requests.max(1) {
                    *in_flight += 1;
                    true
                } else {
                    false
                }
            }
        }
    }

    fn record(&self, ok: bool) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let c = &mut s.counts;
        c.requests += 1;
        if ok {
            c.total_successes += 1;
            c.consecutive_successes += 1;
            c.consecutive_failures = 0;
        } else {
            c.total_failures += 1;
            c.consecutive_failures += 1;
            c.consecutive_successes = 0;
        }
        match s.phase {
            Phase::HalfOpen { .. } if !ok => {
                s.phase = Phase::Open {
                    until: Instant::now() + self.timeout,
                }
            }
            Phase::HalfOpen { .. }
                if s.counts.consecutive_successes >= self.max_requests.max(1) =>
            {
                s.phase = Phase::Closed {
                    since: Instant::now(),
                };
                s.counts = Counts::default();
            }
            Phase::Closed { .. } if !ok && self.tripped(&s.counts) => {
                s.phase = Phase::Open {
                    until: Instant::now() + self.timeout,
                };
            }
            _ => {}
        }
    }

    fn tripped(&self, c: &Counts) -> bool {
        let mut ctx = cel::Context::default();
        for (name, v) in [
            ("requests", c.requests),
            ("totalSuccesses", c.total_successes),
            ("totalFailures", c.total_failures),
            ("consecutiveSuccesses", c.consecutive_successes),
            ("consecutiveFailures", c.consecutive_failures),
        ] {
            ctx.add_variable_from_value(name, cel::Value::Int(i64::from(v)));
        }
        matches!(self.trip.execute(&ctx), Ok(cel::Value::Bool(true)))
    }
}

/// The policy for one operation.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Per-attempt timeout.
    pub timeout: Option<Duration>,
    /// Retries.
    pub retry: Option<RetryPolicy>,
    /// Circuit breaker.
    pub breaker: Option<Arc<CircuitBreaker>>,
    /// Where its runs are counted (`dapr_resiliency_*`), when metrics are on.
    pub metrics: Option<Arc<PolicyMetrics>>,
}

/// The labels of one policy's `dapr_resiliency_*` series.
#[derive(Debug)]
pub struct PolicyMetrics {
    metrics: Arc<Metrics>,
    /// `pubsub_<component>`, as Go daprd names a component target.
    target: String,
    direction: &'static str,
    /// The Resiliency resources that define the retry, timeout and circuit breaker.
    names: [String; 3],
}

impl PolicyMetrics {
    fn executed(&self, policy: &Policy) {
        if policy.retry.is_some() {
            self.record(0, "retry", "", false);
        }
        if policy.timeout.is_some() {
            self.record(1, "timeout", "", false);
        }
        if let Some(b) = &policy.breaker {
            self.record(2, "circuitbreaker", b.state_name(), false);
        }
    }

    fn record(&self, i: usize, policy: &str, status: &str, activated: bool) {
        self.metrics.resiliency(
            &self.names[i],
            policy,
            self.direction,
            &self.target,
            status,
            activated,
        );
    }
}

/// The status a failed attempt was answered with, which a retry policy's `matching` selects
/// on: an HTTP status (`httpStatusCodes`) or a gRPC code (`gRPCStatusCodes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCode {
    /// An HTTP status (100–599).
    Http(u16),
    /// A gRPC code.
    Grpc(tonic::Code),
}

/// A failed attempt: why, the status it was answered with when there is one, and the error
/// that caused it.
#[derive(Debug, Clone)]
pub struct AttemptError {
    /// What went wrong.
    pub message: String,
    /// The HTTP status or gRPC code, when the failure had one.
    pub code: Option<StatusCode>,
    /// The underlying error (a component's), kept for the API error's log line.
    pub source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl AttemptError {
    /// A failure with no status and no underlying error.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: None,
            source: None,
        }
    }

    /// This failure, answered with `code`.
    #[must_use]
    pub fn with_code(mut self, code: Option<StatusCode>) -> Self {
        self.code = code;
        self
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AttemptError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl Policy {
    /// Runs `op` under this policy: each attempt bounded by the timeout, failures retried
    /// per the retry policy (errors carrying a code only when `matching` allows it), the
    /// circuit breaker consulted before and told after each attempt.
    ///
    /// # Errors
    /// The last attempt's error, or the circuit breaker's refusal.
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, AttemptError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        let started = Instant::now();
        let mut attempt: u32 = 0;
        if let Some(m) = &self.metrics {
            m.executed(self);
        }
        loop {
            let before = self.breaker.as_ref().map(|b| b.state_name());
            if let Some(b) = &self.breaker {
                if !b.allow() {
                    return Err(AttemptError::new("circuit breaker is open"));
                }
            }
            let result = match self.timeout {
                Some(t) => match tokio::time::timeout(t, op()).await {
                    Ok(r) => r,
                    Err(_) => {
                        if let Some(m) = &self.metrics {
                            m.record(1, "timeout", "", true);
                        }
                        Err(AttemptError::new(format!("timed out after {t:?}")))
                    }
                },
                None => op().await,
            };
            if let Some(b) = &self.breaker {
                b.record(result.is_ok());
                let after = b.state_name();
                if let (Some(m), true) = (&self.metrics, before != Some(after)) {
                    m.record(2, "circuitbreaker", after, true);
                }
            }
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let Some(retry) = &self.retry else {
                return Err(err);
            };
            if let Some(code) = err.code {
                if !retry.code_is_retriable(code) {
                    return Err(err);
                }
            }
            if retry.max_retries >= 0 && i64::from(attempt) >= retry.max_retries {
                return Err(err);
            }
            if let Backoff::Exponential {
                max_elapsed: Some(limit),
                ..
            } = retry.backoff
            {
                if started.elapsed() >= limit {
                    return Err(err);
                }
            }
            let delay = retry.delay(attempt);
            if let Some(m) = &self.metrics {
                m.record(0, "retry", "", true);
            }
            tracing::warn!(error = %err.message, retry_in = ?delay, attempt = attempt + 1, "operation failed; retrying");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// Every loaded policy and target.
#[derive(Debug, Default)]
pub struct Resiliency {
    timeouts: BTreeMap<String, Duration>,
    retries: BTreeMap<String, RetryPolicy>,
    breakers: BTreeMap<String, Arc<CircuitBreaker>>,
    // component name → direction → (retry, timeout, circuit breaker) policy names
    targets: BTreeMap<String, BTreeMap<&'static str, [Option<String>; 3]>>,
    target_files: BTreeMap<String, std::path::PathBuf>,
    /// The loaded resources' names, and which one defines each policy (`retry/<name>`,
    /// `timeout/<name>`, `circuitbreaker/<name>`).
    loaded: Vec<String>,
    sources: BTreeMap<String, String>,
    metrics: std::sync::OnceLock<Arc<Metrics>>,
    /// The policies built so far, by component and direction: a publish or a delivery looks
    /// its policy up instead of resolving names (and building its metric labels) again.
    /// Index 0 inbound, 1 outbound.
    built: std::sync::RwLock<BTreeMap<String, [Option<Arc<Policy>>; 2]>>,
}

/// The resiliency policies in force. Hot reload replaces them whole: a publish or a delivery
/// takes the policy of the set current when it starts (circuit breakers start closed in a
/// new set).
#[derive(Debug, Default)]
pub struct Policies {
    current: std::sync::RwLock<Arc<Resiliency>>,
    metrics: std::sync::OnceLock<Arc<Metrics>>,
}

impl Policies {
    /// `resiliency` in force.
    pub fn new(resiliency: Resiliency) -> Self {
        Self {
            current: std::sync::RwLock::new(Arc::new(resiliency)),
            metrics: std::sync::OnceLock::new(),
        }
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<Resiliency> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The policy for `direction` operations of `component` in the set in force.
    pub fn component_policy(&self, component: &str, direction: Direction) -> Arc<Policy> {
        self.current().component_policy(component, direction)
    }

    /// Counts the policies' runs in `metrics`, this set's and every later one's.
    pub fn observe(&self, metrics: Arc<Metrics>) {
        self.current().observe(metrics.clone());
        let _ = self.metrics.set(metrics);
    }

    /// Puts `resiliency` in force (hot reload); the next publish or delivery uses it.
    pub fn replace(&self, resiliency: Resiliency) {
        if let Some(m) = self.metrics.get() {
            resiliency.observe(m.clone());
        }
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(resiliency);
    }
}

fn get_ci<'a>(obj: &'a serde_json::Map<String, Json>, key: &str) -> Option<&'a Json> {
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        Json::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn duration(field: &str, v: Option<&Json>) -> Result<Option<Duration>, String> {
    match text(v) {
        None => Ok(None),
        Some(t) => daprd_core::duration::parse_go_duration(&t)
            .map(Some)
            .map_err(|_| format!("{field}: {t:?} is not a duration such as \"5s\"")),
    }
}

/// Parses `"500,502-504"` into ranges within `valid`.
pub fn parse_code_ranges(
    field: &str,
    text: &str,
    valid: (i32, i32),
) -> Result<Vec<(i32, i32)>, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| {
            s.trim()
                .parse::<i32>()
                .map_err(|_| format!("{field}: {part:?} is not a code or range"))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if a > b || a < valid.0 || b > valid.1 {
            return Err(format!(
                "{field}: {part:?} is outside {}-{}",
                valid.0, valid.1
            ));
        }
        out.push((a, b));
    }
    Ok(out)
}

fn parse_retry(name: &str, v: &Json) -> Result<RetryPolicy, String> {
    let Json::Object(o) = v else {
        return Err(format!("retries.{name}: must be a mapping"));
    };
    let field = |f: &str| format!("retries.{name}.{f}");
    let max_retries = match text(get_ci(o, "maxRetries")) {
        None => -1,
        Some(t) => t
            .parse()
            .map_err(|_| format!("{}: {t:?} is not an integer", field("maxRetries")))?,
    };
    let policy = text(get_ci(o, "policy")).unwrap_or_else(|| "constant".into());
    let backoff = match policy.as_str() {
        "constant" => Backoff::Constant(
            duration(&field("duration"), get_ci(o, "duration"))?.unwrap_or(Duration::from_secs(5)),
        ),
        "exponential" => Backoff::Exponential {
            initial: duration(&field("initialInterval"), get_ci(o, "initialInterval"))?
                .unwrap_or(Duration::from_millis(500)),
            max: duration(&field("maxInterval"), get_ci(o, "maxInterval"))?
                .unwrap_or(Duration::from_secs(60)),
            multiplier: text(get_ci(o, "multiplier"))
                .and_then(|t| t.parse().ok())
                .unwrap_or(1.5),
            randomization: text(get_ci(o, "randomizationFactor"))
                .and_then(|t| t.parse().ok())
                .unwrap_or(0.5),
            max_elapsed: duration(&field("maxElapsedTime"), get_ci(o, "maxElapsedTime"))?,
        },
        other => {
            return Err(format!(
                "{}: {other:?} is not constant or exponential",
                field("policy")
            ))
        }
    };
    let (mut http_codes, mut grpc_codes) = (None, None);
    if let Some(Json::Object(m)) = get_ci(o, "matching") {
        if let Some(t) = text(get_ci(m, "httpStatusCodes")) {
            http_codes = Some(parse_code_ranges(
                &field("matching.httpStatusCodes"),
                &t,
                (100, 599),
            )?);
        }
        if let Some(t) = text(get_ci(m, "gRPCStatusCodes")) {
            grpc_codes = Some(parse_code_ranges(
                &field("matching.gRPCStatusCodes"),
                &t,
                (0, 16),
            )?);
        }
    }
    Ok(RetryPolicy {
        backoff,
        max_retries,
        http_codes,
        grpc_codes,
    })
}

fn parse_breaker(name: &str, v: &Json) -> Result<CircuitBreaker, String> {
    let Json::Object(o) = v else {
        return Err(format!("circuitBreakers.{name}: must be a mapping"));
    };
    let field = |f: &str| format!("circuitBreakers.{name}.{f}");
    let trip_text = text(get_ci(o, "trip")).unwrap_or_else(|| "consecutiveFailures > 5".into());
    let trip = cel::Program::compile(&trip_text).map_err(|e| format!("{}: {e}", field("trip")))?;
    Ok(CircuitBreaker {
        max_requests: text(get_ci(o, "maxRequests"))
            .and_then(|t| t.parse().ok())
            .unwrap_or(1),
        interval: duration(&field("interval"), get_ci(o, "interval"))?.unwrap_or(Duration::ZERO),
        timeout: duration(&field("timeout"), get_ci(o, "timeout"))?
            .unwrap_or(Duration::from_secs(60)),
        trip: Arc::new(trip),
        trip_text,
        state: Mutex::new(BreakerState {
            phase: Phase::Closed {
                since: Instant::now(),
            },
            counts: Counts::default(),
        }),
    })
}

impl Resiliency {
    /// Loads every `Resiliency` document that applies to `app_id`.
    pub fn load(others: &[OtherManifest], app_id: &str) -> (Self, Vec<ResourceError>) {
        let mut r = Resiliency::default();
        let mut errors = Vec::new();
        for m in others.iter().filter(|m| m.kind == "Resiliency") {
            let name = m
                .doc
                .get("metadata")
                .and_then(|md| md.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_string();
            let fail = |field: Option<String>, message: String| ResourceError {
                file: m.file.clone(),
                component: Some(format!("resiliency {name}")),
                field,
                message,
            };
            let json = match serde_json::to_value(&m.doc) {
                Ok(Json::Object(o)) => o,
                _ => {
                    errors.push(fail(None, "expected a mapping".into()));
                    continue;
                }
            };
            if let Some(Json::Array(scopes)) = get_ci(&json, "scopes") {
                if !scopes.is_empty() && !scopes.iter().any(|s| s.as_str() == Some(app_id)) {
                    continue;
                }
            }
            let Some(Json::Object(spec)) = get_ci(&json, "spec") else {
                errors.push(fail(Some("spec".into()), "is required".into()));
                continue;
            };
            r.loaded.push(name.clone());
            if let Some(Json::Object(policies)) = get_ci(spec, "policies") {
                if let Some(Json::Object(t)) = get_ci(policies, "timeouts") {
                    for (k, v) in t {
                        match duration(&format!("timeouts.{k}"), Some(v)) {
                            Ok(Some(d)) => {
                                r.timeouts.insert(k.clone(), d);
                                r.sources.insert(format!("timeout/{k}"), name.clone());
                            }
                            Ok(None) => errors.push(fail(
                                Some(format!("spec.policies.timeouts.{k}")),
                                "must be a duration".into(),
                            )),
                            Err(e) => errors
                                .push(fail(Some(format!("spec.policies.{e}")), "invalid".into())),
                        }
                    }
                }
                if let Some(Json::Object(t)) = get_ci(policies, "retries") {
                    for (k, v) in t {
                        match parse_retry(k, v) {
                            Ok(p) => {
                                r.retries.insert(k.clone(), p);
                                r.sources.insert(format!("retry/{k}"), name.clone());
                            }
                            Err(e) => errors.push(fail(Some("spec.policies".into()), e)),
                        }
                    }
                }
                if let Some(Json::Object(t)) = get_ci(policies, "circuitBreakers") {
                    for (k, v) in t {
                        match parse_breaker(k, v) {
                            Ok(b) => {
                                r.breakers.insert(k.clone(), Arc::new(b));
                                r.sources
                                    .insert(format!("circuitbreaker/{k}"), name.clone());
                            }
                            Err(e) => errors.push(fail(Some("spec.policies".into()), e)),
                        }
                    }
                }
            }
            if let Some(Json::Object(targets)) = get_ci(spec, "targets") {
                if let Some(Json::Object(comps)) = get_ci(targets, "components") {
                    for (comp, dirs) in comps {
                        let Json::Object(dirs) = dirs else { continue };
                        for dir in ["inbound", "outbound"] {
                            if let Some(Json::Object(p)) = get_ci(dirs, dir) {
                                let names = [
                                    text(get_ci(p, "retry")),
                                    text(get_ci(p, "timeout")),
                                    text(get_ci(p, "circuitBreaker")),
                                ];
                                r.targets
                                    .entry(comp.clone())
                                    .or_default()
                                    .insert(dir, names);
                                r.target_files.insert(comp.clone(), m.file.clone());
                            }
                        }
                    }
                }
            }
        }
        // Every named reference must exist.
        for (comp, dirs) in &r.targets {
            for (dir, [retry, timeout, breaker]) in dirs {
                let missing = |what: &str, n: &Option<String>, exists: bool| {
                    n.as_ref().filter(|_| !exists).map(|n| {
                        format!("targets.components.{comp}.{dir}.{what}: no policy named {n:?}")
                    })
                };
                for m in [
                    missing(
                        "retry",
                        retry,
                        retry.as_ref().is_none_or(|n| r.retries.contains_key(n)),
                    ),
                    missing(
                        "timeout",
                        timeout,
                        timeout.as_ref().is_none_or(|n| r.timeouts.contains_key(n)),
                    ),
                    missing(
                        "circuitBreaker",
                        breaker,
                        breaker.as_ref().is_none_or(|n| r.breakers.contains_key(n)),
                    ),
                ]
                .into_iter()
                .flatten()
                {
                    errors.push(ResourceError {
                        file: r.target_files.get(comp).cloned().unwrap_or_default(),
                        component: Some("resiliency".into()),
                        field: Some(format!("spec.targets.components.{comp}.{dir}")),
                        message: m,
                    });
                }
            }
        }
        (r, errors)
    }

    fn default_name(&self, kind: &str, dir: Direction) -> [String; 4] {
        let d = if dir == Direction::Inbound {
            "Inbound"
        } else {
            "Outbound"
        };
        [
            format!("DefaultPubsubComponent{d}{kind}Policy"),
            format!("DefaultComponent{d}{kind}Policy"),
            format!("DefaultComponent{kind}Policy"),
            format!("Default{kind}Policy"),
        ]
    }

    /// The policy for `direction` operations of pub/sub component `component` (built on first
    /// use, then shared).
    pub fn component_policy(&self, component: &str, direction: Direction) -> Arc<Policy> {
        let dir = if direction == Direction::Inbound {
            "inbound"
        } else {
            "outbound"
        };
        let i = usize::from(direction == Direction::Outbound);
        if let Some(p) = self
            .built
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(component)
            .and_then(|b| b[i].clone())
        {
            return p;
        }
        let mut built = self.built.write().unwrap_or_else(PoisonError::into_inner);
        built.entry(component.to_string()).or_default()[i]
            .get_or_insert_with(|| Arc::new(self.build_policy(component, direction, dir)))
            .clone()
    }

    fn build_policy(&self, component: &str, direction: Direction, dir: &'static str) -> Policy {
        let names = self.targets.get(component).and_then(|d| d.get(dir));
        let pick = |i: usize, kind: &str, exists: &dyn Fn(&str) -> bool| -> Option<String> {
            if let Some(n) = names.and_then(|n| n[i].clone()) {
                return Some(n);
            }
            self.default_name(kind, direction)
                .into_iter()
                .find(|n| exists(n))
        };
        let retry_name = pick(0, "Retry", &|n| self.retries.contains_key(n));
        let timeout_name = pick(1, "Timeout", &|n| self.timeouts.contains_key(n));
        let breaker_name = pick(2, "CircuitBreaker", &|n| self.breakers.contains_key(n));
        let retry = retry_name
            .as_ref()
            .and_then(|n| self.retries.get(n).cloned());
        let timeout = timeout_name
            .as_ref()
            .and_then(|n| self.timeouts.get(n).copied());
        let breaker = breaker_name
            .as_ref()
            .and_then(|n| self.breakers.get(n).cloned());
        let any = retry.is_some() || timeout.is_some() || breaker.is_some();
        let metrics = match self.metrics.get() {
            Some(m) if m.enabled() && any => {
                let source = |kind: &str, n: &Option<String>| {
                    n.as_ref()
                        .and_then(|n| self.sources.get(&format!("{kind}/{n}")))
                        .cloned()
                        .unwrap_or_default()
                };
                Some(Arc::new(PolicyMetrics {
                    metrics: m.clone(),
                    target: format!("pubsub_{component}"),
                    direction: dir,
                    names: [
                        source("retry", &retry_name),
                        source("timeout", &timeout_name),
                        source("circuitbreaker", &breaker_name),
                    ],
                }))
            }
            _ => None,
        };
        Policy {
            timeout,
            retry,
            breaker,
            metrics,
        }
    }

    /// Counts the policies' runs in `metrics` from now on (each loaded Resiliency resource
    /// once in `dapr_resiliency_loaded`). Call it before the first policy is taken: policies
    /// built before keep no count.
    pub fn observe(&self, metrics: Arc<Metrics>) {
        for name in &self.loaded {
            metrics.resiliency_loaded(name);
        }
        let _ = self.metrics.set(metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::resources::{parse_file, LoadContext, Resources};
    use std::path::Path;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn load(text: &str) -> (Resiliency, Vec<ResourceError>) {
        let mut r = Resources::default();
        parse_file(
            Path::new("r.yaml"),
            text.as_bytes(),
            &LoadContext {
                app_id: "app1",
                namespace: None,
            },
            &mut r,
        );
        Resiliency::load(&r.others, "app1")
    }

    const DOC: &str = "apiVersion: dapr.io/v1alpha1\nkind: Resiliency\nmetadata: {name: r}\nspec:\n  policies:\n    timeouts: {general: 5s}\n    retries:\n      three: {policy: constant, duration: 10ms, maxRetries: 3}\n      only5xx: {policy: constant, duration: 1ms, maxRetries: 5, matching: {httpStatusCodes: \"500,502-504\", gRPCStatusCodes: \"14\"}}\n      DefaultRetryPolicy: {policy: constant, duration: 1ms, maxRetries: 1}\n    circuitBreakers:\n      cb: {maxRequests: 1, timeout: 1h, trip: consecutiveFailures > 2}\n  targets:\n    components:\n      ps:\n        inbound: {retry: three, timeout: general}\n        outbound: {retry: only5xx, circuitBreaker: cb}\n";

    async fn run_counting(p: &Policy, code: Option<StatusCode>) -> (Result<(), AttemptError>, u32) {
        let n = AtomicU32::new(0);
        let r = p
            .run(|| {
                n.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(AttemptError::new("x").with_code(code)) }
            })
            .await;
        (r, n.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn retries_count_and_matching() {
        let (r, errs) = load(DOC);
        assert!(errs.is_empty(), "{errs:?}");
        let inbound = r.component_policy("ps", Direction::Inbound);
        assert_eq!(inbound.timeout, Some(Duration::from_secs(5)));
        assert_eq!(
            run_counting(&inbound, None).await.1,
            4,
            "1 attempt + 3 retries"
        );
        let other = r.component_policy("other", Direction::Inbound);
        assert_eq!(
            run_counting(&other, None).await.1,
            2,
            "DefaultRetryPolicy applies to untargeted components"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn runs_retries_and_breaker_changes_are_counted() {
        let (r, _) = load(DOC);
        let m = Arc::new(Metrics::new(
            "app1",
            "ns",
            &crate::config::configuration::Metric::default(),
        ));
        r.observe(m.clone());
        let inbound = r.component_policy("ps", Direction::Inbound);
        assert!(run_counting(&inbound, None).await.0.is_err());
        // the outbound breaker trips after 3 consecutive failures (1 attempt + 5 retries)
        let outbound = r.component_policy("ps", Direction::Outbound);
        assert!(run_counting(&outbound, Some(StatusCode::Http(500)))
            .await
            .0
            .is_err());
        let text = m.render();
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        has("dapr_resiliency_loaded{app_id=\"app1\",name=\"r\",namespace=\"ns\"} 1");
        has("dapr_resiliency_count{app_id=\"app1\",flow_direction=\"inbound\",name=\"r\",namespace=\"ns\",policy=\"retry\",status=\"\",target=\"pubsub_ps\"} 1");
        has("dapr_resiliency_activations_total{app_id=\"app1\",flow_direction=\"inbound\",name=\"r\",namespace=\"ns\",policy=\"retry\",status=\"\",target=\"pubsub_ps\"} 3");
        has("dapr_resiliency_activations_total{app_id=\"app1\",flow_direction=\"outbound\",name=\"r\",namespace=\"ns\",policy=\"circuitbreaker\",status=\"open\",target=\"pubsub_ps\"} 1");
        has("dapr_resiliency_cb_state{app_id=\"app1\",flow_direction=\"outbound\",name=\"r\",namespace=\"ns\",policy=\"circuitbreaker\",status=\"open\",target=\"pubsub_ps\"} 1");
        has("dapr_resiliency_cb_state{app_id=\"app1\",flow_direction=\"outbound\",name=\"r\",namespace=\"ns\",policy=\"circuitbreaker\",status=\"closed\",target=\"pubsub_ps\"} 0");
    }

    #[tokio::test(start_paused = true)]
    async fn matching_and_breaker() {
        let (r, _) = load(DOC);
        let out = r.component_policy("ps", Direction::Outbound);
        // 404 does not match 500,502-504: no retry
        assert_eq!(run_counting(&out, Some(StatusCode::Http(404))).await.1, 1);
        // 503 matches; the breaker (shared, one failure already counted) trips on the
        // third consecutive failure, so the next attempt is refused
        let (res, n) = run_counting(&out, Some(StatusCode::Http(503))).await;
        assert_eq!(n, 2);
        assert_eq!(res.unwrap_err().message, "circuit breaker is open");
    }

    #[tokio::test(start_paused = true)]
    async fn matching_tells_http_statuses_from_grpc_codes() {
        let (r, errs) = load("apiVersion: dapr.io/v1alpha1\nkind: Resiliency\nmetadata: {name: r}\nspec:\n  policies:\n    retries:\n      m: {policy: constant, duration: 1ms, maxRetries: 2, matching: {httpStatusCodes: \"503\", gRPCStatusCodes: \"14\"}}\n  targets:\n    components:\n      ps: {outbound: {retry: m}}\n");
        assert!(errs.is_empty(), "{errs:?}");
        let out = r.component_policy("ps", Direction::Outbound);
        let unavailable = StatusCode::Grpc(tonic::Code::Unavailable);
        assert_eq!(run_counting(&out, Some(unavailable)).await.1, 3);
        let not_found = StatusCode::Grpc(tonic::Code::NotFound);
        assert_eq!(run_counting(&out, Some(not_found)).await.1, 1);
        assert_eq!(run_counting(&out, Some(StatusCode::Http(503))).await.1, 3);
        assert_eq!(run_counting(&out, Some(StatusCode::Http(500))).await.1, 1);
        assert_eq!(
            run_counting(&out, None).await.1,
            3,
            "no status: always retried"
        );
    }

    #[tokio::test]
    async fn no_resiliency_means_no_retry() {
        let r = Resiliency::default();
        assert_eq!(
            run_counting(&r.component_policy("ps", Direction::Inbound), None)
                .await
                .1,
            1
        );
    }

    #[test]
    fn bad_documents_are_reported() {
        let (_, errs) = load("apiVersion: dapr.io/v1alpha1\nkind: Resiliency\nmetadata: {name: r}\nspec:\n  policies:\n    retries:\n      bad: {policy: sometimes}\n      codes: {matching: {httpStatusCodes: \"700\"}}\n  targets:\n    components:\n      ps: {inbound: {retry: missing}}\n");
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 3, "{text:#?}");
        assert!(text.iter().any(|t| t.contains("sometimes")));
        assert!(text.iter().any(|t| t.contains("700")));
        assert!(text
            .iter()
            .any(|t| t.contains("no policy named \"missing\"")));
    }

    #[test]
    fn code_ranges() {
        assert_eq!(
            parse_code_ranges("f", "500,502-504", (100, 599)).unwrap(),
            vec![(500, 500), (502, 504)]
        );
        assert!(parse_code_ranges("f", "5-3", (0, 16)).is_err());
    }
}
