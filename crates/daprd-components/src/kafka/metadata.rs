//! `pubsub.kafka` metadata: Dapr's keys and defaults (components-contrib's sarama settings),
//! parsed without I/O and turned into librdkafka properties.

use std::time::Duration;

use daprd_core::metadata::{Metadata, MetadataError, MetadataReader};

/// How the component authenticates (`authType`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// `none`: plaintext, no authentication.
    None,
    /// `password`: SASL with `saslUsername` / `saslPassword`.
    Password {
        /// SASL user.
        username: String,
        /// SASL password.
        password: String,
        /// librdkafka mechanism: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
        mechanism: &'static str,
    },
    /// `mtls`: TLS with a client certificate (`clientCert` / `clientKey`).
    Mtls,
    /// `certificate`: TLS verified with `caCert`, no client authentication.
    Certificate,
}

/// Where a group with no committed offset starts (`initialOffset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialOffset {
    /// `newest` (default): only messages produced after the group first joins.
    Newest,
    /// `oldest`: from the start of each partition.
    Oldest,
}

/// The consume retry back-off (`backOff*` keys, dapr/kit's retry defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct BackOff {
    /// `backOffPolicy`: constant (default) or exponential.
    pub exponential: bool,
    /// `backOffDuration` (5s): the constant interval.
    pub duration: Duration,
    /// `backOffInitialInterval` (500ms): the first exponential interval.
    pub initial_interval: Duration,
    /// `backOffMaxInterval` (60s): the largest exponential interval.
    pub max_interval: Duration,
    /// `backOffMultiplier` (1.5).
    pub multiplier: f64,
    /// `backOffRandomizationFactor` (0.5): jitter of exponential intervals.
    pub randomization: f64,
    /// `backOffMaxElapsedTime` (15m; 0 = forever): exponential retries stop after this long.
    pub max_elapsed: Duration,
    /// `backOffMaxRetries` (-1 = forever).
    pub max_retries: Option<u64>,
}

impl BackOff {
    /// The wait before retry number `attempt` (0-based), or `None` when retries are over.
    pub fn next_delay(&self, attempt: u64, elapsed: Duration) -> Option<Duration> {
        if self.max_retries.is_some_and(|max| attempt >= max) {
            return None;
        }
        if !self.exponential {
            return Some(self.duration);
        }
        if !self.max_elapsed.is_zero() && elapsed >= self.max_elapsed {
            return None;
        }
        let exp = i32::try_from(attempt.min(64)).unwrap_or(64);
        let base = (self.initial_interval.as_secs_f64() * self.multiplier.powi(exp))
            .min(self.max_interval.as_secs_f64());
        let jitter = self.randomization * base;
        let low = base - jitter;
        let delay = low + fastrand::f64() * (2.0 * jitter);
        Some(Duration::from_secs_f64(delay.max(0.0)))
    }
}

/// Parsed `pubsub.kafka` metadata.
#[derive(Debug, Clone)]
pub struct KafkaMetadata {
    /// `brokers`: comma-separated `host:port` list.
    pub brokers: Vec<String>,
    /// `authType` (required).
    pub auth: Auth,
    /// TLS on the connection: on unless `disableTls` or `authType: none`.
    pub tls: bool,
    /// `caCert` / `clientCert` / `clientKey` (PEM text).
    pub ca_cert: Option<String>,
    /// Client certificate for `mtls`.
    pub client_cert: Option<String>,
    /// Client key for `mtls`.
    pub client_key: Option<String>,
    /// `skipVerify` (false): accept any server certificate.
    pub skip_verify: bool,
    /// `consumerGroup`, else `consumerID`.
    pub consumer_group: Option<String>,
    /// `clientID` (`sarama`, as Go daprd).
    pub client_id: String,
    /// `initialOffset`.
    pub initial_offset: InitialOffset,
    /// `maxMessageBytes`: the producer's largest message (unset: librdkafka's 1,000,000).
    pub max_message_bytes: Option<i64>,
    /// `consumeRetryEnabled` (true): retry a failed message in place with [`BackOff`].
    pub consume_retry: Option<BackOff>,
    /// `heartbeatInterval` (3s).
    pub heartbeat_interval: Duration,
    /// `sessionTimeout` (10s).
    pub session_timeout: Duration,
    /// `channelBufferSize` (256): messages queued per partition before it is paused.
    pub channel_buffer_size: usize,
    /// `compression` (none): none, gzip, snappy, lz4, zstd.
    pub compression: String,
    /// `producerRequiredAcks` (all → -1, local → 1, none → 0).
    pub required_acks: i32,
    /// `producerRetryMax` (5).
    pub producer_retry_max: i64,
    /// `consumerGroupRebalanceStrategy` (range): librdkafka's assignor name.
    pub assignment_strategy: &'static str,
    /// `escapeHeaders` (false): URL-escape the key and header values handed to the app.
    pub escape_headers: bool,
    /// `excludeHeaderMetaRegex`: metadata keys that are not written as headers (and headers
    /// not handed to the app).
    pub exclude_header_meta: Option<regex::Regex>,
    /// `dialTimeout` (30s).
    pub dial_timeout: Duration,
    /// `readTimeout` / `writeTimeout` (30s): socket timeout.
    pub socket_timeout: Duration,
    /// `clientConnectionTopicMetadataRefreshInterval` (8m).
    pub metadata_refresh: Duration,
    /// `consumerFetchMin` (1 byte).
    pub fetch_min_bytes: i64,
    /// `consumerFetchDefault` (1 MiB): bytes fetched per partition.
    pub fetch_default_bytes: i64,
    /// daprd-rs extension, not in Go daprd: `autoCreateTopics` (false) creates a missing
    /// topic with `autoCreateTopicPartitions` (1) partitions (replication 1) through the admin
    /// API before the first publish or subscribe, for brokers that do not create topics on
    /// demand (`auto.create.topics.enable=false`, tansu). `None` when off.
    pub auto_create_partitions: Option<i32>,
}

fn sasl_mechanism(v: Option<&str>) -> &'static str {
    match v.map(str::trim) {
        Some("SHA-256") => "SCRAM-SHA-256",
        Some("SHA-512") => "SCRAM-SHA-512",
        _ => "PLAIN",
    }
}

fn is_pem(v: &str) -> bool {
    let v = v.trim_start();
    v.starts_with("-----BEGIN ") && v.contains("-----END ")
}

fn read_back_off(r: &mut MetadataReader<'_>) -> BackOff {
    let exponential =
        r.one_of("backOffPolicy", "constant", &["constant", "exponential"]) == "exponential";
    let ms = Duration::from_millis(1);
    let float = |r: &mut MetadataReader<'_>, key: &str, default: f64| -> f64 {
        match r.md().get_non_empty(key) {
            None => default,
            Some(v) => match v.parse::<f64>() {
                Ok(f) if f.is_finite() && f >= 0.0 => f,
                _ => {
                    r.fail(key, format!("{v:?} is not a non-negative number"));
                    default
                }
            },
        }
    };
    let multiplier = float(r, "backOffMultiplier", 1.5);
    let randomization = float(r, "backOffRandomizationFactor", 0.5).min(1.0);
    let max_retries = r.int("backOffMaxRetries", -1, -1..=i64::MAX);
    BackOff {
        exponential,
        duration: r.duration("backOffDuration", ms, Duration::from_secs(5)),
        initial_interval: r.duration("backOffInitialInterval", ms, Duration::from_millis(500)),
        max_interval: r.duration("backOffMaxInterval", ms, Duration::from_secs(60)),
        multiplier,
        randomization,
        max_elapsed: r.duration("backOffMaxElapsedTime", ms, Duration::from_secs(900)),
        max_retries: u64::try_from(max_retries).ok(),
    }
}

impl KafkaMetadata {
    /// Parses and checks `md`.
    ///
    /// # Errors
    /// Every bad key.
    pub fn parse(md: &Metadata) -> Result<Self, Vec<MetadataError>> {
        let mut r = MetadataReader::new(md);
        let brokers: Vec<String> = r
            .required("brokers", " (a comma-separated host:port list)")
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .map(str::to_string)
            .collect();
        // `authRequired` is Dapr's deprecated spelling: true → password (with a SASL
        // password) or mtls, false → none.
        let auth_type = match md.get_non_empty("authType") {
            Some(t) => t.to_ascii_lowercase(),
            None => match md.get_non_empty("authRequired") {
                Some(v) => match daprd_core::metadata::parse_go_bool(v) {
                    Some(true) if md.get_non_empty("saslPassword").is_some() => "password".into(),
                    Some(true) => "mtls".into(),
                    Some(false) => "none".into(),
                    None => {
                        r.fail("authRequired", format!("{v:?} is not a boolean"));
                        "none".into()
                    }
                },
                None => {
                    r.fail(
                        "authType",
                        "is required (none, password, mtls or certificate)",
                    );
                    "none".into()
                }
            },
        };
        let get = |k: &str| md.get_non_empty(k).map(str::to_string);
        let ca_cert = get("caCert");
        let client_cert = get("clientCert");
        let client_key = get("clientKey");
        for (key, value) in [
            ("caCert", &ca_cert),
            ("clientCert", &client_cert),
            ("clientKey", &client_key),
        ] {
            if value.as_deref().is_some_and(|v| !is_pem(v)) {
                r.fail(key, "is not PEM text");
            }
        }
        let auth = match auth_type.as_str() {
            "none" => Auth::None,
            "password" => {
                let username = r.required("saslUsername", " for authType password");
                let password = r.required("saslPassword", " for authType password");
                Auth::Password {
                    username,
                    password,
                    mechanism: sasl_mechanism(md.get_non_empty("saslMechanism")),
                }
            }
            "mtls" => {
                if client_cert.is_some() != client_key.is_some() {
                    r.fail(
                        if client_cert.is_some() {
                            "clientKey"
                        } else {
                            "clientCert"
                        },
                        "clientCert and clientKey go together for authType mtls",
                    );
                }
                Auth::Mtls
            }
            "certificate" => {
                if ca_cert.is_none() {
                    r.fail("caCert", "is required for authType certificate");
                }
                Auth::Certificate
            }
            "oidc" | "oidc_private_key_jwt" | "awsiam" => {
                r.fail(
                    "authType",
                    format!("{auth_type} is not supported yet by daprd-rs"),
                );
                Auth::None
            }
            other => {
                r.fail(
                    "authType",
                    format!("{other:?} is not one of none, password, mtls, certificate, oidc, oidc_private_key_jwt, awsiam"),
                );
                Auth::None
            }
        };
        let disable_tls = r.bool("disableTls", false);
        if disable_tls && auth == Auth::Mtls {
            r.fail("disableTls", "cannot be true with authType mtls");
        }
        let tls = !disable_tls && auth != Auth::None;
        let skip_verify = r.bool("skipVerify", false);
        let consumer_group = md
            .get_non_empty("consumerGroup")
            .or_else(|| md.get_non_empty("consumerID"))
            .map(str::to_string);
        let client_id = md.get_non_empty("clientID").unwrap_or("sarama").to_string();
        let initial_offset = match md.get_non_empty("initialOffset") {
            None => InitialOffset::Newest,
            Some(v) if v.eq_ignore_ascii_case("newest") => InitialOffset::Newest,
            Some(v) if v.eq_ignore_ascii_case("oldest") => InitialOffset::Oldest,
            Some(v) => {
                r.fail("initialOffset", format!("{v:?} is not newest or oldest"));
                InitialOffset::Newest
            }
        };
        let max_message_bytes = r.int("maxMessageBytes", 0, 0..=1_000_000_000);
        let retry_enabled = r.bool("consumeRetryEnabled", true);
        let back_off = read_back_off(&mut r);
        // consumeRetryInterval is read (a bare number is milliseconds) but, as in Dapr, the
        // back-off keys decide the interval.
        r.duration(
            "consumeRetryInterval",
            Duration::from_millis(1),
            Duration::from_millis(100),
        );
        let heartbeat_interval = r.duration(
            "heartbeatInterval",
            Duration::from_secs(1),
            Duration::from_secs(3),
        );
        let session_timeout = r.duration(
            "sessionTimeout",
            Duration::from_secs(1),
            Duration::from_secs(10),
        );
        if heartbeat_interval >= session_timeout {
            r.fail("heartbeatInterval", "must be shorter than sessionTimeout");
        }
        let channel_buffer_size = r.int("channelBufferSize", 256, 1..=1_000_000);
        let compression = match md.get_non_empty("compression") {
            None => "none".to_string(),
            Some(v) => {
                let v = v.to_ascii_lowercase();
                if ["none", "gzip", "snappy", "lz4", "zstd"].contains(&v.as_str()) {
                    v
                } else {
                    r.fail(
                        "compression",
                        format!("{v:?} is not one of none, gzip, snappy, lz4, zstd"),
                    );
                    "none".to_string()
                }
            }
        };
        let required_acks = match md
            .get_non_empty("producerRequiredAcks")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("all") => -1,
            Some("local") => 1,
            Some("none") => 0,
            Some(v) => {
                r.fail(
                    "producerRequiredAcks",
                    format!("{v:?} is not one of all, local, none"),
                );
                -1
            }
        };
        let producer_retry_max = r.int("producerRetryMax", 5, 0..=2_147_483_647);
        let assignment_strategy = match md
            .get_non_empty("consumerGroupRebalanceStrategy")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("range") => "range",
            Some("roundrobin") => "roundrobin",
            // librdkafka's sticky assignor is the cooperative one.
            Some("sticky") => "cooperative-sticky",
            Some(v) => {
                r.fail(
                    "consumerGroupRebalanceStrategy",
                    format!("{v:?} is not one of range, sticky, roundrobin"),
                );
                "range"
            }
        };
        let escape_headers = r.bool("escapeHeaders", false);
        let exclude_header_meta = match md.get_non_empty("excludeHeaderMetaRegex") {
            None => None,
            Some(v) => match regex::Regex::new(v) {
                Ok(re) => Some(re),
                Err(e) => {
                    r.fail(
                        "excludeHeaderMetaRegex",
                        format!("is not a valid regex: {e}"),
                    );
                    None
                }
            },
        };
        if let Some(v) = md.get_non_empty("version") {
            let ok = v.split('.').count() >= 2 && v.split('.').all(|p| p.parse::<u32>().is_ok());
            if !ok {
                r.fail(
                    "version",
                    format!("{v:?} is not a Kafka version such as 2.0.0"),
                );
            }
        }
        let s = Duration::from_secs(1);
        let dial_timeout = r.duration("dialTimeout", s, Duration::from_secs(30));
        let read_timeout = r.duration("readTimeout", s, Duration::from_secs(30));
        let write_timeout = r.duration("writeTimeout", s, Duration::from_secs(30));
        let metadata_refresh = r.duration(
            "clientConnectionTopicMetadataRefreshInterval",
            s,
            Duration::from_secs(480),
        );
        let fetch_min_bytes = r.int("consumerFetchMin", 1, 1..=100_000_000);
        let fetch_default_bytes = r.int("consumerFetchDefault", 1024 * 1024, 1..=1_000_000_000);
        let auto_create = r.bool("autoCreateTopics", false);
        let partitions = r.int("autoCreateTopicPartitions", 1, 1..=100_000);
        r.unsupported(
            &["schemaRegistryURL", "schemaRegistryAPIKey"],
            "the Kafka schema registry",
        );
        r.finish(|| KafkaMetadata {
            brokers,
            auth,
            tls,
            ca_cert,
            client_cert,
            client_key,
            skip_verify,
            consumer_group,
            client_id,
            initial_offset,
            max_message_bytes: (max_message_bytes > 0).then_some(max_message_bytes),
            consume_retry: retry_enabled.then_some(back_off),
            heartbeat_interval,
            session_timeout,
            channel_buffer_size: usize::try_from(channel_buffer_size).unwrap_or(256),
            compression,
            required_acks,
            producer_retry_max,
            assignment_strategy,
            escape_headers,
            exclude_header_meta,
            dial_timeout: if dial_timeout.is_zero() {
                Duration::from_secs(30)
            } else {
                dial_timeout
            },
            socket_timeout: read_timeout
                .max(write_timeout)
                .max(Duration::from_millis(10)),
            metadata_refresh: if metadata_refresh.is_zero() {
                Duration::from_secs(480)
            } else {
                metadata_refresh
            },
            fetch_min_bytes,
            fetch_default_bytes,
            auto_create_partitions: auto_create.then(|| i32::try_from(partitions).unwrap_or(1)),
        })
    }

    /// librdkafka properties shared by the producer and the consumers: brokers, client id,
    /// security, timeouts.
    pub fn common_properties(&self) -> Vec<(&'static str, String)> {
        let mut p = vec![
            ("bootstrap.servers", self.brokers.join(",")),
            ("client.id", self.client_id.clone()),
            (
                "socket.connection.setup.timeout.ms",
                self.dial_timeout.as_millis().max(1000).to_string(),
            ),
            (
                "socket.timeout.ms",
                self.socket_timeout.as_millis().max(10).to_string(),
            ),
            (
                "topic.metadata.refresh.interval.ms",
                self.metadata_refresh.as_millis().max(10).to_string(),
            ),
            // a broker that comes back is in use within a second (librdkafka's ceiling
            // between reconnects is 10 s by default)
            ("reconnect.backoff.ms", "50".into()),
            ("reconnect.backoff.max.ms", "500".into()),
        ];
        let sasl = matches!(self.auth, Auth::Password { .. });
        let protocol = match (self.tls, sasl) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        p.push(("security.protocol", protocol.into()));
        if let Auth::Password {
            username,
            password,
            mechanism,
        } = &self.auth
        {
            p.push(("sasl.mechanisms", (*mechanism).into()));
            p.push(("sasl.username", username.clone()));
            p.push(("sasl.password", password.clone()));
        }
        if self.tls {
            if let Some(ca) = &self.ca_cert {
                p.push(("ssl.ca.pem", ca.clone()));
            }
            if self.auth == Auth::Mtls {
                if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
                    p.push(("ssl.certificate.pem", cert.clone()));
                    p.push(("ssl.key.pem", key.clone()));
                }
            }
            if self.skip_verify {
                p.push(("enable.ssl.certificate.verification", "false".into()));
                p.push(("ssl.endpoint.identification.algorithm", "none".into()));
            }
        }
        p
    }

    /// Producer properties: acks, retries, compression, sarama's key hash partitioner.
    pub fn producer_properties(&self) -> Vec<(&'static str, String)> {
        let mut p = self.common_properties();
        p.push(("acks", self.required_acks.to_string()));
        p.push((
            "message.send.max.retries",
            self.producer_retry_max.to_string(),
        ));
        p.push(("compression.codec", self.compression.clone()));
        // FNV-1a of the key, as sarama's hash partitioner, so keys land on the same
        // partitions as with Go daprd; no key → random partition.
        p.push(("partitioner", "fnv1a_random".into()));
        p.push(("linger.ms", "1".into()));
        // A publish fails after 10 s without the broker's acknowledgement (librdkafka would
        // keep it queued for 5 minutes; sarama gives up within seconds when no broker answers).
        p.push(("message.timeout.ms", "10000".into()));
        // A topic the broker does not know fails the publish after 2 s (UnknownTopicOrPartition)
        // instead of waiting for the whole message time-out.
        p.push(("topic.metadata.propagation.max.ms", "2000".into()));
        if let Some(max) = self.max_message_bytes {
            p.push(("message.max.bytes", max.max(1000).to_string()));
        }
        p
    }

    /// Consumer properties for `group`: offsets stored only after the app's answer and
    /// committed in the background.
    pub fn consumer_properties(&self, group: &str) -> Vec<(&'static str, String)> {
        let mut p = self.common_properties();
        p.push(("group.id", group.to_string()));
        p.push(("enable.auto.commit", "true".into()));
        p.push(("enable.auto.offset.store", "false".into()));
        p.push(("auto.commit.interval.ms", "1000".into()));
        p.push((
            "auto.offset.reset",
            match self.initial_offset {
                InitialOffset::Newest => "latest",
                InitialOffset::Oldest => "earliest",
            }
            .into(),
        ));
        p.push((
            "session.timeout.ms",
            self.session_timeout.as_millis().to_string(),
        ));
        p.push((
            "heartbeat.interval.ms",
            self.heartbeat_interval.as_millis().to_string(),
        ));
        p.push((
            "partition.assignment.strategy",
            self.assignment_strategy.into(),
        ));
        p.push(("fetch.min.bytes", self.fetch_min_bytes.to_string()));
        p.push((
            "max.partition.fetch.bytes",
            self.fetch_default_bytes.to_string(),
        ));
        p.push(("allow.auto.create.topics", "true".into()));
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<KafkaMetadata, Vec<MetadataError>> {
        KafkaMetadata::parse(&Metadata::from_pairs(pairs))
    }

    fn prop<'a>(p: &'a [(&'static str, String)], key: &str) -> Option<&'a str> {
        p.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn defaults_follow_go_daprd() {
        let m = parse(&[
            ("brokers", "a:9092, b:9092"),
            ("authType", "none"),
            ("consumerID", "app1"),
        ])
        .unwrap();
        assert_eq!(m.brokers, ["a:9092", "b:9092"]);
        assert_eq!(m.consumer_group.as_deref(), Some("app1"));
        assert_eq!(m.client_id, "sarama");
        assert_eq!(m.initial_offset, InitialOffset::Newest);
        assert!(!m.tls);
        let b = m.consume_retry.as_ref().expect("retry is on by default");
        assert!(!b.exponential);
        assert_eq!(b.duration, Duration::from_secs(5));
        assert_eq!(b.max_retries, None);
        assert_eq!(m.channel_buffer_size, 256);
        let c = m.consumer_properties("g");
        assert_eq!(prop(&c, "auto.offset.reset"), Some("latest"));
        assert_eq!(prop(&c, "enable.auto.offset.store"), Some("false"));
        assert_eq!(prop(&c, "session.timeout.ms"), Some("10000"));
        assert_eq!(prop(&c, "heartbeat.interval.ms"), Some("3000"));
        assert_eq!(prop(&c, "security.protocol"), Some("plaintext"));
        let p = m.producer_properties();
        assert_eq!(prop(&p, "acks"), Some("-1"));
        assert_eq!(prop(&p, "message.send.max.retries"), Some("5"));
        assert_eq!(prop(&p, "partitioner"), Some("fnv1a_random"));
        assert_eq!(prop(&p, "message.max.bytes"), None);
    }

    #[test]
    fn consumer_group_wins_over_consumer_id_and_keys_map_to_librdkafka() {
        let m = parse(&[
            ("brokers", "k:9092"),
            ("authType", "password"),
            ("saslUsername", "u"),
            ("saslPassword", "p"),
            ("saslMechanism", "SHA-512"),
            ("consumerGroup", "g1"),
            ("consumerID", "ignored"),
            ("clientID", "me"),
            ("initialOffset", "Oldest"),
            ("maxMessageBytes", "2048"),
            ("compression", "ZSTD"),
            ("producerRequiredAcks", "local"),
            ("producerRetryMax", "2"),
            ("consumerGroupRebalanceStrategy", "sticky"),
            ("heartbeatInterval", "1s"),
            ("sessionTimeout", "6s"),
            ("skipVerify", "true"),
        ])
        .unwrap();
        assert_eq!(m.consumer_group.as_deref(), Some("g1"));
        let p = m.producer_properties();
        assert_eq!(prop(&p, "security.protocol"), Some("sasl_ssl"));
        assert_eq!(prop(&p, "sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(prop(&p, "client.id"), Some("me"));
        assert_eq!(prop(&p, "compression.codec"), Some("zstd"));
        assert_eq!(prop(&p, "acks"), Some("1"));
        assert_eq!(prop(&p, "message.send.max.retries"), Some("2"));
        assert_eq!(prop(&p, "message.max.bytes"), Some("2048"));
        assert_eq!(
            prop(&p, "enable.ssl.certificate.verification"),
            Some("false")
        );
        let c = m.consumer_properties("g1");
        assert_eq!(prop(&c, "auto.offset.reset"), Some("earliest"));
        assert_eq!(
            prop(&c, "partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(prop(&c, "session.timeout.ms"), Some("6000"));
        let m = parse(&[
            ("brokers", "k:9092"),
            ("authType", "password"),
            ("saslUsername", "u"),
            ("saslPassword", "p"),
            ("disableTls", "true"),
        ])
        .unwrap();
        let p = m.common_properties();
        assert_eq!(prop(&p, "security.protocol"), Some("sasl_plaintext"));
        assert_eq!(prop(&p, "sasl.mechanisms"), Some("PLAIN"));
    }

    #[test]
    fn auth_required_is_translated() {
        let m = parse(&[("brokers", "k:1"), ("authRequired", "false")]).unwrap();
        assert_eq!(m.auth, Auth::None);
        let m = parse(&[
            ("brokers", "k:1"),
            ("authRequired", "true"),
            ("saslUsername", "u"),
            ("saslPassword", "p"),
        ])
        .unwrap();
        assert!(matches!(m.auth, Auth::Password { .. }));
        assert_eq!(
            parse(&[("brokers", "k:1"), ("authRequired", "true")])
                .unwrap()
                .auth,
            Auth::Mtls
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let errs = parse(&[
            ("authType", "kerberos"),
            ("initialOffset", "middle"),
            ("compression", "brotli"),
            ("producerRequiredAcks", "some"),
            ("backOffPolicy", "linear"),
            ("backOffMaxRetries", "x"),
            ("excludeHeaderMetaRegex", "("),
            ("caCert", "not pem"),
            ("version", "two"),
        ])
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "brokers",
            "authType",
            "initialOffset",
            "compression",
            "producerRequiredAcks",
            "backOffPolicy",
            "backOffMaxRetries",
            "excludeHeaderMetaRegex",
            "caCert",
            "version",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        let errs = parse(&[("brokers", "k:1")]).unwrap_err();
        assert_eq!(errs[0].field, "authType");
        let errs = parse(&[("brokers", "k:1"), ("authType", "password")]).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["saslUsername", "saslPassword"]);
        let errs = parse(&[("brokers", "k:1"), ("authType", "oidc")]).unwrap_err();
        assert!(errs[0].problem.contains("not supported yet"), "{errs:?}");
        let errs = parse(&[("brokers", "k:1"), ("authType", "certificate")]).unwrap_err();
        assert_eq!(errs[0].field, "caCert");
    }

    #[test]
    fn back_off_constant_and_exponential() {
        let m = parse(&[
            ("brokers", "k:1"),
            ("authType", "none"),
            ("backOffDuration", "250ms"),
            ("backOffMaxRetries", "2"),
        ])
        .unwrap();
        let b = m.consume_retry.unwrap();
        assert_eq!(
            b.next_delay(0, Duration::ZERO),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            b.next_delay(1, Duration::ZERO),
            Some(Duration::from_millis(250))
        );
        assert_eq!(b.next_delay(2, Duration::ZERO), None);
        let m = parse(&[
            ("brokers", "k:1"),
            ("authType", "none"),
            ("backOffPolicy", "exponential"),
            ("backOffInitialInterval", "100"),
            ("backOffMaxInterval", "1s"),
            ("backOffRandomizationFactor", "0"),
            ("backOffMaxElapsedTime", "1m"),
        ])
        .unwrap();
        let b = m.consume_retry.unwrap();
        assert_eq!(
            b.next_delay(0, Duration::ZERO),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            b.next_delay(1, Duration::ZERO),
            Some(Duration::from_millis(150))
        );
        assert_eq!(
            b.next_delay(20, Duration::ZERO),
            Some(Duration::from_secs(1))
        );
        assert_eq!(b.next_delay(3, Duration::from_secs(61)), None);
        let m = parse(&[
            ("brokers", "k:1"),
            ("authType", "none"),
            ("consumeRetryEnabled", "false"),
        ])
        .unwrap();
        assert!(m.consume_retry.is_none());
    }
}
