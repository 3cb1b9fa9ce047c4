//! `pubsub.mqtt3` metadata: Dapr's keys and code defaults, parsed without I/O.

use daprd_core::metadata::{Metadata, MetadataError, MetadataReader};
use rumqttc::QoS;

/// Parsed `pubsub.mqtt3` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttMetadata {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// User from the URL.
    pub username: Option<String>,
    /// Password from the URL.
    pub password: Option<String>,
    /// `consumerID`: the MQTT client id.
    pub client_id: String,
    /// `qos` (1).
    pub qos: u8,
    /// `retain` (false).
    pub retain: bool,
    /// `cleanSession` (false).
    pub clean_session: bool,
    /// `ssl://` (also `tls://`, `mqtts://`, `tcps://`, as Go's component maps them).
    pub tls: bool,
    /// `caCert` / `clientCert` / `clientKey` (PEM text).
    pub tls_material: daprd_core::tls::PemMaterial,
}

impl MqttMetadata {
    /// Parses and checks `md`.
    ///
    /// # Errors
    /// Every bad key.
    pub fn parse(md: &Metadata) -> Result<Self, Vec<MetadataError>> {
        let mut r = MetadataReader::new(md);
        let url = md.get_non_empty("url").unwrap_or("");
        let (mut host, mut port, mut username, mut password) = (String::new(), 1883u16, None, None);
        let mut tls = false;
        if url.is_empty() {
            r.fail("url", "is required (tcp://host:1883)");
        } else {
            let (scheme, rest) = url.split_once("://").unwrap_or(("tcp", url));
            match scheme {
                "tcp" | "mqtt" => {}
                "ssl" | "tls" | "mqtts" | "tcps" => {
                    tls = true;
                    port = 8883;
                }
                "ws" | "wss" => r.fail(
                    "url",
                    format!("{scheme}:// (MQTT over WebSocket) is not supported yet by daprd-rs"),
                ),
                other => r.fail("url", format!("unknown scheme {other:?}")),
            }
            let rest = rest.trim_end_matches('/');
            let (auth, hostport) = match rest.rsplit_once('@') {
                Some((a, h)) => (Some(a), h),
                None => (None, rest),
            };
            if let Some(a) = auth {
                let (u, p) = a.split_once(':').unwrap_or((a, ""));
                username = Some(u.to_string());
                password = (!p.is_empty()).then(|| p.to_string());
            }
            match hostport.rsplit_once(':') {
                Some((h, p)) => match p.parse() {
                    Ok(p) => {
                        host = h.to_string();
                        port = p;
                    }
                    Err(_) => r.fail("url", format!("{p:?} is not a port")),
                },
                None => host = hostport.to_string(),
            }
        }
        let qos = u8::try_from(r.int("qos", 1, 0..=2)).unwrap_or(1);
        let retain = r.bool("retain", false);
        let clean_session = r.bool("cleanSession", false);
        let tls_material =
            daprd_core::tls::PemMaterial::read(&mut r, (Some("caCert"), "clientCert", "clientKey"));
        let client_id = r.required("consumerID", " (daprd sets it to the app id)");
        r.finish(|| Self {
            host,
            port,
            username,
            password,
            client_id,
            qos,
            retain,
            clean_session,
            tls,
            tls_material,
        })
    }

    pub(super) fn qos(&self) -> QoS {
        match self.qos {
            0 => QoS::AtMostOnce,
            2 => QoS::ExactlyOnce,
            _ => QoS::AtLeastOnce,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> Metadata {
        Metadata::from_pairs(pairs)
    }

    #[test]
    fn parses_url_and_defaults() {
        let m = MqttMetadata::parse(&md(&[
            ("url", "tcp://user:pw@localhost:1884"),
            ("consumerID", "app"),
        ]))
        .unwrap();
        assert_eq!((m.host.as_str(), m.port), ("localhost", 1884));
        assert_eq!(m.username.as_deref(), Some("user"));
        assert_eq!(m.qos, 1);
        assert!(!m.retain && !m.clean_session);
        let tls = MqttMetadata::parse(&md(&[("url", "mqtts://h"), ("consumerID", "app")])).unwrap();
        assert!(tls.tls && !m.tls);
        assert_eq!(tls.port, 8883, "the TLS default port");
        let errs = MqttMetadata::parse(&md(&[
            ("url", "wss://h:8883"),
            ("qos", "3"),
            ("caCert", "x"),
        ]))
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in ["url", "qos", "caCert", "consumerID"] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }
}
