//! A token server for tests, speaking HTTP/1.1 as an OAuth 2.0 token endpoint (`POST /token`:
//! the refresh-token grant of a Google user and the client-credentials grant of Dapr's
//! Pulsar OAuth2) and as the metadata server of a GCE/GKE machine (`GET
//! /computeMetadata/v1/instance/service-accounts/default/token` with `Metadata-Flavor:
//! Google`), and as Microsoft Entra ID's token endpoint of tenant [`TENANT_ID`] (`POST
//! /<tenant>/oauth2/v2.0/token`: the client-credentials grant with the client's secret, or with
//! a workload identity's federated token as its assertion). It issues tokens of its own and
//! remembers them, so a test server can tell a good one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;

/// The refresh token (with its client) the server exchanges.
pub const REFRESH_TOKEN: &str = "1//daprd-test-refresh-token";
/// The OAuth client of [`REFRESH_TOKEN`] and of the client-credentials grant.
pub const CLIENT_ID: &str = "daprd-test.apps.googleusercontent.com";
/// Its secret.
pub const CLIENT_SECRET: &str = "daprd-test-secret";

/// The Entra ID tenant the server answers for.
pub const TENANT_ID: &str = "daprd-test-tenant";
/// The federated token (a workload identity's service account token) it takes as a client
/// assertion of [`CLIENT_ID`].
pub const FEDERATED_TOKEN: &str = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJkYXByZC10ZXN0In0.";

/// A client-credentials grant the server answered: how the client sent its secret, the
/// `scope` and the `audience` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `"header"` (HTTP Basic), `"form"` or `"assertion"` (a federated token).
    pub client_auth: &'static str,
    /// `scope`.
    pub scope: String,
    /// Every `audience`.
    pub audiences: Vec<String>,
}

/// The token server. Stops when dropped.
pub struct TokenServer {
    /// Its port on 127.0.0.1 (plain HTTP).
    pub port: u16,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    issued: Mutex<Vec<String>>,
    expires_in: AtomicU64,
    requests: AtomicUsize,
    grants: Mutex<Vec<Grant>>,
    /// Refuse a client in the Basic header (a server that wants it in the form).
    form_only: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl TokenServer {
    /// Starts it on a free port.
    ///
    /// # Panics
    /// No port can be bound.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the token port");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(State {
            expires_in: AtomicU64::new(3600),
            ..State::default()
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, shared.clone()));
            }
        });
        Self { port, state, task }
    }

    /// `http://127.0.0.1:<port>/token`.
    pub fn token_url(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Whether `token` was issued here and not revoked.
    pub fn is_issued(&self, token: &str) -> bool {
        lock(&self.state.issued).iter().any(|t| t == token)
    }

    /// The tokens issued, oldest first.
    pub fn issued(&self) -> Vec<String> {
        lock(&self.state.issued).clone()
    }

    /// Tokens issued so far.
    pub fn token_requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// The client-credentials grants answered.
    pub fn grants(&self) -> Vec<Grant> {
        lock(&self.state.grants).clone()
    }

    /// The `expires_in` of the tokens issued from now on.
    pub fn set_expires_in(&self, seconds: u64) {
        self.state.expires_in.store(seconds, Ordering::SeqCst);
    }

    /// From now on, a client authenticated in the Basic header is refused (400
    /// `invalid_client`), one in the form accepted.
    pub fn accept_form_only(&self) {
        self.state.form_only.store(true, Ordering::SeqCst);
    }

    /// Revokes every issued token but the newest.
    pub fn revoke_all_but_newest(&self) {
        let mut issued = lock(&self.state.issued);
        let keep = issued.len().saturating_sub(1);
        issued.drain(..keep);
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl State {
    fn issue(&self) -> String {
        let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let token = format!("ya29.daprd-test-{n}-{}", uuid::Uuid::new_v4().simple());
        lock(&self.issued).push(token.clone());
        serde_json::json!({
            "access_token": token,
            "expires_in": self.expires_in.load(Ordering::SeqCst),
            "token_type": "Bearer",
        })
        .to_string()
    }

    /// The answer to a `POST /token` with `form` (and the Basic header's client, if any).
    fn token(
        &self,
        form: &[(String, String)],
        basic: Option<(String, String)>,
    ) -> (&'static str, String) {
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let all = |k: &str| -> Vec<String> {
            form.iter()
                .filter(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .collect()
        };
        let refused = |error: &str| {
            (
                "400 Bad Request",
                serde_json::json!({"error": error}).to_string(),
            )
        };
        match get("grant_type") {
            Some("refresh_token") => {
                if get("refresh_token") == Some(REFRESH_TOKEN)
                    && get("client_id") == Some(CLIENT_ID)
                    && get("client_secret") == Some(CLIENT_SECRET)
                {
                    ("200 OK", self.issue())
                } else {
                    refused("invalid_grant")
                }
            }
            Some("client_credentials")
                if get("client_assertion_type")
                    == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer") =>
            {
                if get("client_id") != Some(CLIENT_ID)
                    || get("client_assertion") != Some(FEDERATED_TOKEN)
                {
                    return (
                        "401 Unauthorized",
                        serde_json::json!({"error": "invalid_client"}).to_string(),
                    );
                }
                lock(&self.grants).push(Grant {
                    client_auth: "assertion",
                    scope: get("scope").unwrap_or_default().to_string(),
                    audiences: all("audience"),
                });
                ("200 OK", self.issue())
            }
            Some("client_credentials") => {
                let (client, how) = match basic {
                    Some(_) if self.form_only.load(Ordering::SeqCst) => {
                        return refused("invalid_client")
                    }
                    Some(c) => (Some(c), "header"),
                    None => (
                        get("client_id")
                            .zip(get("client_secret"))
                            .map(|(i, s)| (i.to_string(), s.to_string())),
                        "form",
                    ),
                };
                if client != Some((CLIENT_ID.to_string(), CLIENT_SECRET.to_string())) {
                    return (
                        "401 Unauthorized",
                        serde_json::json!({"error": "invalid_client"}).to_string(),
                    );
                }
                lock(&self.grants).push(Grant {
                    client_auth: how,
                    scope: get("scope").unwrap_or_default().to_string(),
                    audiences: all("audience"),
                });
                ("200 OK", self.issue())
            }
            _ => refused("unsupported_grant_type"),
        }
    }
}

/// One HTTP/1.1 exchange (the connection closes after it).
async fn serve(mut conn: tokio::net::TcpStream, state: Arc<State>) {
    let Some(request) = crate::http1::read_request(&mut conn).await else {
        return;
    };
    let form: Vec<(String, String)> = request
        .body
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    let basic = request
        .header("authorization")
        .and_then(|a| a.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(i, p)| (percent_decode(i), percent_decode(p)))
        });
    let (status, answer) = match (request.method.as_str(), request.path.as_str()) {
        ("POST", "/token") => state.token(&form, basic),
        ("POST", path) if path == format!("/{TENANT_ID}/oauth2/v2.0/token") => {
            state.token(&form, basic)
        }
        ("GET", "/computeMetadata/v1/instance/service-accounts/default/token")
            if request.header("metadata-flavor") == Some("Google") =>
        {
            ("200 OK", state.issue())
        }
        _ => ("404 Not Found", "{}".to_string()),
    };
    crate::http1::respond(&mut conn, status, "application/json", &answer).await;
}

/// A form value or Basic-auth part, `+` and `%XX` decoded.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}
