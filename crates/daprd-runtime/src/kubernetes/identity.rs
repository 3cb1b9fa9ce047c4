//! The workload identity in Kubernetes mode: a key made here, a certificate (SVID) signed by
//! the control plane's Sentry, renewed with a fresh key halfway through its validity, and
//! presented on every connection to the operator.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use daprd_proto::sentry::v1::{
    ca_client::CaClient, sign_certificate_request::TokenValidator, SignCertificateRequest,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use super::spiffe::{
    certificates_from_pem, control_plane_channel, is_outage, CertInfo, SpiffeId,
    SpiffeServerVerifier, TrustAnchors, TrustFailure,
};

/// Where the projected Sentry token is mounted by the injector.
pub const SENTRY_TOKEN_PATH: &str = "/var/run/secrets/dapr.io/sentrytoken/token";
/// The pod's service-account token: what older control planes validate.
pub const LEGACY_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// How long one signing request may take (as Go daprd).
const SIGN_TIMEOUT: Duration = Duration::from_secs(3);

/// Why no identity was obtained.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Sentry is not who it should be: wrong trust anchors or another SPIFFE id. A
    /// configuration error; retrying does not help.
    #[error("sentry at {address}: {failure}")]
    Trust {
        /// `--sentry-address`.
        address: String,
        /// What did not match.
        failure: TrustFailure,
    },
    /// Sentry could not be reached or did not answer in time.
    #[error("sentry at {address} is unavailable: {message}")]
    Unavailable {
        /// `--sentry-address`.
        address: String,
        /// Cause.
        message: String,
    },
    /// Sentry answered with an error (a token it does not accept, a namespace it refuses).
    #[error("sentry at {address} refused to sign the certificate: {code:?}: {message}")]
    Refused {
        /// `--sentry-address`.
        address: String,
        /// gRPC status code.
        code: tonic::Code,
        /// Sentry's message.
        message: String,
    },
    /// The token file named by `DAPR_SENTRY_TOKEN_FILE` is missing or empty.
    #[error("sentry token file {}: {message}", path.display())]
    Token {
        /// The file.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// Sentry's answer is not a usable certificate for this workload.
    #[error("sentry at {address} returned an unusable certificate: {message}")]
    Invalid {
        /// `--sentry-address`.
        address: String,
        /// What is wrong with it.
        message: String,
    },
    /// A key or CSR could not be made.
    #[error("making the workload key and CSR: {0}")]
    Key(String),
}

impl IdentityError {
    /// Whether trying again cannot help (exit with this error instead).
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Trust { .. } | Self::Key(_))
    }

    /// The `reason` label of `dapr_runtime_mtls_*_fail_total` (Go daprd's reasons).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Trust { .. } | Self::Unavailable { .. } => "sentry_conn",
            Self::Token { .. } => "sentry_token",
            Self::Refused { .. } => "sign",
            Self::Invalid { .. } => "invalid_cert",
            Self::Key(_) => "key_gen",
        }
    }
}

/// What a signing request needs besides the key.
#[derive(Debug, Clone)]
pub struct SentryOptions {
    /// `--sentry-address` (`host:port`).
    pub address: String,
    /// `DAPR_TRUST_ANCHORS`.
    pub anchors: TrustAnchors,
    /// Sentry's expected id (from the control plane's trust domain and namespace).
    pub sentry_id: SpiffeId,
    /// `--app-id`.
    pub app_id: String,
    /// `NAMESPACE`.
    pub namespace: String,
    /// `DAPR_SENTRY_TOKEN_FILE`, when set.
    pub token_file: Option<PathBuf>,
}

/// A signed workload certificate with its key.
#[derive(Debug)]
pub struct Svid {
    /// The SPIFFE id Sentry put in the certificate.
    pub id: SpiffeId,
    /// Certificate chain and key, as rustls presents them.
    pub key: Arc<CertifiedKey>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl Svid {
    /// Halfway through the validity: when to renew.
    pub fn renew_at(&self) -> SystemTime {
        let span = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + span / 2
    }
}

/// Asks Sentry for workload certificates.
#[derive(Debug, Clone)]
pub struct SentryClient {
    opts: SentryOptions,
}

impl SentryClient {
    /// A client for `opts`.
    pub fn new(opts: SentryOptions) -> Self {
        Self { opts }
    }

    /// The options.
    pub fn options(&self) -> &SentryOptions {
        &self.opts
    }

    /// The token and its validator, read again for every request (the kubelet rotates the
    /// projected token).
    fn token(&self) -> Result<(String, TokenValidator), IdentityError> {
        if let Some(path) = &self.opts.token_file {
            let token = std::fs::read_to_string(path).map_err(|e| IdentityError::Token {
                path: path.clone(),
                message: e.to_string(),
            })?;
            if token.is_empty() {
                return Err(IdentityError::Token {
                    path: path.clone(),
                    message: "the file is empty".into(),
                });
            }
            // Kubernetes mode: the Kubernetes validator, whatever file holds the token.
            return Ok((token, TokenValidator::Kubernetes));
        }
        for path in [SENTRY_TOKEN_PATH, LEGACY_TOKEN_PATH] {
            if let Ok(token) = std::fs::read_to_string(path) {
                if !token.is_empty() {
                    return Ok((token, TokenValidator::Kubernetes));
                }
            }
        }
        Ok((String::new(), TokenValidator::Unknown))
    }

    /// One signing request with a fresh Ed25519 key.
    ///
    /// # Errors
    /// See [`IdentityError`].
    pub async fn sign(&self) -> Result<Svid, IdentityError> {
        let address = self.opts.address.clone();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        let (token, validator) = self.token()?;
        let verifier =
            SpiffeServerVerifier::new(self.opts.anchors.clone(), self.opts.sentry_id.clone());
        let channel =
            control_plane_channel(&address, verifier.clone(), None).map_err(|message| {
                IdentityError::Unavailable {
                    address: address.clone(),
                    message,
                }
            })?;
        let request = SignCertificateRequest {
            id: self.opts.app_id.clone(),
            token,
            trust_domain: String::new(),
            namespace: self.opts.namespace.clone(),
            certificate_signing_request: csr.into_bytes(),
            token_validator: validator as i32,
        };
        let mut client = CaClient::new(channel);
        let answer = tokio::time::timeout(SIGN_TIMEOUT, client.sign_certificate(request)).await;
        let response = match answer {
            Err(_) => {
                return Err(IdentityError::Unavailable {
                    address,
                    message: format!("no answer within {SIGN_TIMEOUT:?}"),
                })
            }
            Ok(Err(status)) => {
                if let Some(failure) = verifier.take_rejection() {
                    return Err(IdentityError::Trust { address, failure });
                }
                let message = status.message().to_string();
                return Err(if is_outage(status.code()) {
                    IdentityError::Unavailable { address, message }
                } else {
                    IdentityError::Refused {
                        address,
                        code: status.code(),
                        message,
                    }
                });
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let invalid = |message: String| IdentityError::Invalid {
            address: address.clone(),
            message,
        };
        let mut chain = certificates_from_pem(&response.workload_certificate)
            .map_err(|e| invalid(e.to_string()))?;
        for pem in &response.trust_chain_certificates {
            chain.extend(certificates_from_pem(pem).map_err(|e| invalid(e.to_string()))?);
        }
        let leaf = chain
            .first()
            .ok_or_else(|| invalid("no certificate in the answer".into()))?;
        let info = CertInfo::parse(leaf).map_err(|e| invalid(e.to_string()))?;
        let id = info
            .spiffe_ids
            .iter()
            .find_map(|u| SpiffeId::parse(u).ok())
            .ok_or_else(|| invalid("the certificate has no SPIFFE id".into()))?;
        if id.namespace() != self.opts.namespace || id.name() != self.opts.app_id {
            return Err(invalid(format!(
                "the certificate is for {id}, not for app {} in namespace {}",
                self.opts.app_id, self.opts.namespace
            )));
        }
        let certified = certified_key(chain, key.serialize_der()).map_err(invalid)?;
        Ok(Svid {
            id,
            key: Arc::new(certified),
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    pkcs8: Vec<u8>,
) -> Result<CertifiedKey, String> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("the workload key: {e}"))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("the certificate is not for the key sent: {e}"))?;
    Ok(certified)
}

/// The current workload certificate, replaced at each renewal; what every mTLS connection to
/// the control plane presents.
#[derive(Debug)]
pub struct Identity {
    current: RwLock<Arc<Svid>>,
    renewed: tokio::sync::watch::Sender<u64>,
}

impl Identity {
    /// An identity starting with `svid`.
    pub fn new(svid: Svid) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(svid)),
            renewed: tokio::sync::watch::channel(0).0,
        })
    }

    /// The certificate in force.
    pub fn current(&self) -> Arc<Svid> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, svid: Svid) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(svid);
        self.renewed.send_modify(|n| *n += 1);
    }

    /// Counts renewals; changes after each.
    pub fn renewals(&self) -> tokio::sync::watch::Receiver<u64> {
        self.renewed.subscribe()
    }

    /// What presents this identity on a TLS connection: the certificate current at each
    /// handshake.
    pub fn presenter(self: &Arc<Self>) -> Arc<dyn rustls::client::ResolvesClientCert> {
        Arc::new(Presenter(self.clone()))
    }
}

/// Presents the current certificate.
#[derive(Debug)]
struct Presenter(Arc<Identity>);

impl rustls::client::ResolvesClientCert for Presenter {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What the identity tasks report (for logs and `dapr_runtime_mtls_*`).
pub trait IdentityEvents: Send + Sync {
    /// A certificate was signed (`renewal`: not the first).
    fn signed(&self, svid: &Svid, renewal: bool);
    /// A signing request failed (it is tried again unless fatal).
    fn failed(&self, error: &IdentityError, renewal: bool);
}

/// Signs the first certificate, trying again with a growing pause (up to `max_pause`) while
/// Sentry is down or refuses; gives up only on a fatal error.
///
/// # Errors
/// A fatal [`IdentityError`].
pub async fn obtain(
    client: &SentryClient,
    events: &dyn IdentityEvents,
    max_pause: Duration,
) -> Result<Arc<Identity>, IdentityError> {
    let mut pause = Duration::from_millis(100);
    loop {
        match client.sign().await {
            Ok(svid) => {
                events.signed(&svid, false);
                return Ok(Identity::new(svid));
            }
            Err(e) => {
                events.failed(&e, false);
                if e.is_fatal() {
                    return Err(e);
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(max_pause);
    }
}

/// Renews `identity` halfway through each certificate's validity, with a fresh key; a failed
/// renewal is tried again after a pause (a tenth of what is left, between 100 ms and 10 s)
/// until it works. Runs until dropped.
pub async fn renew_forever(
    identity: Arc<Identity>,
    client: SentryClient,
    events: Arc<dyn IdentityEvents>,
) {
    loop {
        let current = identity.current();
        let wait = current
            .renew_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        match client.sign().await {
            Ok(svid) => {
                events.signed(&svid, true);
                identity.replace(svid);
            }
            Err(e) => {
                events.failed(&e, true);
                let left = current
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                let pause = (left / 10).clamp(Duration::from_millis(100), Duration::from_secs(10));
                tokio::time::sleep(pause).await;
            }
        }
    }
}
