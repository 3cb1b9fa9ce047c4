//! The CloudEvent decode of the delivery path, and the envelope of the publish path, on
//! arbitrary bytes: no panic, and the one-pass envelope equals the tree envelope.
#![no_main]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use daprd_core::cloudevent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte picks a content type; the rest is the body.
    let types = [
        "application/json",
        "application/cloudevents+json",
        "text/plain",
        "application/octet-stream",
        "application/xml",
        "",
    ];
    let (ct, body) = match data.split_first() {
        Some((b, rest)) => (types[usize::from(*b) % types.len()], rest),
        None => ("", data),
    };
    if let Some(serde_json::Value::Object(event)) = cloudevent::decode_first_json(body) {
        let _ = daprd_runtime::inbound::delivery::has_expired(&event, SystemTime::now());
        let _ = daprd_runtime::inbound::routing::json_to_cel(&serde_json::Value::Object(event));
    }
    let metadata: BTreeMap<String, String> = [
        (
            "ttlInSeconds".to_string(),
            String::from_utf8_lossy(body).into_owned(),
        ),
        ("cloudevent.id".to_string(), "x".to_string()),
    ]
    .into_iter()
    .collect();
    let _ = cloudevent::ttl_from_metadata(&metadata);
    let request = cloudevent::EnvelopeRequest {
        source: "app",
        topic: "t",
        pubsub_name: "p",
        data_content_type: ct,
        data: body,
        traceparent: "",
        tracestate: "",
        metadata: Some(&metadata),
        new_id: "id",
        now: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
    };
    // The one-pass envelope must be the tree envelope's bytes, whatever the body.
    let by_tree = cloudevent::new_envelope(&request).map(|mut envelope| {
        cloudevent::apply_ttl(&mut envelope, &metadata, false, request.now);
        daprd_core::json::to_vec_go(&envelope).expect("a json tree encodes")
    });
    match (by_tree, cloudevent::envelope_bytes(&request, false)) {
        (Ok(tree), Ok(direct)) => assert_eq!(direct, tree, "one-pass envelope differs"),
        (Err(_), Err(_)) => {}
        (tree, direct) => panic!("tree {:?} vs one pass {:?}", tree.is_ok(), direct.is_ok()),
    }
    let _ = daprd_runtime::inbound::delivery::raw_envelope(body, "t", "p", &metadata);
});
