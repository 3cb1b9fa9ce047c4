//! A private Azurite (Microsoft's Azure Storage emulator, npm package `azurite`) Blob service
//! for a test: its own port and data directory, stopped when dropped. `scripts/services.sh`
//! installs Azurite into `.azurite/` at the repository's root; `AZURITE_BLOB` names another
//! `azurite-blob` command.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, ScratchDir};

/// Azurite's well-known development account.
pub const ACCOUNT: &str = "devstoreaccount1";
/// Its key.
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A running Azurite Blob service.
pub struct Azurite {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Child,
    _dir: ScratchDir,
}

impl Azurite {
    /// Starts one and waits until it answers.
    ///
    /// # Panics
    /// Azurite is not installed, or does not listen within 30 s.
    pub async fn start() -> Self {
        let command = std::env::var("AZURITE_BLOB").map_or_else(
            |_| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../../.azurite/node_modules/.bin/azurite-blob")
            },
            PathBuf::from,
        );
        assert!(
            command.exists(),
            "{} is missing: scripts/services.sh installs Azurite",
            command.display()
        );
        let dir = ScratchDir::new("azurite");
        let port = free_port();
        let child = Command::new(&command)
            .args(["--blobHost", "127.0.0.1", "--blobPort"])
            .arg(port.to_string())
            .arg("--location")
            .arg(dir.path())
            .args(["--silent", "--skipApiVersionCheck", "--loose"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", command.display()));
        let azurite = Self {
            port,
            child,
            _dir: dir,
        };
        crate::listening(port, Duration::from_secs(30)).await;
        azurite
    }

    /// A storage connection string for its development account.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint=http://127.0.0.1:{}/{ACCOUNT};",
            self.port
        )
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
