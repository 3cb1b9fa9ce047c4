//! What ends a consume loop: its subscription's cancellation or its component's close,
//! whichever comes first. One type for the loops of every component, so each waits, pauses
//! and gives a stop precedence the same way.

use std::future::Future;
use std::time::Duration;

use daprd_core::pubsub::{DrainGuard, Subscription};
use tokio::sync::watch;

/// What a consume loop and its [`Subscription`] share: the loop's [`Stop`] (the subscription's
/// cancellation, or `closed`: the component's close), the guard the loop and each delivery
/// hold until they settled what they took, and the subscription, whose stop sets the
/// cancellation and waits for those guards.
pub(crate) fn subscription(closed: watch::Receiver<bool>) -> (Stop, DrainGuard, Subscription) {
    let (cancel, cancelled) = watch::channel(false);
    let (guard, drained) = daprd_core::pubsub::drain_tracker();
    let subscription = Subscription::new(move || {
        let _ = cancel.send(true);
    })
    .with_drain(drained);
    (Stop::new(cancelled, closed), guard, subscription)
}

/// A subscription's cancellation and its component's close, seen together. A dropped sender
/// counts as set: nothing is left to consume for.
#[derive(Clone, Debug)]
pub(crate) struct Stop {
    cancelled: watch::Receiver<bool>,
    closed: watch::Receiver<bool>,
    /// A narrower stop of one part of the loop (an Event Hubs partition the instance gives
    /// up), if any.
    part: Option<watch::Receiver<bool>>,
}

impl Stop {
    pub(crate) fn new(cancelled: watch::Receiver<bool>, closed: watch::Receiver<bool>) -> Self {
        Self {
            cancelled,
            closed,
            part: None,
        }
    }

    /// This stop, or `part`'s (a dropped sender counts as set here too).
    #[cfg_attr(not(feature = "eventhubs"), allow(dead_code))]
    pub(crate) fn or_part(&self, part: watch::Receiver<bool>) -> Self {
        Self {
            part: Some(part),
            ..self.clone()
        }
    }

    /// Whether either is set now (or its sender is gone): checked right before a handler
    /// call, so a delivery does not start after the stop was signalled, however late the
    /// task that waits for it runs.
    #[cfg_attr(not(any(feature = "kafka", feature = "gcp")), allow(dead_code))]
    pub(crate) fn is_set(&self) -> bool {
        let set = |rx: &watch::Receiver<bool>| *rx.borrow() || rx.has_changed().is_err();
        set(&self.cancelled) || set(&self.closed) || self.part.as_ref().is_some_and(set)
    }

    /// Resolves once either is set.
    pub(crate) async fn wait(&mut self) {
        let Self {
            cancelled,
            closed,
            part,
        } = self;
        let part = async {
            match part.as_mut() {
                Some(p) => {
                    let _ = p.wait_for(|c| *c).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancelled.wait_for(|c| *c) => {}
            _ = closed.wait_for(|c| *c) => {}
            () = part => {}
        }
    }

    /// `next`'s output, or `None` when a stop comes first. A stop that is already set wins
    /// over a `next` that is ready, so no delivery starts after it.
    pub(crate) async fn or<F: Future>(&mut self, next: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            () = self.wait() => None,
            v = next => Some(v),
        }
    }

    /// Sleeps `pause`, cut short by a stop; `true` when it was the stop.
    pub(crate) async fn sleep(&mut self, pause: Duration) -> bool {
        self.or(tokio::time::sleep(pause)).await.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stop_wins_and_cuts_a_pause_short() {
        let (cancel, cancelled) = watch::channel(false);
        let (_close, closed) = watch::channel(false);
        let mut stop = Stop::new(cancelled, closed);
        assert!(!stop.is_set());
        assert_eq!(stop.or(async { 7 }).await, Some(7));
        assert!(!stop.sleep(Duration::from_millis(10)).await);
        let _ = cancel.send(true);
        assert!(stop.is_set(), "set as soon as it is sent");
        assert_eq!(
            stop.or(async { 7 }).await,
            None,
            "a set stop wins over a ready value"
        );
        assert!(stop.sleep(Duration::from_secs(3600)).await);
    }

    #[tokio::test]
    async fn a_closed_component_stops_too() {
        let (_cancel, cancelled) = watch::channel(false);
        let (close, closed) = watch::channel(false);
        let mut stop = Stop::new(cancelled, closed);
        drop(close);
        assert!(stop.is_set(), "a dropped sender counts as set");
        assert_eq!(stop.or(std::future::pending::<()>()).await, None);
    }
}
