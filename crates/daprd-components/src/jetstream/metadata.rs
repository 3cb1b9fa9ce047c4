//! `pubsub.jetstream` metadata: Dapr's keys and defaults, parsed without I/O.

use std::time::Duration;

use daprd_core::metadata::{Metadata, MetadataError, MetadataReader};

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
    /// `tls_client_cert` / `tls_client_key`: files of a client certificate (mutual TLS; the
    /// server certificate is checked against the system roots, as in Dapr).
    pub tls_client: Option<(String, String)>,
    /// `jwt` + `seedKey`: user JWT and the nkey seed that signs the server's nonce (wins
    /// over the client certificate, as in Dapr).
    pub jwt: Option<(String, String)>,
    /// `domain`: the JetStream domain (API prefix `$JS.<domain>.API`).
    pub domain: Option<String>,
    /// `apiPrefix`: a custom JetStream API prefix (wins over `domain`, as in nats.go).
    pub api_prefix: Option<String>,
}

impl JetStreamMetadata {
    /// Parses and checks `md`.
    ///
    /// # Errors
    /// Every bad key.
    pub fn parse(md: &Metadata) -> Result<Self, Vec<MetadataError>> {
        let mut r = MetadataReader::new(md);
        let url = r.required("natsURL", "");
        let jwt = md.get_non_empty("jwt").map(str::to_string);
        let seed_key = md.get_non_empty("seedKey").map(str::to_string);
        match (&jwt, &seed_key) {
            (Some(_), None) => r.fail("seedKey", "is required with jwt"),
            (None, Some(_)) => r.fail("jwt", "is required with seedKey"),
            (Some(_), Some(seed)) if nkeys::KeyPair::from_seed(seed).is_err() => {
                r.fail("seedKey", "is not an nkey seed")
            }
            _ => {}
        }
        let tls_client_cert = md.get_non_empty("tls_client_cert").map(str::to_string);
        let tls_client_key = md.get_non_empty("tls_client_key").map(str::to_string);
        match (&tls_client_cert, &tls_client_key) {
            (Some(_), None) => r.fail("tls_client_key", "is required with tls_client_cert"),
            (None, Some(_)) => r.fail("tls_client_cert", "is required with tls_client_key"),
            _ => {}
        }
        let seq = r.int("startSequence", 0, i64::MIN..=i64::MAX);
        let time = r.int("startTime", 0, i64::MIN..=i64::MAX);
        // Policy names are matched case-insensitively.
        let policy = md
            .get_non_empty("deliverPolicy")
            .map(str::to_ascii_lowercase);
        let start = match policy.as_deref() {
            None if seq > 0 => StartAt::Sequence(seq.unsigned_abs()),
            None if time > 0 => StartAt::Time(time),
            None | Some("all") => StartAt::All,
            Some("last") => StartAt::Last,
            Some("new") => StartAt::New,
            Some("sequence") => StartAt::Sequence(seq.unsigned_abs()),
            Some("time") => StartAt::Time(time),
            Some(other) => {
                r.fail(
                    "deliverPolicy",
                    format!("{other:?} is not all, last, new, sequence or time"),
                );
                StartAt::All
            }
        };
        let ack_wait = r.go_duration("ackWait");
        let heartbeat = r.go_duration("heartbeat");
        let mut back_off = Vec::new();
        if let Some(list) = md.get_non_empty("backOff") {
            for part in list.split(',').map(str::trim) {
                match daprd_core::duration::parse_go_duration(part) {
                    Ok(d) => back_off.push(d),
                    Err(_) => r.fail("backOff", format!("{part:?} is not a duration")),
                }
            }
        }
        let max_deliver = r.int("maxDeliver", 0, i64::MIN..=i64::MAX);
        let max_ack_pending = r.int("maxAckPending", 0, i64::MIN..=i64::MAX);
        let replicas = r.int("replicas", 0, i64::MIN..=i64::MAX);
        let rate_limit = r.int("rateLimit", 0, i64::MIN..=i64::MAX);
        let flow_control = r.bool("flowControl", false);
        let memory_storage = r.bool("memoryStorage", false);
        let ack_policy = md
            .get_non_empty("ackPolicy")
            .unwrap_or("explicit")
            .to_ascii_lowercase();
        if !["explicit", "all", "none"].contains(&ack_policy.as_str()) {
            r.fail(
                "ackPolicy",
                format!("{ack_policy:?} is not explicit, all or none"),
            );
        }
        // `concurrencyMode` overrides the older `concurrency` key.
        let mode_key = if md.get_non_empty("concurrencyMode").is_some() {
            "concurrencyMode"
        } else {
            "concurrency"
        };
        let parallel = r.one_of(mode_key, "single", &["single", "parallel"]) == "parallel";
        r.finish(|| Self {
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
            tls_client: tls_client_cert.zip(tls_client_key),
            jwt: jwt.zip(seed_key),
            domain: md.get_non_empty("domain").map(str::to_string),
            api_prefix: md.get_non_empty("apiPrefix").map(str::to_string),
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
            ("seedKey", "not a seed"),
            ("tls_client_cert", "/etc/cert.pem"),
        ]))
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "natsURL",
            "deliverPolicy",
            "ackWait",
            "ackPolicy",
            "seedKey",
            "tls_client_key",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }
}
