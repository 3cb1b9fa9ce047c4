//! daprd-rs's runtime: everything between the command line and the components.
//!
//! * [`config`]: flags, environment and resources directories → validated configuration.
//! * [`components`]: builds components through the registry into the component store.
//! * [`scoping`]: topic scoping rules.
//! * [`publish`]: the publish pipeline shared by both APIs; [`error`]: Dapr's error table.
//! * [`api`]: the HTTP (axum) and gRPC (tonic) Dapr APIs.
//! * [`serve`]: start-up, listeners and the shutdown sequence.
//!
//! The `daprd` binary is a thin `main` over [`serve`].

pub mod api;
pub mod bulk;
pub mod channel;
pub mod components;
pub mod config;
pub mod delivery;
pub mod error;
pub mod health;
pub mod publish;
pub mod resiliency;
pub mod routing;
pub mod runtime;
pub mod scoping;
pub mod serve;
pub mod streaming;
pub mod subscriber;
pub mod subscriptions;
pub mod tls;
pub mod trace;
