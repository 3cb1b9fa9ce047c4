//! `pubsub.rabbitmq` metadata: Dapr's keys and code defaults, parsed without I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use daprd_core::metadata::{Metadata, MetadataError, MetadataReader};

/// Parsed `pubsub.rabbitmq` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct RabbitMetadata {
    /// AMQP URI (`connectionString`, legacy `host`, or built from
    /// `protocol`/`hostname`/`username`/`password`); `amqps://` is TLS.
    pub uri: String,
    /// `caCert` / `clientCert` / `clientKey` (PEM text) for `amqps://`.
    pub tls: daprd_core::tls::PemMaterial,
    /// `saslExternal` (false): authenticate with the client certificate (`amqps://` only).
    pub sasl_external: bool,
    /// `consumerID`: queue name prefix (`<consumerID>-<topic>`).
    pub consumer_id: String,
    /// `durable` (false): exchanges and queues survive broker restarts.
    pub durable: bool,
    /// `deletedWhenUnused` (true): auto-delete exchanges and queues.
    pub deleted_when_unused: bool,
    /// `autoAck` (false).
    pub auto_ack: bool,
    /// `requeueInFailure` (false): nack with requeue on a failed delivery.
    pub requeue_in_failure: bool,
    /// `deliveryMode` (0; 2 = persistent).
    pub delivery_mode: u8,
    /// `prefetchCount` (0 = unlimited).
    pub prefetch_count: u16,
    /// `concurrencyMode`: parallel (default) or single.
    pub parallel: bool,
    /// `enableDeadLetter` (false): broker-side `dlx-<queue>` / `dlq-<queue>`.
    pub enable_dead_letter: bool,
    /// `maxLen` (queue `x-max-length`).
    pub max_len: Option<i64>,
    /// `maxLenBytes` (queue `x-max-length-bytes`).
    pub max_len_bytes: Option<i64>,
    /// `exchangeKind` (fanout).
    pub exchange_kind: String,
    /// `publisherConfirm` (true here; Go's default is false): wait for the broker's confirm on
    /// publish, so a 2xx means the broker has the message. `false` is Go daprd's fire and
    /// forget: a connection that dies takes the publishes it still holds with it.
    pub publisher_confirm: bool,
    /// `reconnectWaitSeconds` (3s).
    pub reconnect_wait: Duration,
    /// `ttlInSeconds`: default per-message expiration.
    pub default_ttl: Option<Duration>,
    /// `heartBeat` (10s).
    pub heartbeat: Duration,
    /// `clientName`.
    pub client_name: Option<String>,
    /// `publishMessagePropertiesToMetadata` (false).
    pub properties_to_metadata: bool,
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl RabbitMetadata {
    /// Parses and checks `md`.
    ///
    /// # Errors
    /// Every bad key.
    pub fn parse(md: &Metadata) -> Result<Self, Vec<MetadataError>> {
        let mut r = MetadataReader::new(md);
        let uri = match md
            .get_non_empty("connectionString")
            .or_else(|| md.get_non_empty("host"))
        {
            Some(u) => u.to_string(),
            None => match md.get_non_empty("hostname") {
                Some(h) => {
                    let protocol = md.get_non_empty("protocol").unwrap_or("amqp");
                    let auth = match (md.get_non_empty("username"), md.get_non_empty("password")) {
                        (Some(u), Some(p)) => format!("{}:{}@", encode(u), encode(p)),
                        (Some(u), None) => format!("{}@", encode(u)),
                        _ => String::new(),
                    };
                    format!("{protocol}://{auth}{h}")
                }
                None => r.required("connectionString", " (or host, or hostname)"),
            },
        };
        if !uri.is_empty() && !uri.starts_with("amqp://") && !uri.starts_with("amqps://") {
            r.fail("connectionString", format!("{uri:?} is not an amqp:// URI"));
        }
        let tls =
            daprd_core::tls::PemMaterial::read(&mut r, (Some("caCert"), "clientCert", "clientKey"));
        let sasl_external = r.bool("saslExternal", false);
        if sasl_external
            && (tls.ca_cert.is_none() || tls.client_cert.is_none() || tls.client_key.is_none())
        {
            r.fail(
                "saslExternal",
                "can only be true when caCert, clientCert and clientKey are set",
            );
        }
        let durable = r.bool("durable", false);
        let deleted_when_unused = r.bool("deletedWhenUnused", true);
        let auto_ack = r.bool("autoAck", false);
        let requeue_in_failure = r.bool("requeueInFailure", false);
        let enable_dead_letter = r.bool("enableDeadLetter", false);
        let publisher_confirm = r.bool("publisherConfirm", true);
        let properties_to_metadata = r.bool("publishMessagePropertiesToMetadata", false);
        let delivery_mode = r.int("deliveryMode", 0, 0..=2);
        let prefetch = r.int("prefetchCount", 0, 0..=65535);
        let max_len = r.int("maxLen", 0, 0..=i64::MAX);
        let max_len_bytes = r.int("maxLenBytes", 0, 0..=i64::MAX);
        let reconnect = r.int("reconnectWaitSeconds", 3, 0..=86_400);
        let ttl = r.int("ttlInSeconds", 0, 0..=i64::MAX);
        let exchange_kind = r.one_of(
            "exchangeKind",
            "fanout",
            &["fanout", "topic", "direct", "headers"],
        );
        let parallel =
            r.one_of("concurrencyMode", "parallel", &["parallel", "single"]) == "parallel";
        let heartbeat = r.duration("heartBeat", Duration::from_secs(1), Duration::from_secs(10));
        let consumer_id = r.required("consumerID", " (daprd sets it to the app id)");
        r.finish(|| Self {
            uri,
            consumer_id,
            durable,
            deleted_when_unused,
            auto_ack,
            requeue_in_failure,
            delivery_mode: u8::try_from(delivery_mode).unwrap_or(0),
            prefetch_count: u16::try_from(prefetch).unwrap_or(0),
            parallel,
            enable_dead_letter,
            max_len: (max_len > 0).then_some(max_len),
            max_len_bytes: (max_len_bytes > 0).then_some(max_len_bytes),
            exchange_kind,
            publisher_confirm,
            reconnect_wait: Duration::from_secs(reconnect.unsigned_abs()),
            default_ttl: (ttl > 0).then(|| Duration::from_secs(ttl.unsigned_abs())),
            heartbeat,
            client_name: md.get_non_empty("clientName").map(str::to_string),
            properties_to_metadata,
            tls,
            sasl_external,
        })
    }
}

/// A request metadata value by key, case-insensitively; empty is absent.
pub(super) fn get_ci<'a>(md: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    md.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> Metadata {
        Metadata::from_pairs(pairs)
    }

    #[test]
    fn defaults_and_uri_forms() {
        let m = RabbitMetadata::parse(&md(&[
            ("connectionString", "amqp://guest:guest@localhost:5672"),
            ("consumerID", "app"),
        ]))
        .unwrap();
        assert!(!m.durable && m.deleted_when_unused && !m.auto_ack && !m.requeue_in_failure);
        assert_eq!(m.exchange_kind, "fanout");
        assert_eq!(m.reconnect_wait, Duration::from_secs(3));
        assert!(m.parallel);
        assert!(
            m.publisher_confirm,
            "a 2xx means the broker has the message"
        );
        let m = RabbitMetadata::parse(&md(&[("host", "amqp://h"), ("consumerID", "a")])).unwrap();
        assert_eq!(m.uri, "amqp://h");
        let m = RabbitMetadata::parse(&md(&[
            ("hostname", "h:5672"),
            ("username", "u"),
            ("password", "p@"),
            ("consumerID", "a"),
        ]))
        .unwrap();
        assert_eq!(m.uri, "amqp://u:p%40@h:5672");
    }

    #[test]
    fn every_problem_is_reported() {
        let errs = RabbitMetadata::parse(&md(&[
            ("deliveryMode", "5"),
            ("exchangeKind", "weird"),
            ("concurrencyMode", "x"),
            ("durable", "perhaps"),
            ("clientKey", "not a key"),
            ("saslExternal", "true"),
        ]))
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "connectionString",
            "deliveryMode",
            "exchangeKind",
            "concurrencyMode",
            "durable",
            "clientKey",
            "clientCert",
            "saslExternal",
            "consumerID",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }
}
