//! The Dapr APIs: HTTP ([`http`], axum) and gRPC ([`grpc`], tonic), and the metadata
//! document both serve ([`metadata`]).

use std::sync::Arc;

use crate::inbound::subscriber::Subscriptions;
use crate::state::RuntimeState;

pub mod grpc;
pub mod grpc_authority;
pub mod http;
pub mod http_metrics;
pub mod metadata;

/// What the API servers work on: the runtime state and the live subscriptions (for the
/// metadata answer and for streaming subscriptions). It dereferences to the runtime state.
pub struct ApiState {
    /// The shared runtime state.
    pub runtime: Arc<RuntimeState>,
    /// The live subscriptions.
    pub subscriptions: Arc<Subscriptions>,
}

impl ApiState {
    /// The API state over `runtime` and `subscriptions`.
    pub fn new(runtime: Arc<RuntimeState>, subscriptions: Arc<Subscriptions>) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            subscriptions,
        })
    }
}

/// The request's `User-Agent` (API logging), empty when absent.
pub fn user_agent(headers: &::http::HeaderMap) -> String {
    headers
        .get(::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

impl std::ops::Deref for ApiState {
    type Target = RuntimeState;

    fn deref(&self) -> &RuntimeState {
        &self.runtime
    }
}
