//! Test helpers for daprd-rs: polling with a deadline (never sleeping to synchronise),
//! free loopback ports, scratch directories for resources, and the component
//! [`conformance`] suite every pub/sub component must pass.

#[cfg(feature = "azurite")]
pub mod azurite;
pub mod certs;
pub mod conformance;
#[cfg(feature = "controlplane")]
pub mod controlplane;
#[cfg(feature = "gcp")]
pub mod gcp;
#[cfg(any(feature = "tokens", feature = "servicebus"))]
pub mod http1;
#[cfg(feature = "pulsar")]
pub mod pulsar;
pub mod rabbitmq;
#[cfg(feature = "servicebus")]
pub mod servicebus;
#[cfg(feature = "tokens")]
pub mod tokens;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The value of the command-line flag `name` (`--port 5`), if given.
///
/// # Errors
/// The flag without a value, or a value that does not parse.
#[cfg(any(feature = "pulsar", feature = "servicebus"))]
pub fn flag<T: std::str::FromStr>(name: &str) -> Result<Option<T>, String> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => {
            let v = args
                .get(i + 1)
                .ok_or_else(|| format!("{name} needs a value"))?;
            v.parse()
                .map(Some)
                .map_err(|_| format!("{name} {v:?} is not valid"))
        }
    }
}

/// The command loop of a test broker process (`pulsar-testbroker`, `servicebus-testbroker`):
/// reads commands from its input, one per line, until the input closes or SIGTERM comes;
/// `drop_connections` calls `drop_connections`.
///
/// # Errors
/// SIGTERM cannot be listened for.
#[cfg(any(feature = "pulsar", feature = "servicebus"))]
pub async fn broker_commands(name: &str, drop_connections: impl Fn()) -> std::io::Result<()> {
    use std::io::BufRead;
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            line = lines.recv() => match line.as_deref().map(str::trim) {
                None => break,
                Some("drop_connections") => drop_connections(),
                Some("") => {}
                Some(other) => eprintln!("{name}: unknown command {other:?}"),
            },
            _ = term.recv() => break,
        }
    }
    Ok(())
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to `timeout` until something accepts TCP connections on 127.0.0.1:`port`.
pub async fn listening(port: u16, timeout: Duration) {
    eventually(
        timeout,
        &format!("a listener on 127.0.0.1:{port}"),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a server a test starts.
///
/// It lies below the kernel's range of local ports for outgoing connections: a poller
/// connecting to a port nobody listens on yet could otherwise be given that very port as its
/// own and connect to itself (a TCP simultaneous open), and the server could not bind it.
pub fn free_port() -> u16 {
    let (low, high) = server_ports();
    for _ in 0..1000 {
        let offset = uuid::Uuid::new_v4().as_u128() % u128::from(high - low);
        let port = low + u16::try_from(offset).unwrap_or(0);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {low}..{high}");
}

/// Ports for test servers: the 12,000 below the kernel's first ephemeral port.
fn server_ports() -> (u16, u16) {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = ephemeral.max(2048);
    (high.saturating_sub(12_000).max(1024), high)
}

/// A directory removed on drop.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// A new empty directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let path =
            std::env::temp_dir().join(format!("daprd-rs-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("creating scratch dir");
        Self { path }
    }

    /// Writes `name` with `contents` and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, contents).expect("writing scratch file");
        p
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The in-memory component manifest named `name`, with extra metadata items.
pub fn in_memory_component(name: &str, extra_metadata: &[(&str, &str)]) -> String {
    let mut doc = format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: pubsub.in-memory\n  version: v1\n  metadata:"
    );
    doc.push_str(if extra_metadata.is_empty() {
        " []\n"
    } else {
        "\n"
    });
    for (k, v) in extra_metadata {
        doc.push_str(&format!("  - name: {k}\n    value: \"{v}\"\n"));
    }
    doc
}

/// The address of a broker the tests need: `env_var` when set, else `default` (a URL or
/// `host:port`). When nothing answers there, the test fails with one line naming the broker
/// and how to start it, instead of a connection error deep inside a component.
pub fn broker_address(env_var: &str, default: &str, broker: &str) -> String {
    let value = std::env::var(env_var).unwrap_or_else(|_| default.to_string());
    let authority = value
        .split_once("://")
        .map_or(value.as_str(), |(_, rest)| rest);
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let first = authority
        .split([',', '/'])
        .next()
        .unwrap_or(authority)
        .to_string();
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(first.as_str())
        .map(|addrs| {
            addrs
                .into_iter()
                .any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
        })
        .unwrap_or(false);
    assert!(
        reachable,
        "{broker} is not reachable at {first} ({env_var}): start the test brokers with `bash scripts/services.sh`"
    );
    value
}
