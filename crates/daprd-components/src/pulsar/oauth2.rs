//! Dapr's Pulsar OAuth2: a client-credentials grant whose access token is sent as Pulsar's
//! `token` authentication, on every connection the client opens and at each of the broker's
//! authentication challenges; the token is kept until ten seconds before it expires (the
//! expiry margin of golang.org/x/oauth2, which Go daprd uses).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pulsar::error::AuthenticationError;
use tokio::sync::Mutex;

use super::metadata::OAuth2Settings;
use crate::oauth::{ClientCredentials, TokenError};

/// A token is replaced this long before it expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

/// The token source of a component (cloned into each of its clients: they share the token).
#[derive(Clone)]
pub(super) struct OAuth2Token {
    grant: Arc<ClientCredentials>,
    http: reqwest::Client,
    current: Arc<Mutex<Option<(String, Instant)>>>,
}

impl OAuth2Token {
    /// Reads the files the settings name and fetches the first token.
    ///
    /// # Errors
    /// A file, the CA or the token endpoint failed (named).
    pub(super) async fn new(settings: &OAuth2Settings) -> Result<Self, String> {
        let grant = settings.resolve()?;
        let http = crate::oauth::http_client(settings.ca_pem.as_deref())
            .map_err(|e| format!("oauth2TokenCAPEM: {e}"))?;
        let source = Self {
            grant: Arc::new(grant),
            http,
            current: Arc::default(),
        };
        source.token().await.map_err(|e| e.to_string())?;
        Ok(source)
    }

    async fn token(&self) -> Result<String, TokenError> {
        let mut current = self.current.lock().await;
        if let Some((token, expires)) = current.as_ref() {
            if Instant::now() + EXPIRY_MARGIN < *expires {
                return Ok(token.clone());
            }
        }
        let (token, lifetime) = self.grant.token(&self.http).await?;
        *current = Some((token.clone(), Instant::now() + lifetime));
        Ok(token)
    }
}

#[async_trait]
impl pulsar::authentication::Authentication for OAuth2Token {
    fn auth_method_name(&self) -> String {
        "token".into()
    }

    async fn initialize(&mut self) -> Result<(), AuthenticationError> {
        self.token()
            .await
            .map(|_| ())
            .map_err(|e| AuthenticationError::Custom(e.to_string()))
    }

    async fn auth_data(&mut self) -> Result<Vec<u8>, AuthenticationError> {
        self.token()
            .await
            .map(String::into_bytes)
            .map_err(|e| AuthenticationError::Retriable(e.to_string()))
    }
}
