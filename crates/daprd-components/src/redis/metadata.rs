//! `pubsub.redis` metadata: every key Dapr's Redis Streams component reads, with its code
//! defaults, parsed without I/O.

use std::time::Duration;

use daprd_core::metadata::{Metadata, MetadataError, MetadataReader};

/// Parsed `pubsub.redis` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisMetadata {
    /// `redisHost` (`host:port`), required.
    pub host: String,
    /// `redisUsername`.
    pub username: Option<String>,
    /// `redisPassword`.
    pub password: Option<String>,
    /// `redisDB` (0).
    pub db: i64,
    /// `consumerID`: consumer group and consumer name (daprd defaults it to the app id).
    pub consumer_id: String,
    /// `concurrency` (10): messages processed at once per subscription.
    pub concurrency: usize,
    /// `queueDepth` (100): messages read per `XREADGROUP` / `XPENDING`.
    pub queue_depth: usize,
    /// `processingTimeout` (60s; a bare number is milliseconds): idle time before a pending
    /// message is reclaimed. 0 disables reclaiming.
    pub processing_timeout: Duration,
    /// `redeliverInterval` (15s; a bare number is milliseconds, as in Dapr, or a Go duration
    /// such as `1s`, which Dapr ignores): how often pending messages are checked. 0 disables
    /// reclaiming.
    pub redeliver_interval: Duration,
    /// `maxLenApprox`: `XADD ... MAXLEN ~ n`.
    pub max_len_approx: Option<u64>,
    /// `streamTTL`: `XADD ... MINID ~ <now - ttl>`.
    pub stream_ttl: Option<Duration>,
    /// `dialTimeout` (5s).
    pub dial_timeout: Duration,
    /// `readTimeout` (3s): the `BLOCK` time of `XREADGROUP`.
    pub read_timeout: Duration,
    /// `writeTimeout` (3s).
    pub write_timeout: Duration,
    /// `enableTLS` (false): `rediss://`.
    pub enable_tls: bool,
    /// `insecureSkipTLSVerify` (false): accept any server certificate.
    pub insecure_skip_verify: bool,
    /// `clientCert` / `clientKey` (PEM): mutual TLS.
    pub tls: daprd_core::tls::PemMaterial,
    /// `redisType: cluster`: `redisHost` is a comma list of cluster nodes.
    pub cluster: bool,
    /// `failover: true` + `sentinelMasterName`: `redisHost` names Sentinel(s).
    pub sentinel_master: Option<String>,
    /// `sentinelUsername` / `sentinelPassword`: credentials for Sentinel itself.
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
}

/// Keys Dapr accepts that this build does not implement yet; using them is an error, not
/// a silent misconfiguration.
const NOT_YET: &[(&str, &str)] = &[
    ("useEntraID", "Entra ID authentication"),
    ("useOIDC", "OIDC authentication"),
];

/// A duration where a bare number means milliseconds (Dapr's legacy rule).
fn ms_or_duration(r: &mut MetadataReader<'_>, key: &str, default: Duration) -> Duration {
    match r.md().get_non_empty(key).map(|v| v.parse::<u64>()) {
        Some(Ok(ms)) => Duration::from_millis(ms),
        _ => r.duration(key, Duration::from_millis(1), default),
    }
}

impl RedisMetadata {
    /// Parses and checks `md`, returning every problem.
    ///
    /// # Errors
    /// One [`MetadataError`] per bad key.
    pub fn parse(md: &Metadata) -> Result<Self, Vec<MetadataError>> {
        let mut r = MetadataReader::new(md);
        let host = r.required("redisHost", " (host:port)");
        let cluster = r.one_of("redisType", "node", &["node", "cluster"]) == "cluster";
        let failover = r.bool("failover", false);
        let sentinel_master = md.get_non_empty("sentinelMasterName").map(str::to_string);
        if failover && sentinel_master.is_none() {
            r.fail("sentinelMasterName", "is required with failover: true");
        }
        if failover && cluster {
            r.fail("failover", "cannot be combined with redisType: cluster");
        }
        if failover
            && r.md()
                .get_non_empty("enableTLS")
                .is_some_and(|v| v == "true")
        {
            r.fail(
                "enableTLS",
                "TLS with Sentinel (failover) is not supported yet by daprd-rs",
            );
        }
        if host.contains(',') && !cluster && !failover {
            r.fail(
                "redisHost",
                "a comma list of hosts needs redisType: cluster",
            );
        }
        for (key, what) in NOT_YET {
            if r.bool(key, false) {
                r.fail(key, format!("{what} is not supported yet by daprd-rs"));
            }
        }
        let db = r.int("redisDB", 0, 0..=i64::MAX);
        if cluster && db != 0 {
            r.fail("redisDB", "a Redis Cluster has only database 0");
        }
        let concurrency = r.int("concurrency", 10, 1..=i64::from(u32::MAX));
        let queue_depth = r.int("queueDepth", 100, 1..=i64::from(u32::MAX));
        let max_len = r.int("maxLenApprox", 0, 0..=i64::MAX);
        let processing_timeout =
            ms_or_duration(&mut r, "processingTimeout", Duration::from_secs(60));
        // Go daprd reads only integer milliseconds here and silently keeps 15 s for "1s";
        // daprd-rs takes a Go duration too and names anything else as an error.
        let redeliver_interval =
            ms_or_duration(&mut r, "redeliverInterval", Duration::from_secs(15));
        let secs = Duration::from_secs(1);
        let stream_ttl =
            Some(r.duration("streamTTL", secs, Duration::ZERO)).filter(|d| !d.is_zero());
        let dial_timeout = r.duration("dialTimeout", secs, Duration::from_secs(5));
        let read_timeout = r.duration("readTimeout", secs, Duration::from_secs(3));
        let write_timeout = r.duration("writeTimeout", secs, Duration::from_secs(3));
        let consumer_id = r.required("consumerID", " (daprd sets it to the app id)");
        let enable_tls = r.bool("enableTLS", false);
        let insecure_skip_verify = r.bool("insecureSkipTLSVerify", false);
        let tls = daprd_core::tls::PemMaterial::read(&mut r, (None, "clientCert", "clientKey"));
        if !enable_tls && tls.client_cert.is_some() {
            r.fail("clientCert", "needs enableTLS: true");
        }
        r.finish(|| Self {
            host,
            username: md.get_non_empty("redisUsername").map(str::to_string),
            password: md.get_non_empty("redisPassword").map(str::to_string),
            db,
            consumer_id,
            concurrency: usize::try_from(concurrency).unwrap_or(10),
            queue_depth: usize::try_from(queue_depth).unwrap_or(100),
            processing_timeout,
            redeliver_interval,
            max_len_approx: u64::try_from(max_len).ok().filter(|n| *n > 0),
            stream_ttl,
            dial_timeout,
            read_timeout,
            write_timeout,
            enable_tls,
            insecure_skip_verify,
            tls,
            cluster,
            sentinel_master: sentinel_master.filter(|_| failover),
            sentinel_username: md.get_non_empty("sentinelUsername").map(str::to_string),
            sentinel_password: md.get_non_empty("sentinelPassword").map(str::to_string),
        })
    }

    /// The connection URL (`redis://[user:pass@]host/db`).
    /// The hosts of `redisHost` (one, or the cluster's seed nodes).
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.host
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
    }

    /// The connection URL of the first host.
    pub fn url(&self) -> String {
        self.url_for(self.hosts().next().unwrap_or(&self.host))
    }

    /// The URL of a Sentinel (its own credentials).
    pub fn sentinel_url(&self, host: &str) -> String {
        let auth = match (&self.sentinel_username, &self.sentinel_password) {
            (Some(u), Some(p)) => format!("{}:{}@", enc(u), enc(p)),
            (None, Some(p)) => format!(":{}@", enc(p)),
            (Some(u), None) => format!("{}@", enc(u)),
            (None, None) => String::new(),
        };
        format!("redis://{auth}{host}")
    }

    /// The connection URL of `host` (credentials, database, TLS as configured).
    pub fn url_for(&self, host: &str) -> String {
        let auth = match (&self.username, &self.password) {
            (Some(u), Some(p)) => format!("{}:{}@", enc(u), enc(p)),
            (None, Some(p)) => format!(":{}@", enc(p)),
            (Some(u), None) => format!("{}@", enc(u)),
            (None, None) => String::new(),
        };
        let (scheme, fragment) = match (self.enable_tls, self.insecure_skip_verify) {
            (false, _) => ("redis", ""),
            (true, false) => ("rediss", ""),
            (true, true) => ("rediss", "#insecure"),
        };
        format!("{scheme}://{auth}{host}/{}{fragment}", self.db)
    }
}

fn enc(s: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> Metadata {
        Metadata::from_pairs(pairs)
    }

    #[test]
    fn defaults_are_daprs() {
        let m = RedisMetadata::parse(&md(&[
            ("redisHost", "localhost:6379"),
            ("consumerID", "app"),
        ]))
        .unwrap();
        assert_eq!(m.concurrency, 10);
        assert_eq!(m.queue_depth, 100);
        assert_eq!(m.processing_timeout, Duration::from_secs(60));
        assert_eq!(m.redeliver_interval, Duration::from_secs(15));
        assert_eq!(m.read_timeout, Duration::from_secs(3));
        assert_eq!(m.url(), "redis://localhost:6379/0");
    }

    #[test]
    fn redeliver_interval_takes_milliseconds_or_a_duration() {
        let m = RedisMetadata::parse(&md(&[
            ("redisHost", "h:1"),
            ("consumerID", "a"),
            ("redeliverInterval", "1s"),
            ("processingTimeout", "2000"),
        ]))
        .unwrap();
        assert_eq!(
            m.redeliver_interval,
            Duration::from_secs(1),
            "\"1s\" is one second (Go daprd silently keeps 15 s)"
        );
        let errs = RedisMetadata::parse(&md(&[
            ("redisHost", "h:1"),
            ("consumerID", "a"),
            ("redeliverInterval", "soon"),
        ]))
        .unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.to_string().contains("redeliverInterval")),
            "{errs:?}"
        );
        assert_eq!(
            m.processing_timeout,
            Duration::from_millis(2000),
            "a bare number is milliseconds"
        );
        let m = RedisMetadata::parse(&md(&[
            ("redisHost", "h:1"),
            ("consumerID", "a"),
            ("redeliverInterval", "500"),
            ("processingTimeout", "5s"),
        ]))
        .unwrap();
        assert_eq!(m.redeliver_interval, Duration::from_millis(500));
        assert_eq!(m.processing_timeout, Duration::from_secs(5));
    }

    #[test]
    fn every_problem_is_reported() {
        let errs = RedisMetadata::parse(&md(&[
            ("concurrency", "0"),
            ("queueDepth", "x"),
            ("clientCert", "not pem"),
            ("redisType", "cluster"),
            ("redisDB", "3"),
        ]))
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "redisHost",
            "concurrency",
            "queueDepth",
            "clientCert",
            "clientKey",
            "redisDB",
            "consumerID",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }

    #[test]
    fn credentials_are_url_encoded() {
        let m = RedisMetadata::parse(&md(&[
            ("redisHost", "h:1"),
            ("consumerID", "a"),
            ("redisPassword", "p@ss/w"),
            ("redisDB", "2"),
        ]))
        .unwrap();
        assert_eq!(m.url(), "redis://:p%40ss%2Fw@h:1/2");
    }

    #[test]
    fn enable_tls_selects_rediss_and_insecure_skips_verification() {
        let base = [("redisHost", "h:1"), ("consumerID", "a")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            RedisMetadata::parse(&md(&all)).unwrap().url()
        };
        assert_eq!(with(&[("enableTLS", "true")]), "rediss://h:1/0");
        assert_eq!(
            with(&[("enableTLS", "true"), ("insecureSkipTLSVerify", "true")]),
            "rediss://h:1/0#insecure"
        );
        assert_eq!(with(&[("insecureSkipTLSVerify", "true")]), "redis://h:1/0");
    }
}
