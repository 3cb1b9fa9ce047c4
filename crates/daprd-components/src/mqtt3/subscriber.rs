//! The MQTT inbound side: the routes of the live subscriptions, and messages no subscription wants
//! yet, parked unacknowledged for a while (a persistent session replays right after CONNACK,
//! before the runtime subscribes).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

/// `$share/<group>/<filter>` → `<filter>` (the broker delivers with the real topic).
pub(super) fn strip_share(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/').map(|(_, f)| f))
        .unwrap_or(filter)
}

pub(super) struct Route {
    pub(super) id: u64,
    pub(super) filter: String,
    pub(super) qos: u8,
    pub(super) queue: mpsc::UnboundedSender<rumqttc::Publish>,
}

/// How long a message that matches no subscription waits for one before it is acknowledged
/// without delivery (so an abandoned filter of a persistent session cannot hold the broker's
/// in-flight window forever).
pub(super) const PARK_TTL: Duration = Duration::from_secs(60);
/// Most messages parked at once; beyond that the oldest is forgotten unacknowledged (the
/// broker sends it again on the next session).
pub(super) const PARK_MAX: usize = 10_000;

/// Where incoming messages go: the subscriptions' queues, and the messages that matched none.
#[derive(Default)]
pub(super) struct Inbound {
    pub(super) routes: Vec<Route>,
    pub(super) parked: std::collections::VecDeque<(std::time::Instant, rumqttc::Publish)>,
}

impl Inbound {
    pub(super) fn park(&mut self, p: rumqttc::Publish) {
        if self.parked.len() >= PARK_MAX {
            self.parked.pop_front();
        }
        self.parked.push_back((std::time::Instant::now(), p));
    }

    /// Takes the parked messages older than [`PARK_TTL`].
    pub(super) fn expired(&mut self, now: std::time::Instant) -> Vec<rumqttc::Publish> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.parked.front() {
            if now.duration_since(*at) < PARK_TTL {
                break;
            }
            if let Some((_, p)) = self.parked.pop_front() {
                out.push(p);
            }
        }
        out
    }

    /// Adds `route` and hands it the parked messages it matches.
    pub(super) fn add(&mut self, route: Route) {
        let filter = strip_share(&route.filter).to_string();
        let parked = std::mem::take(&mut self.parked);
        for (at, p) in parked {
            if rumqttc::matches(&p.topic, &filter) {
                let _ = route.queue.send(p);
            } else {
                self.parked.push_back((at, p));
            }
        }
        self.routes.push(route);
    }
}

pub(super) type Routes = Arc<Mutex<Inbound>>;

/// A process-unique id for a subscription's route.
pub(super) fn next_route_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
