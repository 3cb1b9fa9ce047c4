//! The gRPC app channel (`AppCallback`): `OnTopicEvent`, `OnBulkTopicEvent` (falling back to
//! the alpha method) and `ListTopicSubscriptions`.

use std::time::Duration;

use async_trait::async_trait;
use daprd_proto::runtime::v1 as pb;
use serde_json::Value as Json;

use super::reach::{Reach, HOLD};
use super::{
    all, with_discovery_retries, AppChannel, AppReply, BulkDelivery, BulkReply, ChannelError,
    Concurrency, Delivery,
};
use crate::inbound::subscriptions::{self, SubscriptionSpec};
use crate::resiliency::StatusCode;

/// The gRPC app channel (`AppCallback`).
pub struct GrpcChannel {
    channel: tonic::transport::Channel,
    client: pb::app_callback_client::AppCallbackClient<tonic::transport::Channel>,
    token: Option<String>,
    concurrency: Concurrency,
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    reach: Reach,
}

const ON_TOPIC_EVENT: &str = "/dapr.proto.runtime.v1.AppCallback/OnTopicEvent";
const ON_BULK_TOPIC_EVENT: &str = "/dapr.proto.runtime.v1.AppCallback/OnBulkTopicEvent";
const ON_BULK_TOPIC_EVENT_ALPHA1: &str =
    "/dapr.proto.runtime.v1.AppCallbackAlpha/OnBulkTopicEventAlpha1";

impl GrpcChannel {
    /// A lazily connected channel to `address:port` (`tls`: grpcs, certificate not verified).
    ///
    /// # Errors
    /// The address does not make a valid URI.
    pub fn new(
        address: &str,
        port: u16,
        tls: bool,
        token: Option<String>,
        max_concurrency: i64,
    ) -> Result<Self, ChannelError> {
        let host = super::uri_host(address);
        let channel = if tls {
            super::tls::grpcs_channel(&host, port)?
        } else {
            tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))
                .map_err(|e| ChannelError::address(&host, e))?
                .connect_timeout(Duration::from_secs(5))
                .connect_lazy()
        };
        Ok(Self {
            client: pb::app_callback_client::AppCallbackClient::new(channel.clone())
                .max_decoding_message_size(usize::MAX),
            channel,
            token,
            concurrency: Concurrency::new(max_concurrency),
            metrics: None,
            reach: Reach::new(address, port, HOLD, None),
        })
    }

    /// Deliveries waiting for an app that stopped listening give up when `shutdown` begins.
    #[must_use]
    pub fn with_shutdown(mut self, shutdown: crate::state::Shutdown) -> Self {
        self.reach = self.reach.with_shutdown(shutdown);
        self
    }

    /// The app's reachability as this channel sees it.
    #[cfg(test)]
    pub(crate) fn reach(&self) -> &Reach {
        &self.reach
    }

    /// A call that failed before the app answered (tonic reports a refused or broken
    /// connection as `Unavailable`) makes the app's reachability suspect.
    fn check(&self, st: &tonic::Status) {
        if st.code() == tonic::Code::Unavailable {
            self.reach.suspect();
        }
    }

    /// Counts every call to the app in the `dapr_grpc_io_client_*` series of `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics.enabled().then_some(metrics);
        self
    }

    /// Records one call of `method` that sent `sent` message bytes.
    fn record<T: prost::Message>(
        &self,
        method: &str,
        sent: usize,
        result: &Result<tonic::Response<T>, tonic::Status>,
        started: std::time::Instant,
    ) {
        if let Some(m) = &self.metrics {
            let (code, received) = match result {
                Ok(r) => (tonic::Code::Ok, r.get_ref().encoded_len()),
                Err(st) => (st.code(), 0),
            };
            m.grpc_client(method, code, sent, received, started.elapsed());
        }
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            if let Ok(v) = t.parse() {
                r.metadata_mut().insert("dapr-api-token", v);
            }
        }
        r
    }
}

fn json_to_prost(v: &Json) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_prost).collect(),
        }),
        Json::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_prost(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Builds the `TopicEventRequest` Go daprd sends a gRPC app, from a decoded CloudEvent.
///
/// # Errors
/// `data_base64` that is not valid base64.
pub fn topic_event_request(d: &Delivery) -> Result<pb::TopicEventRequest, String> {
    use base64::Engine as _;
    use daprd_core::cloudevent as ce;
    let s = |k: &str| {
        d.event
            .get(k)
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string()
    };
    let content_type = s("datacontenttype");
    let data = if let Some(b64) = d.event.get("data_base64").filter(|v| !v.is_null()) {
        let text = b64.as_str().unwrap_or("");
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("invalid data_base64: {e}"))?
    } else if let Some(data) = d.event.get("data").filter(|v| !v.is_null()) {
        if ce::is_string_content_type(&content_type) {
            match data {
                Json::String(s) => s.clone().into_bytes(),
                other => other.to_string().into_bytes(),
            }
        } else if ce::is_json_content_type(&content_type)
            || ce::is_cloudevent_content_type(&content_type)
        {
            daprd_core::json::to_vec_go(data).unwrap_or_default()
        } else {
            Vec::new()
        }
    } else {
        Vec::new()
    };
    const CORE: [&str; 7] = [
        "id",
        "source",
        "datacontenttype",
        "type",
        "specversion",
        "data",
        "data_base64",
    ];
    let extensions = prost_types::Struct {
        fields: d
            .event
            .iter()
            .filter(|(k, _)| !CORE.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), json_to_prost(v)))
            .collect(),
    };
    Ok(pb::TopicEventRequest {
        id: s("id"),
        source: s("source"),
        r#type: s("type"),
        spec_version: s("specversion"),
        data_content_type: content_type,
        topic: d.topic.clone(),
        data,
        pubsub_name: d.pubsub.clone(),
        path: d.path.clone(),
        extensions: Some(extensions),
    })
}

/// What Go daprd makes of a gRPC app's `TopicEventResponse` status value.
pub fn interpret_grpc_status(status: i32) -> AppReply {
    use pb::topic_event_response::TopicEventResponseStatus as S;
    match S::try_from(status) {
        Ok(S::Success) => AppReply::Success,
        Ok(S::Retry) => AppReply::Retry("app asked for a retry".into(), None),
        Ok(S::Drop) => AppReply::Drop {
            dead_letter: true,
            reason: "app dropped the message".into(),
        },
        Err(_) => AppReply::Retry(format!("unknown status {status} returned by the app"), None),
    }
}

#[async_trait]
impl AppChannel for GrpcChannel {
    async fn health_probe(&self, _path: &str, timeout: Duration) -> bool {
        let mut client = pb::app_callback_health_check_client::AppCallbackHealthCheckClient::new(
            self.channel.clone(),
        );
        matches!(
            tokio::time::timeout(timeout, client.health_check(self.request(()))).await,
            Ok(Ok(_))
        )
    }

    async fn list_subscriptions(&self) -> Result<Vec<SubscriptionSpec>, ChannelError> {
        let resp = with_discovery_retries(|| async {
            match self
                .client
                .clone()
                .list_topic_subscriptions(self.request(()))
                .await
            {
                Ok(r) => Ok(Some(r.into_inner())),
                Err(st) if st.code() == tonic::Code::Unimplemented => Ok(None),
                Err(st) => Err(ChannelError::discovery("calling ListTopicSubscriptions")(
                    st.into(),
                )),
            }
        })
        .await?;
        let Some(resp) = resp else {
            tracing::info!(
                "app does not implement ListTopicSubscriptions: no programmatic subscriptions"
            );
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for s in resp.subscriptions {
            let (rules, default) = match &s.routes {
                Some(r) => (
                    r.rules
                        .iter()
                        .map(|x| (x.r#match.clone(), x.path.clone()))
                        .collect::<Vec<_>>(),
                    r.default.clone(),
                ),
                None => (Vec::new(), String::new()),
            };
            let mut rules = subscriptions::build_rules(&rules, &default, "")
                .map_err(ChannelError::Subscriptions)?;
            if rules.is_empty() {
                rules = subscriptions::build_rules(&[], "", "/")
                    .map_err(ChannelError::Subscriptions)?;
                if let Some(r) = rules.first_mut() {
                    r.path = String::new();
                }
            }
            let bulk = s
                .bulk_subscribe
                .as_ref()
                .map(|b| subscriptions::BulkSubscribe {
                    enabled: b.enabled,
                    max_messages: if b.max_messages_count > 0 {
                        usize::try_from(b.max_messages_count).unwrap_or(100)
                    } else {
                        100
                    },
                    max_await_ms: if b.max_await_duration_ms > 0 {
                        u64::try_from(b.max_await_duration_ms).unwrap_or(1000)
                    } else {
                        1000
                    },
                });
            out.push(SubscriptionSpec {
                name: String::new(),
                pubsub: s.pubsub_name,
                topic: s.topic,
                rules,
                metadata: s.metadata.into_iter().collect(),
                dead_letter_topic: s.dead_letter_topic,
                bulk: bulk.unwrap_or_default(),
                kind: subscriptions::SubscriptionKind::Programmatic,
                scopes: Vec::new(),
            });
        }
        Ok(out)
    }

    async fn deliver(&self, d: &Delivery) -> AppReply {
        if let Err(why) = self.reach.ready().await {
            return AppReply::Retry(why, None);
        }
        let _permit = self.concurrency.acquire().await;
        let msg = match topic_event_request(d) {
            Ok(m) => m,
            Err(e) => return AppReply::Retry(e, None),
        };
        let mut req = self.request(msg);
        for (k, v) in &d.metadata {
            let lower = k.to_ascii_lowercase();
            if lower == "content-type"
                || lower == "content-length"
                || lower.ends_with("-bin")
                || lower == "traceparent"
                || lower == "tracestate"
            {
                continue;
            }
            if let (Ok(key), Ok(val)) = (
                lower.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
                v.parse(),
            ) {
                req.metadata_mut().insert(key, val);
            }
        }
        if let Ok(tp) = d.traceparent.parse() {
            req.metadata_mut().insert("traceparent", tp);
        }
        let sent = self
            .metrics
            .as_ref()
            .map_or(0, |_| prost::Message::encoded_len(req.get_ref()));
        let started = std::time::Instant::now();
        let result = self.client.clone().on_topic_event(req).await;
        self.record(ON_TOPIC_EVENT, sent, &result, started);
        match result {
            Ok(r) => interpret_grpc_status(r.into_inner().status),
            Err(st) if st.code() == tonic::Code::Unimplemented => AppReply::Drop {
                dead_letter: false,
                reason: "app does not implement OnTopicEvent".into(),
            },
            Err(st) => {
                self.check(&st);
                AppReply::Retry(
                    format!("OnTopicEvent failed: {st}"),
                    Some(StatusCode::Grpc(st.code())),
                )
            }
        }
    }

    async fn deliver_bulk(&self, b: &BulkDelivery) -> BulkReply {
        use pb::topic_event_bulk_request_entry::Event;
        if let Err(why) = self.reach.ready().await {
            return all(b, &AppReply::Retry(why, None));
        }
        let _permit = self.concurrency.acquire().await;
        let mut entries = Vec::with_capacity(b.entries.len());
        for e in &b.entries {
            let event = match &e.raw {
                Some(raw) => Event::Bytes(raw.to_vec()),
                None => match topic_event_request(&e.delivery) {
                    Ok(t) => Event::CloudEvent(pb::TopicEventCeRequest {
                        id: t.id,
                        source: t.source,
                        r#type: t.r#type,
                        spec_version: t.spec_version,
                        data_content_type: t.data_content_type,
                        data: t.data,
                        extensions: t.extensions,
                    }),
                    Err(err) => return all(b, &AppReply::Retry(err, None)),
                },
            };
            entries.push(pb::TopicEventBulkRequestEntry {
                entry_id: e.entry_id.clone(),
                event: Some(event),
                content_type: e.content_type.clone(),
                metadata: e.delivery.metadata.clone().into_iter().collect(),
            });
        }
        let msg = pb::TopicEventBulkRequest {
            id: b.id.clone(),
            entries,
            metadata: b.metadata.clone().into_iter().collect(),
            topic: b.topic.clone(),
            pubsub_name: b.pubsub.clone(),
            r#type: daprd_core::cloudevent::DEFAULT_BULK_TYPE.into(),
            path: b.path.clone(),
        };
        let sent = self
            .metrics
            .as_ref()
            .map_or(0, |_| prost::Message::encoded_len(&msg));
        let started = std::time::Instant::now();
        let mut result = self
            .client
            .clone()
            .on_bulk_topic_event(self.request(msg.clone()))
            .await;
        self.record(ON_BULK_TOPIC_EVENT, sent, &result, started);
        if matches!(&result, Err(st) if st.code() == tonic::Code::Unimplemented) {
            tracing::debug!(topic = %b.topic, "app does not implement OnBulkTopicEvent; falling back to OnBulkTopicEventAlpha1");
            let mut alpha =
                pb::app_callback_alpha_client::AppCallbackAlphaClient::new(self.channel.clone());
            let started = std::time::Instant::now();
            result = alpha.on_bulk_topic_event_alpha1(self.request(msg)).await;
            self.record(ON_BULK_TOPIC_EVENT_ALPHA1, sent, &result, started);
        }
        match result {
            Ok(r) => r
                .into_inner()
                .statuses
                .into_iter()
                .map(|s| (s.entry_id, interpret_grpc_status(s.status)))
                .collect(),
            Err(st) if st.code() == tonic::Code::Unimplemented => all(
                b,
                &AppReply::Drop {
                    dead_letter: false,
                    reason: "app implements no bulk topic event method".into(),
                },
            ),
            Err(st) => {
                self.check(&st);
                all(
                    b,
                    &AppReply::Retry(
                        format!("OnBulkTopicEvent failed: {st}"),
                        Some(StatusCode::Grpc(st.code())),
                    ),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::Map;
    use std::collections::BTreeMap;

    #[tokio::test]
    async fn an_unusable_app_address_is_named() {
        for tls in [false, true] {
            let err = GrpcChannel::new("not a host", 50001, tls, None, -1)
                .err()
                .expect("the address is refused");
            assert!(
                matches!(&err, ChannelError::Address { address, .. } if address == "not a host"),
                "{err:?}"
            );
        }
    }

    #[test]
    fn grpc_status_table() {
        assert_eq!(interpret_grpc_status(0), AppReply::Success);
        assert!(matches!(interpret_grpc_status(1), AppReply::Retry(..)));
        assert!(matches!(
            interpret_grpc_status(2),
            AppReply::Drop {
                dead_letter: true,
                ..
            }
        ));
        assert!(matches!(interpret_grpc_status(7), AppReply::Retry(..)));
    }

    #[test]
    fn topic_event_request_mapping() {
        let event: Map<String, Json> = serde_json::from_str(
            r#"{"id":"1","source":"s","type":"t","specversion":"1.0","datacontenttype":"application/json","data":{"a":1},"topic":"orders","pubsubname":"ps","traceid":"x","custom":"c"}"#,
        ).unwrap();
        let d = Delivery {
            path: "/orders".into(),
            body: Bytes::new(),
            event,
            metadata: BTreeMap::new(),
            topic: "orders".into(),
            pubsub: "ps".into(),
            traceparent: String::new(),
            tracestate: String::new(),
        };
        let r = topic_event_request(&d).unwrap();
        assert_eq!(
            (
                r.id.as_str(),
                r.source.as_str(),
                r.r#type.as_str(),
                r.spec_version.as_str()
            ),
            ("1", "s", "t", "1.0")
        );
        assert_eq!(r.data, br#"{"a":1}"#);
        assert_eq!(r.path, "/orders");
        let ext = r.extensions.unwrap().fields;
        assert!(
            ext.contains_key("topic")
                && ext.contains_key("pubsubname")
                && ext.contains_key("traceid")
                && ext.contains_key("custom")
        );
        assert!(!ext.contains_key("id") && !ext.contains_key("data"));

        let mut d2 = d.clone();
        d2.event =
            serde_json::from_str(r#"{"id":"2","datacontenttype":"text/plain","data":"hello"}"#)
                .unwrap();
        assert_eq!(topic_event_request(&d2).unwrap().data, b"hello");
        d2.event = serde_json::from_str(
            r#"{"id":"3","datacontenttype":"application/octet-stream","data_base64":"AAE="}"#,
        )
        .unwrap();
        assert_eq!(topic_event_request(&d2).unwrap().data, vec![0, 1]);
        d2.event = serde_json::from_str(r#"{"id":"4","data_base64":"!!"}"#).unwrap();
        assert!(topic_event_request(&d2).is_err());
    }
}
