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
            || (name == "gcp.yaml" && !cfg!(feature = "gcp"))
            || (name == "pulsar.yaml" && !cfg!(feature = "pulsar"))
            || (name == "servicebus.yaml" && !cfg!(feature = "servicebus"))
            || (name == "eventhubs.yaml" && !cfg!(feature = "eventhubs"))
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
    let optional = usize::from(cfg!(feature = "kafka"))
        + usize::from(cfg!(feature = "snssqs"))
        + usize::from(cfg!(feature = "gcp"))
        + usize::from(cfg!(feature = "pulsar"))
        + usize::from(cfg!(feature = "servicebus"))
        + usize::from(cfg!(feature = "eventhubs"));
    assert_eq!(
        checked,
        4 + optional,
        "one commented example per broker component"
    );
}

fn write_tmp(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("daprd-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    for (file, text) in files {
        std::fs::write(dir.join(file), text).expect("write");
    }
    dir
}

#[test]
fn validate_checks_a_configuration_and_names_every_problem() {
    let dir = write_tmp(
        "config",
        &[
            (
                "good.yaml",
                "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata: {name: appconfig}\nspec:\n  tracing: {samplingRate: \"1\"}\n  httpPipeline: {handlers: []}\n",
            ),
            (
                "bad.yaml",
                "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata: {name: broken}\nspec:\n  tracing: {samplingRate: \"fast\"}\n  metric: {enabled: perhaps}\n",
            ),
        ],
    );
    let good = daprd()
        .arg("validate")
        .arg("--config")
        .arg(dir.join("good.yaml"))
        .output()
        .expect("runs");
    let out = String::from_utf8_lossy(&good.stdout);
    let log = String::from_utf8_lossy(&good.stderr);
    assert!(good.status.success(), "{out}{log}");
    assert!(out.contains("configuration \"appconfig\" valid"), "{out}");
    // accepted, never silently ignored
    assert!(
        log.contains("spec.httpPipeline") && log.contains("no effect"),
        "{log}"
    );
    let bad = daprd()
        .arg("validate")
        .arg("--config")
        .arg(dir.join("bad.yaml"))
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&bad.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!bad.status.success());
    assert!(
        err.contains("bad.yaml")
            && err.contains("field spec.tracing.samplingRate")
            && err.contains("field spec.metric.enabled"),
        "{err}"
    );
}

#[test]
fn a_denied_component_type_is_refused_at_load() {
    let dir = write_tmp(
        "deny",
        &[
            (
                "config.yaml",
                "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata: {name: c}\nspec:\n  components: {deny: [pubsub.in-memory]}\n",
            ),
            (
                "pubsub.yaml",
                "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: ps}\nspec: {type: pubsub.in-memory, version: v1}\n",
            ),
        ],
    );
    let out = daprd()
        .args(["validate", "--app-id", "a", "--resources-path"])
        .arg(&dir)
        .arg("--config")
        .arg(dir.join("config.yaml"))
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("component \"ps\"") && err.contains("components.deny"),
        "{err}"
    );
}

#[test]
fn log_as_json_writes_daprs_shape() {
    let dir = write_tmp(
        "json-log",
        &[(
            "c.yaml",
            "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata: {name: c}\nspec:\n  httpPipeline: {handlers: []}\n",
        )],
    );
    let out = daprd()
        .args(["validate", "--app-id", "shop", "--log-as-json", "--config"])
        .arg(dir.join("c.yaml"))
        .output()
        .expect("runs");
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("httpPipeline"))
        .unwrap_or_else(|| panic!("no warning line: {err}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("one JSON object per line");
    assert_eq!(v["level"], "warning", "{line}");
    assert_eq!(v["type"], "log");
    assert_eq!(v["scope"], "dapr.runtime");
    assert_eq!(v["app_id"], "shop");
    assert!(
        v["ver"].as_str().is_some_and(|s| s.starts_with("1.18.3")),
        "{line}"
    );
    assert!(
        v["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{line}"
    );
    assert!(
        v["msg"]
            .as_str()
            .is_some_and(|m| m.contains("spec.httpPipeline")),
        "{line}"
    );
}
