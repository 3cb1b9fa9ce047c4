//! The Dapr gRPC API (`dapr.proto.runtime.v1.Dapr`, tonic). Methods other than the ones
//! implemented here answer `UNIMPLEMENTED` (tonic does so for any method not in our proto).

use std::collections::BTreeMap;
use std::sync::Arc;

use daprd_proto::runtime::v1 as pb;
use daprd_proto::runtime::v1::dapr_server::{Dapr, DaprServer};
use tonic::{Request, Response, Status};

use crate::api::ApiState;
use crate::outbound::publish::{BulkInput, BulkInputEntry, PublishInput, TraceHeaders, Transport};

/// The `Dapr` service implementation.
#[derive(Clone)]
pub struct DaprApi {
    state: Arc<ApiState>,
}

fn trace_headers<T>(req: &Request<T>) -> TraceHeaders {
    TraceHeaders::read(|k| {
        req.metadata()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    })
}

fn to_btree(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

#[tonic::async_trait]
impl Dapr for DaprApi {
    async fn publish_event(
        &self,
        request: Request<pb::PublishEventRequest>,
    ) -> Result<Response<()>, Status> {
        let trace = trace_headers(&request);
        let r = request.into_inner();
        let received = self.size(&r);
        let input = PublishInput {
            pubsub: r.pubsub_name,
            topic: r.topic,
            data: r.data.into(),
            content_type: r.data_content_type,
            metadata: to_btree(r.metadata),
            trace,
            transport: Transport::Grpc,
        };
        let published = self.state.publisher.publish(input).await;
        self.sizes(PUBLISH_EVENT, received, 0);
        let traceparent = published.map_err(|e| self.fail(&e))?;
        let mut resp = Response::new(());
        if let Ok(v) = traceparent.parse() {
            resp.metadata_mut().insert("traceparent", v);
        }
        Ok(resp)
    }

    async fn bulk_publish_event_alpha1(
        &self,
        request: Request<pb::BulkPublishRequest>,
    ) -> Result<Response<pb::BulkPublishResponse>, Status> {
        self.bulk(BULK_PUBLISH_ALPHA1, request).await
    }

    async fn bulk_publish_event(
        &self,
        request: Request<pb::BulkPublishRequest>,
    ) -> Result<Response<pb::BulkPublishResponse>, Status> {
        self.bulk(BULK_PUBLISH, request).await
    }

    type SubscribeTopicEventsAlpha1Stream = crate::inbound::streaming::EventStream;

    async fn subscribe_topic_events_alpha1(
        &self,
        request: Request<tonic::Streaming<pb::SubscribeTopicEventsRequestAlpha1>>,
    ) -> Result<Response<Self::SubscribeTopicEventsAlpha1Stream>, Status> {
        let stream = crate::inbound::streaming::subscribe(
            self.state.runtime.clone(),
            self.state.subscriptions.clone(),
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(stream))
    }

    async fn get_metadata(
        &self,
        request: Request<pb::GetMetadataRequest>,
    ) -> Result<Response<pb::GetMetadataResponse>, Status> {
        let md = super::metadata::get_metadata(&self.state);
        self.sizes(GET_METADATA, self.size(request.get_ref()), self.size(&md));
        Ok(Response::new(md))
    }

    async fn set_metadata(
        &self,
        request: Request<pb::SetMetadataRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        self.sizes(SET_METADATA, self.size(&r), 0);
        self.state
            .extended
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(r.key, r.value);
        Ok(Response::new(()))
    }

    async fn shutdown(
        &self,
        request: Request<pb::ShutdownRequest>,
    ) -> Result<Response<()>, Status> {
        let force = request
            .metadata()
            .get("dapr-force-shutdown")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        self.state.request_shutdown(force);
        Ok(Response::new(()))
    }
}

const PUBLISH_EVENT: &str = "/dapr.proto.runtime.v1.Dapr/PublishEvent";
const BULK_PUBLISH: &str = "/dapr.proto.runtime.v1.Dapr/BulkPublishEvent";
const BULK_PUBLISH_ALPHA1: &str = "/dapr.proto.runtime.v1.Dapr/BulkPublishEventAlpha1";
const GET_METADATA: &str = "/dapr.proto.runtime.v1.Dapr/GetMetadata";
const SET_METADATA: &str = "/dapr.proto.runtime.v1.Dapr/SetMetadata";

impl DaprApi {
    /// The encoded size of `m` when metrics record it (else 0: nothing is measured on the
    /// publish path for nothing).
    fn size(&self, m: &impl prost::Message) -> usize {
        if self.state.metrics.enabled() {
            m.encoded_len()
        } else {
            0
        }
    }

    /// Counts a unary call's message sizes (`dapr_grpc_io_server_*_bytes_per_rpc`).
    fn sizes(&self, method: &str, received: usize, sent: usize) {
        self.state.metrics.grpc_bytes(method, received, sent);
    }

    /// The status answering `e`, counted in `dapr_error_code_total`.
    fn fail(&self, e: &crate::error::ApiError) -> Status {
        e.count_in(&self.state.metrics);
        e.to_status()
    }

    async fn bulk(
        &self,
        method: &str,
        request: Request<pb::BulkPublishRequest>,
    ) -> Result<Response<pb::BulkPublishResponse>, Status> {
        let trace = trace_headers(&request);
        let r = request.into_inner();
        let received = self.size(&r);
        let input = BulkInput {
            pubsub: r.pubsub_name,
            topic: r.topic,
            entries: r
                .entries
                .into_iter()
                .map(|e| BulkInputEntry {
                    entry_id: e.entry_id,
                    event: e.event.into(),
                    content_type: e.content_type,
                    // proto3 cannot tell an empty map from an absent one: like daprd, an
                    // entry with no metadata does not inherit the request's.
                    metadata: (!e.metadata.is_empty()).then(|| to_btree(e.metadata)),
                })
                .collect(),
            metadata: to_btree(r.metadata),
            trace,
            transport: Transport::Grpc,
        };
        let published = self.state.publisher.bulk_publish(input).await;
        if published.is_err() {
            self.sizes(method, received, 0);
        }
        let outcome = published.map_err(|e| self.fail(&e))?;
        if let Some(e) = &outcome.error {
            e.count_in(&self.state.metrics);
        }
        // Unlike Go daprd (which fails the call and loses them), failed entries are returned.
        let resp = pb::BulkPublishResponse {
            failed_entries: outcome
                .failed
                .into_iter()
                .map(|f| pb::BulkPublishResponseFailedEntry {
                    entry_id: f.entry_id,
                    error: f.error,
                })
                .collect(),
        };
        self.sizes(method, received, self.size(&resp));
        Ok(Response::new(resp))
    }
}

/// `Unauthenticated` as daprd answers a missing or wrong `dapr-api-token`.
fn unauthenticated(detail: &str) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let mut d = ErrorDetails::new();
    d.set_error_info(
        "Unauthorized",
        "dapr.io",
        [
            ("http.code".to_string(), "401".to_string()),
            ("http.error_message".to_string(), detail.to_string()),
        ]
        .into_iter()
        .collect::<std::collections::HashMap<_, _>>(),
    );
    Status::with_error_details(tonic::Code::Unauthenticated, "Unauthorized", d)
}

/// Checks `dapr-api-token` on every call when `DAPR_API_TOKEN` is set.
#[derive(Clone)]
pub struct TokenCheck {
    token: Option<Arc<str>>,
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(req);
        };
        match req
            .metadata()
            .get("dapr-api-token")
            .map(|v| v.to_str().unwrap_or(""))
        {
            None => Err(unauthenticated("missing api token in request metadata")),
            Some(t) if t == &**token => {
                req.metadata_mut().remove("dapr-api-token");
                Ok(req)
            }
            Some(_) => Err(unauthenticated("authentication error: api token mismatch")),
        }
    }
}

/// The `Dapr` gRPC service with the API lists, API-token checking and the body-size limit
/// applied.
pub type DaprService = GrpcGoStatus<
    tonic::service::interceptor::InterceptedService<
        ApiLog<AccessCheck<DaprServer<DaprApi>>>,
        TokenCheck,
    >,
>;

/// The `Dapr` gRPC service with the API lists, API-token checking and the body-size limit
/// applied.
pub fn service(state: Arc<ApiState>) -> DaprService {
    let limit = state.config.max_body_size;
    let token = state.config.env.api_token.as_deref().map(Arc::from);
    let access = state.api_access.grpc();
    let logging = state.api_logging.is_some();
    let metrics = state.metrics.enabled().then(|| state.metrics.clone());
    let server = DaprServer::new(DaprApi { state })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    GrpcGoStatus(tonic::service::interceptor::InterceptedService::new(
        ApiLog {
            inner: AccessCheck {
                inner: server,
                access: access.restricts().then(|| Arc::new(access)),
            },
            on: logging,
            metrics,
        },
        TokenCheck { token },
    ))
}

/// Logs each API call at info level ("gRPC API Called"), as Go daprd's API logging: the
/// method, the status the response starts with (an error answered in the trailers of a
/// stream that had begun is not seen), the duration and the user agent; and counts it in
/// the `dapr_grpc_io_server_*` series.
#[derive(Clone)]
pub struct ApiLog<S> {
    inner: S,
    on: bool,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for ApiLog<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for ApiLog<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        futures::future::BoxFuture<'static, Result<http::Response<tonic::body::Body>, S::Error>>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !self.on && self.metrics.is_none() {
            return futures::future::Either::Left(self.inner.call(req));
        }
        let on = self.on;
        let metrics = self.metrics.clone();
        let method = req.uri().path().to_string();
        let useragent = super::user_agent(req.headers());
        let started = std::time::Instant::now();
        let call = self.inner.call(req);
        futures::future::Either::Right(Box::pin(async move {
            let resp = call.await?;
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map_or(tonic::Code::Ok, tonic::Code::from);
            if let Some(m) = &metrics {
                m.grpc_call(&method, code, started.elapsed());
            }
            if !on {
                return Ok(resp);
            }
            tracing::info!(
                target: "dapr.runtime.grpc-info",
                method = %method,
                code = ?code,
                duration = started.elapsed().as_secs_f64() * 1000.0,
                useragent = %useragent,
                "gRPC API Called"
            );
            Ok(resp)
        }))
    }
}

/// Refuses the methods the Configuration's API lists do not allow, as Go daprd does:
/// `UNIMPLEMENTED`, "Not Implemented".
#[derive(Clone)]
pub struct AccessCheck<S> {
    inner: S,
    /// `None`: no gRPC rule, nothing to check.
    access: Option<Arc<crate::config::configuration::GrpcAccess>>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for AccessCheck<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for AccessCheck<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::Either<
        S::Future,
        futures::future::Ready<Result<http::Response<tonic::body::Body>, S::Error>>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match &self.access {
            Some(access) if !access.allows(req.uri().path()) => futures::future::Either::Right(
                futures::future::ready(Ok(Status::unimplemented("Not Implemented").into_http())),
            ),
            _ => futures::future::Either::Left(self.inner.call(req)),
        }
    }
}

/// Answers a request message over the receive limit as grpc-go (Go daprd) does:
/// `RESOURCE_EXHAUSTED` with "grpc: received message larger than max (N vs. M)", where
/// tonic answers `OUT_OF_RANGE`.
#[derive(Clone)]
pub struct GrpcGoStatus<S>(S);

impl<S: tonic::server::NamedService> tonic::server::NamedService for GrpcGoStatus<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcGoStatus<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = futures::future::MapOk<S::Future, fn(http::Response<RB>) -> http::Response<RB>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use futures::TryFutureExt as _;
        self.0
            .call(req)
            .map_ok(too_large_as_grpc_go as fn(http::Response<RB>) -> http::Response<RB>)
    }
}

/// Rewrites tonic's trailers-only "decoded message length too large" answer.
fn too_large_as_grpc_go<RB>(mut resp: http::Response<RB>) -> http::Response<RB> {
    const TONIC: &str = "Error, decoded message length too large: found ";
    let headers = resp.headers();
    if headers.get("grpc-status").map(|v| v.as_bytes()) != Some(b"11") {
        return resp;
    }
    let Some(message) = headers
        .get("grpc-message")
        .and_then(|m| {
            percent_encoding::percent_decode(m.as_bytes())
                .decode_utf8()
                .ok()
        })
        .filter(|m| m.starts_with(TONIC))
    else {
        return resp;
    };
    // "...found N bytes, the limit is: M bytes"
    let numbers: Vec<&str> = message[TONIC.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .filter(|n| !n.is_empty())
        .collect();
    let go = match numbers.as_slice() {
        [found, limit] => format!("grpc: received message larger than max ({found} vs. {limit})"),
        _ => "grpc: received message larger than max".to_string(),
    };
    let encoded =
        percent_encoding::utf8_percent_encode(&go, percent_encoding::NON_ALPHANUMERIC).to_string();
    let headers = resp.headers_mut();
    headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    if let Ok(v) = http::HeaderValue::from_str(&encoded) {
        headers.insert("grpc-message", v);
    }
    resp
}
