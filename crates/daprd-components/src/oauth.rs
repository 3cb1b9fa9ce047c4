//! OAuth 2.0 token endpoints, as the components that need a bearer token ask them: an HTTP
//! client trusting a given CA (else the system's roots), the token answer
//! (`{access_token, expires_in}`), and the client-credentials grant as golang.org/x/oauth2's
//! `clientcredentials` sends it (Dapr's Pulsar OAuth2): the client's id and secret in an HTTP
//! Basic header, and once more in the form if the server refuses that.

use std::time::Duration;

/// An access token and how long it lives.
pub type Token = (String, Duration);

/// A token's life when the server does not say.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// A token endpoint refused or failed.
#[derive(Debug, thiserror::Error)]
#[error("token from {url}: {reason}")]
pub struct TokenError {
    /// The endpoint.
    pub url: String,
    /// Why.
    pub reason: String,
}

/// An HTTP client for token endpoints, trusting `ca_pem` (else the system's roots).
///
/// # Errors
/// The CA does not load.
pub fn http_client(ca_pem: Option<&str>) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls_config(ca_pem)?)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())
}

/// A rustls client configuration trusting `ca_pem` (else the system's roots).
///
/// # Errors
/// The CA does not load.
pub fn tls_config(ca_pem: Option<&str>) -> Result<rustls::ClientConfig, String> {
    daprd_core::tls::PemMaterial {
        ca_cert: ca_pem.map(str::to_string),
        ..Default::default()
    }
    .client_config(false)
    .map_err(|e| e.to_string())
}

/// Sends a token request and reads `{access_token, expires_in}`.
///
/// # Errors
/// No answer, an error status (with the server's body), or no token in the answer.
pub async fn access_token(
    url: &str,
    request: reqwest::RequestBuilder,
) -> Result<Token, TokenError> {
    let fail = |reason: String| TokenError {
        url: url.to_string(),
        reason,
    };
    let response = request.send().await.map_err(|e| fail(e.to_string()))?;
    let status = response.status();
    let body = response.text().await.map_err(|e| fail(e.to_string()))?;
    if !status.is_success() {
        return Err(fail(format!("status {status}: {}", body.trim())));
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| fail(format!("the answer is not JSON ({e})")))?;
    let token = v
        .get("access_token")
        .and_then(serde_json::Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| fail("the answer has no access_token".into()))?;
    let lifetime = v
        .get("expires_in")
        .and_then(serde_json::Value::as_u64)
        .map_or(DEFAULT_LIFETIME, Duration::from_secs);
    Ok((token.to_string(), lifetime))
}

/// A client-credentials grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    /// The token endpoint.
    pub token_url: String,
    /// The client's id.
    pub client_id: String,
    /// Its secret.
    pub client_secret: String,
    /// `scope` (joined with spaces).
    pub scopes: Vec<String>,
    /// An `audience` parameter each.
    pub audiences: Vec<String>,
}

impl ClientCredentials {
    /// Asks the endpoint for a token: the client in a Basic header first, in the form if the
    /// server answers 400 or 401 to that (as golang.org/x/oauth2 finds a server's style).
    ///
    /// # Errors
    /// Both ways refused, or no answer.
    pub async fn token(&self, http: &reqwest::Client) -> Result<Token, TokenError> {
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        let scope = self.scopes.join(" ");
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        for a in &self.audiences {
            form.push(("audience", a));
        }
        let in_header = http
            .post(&self.token_url)
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .form(&form);
        match access_token(&self.token_url, in_header).await {
            Err(e) if e.reason.starts_with("status 400") || e.reason.starts_with("status 401") => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", &self.client_secret));
                let in_form = http.post(&self.token_url).form(&form);
                access_token(&self.token_url, in_form).await
            }
            other => other,
        }
    }
}
