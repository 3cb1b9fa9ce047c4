//! Whether the app accepts connections, as its channel found out.
//!
//! Once a delivery cannot connect to the app (it stopped or restarts), the deliveries that
//! follow do not each try and fail: they wait, up to [`HOLD`], for the app to listen again.
//! One prober connects to the app's port with a growing pause (100 ms to 1 s) and opens the
//! gate as soon as a connection succeeds, so the waiting deliveries go out at once. A
//! delivery that waited in vain answers `Retry` without touching the network, and the
//! broker's redelivery (or the resiliency policy) goes on as for any failed delivery.
//!
//! While a delivery waits it is in flight as a slow app's would be: every component keeps
//! such a message from being handed out again. An app that is down for a while thus costs
//! the sidecar one connection attempt a second instead of one per message per redelivery,
//! and no message goes to a dead-letter topic before it waited [`HOLD`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use daprd_core::backoff::Backoff;
use tokio::sync::watch;

use crate::state::Shutdown;

/// How long a delivery waits for an app that does not accept connections.
pub const HOLD: Duration = Duration::from_secs(10);

/// A connection attempt that takes longer counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// While the app is thought up, a suspicion is checked at most this often.
const RECHECK: Duration = Duration::from_millis(500);

/// The app's reachability, shared by a channel's deliveries (cheap to clone).
#[derive(Clone)]
pub struct Reach(Arc<Inner>);

struct Inner {
    /// `host:port` of the app.
    addr: String,
    up: watch::Sender<bool>,
    probing: AtomicBool,
    /// Milliseconds since `epoch` of the last check begun while the app was thought up.
    last_check: AtomicU64,
    epoch: Instant,
    hold: Duration,
    shutdown: Option<Shutdown>,
}

impl Reach {
    /// The app at `address:port`, thought up until a delivery cannot connect; deliveries
    /// wait at most `hold` for it, and give up at once when `shutdown` (if any) begins.
    pub fn new(address: &str, port: u16, hold: Duration, shutdown: Option<Shutdown>) -> Self {
        Self::at(
            format!("{}:{port}", super::uri_host(address)),
            hold,
            shutdown,
        )
    }

    fn at(addr: String, hold: Duration, shutdown: Option<Shutdown>) -> Self {
        Self(Arc::new(Inner {
            addr,
            up: watch::channel(true).0,
            probing: AtomicBool::new(false),
            last_check: AtomicU64::new(0),
            epoch: Instant::now(),
            hold,
            shutdown,
        }))
    }

    /// The same app, with deliveries giving up at once when `shutdown` begins.
    #[must_use]
    pub fn with_shutdown(&self, shutdown: Shutdown) -> Self {
        Self::at(self.0.addr.clone(), self.0.hold, Some(shutdown))
    }

    /// Whether the app is thought to accept connections.
    pub fn is_up(&self) -> bool {
        *self.0.up.borrow()
    }

    /// Returns at once while the app is thought up; otherwise waits for it to accept
    /// connections, at most the hold time. The error says why a delivery was not tried.
    ///
    /// # Errors
    /// The app still refused connections after the hold time, or shutdown began.
    pub async fn ready(&self) -> Result<(), String> {
        if self.is_up() {
            return Ok(());
        }
        let mut up = self.0.up.subscribe();
        let shutdown = async {
            match &self.0.shutdown {
                Some(s) => {
                    s.wait().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = up.wait_for(|up| *up) => match r {
                Ok(_) => Ok(()),
                Err(_) => Err(self.refused()),
            },
            () = tokio::time::sleep(self.0.hold) => Err(self.refused()),
            () = shutdown => Err("the sidecar is shutting down".into()),
        }
    }

    fn refused(&self) -> String {
        format!("the app at {} does not accept connections", self.0.addr)
    }

    /// A delivery failed before the app answered (a refused or failed connection): checks
    /// the app's port, and if it refuses, closes the gate until a prober gets through.
    pub fn suspect(&self) {
        let inner = &self.0;
        if self.is_up() {
            let now = u64::try_from(inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            let last = inner.last_check.load(Ordering::Relaxed);
            let recheck = u64::try_from(RECHECK.as_millis()).unwrap_or(u64::MAX);
            if last != 0 && now.saturating_sub(last) < recheck {
                return;
            }
            inner.last_check.store(now.max(1), Ordering::Relaxed);
        }
        if inner.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move { me.probe().await });
    }

    /// One connection attempt; if it fails the gate closes and the attempts go on with a
    /// growing pause until one succeeds (or shutdown begins).
    async fn probe(self) {
        let inner = &self.0;
        let mut pause = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            if self.connects().await {
                if inner.up.send_if_modified(|up| !std::mem::replace(up, true)) {
                    tracing::info!(addr = %inner.addr, "the app accepts connections again; deliveries resume");
                }
                break;
            }
            if inner.up.send_if_modified(|up| std::mem::replace(up, false)) {
                tracing::warn!(addr = %inner.addr, "the app does not accept connections; deliveries wait for it");
            }
            if inner.shutdown.as_ref().is_some_and(Shutdown::is_triggered) {
                break;
            }
            tokio::time::sleep(pause.next_pause()).await;
        }
        inner.probing.store(false, Ordering::Release);
    }

    async fn connects(&self) -> bool {
        accepts(&self.0.addr).await
    }
}

/// Whether something listens at `addr` (`host:port`): one connection attempt, closed at once.
///
/// A connection to a loopback port nobody listens on can connect to itself when the kernel
/// happens to pick that very port as its local one (a TCP simultaneous open). That is no app,
/// and it holds the port: closed normally it would stay in TIME_WAIT for a minute and the app
/// could not bind it. So a self-connection counts as refused and is reset, which frees the
/// port at once.
pub(crate) async fn accepts(addr: &str) -> bool {
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => !reset_if_self(stream),
        _ => false,
    }
}

/// Resets `stream` (no TIME_WAIT) if it is connected to itself; returns whether it was.
fn reset_if_self(stream: tokio::net::TcpStream) -> bool {
    let local = stream.local_addr().ok();
    if local.is_none() || local != stream.peer_addr().ok() {
        return false;
    }
    if let Err(error) = stream.set_zero_linger() {
        tracing::warn!(?local, %error, "cannot reset a connection to itself");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_to_itself_is_no_app_and_leaves_the_port_free() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // What a probe gets when the kernel picks the probed port as its local one.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(addr).unwrap();
        let stream = socket.connect(addr).await.expect("a simultaneous open");
        assert_eq!(stream.local_addr().unwrap(), stream.peer_addr().unwrap());
        assert!(reset_if_self(stream), "a self-connection counts as refused");
        // The app can bind its port at once (a normal close would hold it in TIME_WAIT).
        tokio::net::TcpListener::bind(addr)
            .await
            .expect("the port is free again");
        // An ordinary connection is left alone.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        assert!(!reset_if_self(other));
    }

    #[tokio::test]
    async fn a_refused_connection_closes_the_gate_until_the_app_listens_again() {
        let port = daprd_testkit::free_port();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let reach = Reach::new("127.0.0.1", port, Duration::from_millis(200), None);
        // Listening: a suspicion leaves the gate open.
        reach.suspect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(reach.is_up());
        assert_eq!(reach.ready().await, Ok(()));

        drop(listener);
        tokio::time::sleep(RECHECK).await;
        reach.suspect();
        eventually("the gate to close", || !reach.is_up()).await;
        let err = reach.ready().await.unwrap_err();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");

        // A delivery waiting when the app comes back goes out without the hold time.
        let patient = Reach::new("127.0.0.1", port, Duration::from_secs(30), None);
        patient.suspect();
        eventually("the gate to close", || !patient.is_up()).await;
        let waiting = tokio::spawn({
            let patient = patient.clone();
            async move {
                let started = Instant::now();
                (patient.ready().await, started.elapsed())
            }
        });
        let _back = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let (result, waited) = waiting.await.unwrap();
        assert_eq!(result, Ok(()));
        assert!(waited < Duration::from_secs(30), "waited {waited:?}");
        assert!(patient.is_up());
        // The first reach's prober is still at work and gets through as well.
        eventually("the gate to open", || reach.is_up()).await;
    }

    #[tokio::test]
    async fn shutdown_ends_the_wait() {
        let port = daprd_testkit::free_port();
        let shutdown = Shutdown::default();
        let reach = Reach::new("127.0.0.1", port, Duration::from_secs(60), None)
            .with_shutdown(shutdown.clone());
        reach.suspect();
        eventually("the gate to close", || !reach.is_up()).await;
        let waiting = tokio::spawn({
            let reach = reach.clone();
            async move { reach.ready().await }
        });
        shutdown.trigger(crate::state::ShutdownReason::Signal);
        let err = waiting.await.unwrap().unwrap_err();
        assert!(err.contains("shutting down"), "{err}");
    }
}
