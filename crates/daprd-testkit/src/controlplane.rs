//! A test control plane for Kubernetes mode: a certificate authority made in the test, a
//! Sentry that signs workload CSRs with it, speaking Dapr's real Sentry protocol over real TLS
//! with SPIFFE ids. (No Kubernetes API server or Dapr control plane can run on our machines.)

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use daprd_proto::sentry::v1::ca_server::{Ca, CaServer};
use daprd_proto::sentry::v1::{SignCertificateRequest, SignCertificateResponse};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SignatureAlgorithm,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::{Request, Response, Status};

/// A root CA made for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The root certificate, PEM: what daprd gets as `DAPR_TRUST_ANCHORS`.
    pub pem: String,
}

/// A certificate with its key, for a server of the test control plane.
pub struct Issued {
    /// Certificate (DER).
    pub cert: CertificateDer<'static>,
    /// Key (PKCS #8 DER).
    pub key: Vec<u8>,
}

fn offset(d: Duration, later: bool) -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc();
    let d = time::Duration::try_from(d).unwrap_or(time::Duration::ZERO);
    if later {
        now + d
    } else {
        now - d
    }
}

impl TestCa {
    /// A CA whose key uses `alg` (`rcgen::PKCS_ED25519` as Dapr 1.18's Sentry,
    /// `rcgen::PKCS_ECDSA_P256_SHA256` as earlier ones).
    ///
    /// # Panics
    /// rcgen cannot make the key or certificate.
    pub fn new(alg: &'static SignatureAlgorithm) -> Self {
        let key = KeyPair::generate_for(alg).expect("CA key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "daprd-rs test trust anchor");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = offset(Duration::from_secs(3600), false);
        params.not_after = offset(Duration::from_secs(24 * 3600), true);
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A CA as Dapr 1.18's Sentry makes (Ed25519).
    pub fn ed25519() -> Self {
        Self::new(&rcgen::PKCS_ED25519)
    }

    /// A certificate for `spiffe_id` (server and client use), valid for a day.
    ///
    /// # Panics
    /// rcgen cannot make it.
    pub fn issue(&self, spiffe_id: &str) -> Issued {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let params = leaf_params(spiffe_id, Duration::from_secs(24 * 3600));
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        Issued {
            cert: cert.der().clone(),
            key: key.serialize_der(),
        }
    }

    /// Signs a workload's CSR (PEM) for `spiffe_id`, valid for `validity`.
    ///
    /// # Errors
    /// The CSR does not parse or its signature is wrong.
    pub fn sign_csr(
        &self,
        csr_pem: &[u8],
        spiffe_id: &str,
        validity: Duration,
    ) -> Result<String, String> {
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem)
            .map_err(|e| format!("CSR is not PEM: {e}"))?;
        let mut csr = CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| format!("CSR does not parse: {e}"))?;
        csr.params = leaf_params(spiffe_id, validity);
        let cert = csr.signed_by(&self.issuer).map_err(|e| e.to_string())?;
        Ok(cert.pem())
    }
}

fn leaf_params(spiffe_id: &str, validity: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        spiffe_id
            .to_string()
            .try_into()
            .expect("an ASCII SPIFFE id"),
    )];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = offset(Duration::from_secs(1), false);
    params.not_after = offset(validity, true);
    params
}

/// A TLS server configuration presenting `issued` (HTTP/2 by ALPN), asking clients for a
/// certificate signed by `client_ca` when given.
///
/// # Panics
/// rustls refuses the key.
pub fn server_config(issued: &Issued, client_ca: Option<&TestCa>) -> rustls::ServerConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
                roots.add(c.expect("CA PEM")).expect("CA root");
            }
            builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .expect("client verifier"),
            )
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(
            vec![issued.cert.clone()],
            PrivateKeyDer::try_from(issued.key.clone()).expect("PKCS #8 key"),
        )
        .expect("server certificate");
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// A TLS connection accepted by a test server, with the client's SPIFFE id (from its
/// certificate) for the handlers.
pub struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

/// The client's SPIFFE id on a connection (`None`: no client certificate).
#[derive(Clone, Debug)]
pub struct PeerId(pub Option<String>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerId;

    fn connect_info(&self) -> PeerId {
        let id = self
            .0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| spiffe_id_of(c));
        PeerId(id)
    }
}

/// The `spiffe://` URI SAN of a certificate.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
            Some((*u).to_string())
        }
        _ => None,
    })
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// TLS connections accepted on `listener`; a failed handshake is skipped.
pub fn tls_incoming(
    listener: tokio::net::TcpListener,
    config: rustls::ServerConfig,
) -> impl tokio_stream::Stream<Item = std::io::Result<TlsConn>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = tx.send(Ok(TlsConn(tls))).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// How the test Sentry answers.
pub struct SentryPolicy {
    /// The token a request must carry (`None`: any).
    pub token: Option<String>,
    /// Namespaces it signs for (empty: any).
    pub namespaces: Vec<String>,
    /// Validity of the certificates it signs.
    pub validity: Duration,
    /// Trust domain of the workload ids it signs.
    pub trust_domain: String,
}

impl Default for SentryPolicy {
    fn default() -> Self {
        Self {
            token: None,
            namespaces: Vec::new(),
            validity: Duration::from_secs(3600),
            trust_domain: "public".into(),
        }
    }
}

/// What the test Sentry signed.
#[derive(Clone, Debug)]
pub struct Signed {
    /// The workload id.
    pub id: String,
    /// When.
    pub at: SystemTime,
    /// The token validator the request named.
    pub token_validator: i32,
}

struct SentryService {
    ca: Arc<TestCa>,
    policy: Arc<Mutex<SentryPolicy>>,
    signed: Arc<Mutex<Vec<Signed>>>,
    refused: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Ca for SentryService {
    async fn sign_certificate(
        &self,
        request: Request<SignCertificateRequest>,
    ) -> Result<Response<SignCertificateResponse>, Status> {
        let r = request.into_inner();
        let (id, validity) = {
            let policy = self.policy.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(token) = &policy.token {
                if *token != r.token {
                    self.refused.fetch_add(1, Ordering::SeqCst);
                    return Err(Status::unauthenticated("token is not valid"));
                }
            }
            if !policy.namespaces.is_empty() && !policy.namespaces.contains(&r.namespace) {
                self.refused.fetch_add(1, Ordering::SeqCst);
                return Err(Status::permission_denied(format!(
                    "namespace {} is not allowed",
                    r.namespace
                )));
            }
            (
                format!(
                    "spiffe://{}/ns/{}/{}",
                    policy.trust_domain, r.namespace, r.id
                ),
                policy.validity,
            )
        };
        let pem = self
            .ca
            .sign_csr(&r.certificate_signing_request, &id, validity)
            .map_err(Status::invalid_argument)?;
        self.signed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Signed {
                id,
                at: SystemTime::now(),
                token_validator: r.token_validator,
            });
        let until = SystemTime::now() + validity;
        let secs = until
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Ok(Response::new(SignCertificateResponse {
            workload_certificate: pem.into_bytes(),
            trust_chain_certificates: vec![self.ca.pem.clone().into_bytes()],
            valid_until: Some(prost_types::Timestamp {
                seconds: i64::try_from(secs).unwrap_or(i64::MAX),
                nanos: 0,
            }),
        }))
    }
}

/// A running test Sentry; stops when dropped.
pub struct TestSentry {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it signs.
    pub policy: Arc<Mutex<SentryPolicy>>,
    signed: Arc<Mutex<Vec<Signed>>>,
    refused: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TestSentry {
    /// Starts a Sentry on `listener` presenting `spiffe://<cp td>/ns/<cp ns>/dapr-sentry`
    /// (`sentry_id`) signed by `presenting_ca`, signing CSRs with `ca`.
    ///
    /// # Panics
    /// The listener has no address.
    pub fn start(
        listener: tokio::net::TcpListener,
        ca: Arc<TestCa>,
        presenting_ca: &TestCa,
        sentry_id: &str,
        policy: SentryPolicy,
    ) -> Self {
        let addr = listener.local_addr().expect("address");
        let issued = presenting_ca.issue(sentry_id);
        let policy = Arc::new(Mutex::new(policy));
        let signed: Arc<Mutex<Vec<Signed>>> = Arc::default();
        let refused: Arc<AtomicUsize> = Arc::default();
        let service = SentryService {
            ca,
            policy: policy.clone(),
            signed: signed.clone(),
            refused: refused.clone(),
        };
        let incoming = tls_incoming(listener, server_config(&issued, None));
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(CaServer::new(service))
                .serve_with_incoming(incoming)
                .await;
        });
        Self {
            addr,
            policy,
            signed,
            refused,
            task,
        }
    }

    /// Everything signed so far.
    pub fn signed(&self) -> Vec<Signed> {
        self.signed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests refused (token, namespace).
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for TestSentry {
    fn drop(&mut self) {
        self.task.abort();
    }
}
