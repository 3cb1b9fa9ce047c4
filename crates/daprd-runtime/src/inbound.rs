//! Broker → app: the subscriptions model, how subscriptions start and stop, and the
//! delivery of each message to the app.
//!
//! * [`subscriptions`]: declarative and programmatic subscriptions (the model);
//!   [`routing`]: CEL routing rules.
//! * [`channel`]: how the sidecar reaches the app (HTTP or gRPC) and the bulk wire format.
//! * [`delivery`]: one message, from the component to the app and back to an ack, a nack or
//!   a dead-letter publish; [`bulk`]: bulk subscribe batching.
//! * [`subscriber`]: starts, tracks and stops the subscriptions ([`subscriber::Subscriptions`]);
//!   [`streaming`]: streaming subscriptions over gRPC; [`health`]: app health checks.

pub mod bulk;
pub mod channel;
pub mod delivery;
pub mod health;
pub mod routing;
pub mod streaming;
pub mod subscriber;
pub mod subscriptions;
