//! The `daprd` binary's command-line behaviour: version, required app id, bad flags.

use std::process::Command;

fn daprd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_daprd"))
}

#[test]
fn version_prints_the_dapr_api_level() {
    for flag in ["--version", "-version"] {
        let out = daprd().arg(flag).output().expect("runs");
        assert!(out.status.success());
        let v = String::from_utf8_lossy(&out.stdout);
        assert!(v.trim().starts_with("1.18.3+daprd-rs."), "{v}");
    }
}

#[test]
fn missing_app_id_is_reported_and_fatal() {
    let out = daprd()
        .args(["--dapr-http-port", "0"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("parameter app-id cannot be empty"));
}

#[test]
fn every_flag_problem_is_reported_at_once() {
    let out = daprd()
        .args([
            "--app-id",
            "a",
            "--dapr-http-port",
            "http",
            "--app-protocol",
            "ftp",
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--dapr-http-port") && err.contains("--app-protocol"),
        "{err}"
    );
}

#[test]
fn unknown_flag_is_an_error() {
    let out = daprd()
        .args(["--app-id", "a", "--no-such-flag"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn help_lists_the_flags() {
    let out = daprd().arg("--help").output().expect("runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--app-id",
        "--resources-path",
        "--dapr-http-port",
        "--max-body-size",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}

/// Every commented broker example in `examples/resources`, uncommented, is a valid
/// component (checked without connecting, by `daprd validate`).
#[test]
fn commented_broker_examples_are_valid_when_uncommented() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/resources");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/resources") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("readable");
        if !text.starts_with("# Uncomment") {
            continue;
        }
        // optional components are checked when this build has them
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if (name == "kafka.yaml" && !cfg!(feature = "kafka"))
            || (name == "snssqs.yaml" && !cfg!(feature = "snssqs"))
        {
            continue;
        }
        let yaml: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| !l.starts_with("Uncomment") && !l.starts_with("It stays"))
            .map(|l| format!("{l}\n"))
            .collect();
        let tmp =
            std::env::temp_dir().join(format!("daprd-example-{}-{}", std::process::id(), checked));
        std::fs::create_dir_all(&tmp).expect("tmp dir");
        std::fs::write(tmp.join("c.yaml"), yaml).expect("write");
        let out = daprd()
            .args(["validate", "--app-id", "example", "--resources-path"])
            .arg(&tmp)
            .output()
            .expect("runs");
        let _ = std::fs::remove_dir_all(&tmp);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    let optional = usize::from(cfg!(feature = "kafka")) + usize::from(cfg!(feature = "snssqs"));
    assert_eq!(
        checked,
        4 + optional,
        "one commented example per broker component"
    );
}
