//! Google's side of `pubsub.gcp.pubsub` on Google Cloud, for tests (no Google Cloud is
//! reachable from our machines): a TLS front that speaks the Pub/Sub gRPC API by forwarding
//! each call to the Pub/Sub emulator once its bearer token checks out — a service account's
//! self-signed RS256 JWT, verified with the test key's public half, or a token the
//! [`TokenServer`] issued (Google's OAuth endpoint and metadata server).

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service};

use crate::controlplane::{server_config, tls_incoming, TestCa};
pub use crate::tokens::{TokenServer, CLIENT_ID, CLIENT_SECRET, REFRESH_TOKEN};

/// The test service account's RSA key (PKCS #8 PEM, made for these tests only).
pub const SERVICE_ACCOUNT_KEY: &str = include_str!("gcp/service-account-key.pem");
/// The test service account's email.
pub const SERVICE_ACCOUNT_EMAIL: &str = "daprd-test@daprd-rs-test.iam.gserviceaccount.com";
/// The test service account's key id.
pub const SERVICE_ACCOUNT_KEY_ID: &str = "0123456789abcdef0123456789abcdef01234567";

/// A service-account key file (`type` `service_account`) of the test key.
pub fn service_account_json() -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": "daprd-rs-test",
        "private_key_id": SERVICE_ACCOUNT_KEY_ID,
        "private_key": SERVICE_ACCOUNT_KEY,
        "client_email": SERVICE_ACCOUNT_EMAIL,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": "https://oauth2.googleapis.com/token",
    })
    .to_string()
}

/// A user's credentials file (`type` `authorized_user`) whose token URI is `token_uri`.
pub fn authorized_user_json(token_uri: &str) -> String {
    serde_json::json!({
        "type": "authorized_user",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": REFRESH_TOKEN,
        "token_uri": token_uri,
    })
    .to_string()
}

/// What the front and the token server share.
struct State {
    /// The service account's public key (RSAPublicKey DER).
    public_key: Vec<u8>,
    /// The token server whose tokens are good.
    tokens: TokenServer,
    refused: AtomicUsize,
    /// Method paths forwarded, with the kind of token that carried them.
    calls: Mutex<Vec<(String, &'static str)>>,
    /// The token of the last call let through.
    last_token: Mutex<Option<String>>,
    upstream: tonic::transport::Channel,
}

impl State {
    /// The token `authorization` carries and which kind it is, or why it is refused.
    fn check<'h>(&self, authorization: Option<&'h str>) -> Result<(&'static str, &'h str), String> {
        let token = authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .ok_or("no bearer token")?;
        if self.tokens.is_issued(token) {
            return Ok(("access token", token));
        }
        self.check_jwt(token).map(|()| ("self-signed jwt", token))
    }

    fn check_jwt(&self, token: &str) -> Result<(), String> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("the token is neither an issued token nor a JWT".into());
        };
        let decode = |p: &str| URL_SAFE_NO_PAD.decode(p).map_err(|e| e.to_string());
        let json = |p: &str| -> Result<serde_json::Value, String> {
            serde_json::from_slice(&decode(p)?).map_err(|e| e.to_string())
        };
        let (header, claims) = (json(h)?, json(c)?);
        if header["alg"] != "RS256" || header["kid"] != SERVICE_ACCOUNT_KEY_ID {
            return Err(format!("bad JWT header {header}"));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let scope = claims["scope"].as_str().unwrap_or_default();
        if claims["iss"] != SERVICE_ACCOUNT_EMAIL
            || claims["sub"] != SERVICE_ACCOUNT_EMAIL
            || !scope
                .split(' ')
                .any(|s| s == "https://www.googleapis.com/auth/pubsub")
            || claims["exp"].as_u64().is_none_or(|e| e <= now)
            || claims["iat"].as_u64().is_none_or(|i| i > now + 60)
        {
            return Err(format!("bad JWT claims {claims}"));
        }
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            &self.public_key,
        )
        .verify(format!("{h}.{c}").as_bytes(), &decode(sig)?)
        .map_err(|_| "the JWT's signature does not verify".to_string())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One of the two Pub/Sub services, forwarded.
#[derive(Clone)]
struct Front<const SUBSCRIBER: bool>(Arc<State>);

impl<const SUBSCRIBER: bool> tonic::server::NamedService for Front<SUBSCRIBER> {
    const NAME: &'static str = if SUBSCRIBER {
        "google.pubsub.v1.Subscriber"
    } else {
        "google.pubsub.v1.Publisher"
    };
}

impl<const SUBSCRIBER: bool> Service<http::Request<Body>> for Front<SUBSCRIBER> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let authorization = request.headers_mut().remove("authorization");
            let (kind, token) =
                match state.check(authorization.as_ref().and_then(|v| v.to_str().ok())) {
                    Ok(checked) => checked,
                    Err(why) => {
                        state.refused.fetch_add(1, Ordering::SeqCst);
                        return Ok(tonic::Status::unauthenticated(why).into_http());
                    }
                };
            lock(&state.calls).push((request.uri().path().to_string(), kind));
            *lock(&state.last_token) = Some(token.to_string());
            let mut upstream = state.upstream.clone();
            if let Err(e) = std::future::poll_fn(|cx| upstream.poll_ready(cx)).await {
                return Ok(tonic::Status::unavailable(e.to_string()).into_http());
            }
            match upstream.call(request).await {
                Ok(response) => Ok(response),
                Err(e) => Ok(tonic::Status::unavailable(e.to_string()).into_http()),
            }
        })
    }
}

/// Google Cloud for one test: the Pub/Sub API over TLS on `localhost:<pubsub_port>` (a
/// certificate of [`Self::ca_pem`]) in front of an emulator, and the token server on
/// `127.0.0.1:<token_port>` (OAuth endpoint `/token`, metadata server). Stops when dropped.
pub struct GoogleTestCloud {
    /// The TLS port of the Pub/Sub API.
    pub pubsub_port: u16,
    /// The token server's port (plain HTTP).
    pub token_port: u16,
    /// The CA (PEM) that signed the API's certificate.
    pub ca_pem: String,
    state: Arc<State>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl GoogleTestCloud {
    /// Starts both servers, the front forwarding to the emulator at `emulator` (`host:port`).
    ///
    /// # Panics
    /// A port cannot be bound or the test key does not load.
    pub async fn start(emulator: &str) -> Self {
        let der = PrivateKeyDer::from_pem_slice(SERVICE_ACCOUNT_KEY.as_bytes()).expect("test key");
        let key = ring::signature::RsaKeyPair::from_pkcs8(der.secret_der()).expect("RSA key");
        let upstream = tonic::transport::Endpoint::from_shared(format!("http://{emulator}"))
            .expect("emulator address")
            .connect_lazy();
        let state = Arc::new(State {
            public_key: ring::signature::KeyPair::public_key(&key).as_ref().to_vec(),
            tokens: TokenServer::start().await,
            refused: AtomicUsize::new(0),
            calls: Mutex::default(),
            last_token: Mutex::default(),
            upstream,
        });
        let ca = TestCa::new(&rcgen::PKCS_ECDSA_P256_SHA256);
        let config = server_config(&ca.issue_dns("localhost"), None);
        let api = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the API port");
        let pubsub_port = api.local_addr().expect("addr").port();
        let token_port = state.tokens.port;
        let (drop_tx, drop_rx) = tokio::sync::watch::channel(0u64);
        let incoming = tls_incoming(api, config, drop_rx);
        let server = tonic::transport::Server::builder()
            .add_service(Front::<false>(state.clone()))
            .add_service(Front::<true>(state.clone()));
        let front = tokio::spawn(async move {
            let _keep = drop_tx;
            let _ = server.serve_with_incoming(incoming).await;
        });
        Self {
            pubsub_port,
            token_port,
            ca_pem: ca.pem,
            state,
            tasks: vec![front],
        }
    }

    /// The method paths forwarded so far, each with the kind of token that carried it
    /// (`"self-signed jwt"` or `"access token"`).
    pub fn calls(&self) -> Vec<(String, &'static str)> {
        lock(&self.state.calls).clone()
    }

    /// The bearer token of the last call let through.
    pub fn last_token(&self) -> Option<String> {
        lock(&self.state.last_token).clone()
    }

    /// Calls refused for their token.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// The token server.
    pub fn tokens(&self) -> &TokenServer {
        &self.state.tokens
    }
}

impl Drop for GoogleTestCloud {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
