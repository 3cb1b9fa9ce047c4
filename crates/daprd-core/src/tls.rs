//! TLS material for broker connections, read the way components-contrib reads it: PEM text
//! in the metadata (`caCert`, `clientCert`, `clientKey`), checked without I/O at parse time;
//! and (feature `grpc-tls`) a tonic channel over rustls.

use std::sync::Arc;

use crate::metadata::MetadataReader;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// PEM text from the metadata. A client certificate comes with its key or not at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PemMaterial {
    /// CA certificates that sign the server's certificate (else the system roots).
    pub ca_cert: Option<String>,
    /// Client certificate chain (mutual TLS).
    pub client_cert: Option<String>,
    /// The client certificate's private key.
    pub client_key: Option<String>,
}

impl PemMaterial {
    /// Reads `keys` = (CA, client certificate, client key) from `r`, reporting bad PEM and a
    /// certificate without its key (or the reverse) as metadata errors. A `None` key name is
    /// not read.
    pub fn read(r: &mut MetadataReader<'_>, keys: (Option<&str>, &str, &str)) -> Self {
        let (ca_key, cert_key, key_key) = keys;
        let md = r.md();
        let get = |k: &str| md.get_non_empty(k).map(str::to_string);
        let ca_cert = ca_key.and_then(get);
        let client_cert = get(cert_key);
        let client_key = get(key_key);
        if let (Some(k), Some(pem)) = (ca_key, &ca_cert) {
            if certificates(pem).is_err() {
                r.fail(k, "is not a PEM certificate");
            }
        }
        if let Some(pem) = &client_cert {
            if certificates(pem).is_err() {
                r.fail(cert_key, "is not a PEM certificate");
            }
        }
        if let Some(pem) = &client_key {
            if PrivateKeyDer::from_pem_slice(pem.as_bytes()).is_err() {
                r.fail(key_key, "is not a PEM private key");
            }
        }
        match (&client_cert, &client_key) {
            (Some(_), None) => r.fail(key_key, format!("is required with {cert_key}")),
            (None, Some(_)) => r.fail(cert_key, format!("is required with {key_key}")),
            _ => {}
        }
        Self {
            ca_cert,
            client_cert,
            client_key,
        }
    }

    /// A rustls client configuration: the CA (or the system roots), the client certificate
    /// if any; `insecure` accepts any server certificate (Dapr's `insecureSkipTLSVerify`).
    ///
    /// # Errors
    /// What could not be loaded.
    pub fn client_config(&self, insecure: bool) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Versions)?;
        let builder = if insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        } else {
            let mut roots = rustls::RootCertStore::empty();
            match &self.ca_cert {
                Some(pem) => {
                    for cert in certificates(pem).map_err(TlsError::pem("caCert"))? {
                        roots
                            .add(cert)
                            .map_err(|e| TlsError::pem("caCert")(e.to_string()))?;
                    }
                }
                None => {
                    for cert in rustls_native_certs::load_native_certs().certs {
                        let _ = roots.add(cert);
                    }
                }
            }
            builder.with_root_certificates(roots)
        };
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let chain = certificates(cert).map_err(TlsError::pem("client certificate"))?;
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                    .map_err(|e| TlsError::pem("client key")(e.to_string()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::pem("client certificate")(e.to_string()))
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

/// Why TLS material could not make a client configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The TLS protocol versions could not be set up.
    #[error("tls versions: {0}")]
    Versions(#[source] rustls::Error),
    /// A certificate or key could not be loaded.
    #[error("{what}: {reason}")]
    Pem {
        /// Which (`caCert`, `client certificate`, `client key`).
        what: &'static str,
        /// Why.
        reason: String,
    },
}

impl TlsError {
    fn pem(what: &'static str) -> impl Fn(String) -> Self {
        move |reason| Self::Pem { what, reason }
    }
}

fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificate in the PEM text".into());
    }
    Ok(certs)
}

/// Accepts any server certificate (still checks the handshake signatures).
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// gRPC over rustls: the one way this workspace opens a TLS gRPC channel (to a `grpcs` app,
/// an OTLP collector, the control plane, Google's APIs), whatever the certificate policy.
#[cfg(feature = "grpc-tls")]
mod grpc {
    use std::sync::Arc;

    use rustls::pki_types::ServerName;

    /// Why a TLS gRPC channel could not be set up.
    #[derive(Debug, thiserror::Error)]
    pub enum TlsChannelError {
        /// `host` is not a DNS name or an IP address.
        #[error("{0} is not a valid TLS server name")]
        ServerName(String),
        /// `host:port` does not make a URI.
        #[error("{0} does not make a valid endpoint: {1}")]
        Endpoint(String, tonic::transport::Error),
    }

    /// A lazily connected tonic channel to `host:port` (a bracketed IPv6 literal is fine) over
    /// TLS with `config`, HTTP/2 offered by ALPN, `TCP_NODELAY` set.
    ///
    /// # Errors
    /// `host` is not a server name, or the address does not make a URI.
    pub fn grpc_channel(
        host: &str,
        port: u16,
        mut config: rustls::ClientConfig,
    ) -> Result<tonic::transport::Channel, TlsChannelError> {
        config.alpn_protocols = vec![b"h2".to_vec()];
        let config = Arc::new(config);
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(bare.to_string())
            .map_err(|_| TlsChannelError::ServerName(bare.to_string()))?;
        let addr = format!("{host}:{port}");
        let connector = tower::service_fn(move |_uri: http::Uri| {
            let config = config.clone();
            let server_name = server_name.clone();
            let addr = addr.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                // as tonic's own channels: a small frame is not held back by Nagle's
                // algorithm waiting for the peer's delayed ACK
                tcp.set_nodelay(true)?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(server_name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))
            .map_err(|e| TlsChannelError::Endpoint(format!("{host}:{port}"), e))?;
        Ok(endpoint.connect_with_connector_lazy(connector))
    }
}
#[cfg(feature = "grpc-tls")]
pub use grpc::{grpc_channel, TlsChannelError};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Metadata;

    fn read(pairs: &[(&str, &str)]) -> Result<PemMaterial, Vec<String>> {
        let md: Metadata = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut r = MetadataReader::new(&md);
        let m = PemMaterial::read(&mut r, (Some("caCert"), "clientCert", "clientKey"));
        r.finish(|| m)
            .map_err(|errs| errs.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn bad_pem_and_a_lone_certificate_are_reported() {
        let errs = read(&[("caCert", "nope"), ("clientCert", "also nope")]).unwrap_err();
        let all = errs.join("\n");
        assert!(all.contains("caCert"), "{all}");
        assert!(all.contains("clientCert"), "{all}");
        assert!(all.contains("clientKey"), "{all}");
        assert_eq!(read(&[]).unwrap(), PemMaterial::default());
    }
}
