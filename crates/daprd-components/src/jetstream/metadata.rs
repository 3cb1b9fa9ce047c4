//! `pubsub.jetstream` metadata: Dapr's keys and defaults, parsed without I/O.

use std::time::Duration;

use daprd_core::metadata::{Metadata, MetadataError};

/// Where a new consumer starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartAt {
    /// Every message in the stream.
    All,
    /// The last message.
    Last,
    /// Only new messages.
    New,
    /// From a sequence number (`startSequence`).
    Sequence(u64),
    /// From a time (`startTime`, Unix seconds).
    Time(i64),
}

/// Parsed `pubsub.jetstream` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct JetStreamMetadata {
    /// `natsURL`, required.
    pub url: String,
    /// `name` (connection name, default "dapr.io - pubsub.jetstream").
    pub name: String,
    /// `token`.
    pub token: Option<String>,
    /// `streamName` (else looked up by subject).
    pub stream_name: Option<String>,
    /// `durableName`.
    pub durable_name: Option<String>,
    /// `queueGroupName`.
    pub queue_group: Option<String>,
    /// `deliverPolicy` / `startSequence` / `startTime`.
    pub start: StartAt,
    /// `flowControl`.
    pub flow_control: bool,
    /// `ackWait`.
    pub ack_wait: Option<Duration>,
    /// `maxDeliver`.
    pub max_deliver: i64,
    /// `backOff` (comma list of durations).
    pub back_off: Vec<Duration>,
    /// `maxAckPending`.
    pub max_ack_pending: i64,
    /// `replicas`.
    pub replicas: usize,
    /// `memoryStorage`.
    pub memory_storage: bool,
    /// `rateLimit` (bits per second).
    pub rate_limit: u64,
    /// `heartbeat`.
    pub heartbeat: Option<Duration>,
    /// `ackPolicy`: explicit (default), all, none.
    pub ack_policy: String,
    /// `concurrency` / `concurrencyMode`: single (default) or parallel.
    pub parallel: bool,
}

impl JetStreamMetadata {
    /// Parses and checks `md`.
    ///
    /// # Errors
    /// Every bad key.
    pub fn parse(md: &Metadata) -> Result<Self, Vec<MetadataError>> {
        let mut errors = Vec::new();
        let url = md.get_non_empty("natsURL").unwrap_or("").to_string();
        if url.is_empty() {
            errors.push(MetadataError::new("natsURL", "is required"));
        }
        for key in [
            "jwt",
            "seedKey",
            "tls_client_cert",
            "tls_client_key",
            "domain",
            "apiPrefix",
        ] {
            if md.get_non_empty(key).is_some() {
                errors.push(MetadataError::new(key, "is not supported yet by daprd-rs"));
            }
        }
        let seq = md.get_i64("startSequence", 0).unwrap_or_else(|e| {
            errors.push(e);
            0
        });
        let time = md.get_i64("startTime", 0).unwrap_or_else(|e| {
            errors.push(e);
            0
        });
        let start = match md
            .get_non_empty("deliverPolicy")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None if seq > 0 => StartAt::Sequence(seq.unsigned_abs()),
            None if time > 0 => StartAt::Time(time),
            None | Some("all") => StartAt::All,
            Some("last") => StartAt::Last,
            Some("new") => StartAt::New,
            Some("sequence") => StartAt::Sequence(seq.unsigned_abs()),
            Some("time") => StartAt::Time(time),
            Some(other) => {
                errors.push(MetadataError::new(
                    "deliverPolicy",
                    format!("{other:?} is not all, last, new, sequence or time"),
                ));
                StartAt::All
            }
        };
        let mut dur = |key: &str| -> Option<Duration> {
            match md.get_non_empty(key) {
                None => None,
                Some(v) => match daprd_core::duration::parse_go_duration(v) {
                    Ok(d) => Some(d),
                    Err(_) => {
                        errors.push(MetadataError::new(
                            key,
                            format!("{v:?} is not a duration such as \"30s\""),
                        ));
                        None
                    }
                },
            }
        };
        let ack_wait = dur("ackWait");
        let heartbeat = dur("heartbeat");
        let mut back_off = Vec::new();
        if let Some(list) = md.get_non_empty("backOff") {
            for part in list.split(',').map(str::trim) {
                match daprd_core::duration::parse_go_duration(part) {
                    Ok(d) => back_off.push(d),
                    Err(_) => errors.push(MetadataError::new(
                        "backOff",
                        format!("{part:?} is not a duration"),
                    )),
                }
            }
        }
        let mut int = |key: &str| {
            md.get_i64(key, 0).unwrap_or_else(|e| {
                errors.push(e);
                0
            })
        };
        let max_deliver = int("maxDeliver");
        let max_ack_pending = int("maxAckPending");
        let replicas = int("replicas");
        let rate_limit = int("rateLimit");
        let mut b = |key: &str| {
            md.get_bool(key, false).unwrap_or_else(|e| {
                errors.push(e);
                false
            })
        };
        let flow_control = b("flowControl");
        let memory_storage = b("memoryStorage");
        let ack_policy = md
            .get_non_empty("ackPolicy")
            .unwrap_or("explicit")
            .to_ascii_lowercase();
        if !["explicit", "all", "none"].contains(&ack_policy.as_str()) {
            errors.push(MetadataError::new(
                "ackPolicy",
                format!("{ack_policy:?} is not explicit, all or none"),
            ));
        }
        let mode = md
            .get_non_empty("concurrencyMode")
            .or_else(|| md.get_non_empty("concurrency"))
            .unwrap_or("single");
        let parallel = match mode {
            "single" => false,
            "parallel" => true,
            other => {
                errors.push(MetadataError::new(
                    "concurrencyMode",
                    format!("{other:?} is not single or parallel"),
                ));
                false
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            url,
            name: md
                .get_non_empty("name")
                .unwrap_or("dapr.io - pubsub.jetstream")
                .to_string(),
            token: md.get_non_empty("token").map(str::to_string),
            stream_name: md.get_non_empty("streamName").map(str::to_string),
            durable_name: md.get_non_empty("durableName").map(str::to_string),
            queue_group: md.get_non_empty("queueGroupName").map(str::to_string),
            start,
            flow_control,
            ack_wait,
            max_deliver,
            back_off,
            max_ack_pending,
            replicas: usize::try_from(replicas).unwrap_or(0),
            memory_storage,
            rate_limit: u64::try_from(rate_limit).unwrap_or(0),
            heartbeat,
            ack_policy,
            parallel,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> Metadata {
        Metadata::from_pairs(pairs)
    }

    #[test]
    fn parses_keys_and_defaults() {
        let m = JetStreamMetadata::parse(&md(&[
            ("natsURL", "nats://localhost:4222"),
            ("durableName", "d"),
            ("queueGroupName", "q"),
            ("deliverPolicy", "new"),
            ("ackWait", "5s"),
            ("backOff", "1s, 2s"),
        ]))
        .unwrap();
        assert_eq!(m.start, StartAt::New);
        assert_eq!(m.ack_wait, Some(Duration::from_secs(5)));
        assert_eq!(
            m.back_off,
            vec![Duration::from_secs(1), Duration::from_secs(2)]
        );
        assert_eq!(m.ack_policy, "explicit");
        assert!(!m.parallel);
    }

    #[test]
    fn every_problem_is_reported() {
        let errs = JetStreamMetadata::parse(&md(&[
            ("deliverPolicy", "sometimes"),
            ("ackWait", "soon"),
            ("ackPolicy", "maybe"),
            ("jwt", "x"),
        ]))
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in ["natsURL", "deliverPolicy", "ackWait", "ackPolicy", "jwt"] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }
}
