//! The `dapr_http_server_*` series of every HTTP API request, recorded by a tower layer: the
//! request's own future is wrapped, with no boxed future, no cloned service and no `Next`
//! per request (axum's `from_fn` middleware costs those).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use axum::extract::Request;
use axum::http::{Method, Uri};
use axum::response::Response;

use crate::error::AnsweredCode;
use crate::metrics::Metrics;

/// Marks the router's own 404 (no route): its path is left out of the metrics' `path` label,
/// so requests for made-up paths cannot add series without bound.
#[derive(Clone, Copy)]
pub struct Unrouted;

/// Wraps the API's routes in [`RecordMetrics`].
#[derive(Clone)]
pub struct RecordMetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for RecordMetricsLayer {
    type Service = RecordMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RecordMetrics {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// Counts each request: method, path (as `spec.metric.http` shapes it), status, sizes,
/// latency, and the Dapr error code an error answer carries.
#[derive(Clone)]
pub struct RecordMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> tower::Service<Request> for RecordMetrics<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Recording<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let method = req.method().clone();
        // A `Uri` clone shares its bytes: no copy of the path.
        let uri = req.uri().clone();
        // hyper's body knows its `Content-Length` (no header lookup and parse)
        let request_bytes = axum::body::HttpBody::size_hint(req.body())
            .exact()
            .or_else(|| content_length(req.headers()))
            .unwrap_or(0);
        Recording {
            inner: self.inner.call(req),
            done: Some(Done {
                metrics: self.metrics.clone(),
                method,
                uri,
                request_bytes,
                started: Instant::now(),
            }),
        }
    }
}

/// What is recorded once the response is there.
struct Done {
    metrics: Arc<Metrics>,
    method: Method,
    uri: Uri,
    request_bytes: u64,
    started: Instant,
}

pin_project_lite::pin_project! {
    /// The request's future, recording its response.
    pub struct Recording<F> {
        #[pin]
        inner: F,
        done: Option<Done>,
    }
}

impl<F, E> Future for Recording<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = ready!(this.inner.poll(cx));
        if let (Ok(resp), Some(d)) = (&out, this.done.take()) {
            d.record(resp);
        }
        Poll::Ready(out)
    }
}

impl Done {
    fn record(self, resp: &Response) {
        let response_bytes = axum::body::HttpBody::size_hint(resp.body())
            .exact()
            .or_else(|| content_length(resp.headers()))
            .unwrap_or(0);
        let path = if resp.extensions().get::<Unrouted>().is_some() {
            ""
        } else {
            self.uri.path()
        };
        if let Some(c) = resp.extensions().get::<AnsweredCode>() {
            self.metrics.error_code(c.category, c.code);
        }
        self.metrics.http_request(
            self.method.as_str(),
            path,
            resp.status().as_str(),
            self.request_bytes,
            response_bytes,
            self.started.elapsed(),
        );
    }
}

/// The `Content-Length` header's value.
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
