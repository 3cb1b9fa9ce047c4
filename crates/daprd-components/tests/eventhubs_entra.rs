//! `pubsub.azure.eventhubs` with Microsoft Entra ID (`eventHubNamespace` instead of a
//! connection string) and entity management, against the test broker speaking TLS (as Event
//! Hubs does; it takes only the event hubs and consumer groups made through its Azure Resource
//! Manager API, as Event Hubs), the test token server as Entra ID's token endpoint
//! (`AZURE_AUTHORITY_HOST`) and a private Azurite for checkpoints: the component gets tokens
//! for Event Hubs' scope (put on `$cbs` as a `jwt`) and for Resource Manager's (a bearer token
//! on its API, `AZURE_RESOURCE_MANAGER_ENDPOINT` pointing at the test broker), makes the event
//! hub with `partitionCount` and the consumer group, and an event goes through. A test of its
//! own process: it sets the environment the component reads.

#![cfg(feature = "eventhubs")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use daprd_components::eventhubs::EventHubsFactory;
use daprd_core::metadata::Metadata;
use daprd_core::pubsub::{PubSubFactory, SubscribeRequest};
use daprd_testkit::azurite::Azurite;
use daprd_testkit::certs::TestCerts;
use daprd_testkit::conformance::{publish_request_with, random_name, success_collector};
use daprd_testkit::servicebus::TestBroker;
use daprd_testkit::tokens::{TokenServer, CLIENT_ID, CLIENT_SECRET, TENANT_ID};

const SCOPE: &str = "https://eventhubs.azure.net/.default";
const ARM_SCOPE: &str = "https://management.azure.com/.default";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_id_and_entity_management_through_resource_manager() {
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
    // event hubs and consumer groups only through Resource Manager
    broker.require_existing_entities();
    let azurite = Azurite::start().await;
    // the process's environment, read by the component (this file's one test sets it)
    std::env::set_var("SSL_CERT_FILE", &certs.ca_file);
    std::env::set_var(
        "AZURE_AUTHORITY_HOST",
        format!("http://127.0.0.1:{}/", tokens.port),
    );
    std::env::set_var(
        "AZURE_RESOURCE_MANAGER_ENDPOINT",
        format!("https://{}", broker.namespace()),
    );
    let metadata = |managed: bool| {
        let mut md = Metadata::new();
        md.insert("eventHubNamespace", broker.namespace());
        md.insert("azureTenantId", TENANT_ID);
        md.insert("azureClientId", CLIENT_ID);
        md.insert("azureClientSecret", CLIENT_SECRET);
        md.insert("consumerID", "app");
        md.insert("storageConnectionString", azurite.connection_string());
        md.insert("storageContainerName", "entra");
        if managed {
            md.insert("enableEntityManagement", "true");
            md.insert("subscriptionID", "00000000-0000-0000-0000-000000000001");
            md.insert("resourceGroupName", "dapr");
            md.insert("partitionCount", "3");
            md.insert("messageRetentionInDays", "2");
        }
        md
    };

    // without entity management a missing event hub is an error, as on Event Hubs
    let c = EventHubsFactory
        .connect("pubsub", &metadata(false))
        .await
        .unwrap();
    let (h, _rx) = success_collector();
    let e = c
        .subscribe(SubscribeRequest::new(random_name("missing")), h)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("404"), "{e}");
    c.close().await.unwrap();

    let c = EventHubsFactory
        .connect("pubsub", &metadata(true))
        .await
        .unwrap();
    let hub = random_name("managed");
    let (h, mut rx) = success_collector();
    let _sub = c.subscribe(SubscribeRequest::new(&hub), h).await.unwrap();
    let (groups, made) = broker.arm_made(&hub);
    assert_eq!(
        groups,
        ["app"],
        "the consumer group made through Resource Manager"
    );
    let made: serde_json::Value = serde_json::from_str(&made.unwrap()).unwrap();
    assert_eq!(made["properties"]["partitionCount"], 3);
    assert_eq!(made["properties"]["messageRetentionInDays"], 2);
    assert_eq!(
        broker.event_receivers(&hub),
        3,
        "each of the three partitions read"
    );
    c.publish(publish_request_with(&hub, "hello", &[]))
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.data[..], b"hello");
    assert!(
        broker
            .tokens()
            .contains(&format!("amqps://localhost/{hub}")),
        "{:?}",
        broker.tokens()
    );
    let scopes: std::collections::BTreeSet<String> =
        tokens.grants().into_iter().map(|g| g.scope).collect();
    assert_eq!(
        scopes,
        [ARM_SCOPE.to_string(), SCOPE.to_string()].into(),
        "tokens for Event Hubs and for Resource Manager, nothing else"
    );
    c.close().await.unwrap();
}
