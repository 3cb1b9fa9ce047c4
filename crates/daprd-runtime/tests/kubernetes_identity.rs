//! Kubernetes mode's workload identity against the test Sentry (real protocol, real TLS,
//! SPIFFE ids): signing, renewal, trust failures and outages.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use daprd_runtime::kubernetes::identity::{
    obtain, renew_forever, IdentityError, IdentityEvents, SentryClient, SentryOptions, Svid,
};
use daprd_runtime::kubernetes::spiffe::{SpiffeId, TrustAnchors, TrustFailure};
use daprd_testkit::controlplane::{SentryPolicy, TestCa, TestSentry};
use daprd_testkit::{eventually, ScratchDir};

const CP_TD: &str = "cluster.local";
const CP_NS: &str = "dapr-system";

struct Counting {
    signed: AtomicUsize,
    renewed: AtomicUsize,
    failed: AtomicUsize,
}

impl Counting {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            signed: AtomicUsize::new(0),
            renewed: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
        })
    }
}

impl IdentityEvents for Counting {
    fn signed(&self, _svid: &Svid, renewal: bool) {
        self.signed.fetch_add(1, Ordering::SeqCst);
        if renewal {
            self.renewed.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn failed(&self, _error: &IdentityError, _renewal: bool) {
        self.failed.fetch_add(1, Ordering::SeqCst);
    }
}

async fn listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
}

fn sentry_id() -> String {
    SpiffeId::sentry(CP_TD, CP_NS).to_string()
}

fn options(
    addr: std::net::SocketAddr,
    anchors_pem: &str,
    token_file: Option<std::path::PathBuf>,
) -> SentryOptions {
    SentryOptions {
        address: addr.to_string(),
        anchors: TrustAnchors::from_pem(anchors_pem).expect("anchors"),
        sentry_id: SpiffeId::sentry(CP_TD, CP_NS),
        app_id: "app1".into(),
        namespace: "ns1".into(),
        token_file,
    }
}

#[tokio::test]
async fn sentry_signs_an_ed25519_key_for_the_workload_id_with_the_token_read_each_time() {
    for ca in [
        TestCa::ed25519(),
        TestCa::new(&rcgen::PKCS_ECDSA_P256_SHA256),
    ] {
        let ca = Arc::new(ca);
        let dir = ScratchDir::new("identity");
        dir.write("token", "first");
        let sentry = TestSentry::spawn(
            &ca,
            SentryPolicy {
                token: Some("first".into()),
                namespaces: vec!["ns1".into()],
                ..SentryPolicy::default()
            },
        )
        .await;
        let client = SentryClient::new(options(
            sentry.addr,
            &ca.pem,
            Some(dir.path().join("token")),
        ));
        let svid = client.sign().await.expect("signed");
        assert_eq!(svid.id.to_string(), "spiffe://public/ns/ns1/app1");
        assert!(svid.not_after > svid.not_before);
        let signed = sentry.signed();
        assert_eq!(signed.len(), 1);
        assert_eq!(signed[0].token_validator, 2, "the KUBERNETES validator");

        // The kubelet rotates the projected token: the next request reads the file again.
        sentry.policy.lock().expect("policy").token = Some("second".into());
        dir.write("token", "second");
        let again = client.sign().await.expect("signed with the new token");
        assert_ne!(
            again.key.cert[0], svid.key.cert[0],
            "a fresh key and certificate each time"
        );
    }
}

#[tokio::test]
async fn wrong_trust_anchors_are_a_fatal_trust_failure() {
    let ca = Arc::new(TestCa::ed25519());
    let other = TestCa::ed25519();
    let sentry = TestSentry::spawn(&ca, SentryPolicy::default()).await;
    let err = SentryClient::new(options(sentry.addr, &other.pem, None))
        .sign()
        .await
        .expect_err("not trusted");
    assert!(err.is_fatal(), "{err}");
    assert!(
        matches!(
            &err,
            IdentityError::Trust {
                failure: TrustFailure::Chain { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("DAPR_TRUST_ANCHORS"), "{err}");
    assert!(sentry.signed().is_empty());
}

#[tokio::test]
async fn a_server_with_another_spiffe_id_is_a_fatal_trust_failure() {
    let ca = Arc::new(TestCa::ed25519());
    let operator_id = SpiffeId::operator(CP_TD, CP_NS).to_string();
    let sentry = TestSentry::start(
        listener().await,
        ca.clone(),
        &ca,
        &operator_id,
        SentryPolicy::default(),
    );
    let err = SentryClient::new(options(sentry.addr, &ca.pem, None))
        .sign()
        .await
        .expect_err("wrong id");
    assert!(err.is_fatal(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&sentry_id()) && text.contains(&operator_id),
        "names both ids: {text}"
    );
}

#[tokio::test]
async fn a_refused_token_or_namespace_is_a_clear_error_that_is_tried_again() {
    let ca = Arc::new(TestCa::ed25519());
    let dir = ScratchDir::new("identity");
    dir.write("token", "expired");
    let sentry = TestSentry::spawn(
        &ca,
        SentryPolicy {
            token: Some("valid".into()),
            ..SentryPolicy::default()
        },
    )
    .await;
    let client = SentryClient::new(options(
        sentry.addr,
        &ca.pem,
        Some(dir.path().join("token")),
    ));
    let err = client.sign().await.expect_err("token refused");
    assert!(!err.is_fatal());
    assert!(
        matches!(
            &err,
            IdentityError::Refused {
                code: tonic::Code::Unauthenticated,
                ..
            }
        ),
        "{err:?}"
    );

    {
        let mut p = sentry.policy.lock().expect("policy");
        p.token = None;
        p.namespaces = vec!["other".into()];
    }
    let err = client.sign().await.expect_err("namespace refused");
    assert!(
        matches!(
            &err,
            IdentityError::Refused {
                code: tonic::Code::PermissionDenied,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("ns1"), "{err}");
    assert_eq!(sentry.refused(), 2);

    let empty = ScratchDir::new("identity");
    empty.write("token", "");
    let err = SentryClient::new(options(
        sentry.addr,
        &ca.pem,
        Some(empty.path().join("token")),
    ))
    .sign()
    .await
    .expect_err("empty token file");
    assert!(matches!(err, IdentityError::Token { .. }), "{err:?}");
}

#[tokio::test]
async fn obtain_waits_for_a_sentry_that_is_down_at_start() {
    let ca = Arc::new(TestCa::ed25519());
    // Reserve a port, then leave it closed until the client has failed at least once.
    let port = daprd_testkit::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let events = Counting::new();
    let client = SentryClient::new(options(addr, &ca.pem, None));
    let task = {
        let events = events.clone();
        tokio::spawn(
            async move { obtain(&client, events.as_ref(), Duration::from_millis(200)).await },
        )
    };
    eventually(Duration::from_secs(10), "a failed attempt", || async {
        (events.failed.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    assert!(!task.is_finished(), "still trying");
    let bound = tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind the port");
    let _sentry = TestSentry::start(
        bound,
        ca.clone(),
        &ca,
        &sentry_id(),
        SentryPolicy::default(),
    );
    let identity = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("obtained in time")
        .expect("task")
        .expect("identity");
    assert_eq!(
        identity.current().id.to_string(),
        "spiffe://public/ns/ns1/app1"
    );
}

#[tokio::test]
async fn the_certificate_is_renewed_halfway_through_its_validity_with_a_fresh_key() {
    let ca = Arc::new(TestCa::ed25519());
    let sentry = TestSentry::spawn(
        &ca,
        SentryPolicy {
            validity: Duration::from_secs(4),
            ..SentryPolicy::default()
        },
    )
    .await;
    let client = SentryClient::new(options(sentry.addr, &ca.pem, None));
    let events = Counting::new();
    let identity = obtain(&client, events.as_ref(), Duration::from_secs(1))
        .await
        .expect("identity");
    let first = identity.current();
    let mut renewals = identity.renewals();
    let renewer = tokio::spawn(renew_forever(identity.clone(), client, events.clone()));
    tokio::time::timeout(Duration::from_secs(10), renewals.wait_for(|n| *n >= 2))
        .await
        .expect("two renewals within 10 s")
        .expect("renewals");
    renewer.abort();
    let now = identity.current();
    assert_ne!(now.key.cert[0], first.key.cert[0]);
    assert!(now.not_after > first.not_after);
    assert_eq!(events.renewed.load(Ordering::SeqCst), 2);
    // Each renewal happened at or after the halfway mark of the certificate it replaced.
    let signed = sentry.signed();
    assert_eq!(signed.len(), 3);
    assert!(signed[1].at >= first.renew_at() - Duration::from_secs(1));
}
