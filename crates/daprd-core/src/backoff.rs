//! The pause between attempts that keep failing (a reconnect, a message the app did not
//! accept): it doubles from a first pause up to a ceiling.

use std::time::Duration;

/// A doubling pause: `first`, then twice the previous one, never more than `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

/// The components' default: 100 ms doubling to 5 s.
pub const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// Reconnecting to a broker: 50 ms doubling to 500 ms, so a broker that comes back is in use
/// again within a second (an attempt against a closed local port costs next to nothing).
pub const RECONNECT: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));

impl Backoff {
    /// Starts at `first`, doubling up to `max`.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            next: first,
        }
    }

    /// The pause to wait now; the one after it is twice as long (up to the ceiling).
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (pause * 2).min(self.max);
        pause
    }

    /// Back to the first pause (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The pause after `failures` consecutive failures (0 → the first pause), for a count kept
    /// elsewhere (shared by concurrent deliveries).
    pub fn after(&self, failures: u32) -> Duration {
        self.first
            .saturating_mul(1u32 << failures.min(16))
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let pauses: Vec<u128> = (0..5).map(|_| b.next_pause().as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_pause(), Duration::from_millis(100));
        assert_eq!(b.after(0), Duration::from_millis(100));
        assert_eq!(b.after(2), Duration::from_millis(400));
        assert_eq!(b.after(u32::MAX), Duration::from_millis(500));
    }
}
