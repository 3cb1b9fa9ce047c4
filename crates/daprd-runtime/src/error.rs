//! Dapr API errors: one type, mapped to both an HTTP response (status + rich JSON body)
//! and a gRPC status (code + `ErrorInfo` / `ResourceInfo` details), exactly as Dapr's
//! pub/sub error table.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tonic::Code;

/// An error answered by the Dapr HTTP or gRPC API.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status.
    pub http_status: u16,
    /// gRPC code.
    pub grpc_code: Code,
    /// Legacy error code (`ERR_PUBSUB_NOT_FOUND`).
    pub error_code: &'static str,
    /// ErrorInfo reason (`DAPR_PUBSUB_NOT_FOUND`).
    pub reason: &'static str,
    /// Message.
    pub message: String,
    /// ResourceInfo name (of type `pubsub`), when the error concerns a resource.
    pub resource: Option<Box<str>>,
    /// ErrorInfo metadata.
    pub metadata: BTreeMap<String, String>,
    /// The error that caused this one (a component's, with its own chain), logged at debug
    /// level when the error is answered; the client sees only Dapr's message.
    #[source]
    pub source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

#[derive(Serialize)]
struct HttpBody<'a> {
    #[serde(rename = "errorCode")]
    error_code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    details: Vec<Detail<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Detail<'a> {
    Resource {
        #[serde(rename = "@type")]
        ty: &'static str,
        resource_type: &'a str,
        resource_name: &'a str,
        owner: &'a str,
        description: &'a str,
    },
    Info {
        #[serde(rename = "@type")]
        ty: &'static str,
        reason: &'a str,
        domain: &'static str,
        #[serde(skip_serializing_if = "BTreeMap::is_empty")]
        metadata: &'a BTreeMap<String, String>,
    },
}

const DOMAIN: &str = "dapr.io";

/// The Dapr error code an HTTP error answer carries (a response extension), for
/// `dapr_error_code_total`: `category` as Dapr groups its codes (`pubsub`, `health`,
/// `common`), `code` the `errorCode` of the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnsweredCode {
    /// Dapr's category of the code.
    pub category: &'static str,
    /// The legacy error code (`ERR_PUBSUB_NOT_FOUND`).
    pub code: &'static str,
}
const RESOURCE_TYPE: &str = "pubsub";

fn md(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl ApiError {
    #[allow(clippy::too_many_arguments)]
    fn pubsub(
        name: &str,
        http_status: u16,
        grpc_code: Code,
        error_code: &'static str,
        reason: &'static str,
        message: String,
        with_resource: bool,
        metadata: BTreeMap<String, String>,
    ) -> Self {
        Self {
            http_status,
            grpc_code,
            error_code,
            reason,
            message,
            resource: with_resource.then(|| name.into()),
            metadata,
            source: None,
        }
    }

    /// This error, caused by `source`.
    #[must_use]
    pub fn caused_by(mut self, source: Arc<dyn std::error::Error + Send + Sync>) -> Self {
        self.source = Some(source);
        self
    }

    /// Logs the cause and its chain (debug level), when there is one.
    fn log_cause(&self) {
        if let Some(source) = &self.source {
            let mut chain = source.to_string();
            let mut next = source.source();
            while let Some(e) = next {
                chain.push_str(": ");
                chain.push_str(&e.to_string());
                next = e.source();
            }
            tracing::debug!(error_code = self.error_code, cause = %chain, "{}", self.message);
        }
    }

    /// `pubsub <n> is not configured`.
    pub fn pubsub_not_configured(name: &str, request_md: &BTreeMap<String, String>) -> Self {
        Self::pubsub(
            name,
            400,
            Code::FailedPrecondition,
            "ERR_PUBSUB_NOT_CONFIGURED",
            "DAPR_PUBSUB_NOT_CONFIGURED",
            format!("pubsub {name} is not configured"),
            false,
            request_md.clone(),
        )
    }

    /// `pubsub name is empty`.
    pub fn pubsub_name_empty(request_md: &BTreeMap<String, String>) -> Self {
        Self::pubsub(
            "",
            404,
            Code::InvalidArgument,
            "ERR_PUBSUB_EMPTY",
            "DAPR_PUBSUB_NAME_EMPTY",
            "pubsub name is empty".into(),
            true,
            request_md.clone(),
        )
    }

    /// `pubsub <n> is not found`.
    pub fn pubsub_not_found(name: &str, request_md: &BTreeMap<String, String>) -> Self {
        Self::pubsub(
            name,
            404,
            Code::InvalidArgument,
            "ERR_PUBSUB_NOT_FOUND",
            "DAPR_PUBSUB_NOT_FOUND",
            format!("pubsub {name} is not found"),
            false,
            request_md.clone(),
        )
    }

    /// `topic is empty in pubsub <n>`.
    pub fn topic_empty(name: &str, request_md: &BTreeMap<String, String>) -> Self {
        Self::pubsub(
            name,
            404,
            Code::InvalidArgument,
            "ERR_TOPIC_NAME_EMPTY",
            "DAPR_PUBSUB_TOPIC_NAME_EMPTY",
            format!("topic is empty in pubsub {name}"),
            true,
            request_md.clone(),
        )
    }

    /// Bad `rawPayload` metadata.
    pub fn metadata_deserialization(
        name: &str,
        err: &str,
        request_md: &BTreeMap<String, String>,
    ) -> Self {
        Self::pubsub(
            name,
            400,
            Code::InvalidArgument,
            "ERR_PUBSUB_REQUEST_METADATA",
            "DAPR_PUBSUB_METADATA_DESERIALIZATION",
            format!("failed deserializing metadata. Error: {err}"),
            true,
            request_md.clone(),
        )
    }

    /// The body could not be turned into a CloudEvent.
    pub fn cloud_event_creation(name: &str, app_id: &str, err: &str) -> Self {
        Self::pubsub(
            name,
            500,
            Code::InvalidArgument,
            "ERR_PUBSUB_CLOUD_EVENTS_SER",
            "DAPR_PUBSUB_CLOUD_EVENT_CREATION",
            "cannot create cloudevent".into(),
            true,
            md(&[("appID", app_id), ("error", err)]),
        )
    }

    /// Envelope could not be serialised, or a bulk entry's event does not match its content type.
    pub fn marshal_envelope(name: &str, topic: &str, app_id: &str, err: &str) -> Self {
        Self::pubsub(name, 400, Code::InvalidArgument, "ERR_PUBSUB_EVENTS_SER", "DAPR_PUBSUB_MARSHAL_ENVELOPE", format!("error when marshalling cloud event envelope for topic {topic} pubsub {name}: {err}"), true, md(&[("appID", app_id), ("error", err)]))
    }

    /// Bulk entry id missing or duplicated.
    pub fn marshal_events(name: &str, topic: &str, app_id: &str) -> Self {
        let err = "entryId is duplicated or not present for entry";
        Self::pubsub(
            name,
            400,
            Code::InvalidArgument,
            "ERR_PUBSUB_EVENTS_SER",
            "DAPR_PUBSUB_MARSHAL_EVENTS",
            format!(
                "error marshaling events to bytes for topic {topic} pubsub {name}. error: {err}"
            ),
            true,
            md(&[("appID", app_id), ("error", err)]),
        )
    }

    /// Bulk body is not a JSON array of entries.
    pub fn unmarshal_events(name: &str, topic: &str, app_id: &str, err: &str) -> Self {
        Self::pubsub(
            name,
            400,
            Code::InvalidArgument,
            "ERR_PUBSUB_EVENTS_SER",
            "DAPR_PUBSUB_UNMARSHAL_EVENTS",
            format!("error when unmarshaling the request for topic {topic} pubsub {name}: {err}"),
            true,
            md(&[("appID", app_id)]),
        )
    }

    /// Publishing forbidden by scoping.
    pub fn forbidden(name: &str, topic: &str, app_id: &str) -> Self {
        let err = format!("topic {topic} is not allowed for app id {app_id}");
        Self::pubsub(
            name,
            403,
            Code::PermissionDenied,
            "ERR_PUBSUB_FORBIDDEN",
            "DAPR_PUBSUB_FORBIDDEN",
            err.clone(),
            true,
            md(&[("topic", topic), ("error", &err)]),
        )
    }

    /// The component went away between lookup and publish.
    pub fn test_not_found(name: &str, topic: &str, err: &str) -> Self {
        Self::pubsub(
            name,
            400,
            Code::NotFound,
            "ERR_PUBSUB_NOT_FOUND",
            "DAPR_PUBSUB_TEST_NOT_FOUND",
            format!("pubsub '{name}' not found"),
            true,
            md(&[("topic", topic), ("error", err)]),
        )
    }

    /// The component or broker failed the publish.
    pub fn publish_message(name: &str, topic: &str, err: &str) -> Self {
        Self::pubsub(
            name,
            500,
            Code::Internal,
            "ERR_PUBSUB_PUBLISH_MESSAGE",
            "DAPR_PUBSUB_PUBLISH_MESSAGE",
            format!("error when publishing to topic {topic} in pubsub {name}: {err}"),
            true,
            md(&[("topic", topic), ("error", err)]),
        )
    }

    /// The rich JSON body of the HTTP response.
    pub fn http_body(&self) -> Vec<u8> {
        let mut details = Vec::new();
        if let Some(name) = &self.resource {
            details.push(Detail::Resource {
                ty: "type.googleapis.com/google.rpc.ResourceInfo",
                resource_type: RESOURCE_TYPE,
                resource_name: name,
                owner: "",
                description: &self.message,
            });
        }
        details.push(Detail::Info {
            ty: "type.googleapis.com/google.rpc.ErrorInfo",
            reason: self.reason,
            domain: DOMAIN,
            metadata: &self.metadata,
        });
        daprd_core::json::to_vec_go(&HttpBody {
            error_code: self.error_code,
            message: &self.message,
            details,
        })
        .unwrap_or_default()
    }

    /// The code and category this error is counted under in `dapr_error_code_total`.
    pub fn answered_code(&self) -> AnsweredCode {
        AnsweredCode {
            category: RESOURCE_TYPE,
            code: self.error_code,
        }
    }

    /// Counts this error in `dapr_error_code_total` (kept only with `recordErrorCodes`).
    pub fn count_in(&self, metrics: &crate::metrics::Metrics) {
        metrics.error_code(RESOURCE_TYPE, self.error_code);
    }

    /// The gRPC status with `ErrorInfo` and `ResourceInfo` details.
    pub fn to_status(&self) -> tonic::Status {
        use tonic_types::{ErrorDetails, StatusExt};
        self.log_cause();
        let mut details = ErrorDetails::new();
        details.set_error_info(
            self.reason,
            DOMAIN,
            self.metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<std::collections::HashMap<_, _>>(),
        );
        if let Some(name) = &self.resource {
            details.set_resource_info(RESOURCE_TYPE, &**name, "", &self.message);
        }
        tonic::Status::with_error_details(self.grpc_code, &self.message, details)
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        self.log_cause();
        let status = http::StatusCode::from_u16(self.http_status)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (
            status,
            [(http::header::CONTENT_TYPE, "application/json")],
            self.http_body(),
        )
            .into_response();
        resp.extensions_mut().insert(self.answered_code());
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_is_kept_but_not_answered() {
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = ApiError::publish_message("ps", "t", "broker down").caused_by(Arc::new(cause));
        let source = std::error::Error::source(&e).expect("the cause is the source");
        assert_eq!(source.to_string(), "refused");
        let body = String::from_utf8(e.http_body()).unwrap();
        assert!(
            body.contains("broker down") && !body.contains("refused"),
            "{body}"
        );
    }

    #[test]
    fn http_body_shape_matches_dapr() {
        let e = ApiError::forbidden("ps", "t", "app1");
        assert_eq!(e.http_status, 403);
        let body: serde_json::Value = serde_json::from_slice(&e.http_body()).unwrap();
        assert_eq!(body["errorCode"], "ERR_PUBSUB_FORBIDDEN");
        assert_eq!(body["message"], "topic t is not allowed for app id app1");
        assert_eq!(
            body["details"][0]["@type"],
            "type.googleapis.com/google.rpc.ResourceInfo"
        );
        assert_eq!(body["details"][0]["resource_type"], "pubsub");
        assert_eq!(body["details"][0]["resource_name"], "ps");
        assert_eq!(
            body["details"][0]["description"],
            "topic t is not allowed for app id app1"
        );
        assert_eq!(
            body["details"][1]["@type"],
            "type.googleapis.com/google.rpc.ErrorInfo"
        );
        assert_eq!(body["details"][1]["reason"], "DAPR_PUBSUB_FORBIDDEN");
        assert_eq!(body["details"][1]["domain"], "dapr.io");
        assert_eq!(body["details"][1]["metadata"]["topic"], "t");
        let text = String::from_utf8(e.http_body()).unwrap();
        assert!(
            text.starts_with(r#"{"errorCode":"ERR_PUBSUB_FORBIDDEN","message":"#),
            "{text}"
        );
    }

    #[test]
    fn not_found_has_no_resource_info() {
        let e = ApiError::pubsub_not_found("nope", &BTreeMap::new());
        let body: serde_json::Value = serde_json::from_slice(&e.http_body()).unwrap();
        assert_eq!(body["details"].as_array().unwrap().len(), 1);
        assert_eq!(body["details"][0]["reason"], "DAPR_PUBSUB_NOT_FOUND");
        assert_eq!(e.grpc_code, Code::InvalidArgument);
        assert_eq!(e.http_status, 404);
    }

    #[test]
    fn grpc_status_carries_details() {
        use tonic_types::StatusExt;
        let st = ApiError::publish_message("ps", "t", "boom").to_status();
        assert_eq!(st.code(), Code::Internal);
        assert_eq!(
            st.message(),
            "error when publishing to topic t in pubsub ps: boom"
        );
        let d = st.get_error_details();
        assert_eq!(
            d.error_info().unwrap().reason,
            "DAPR_PUBSUB_PUBLISH_MESSAGE"
        );
        assert_eq!(d.error_info().unwrap().domain, "dapr.io");
        assert_eq!(d.resource_info().unwrap().resource_name, "ps");
    }

    #[test]
    fn error_table_codes() {
        let m = BTreeMap::new();
        let rows = [
            (
                ApiError::pubsub_not_configured("p", &m),
                400,
                Code::FailedPrecondition,
                "ERR_PUBSUB_NOT_CONFIGURED",
            ),
            (
                ApiError::pubsub_name_empty(&m),
                404,
                Code::InvalidArgument,
                "ERR_PUBSUB_EMPTY",
            ),
            (
                ApiError::topic_empty("p", &m),
                404,
                Code::InvalidArgument,
                "ERR_TOPIC_NAME_EMPTY",
            ),
            (
                ApiError::metadata_deserialization("p", "x", &m),
                400,
                Code::InvalidArgument,
                "ERR_PUBSUB_REQUEST_METADATA",
            ),
            (
                ApiError::cloud_event_creation("p", "a", "x"),
                500,
                Code::InvalidArgument,
                "ERR_PUBSUB_CLOUD_EVENTS_SER",
            ),
            (
                ApiError::marshal_envelope("p", "t", "a", "x"),
                400,
                Code::InvalidArgument,
                "ERR_PUBSUB_EVENTS_SER",
            ),
            (
                ApiError::marshal_events("p", "t", "a"),
                400,
                Code::InvalidArgument,
                "ERR_PUBSUB_EVENTS_SER",
            ),
            (
                ApiError::test_not_found("p", "t", "x"),
                400,
                Code::NotFound,
                "ERR_PUBSUB_NOT_FOUND",
            ),
        ];
        for (e, http, grpc, code) in rows {
            assert_eq!(
                (e.http_status, e.grpc_code, e.error_code),
                (http, grpc, code),
                "{}",
                e.message
            );
        }
    }
}
