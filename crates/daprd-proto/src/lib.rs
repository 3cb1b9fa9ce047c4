//! Code generated from the `.proto` files under `proto/`: the Dapr API service
//! (`dapr.proto.runtime.v1.Dapr`) that daprd-rs serves, the app-side services
//! (`AppCallback`, ...) it calls, and the control plane's Sentry and operator services it
//! calls in Kubernetes mode. Names and field numbers follow Dapr's wire contract.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// `dapr.proto.common.v1`.
pub mod common {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("dapr.proto.common.v1");
    }
}

/// `dapr.proto.runtime.v1`.
pub mod runtime {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("dapr.proto.runtime.v1");
    }
}

/// `dapr.proto.sentry.v1`: the control plane's certificate authority.
pub mod sentry {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("dapr.proto.sentry.v1");
    }
}

/// `dapr.proto.operator.v1`: the control plane's resource service.
pub mod operator {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("dapr.proto.operator.v1");
    }
}
