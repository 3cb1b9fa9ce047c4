//! `pubsub.azure.servicebus.topics` with Microsoft Entra ID (`namespaceName` instead of a
//! connection string) against the test broker speaking TLS, as Service Bus does, and the
//! test token server as Entra ID's token endpoint (`AZURE_AUTHORITY_HOST`, as Azure's SDKs
//! take it): the component gets a token for Service Bus's scope with the client's secret, or
//! with a workload identity's federated token, puts it on `$cbs` as a `jwt`, and sends it as
//! a bearer token to the management API, which creates the entities. A test of its own
//! process: it sets the environment the component reads (`SSL_CERT_FILE` for the test CA).

#![cfg(feature = "servicebus")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use daprd_components::servicebus::ServiceBusFactory;
use daprd_core::pubsub::{PubSubFactory, SubscribeRequest};
use daprd_testkit::certs::TestCerts;
use daprd_testkit::conformance::{
    metadata_with_group, publish_request_with as request, random_name, success_collector,
};
use daprd_testkit::servicebus::TestBroker;
use daprd_testkit::tokens::{TokenServer, CLIENT_ID, CLIENT_SECRET, FEDERATED_TOKEN, TENANT_ID};

const SCOPE: &str = "https://servicebus.azure.net/.default";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_id_tokens_open_amqp_and_the_management_api() {
    let certs = TestCerts::generate();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let broker = TestBroker::start_tls(
        0,
        &read(&certs.server_cert_file),
        &read(&certs.server_key_file),
    )
    .await
    .unwrap();
    let tokens = Arc::new(TokenServer::start().await);
    let issued = tokens.clone();
    broker.trust_jwt(Arc::new(move |t| issued.is_issued(t)));
    // entities only through the management API, which takes the bearer token
    broker.require_existing_entities();
    // the process's environment, read by the component (this file's one test sets it)
    std::env::set_var("SSL_CERT_FILE", &certs.ca_file);
    std::env::set_var(
        "AZURE_AUTHORITY_HOST",
        format!("http://127.0.0.1:{}/", tokens.port),
    );
    let namespace = broker.namespace();
    let federated = certs.dir.write("federated-token", FEDERATED_TOKEN);

    for way in ["client secret", "workload identity"] {
        let mut md = metadata_with_group("app", &[("namespaceName", &namespace)]);
        if way == "client secret" {
            md.insert("azureTenantId", TENANT_ID);
            md.insert("azureClientId", CLIENT_ID);
            md.insert("azureClientSecret", CLIENT_SECRET);
        } else {
            // what Azure's workload identity webhook sets in a pod
            std::env::set_var("AZURE_FEDERATED_TOKEN_FILE", &federated);
            std::env::set_var("AZURE_TENANT_ID", TENANT_ID);
            std::env::set_var("AZURE_CLIENT_ID", CLIENT_ID);
        }
        let grants_before = tokens.grants().len();
        let c = ServiceBusFactory::TOPICS
            .connect("pubsub", &md)
            .await
            .unwrap();
        let topic = random_name("entra");
        let (h, mut rx) = success_collector();
        let _sub = c
            .subscribe(SubscribeRequest::new(&topic), h)
            .await
            .unwrap_or_else(|e| panic!("{way}: {e}"));
        c.publish(request(&topic, "hello", &[])).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{way}: the message within 10 s"))
            .unwrap();
        assert_eq!(&m.data[..], b"hello");
        assert!(
            broker
                .description(&format!("{topic}/Subscriptions/app"))
                .is_some(),
            "{way}: the subscription made through the management API"
        );
        assert!(
            broker
                .tokens()
                .contains(&format!("amqps://localhost/{topic}")),
            "{way}: {:?}",
            broker.tokens()
        );
        let grants = tokens.grants();
        let new = &grants[grants_before..];
        assert!(!new.is_empty(), "{way}: a token was asked for");
        let want = if way == "client secret" {
            "form"
        } else {
            "assertion"
        };
        for g in new {
            assert_eq!((g.client_auth, g.scope.as_str()), (want, SCOPE), "{way}");
        }
        c.close().await.unwrap();
    }

    // a secret Entra ID refuses: the subscribe says why
    std::env::remove_var("AZURE_FEDERATED_TOKEN_FILE");
    let md = metadata_with_group(
        "app",
        &[
            ("namespaceName", &namespace),
            ("azureTenantId", TENANT_ID),
            ("azureClientId", CLIENT_ID),
            ("azureClientSecret", "wrong"),
        ],
    );
    let c = ServiceBusFactory::TOPICS
        .connect("pubsub", &md)
        .await
        .unwrap();
    let (h, _rx) = success_collector();
    let e = c
        .subscribe(SubscribeRequest::new(random_name("entra")), h)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Entra ID") && e.contains("invalid_client"),
        "{e}"
    );
    c.close().await.unwrap();
}
