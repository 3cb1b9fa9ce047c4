//! Microsoft Entra ID tokens for Azure components, as Dapr's Azure components get them: from a
//! service principal's client secret (`azureTenantId`, `azureClientId`, `azureClientSecret`),
//! else from workload identity (the `AZURE_FEDERATED_TOKEN_FILE`, `AZURE_CLIENT_ID` and
//! `AZURE_TENANT_ID` that the Azure workload identity webhook sets in a pod), each a
//! client-credentials grant on `<authority>/<tenant>/oauth2/v2.0/token` for a resource's
//! `.default` scope. The authority is `AZURE_AUTHORITY_HOST` when set, else that of
//! `azureEnvironment` (the public cloud by default). Tokens are kept until five minutes before
//! they expire.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use daprd_core::metadata::{Metadata, MetadataReader};

use crate::oauth::{access_token, TokenError};

/// Renew a token this long before it expires.
const EARLY: Duration = Duration::from_secs(300);

/// How the credential proves itself.
#[derive(Clone, PartialEq, Eq)]
enum Secret {
    /// A service principal's client secret.
    ClientSecret(String),
    /// Workload identity: a federated token (a Kubernetes service account token) read from
    /// this file at each request, sent as the client assertion.
    FederatedTokenFile(PathBuf),
}

/// What a credential asks for tokens with.
#[derive(Clone, PartialEq, Eq)]
pub struct Settings {
    /// `<authority>/<tenant>/oauth2/v2.0/token`.
    pub token_url: String,
    /// The application (client) id.
    pub client_id: String,
    secret: Secret,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match &self.secret {
            Secret::ClientSecret(_) => "client secret".to_string(),
            Secret::FederatedTokenFile(p) => format!("workload identity ({})", p.display()),
        };
        f.debug_struct("Settings")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("secret", &how)
            .finish()
    }
}

/// The first of Dapr's metadata keys for one setting that is given.
fn first<'a>(md: &'a Metadata, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| md.get_non_empty(k))
}

const TENANT: &[&str] = &["azureTenantId", "spnTenantId", "tenantId"];
const CLIENT: &[&str] = &["azureClientId", "spnClientId", "clientId"];
const SECRET: &[&str] = &["azureClientSecret", "spnClientSecret", "clientSecret"];

impl Settings {
    /// Reads the credential from `md` and the environment (`env`: a variable's value), failing
    /// on `r` for what is missing or not supported.
    pub fn read(
        md: &Metadata,
        r: &mut MetadataReader<'_>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Option<Self> {
        r.unsupported(
            &[
                "azureCertificate",
                "azureCertificateFile",
                "azureCertificatePassword",
                "spnCertificate",
                "spnCertificateFile",
            ],
            "Microsoft Entra ID certificate authentication",
        );
        let methods = first(
            md,
            &[
                "azureAuthMethods",
                "azureADAuthMethods",
                "entraIDAuthMethods",
                "microsoftEntraIDAuthMethods",
            ],
        );
        let (mut secret_allowed, mut workload_allowed) = (true, true);
        if let Some(methods) = methods {
            let methods: Vec<String> = methods
                .split(',')
                .map(|m| m.trim().to_ascii_lowercase())
                .filter(|m| !m.is_empty())
                .collect();
            secret_allowed = methods
                .iter()
                .any(|m| m == "clientcredentials" || m == "creds");
            workload_allowed = methods.iter().any(|m| m == "workloadidentity" || m == "wi");
            if let Some(other) = methods.iter().find(|m| {
                !matches!(
                    m.as_str(),
                    "clientcredentials" | "creds" | "workloadidentity" | "wi"
                )
            }) {
                r.fail(
                    "azureAuthMethods",
                    format!("{other:?}: only clientcredentials and workloadidentity are supported by daprd-rs"),
                );
                return None;
            }
        }
        let authority = match env("AZURE_AUTHORITY_HOST").filter(|h| !h.trim().is_empty()) {
            Some(h) => h,
            None => match first(md, &["azureEnvironment", "azureCloud"])
                .unwrap_or_default()
                .to_ascii_lowercase()
                .as_str()
            {
                "" | "azurepubliccloud" | "azurepublic" => {
                    "https://login.microsoftonline.com/".to_string()
                }
                "azurechinacloud" | "azurechina" => "https://login.chinacloudapi.cn/".to_string(),
                "azureusgovernmentcloud" | "azureusgovernment" => {
                    "https://login.microsoftonline.us/".to_string()
                }
                other => {
                    r.fail(
                        "azureEnvironment",
                        format!("{other:?} is not a known Azure cloud"),
                    );
                    return None;
                }
            },
        };
        let token_url = |tenant: &str| {
            format!(
                "{}/{tenant}/oauth2/v2.0/token",
                authority.trim_end_matches('/')
            )
        };
        let tenant = first(md, TENANT);
        let client = first(md, CLIENT);
        if secret_allowed {
            if let (Some(t), Some(c), Some(s)) = (tenant, client, first(md, SECRET)) {
                return Some(Self {
                    token_url: token_url(t),
                    client_id: c.to_string(),
                    secret: Secret::ClientSecret(s.to_string()),
                });
            }
        }
        if workload_allowed {
            if let Some(file) = env("AZURE_FEDERATED_TOKEN_FILE").filter(|f| !f.is_empty()) {
                let tenant = env("AZURE_TENANT_ID").or(tenant.map(str::to_string));
                let client = env("AZURE_CLIENT_ID").or(client.map(str::to_string));
                match (tenant, client) {
                    (Some(t), Some(c)) => {
                        return Some(Self {
                            token_url: token_url(&t),
                            client_id: c,
                            secret: Secret::FederatedTokenFile(PathBuf::from(file)),
                        })
                    }
                    _ => {
                        r.fail(
                            "azureClientId",
                            "workload identity (AZURE_FEDERATED_TOKEN_FILE) needs AZURE_TENANT_ID and AZURE_CLIENT_ID (or azureTenantId and azureClientId)",
                        );
                        return None;
                    }
                }
            }
        }
        r.fail(
            "azureClientSecret",
            "no Microsoft Entra ID credential: give azureTenantId, azureClientId and azureClientSecret, or run with workload identity (AZURE_FEDERATED_TOKEN_FILE); managed identity, certificates and the Azure CLI are not supported by daprd-rs yet",
        );
        None
    }
}

/// A credential and the token it holds.
pub struct Credential {
    settings: Settings,
    http: reqwest::Client,
    cached: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.settings.fmt(f)
    }
}

impl PartialEq for Credential {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings
    }
}

impl Eq for Credential {}

impl Credential {
    /// A credential for `settings`.
    ///
    /// # Errors
    /// The HTTP client cannot be made (the system's CA roots do not load).
    pub fn new(settings: Settings) -> Result<Self, String> {
        Ok(Self {
            settings,
            http: crate::oauth::http_client(None)?,
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// A token for `scope` (`https://servicebus.azure.net/.default`, …): the one held while it
    /// has five minutes left, else a new one. One credential serves one scope.
    ///
    /// # Errors
    /// The token endpoint refused, failed, or the federated token file cannot be read.
    pub async fn token(&self, scope: &str) -> Result<String, TokenError> {
        let mut cached = self.cached.lock().await;
        if let Some((token, until)) = cached.as_ref() {
            if Instant::now() + EARLY < *until {
                return Ok(token.clone());
            }
        }
        let s = &self.settings;
        let mut form: Vec<(&str, String)> = vec![
            ("grant_type", "client_credentials".into()),
            ("client_id", s.client_id.clone()),
            ("scope", scope.to_string()),
        ];
        match &s.secret {
            Secret::ClientSecret(secret) => form.push(("client_secret", secret.clone())),
            Secret::FederatedTokenFile(path) => {
                let assertion = std::fs::read_to_string(path).map_err(|e| TokenError {
                    url: s.token_url.clone(),
                    reason: format!("reading the federated token file {}: {e}", path.display()),
                })?;
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion", assertion.trim().to_string()));
            }
        }
        let request = self.http.post(&s.token_url).form(&form);
        let (token, lifetime) = access_token(&s.token_url, request).await?;
        *cached = Some((token.clone(), Instant::now() + lifetime));
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pairs: &[(&str, &str)], env: &[(&str, &str)]) -> Result<Settings, String> {
        let md = Metadata::from_pairs(pairs);
        let mut r = MetadataReader::new(&md);
        let s = Settings::read(&md, &mut r, |k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        });
        r.finish(|| s)
            .map_err(|e| format!("{e:?}"))
            .and_then(|s| s.ok_or_else(|| "none".to_string()))
    }

    #[test]
    fn a_client_secret_comes_first_then_workload_identity() {
        let s = read(
            &[
                ("azureTenantId", "t1"),
                ("azureClientId", "c1"),
                ("azureClientSecret", "shh"),
            ],
            &[("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token")],
        )
        .unwrap();
        assert_eq!(
            s.token_url,
            "https://login.microsoftonline.com/t1/oauth2/v2.0/token"
        );
        assert!(s.secret == Secret::ClientSecret("shh".into()));
        assert!(
            !format!("{s:?}").contains("shh"),
            "the secret stays out of logs"
        );
        let s = read(
            &[("azureEnvironment", "AzureChinaCloud")],
            &[
                ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token"),
                ("AZURE_TENANT_ID", "t2"),
                ("AZURE_CLIENT_ID", "c2"),
            ],
        )
        .unwrap();
        assert_eq!(
            s.token_url,
            "https://login.chinacloudapi.cn/t2/oauth2/v2.0/token"
        );
        assert_eq!(s.client_id, "c2");
        assert!(s.secret == Secret::FederatedTokenFile("/var/run/token".into()));
        let s = read(
            &[("tenantId", "t"), ("clientId", "c"), ("clientSecret", "x")],
            &[("AZURE_AUTHORITY_HOST", "http://127.0.0.1:9/")],
        )
        .unwrap();
        assert_eq!(s.token_url, "http://127.0.0.1:9/t/oauth2/v2.0/token");
    }

    #[test]
    fn what_is_missing_or_unsupported_is_named() {
        let e = read(&[("azureTenantId", "t")], &[]).unwrap_err();
        assert!(
            e.contains("azureClientSecret") && e.contains("managed identity"),
            "{e}"
        );
        let e = read(&[("azureCertificateFile", "/c.pem")], &[]).unwrap_err();
        assert!(e.contains("certificate"), "{e}");
        let e = read(&[("azureAuthMethods", "cli")], &[]).unwrap_err();
        assert!(
            e.contains("cli") && e.contains("only clientcredentials"),
            "{e}"
        );
        let e = read(&[("azureEnvironment", "mars")], &[]).unwrap_err();
        assert!(e.contains("mars"), "{e}");
        // only workload identity allowed: the secret is not used
        let e = read(
            &[
                ("azureAuthMethods", "wi"),
                ("azureTenantId", "t"),
                ("azureClientId", "c"),
                ("azureClientSecret", "x"),
            ],
            &[],
        )
        .unwrap_err();
        assert!(e.contains("no Microsoft Entra ID credential"), "{e}");
    }
}
