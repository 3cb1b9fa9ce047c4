//! `pubsub.azure.servicebus.topics` and `.queues` metadata: Dapr's keys and defaults (those of
//! Go daprd's shared Service Bus metadata), parsed without I/O, and the connection string.

use std::time::Duration;

use daprd_core::metadata::{Metadata, MetadataError, MetadataReader};

/// Which of the two component types the metadata is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `pubsub.azure.servicebus.topics`: topics, a subscription named `consumerID` each.
    Topics,
    /// `pubsub.azure.servicebus.queues`: a queue per topic name.
    Queues,
}

/// Parsed Service Bus metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceBusMetadata {
    /// The namespace and its shared access key, from `connectionString`.
    pub connection: ConnectionString,
    /// `consumerID` (daprd sets it to the app id): the subscription of each topic. Required
    /// for topics.
    pub consumer_id: String,
    /// `timeoutInSec` (60): how long a network request (connect, attach, publish) may take.
    pub timeout: Duration,
    /// `handlerTimeoutInSec` (60): how long the app may take with a message before it is
    /// abandoned (0: no limit).
    pub handler_timeout: Option<Duration>,
    /// `lockRenewalInSec` (20): how often the locks of messages in the app's hands are
    /// renewed (0: never).
    pub lock_renewal: Option<Duration>,
    /// `maxActiveMessages` (1000): messages taken from the broker and not settled yet.
    pub max_active_messages: u32,
    /// `maxConcurrentHandlers` (0: no limit besides `maxActiveMessages`).
    pub max_concurrent_handlers: Option<usize>,
    /// `minConnectionRecoveryInSec` (2) and `maxConnectionRecoveryInSec` (300): the pauses
    /// between attempts to reconnect a receiver, growing from the first to the second.
    pub min_recovery: Duration,
    /// See `min_recovery`.
    pub max_recovery: Duration,
    /// `disableEntityManagement` (false): topics, subscriptions and queues must exist.
    pub disable_entity_management: bool,
    /// `maxDeliveryCount`, `lockDurationInSec`, `defaultMessageTimeToLiveInSec` (or `ttl` /
    /// `ttlInSeconds`), `autoDeleteOnIdleInSec`: the properties of entities this component
    /// creates (the server's defaults when absent).
    pub entity: EntityProperties,
    /// `publishMaxRetries` (5): retries of a publish the broker refused transiently.
    pub publish_max_retries: u32,
    /// `publishInitialRetryIntervalInMs` (500; Go's misspelt `publishInitialRetryInternalInMs`
    /// too): the first pause between those retries, doubling after each.
    pub publish_initial_retry: Duration,
}

/// Properties of the entities the component creates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntityProperties {
    /// `maxDeliveryCount`.
    pub max_delivery_count: Option<u32>,
    /// `lockDurationInSec`.
    pub lock_duration_secs: Option<u64>,
    /// `defaultMessageTimeToLiveInSec`.
    pub default_ttl_secs: Option<u64>,
    /// `autoDeleteOnIdleInSec` (at least 300).
    pub auto_delete_on_idle_secs: Option<u64>,
}

/// An Azure Service Bus connection string (`Endpoint=sb://<host>[:port]/;
/// SharedAccessKeyName=...;SharedAccessKey=...`, or `SharedAccessSignature=...`).
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// The namespace's host name.
    pub host: String,
    /// The AMQP port: the endpoint's own, else 5671 (TLS) or 5672 (the development emulator).
    pub port: u16,
    /// TLS (amqps) unless `UseDevelopmentEmulator=true`, as Azure's SDKs do.
    pub tls: bool,
    /// `SharedAccessKeyName`.
    pub key_name: Option<String>,
    /// `SharedAccessKey` (signs tokens as the key's text, as Azure does).
    pub key: Option<String>,
    /// `SharedAccessSignature`: a token made elsewhere, used as it is.
    pub signature: Option<String>,
    /// `EntityPath`: the one entity the key is for (a queue or topic).
    pub entity_path: Option<String>,
    /// The port the endpoint named, if any (the emulator's management API is addressed by it).
    pub endpoint_port: Option<u16>,
    /// Microsoft Entra ID instead of a key (`namespaceName`): tokens of this credential are
    /// put on `$cbs` (type `jwt`) and sent to the management API as bearer tokens.
    pub entra: Option<std::sync::Arc<crate::entra::Credential>>,
    /// The scope its Entra ID tokens are asked for ([`ENTRA_SCOPE`], or Event Hubs').
    pub scope: &'static str,
}

/// The scope of Service Bus's Entra ID tokens.
pub const ENTRA_SCOPE: &str = "https://servicebus.azure.net/.default";

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("key_name", &self.key_name)
            .field("entity_path", &self.entity_path)
            .field("endpoint_port", &self.endpoint_port)
            .field("entra", &self.entra)
            .finish_non_exhaustive()
    }
}

impl ConnectionString {
    /// Nothing set yet (TLS on), its Entra ID tokens for `scope`.
    pub(crate) fn unset(scope: &'static str) -> Self {
        Self {
            host: String::new(),
            port: 0,
            tls: true,
            key_name: None,
            key: None,
            signature: None,
            entity_path: None,
            endpoint_port: None,
            entra: None,
            scope,
        }
    }

    /// Parses `s` (keys are case-insensitive; values may contain `=`).
    ///
    /// # Errors
    /// What is missing or malformed, naming the part (never the key's value).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut endpoint = None;
        let mut out = Self::unset(ENTRA_SCOPE);
        let mut emulator = false;
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                return Err("has a part that is not key=value".into());
            };
            let v = v.trim().to_string();
            match k.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(v),
                "sharedaccesskeyname" => out.key_name = Some(v),
                "sharedaccesskey" => out.key = Some(v),
                "sharedaccesssignature" => out.signature = Some(v),
                "entitypath" => out.entity_path = Some(v).filter(|e| !e.is_empty()),
                "usedevelopmentemulator" => {
                    emulator = daprd_core::metadata::parse_loose_bool(&v)
                        .ok_or_else(|| format!("UseDevelopmentEmulator {v:?} is not a boolean"))?;
                }
                _ => {} // e.g. TransportType: AMQP is the only transport here
            }
        }
        let endpoint = endpoint.ok_or("has no Endpoint")?;
        let rest = endpoint
            .split_once("://")
            .map_or(endpoint.as_str(), |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("Endpoint port {p:?} is not a port number"))?,
                ),
            ),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err(format!("Endpoint {endpoint:?} has no host"));
        }
        out.host = host.to_string();
        out.tls = !emulator;
        out.port = port.unwrap_or(if emulator { 5672 } else { 5671 });
        out.endpoint_port = port;
        if out.signature.is_none() && (out.key_name.is_none() || out.key.is_none()) {
            return Err(
                "needs SharedAccessKeyName and SharedAccessKey, or SharedAccessSignature".into(),
            );
        }
        Ok(out)
    }
}

/// `namespaceName` (`<namespace>.servicebus.windows.net`, or `host:port` for a namespace on a
/// port of its own) with Microsoft Entra ID: TLS on 5671 (or that port).
pub(crate) fn namespace(
    key: &str,
    ns: &str,
    md: &Metadata,
    r: &mut MetadataReader<'_>,
) -> Option<ConnectionString> {
    let rest = ns.split_once("://").map_or(ns, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) => (h, Some(p)),
            Err(_) => {
                r.fail(key, format!("port {p:?} is not a port number"));
                return None;
            }
        },
        None => (authority, None),
    };
    if host.is_empty() {
        r.fail(key, format!("{ns:?} has no host"));
        return None;
    }
    let settings = crate::entra::Settings::read(md, r, |k| std::env::var(k).ok())?;
    let credential = match crate::entra::Credential::new(settings) {
        Ok(c) => c,
        Err(e) => {
            r.fail(key, format!("the token client: {e}"));
            return None;
        }
    };
    Some(ConnectionString {
        host: host.to_string(),
        port: port.unwrap_or(5671),
        endpoint_port: port,
        entra: Some(std::sync::Arc::new(credential)),
        ..ConnectionString::unset(ENTRA_SCOPE)
    })
}

impl ConnectionString {
    /// The base URL of the namespace's ATOM management API: `https://<host>` (Azure serves
    /// it on 443 whatever the AMQP port), or with `UseDevelopmentEmulator=true`
    /// `http://<host>[:<endpoint port>]`, as Azure's SDKs address the emulator.
    pub fn management_endpoint(&self) -> String {
        match (self.tls, self.endpoint_port) {
            // a namespace on a port of its own (not AMQP's 5671) serves the API there too
            (true, Some(port)) if port != 5671 => format!("https://{}:{port}", self.host),
            (true, _) => format!("https://{}", self.host),
            (false, Some(port)) => format!("http://{}:{port}", self.host),
            (false, None) => format!("http://{}", self.host),
        }
    }
}

impl ServiceBusMetadata {
    /// Parses and checks `md` for `mode`.
    ///
    /// # Errors
    /// Every bad key.
    pub fn parse(md: &Metadata, mode: Mode) -> Result<Self, Vec<MetadataError>> {
        let mut r = MetadataReader::new(md);
        let connection = match (
            md.get_non_empty("connectionString"),
            md.get_non_empty("namespaceName"),
        ) {
            (Some(_), Some(_)) => {
                r.fail("namespaceName", "cannot be given with connectionString");
                None
            }
            (Some(cs), None) => match ConnectionString::parse(cs) {
                Ok(c) => Some(c),
                Err(e) => {
                    r.fail("connectionString", e);
                    None
                }
            },
            (None, Some(ns)) => namespace("namespaceName", ns, md, &mut r),
            (None, None) => {
                r.fail("connectionString", "is required (or namespaceName)");
                None
            }
        };
        let consumer_id = match mode {
            Mode::Topics => r.required("consumerID", " (daprd sets it to the app id)"),
            Mode::Queues => md
                .get_non_empty("consumerID")
                .unwrap_or_default()
                .to_string(),
        };
        let secs = |r: &mut MetadataReader<'_>, key: &str, default: i64| {
            Duration::from_secs(r.int(key, default, 0..=i64::from(u32::MAX)).unsigned_abs())
        };
        let timeout = secs(&mut r, "timeoutInSec", 60);
        let handler_timeout =
            Some(secs(&mut r, "handlerTimeoutInSec", 60)).filter(|d| !d.is_zero());
        let lock_renewal = Some(secs(&mut r, "lockRenewalInSec", 20)).filter(|d| !d.is_zero());
        let max_active_messages = r.int("maxActiveMessages", 1000, 1..=i64::from(u32::MAX));
        let max_concurrent_handlers = r.int("maxConcurrentHandlers", 0, 0..=i64::from(u32::MAX));
        let min_recovery = secs(&mut r, "minConnectionRecoveryInSec", 2);
        let max_recovery = secs(&mut r, "maxConnectionRecoveryInSec", 300);
        r.int("maxRetriableErrorsPerSec", 10, 0..=i64::from(u32::MAX));
        let disable_entity_management = r.bool("disableEntityManagement", false);
        let optional = |r: &mut MetadataReader<'_>, key: &str, min: i64| -> Option<u64> {
            md.get_non_empty(key)?;
            Some(r.int(key, min, min..=i64::from(u32::MAX)).unsigned_abs())
        };
        let max_delivery_count =
            optional(&mut r, "maxDeliveryCount", 1).and_then(|v| u32::try_from(v).ok());
        let lock_duration_secs = optional(&mut r, "lockDurationInSec", 1);
        let mut default_ttl_secs = optional(&mut r, "defaultMessageTimeToLiveInSec", 1);
        if default_ttl_secs.is_none() {
            let pairs: std::collections::BTreeMap<String, String> = md
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            default_ttl_secs =
                daprd_core::cloudevent::ttl_from_metadata(&pairs).map(|d| d.as_secs().max(1));
        }
        let auto_delete_on_idle_secs = md.get_non_empty("autoDeleteOnIdleInSec").and_then(|_| {
            let v = r.int("autoDeleteOnIdleInSec", 300, i64::MIN..=i64::MAX);
            if v < 300 {
                r.fail(
                    "autoDeleteOnIdleInSec",
                    "must be greater than or equal to 300",
                );
                None
            } else {
                Some(v.unsigned_abs())
            }
        });
        let publish_max_retries = r.int("publishMaxRetries", 5, 0..=1000);
        let retry_key = if md
            .get_non_empty("publishInitialRetryIntervalInMs")
            .is_none()
            && md
                .get_non_empty("publishInitialRetryInternalInMs")
                .is_some()
        {
            "publishInitialRetryInternalInMs"
        } else {
            "publishInitialRetryIntervalInMs"
        };
        let publish_initial_retry = r.int(retry_key, 500, 0..=3_600_000);
        r.finish(|| Self {
            connection: connection.unwrap_or_else(|| ConnectionString::unset(ENTRA_SCOPE)),
            consumer_id,
            timeout,
            handler_timeout,
            lock_renewal,
            max_active_messages: u32::try_from(max_active_messages).unwrap_or(1000),
            max_concurrent_handlers: usize::try_from(max_concurrent_handlers)
                .ok()
                .filter(|n| *n > 0),
            min_recovery,
            max_recovery: max_recovery.max(min_recovery),
            disable_entity_management,
            entity: EntityProperties {
                max_delivery_count,
                lock_duration_secs,
                default_ttl_secs,
                auto_delete_on_idle_secs,
            },
            publish_max_retries: u32::try_from(publish_max_retries).unwrap_or(5),
            publish_initial_retry: Duration::from_millis(publish_initial_retry.unsigned_abs()),
        })
    }
}

/// A subscription's own Service Bus metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// `requireSessions`: the subscription (or queue) delivers by session.
    pub require_sessions: bool,
    /// `sessionIdleTimeoutInSec` (60): a session with nothing for this long is let go.
    pub session_idle_timeout: Duration,
    /// `maxConcurrentSessions` (8): sessions held at once.
    pub max_concurrent_sessions: usize,
}

impl SubscribeOptions {
    /// Reads a subscription's metadata.
    ///
    /// # Errors
    /// The first bad key.
    pub fn parse(md: &std::collections::BTreeMap<String, String>) -> Result<Self, MetadataError> {
        let require_sessions = md
            .get("requireSessions")
            .is_some_and(|v| daprd_core::metadata::parse_loose_bool(v) == Some(true));
        let int = |key: &str, default: u64| -> Result<u64, MetadataError> {
            match md.get(key).map(|v| v.trim()).filter(|v| !v.is_empty()) {
                None => Ok(default),
                Some(v) => v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                    MetadataError::new(key, format!("{v:?} is not a positive integer"))
                }),
            }
        };
        Ok(Self {
            require_sessions,
            session_idle_timeout: Duration::from_secs(int("sessionIdleTimeoutInSec", 60)?),
            max_concurrent_sessions: usize::try_from(int("maxConcurrentSessions", 8)?).unwrap_or(8),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: &str = "Endpoint=sb://example.servicebus.windows.net/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=abc=";

    #[test]
    fn defaults_follow_go_daprd() {
        let md = Metadata::from_pairs(&[("connectionString", CS), ("consumerID", "app")]);
        let m = ServiceBusMetadata::parse(&md, Mode::Topics).unwrap();
        assert_eq!(m.connection.host, "example.servicebus.windows.net");
        assert_eq!((m.connection.port, m.connection.tls), (5671, true));
        assert_eq!(m.connection.key.as_deref(), Some("abc="));
        assert_eq!(m.timeout, Duration::from_secs(60));
        assert_eq!(m.lock_renewal, Some(Duration::from_secs(20)));
        assert_eq!(m.max_active_messages, 1000);
        assert_eq!(m.max_concurrent_handlers, None);
        assert_eq!(m.publish_max_retries, 5);
        assert_eq!(m.publish_initial_retry, Duration::from_millis(500));
        assert!(!m.disable_entity_management);
        assert_eq!(m.entity, EntityProperties::default());
        assert!(
            !format!("{m:?}").contains("abc="),
            "the key stays out of logs"
        );
    }

    #[test]
    fn the_emulator_connection_string_is_plain_amqp() {
        let c = ConnectionString::parse(
            "Endpoint=sb://localhost:5673;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true;",
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port, c.tls), ("localhost", 5673, false));
        let c = ConnectionString::parse(
            "Endpoint=sb://localhost;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true",
        )
        .unwrap();
        assert_eq!(c.port, 5672);
    }

    #[test]
    fn bad_metadata_names_every_key() {
        let md = Metadata::from_pairs(&[
            ("connectionString", "Endpoint=sb://x/"),
            ("maxActiveMessages", "0"),
            ("autoDeleteOnIdleInSec", "10"),
        ]);
        let errs = ServiceBusMetadata::parse(&md, Mode::Topics).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "connectionString",
            "consumerID",
            "maxActiveMessages",
            "autoDeleteOnIdleInSec",
        ] {
            assert!(fields.contains(&f), "{f} in {fields:?}");
        }
        let md = Metadata::from_pairs(&[("namespaceName", "ns")]);
        let errs = ServiceBusMetadata::parse(&md, Mode::Queues).unwrap_err();
        assert!(errs[0].to_string().contains("Entra ID"), "{errs:?}");
        let md = Metadata::from_pairs(&[
            ("namespaceName", "ns.servicebus.windows.net"),
            ("azureTenantId", "t"),
            ("azureClientId", "c"),
            ("azureClientSecret", "s"),
        ]);
        let m = ServiceBusMetadata::parse(&md, Mode::Queues).unwrap();
        assert_eq!(
            (
                m.connection.host.as_str(),
                m.connection.port,
                m.connection.tls
            ),
            ("ns.servicebus.windows.net", 5671, true)
        );
        assert!(m.connection.entra.is_some());
        assert_eq!(
            m.connection.management_endpoint(),
            "https://ns.servicebus.windows.net"
        );
        // queues need no consumerID
        let md = Metadata::from_pairs(&[("connectionString", CS)]);
        assert!(ServiceBusMetadata::parse(&md, Mode::Queues).is_ok());
    }

    #[test]
    fn entity_properties_and_the_ttl_alias() {
        let md = Metadata::from_pairs(&[
            ("connectionString", CS),
            ("consumerID", "app"),
            ("maxDeliveryCount", "3"),
            ("lockDurationInSec", "30"),
            ("ttlInSeconds", "90"),
            ("publishInitialRetryInternalInMs", "100"),
        ]);
        let m = ServiceBusMetadata::parse(&md, Mode::Topics).unwrap();
        assert_eq!(m.entity.max_delivery_count, Some(3));
        assert_eq!(m.entity.lock_duration_secs, Some(30));
        assert_eq!(m.entity.default_ttl_secs, Some(90));
        assert_eq!(m.publish_initial_retry, Duration::from_millis(100));
    }

    #[test]
    fn subscription_options() {
        let mut md = std::collections::BTreeMap::new();
        md.insert("requireSessions".to_string(), "true".to_string());
        md.insert("maxConcurrentSessions".to_string(), "2".to_string());
        let o = SubscribeOptions::parse(&md).unwrap();
        assert!(o.require_sessions);
        assert_eq!(o.max_concurrent_sessions, 2);
        assert_eq!(o.session_idle_timeout, Duration::from_secs(60));
        md.insert("sessionIdleTimeoutInSec".to_string(), "x".to_string());
        assert_eq!(
            SubscribeOptions::parse(&md).unwrap_err().field,
            "sessionIdleTimeoutInSec"
        );
    }
}
