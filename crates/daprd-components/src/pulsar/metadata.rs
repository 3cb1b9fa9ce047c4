//! `pubsub.pulsar` metadata: Dapr's keys and defaults, parsed without I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use daprd_core::metadata::{Metadata, MetadataError, MetadataReader};
use pulsar::consumer::InitialPosition;
use pulsar::message::proto::command_subscribe::SubType;

/// Parsed `pubsub.pulsar` metadata.
#[derive(Debug, Clone)]
pub struct PulsarMetadata {
    /// `host`, required: `pulsar://` is added when no scheme is given, as Go daprd does.
    pub url: String,
    /// `consumerID` (daprd sets it to the app id): the subscription name.
    pub consumer_id: String,
    /// `enableTLS` (false): with a `pulsar+ssl://` host, false accepts any server
    /// certificate (Go daprd's `TLSAllowInsecureConnection`).
    pub enable_tls: bool,
    /// `token`: a JWT sent as Pulsar's `token` authentication.
    pub token: Option<String>,
    /// `oauth2*`, without `token`: a client-credentials grant whose access token is sent as
    /// Pulsar's `token` authentication.
    pub oauth2: Option<OAuth2Settings>,
    /// `tenant` ("public"), `namespace` ("default"), `persistent` (true): topic names.
    pub tenant: String,
    pub namespace: String,
    pub persistent: bool,
    /// `subscribeType` ("shared"): exclusive, shared, failover, key_shared.
    pub subscribe_type: SubType,
    /// `subscribeInitialPosition` ("latest"): where a new subscription starts.
    pub initial_position: InitialPosition,
    /// `subscribeMode` ("durable"): false for `non_durable`.
    pub durable: bool,
    /// `processMode` ("async"): `sync` hands the app one message at a time.
    pub sync: bool,
    /// `maxConcurrentHandlers` (100): messages in the app's hands at once in async mode.
    pub max_concurrent_handlers: usize,
    /// `receiverQueueSize` (1000): messages the client asks the broker for ahead.
    pub receiver_queue_size: u32,
    /// `redeliveryDelay` (30s): how long a message the app refused waits before it is
    /// handed out again.
    pub redelivery_delay: Duration,
    /// `disableBatching` (false), `batchingMaxPublishDelay` (10ms), `batchingMaxMessages`
    /// (1000), `batchingMaxSize` (128 KiB): the producer's batches.
    pub batching: Option<Batching>,
    /// `compressionType` ("none"): none, lz4, zlib, zstd.
    pub compression: Compression,
    /// `topicsPattern`: a regular expression of topic names in the tenant and namespace
    /// (a subscription's own `topicsPattern` metadata wins).
    pub topics_pattern: Option<String>,
    /// `autoDiscoveryPeriod` (the client's default, 30s): how often the pattern is re-read.
    pub auto_discovery_period: Option<Duration>,
}

/// The `oauth2*` keys (Dapr's client-credentials metadata). Files are read at connect.
#[derive(Clone, PartialEq, Eq)]
pub struct OAuth2Settings {
    /// `oauth2TokenURL` (else the credentials file's `issuer_url`).
    pub token_url: Option<String>,
    /// `oauth2ClientID` (wins over the credentials file's `client_id`).
    pub client_id: Option<String>,
    /// `oauth2ClientSecret` (wins over both files).
    pub client_secret: Option<String>,
    /// `oauth2ClientSecretPath`: a file holding the secret, as plain text.
    pub client_secret_path: Option<String>,
    /// `oauth2CredentialsFile`: a JSON file `{client_id, client_secret, issuer_url}`.
    pub credentials_file: Option<String>,
    /// `oauth2Scopes` (comma-separated), required.
    pub scopes: Vec<String>,
    /// `oauth2Audiences` (comma-separated), required.
    pub audiences: Vec<String>,
    /// `oauth2TokenCAPEM`: the CA of the token endpoint (else the system's roots).
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for OAuth2Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2Settings")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("credentials_file", &self.credentials_file)
            .field("scopes", &self.scopes)
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

impl OAuth2Settings {
    /// The grant, with the files read: the metadata's values win over the files'.
    ///
    /// # Errors
    /// A file that cannot be read or lacks a field; no token URL, client id or secret.
    pub fn resolve(&self) -> Result<crate::oauth::ClientCredentials, String> {
        let mut token_url = self.token_url.clone();
        let mut client_id = self.client_id.clone();
        let mut client_secret = self.client_secret.clone();
        if let Some(path) = &self.credentials_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("oauth2CredentialsFile {path}: {e}"))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| format!("oauth2CredentialsFile {path}: not JSON ({e})"))?;
            let field = |k: &str| -> Result<String, String> {
                v.get(k)
                    .and_then(serde_json::Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| format!("oauth2CredentialsFile {path}: {k} is required"))
            };
            let (id, secret, issuer) = (
                field("client_id")?,
                field("client_secret")?,
                field("issuer_url")?,
            );
            client_id.get_or_insert(id);
            client_secret.get_or_insert(secret);
            token_url.get_or_insert(issuer);
        }
        if let Some(path) = &self.client_secret_path {
            if client_secret.is_none() {
                let secret = std::fs::read_to_string(path)
                    .map_err(|e| format!("oauth2ClientSecretPath {path}: {e}"))?;
                client_secret = Some(secret.trim().to_string());
            }
        }
        Ok(crate::oauth::ClientCredentials {
            token_url: token_url.ok_or("oauth2TokenURL is required")?,
            client_id: client_id.ok_or("oauth2ClientID is required")?,
            client_secret: client_secret
                .filter(|s| !s.is_empty())
                .ok_or("oauth2ClientSecret (or oauth2ClientSecretPath) is required")?,
            scopes: self.scopes.clone(),
            audiences: self.audiences.clone(),
        })
    }
}

/// Producer batching, when on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub max_publish_delay: Duration,
    pub max_messages: u32,
    pub max_size: usize,
}

/// `compressionType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Lz4,
    Zlib,
    Zstd,
}

/// Keys of what this build refuses with a clear error rather than ignore.
const ENCRYPTION_KEYS: &[&str] = &["publicKey", "privateKey", "keys"];
const SCHEMA_SUFFIXES: &[&str] = &[".jsonschema", ".avroschema", ".protoschema", ".rawschema"];

pub(crate) fn sub_type(v: &str) -> Option<SubType> {
    match v.to_ascii_lowercase().as_str() {
        "exclusive" => Some(SubType::Exclusive),
        "shared" => Some(SubType::Shared),
        "failover" => Some(SubType::Failover),
        "key_shared" => Some(SubType::KeyShared),
        _ => None,
    }
}

/// `processMode` (any case): `Some(true)` for sync, `Some(false)` for async.
pub(crate) fn process_mode_sync(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "sync" => Some(true),
        "async" => Some(false),
        _ => None,
    }
}

impl PulsarMetadata {
    /// Parses and checks `md`.
    ///
    /// # Errors
    /// Every bad key.
    pub fn parse(md: &Metadata) -> Result<Self, Vec<MetadataError>> {
        let mut r = MetadataReader::new(md);
        let host = r.required("host", " (the broker, such as pulsar://localhost:6650)");
        let url = url_of(&host);
        if url.starts_with("http://") || url.starts_with("https://") {
            r.fail(
                "host",
                format!("{host:?}: an HTTP lookup service is not supported yet by daprd-rs; give the broker's pulsar:// or pulsar+ssl:// address"),
            );
        }
        let consumer_id = r.required("consumerID", " (daprd sets it to the app id)");
        let enable_tls = r.bool("enableTLS", false);
        let token = md.get_non_empty("token").map(str::to_string);
        let tenant = md.get_non_empty("tenant").unwrap_or("public").to_string();
        let namespace = md
            .get_non_empty("namespace")
            .unwrap_or("default")
            .to_string();
        let persistent = r.bool("persistent", true);
        let subscribe_type = match md.get_non_empty("subscribeType") {
            None => SubType::Shared,
            Some(v) => sub_type(v).unwrap_or_else(|| {
                r.fail(
                    "subscribeType",
                    format!("{v:?} is not one of exclusive, shared, failover, key_shared"),
                );
                SubType::Shared
            }),
        };
        let initial_position = match md
            .get_non_empty("subscribeInitialPosition")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("latest") => InitialPosition::Latest,
            Some("earliest") => InitialPosition::Earliest,
            Some(v) => {
                r.fail(
                    "subscribeInitialPosition",
                    format!("{v:?} is not one of latest, earliest"),
                );
                InitialPosition::Latest
            }
        };
        let durable = match md
            .get_non_empty("subscribeMode")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("durable") => true,
            Some("non_durable") => false,
            Some(v) => {
                r.fail(
                    "subscribeMode",
                    format!("{v:?} is not one of durable, non_durable"),
                );
                true
            }
        };
        let sync = match md.get_non_empty("processMode") {
            None => false,
            Some(v) => process_mode_sync(v).unwrap_or_else(|| {
                r.fail("processMode", format!("{v:?} is not one of async, sync"));
                false
            }),
        };
        let handlers = r.int("maxConcurrentHandlers", 100, 0..=100_000);
        let receiver_queue_size = r.int("receiverQueueSize", 1000, 1..=1_000_000);
        let redelivery_delay = r
            .go_duration("redeliveryDelay")
            .unwrap_or(Duration::from_secs(30));
        let batching = if r.bool("disableBatching", false) {
            None
        } else {
            Some(Batching {
                max_publish_delay: r
                    .go_duration("batchingMaxPublishDelay")
                    .unwrap_or(Duration::from_millis(10)),
                max_messages: u32::try_from(r.int("batchingMaxMessages", 1000, 1..=1_000_000))
                    .unwrap_or(1000),
                max_size: usize::try_from(r.int("batchingMaxSize", 128 * 1024, 1..=1 << 30))
                    .unwrap_or(128 * 1024),
            })
        };
        let compression = match md
            .get_non_empty("compressionType")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("none") => Compression::None,
            Some("lz4") => Compression::Lz4,
            Some("zlib") => Compression::Zlib,
            Some("zstd") => Compression::Zstd,
            Some(v) => {
                r.fail(
                    "compressionType",
                    format!("{v:?} is not one of none, lz4, zlib, zstd"),
                );
                Compression::None
            }
        };
        // Go's levels map onto its own codecs' settings; this client has one level per codec.
        r.one_of(
            "compressionLevel",
            "default",
            &["default", "faster", "better"],
        );
        let topics_pattern = md.get_non_empty("topicsPattern").map(str::to_string);
        if let Some(p) = &topics_pattern {
            if let Err(e) = regex::Regex::new(p) {
                r.fail(
                    "topicsPattern",
                    format!("{p:?} is not a regular expression: {e}"),
                );
            }
        }
        let auto_discovery_period = r
            .go_duration("autoDiscoveryPeriod")
            .filter(|d| !d.is_zero());
        if r.bool("replicateSubscriptionState", false) {
            r.fail(
                "replicateSubscriptionState",
                "geo-replicated subscription state is not supported yet by daprd-rs",
            );
        }
        r.unsupported(&["listenerName"], "an advertised listener name");
        let oauth2 = if token.is_none() {
            Self::oauth2(&mut r)
        } else {
            None
        };
        r.unsupported(ENCRYPTION_KEYS, "end-to-end message encryption");
        let schema_keys: Vec<String> = md
            .iter()
            .map(|(k, _)| k)
            .filter(|k| SCHEMA_SUFFIXES.iter().any(|s| k.ends_with(s)))
            .map(str::to_string)
            .collect();
        for k in schema_keys {
            r.fail(
                &k,
                "topic schemas (JSON, Avro, Protobuf) are not supported yet by daprd-rs",
            );
        }
        r.finish(|| Self {
            url,
            consumer_id,
            enable_tls,
            token,
            oauth2,
            tenant,
            namespace,
            persistent,
            subscribe_type,
            initial_position,
            durable,
            sync,
            max_concurrent_handlers: if handlers == 0 {
                100
            } else {
                usize::try_from(handlers).unwrap_or(100)
            },
            receiver_queue_size: u32::try_from(receiver_queue_size).unwrap_or(1000),
            redelivery_delay,
            batching,
            compression,
            topics_pattern,
            auto_discovery_period,
        })
    }

    /// The `oauth2*` keys, when `oauth2TokenURL` or `oauth2CredentialsFile` is given (as Go
    /// daprd, which needs the token URL after reading the file); other `oauth2*` keys without
    /// either are refused, as they would do nothing.
    fn oauth2(r: &mut MetadataReader<'_>) -> Option<OAuth2Settings> {
        let md = r.md();
        let get = |k: &str| md.get_non_empty(k).map(str::to_string);
        let list = |k: &str| -> Vec<String> {
            md.get_non_empty(k)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let settings = OAuth2Settings {
            token_url: get("oauth2TokenURL"),
            client_id: get("oauth2ClientID"),
            client_secret: get("oauth2ClientSecret"),
            client_secret_path: get("oauth2ClientSecretPath"),
            credentials_file: get("oauth2CredentialsFile"),
            scopes: list("oauth2Scopes"),
            audiences: list("oauth2Audiences"),
            ca_pem: get("oauth2TokenCAPEM"),
        };
        if settings.token_url.is_none() && settings.credentials_file.is_none() {
            for k in [
                "oauth2ClientID",
                "oauth2ClientSecret",
                "oauth2ClientSecretPath",
                "oauth2Scopes",
                "oauth2Audiences",
                "oauth2TokenCAPEM",
            ] {
                if md.get_non_empty(k).is_some() {
                    r.fail(
                        k,
                        "is given without oauth2TokenURL or oauth2CredentialsFile",
                    );
                }
            }
            return None;
        }
        if let Some(url) = &settings.token_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                r.fail("oauth2TokenURL", format!("{url:?} is not an http(s) URL"));
            }
        }
        if settings.scopes.is_empty() {
            r.fail("oauth2Scopes", "is required with OAuth2 (comma-separated)");
        }
        if settings.audiences.is_empty() {
            r.fail(
                "oauth2Audiences",
                "is required with OAuth2 (comma-separated)",
            );
        }
        if settings.client_secret_path.is_some() && settings.credentials_file.is_some() {
            r.fail(
                "oauth2ClientSecretPath",
                "and oauth2CredentialsFile are mutually exclusive",
            );
        }
        if settings.credentials_file.is_none() {
            if settings.client_id.is_none() {
                r.fail("oauth2ClientID", "is required with oauth2TokenURL");
            }
            if settings.client_secret.is_none() && settings.client_secret_path.is_none() {
                r.fail(
                    "oauth2ClientSecret",
                    "(or oauth2ClientSecretPath) is required with oauth2TokenURL",
                );
            }
        }
        if let Some(pem) = &settings.ca_pem {
            if let Err(e) = crate::oauth::http_client(Some(pem)) {
                r.fail("oauth2TokenCAPEM", e);
            }
        }
        Some(settings)
    }

    /// `{persistent|non-persistent}://<tenant>/<namespace>/<topic>`.
    pub fn topic_name(&self, topic: &str) -> String {
        format!(
            "{}://{}/{}/{topic}",
            if self.persistent {
                "persistent"
            } else {
                "non-persistent"
            },
            self.tenant,
            self.namespace
        )
    }

    /// What a publish's metadata asks for: `partitionKey` (the message key), `deliverAt`
    /// (RFC 3339) or `deliverAfter` (a Go duration); every other non-empty entry becomes a
    /// message property, as Go daprd sends it.
    ///
    /// # Errors
    /// A `deliverAt` or `deliverAfter` that does not parse, named.
    pub fn publish_message(
        payload: Vec<u8>,
        metadata: &BTreeMap<String, String>,
        now_ms: i64,
    ) -> Result<pulsar::producer::Message, String> {
        let mut m = pulsar::producer::Message {
            payload,
            ..Default::default()
        };
        for (k, v) in metadata {
            if v.is_empty() {
                continue;
            }
            match k.as_str() {
                "partitionKey" => m.partition_key = Some(v.clone()),
                "deliverAt" => {
                    let ms = daprd_core::gocompat::parse_rfc3339_ms(v).ok_or_else(|| {
                        format!(
                            "deliverAt {v:?} is not an RFC 3339 time such as 2026-01-02T15:04:05Z"
                        )
                    })?;
                    m.deliver_at_time = Some(ms);
                }
                "deliverAfter" => {
                    let d = daprd_core::duration::parse_go_duration(v).map_err(|_| {
                        format!("deliverAfter {v:?} is not a duration such as \"30s\"")
                    })?;
                    m.deliver_at_time = Some(
                        now_ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                    );
                }
                _ => {
                    m.properties.insert(k.clone(), v.clone());
                }
            }
        }
        Ok(m)
    }
}

/// `host` with `pulsar://` added when it has none of Pulsar's schemes.
fn url_of(host: &str) -> String {
    let host = host.trim();
    if ["pulsar+ssl://", "pulsar://", "http://", "https://"]
        .iter()
        .any(|p| host.starts_with(p))
    {
        host.to_string()
    } else {
        format!("pulsar://{host}")
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
        let m = PulsarMetadata::parse(&md(&[("host", "localhost:6650"), ("consumerID", "app")]))
            .unwrap();
        assert_eq!(m.url, "pulsar://localhost:6650");
        assert_eq!(m.subscribe_type, SubType::Shared);
        assert_eq!(m.initial_position, InitialPosition::Latest);
        assert!(m.durable && !m.sync && m.persistent && !m.enable_tls);
        assert_eq!(m.max_concurrent_handlers, 100);
        assert_eq!(m.receiver_queue_size, 1000);
        assert_eq!(m.redelivery_delay, Duration::from_secs(30));
        assert_eq!(
            m.batching,
            Some(Batching {
                max_publish_delay: Duration::from_millis(10),
                max_messages: 1000,
                max_size: 131_072
            })
        );
        assert_eq!(m.compression, Compression::None);
        assert_eq!(m.topic_name("orders"), "persistent://public/default/orders");
        let m = PulsarMetadata::parse(&md(&[
            ("host", "pulsar+ssl://broker:6651"),
            ("consumerID", "app"),
            ("tenant", "t"),
            ("namespace", "n"),
            ("persistent", "false"),
            ("subscribeType", "Key_Shared"),
            ("processMode", "SYNC"),
            ("disableBatching", "true"),
            ("maxConcurrentHandlers", "0"),
        ]))
        .unwrap();
        assert_eq!(m.url, "pulsar+ssl://broker:6651");
        assert_eq!(m.topic_name("x"), "non-persistent://t/n/x");
        assert_eq!(m.subscribe_type, SubType::KeyShared);
        assert!(m.sync && m.batching.is_none());
        assert_eq!(
            m.max_concurrent_handlers, 100,
            "0 means the default, as in Go"
        );
    }

    #[test]
    fn bad_and_unsupported_keys_are_named() {
        let errs = PulsarMetadata::parse(&md(&[
            ("host", "http://admin:8080"),
            ("subscribeType", "fanout"),
            ("subscribeInitialPosition", "middle"),
            ("processMode", "parallel"),
            ("compressionType", "brotli"),
            ("redeliveryDelay", "soon"),
            ("topicsPattern", "orders-("),
            ("oauth2TokenURL", "https://idp/token"),
            ("publicKey", "k"),
            ("orders.avroschema", "{}"),
        ]))
        .unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        for key in [
            "host",
            "consumerID",
            "subscribeType",
            "subscribeInitialPosition",
            "processMode",
            "compressionType",
            "redeliveryDelay",
            "topicsPattern",
            "oauth2Scopes",
            "oauth2Audiences",
            "oauth2ClientID",
            "publicKey",
            "orders.avroschema",
        ] {
            assert!(text.iter().any(|t| t.contains(key)), "{key}: {text:?}");
        }
    }

    #[test]
    fn oauth2_keys_are_read_and_checked() {
        let base = [("host", "localhost:6650"), ("consumerID", "app")];
        let parse = |extra: &[(&str, &str)]| {
            let mut pairs = base.to_vec();
            pairs.extend_from_slice(extra);
            PulsarMetadata::parse(&md(&pairs))
        };
        let full = [
            ("oauth2TokenURL", "https://idp.example/token"),
            ("oauth2ClientID", "c"),
            ("oauth2ClientSecret", "s"),
            ("oauth2Scopes", "a, b"),
            ("oauth2Audiences", "x"),
        ];
        let m = parse(&full).unwrap();
        let o = m.oauth2.clone().unwrap();
        assert_eq!(o.scopes, ["a", "b"]);
        assert_eq!(o.audiences, ["x"]);
        let grant = o.resolve().unwrap();
        assert_eq!(
            (
                grant.token_url.as_str(),
                grant.client_id.as_str(),
                grant.client_secret.as_str()
            ),
            ("https://idp.example/token", "c", "s")
        );
        // a token wins, as in Go daprd
        let mut with_token = full.to_vec();
        with_token.push(("token", "t"));
        assert!(parse(&with_token).unwrap().oauth2.is_none());
        let text = |errs: Vec<MetadataError>| -> String {
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        };
        let e = text(parse(&[("oauth2ClientID", "c")]).unwrap_err());
        assert!(
            e.contains("oauth2ClientID") && e.contains("without oauth2TokenURL"),
            "{e}"
        );
        let e = text(
            parse(&[
                ("oauth2TokenURL", "ftp://idp"),
                ("oauth2ClientSecretPath", "/s"),
                ("oauth2CredentialsFile", "/c"),
                ("oauth2TokenCAPEM", "not pem"),
            ])
            .unwrap_err(),
        );
        for key in [
            "oauth2TokenURL",
            "oauth2Scopes",
            "oauth2Audiences",
            "mutually exclusive",
            "oauth2TokenCAPEM",
        ] {
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn publish_metadata_becomes_key_delivery_time_and_properties() {
        let meta: BTreeMap<String, String> = [
            ("partitionKey", "k1"),
            ("deliverAfter", "2s"),
            ("traceparent", "00-ab"),
            ("empty", ""),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let m = PulsarMetadata::publish_message(b"x".to_vec(), &meta, 1_000).unwrap();
        assert_eq!(m.partition_key.as_deref(), Some("k1"));
        assert_eq!(m.deliver_at_time, Some(3_000));
        assert_eq!(m.properties.len(), 1);
        assert_eq!(m.properties["traceparent"], "00-ab");
        let at: BTreeMap<String, String> =
            [("deliverAt".to_string(), "2026-01-02T03:04:05Z".to_string())].into();
        let m = PulsarMetadata::publish_message(vec![], &at, 0).unwrap();
        assert_eq!(m.deliver_at_time, Some(1_767_323_045_000));
        let offset: BTreeMap<String, String> = [(
            "deliverAt".to_string(),
            "2026-01-02T05:04:05+02:00".to_string(),
        )]
        .into();
        let m = PulsarMetadata::publish_message(vec![], &offset, 0).unwrap();
        assert_eq!(m.deliver_at_time, Some(1_767_323_045_000));
        let bad: BTreeMap<String, String> =
            [("deliverAt".to_string(), "tomorrow".to_string())].into();
        let e = PulsarMetadata::publish_message(vec![], &bad, 0).unwrap_err();
        assert!(e.contains("deliverAt"), "{e}");
    }
}
