//! A private RabbitMQ node for a test: Debian's `rabbitmq-server` with its own node name,
//! port, database, logs and enabled-plugins file in a scratch directory, so a test can enable
//! a plugin (the AMQP 1.0 one) without touching the machine's shared broker. Killed (with its
//! process group) and its directory removed on drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running private node.
pub struct Node {
    /// The node's client port on 127.0.0.1 (AMQP 0-9-1, and AMQP 1.0 with its plugin).
    pub port: u16,
    dir: crate::ScratchDir,
    child: Child,
}

impl Node {
    /// Starts a node with `plugins` enabled (e.g. `["rabbitmq_amqp1_0"]`) and waits until it
    /// listens (a minute at most: a node boots in seconds, slower on a loaded machine).
    ///
    /// # Panics
    /// Its directory cannot be made, `rabbitmq-server` cannot be run, or it does not listen
    /// in time.
    pub async fn start(plugins: &[&str]) -> Self {
        let port = crate::free_port();
        let dir = crate::ScratchDir::new("rabbitmq");
        dir.write("enabled_plugins", &format!("[{}].", plugins.join(",")));
        dir.write("rabbitmq.conf", "");
        dir.write("env.conf", "ERL_EPMD_ADDRESS=127.0.0.1\n");
        // the Debian script drops to the rabbitmq user: its files must be its to write
        let open_up = || -> std::io::Result<()> {
            use std::os::unix::fs::PermissionsExt;
            let everyone = || std::fs::Permissions::from_mode(0o777);
            for sub in ["mnesia", "log"] {
                std::fs::create_dir_all(dir.path().join(sub))?;
            }
            for entry in std::fs::read_dir(dir.path())? {
                std::fs::set_permissions(entry?.path(), everyone())?;
            }
            std::fs::set_permissions(dir.path(), everyone())
        };
        if let Err(e) = open_up() {
            panic!(
                "preparing the rabbitmq node's directory {}: {e}",
                dir.path().display()
            );
        }
        let path = |name: &str| dir.path().join(name).display().to_string();
        let mut command = Command::new("rabbitmq-server");
        command
            .env("RABBITMQ_CONF_ENV_FILE", path("env.conf"))
            .env("RABBITMQ_NODENAME", format!("daprd{port}@localhost"))
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", crate::free_port().to_string())
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
            .env("RABBITMQ_PID_FILE", path("pid"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", path("feature_flags"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // a process group of its own, so the node and its helpers go together
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = match command.spawn() {
            Ok(c) => c,
            Err(e) => panic!("running rabbitmq-server: {e}"),
        };
        let node = Self { port, dir, child };
        crate::eventually(
            Duration::from_secs(60),
            "the private rabbitmq node to listen",
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(drop)
            },
        )
        .await;
        node
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The node runs as the rabbitmq user in a process group of its own: it wrote its
        // process id.
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("pid")) {
            if let Some(group) = group_of(pid.trim()) {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{group}")])
                    .status();
            }
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
        // the directory goes with `dir`, after the node
    }
}

/// The process group of process `pid` (`ps -o pgid=`).
fn group_of(pid: &str) -> Option<String> {
    Command::new("ps")
        .args(["-o", "pgid=", "-p", pid])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}
