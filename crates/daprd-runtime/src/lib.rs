//! daprd-rs's runtime: everything between the command line and the components. The map of
//! these modules, the direction of their dependencies and the path of a message through them
//! is `docs/ARCHITECTURE.md`.
//!
//! * [`config`]: flags, environment and resource files → validated configuration.
//! * [`error`]: Dapr's error table; [`trace`]: W3C trace context.
//! * [`resiliency`]: retry, timeout and circuit-breaker policies and their targets.
//! * [`scoping`]: which app may publish or subscribe to which topic.
//! * [`tls`]: gRPC channels over rustls.
//! * [`store`]: builds components through the registry into the component store.
//! * [`state`]: what the APIs and the inbound side share (configuration, the publisher,
//!   readiness, app health, shutdown signals).
//! * [`outbound`]: publishing, app → broker.
//! * [`inbound`]: subscriptions and delivery, broker → app.
//! * [`metrics`]: Prometheus metrics with Dapr's names.
//! * [`api`]: the HTTP (axum) and gRPC (tonic) Dapr APIs.
//! * [`serve`]: start-up, listeners and the shutdown sequence.
//!
//! The `daprd` binary builds the component registry and hands it to [`serve`].

pub mod api;
pub mod config;
pub mod error;
pub mod inbound;
pub mod kubernetes;
pub mod metrics;
pub mod outbound;
pub mod reload;
pub mod resiliency;
pub mod scoping;
pub mod serve;
pub mod state;
pub mod store;
pub mod tls;
pub mod trace;
