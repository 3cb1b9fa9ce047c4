//! The Dapr APIs: HTTP ([`http`], axum) and gRPC ([`grpc`], tonic), and the metadata
//! document both serve ([`metadata`]).

pub mod grpc;
pub mod http;
pub mod metadata;
