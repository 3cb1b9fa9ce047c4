//! SPIFFE identities as Dapr's control plane uses them: `spiffe://<trust domain>/ns/<namespace>/<name>`
//! in a certificate's URI subject alternative name, checked against a set of trust anchors
//! instead of a DNS name.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Why an identity, a trust anchor or a certificate is not usable.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SpiffeError {
    /// Not of the form `spiffe://<trust domain>/<path>`.
    #[error("invalid SPIFFE id {0:?}: expected spiffe://<trust domain>/ns/<namespace>/<name>")]
    Id(String),
    /// The trust anchors (`DAPR_TRUST_ANCHORS`) hold no usable certificate.
    #[error("trust anchors: {0}")]
    Anchors(String),
    /// A certificate could not be parsed.
    #[error("certificate: {0}")]
    Certificate(String),
}

/// A SPIFFE id with the `/ns/<namespace>/<name>` path Dapr gives every workload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    name: String,
}

impl SpiffeId {
    /// `spiffe://<trust_domain>/ns/<namespace>/<name>`.
    pub fn new(trust_domain: &str, namespace: &str, name: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// Sentry's id in a control plane: `.../ns/<cp namespace>/dapr-sentry`.
    pub fn sentry(trust_domain: &str, namespace: &str) -> Self {
        Self::new(trust_domain, namespace, "dapr-sentry")
    }

    /// The operator's id in a control plane: `.../ns/<cp namespace>/dapr-operator`.
    pub fn operator(trust_domain: &str, namespace: &str) -> Self {
        Self::new(trust_domain, namespace, "dapr-operator")
    }

    /// Parses `spiffe://<td>/ns/<namespace>/<name>`.
    ///
    /// # Errors
    /// Another scheme or path shape.
    pub fn parse(uri: &str) -> Result<Self, SpiffeError> {
        let bad = || SpiffeError::Id(uri.to_string());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some(name), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        if [td, ns, name].iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        Ok(Self::new(td, ns, name))
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The workload's name (an app id, or a control-plane service).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/{}",
            self.trust_domain, self.namespace, self.name
        )
    }
}

/// The control plane's root certificates (`DAPR_TRUST_ANCHORS`, PEM).
#[derive(Clone, Debug)]
pub struct TrustAnchors {
    roots: Arc<RootCertStore>,
}

impl TrustAnchors {
    /// Reads every `CERTIFICATE` block of `pem`.
    ///
    /// # Errors
    /// No certificate in `pem`, or one that is not a usable trust anchor.
    pub fn from_pem(pem: &str) -> Result<Self, SpiffeError> {
        let mut roots = RootCertStore::empty();
        for der in certificates_from_pem(pem.as_bytes())? {
            roots
                .add(der)
                .map_err(|e| SpiffeError::Anchors(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(SpiffeError::Anchors("no PEM CERTIFICATE block".into()));
        }
        Ok(Self {
            roots: Arc::new(roots),
        })
    }

    /// The anchors as rustls holds them.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }
}

/// Every `CERTIFICATE` block of `pem`, in order.
///
/// # Errors
/// A block that is not valid PEM.
pub fn certificates_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, SpiffeError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .map(|c| c.map_err(|e| SpiffeError::Certificate(format!("invalid PEM: {e}"))))
        .collect()
}

/// What a certificate says about itself: its SPIFFE ids (URI SANs) and validity.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// The `spiffe://` URI SANs.
    pub spiffe_ids: Vec<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl CertInfo {
    /// Parses a DER certificate.
    ///
    /// # Errors
    /// Not an X.509 certificate.
    pub fn parse(der: &[u8]) -> Result<Self, SpiffeError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| SpiffeError::Certificate(format!("not an X.509 certificate: {e}")))?;
        let mut spiffe_ids = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    if uri.starts_with("spiffe://") {
                        spiffe_ids.push((*uri).to_string());
                    }
                }
            }
        }
        let at = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        Ok(Self {
            spiffe_ids,
            not_before: at(cert.validity().not_before),
            not_after: at(cert.validity().not_after),
        })
    }
}

/// Why a control-plane server was not trusted: a configuration error, not an outage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustFailure {
    /// The server's chain does not lead to the trust anchors.
    #[error("the certificate {server} presented is not signed by the trust anchors (DAPR_TRUST_ANCHORS): {reason}")]
    Chain {
        /// Expected id (names the server).
        server: String,
        /// The verifier's reason.
        reason: String,
    },
    /// The server presented another identity.
    #[error("expected the server's SPIFFE id {expected}, it presented {presented}")]
    Id {
        /// Expected.
        expected: String,
        /// Presented (comma list; empty when none).
        presented: String,
    },
}

/// Verifies a server by its SPIFFE id and the trust anchors (no DNS name), and keeps why it
/// rejected one, so a caller can tell a trust failure from a server that is down.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    anchors: TrustAnchors,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
    rejected: Mutex<Option<TrustFailure>>,
}

impl SpiffeServerVerifier {
    /// A verifier for servers presenting `expected`.
    pub fn new(anchors: TrustAnchors, expected: SpiffeId) -> Arc<Self> {
        Arc::new(Self {
            anchors,
            expected,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            rejected: Mutex::new(None),
        })
    }

    /// The last rejection, cleared.
    pub fn take_rejection(&self) -> Option<TrustFailure> {
        self.rejected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    fn reject(&self, failure: TrustFailure) -> rustls::Error {
        let message = failure.to_string();
        *self
            .rejected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(failure);
        rustls::Error::General(message)
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = rustls::server::ParsedCertificate::try_from(end_entity).and_then(|parsed| {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &self.anchors.roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )
        });
        if let Err(e) = chain {
            return Err(self.reject(TrustFailure::Chain {
                server: self.expected.to_string(),
                reason: e.to_string(),
            }));
        }
        let presented = CertInfo::parse(end_entity)
            .map(|i| i.spiffe_ids)
            .unwrap_or_default();
        let expected = self.expected.to_string();
        if presented.contains(&expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(self.reject(TrustFailure::Id {
                expected,
                presented: presented.join(","),
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A lazily connected gRPC channel to a control-plane server at `address` (`host:port`),
/// verified by `verifier`, presenting `client_cert` when given. No TLS session resumption: a
/// resumed session would go on authenticating with the certificate of the first handshake,
/// past its renewal and its expiry.
///
/// # Errors
/// `address` is not `host:port`.
pub fn control_plane_channel(
    address: &str,
    verifier: Arc<SpiffeServerVerifier>,
    client_cert: Option<Arc<dyn rustls::client::ResolvesClientCert>>,
) -> Result<tonic::transport::Channel, String> {
    let builder = rustls::ClientConfig::builder_with_provider(verifier.provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client_cert {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    };
    config.resumption = rustls::client::Resumption::disabled();
    let (host, port) = address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| "not a host:port address".to_string())?;
    crate::tls::grpc_channel(host, port, config).map_err(|e| e.to_string())
}

/// Whether a control-plane call failed for want of an answer (tried again as an outage)
/// rather than by the server's refusal.
pub fn is_outage(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_print() {
        let id = SpiffeId::parse("spiffe://public/ns/default/myapp").expect("valid");
        assert_eq!(id, SpiffeId::new("public", "default", "myapp"));
        assert_eq!(id.to_string(), "spiffe://public/ns/default/myapp");
        assert_eq!(
            SpiffeId::sentry("cluster.local", "dapr-system").to_string(),
            "spiffe://cluster.local/ns/dapr-system/dapr-sentry"
        );
        for bad in [
            "https://public/ns/default/a",
            "spiffe://public/default/a",
            "spiffe://public/ns/default",
            "spiffe://public/ns//a",
            "spiffe://public/ns/a/b/c",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn anchors_need_a_certificate() {
        assert!(matches!(
            TrustAnchors::from_pem("not pem"),
            Err(SpiffeError::Anchors(_))
        ));
    }
}
