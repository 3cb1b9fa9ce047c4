//! The `daprd` binary in Kubernetes mode against the test control plane: what waiting cannot
//! fix ends the process at once with one clear line; a Sentry that is down does not, and the
//! public port reports not ready meanwhile.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use daprd_testkit::controlplane::{OperatorState, SentryPolicy, TestCa, TestOperator, TestSentry};

fn daprd(sentry: &str, operator: &str, anchors: &str, public_port: u16) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_daprd"));
    c.args([
        "--app-id",
        "app1",
        "--mode",
        "kubernetes",
        "--dapr-http-port",
        "0",
        "--dapr-grpc-port",
        "0",
        "--dapr-listen-addresses",
        "127.0.0.1",
        "--dapr-public-port",
        &public_port.to_string(),
        "--dapr-public-listen-address",
        "127.0.0.1",
        "--enable-metrics=false",
        "--control-plane-address",
        operator,
        "--sentry-address",
        sentry,
        "--control-plane-trust-domain",
        "cluster.local",
        "--control-plane-namespace",
        "dapr-system",
    ])
    .env("NAMESPACE", "ns1")
    .env("DAPR_TRUST_ANCHORS", anchors)
    .env("DAPR_UNSAFE_SKIP_CONTAINER_UID_GID_CHECK", "true")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

/// Runs `cmd` to its end (at most 20 s); its exit success and stderr.
async fn finish(mut cmd: Command) -> (bool, String) {
    tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().expect("daprd starts");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                let out = child.wait_with_output().expect("output");
                return (
                    status.success(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "daprd did not exit within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("join")
}

async fn sentry(ca: &Arc<TestCa>, presented_id: &str) -> TestSentry {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    TestSentry::start(l, ca.clone(), ca, presented_id, SentryPolicy::default())
}

fn sentry_id() -> String {
    daprd_testkit::controlplane::sentry_id()
}

#[tokio::test]
async fn wrong_trust_anchors_end_the_process_with_one_clear_line() {
    let ca = Arc::new(TestCa::ed25519());
    let s = sentry(&ca, &sentry_id()).await;
    let other = TestCa::ed25519();
    let (ok, err) = finish(daprd(
        &s.addr.to_string(),
        "127.0.0.1:1",
        &other.pem,
        daprd_testkit::free_port(),
    ))
    .await;
    assert!(!ok, "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("error: ") && l.contains("DAPR_TRUST_ANCHORS")),
        "{err}"
    );
}

#[tokio::test]
async fn a_sentry_with_another_spiffe_id_ends_the_process() {
    let ca = Arc::new(TestCa::ed25519());
    let impostor = &daprd_testkit::controlplane::operator_id();
    let s = sentry(&ca, impostor).await;
    let (ok, err) = finish(daprd(
        &s.addr.to_string(),
        "127.0.0.1:1",
        &ca.pem,
        daprd_testkit::free_port(),
    ))
    .await;
    assert!(!ok, "{err}");
    assert!(
        err.contains(&sentry_id()) && err.contains(impostor.as_str()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_that_is_down_keeps_the_sidecar_up_and_not_ready_until_it_comes() {
    let ca = Arc::new(TestCa::ed25519());
    let public = daprd_testkit::free_port();
    let sentry_addr = format!("127.0.0.1:{}", daprd_testkit::free_port());
    let operator_addr = format!("127.0.0.1:{}", daprd_testkit::free_port());
    let mut child = daprd(&sentry_addr, &operator_addr, &ca.pem, public)
        .spawn()
        .expect("daprd starts");
    let url = format!("http://127.0.0.1:{public}/v1.0/healthz");
    let status =
        |url: String| async move { reqwest::get(&url).await.ok().map(|r| r.status().as_u16()) };
    let first = daprd_testkit::eventually(Duration::from_secs(10), "the public port", || {
        status(url.clone())
    })
    .await;
    assert_eq!(first, 500, "not ready while sentry is down");
    assert!(child.try_wait().expect("wait").is_none(), "still running");

    // Sentry comes up; the operator is still down: still not ready, still running.
    let _sentry = TestSentry::start(
        tokio::net::TcpListener::bind(&sentry_addr)
            .await
            .expect("bind"),
        ca.clone(),
        &ca,
        &sentry_id(),
        SentryPolicy::default(),
    );
    assert_eq!(status(url.clone()).await, Some(500));
    // The operator comes up: ready without a restart.
    let _operator = TestOperator::start(
        tokio::net::TcpListener::bind(&operator_addr)
            .await
            .expect("bind"),
        &ca,
        &daprd_testkit::controlplane::operator_id(),
        "ns1",
        OperatorState::default(),
    );
    daprd_testkit::eventually(Duration::from_secs(20), "ready", || {
        let url = url.clone();
        async move { (status(url).await == Some(204)).then_some(()) }
    })
    .await;
    assert!(child.try_wait().expect("wait").is_none(), "never restarted");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn root_is_refused_without_the_override() {
    if daprd_runtime::kubernetes::effective_uid() != Some(0) {
        // Not root here: nothing to refuse (the check reads the effective uid).
        return;
    }
    let ca = TestCa::ed25519();
    let out = daprd(
        "127.0.0.1:1",
        "127.0.0.1:1",
        &ca.pem,
        daprd_testkit::free_port(),
    )
    .env_remove("DAPR_UNSAFE_SKIP_CONTAINER_UID_GID_CHECK")
    .output()
    .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("DAPR_UNSAFE_SKIP_CONTAINER_UID_GID_CHECK"),
        "{err}"
    );
}
