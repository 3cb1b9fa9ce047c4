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
