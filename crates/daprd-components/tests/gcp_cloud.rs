//! `pubsub.gcp.pubsub` on "Google Cloud": the component without `endpoint`, over TLS with
//! Google's credentials, against `daprd_testkit::gcp::GoogleTestCloud` (a TLS front that checks
//! each call's bearer token before forwarding it to the Pub/Sub emulator, and a token server
//! speaking Google's OAuth and metadata-server protocols). No Google Cloud is reachable here.
#![cfg(feature = "gcp")]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use daprd_components::gcp::{GcpPubSubFactory, GoogleApis};
use daprd_core::metadata::Metadata;
use daprd_core::pubsub::{PubSub, PubSubError};
use daprd_testkit::conformance::{metadata_with_group, publish_request, random_name, round_trip};
use daprd_testkit::gcp::{self as cloud, GoogleTestCloud};

fn emulator() -> String {
    daprd_testkit::broker_address(
        "PUBSUB_EMULATOR_HOST",
        "127.0.0.1:8085",
        "the Pub/Sub emulator",
    )
}

/// Google as the component sees it: the front, the token server, and `file` as
/// `GOOGLE_APPLICATION_CREDENTIALS`; no emulator, no gcloud file.
fn apis(cloud: &GoogleTestCloud, file: Option<PathBuf>) -> GoogleApis {
    GoogleApis {
        emulator_host: None,
        pubsub_host: "localhost".into(),
        pubsub_port: cloud.pubsub_port,
        ca_pem: Some(cloud.ca_pem.clone()),
        metadata_host: format!("127.0.0.1:{}", cloud.token_port),
        token_uri: format!("http://127.0.0.1:{}/token", cloud.token_port),
        credentials_file: file,
        well_known_file: None,
    }
}

fn metadata(extra: &[(&str, &str)]) -> Metadata {
    let project = random_name("project");
    let mut pairs = vec![("projectId", project.as_str())];
    pairs.extend_from_slice(extra);
    metadata_with_group(&random_name("app"), &pairs)
}

fn credentials_file(text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.json", random_name("gcp-credentials")));
    std::fs::write(&path, text).expect("write the credentials file");
    path
}

async fn connect(md: &Metadata, apis: &GoogleApis) -> Result<Arc<dyn PubSub>, PubSubError> {
    GcpPubSubFactory::connect_to("gcp", md, apis).await
}

/// A publish and its delivery (with the ack) went through the front, every call carrying a
/// token of `kind`, none refused.
async fn works_with(cloud: &GoogleTestCloud, c: &Arc<dyn PubSub>, kind: &str) {
    let topic = random_name("cloud");
    let (sub, _rx) = round_trip(c, &topic, b"over tls").await;
    drop(sub);
    let calls = cloud.calls();
    for method in ["/Publish", "/StreamingPull", "/CreateSubscription"] {
        assert!(
            calls
                .iter()
                .any(|(path, k)| path.ends_with(method) && *k == kind),
            "{method} with a {kind}: {calls:?}"
        );
    }
    assert_eq!(cloud.refused(), 0, "calls refused: {calls:?}");
    c.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_in_the_metadata_signs_its_own_tokens() {
    let cloud = GoogleTestCloud::start(&emulator()).await;
    let md = metadata(&[
        ("type", "service_account"),
        ("privateKeyId", cloud::SERVICE_ACCOUNT_KEY_ID),
        ("clientEmail", cloud::SERVICE_ACCOUNT_EMAIL),
        ("privateKey", cloud::SERVICE_ACCOUNT_KEY),
    ]);
    let c = connect(&md, &apis(&cloud, None)).await.expect("connect");
    works_with(&cloud, &c, "self-signed jwt").await;
    assert_eq!(
        cloud.tokens().token_requests(),
        0,
        "a service account needs no token exchange"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_default_credentials_come_from_the_file_or_the_metadata_server() {
    let cloud = GoogleTestCloud::start(&emulator()).await;
    let md = metadata(&[]);
    // a service-account key file
    let file = credentials_file(&cloud::service_account_json());
    let c = connect(&md, &apis(&cloud, Some(file.clone())))
        .await
        .expect("connect with a key file");
    works_with(&cloud, &c, "self-signed jwt").await;
    let _ = std::fs::remove_file(file);
    // a user's refresh token, exchanged at its token URI
    let token_uri = format!("http://127.0.0.1:{}/token", cloud.token_port);
    let file = credentials_file(&cloud::authorized_user_json(&token_uri));
    let c = connect(&md, &apis(&cloud, Some(file.clone())))
        .await
        .expect("connect with a user's credentials");
    works_with(&cloud, &c, "access token").await;
    assert_eq!(cloud.tokens().token_requests(), 1);
    let _ = std::fs::remove_file(file);
    // no file: the metadata server
    let c = connect(&md, &apis(&cloud, None))
        .await
        .expect("connect with the metadata server");
    works_with(&cloud, &c, "access token").await;
    assert_eq!(cloud.tokens().token_requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_replaced_before_it_expires() {
    let cloud = GoogleTestCloud::start(&emulator()).await;
    // five minutes: the component refreshes it at once (in 10 s, its least wait)
    cloud.tokens().set_expires_in(300);
    let c = connect(&metadata(&[]), &apis(&cloud, None))
        .await
        .expect("connect");
    daprd_testkit::eventually(Duration::from_secs(30), "a second token", || async {
        (cloud.tokens().token_requests() >= 2).then_some(())
    })
    .await;
    // The token server counts a token when it answers; the component takes it up when the
    // answer has arrived: its calls carry the new token soon after (the old one still works
    // meanwhile).
    let topic = random_name("refresh");
    let newest = cloud.tokens().issued().last().cloned();
    assert!(newest.is_some(), "the token server issued tokens");
    daprd_testkit::eventually(Duration::from_secs(10), "calls with the new token", || {
        let (c, topic, newest) = (c.clone(), topic.clone(), newest.clone());
        let cloud = &cloud;
        async move {
            c.publish(publish_request(&topic, b"around the refresh"))
                .await
                .ok()?;
            (cloud.last_token() == newest).then_some(())
        }
    })
    .await;
    // only the new token is good now: calls must carry it
    cloud.tokens().revoke_all_but_newest();
    c.publish(publish_request(&topic, b"after the refresh"))
        .await
        .expect("publish with the refreshed token");
    assert_eq!(cloud.refused(), 0);
    c.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_fail_the_init_or_the_call_with_what_was_wrong() {
    let cloud = GoogleTestCloud::start(&emulator()).await;
    let md = metadata(&[]);
    let message = |r: Result<Arc<dyn PubSub>, PubSubError>| match r {
        Ok(_) => panic!("connected with bad credentials"),
        Err(e) => e.to_string(),
    };
    // a refresh token the server refuses
    let token_uri = format!("http://127.0.0.1:{}/token", cloud.token_port);
    let bad_user = cloud::authorized_user_json(&token_uri).replace(cloud::REFRESH_TOKEN, "1//bad");
    let file = credentials_file(&bad_user);
    let e = message(connect(&md, &apis(&cloud, Some(file.clone()))).await);
    assert!(e.contains("invalid_grant") && e.contains(&token_uri), "{e}");
    let _ = std::fs::remove_file(&file);
    // a file that is not there, or not a credential
    let e = message(connect(&md, &apis(&cloud, Some(file.clone()))).await);
    assert!(e.contains(&file.display().to_string()), "{e}");
    let file = credentials_file(r#"{"type": "external_account"}"#);
    let e = message(connect(&md, &apis(&cloud, Some(file.clone()))).await);
    assert!(e.contains("external_account"), "{e}");
    let _ = std::fs::remove_file(&file);
    // nothing at all: no file, no metadata server
    let mut nowhere = apis(&cloud, None);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    nowhere.metadata_host = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let e = message(connect(&md, &nowhere).await);
    assert!(e.contains("no google credentials"), "{e}");
    // a key whose account the server does not know: Google refuses every call
    let md = metadata(&[
        ("privateKeyId", cloud::SERVICE_ACCOUNT_KEY_ID),
        (
            "clientEmail",
            "someone-else@elsewhere.iam.gserviceaccount.com",
        ),
        ("privateKey", cloud::SERVICE_ACCOUNT_KEY),
    ]);
    let c = connect(&md, &apis(&cloud, None))
        .await
        .expect("a key that signs connects");
    let e = c
        .publish(publish_request(&random_name("refused"), b"x"))
        .await
        .expect_err("a publish with a refused token");
    assert!(e.to_string().contains("Unauthenticated"), "{e}");
    assert!(cloud.refused() >= 1);
}
