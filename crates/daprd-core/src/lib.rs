//! The contract between daprd-rs's runtime and its components, with no I/O.
//!
//! * [`pubsub`]: the [`PubSub`](pubsub::PubSub) and [`PubSubFactory`](pubsub::PubSubFactory)
//!   traits every broker component implements, the messages they carry and the
//!   [`Outcome`](pubsub::Outcome) of a delivery.
//! * [`secretstore`]: the secret-store contract used to resolve `secretKeyRef`s.
//! * [`metadata`]: component metadata with Dapr's case-insensitive, loosely typed keys.
//! * [`cloudevent`]: the CloudEvent envelope daprd wraps published data in.
//! * [`registry`]: component types keyed by name and version, with Dapr's aliases.
//! * `tls` (feature `tls`): PEM material from component metadata and rustls client configs.
//! * [`duration`], [`json`] and [`gocompat`]: Go-compatible duration parsing, JSON encoding,
//!   URL paths, query unescaping and header names.
//!
//! The runtime (`daprd-runtime`) depends on this crate; components (`daprd-components`)
//! implement it. Nothing here opens a socket or a file.

pub mod backoff;
pub mod cloudevent;
pub mod duration;
pub mod gocompat;
pub mod json;
pub mod metadata;
pub mod pubsub;
pub mod registry;
pub mod secretstore;
#[cfg(feature = "tls")]
pub mod tls;

pub use metadata::Metadata;
