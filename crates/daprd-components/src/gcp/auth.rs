//! Google credentials for `pubsub.gcp.pubsub` on Google Cloud (the emulator needs none), found
//! as Go daprd's client finds them:
//!
//! * a service account in the component's metadata (`privateKeyId`, `privateKey`,
//!   `clientEmail`, …: the fields of a key file), else Application Default Credentials:
//!   the file `GOOGLE_APPLICATION_CREDENTIALS` names, else gcloud's
//!   `application_default_credentials.json`, else the metadata server of the GCE/GKE
//!   machine (`GCE_METADATA_HOST`, else 169.254.169.254: Workload Identity).
//! * A service account signs its own tokens: an RS256 JWT with the Pub/Sub scopes, sent as the
//!   bearer token (Google's self-signed JWT, as Google's Go client sends for a key; no token
//!   exchange). A user's refresh token (`authorized_user`) is exchanged at its token URI; the
//!   metadata server hands out tokens.
//! * The token is fetched before the component starts (bad credentials fail the init, named)
//!   and refreshed in the background five minutes before it expires.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::RsaKeyPair;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use tokio::sync::watch;
use tonic::metadata::{Ascii, MetadataValue};

use crate::oauth::{access_token, Token};

/// The OAuth scopes of Pub/Sub, as Google's Go client asks for them.
pub const SCOPES: &str =
    "https://www.googleapis.com/auth/pubsub https://www.googleapis.com/auth/cloud-platform";

/// A self-signed JWT's life.
const TOKEN_LIFETIME: Duration = crate::oauth::DEFAULT_LIFETIME;
/// A token is replaced this long before it expires.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// The pause between failed refreshes.
const REFRESH_RETRY: Duration = Duration::from_secs(5);

/// Where Google's services and credentials are. [`GoogleApis::from_env`] is Google Cloud as a
/// Go client sees it; tests point it at servers of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoogleApis {
    /// `PUBSUB_EMULATOR_HOST`: an emulator used when the metadata has no `endpoint`.
    pub emulator_host: Option<String>,
    /// The Pub/Sub API's host (`pubsub.googleapis.com`).
    pub pubsub_host: String,
    /// Its port (443).
    pub pubsub_port: u16,
    /// CA certificates (PEM) for the API and token endpoints; `None`: the system's roots.
    pub ca_pem: Option<String>,
    /// `host[:port]` of the metadata server (`GCE_METADATA_HOST`, else `169.254.169.254`).
    pub metadata_host: String,
    /// The token URI of a user's refresh token when its file names none.
    pub token_uri: String,
    /// `GOOGLE_APPLICATION_CREDENTIALS`.
    pub credentials_file: Option<PathBuf>,
    /// gcloud's `application_default_credentials.json` (under `CLOUDSDK_CONFIG`, else
    /// `~/.config/gcloud`).
    pub well_known_file: Option<PathBuf>,
}

impl GoogleApis {
    /// Google Cloud, with the process's environment.
    pub fn from_env() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let gcloud = env("CLOUDSDK_CONFIG")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".config").join("gcloud")));
        Self {
            emulator_host: env("PUBSUB_EMULATOR_HOST"),
            pubsub_host: "pubsub.googleapis.com".into(),
            pubsub_port: 443,
            ca_pem: None,
            metadata_host: env("GCE_METADATA_HOST").unwrap_or_else(|| "169.254.169.254".into()),
            token_uri: "https://oauth2.googleapis.com/token".into(),
            credentials_file: env("GOOGLE_APPLICATION_CREDENTIALS").map(PathBuf::from),
            well_known_file: gcloud.map(|d| d.join("application_default_credentials.json")),
        }
    }
}

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A credentials file could not be read or is not a credential.
    #[error("google credentials file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No credentials anywhere.
    #[error("no google credentials: the metadata has no service account (privateKeyId), GOOGLE_APPLICATION_CREDENTIALS is not set, {well_known} does not exist, and the metadata server at {metadata_host} answered: {reason} (set endpoint for a Pub/Sub emulator)")]
    NotFound {
        /// gcloud's file that was looked for.
        well_known: String,
        /// The metadata server asked.
        metadata_host: String,
        /// Its failure.
        reason: String,
    },
    /// A token endpoint refused or failed.
    #[error("google {0}")]
    Token(#[from] crate::oauth::TokenError),
    /// The TLS configuration for the token endpoint could not be made.
    #[error("google token client: {0}")]
    Client(String),
}

/// A service account's key.
pub struct ServiceAccount {
    email: String,
    key_id: String,
    key: RsaKeyPair,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("email", &self.email)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl ServiceAccount {
    /// A service account from its email, key id and PEM private key (PKCS #8 as Google's key
    /// files have it, or PKCS #1; `\n` written out as two characters is read as a newline).
    ///
    /// # Errors
    /// The key is not an RSA private key in PEM.
    pub fn new(email: &str, key_id: &str, pem: &str) -> Result<Self, String> {
        let pem = pem.replace("\\n", "\n");
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("is not a PEM private key ({e})"))?;
        let key = match &der {
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            other => RsaKeyPair::from_pkcs8(other.secret_der()),
        }
        .map_err(|e| format!("is not an RSA private key ({e})"))?;
        Ok(Self {
            email: email.to_string(),
            key_id: key_id.to_string(),
            key,
        })
    }

    /// The self-signed JWT (RS256, `kid` = the key id; `iss` = `sub` = the email, the Pub/Sub
    /// scopes, valid an hour from `now`).
    ///
    /// # Errors
    /// ring refuses to sign.
    pub fn jwt(&self, now: u64) -> Result<String, String> {
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": self.key_id});
        let claims = serde_json::json!({
            "iss": self.email,
            "sub": self.email,
            "scope": SCOPES,
            "iat": now,
            "exp": now + TOKEN_LIFETIME.as_secs(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "the private key could not sign".to_string())?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature)
        ))
    }
}

/// Where tokens come from.
#[derive(Debug)]
pub enum Credentials {
    /// A service account's key: self-signed JWTs.
    ServiceAccount(ServiceAccount),
    /// A user's refresh token (`gcloud auth application-default login`).
    AuthorizedUser {
        /// OAuth client id.
        client_id: String,
        /// OAuth client secret.
        client_secret: String,
        /// The refresh token.
        refresh_token: String,
        /// Where it is exchanged.
        token_uri: String,
    },
    /// The machine's metadata server (GCE, GKE Workload Identity, Cloud Run).
    MetadataServer,
}

impl Credentials {
    /// A credentials file's JSON (`type` `service_account` or `authorized_user`).
    ///
    /// # Errors
    /// Not JSON, an unsupported type, or a missing or bad field.
    pub fn from_json(text: &str, apis: &GoogleApis) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("is not JSON ({e})"))?;
        let field = |k: &str| -> Result<String, String> {
            v.get(k)
                .and_then(serde_json::Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| format!("has no {k}"))
        };
        match v.get("type").and_then(serde_json::Value::as_str) {
            Some("service_account") => ServiceAccount::new(
                &field("client_email")?,
                &field("private_key_id")?,
                &field("private_key")?,
            )
            .map(Self::ServiceAccount)
            .map_err(|e| format!("private_key {e}")),
            Some("authorized_user") => Ok(Self::AuthorizedUser {
                client_id: field("client_id")?,
                client_secret: field("client_secret")?,
                refresh_token: field("refresh_token")?,
                token_uri: field("token_uri").unwrap_or_else(|_| apis.token_uri.clone()),
            }),
            Some(other) => Err(format!(
                "has type {other}: only service_account and authorized_user are supported"
            )),
            None => Err("has no type".into()),
        }
    }

    /// Application Default Credentials: the `GOOGLE_APPLICATION_CREDENTIALS` file, gcloud's
    /// file, or the metadata server (asked for a token to see that it is there: that first
    /// token comes along).
    ///
    /// # Errors
    /// A file that does not make credentials, or none found.
    pub async fn find(
        apis: &GoogleApis,
        http: &reqwest::Client,
    ) -> Result<(Self, Option<Token>), AuthError> {
        let read = |path: &PathBuf| -> Result<(Self, Option<Token>), AuthError> {
            let text = std::fs::read_to_string(path).map_err(|e| AuthError::File {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            Self::from_json(&text, apis)
                .map(|c| (c, None))
                .map_err(|reason| AuthError::File {
                    path: path.clone(),
                    reason,
                })
        };
        if let Some(path) = &apis.credentials_file {
            return read(path);
        }
        if let Some(path) = apis.well_known_file.as_ref().filter(|p| p.exists()) {
            return read(path);
        }
        match Self::MetadataServer.token(http, apis).await {
            Ok(token) => Ok((Self::MetadataServer, Some(token))),
            Err(e) => Err(AuthError::NotFound {
                well_known: apis
                    .well_known_file
                    .as_ref()
                    .map_or_else(|| "gcloud's file".into(), |p| p.display().to_string()),
                metadata_host: apis.metadata_host.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// A fresh access token and how long it lives.
    async fn token(&self, http: &reqwest::Client, apis: &GoogleApis) -> Result<Token, AuthError> {
        match self {
            Self::ServiceAccount(sa) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let jwt = sa.jwt(now).map_err(|reason| crate::oauth::TokenError {
                    url: "(self-signed)".into(),
                    reason,
                })?;
                Ok((jwt, TOKEN_LIFETIME))
            }
            Self::AuthorizedUser {
                client_id,
                client_secret,
                refresh_token,
                token_uri,
            } => {
                let request = http.post(token_uri).form(&[
                    ("grant_type", "refresh_token"),
                    ("client_id", client_id),
                    ("client_secret", client_secret),
                    ("refresh_token", refresh_token),
                ]);
                Ok(access_token(token_uri, request).await?)
            }
            Self::MetadataServer => {
                let url = format!(
                    "http://{}/computeMetadata/v1/instance/service-accounts/default/token",
                    apis.metadata_host
                );
                let request = http
                    .get(&url)
                    .query(&[("scopes", SCOPES.replace(' ', ","))])
                    .header("Metadata-Flavor", "Google")
                    .timeout(Duration::from_secs(3));
                Ok(access_token(&url, request).await?)
            }
        }
    }
}

/// The `authorization` header every call carries (none for the emulator), kept fresh by the
/// task [`Bearer::start`] spawns.
#[derive(Clone, Default)]
pub struct Bearer(Option<Arc<RwLock<MetadataValue<Ascii>>>>);

impl Bearer {
    /// Fetches the first token unless `first` is one (an error fails the component's init)
    /// and spawns the task that replaces it before it expires, until `stop` turns true.
    ///
    /// # Errors
    /// The first token could not be had.
    pub async fn start(
        credentials: Credentials,
        first: Option<Token>,
        apis: GoogleApis,
        http: reqwest::Client,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Self, AuthError> {
        let (token, mut lifetime) = match first {
            Some(t) => t,
            None => credentials.token(&http, &apis).await?,
        };
        let cell = Arc::new(RwLock::new(header(&token)?));
        let shared = cell.clone();
        tokio::spawn(async move {
            loop {
                let wait = lifetime
                    .saturating_sub(REFRESH_MARGIN)
                    .max(Duration::from_secs(10));
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    () = tokio::time::sleep(wait) => {}
                }
                match credentials
                    .token(&http, &apis)
                    .await
                    .and_then(|(t, l)| header(&t).map(|h| (h, l)))
                {
                    Ok((h, l)) => {
                        *shared
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = h;
                        lifetime = l;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "gcp pubsub: refreshing the google token failed; retrying");
                        lifetime = REFRESH_MARGIN + REFRESH_RETRY;
                    }
                }
            }
        });
        Ok(Self(Some(cell)))
    }
}

fn header(token: &str) -> Result<MetadataValue<Ascii>, AuthError> {
    format!("Bearer {token}").parse().map_err(|_| {
        AuthError::Token(crate::oauth::TokenError {
            url: "(token)".into(),
            reason: "the token is not a valid header value".into(),
        })
    })
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(cell) = &self.0 {
            let value = cell
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// An HTTP client for the token endpoints, trusting `apis.ca_pem` (else the system's roots).
///
/// # Errors
/// The CA does not load.
pub fn http_client(apis: &GoogleApis) -> Result<reqwest::Client, AuthError> {
    crate::oauth::http_client(apis.ca_pem.as_deref()).map_err(AuthError::Client)
}

/// The TLS client configuration for Google's endpoints.
///
/// # Errors
/// The CA does not load.
pub fn tls_config(apis: &GoogleApis) -> Result<rustls::ClientConfig, AuthError> {
    crate::oauth::tls_config(apis.ca_pem.as_deref()).map_err(AuthError::Client)
}
