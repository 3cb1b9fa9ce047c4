//! `pubsub.gcp.pubsub` metadata: Dapr's keys and defaults, parsed without I/O.

use std::time::Duration;

use daprd_core::metadata::{Metadata, MetadataError, MetadataReader};

/// Parsed `pubsub.gcp.pubsub` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct GcpMetadata {
    /// `projectId` (keys are matched case-insensitively, so Go's `projectID` too), required.
    pub project_id: String,
    /// `endpoint`: a Pub/Sub emulator's `host:port`; else `PUBSUB_EMULATOR_HOST` (as Go daprd,
    /// which sets that variable from `endpoint`).
    pub endpoint: Option<String>,
    /// `consumerID` (daprd sets it to the app id): subscriptions are `<consumerID>-<topic>`.
    pub consumer_id: String,
    /// The service account of the metadata, when `privateKeyId` is given (as Go daprd:
    /// without it, Application Default Credentials). Its key is checked at parse time.
    pub service_account: Option<ServiceAccountFields>,
    /// `identityProjectId`: the service account's own project (Go daprd writes it into the
    /// key's `project_id`, which does not take part in signing; read for compatibility).
    pub identity_project_id: Option<String>,
    /// `disableEntityManagement`: topics and subscriptions must exist; none is created.
    pub disable_entity_management: bool,
    /// `enableMessageOrdering`: subscriptions deliver in ordering-key order, and publishes
    /// carry an ordering key.
    pub enable_message_ordering: bool,
    /// `orderingKey`: the ordering key of every publish (a publish's own `orderingKey`
    /// metadata wins); only with `enableMessageOrdering`.
    pub ordering_key: Option<String>,
    /// `deadLetterTopic`: the subscription's server-side dead-letter topic.
    pub dead_letter_topic: Option<String>,
    /// `maxDeliveryAttempts` (5): deliveries before a message goes to `deadLetterTopic`.
    pub max_delivery_attempts: i32,
    /// `ackDeadline` (20s): the subscription's acknowledgement deadline.
    pub ack_deadline: Duration,
    /// `maxOutstandingMessages` (1000): messages the server hands out before acks.
    pub max_outstanding_messages: i64,
    /// `maxOutstandingBytes` (1e9): bytes the server hands out before acks.
    pub max_outstanding_bytes: i64,
    /// `maxConcurrentConnections` (10): streaming pulls per subscription (here: one; the
    /// key is accepted for compatibility).
    pub max_concurrent_connections: i64,
    /// `maxReconnectionAttempts` (30): failed pulls in a row before a subscription gives up.
    pub max_reconnection_attempts: u32,
    /// `connectionRecoveryInSec` (2): the pause between those attempts.
    pub connection_recovery: Duration,
}

/// A service account given in the metadata (the fields of its key file).
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceAccountFields {
    /// `clientEmail`.
    pub client_email: String,
    /// `privateKeyId`.
    pub private_key_id: String,
    /// `privateKey` (PEM).
    pub private_key: String,
}

impl std::fmt::Debug for ServiceAccountFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountFields")
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .finish_non_exhaustive()
    }
}

impl GcpMetadata {
    /// Parses and checks `md`; `emulator_env` is `PUBSUB_EMULATOR_HOST`, if set.
    ///
    /// # Errors
    /// Every bad key.
    pub fn parse(md: &Metadata, emulator_env: Option<&str>) -> Result<Self, Vec<MetadataError>> {
        let mut r = MetadataReader::new(md);
        let project_id = match md.get_non_empty("projectId") {
            Some(p) => p.to_string(),
            None => {
                r.fail("projectId", "is required");
                String::new()
            }
        };
        let consumer_id = r.required("consumerID", " (daprd sets it to the app id)");
        let endpoint = md
            .get_non_empty("endpoint")
            .or(emulator_env.filter(|e| !e.trim().is_empty()))
            .map(|e| e.trim().to_string());
        let service_account = Self::service_account(&mut r);
        let identity_project_id = md.get_non_empty("identityProjectId").map(str::to_string);
        let disable_entity_management = r.bool("disableEntityManagement", false);
        let enable_message_ordering = r.bool("enableMessageOrdering", false);
        let ordering_key = md.get_non_empty("orderingKey").map(str::to_string);
        let dead_letter_topic = md.get_non_empty("deadLetterTopic").map(str::to_string);
        let max_delivery_attempts = r.int("maxDeliveryAttempts", 5, 5..=100);
        let ack_deadline = r.duration(
            "ackDeadline",
            Duration::from_secs(1),
            Duration::from_secs(20),
        );
        if !(Duration::from_secs(10)..=Duration::from_secs(600)).contains(&ack_deadline) {
            r.fail(
                "ackDeadline",
                "must be between 10s and 600s (a Pub/Sub limit)",
            );
        }
        let max_outstanding_messages = r.int("maxOutstandingMessages", 1000, 1..=i64::MAX);
        let max_outstanding_bytes = r.int("maxOutstandingBytes", 1_000_000_000, 1..=i64::MAX);
        let max_concurrent_connections = r.int("maxConcurrentConnections", 10, 1..=1000);
        let max_reconnection_attempts =
            r.int("maxReconnectionAttempts", 30, 1..=i64::from(u32::MAX));
        let recovery = r.int("connectionRecoveryInSec", 2, 1..=3600);
        r.finish(|| Self {
            project_id,
            endpoint,
            consumer_id,
            service_account,
            identity_project_id,
            disable_entity_management,
            enable_message_ordering,
            ordering_key,
            dead_letter_topic,
            max_delivery_attempts: i32::try_from(max_delivery_attempts).unwrap_or(5),
            ack_deadline,
            max_outstanding_messages,
            max_outstanding_bytes,
            max_concurrent_connections,
            max_reconnection_attempts: u32::try_from(max_reconnection_attempts).unwrap_or(30),
            connection_recovery: Duration::from_secs(recovery.unsigned_abs()),
        })
    }

    /// `privateKeyId` with `clientEmail` and `privateKey` (whose key must load; `type`, if
    /// given, `service_account`). A `privateKey` without `privateKeyId` is refused: Go daprd
    /// would ignore it and fall back to the machine's credentials.
    fn service_account(r: &mut MetadataReader<'_>) -> Option<ServiceAccountFields> {
        let md = r.md();
        let Some(key_id) = md.get_non_empty("privateKeyId").map(str::to_string) else {
            if md.get_non_empty("privateKey").is_some() {
                r.fail(
                    "privateKey",
                    "is given without privateKeyId (a service account needs privateKeyId, clientEmail and privateKey)",
                );
            }
            return None;
        };
        let kind = md.get_non_empty("type").map(str::to_string);
        let client_email = r.required("clientEmail", " with privateKeyId");
        let private_key = r.required("privateKey", " with privateKeyId");
        if let Some(kind) = kind.filter(|k| k != "service_account") {
            r.fail(
                "type",
                format!("is {kind}: the metadata's credential fields make a service_account key (other kinds come from GOOGLE_APPLICATION_CREDENTIALS)"),
            );
        }
        if !private_key.is_empty() {
            if let Err(e) = super::auth::ServiceAccount::new(&client_email, &key_id, &private_key) {
                r.fail("privateKey", e);
            }
        }
        Some(ServiceAccountFields {
            client_email,
            private_key_id: key_id,
            private_key,
        })
    }

    /// `projects/<project>/topics/<topic>`.
    pub fn topic_path(&self, topic: &str) -> String {
        format!("projects/{}/topics/{topic}", self.project_id)
    }

    /// `projects/<project>/subscriptions/<consumerID>-<topic>`.
    pub fn subscription_path(&self, topic: &str) -> String {
        format!(
            "projects/{}/subscriptions/{}-{topic}",
            self.project_id, self.consumer_id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> Metadata {
        Metadata::from_pairs(pairs)
    }

    #[test]
    fn defaults_and_names() {
        let m = GcpMetadata::parse(
            &md(&[
                ("projectId", "p"),
                ("consumerID", "app"),
                ("endpoint", "127.0.0.1:8085"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(m.ack_deadline, Duration::from_secs(20));
        assert_eq!(m.max_delivery_attempts, 5);
        assert_eq!(m.max_outstanding_messages, 1000);
        assert_eq!(m.max_reconnection_attempts, 30);
        assert_eq!(m.connection_recovery, Duration::from_secs(2));
        assert!(!m.disable_entity_management && !m.enable_message_ordering);
        assert_eq!(m.topic_path("orders"), "projects/p/topics/orders");
        assert_eq!(
            m.subscription_path("orders"),
            "projects/p/subscriptions/app-orders"
        );
    }

    #[test]
    fn the_emulator_comes_from_the_environment_when_endpoint_is_absent() {
        let m = GcpMetadata::parse(&md(&[("projectID", "p"), ("consumerID", "a")]), Some("h:1"))
            .unwrap();
        assert_eq!(m.endpoint.as_deref(), Some("h:1"));
        assert_eq!(m.project_id, "p");
    }

    #[test]
    fn bad_keys_are_named() {
        let errs = GcpMetadata::parse(
            &md(&[
                ("consumerID", "a"),
                ("privateKey", "k"),
                ("ackDeadline", "5s"),
                ("maxDeliveryAttempts", "2"),
                ("enableMessageOrdering", "maybe"),
            ]),
            None,
        )
        .unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        for key in [
            "projectId",
            "ackDeadline",
            "maxDeliveryAttempts",
            "enableMessageOrdering",
        ] {
            assert!(text.iter().any(|t| t.contains(key)), "{key}: {text:?}");
        }
        assert!(text.iter().any(|t| t.contains("privateKey")), "{text:?}");
    }

    #[test]
    fn a_service_account_in_the_metadata_is_checked() {
        let key = daprd_testkit::gcp::SERVICE_ACCOUNT_KEY;
        let base = [("projectId", "p"), ("consumerID", "a")];
        let with = |extra: &[(&str, &str)]| {
            let mut pairs = base.to_vec();
            pairs.extend_from_slice(extra);
            GcpMetadata::parse(&md(&pairs), None)
        };
        let m = with(&[
            ("privateKeyId", "k1"),
            ("clientEmail", "sa@p.iam.gserviceaccount.com"),
            ("privateKey", key),
            ("type", "service_account"),
            ("identityProjectId", "ip"),
        ])
        .unwrap();
        let sa = m.service_account.unwrap();
        assert_eq!(
            (sa.client_email.as_str(), sa.private_key_id.as_str()),
            ("sa@p.iam.gserviceaccount.com", "k1")
        );
        assert_eq!(m.identity_project_id.as_deref(), Some("ip"));
        assert!(m.endpoint.is_none());
        // none at all: Application Default Credentials, found at connect
        assert!(with(&[]).unwrap().service_account.is_none());
        let text = |errs: Vec<MetadataError>| -> String {
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        };
        let bad = text(
            with(&[
                ("privateKeyId", "k1"),
                (
                    "privateKey",
                    "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
                ),
                ("type", "external_account"),
            ])
            .unwrap_err(),
        );
        for needle in [
            "clientEmail",
            "privateKey",
            "RSA private key",
            "type",
            "external_account",
        ] {
            assert!(bad.contains(needle), "{needle}: {bad}");
        }
        let alone = text(with(&[("privateKey", key)]).unwrap_err());
        assert!(alone.contains("without privateKeyId"), "{alone}");
    }
}
