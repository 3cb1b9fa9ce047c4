//! Kubernetes mode: the sidecar's identity from the control plane's Sentry ([`identity`],
//! checked by SPIFFE id, [`spiffe`]).

pub mod identity;
pub mod spiffe;
