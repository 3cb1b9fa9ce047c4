//! `pubsub.aws.snssqs` metadata: Dapr's keys and defaults, parsed without I/O.

use std::time::Duration;

use daprd_core::metadata::{Metadata, MetadataError, MetadataReader};

/// Parsed `pubsub.aws.snssqs` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct SnsSqsMetadata {
    /// `region` (alias `awsRegion`); else the AWS SDK's environment/profile.
    pub region: Option<String>,
    /// `endpoint` (alias `Endpoint`): a local SNS/SQS server such as moto or LocalStack.
    pub endpoint: Option<String>,
    /// `accessKey` (alias `awsAccountID`).
    pub access_key: Option<String>,
    /// `secretKey` (alias `awsSecret`).
    pub secret_key: Option<String>,
    /// `sessionToken`.
    pub session_token: Option<String>,
    /// `consumerID`: the SQS queue every subscribed topic delivers into.
    pub queue_name: String,
    /// `sqsDeadLettersQueueName`: SQS redrive target (with `messageReceiveLimit`).
    pub dead_letters_queue: Option<String>,
    /// `messageReceiveLimit`: receives before SQS moves a message to the dead-letters queue.
    pub message_receive_limit: i64,
    /// `fifo` (false): FIFO topics and queue (`.fifo` names).
    pub fifo: bool,
    /// `fifoMessageGroupID` (default: `consumerID`).
    pub fifo_message_group_id: String,
    /// `messageVisibilityTimeout` (10 s).
    pub visibility_timeout: i32,
    /// `messageRetryLimit` (10): receives after which a message is deleted (no DLQ).
    pub retry_limit: i64,
    /// `disableDeleteOnRetryLimit` (false).
    pub disable_delete_on_retry_limit: bool,
    /// `messageWaitTimeSeconds` (1): long-poll wait.
    pub wait_time_seconds: i32,
    /// `messageMaxNumber` (10): messages per receive.
    pub max_number: i32,
    /// `disableEntityManagement` (false): topics, queues and subscriptions must exist.
    pub disable_entity_management: bool,
    /// `assetsManagementTimeoutSeconds` (5).
    pub assets_timeout: Duration,
    /// `concurrencyMode`: parallel (default) or single.
    pub parallel: bool,
    /// `concurrencyLimit` (0 = unlimited) in parallel mode.
    pub concurrency_limit: usize,
}

/// `name` reduced to what SNS and SQS accept: `[A-Za-z0-9_-]`, at most 80 characters,
/// `.fifo` kept or added for FIFO entities (Dapr's sanitizing).
pub fn sanitized_name(name: &str, fifo: bool) -> String {
    const MAX: usize = 80;
    const FIFO: &str = ".fifo";
    let base = if fifo {
        name.strip_suffix(FIFO).unwrap_or(name)
    } else {
        name
    };
    let mut out: String = base
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(MAX)
        .collect();
    if fifo {
        out.truncate(MAX - FIFO.len());
        out.push_str(FIFO);
    }
    out
}

impl SnsSqsMetadata {
    /// Parses and checks `md`.
    ///
    /// # Errors
    /// Every bad key.
    pub fn parse(md: &Metadata) -> Result<Self, Vec<MetadataError>> {
        let mut r = MetadataReader::new(md);
        let get = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| md.get_non_empty(k))
                .map(str::to_string)
        };
        let queue_name = r.required("consumerID", " (the SQS queue name)");
        let dead_letters_queue = get(&["sqsDeadLettersQueueName"]);
        let message_receive_limit = r.int("messageReceiveLimit", 0, 0..=i64::from(i32::MAX));
        if (message_receive_limit > 0) != dead_letters_queue.is_some() {
            r.fail(
                if dead_letters_queue.is_some() {
                    "messageReceiveLimit"
                } else {
                    "sqsDeadLettersQueueName"
                },
                "messageReceiveLimit and sqsDeadLettersQueueName go together",
            );
        }
        let disable_delete_on_retry_limit = r.bool("disableDeleteOnRetryLimit", false);
        if disable_delete_on_retry_limit && dead_letters_queue.is_some() {
            r.fail(
                "disableDeleteOnRetryLimit",
                "cannot be true when sqsDeadLettersQueueName is set",
            );
        }
        let visibility_timeout = r.int("messageVisibilityTimeout", 10, 1..=43_200);
        let retry_limit = r.int("messageRetryLimit", 10, 2..=i64::from(i32::MAX));
        let wait_time_seconds = r.int("messageWaitTimeSeconds", 1, 1..=20);
        let max_number = r.int("messageMaxNumber", 10, 1..=10);
        let fifo = r.bool("fifo", false);
        let concurrency = r.one_of("concurrencyMode", "parallel", &["parallel", "single"]);
        let concurrency_limit = r.int("concurrencyLimit", 0, 0..=1_000_000);
        let disable_entity_management = r.bool("disableEntityManagement", false);
        let assets_timeout = match md.get_non_empty("assetsManagementTimeoutSeconds") {
            None => Duration::from_secs(5),
            Some(v) => match v.parse::<f64>() {
                Ok(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
                _ => {
                    r.fail(
                        "assetsManagementTimeoutSeconds",
                        format!("{v:?} is not a positive number of seconds"),
                    );
                    Duration::from_secs(5)
                }
            },
        };
        let access_key = get(&["accessKey", "awsAccountID"]);
        let secret_key = get(&["secretKey", "awsSecret"]);
        if access_key.is_some() != secret_key.is_some() {
            r.fail(
                if access_key.is_some() {
                    "secretKey"
                } else {
                    "accessKey"
                },
                "accessKey and secretKey go together",
            );
        }
        let fifo_message_group_id =
            get(&["fifoMessageGroupID"]).unwrap_or_else(|| queue_name.clone());
        r.finish(|| SnsSqsMetadata {
            region: get(&["region", "awsRegion"]),
            endpoint: get(&["endpoint", "Endpoint"]),
            access_key,
            secret_key,
            session_token: get(&["sessionToken"]),
            queue_name,
            dead_letters_queue,
            message_receive_limit,
            fifo,
            fifo_message_group_id,
            visibility_timeout: i32::try_from(visibility_timeout).unwrap_or(10),
            retry_limit,
            disable_delete_on_retry_limit,
            wait_time_seconds: i32::try_from(wait_time_seconds).unwrap_or(1),
            max_number: i32::try_from(max_number).unwrap_or(10),
            disable_entity_management,
            assets_timeout,
            parallel: concurrency == "parallel",
            concurrency_limit: usize::try_from(concurrency_limit).unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<SnsSqsMetadata, Vec<MetadataError>> {
        SnsSqsMetadata::parse(&Metadata::from_pairs(pairs))
    }

    #[test]
    fn names_are_sanitized_as_dapr_does() {
        assert_eq!(sanitized_name("orders.v1/eu", false), "ordersv1eu");
        assert_eq!(sanitized_name("orders.fifo", true), "orders.fifo");
        assert_eq!(sanitized_name("orders", true), "orders.fifo");
        let long = "a".repeat(100);
        assert_eq!(sanitized_name(&long, false).len(), 80);
        let f = sanitized_name(&long, true);
        assert_eq!(f.len(), 80);
        assert!(f.ends_with(".fifo"));
    }

    #[test]
    fn defaults_and_aliases() {
        let m = parse(&[
            ("consumerID", "app1"),
            ("awsRegion", "eu-west-1"),
            ("Endpoint", "http://127.0.0.1:4566"),
            ("awsAccountID", "AK"),
            ("awsSecret", "SK"),
        ])
        .unwrap();
        assert_eq!(m.region.as_deref(), Some("eu-west-1"));
        assert_eq!(m.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(m.access_key.as_deref(), Some("AK"));
        assert_eq!(m.visibility_timeout, 10);
        assert_eq!(m.retry_limit, 10);
        assert_eq!(m.wait_time_seconds, 1);
        assert_eq!(m.max_number, 10);
        assert!(m.parallel);
        assert_eq!(m.fifo_message_group_id, "app1");
        assert_eq!(m.assets_timeout, Duration::from_secs(5));
    }

    #[test]
    fn every_problem_is_reported() {
        let errs = parse(&[
            ("messageVisibilityTimeout", "0"),
            ("messageRetryLimit", "1"),
            ("messageMaxNumber", "11"),
            ("sqsDeadLettersQueueName", "dlq"),
            ("concurrencyMode", "both"),
            ("accessKey", "AK"),
        ])
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "consumerID",
            "messageVisibilityTimeout",
            "messageRetryLimit",
            "messageMaxNumber",
            "messageReceiveLimit",
            "concurrencyMode",
            "secretKey",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        let errs = parse(&[
            ("consumerID", "a"),
            ("sqsDeadLettersQueueName", "dlq"),
            ("messageReceiveLimit", "3"),
            ("disableDeleteOnRetryLimit", "true"),
        ])
        .unwrap_err();
        assert_eq!(errs[0].field, "disableDeleteOnRetryLimit");
    }
}
