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

/// The test control plane's trust domain (Dapr's default in a cluster).
pub const CP_TRUST_DOMAIN: &str = "cluster.local";
/// The test control plane's namespace.
pub const CP_NAMESPACE: &str = "dapr-system";

/// Sentry's SPIFFE id in the test control plane.
pub fn sentry_id() -> String {
    format!("spiffe://{CP_TRUST_DOMAIN}/ns/{CP_NAMESPACE}/dapr-sentry")
}

/// The operator's SPIFFE id in the test control plane.
pub fn operator_id() -> String {
    format!("spiffe://{CP_TRUST_DOMAIN}/ns/{CP_NAMESPACE}/dapr-operator")
}

async fn loopback() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port")
}

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

    /// A server certificate for the DNS name `host`, valid for a day.
    ///
    /// # Panics
    /// rcgen cannot make it.
    pub fn issue_dns(&self, host: &str) -> Issued {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = leaf_params("spiffe://test/server", Duration::from_secs(24 * 3600));
        params.subject_alt_names = vec![SanType::DnsName(
            host.to_string().try_into().expect("an ASCII DNS name"),
        )];
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

/// A TLS connection accepted by a test server, with the client's SPIFFE id and certificate
/// (for the handlers); it ends (EOF) when its server drops its connections.
pub struct TlsConn {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    closed: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    ended: bool,
}

/// The client on a connection: its SPIFFE id and certificate (`None`: none presented).
#[derive(Clone, Debug)]
pub struct PeerId {
    /// The `spiffe://` URI SAN.
    pub id: Option<String>,
    /// The leaf certificate (DER).
    pub cert: Option<Vec<u8>>,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerId;

    fn connect_info(&self) -> PeerId {
        let cert = self
            .tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first());
        PeerId {
            id: cert.and_then(spiffe_id_of),
            cert: cert.map(|c| c.to_vec()),
        }
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

impl TlsConn {
    /// Whether the server dropped its connections (polled, so the drop wakes the reader).
    fn is_closed(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.ended && self.closed.as_mut().poll(cx).is_ready() {
            self.ended = true;
        }
        self.ended
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.is_closed(cx) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.is_closed(cx) {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// TLS connections accepted on `listener`; a failed handshake is skipped. Raising `drop_all`
/// ends every connection accepted before.
pub fn tls_incoming(
    listener: tokio::net::TcpListener,
    config: rustls::ServerConfig,
    drop_all: tokio::sync::watch::Receiver<u64>,
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
            let mut drop_all = drop_all.clone();
            let epoch = *drop_all.borrow_and_update();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let closed = Box::pin(async move {
                        let _ = drop_all.wait_for(|e| *e > epoch).await;
                    });
                    let conn = TlsConn {
                        tls,
                        closed,
                        ended: false,
                    };
                    let _ = tx.send(Ok(conn)).await;
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
    /// The certificate (PEM).
    pub pem: String,
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
                pem: pem.clone(),
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
        let (_keep, drop_all) = tokio::sync::watch::channel(0);
        let incoming = tls_incoming(listener, server_config(&issued, None), drop_all);
        let task = tokio::spawn(async move {
            let _keep = _keep;
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

    /// A Sentry on a loopback port, presenting [`sentry_id`] signed by `ca` and signing with
    /// it.
    pub async fn spawn(ca: &Arc<TestCa>, policy: SentryPolicy) -> Self {
        Self::start(loopback().await, ca.clone(), ca, &sentry_id(), policy)
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

/// What the test operator serves, per namespace, in order.
#[derive(Default)]
pub struct OperatorState {
    /// Components (JSON).
    pub components: Vec<serde_json::Value>,
    /// Subscriptions (JSON).
    pub subscriptions: Vec<serde_json::Value>,
    /// Resiliencies (JSON).
    pub resiliencies: Vec<serde_json::Value>,
    /// Configurations (JSON) by name.
    pub configurations: Vec<serde_json::Value>,
}

/// Which stream an update goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `ComponentUpdate`.
    Component,
    /// `SubscriptionUpdate`.
    Subscription,
    /// `ResiliencyUpdate`.
    Resiliency,
}

/// One call the operator received.
#[derive(Clone, Debug)]
pub struct Call {
    /// The method.
    pub method: String,
    /// The caller's SPIFFE id and certificate.
    pub peer: PeerId,
}

type Calls = Arc<Mutex<Vec<Call>>>;

/// An update for one stream kind; `None`: break every stream.
type Update = (Option<Kind>, i32, Vec<u8>);

struct OperatorService {
    namespace: String,
    state: Arc<Mutex<OperatorState>>,
    updates: tokio::sync::broadcast::Sender<Update>,
    calls: Calls,
}

impl OperatorService {
    /// The caller's SPIFFE namespace must be the one served and the one asked for.
    fn check<T>(&self, method: &str, request: &Request<T>, namespace: &str) -> Result<(), Status> {
        let peer = request
            .extensions()
            .get::<PeerId>()
            .cloned()
            .unwrap_or(PeerId {
                id: None,
                cert: None,
            });
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Call {
                method: method.to_string(),
                peer: peer.clone(),
            });
        let Some(peer) = peer.id else {
            return Err(Status::unauthenticated("no client certificate"));
        };
        let ns = peer.split('/').nth(4).unwrap_or_default();
        if ns != namespace || namespace != self.namespace {
            return Err(Status::permission_denied(format!(
                "identity {peer} may not read namespace {namespace:?}"
            )));
        }
        Ok(())
    }

    fn docs(list: &[serde_json::Value]) -> Vec<Vec<u8>> {
        list.iter().map(|d| d.to_string().into_bytes()).collect()
    }

    fn stream<T: Send + 'static>(
        &self,
        kind: Kind,
        make: fn(i32, Vec<u8>) -> T,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<T, Status>> {
        let mut rx = self.updates.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok((Some(k), ty, doc)) if k == kind => {
                        if tx.send(Ok(make(ty, doc))).await.is_err() {
                            return;
                        }
                    }
                    Ok((Some(_), _, _)) => {}
                    // The test breaks the streams.
                    Ok((None, _, _)) => {
                        let _ = tx
                            .send(Err(Status::unavailable("stream broken by the test")))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(out)
    }
}

use daprd_proto::operator::v1 as op;

#[tonic::async_trait]
impl op::operator_server::Operator for OperatorService {
    type ComponentUpdateStream =
        tokio_stream::wrappers::ReceiverStream<Result<op::ComponentUpdateEvent, Status>>;
    type SubscriptionUpdateStream =
        tokio_stream::wrappers::ReceiverStream<Result<op::SubscriptionUpdateEvent, Status>>;
    type ResiliencyUpdateStream =
        tokio_stream::wrappers::ReceiverStream<Result<op::ResiliencyUpdateEvent, Status>>;

    async fn component_update(
        &self,
        request: Request<op::ComponentUpdateRequest>,
    ) -> Result<Response<Self::ComponentUpdateStream>, Status> {
        let ns = request.get_ref().namespace.clone();
        // Subscribed before the call is recorded: a push after the call is seen is delivered.
        let stream = self.stream(Kind::Component, |t, d| op::ComponentUpdateEvent {
            component: d,
            r#type: t,
        });
        self.check("ComponentUpdate", &request, &ns)?;
        Ok(Response::new(stream))
    }

    async fn list_components(
        &self,
        request: Request<op::ListComponentsRequest>,
    ) -> Result<Response<op::ListComponentResponse>, Status> {
        let ns = request.get_ref().namespace.clone();
        self.check("ListComponents", &request, &ns)?;
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Response::new(op::ListComponentResponse {
            components: Self::docs(&state.components),
        }))
    }

    async fn get_configuration(
        &self,
        request: Request<op::GetConfigurationRequest>,
    ) -> Result<Response<op::GetConfigurationResponse>, Status> {
        let (name, ns) = (
            request.get_ref().name.clone(),
            request.get_ref().namespace.clone(),
        );
        self.check("GetConfiguration", &request, &ns)?;
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let found = state
            .configurations
            .iter()
            .find(|c| c.pointer("/metadata/name").and_then(|n| n.as_str()) == Some(name.as_str()))
            .ok_or_else(|| Status::not_found(format!("configuration {name} not found")))?;
        Ok(Response::new(op::GetConfigurationResponse {
            configuration: found.to_string().into_bytes(),
        }))
    }

    async fn list_resiliency(
        &self,
        request: Request<op::ListResiliencyRequest>,
    ) -> Result<Response<op::ListResiliencyResponse>, Status> {
        let ns = request.get_ref().namespace.clone();
        self.check("ListResiliency", &request, &ns)?;
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Response::new(op::ListResiliencyResponse {
            resiliencies: Self::docs(&state.resiliencies),
        }))
    }

    async fn list_subscriptions_v2(
        &self,
        request: Request<op::ListSubscriptionsRequest>,
    ) -> Result<Response<op::ListSubscriptionsResponse>, Status> {
        let ns = request.get_ref().namespace.clone();
        self.check("ListSubscriptionsV2", &request, &ns)?;
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Response::new(op::ListSubscriptionsResponse {
            subscriptions: Self::docs(&state.subscriptions),
        }))
    }

    async fn subscription_update(
        &self,
        request: Request<op::SubscriptionUpdateRequest>,
    ) -> Result<Response<Self::SubscriptionUpdateStream>, Status> {
        let ns = request.get_ref().namespace.clone();
        // Subscribed before the call is recorded: a push after the call is seen is delivered.
        let stream = self.stream(Kind::Subscription, |t, d| op::SubscriptionUpdateEvent {
            subscription: d,
            r#type: t,
        });
        self.check("SubscriptionUpdate", &request, &ns)?;
        Ok(Response::new(stream))
    }

    async fn resiliency_update(
        &self,
        request: Request<op::ResiliencyUpdateRequest>,
    ) -> Result<Response<Self::ResiliencyUpdateStream>, Status> {
        let ns = request.get_ref().namespace.clone();
        // Subscribed before the call is recorded: a push after the call is seen is delivered.
        let stream = self.stream(Kind::Resiliency, |t, d| op::ResiliencyUpdateEvent {
            resiliency: d,
            r#type: t,
        });
        self.check("ResiliencyUpdate", &request, &ns)?;
        Ok(Response::new(stream))
    }
}

/// A running test operator (mTLS: clients must present a certificate of the CA); stops when
/// dropped.
pub struct TestOperator {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it serves.
    pub state: Arc<Mutex<OperatorState>>,
    updates: tokio::sync::broadcast::Sender<Update>,
    calls: Calls,
    drop_all: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl TestOperator {
    /// Starts an operator for `namespace` on `listener`, presenting `operator_id` signed by
    /// `ca` and accepting clients with certificates of `ca`.
    ///
    /// # Panics
    /// The listener has no address.
    pub fn start(
        listener: tokio::net::TcpListener,
        ca: &TestCa,
        operator_id: &str,
        namespace: &str,
        state: OperatorState,
    ) -> Self {
        let addr = listener.local_addr().expect("address");
        let issued = ca.issue(operator_id);
        let state = Arc::new(Mutex::new(state));
        let (updates, _) = tokio::sync::broadcast::channel(256);
        let calls: Calls = Arc::default();
        let (drop_all, dropped) = tokio::sync::watch::channel(0);
        let incoming = tls_incoming(listener, server_config(&issued, Some(ca)), dropped);
        let service = OperatorService {
            namespace: namespace.to_string(),
            state: state.clone(),
            updates: updates.clone(),
            calls: calls.clone(),
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(op::operator_server::OperatorServer::new(service))
                .serve_with_incoming(incoming)
                .await;
        });
        Self {
            addr,
            state,
            updates,
            calls,
            drop_all,
            task,
        }
    }

    /// An operator for `namespace` on a loopback port, presenting [`operator_id`] signed by
    /// `ca`.
    pub async fn spawn(ca: &TestCa, namespace: &str, state: OperatorState) -> Self {
        Self::start(loopback().await, ca, &operator_id(), namespace, state)
    }

    /// Ends every connection open now (clients connect again, with a new TLS handshake).
    pub fn drop_connections(&self) {
        self.drop_all.send_modify(|e| *e += 1);
    }

    /// Pushes an update on the streams open now (`ty`: 1 created, 2 updated, 3 deleted),
    /// after changing what the lists return the same way.
    pub fn push(&self, kind: Kind, ty: i32, doc: serde_json::Value) {
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let list = match kind {
                Kind::Component => &mut state.components,
                Kind::Subscription => &mut state.subscriptions,
                Kind::Resiliency => &mut state.resiliencies,
            };
            let name = doc.pointer("/metadata/name").cloned();
            let at = list
                .iter()
                .position(|d| d.pointer("/metadata/name").cloned() == name);
            match (ty, at) {
                (3, Some(i)) => {
                    list.remove(i);
                }
                (3, None) => {}
                (_, Some(i)) => list[i] = doc.clone(),
                (_, None) => list.push(doc.clone()),
            }
        }
        let _ = self
            .updates
            .send((Some(kind), ty, doc.to_string().into_bytes()));
    }

    /// Breaks every update stream open now (each ends with UNAVAILABLE).
    pub fn break_streams(&self) {
        let _ = self.updates.send((None, 0, Vec::new()));
    }

    /// Times the update streams were opened so far (`ResiliencyUpdate` calls: daprd-rs opens
    /// it last of the three).
    pub fn stream_opens(&self) -> usize {
        self.calls()
            .iter()
            .filter(|c| c.method == "ResiliencyUpdate")
            .count()
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for TestOperator {
    fn drop(&mut self) {
        self.task.abort();
    }
}
