//! Throwaway TLS material for broker tests, made with the `openssl` command: a CA, a server
//! certificate for `localhost` / `127.0.0.1` and a client certificate, all signed by the CA.

use std::path::PathBuf;
use std::process::Command;

use crate::ScratchDir;

/// Files (for the brokers' command lines) and PEM text (for component metadata).
pub struct TestCerts {
    /// Holds the files.
    pub dir: ScratchDir,
    pub ca_file: PathBuf,
    pub server_cert_file: PathBuf,
    pub server_key_file: PathBuf,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    pub ca_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

fn openssl(dir: &ScratchDir, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir.path())
        .output()
        .expect("the openssl command runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn signed(dir: &ScratchDir, name: &str, subject: &str, ext: &str) {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let crt = format!("{name}.crt");
    let ext_file = format!("{name}.ext");
    dir.write(&ext_file, ext);
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext_file,
            "-out",
            &crt,
        ],
    );
}

impl TestCerts {
    /// Generates a fresh set.
    pub fn generate() -> Self {
        let dir = ScratchDir::new("certs");
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=daprd-rs test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
        );
        signed(
            &dir,
            "server",
            "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        signed(
            &dir,
            "client",
            "/CN=daprd-rs-test-client",
            "extendedKeyUsage=clientAuth\n",
        );
        // Brokers started as root may drop to their own user (mosquitto does): let them read
        // the throwaway server key.
        for name in ["server.key", "server.crt", "ca.crt"] {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(
                dir.path().join(name),
                std::fs::Permissions::from_mode(0o644),
            );
        }
        let read = |name: &str| {
            std::fs::read_to_string(dir.path().join(name)).expect("reading generated PEM")
        };
        Self {
            ca_file: dir.path().join("ca.crt"),
            server_cert_file: dir.path().join("server.crt"),
            server_key_file: dir.path().join("server.key"),
            client_cert_file: dir.path().join("client.crt"),
            client_key_file: dir.path().join("client.key"),
            ca_pem: read("ca.crt"),
            client_cert_pem: read("client.crt"),
            client_key_pem: read("client.key"),
            dir,
        }
    }
}
