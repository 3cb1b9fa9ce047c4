//! End-to-end publish tests against an in-process sidecar with the in-memory component:
//! the exact envelope that reaches the component, over HTTP (reqwest) and gRPC (the
//! official Rust `dapr` SDK and raw tonic calls), and every reachable error row.

#![allow(clippy::unwrap_used)]

#[path = "support/sidecar.rs"]
mod sidecar;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use daprd_core::pubsub::{Handler, Message, Outcome, SubscribeRequest, Subscription};
use daprd_proto::runtime::v1 as pb;
use daprd_runtime::config::Env;
use daprd_runtime::state::RuntimeState;
use daprd_testkit::{in_memory_component, ScratchDir};
use serde_json::Value;
use tokio::sync::mpsc;
use tonic_types::StatusExt;

struct Harness {
    state: Arc<RuntimeState>,
    http: String,
    grpc: String,
    client: reqwest::Client,
    _dir: ScratchDir,
}

async fn start_with(resources: &[&str], app_id: &str, env: Env) -> Harness {
    let r = sidecar::start(resources, app_id, env, &[]).await;
    Harness {
        state: r.state,
        http: r.http,
        grpc: r.grpc,
        client: reqwest::Client::new(),
        _dir: r._dir,
    }
}

async fn start() -> Harness {
    start_with(
        &[&in_memory_component("pubsub", &[])],
        "checkout",
        Env::default(),
    )
    .await
}

impl Harness {
    async fn subscribe(
        &self,
        pubsub: &str,
        topic: &str,
    ) -> (Subscription, mpsc::UnboundedReceiver<Message>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handler: Handler = Arc::new(move |m| {
            let tx = tx.clone();
            Box::pin(async move {
                let _ = tx.send(m);
                Outcome::Success
            })
        });
        let entry = self
            .state
            .publisher
            .store()
            .pubsub(pubsub)
            .expect("pubsub exists");
        let sub = entry
            .component
            .subscribe(SubscribeRequest::new(topic), handler)
            .await
            .expect("subscribe");
        (sub, rx)
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(format!("{}{}", self.http, path))
    }

    async fn grpc_raw(&self) -> pb::dapr_client::DaprClient<tonic::transport::Channel> {
        pb::dapr_client::DaprClient::connect(self.grpc.clone())
            .await
            .expect("grpc connect")
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Message>) -> Message {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a message within 10s")
        .expect("channel open")
}

fn json(m: &Message) -> serde_json::Map<String, Value> {
    match serde_json::from_slice(&m.data).expect("envelope is json") {
        Value::Object(o) => o,
        other => panic!("envelope is not an object: {other}"),
    }
}

fn is_traceparent(v: &Value) -> bool {
    let s = v.as_str().unwrap_or("");
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 4
        && parts[0] == "00"
        && parts[1].len() == 32
        && parts[2].len() == 16
        && parts[3].len() == 2
}

#[tokio::test]
async fn http_publish_json_builds_the_exact_envelope() {
    let h = start().await;
    let (_s, mut rx) = h.subscribe("pubsub", "orders").await;
    let resp = h
        .post("/v1.0/publish/pubsub/orders")
        .header("content-type", "application/json")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .header("tracestate", "congo=t61rcWkgMzE")
        .body(r#"{"orderId":12345678901234567890,"note":"<b>"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert!(resp.bytes().await.unwrap().is_empty());
    let m = next(&mut rx).await;
    assert_eq!(m.topic, "orders");
    let raw = String::from_utf8(m.data.to_vec()).unwrap();
    assert!(
        raw.contains(r#""data":{"note":"\u003cb\u003e","orderId":12345678901234567890}"#),
        "{raw}"
    );
    let ce = json(&m);
    let mut keys: Vec<&str> = ce.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "data",
            "datacontenttype",
            "id",
            "pubsubname",
            "source",
            "specversion",
            "time",
            "topic",
            "traceid",
            "traceparent",
            "tracestate",
            "type"
        ]
    );
    assert_eq!(ce["datacontenttype"], "application/json");
    assert_eq!(ce["source"], "checkout");
    assert_eq!(ce["type"], "com.dapr.event.sent");
    assert_eq!(ce["specversion"], "1.0");
    assert_eq!(ce["topic"], "orders");
    assert_eq!(ce["pubsubname"], "pubsub");
    assert!(uuid::Uuid::parse_str(ce["id"].as_str().unwrap()).is_ok());
    assert!(is_traceparent(&ce["traceparent"]));
    assert_eq!(ce["traceid"], ce["traceparent"]);
    assert!(
        ce["traceparent"]
            .as_str()
            .unwrap()
            .starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "trace continued"
    );
    assert!(ce["traceparent"].as_str().unwrap().ends_with("-01"));
    assert_eq!(ce["tracestate"], "congo=t61rcWkgMzE");
    let time = ce["time"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
}

#[tokio::test]
async fn http_content_type_rules_overrides_ttl_and_raw() {
    let h = start().await;
    let (_s, mut rx) = h.subscribe("pubsub", "t").await;

    h.post("/v1.0/publish/pubsub/t")
        .header("content-type", "text/plain")
        .body("\"hello\"")
        .send()
        .await
        .unwrap();
    let ce = json(&next(&mut rx).await);
    assert_eq!(ce["data"], "\"hello\"");
    assert_eq!(ce["datacontenttype"], "text/plain");

    h.post("/v1.0/publish/pubsub/t")
        .body("no content type")
        .send()
        .await
        .unwrap();
    let ce = json(&next(&mut rx).await);
    assert_eq!(ce["datacontenttype"], "text/plain");
    assert_eq!(ce["data"], "no content type");

    h.post("/v1.0/publish/pubsub/t")
        .header("content-type", "application/octet-stream")
        .body(vec![0u8, 1, 2, 255])
        .send()
        .await
        .unwrap();
    let ce = json(&next(&mut rx).await);
    assert_eq!(ce["data_base64"], "AAEC/w==");
    assert!(!ce.contains_key("data"));

    h.post("/v1.0/publish/pubsub/t?metadata.cloudevent.id=my-id&metadata.cloudevent.type=my.type&metadata.cloudevent.source=src&metadata.cloudevent.subject=subj&metadata.ttlInSeconds=60")
        .header("content-type", "application/json").body("[1]").send().await.unwrap();
    let m = next(&mut rx).await;
    assert_eq!(
        m.metadata.get("ttlInSeconds").map(String::as_str),
        Some("60"),
        "request metadata reaches the component"
    );
    let ce = json(&m);
    assert_eq!(ce["id"], "my-id");
    assert_eq!(ce["type"], "my.type");
    assert_eq!(ce["source"], "src");
    assert_eq!(ce["subject"], "subj");
    let exp = humantime::parse_rfc3339(ce["expiration"].as_str().unwrap()).unwrap();
    let ahead = exp.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(
        ahead > Duration::from_secs(50) && ahead <= Duration::from_secs(61),
        "{ahead:?}"
    );

    let body = r#"{"id":"ce-1","source":"me","type":"custom","specversion":"1.0","data":{"x":1},"datacontenttype":"application/json","ext1":"v"}"#;
    h.post("/v1.0/publish/pubsub/t?metadata.cloudevent.id=ignored")
        .header("content-type", "application/cloudevents+json")
        .body(body)
        .send()
        .await
        .unwrap();
    let ce = json(&next(&mut rx).await);
    assert_eq!(ce["id"], "ce-1");
    assert_eq!(ce["source"], "me");
    assert_eq!(ce["type"], "custom");
    assert_eq!(ce["ext1"], "v");
    assert_eq!(ce["topic"], "t");
    assert_eq!(ce["pubsubname"], "pubsub");
    assert!(is_traceparent(&ce["traceid"]));

    h.post("/v1.0/publish/pubsub/t?metadata.rawPayload=true")
        .header("content-type", "application/json")
        .body("raw bytes")
        .send()
        .await
        .unwrap();
    let m = next(&mut rx).await;
    assert_eq!(&m.data[..], b"raw bytes");
    assert!(
        !m.metadata.contains_key("traceid"),
        "HTTP raw publish adds no trace metadata"
    );
}

#[tokio::test]
async fn topics_with_slashes_escapes_and_cleaned_paths() {
    let h = start().await;
    let (_s, mut rx) = h.subscribe("pubsub", "*").await;
    for (path, topic) in [
        ("/v1.0/publish/pubsub/a/b/c", "a/b/c"),
        ("/v1.0/publish/pubsub/a%2Fb%23c+d", "a/b#c d"),
        ("/v1.0//publish/pubsub/x/./y/", "x/y"),
    ] {
        let resp = h.post(path).body("x").send().await.unwrap();
        assert_eq!(resp.status(), 204, "{path}");
        let m = next(&mut rx).await;
        assert_eq!(m.topic, topic, "{path}");
        assert_eq!(json(&m)["topic"], topic);
    }
    let resp = h
        .post("/v1.0/publish/pubsub/bad%zzescape")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = h
        .client
        .put(format!("{}/v1.0/publish/pubsub/put-works", h.http))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(next(&mut rx).await.topic, "put-works");
}

async fn error_body(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("json error body");
    (status, body)
}

#[tokio::test]
async fn http_error_rows() {
    let h = start_with(
        &[
            &in_memory_component("pubsub", &[]),
            &in_memory_component(
                "scoped",
                &[
                    ("publishingScopes", "checkout=allowed"),
                    ("protectedTopics", "secret"),
                ],
            ),
        ],
        "checkout",
        Env::default(),
    )
    .await;
    // (path, content type, body, status, errorCode, message)
    type Row<'a> = (&'a str, Option<&'a str>, &'a str, u16, &'a str, &'a str);
    let cases: Vec<Row> = vec![
        ("/v1.0/publish/nope/t", None, "x", 404, "ERR_PUBSUB_NOT_FOUND", "pubsub nope is not found"),
        ("/v1.0/publish/pubsub/", None, "x", 404, "ERR_TOPIC_NAME_EMPTY", "topic is empty in pubsub pubsub"),
        ("/v1.0/publish/pubsub/t?metadata.rawPayload=maybe", None, "x", 400, "ERR_PUBSUB_REQUEST_METADATA", "failed deserializing metadata. Error: rawPayload value must be a valid boolean: actual is 'maybe'"),
        ("/v1.0/publish/pubsub/t", Some("application/cloudevents+json"), "[1,2]", 500, "ERR_PUBSUB_CLOUD_EVENTS_SER", "cannot create cloudevent"),
        ("/v1.0/publish/scoped/other", None, "x", 403, "ERR_PUBSUB_FORBIDDEN", "topic other is not allowed for app id checkout"),
        ("/v1.0/publish/bulk/pubsub/t", None, "{}", 400, "ERR_PUBSUB_EVENTS_SER", ""),
        ("/v1.0-alpha1/publish/bulk/pubsub/t", None, r#"[{"event":"x","contentType":"text/plain"}]"#, 400, "ERR_PUBSUB_EVENTS_SER", "error marshaling events to bytes for topic t pubsub pubsub. error: entryId is duplicated or not present for entry"),
        ("/v1.0/publish/bulk/pubsub/t", None, r#"[{"entryId":"1","event":"x","contentType":"text/plain"},{"entryId":"1","event":"y","contentType":"text/plain"}]"#, 400, "ERR_PUBSUB_EVENTS_SER", "error marshaling events to bytes for topic t pubsub pubsub. error: entryId is duplicated or not present for entry"),
        ("/v1.0/publish/bulk/pubsub/t", None, r#"[{"entryId":"1","event":{"a":1},"contentType":"text/plain"}]"#, 400, "ERR_PUBSUB_EVENTS_SER", "error when marshalling cloud event envelope for topic t pubsub pubsub: mismatch between contentType and event"),
        ("/v1.0/publish/bulk/scoped/secret", None, r#"[{"entryId":"1","event":"x","contentType":"text/plain"}]"#, 403, "ERR_PUBSUB_FORBIDDEN", "topic secret is not allowed for app id checkout"),
    ];
    for (path, ct, body, status, code, message) in cases {
        let mut req = h.post(path).body(body.to_string());
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{path}"
        );
        let (got_status, got) = error_body(resp).await;
        assert_eq!(got_status, status, "{path}: {got}");
        assert_eq!(got["errorCode"], code, "{path}: {got}");
        if !message.is_empty() {
            assert_eq!(got["message"], message, "{path}");
        }
        let details = got["details"].as_array().expect("details");
        let info = details
            .iter()
            .find(|d| d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo")
            .expect("ErrorInfo");
        assert_eq!(info["domain"], "dapr.io");
    }
    let resp = h
        .post("/v1.0/publish/scoped/allowed")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204, "scoped topic allowed for this app");
}

#[tokio::test]
async fn component_failure_is_500_publish_message() {
    let h = start().await;
    // Closing the component makes every publish fail inside the component.
    h.state
        .publisher
        .store()
        .pubsub("pubsub")
        .unwrap()
        .component
        .close()
        .await
        .unwrap();
    let (status, body) = error_body(
        h.post("/v1.0/publish/pubsub/t")
            .body("x")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 500);
    assert_eq!(body["errorCode"], "ERR_PUBSUB_PUBLISH_MESSAGE");
    assert_eq!(
        body["message"],
        "error when publishing to topic t in pubsub pubsub: component is closed"
    );

    let resp = h.post("/v1.0/publish/bulk/pubsub/t").body(r#"[{"entryId":"a","event":"x","contentType":"text/plain"},{"entryId":"b","event":"y","contentType":"text/plain"}]"#).send().await.unwrap();
    assert_eq!(resp.status(), 500);
    assert!(resp.headers().get("metadata.responseData").is_some());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errorCode"], "ERR_PUBSUB_PUBLISH_MESSAGE");
    let mut ids: Vec<&str> = body["failedEntries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["entryId"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["a", "b"]);

    let mut g = h.grpc_raw().await;
    let st = g
        .publish_event(pb::PublishEventRequest {
            pubsub_name: "pubsub".into(),
            topic: "t".into(),
            data: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::Internal);
    assert_eq!(
        st.message(),
        "error when publishing to topic t in pubsub pubsub: component is closed"
    );
    let details = st.get_error_details();
    assert_eq!(
        details.error_info().unwrap().reason,
        "DAPR_PUBSUB_PUBLISH_MESSAGE"
    );
    assert_eq!(
        details
            .error_info()
            .unwrap()
            .metadata
            .get("topic")
            .map(String::as_str),
        Some("t")
    );
    assert_eq!(details.resource_info().unwrap().resource_type, "pubsub");

    let resp = g
        .bulk_publish_event(pb::BulkPublishRequest {
            pubsub_name: "pubsub".into(),
            topic: "t".into(),
            entries: vec![pb::BulkPublishRequestEntry {
                entry_id: "g1".into(),
                event: b"x".to_vec(),
                content_type: "text/plain".into(),
                metadata: HashMap::new(),
            }],
            metadata: HashMap::new(),
        })
        .await
        .expect("gRPC bulk returns failed entries instead of failing")
        .into_inner();
    assert_eq!(resp.failed_entries.len(), 1);
    assert_eq!(resp.failed_entries[0].entry_id, "g1");
    assert_eq!(resp.failed_entries[0].error, "component is closed");
}

#[tokio::test]
async fn http_bulk_publish_wraps_each_entry() {
    let h = start().await;
    let (_s, mut rx) = h.subscribe("pubsub", "bulk-t").await;
    let body = r#"[{"entryId":"1","event":"some text","contentType":"text/plain","metadata":{"k":"v"}},
                  {"entryId":"2","event":{"a":1},"contentType":"application/json"},
                  {"entryId":"3","event":"AAEC","contentType":"application/octet-stream"}]"#;
    for path in [
        "/v1.0/publish/bulk/pubsub/bulk-t?metadata.req=r",
        "/v1.0-alpha1/publish/bulk/pubsub/bulk-t?metadata.req=r",
    ] {
        let resp = h.post(path).body(body).send().await.unwrap();
        assert_eq!(resp.status(), 204, "{path}");
        let mut got = BTreeMap::new();
        for _ in 0..3 {
            let m = next(&mut rx).await;
            let ce = json(&m);
            got.insert(
                ce["datacontenttype"].as_str().unwrap().to_string(),
                (ce, m.metadata),
            );
        }
        assert_eq!(got["text/plain"].0["data"], "some text");
        assert_eq!(got["text/plain"].1.get("k").map(String::as_str), Some("v"));
        assert_eq!(
            got["text/plain"].1.get("req").map(String::as_str),
            Some("r"),
            "entry with metadata inherits request metadata"
        );
        assert!(
            got["application/json"].1.is_empty(),
            "entry without metadata gets none"
        );
        assert_eq!(
            got["application/json"].0["data"],
            serde_json::json!({"a":1})
        );
        assert_eq!(got["application/octet-stream"].0["data_base64"], "AAEC");
        let ids: std::collections::BTreeSet<&str> = got
            .values()
            .map(|(ce, _)| ce["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 3, "each entry gets its own id");
    }
}

#[tokio::test]
async fn grpc_publish_with_the_official_rust_sdk() {
    let h = start().await;
    let (_s, mut rx) = h.subscribe("pubsub", "orders").await;
    let opts = dapr::client::ClientOptions::new()
        .with_address(h.grpc.clone())
        .without_api_token();
    let mut client = dapr::Client::from_options(opts)
        .await
        .expect("sdk connects");
    client
        .publish_event(
            "pubsub",
            "orders",
            "application/json",
            br#"{"id":7}"#.to_vec(),
            None,
        )
        .await
        .expect("publish");
    let ce = json(&next(&mut rx).await);
    assert_eq!(ce["data"], serde_json::json!({"id": 7}));
    assert_eq!(ce["source"], "checkout");
    assert_eq!(ce["datacontenttype"], "application/json");

    let md: HashMap<String, String> = [("rawPayload".to_string(), "true".to_string())]
        .into_iter()
        .collect();
    client
        .publish_event("pubsub", "orders", "text/plain", b"raw".to_vec(), Some(md))
        .await
        .unwrap();
    let m = next(&mut rx).await;
    assert_eq!(&m.data[..], b"raw");
    assert!(
        m.metadata
            .get("traceid")
            .is_some_and(|t| t.starts_with("00-")),
        "gRPC raw publish adds traceid"
    );
    assert!(m.metadata.contains_key("tracestate"));

    let meta = client.get_metadata().await.expect("metadata");
    assert_eq!(meta.id, "checkout");
    assert_eq!(meta.registered_components[0].name, "pubsub");
    assert_eq!(meta.registered_components[0].r#type, "pubsub.in-memory");

    let err = client
        .publish_event("nope", "orders", "text/plain", b"x".to_vec(), None)
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("pubsub nope is not found"),
        "{err:?}"
    );
}

#[tokio::test]
async fn grpc_error_rows_with_rich_details() {
    let h = start_with(
        &[
            &in_memory_component("pubsub", &[]),
            &in_memory_component("scoped", &[("allowedTopics", "only")]),
        ],
        "checkout",
        Env::default(),
    )
    .await;
    let mut g = h.grpc_raw().await;
    let req = |ps: &str, topic: &str, ct: &str, data: &[u8], md: &[(&str, &str)]| {
        pb::PublishEventRequest {
            pubsub_name: ps.into(),
            topic: topic.into(),
            data: data.to_vec(),
            data_content_type: ct.into(),
            metadata: md
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    };
    let cases = vec![
        (
            req("", "t", "", b"x", &[]),
            tonic::Code::InvalidArgument,
            "DAPR_PUBSUB_NAME_EMPTY",
        ),
        (
            req("nope", "t", "", b"x", &[]),
            tonic::Code::InvalidArgument,
            "DAPR_PUBSUB_NOT_FOUND",
        ),
        (
            req("pubsub", "", "", b"x", &[]),
            tonic::Code::InvalidArgument,
            "DAPR_PUBSUB_TOPIC_NAME_EMPTY",
        ),
        (
            req("pubsub", "t", "", b"x", &[("rawPayload", "nah")]),
            tonic::Code::InvalidArgument,
            "DAPR_PUBSUB_METADATA_DESERIALIZATION",
        ),
        (
            req("pubsub", "t", "application/cloudevents+json", b"nope", &[]),
            tonic::Code::InvalidArgument,
            "DAPR_PUBSUB_CLOUD_EVENT_CREATION",
        ),
        (
            req("scoped", "other", "", b"x", &[]),
            tonic::Code::PermissionDenied,
            "DAPR_PUBSUB_FORBIDDEN",
        ),
    ];
    for (r, code, reason) in cases {
        let st = g.publish_event(r).await.unwrap_err();
        assert_eq!(st.code(), code, "{reason}: {}", st.message());
        let d = st.get_error_details();
        let info = d.error_info().expect("ErrorInfo");
        assert_eq!(info.reason, reason);
        assert_eq!(info.domain, "dapr.io");
    }
    let st = g
        .bulk_publish_event(pb::BulkPublishRequest {
            pubsub_name: "pubsub".into(),
            topic: "t".into(),
            entries: vec![pb::BulkPublishRequestEntry {
                entry_id: String::new(),
                event: b"x".to_vec(),
                content_type: "text/plain".into(),
                metadata: HashMap::new(),
            }],
            metadata: HashMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        st.get_error_details().error_info().unwrap().reason,
        "DAPR_PUBSUB_MARSHAL_EVENTS"
    );
    assert_eq!(
        st.get_error_details()
            .resource_info()
            .unwrap()
            .resource_name,
        "pubsub"
    );
}

#[tokio::test]
async fn grpc_bulk_publish_both_methods() {
    let h = start().await;
    let (_s, mut rx) = h.subscribe("pubsub", "gb").await;
    let mut g = h.grpc_raw().await;
    let entries = || {
        vec![
            pb::BulkPublishRequestEntry {
                entry_id: "1".into(),
                event: br#"{"n":1}"#.to_vec(),
                content_type: "application/json".into(),
                metadata: HashMap::new(),
            },
            pb::BulkPublishRequestEntry {
                entry_id: "2".into(),
                event: b"two".to_vec(),
                content_type: "text/plain".into(),
                metadata: HashMap::new(),
            },
        ]
    };
    let r = g
        .bulk_publish_event(pb::BulkPublishRequest {
            pubsub_name: "pubsub".into(),
            topic: "gb".into(),
            entries: entries(),
            metadata: HashMap::new(),
        })
        .await
        .unwrap();
    assert!(r.into_inner().failed_entries.is_empty());
    let r = g
        .bulk_publish_event_alpha1(pb::BulkPublishRequest {
            pubsub_name: "pubsub".into(),
            topic: "gb".into(),
            entries: entries(),
            metadata: HashMap::new(),
        })
        .await
        .unwrap();
    assert!(r.into_inner().failed_entries.is_empty());
    let mut datas = Vec::new();
    for _ in 0..4 {
        datas.push(json(&next(&mut rx).await)["data"].to_string());
    }
    datas.sort();
    assert_eq!(datas, [r#""two""#, r#""two""#, r#"{"n":1}"#, r#"{"n":1}"#]);
}

#[tokio::test]
async fn other_dapr_methods_are_unimplemented_and_streams_need_an_initial_request() {
    let h = start().await;
    let mut g = h.grpc_raw().await;
    let st = g
        .subscribe_topic_events_alpha1(futures::stream::empty())
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unknown);
    assert_eq!(st.message(), "initial request is required");
    // A method of the Dapr service that daprd-rs does not declare at all.
    let opts = dapr::client::ClientOptions::new()
        .with_address(h.grpc.clone())
        .without_api_token();
    let mut client = dapr::Client::from_options(opts).await.unwrap();
    let err = client.get_state("store", "key", None).await.unwrap_err();
    assert!(format!("{err:?}").contains("Unimplemented"), "{err:?}");
}

#[tokio::test]
async fn api_token_is_enforced_on_both_protocols() {
    let env = Env {
        api_token: Some("s3cret".into()),
        ..Env::default()
    };
    let h = start_with(&[&in_memory_component("pubsub", &[])], "checkout", env).await;
    let resp = h
        .post("/v1.0/publish/pubsub/t")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.text().await.unwrap().trim(), "invalid api token");
    let resp = h
        .post("/v1.0/publish/pubsub/t")
        .header("dapr-api-token", "wrong")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = h
        .post("/v1.0/publish/pubsub/t")
        .header("dapr-api-token", "s3cret")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let resp = h
        .client
        .get(format!("{}/v1.0/healthz", h.http))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204, "healthz is exempt");
    let resp = h
        .client
        .get(format!("{}/v1.0/metadata", h.http))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let mut g = h.grpc_raw().await;
    let st = g.get_metadata(pb::GetMetadataRequest {}).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unauthenticated);
    assert_eq!(st.message(), "Unauthorized");
    let info = st.get_error_details().error_info().cloned().unwrap();
    assert_eq!(
        info.metadata.get("http.error_message").map(String::as_str),
        Some("missing api token in request metadata")
    );
    let opts = dapr::client::ClientOptions::new()
        .with_address(h.grpc.clone())
        .with_api_token("s3cret");
    let mut client = dapr::Client::from_options(opts).await.unwrap();
    assert_eq!(client.get_metadata().await.unwrap().id, "checkout");
    let opts = dapr::client::ClientOptions::new()
        .with_address(h.grpc.clone())
        .with_api_token("bad");
    let mut client = dapr::Client::from_options(opts).await.unwrap();
    let err = client.get_metadata().await.unwrap_err();
    assert!(format!("{err:?}").contains("Unauthenticated"), "{err:?}");
}

#[tokio::test]
async fn health_metadata_and_shutdown() {
    let h = start().await;
    let get = |p: &str| h.client.get(format!("{}{}", h.http, p)).send();
    assert_eq!(get("/v1.0/healthz").await.unwrap().status(), 204);
    assert_eq!(
        get("/v1.0/healthz?appid=checkout").await.unwrap().status(),
        204
    );
    let (status, body) = error_body(get("/v1.0/healthz?appid=other").await.unwrap()).await;
    assert_eq!(
        (status, body["errorCode"].as_str()),
        (500, Some("ERR_HEALTH_APPID_NOT_MATCH"))
    );
    assert_eq!(get("/v1.0/healthz/outbound").await.unwrap().status(), 204);

    let resp = h
        .client
        .put(format!("{}/v1.0/metadata/owner", h.http))
        .body("team-a")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let md: Value = get("/v1.0/metadata").await.unwrap().json().await.unwrap();
    assert_eq!(md["id"], "checkout");
    assert_eq!(md["extended"]["owner"], "team-a");
    assert_eq!(md["components"][0]["name"], "pubsub");
    assert_eq!(md["components"][0]["type"], "pubsub.in-memory");
    assert_eq!(md["components"][0]["version"], "v1");
    assert_eq!(
        md["components"][0]["capabilities"][0],
        "SUBSCRIBE_WILDCARDS"
    );
    assert_eq!(md["actorRuntime"]["runtimeStatus"], "DISABLED");
    assert_eq!(md["appConnectionProperties"]["channelAddress"], "127.0.0.1");

    let mut g = h.grpc_raw().await;
    g.set_metadata(pb::SetMetadataRequest {
        key: "k".into(),
        value: "v".into(),
    })
    .await
    .unwrap();
    let md = g
        .get_metadata(pb::GetMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(md.extended_metadata.get("k").map(String::as_str), Some("v"));
    assert_eq!(
        md.extended_metadata.get("owner").map(String::as_str),
        Some("team-a")
    );

    let resp = h.post("/v1.0/shutdown").send().await.unwrap();
    assert_eq!(resp.status(), 204);
    assert!(h.state.shutdown.is_triggered());
    daprd_testkit::eventually(Duration::from_secs(10), "the HTTP API to stop", || async {
        get("/v1.0/healthz").await.is_err().then_some(())
    })
    .await;
}

#[tokio::test]
async fn max_body_size_is_enforced() {
    let r = sidecar::start(
        &[&in_memory_component("pubsub", &[])],
        "a",
        Env::default(),
        &["--max-body-size", "1Ki"],
    )
    .await;
    let (http, grpc) = (r.http.clone(), r.grpc.clone());
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{http}/v1.0/publish/pubsub/t"))
        .body(vec![b'a'; 2048])
        .send()
        .await
        .unwrap();
    // Go daprd's answer: its body limit makes the read fail, which the publish handler
    // reports as a failed publish (500, ERR_PUBSUB_PUBLISH_MESSAGE).
    assert_eq!(resp.status(), 500);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errorCode"], "ERR_PUBSUB_PUBLISH_MESSAGE");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("--max-body-size"),
        "{body}"
    );
    // Bulk publish: Go daprd's JSON decoder fails on the cut stream (400,
    // ERR_PUBSUB_EVENTS_SER).
    let resp = client
        .post(format!("{http}/v1.0-alpha1/publish/bulk/pubsub/t"))
        .body(format!(
            "[{{\"entryId\":\"1\",\"event\":\"{}\",\"contentType\":\"text/plain\"}}]",
            "a".repeat(2048)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["errorCode"], "ERR_PUBSUB_EVENTS_SER", "{body}");
    let resp = client
        .post(format!("{http}/v1.0/publish/pubsub/t"))
        .body(vec![b'a'; 512])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let mut g = pb::dapr_client::DaprClient::connect(grpc).await.unwrap();
    let st = g
        .publish_event(pb::PublishEventRequest {
            pubsub_name: "pubsub".into(),
            topic: "t".into(),
            data: vec![b'a'; 2048],
            ..Default::default()
        })
        .await
        .unwrap_err();
    // grpc-go's answer (Go daprd), not tonic's OUT_OF_RANGE.
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
    assert_eq!(
        st.message(),
        format!("grpc: received message larger than max ({} vs. 1024)", {
            use prost::Message as _;
            pb::PublishEventRequest {
                pubsub_name: "pubsub".into(),
                topic: "t".into(),
                data: vec![b'a'; 2048],
                ..Default::default()
            }
            .encoded_len()
        }),
    );
    // Under the limit over gRPC too.
    g.publish_event(pb::PublishEventRequest {
        pubsub_name: "pubsub".into(),
        topic: "t".into(),
        data: vec![b'a'; 512],
        ..Default::default()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn cors_follows_allowed_origins() {
    let r = sidecar::start(
        &[&in_memory_component("pubsub", &[])],
        "a",
        Env::default(),
        &["--allowed-origins", "http://good.example"],
    )
    .await;
    let http = r.http.clone();
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(
                reqwest::Method::OPTIONS,
                format!("{http}/v1.0/publish/pubsub/t"),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
    };
    let ok = preflight("http://good.example").await.unwrap();
    assert_eq!(
        ok.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("http://good.example")
    );
    let bad = preflight("http://evil.example").await.unwrap();
    assert!(bad.headers().get("access-control-allow-origin").is_none());
    let resp = client
        .post(format!("{http}/v1.0/publish/pubsub/t"))
        .header("origin", "http://good.example")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        resp.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("http://good.example")
    );
}

#[tokio::test]
async fn namespaced_components_prefix_broker_topics() {
    let env = Env {
        namespace: Some("prod".into()),
        ..Env::default()
    };
    let h = start_with(
        &[&in_memory_component(
            "nsps",
            &[("consumerID", "{namespace}")],
        )],
        "checkout",
        env,
    )
    .await;
    // Subscribing on the component itself sees the broker topic.
    let (_s, mut rx) = h.subscribe("nsps", "prodorders").await;
    let resp = h
        .post("/v1.0/publish/nsps/orders")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let m = next(&mut rx).await;
    assert_eq!(
        m.topic, "prodorders",
        "the raw namespace is prefixed, no separator"
    );
    assert_eq!(
        json(&m)["topic"],
        "orders",
        "the envelope keeps the API topic"
    );
}

/// A bulk publish is built a chunk at a time, but every entry is checked first: an invalid
/// CloudEvent in the last chunk fails the request before any entry is published.
#[tokio::test]
async fn bulk_publish_checks_every_entry_before_publishing_any() {
    let h = start().await;
    let (_sub, mut rx) = h.subscribe("pubsub", "bulkcheck").await;
    let mut entries: Vec<Value> = (0..1500)
        .map(|i| serde_json::json!({"entryId": i.to_string(), "event": "x", "contentType": "text/plain"}))
        .collect();
    entries.push(
        serde_json::json!({"entryId": "bad", "event": "not an object",
                                    "contentType": "application/cloudevents+json"}),
    );
    let (status, body) = error_body(
        h.post("/v1.0-alpha1/publish/bulk/pubsub/bulkcheck")
            .json(&entries)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["errorCode"], "ERR_PUBSUB_CLOUD_EVENTS_SER", "{body}");
    // The same request without the bad entry publishes all 1500 (two chunks).
    entries.pop();
    let resp = h
        .post("/v1.0-alpha1/publish/bulk/pubsub/bulkcheck")
        .json(&entries)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    for _ in 0..1500 {
        let m = next(&mut rx).await;
        assert!(
            !String::from_utf8_lossy(&m.data).contains("not an object"),
            "nothing of the refused request was published"
        );
    }
    assert!(rx.try_recv().is_err(), "exactly the second request's 1500");
}
