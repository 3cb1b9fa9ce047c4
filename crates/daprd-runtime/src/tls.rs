//! gRPC over rustls: daprd-core's channel, re-exported where the runtime's callers find it.

pub use daprd_core::tls::{grpc_channel, TlsChannelError};
