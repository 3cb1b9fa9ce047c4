//! Entity management (`enableEntityManagement` with Microsoft Entra ID, as Go daprd): an event
//! hub missing when first published to or subscribed to is made through Azure Resource
//! Manager with `partitionCount` and `messageRetentionInDays`, and the subscription's consumer
//! group likewise. Resource Manager's endpoint is the cloud's (`azureEnvironment`), or
//! `AZURE_RESOURCE_MANAGER_ENDPOINT` (a daprd-rs extension, for a sovereign cloud's or a test's
//! endpoint); its tokens are asked for the cloud's Resource Manager scope.

use std::sync::Arc;
use std::time::Duration;

use crate::entra::Credential;

/// The API version of the requests (Event Hubs' `Microsoft.EventHub` provider).
const API_VERSION: &str = "2024-01-01";

/// What went wrong with Resource Manager.
#[derive(Debug, thiserror::Error)]
pub enum ArmError {
    /// No token.
    #[error("azure resource manager: a token: {0}")]
    Token(String),
    /// The request failed on the way.
    #[error("azure resource manager: {what}: {message}")]
    Request {
        /// The operation.
        what: String,
        /// Why.
        message: String,
    },
    /// Resource Manager answered with an error status.
    #[error("azure resource manager: {what}: status {status}: {body}")]
    Status {
        /// The operation.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The start of the answer's body.
        body: String,
    },
}

/// Where and as whom entities are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityManagement {
    /// `subscriptionID`.
    pub subscription: String,
    /// `resourceGroupName`.
    pub resource_group: String,
    /// `partitionCount` (1) of the event hubs it makes.
    pub partitions: u32,
    /// `messageRetentionInDays` (1).
    pub retention_days: u32,
    /// Resource Manager's base URL.
    pub endpoint: String,
    /// The scope of its tokens.
    pub scope: String,
}

/// A Resource Manager client for one namespace.
pub(super) struct Arm {
    http: reqwest::Client,
    settings: EntityManagement,
    /// `.../providers/Microsoft.EventHub/namespaces/<namespace>` under the endpoint.
    base: String,
    credential: Arc<Credential>,
}

impl EntityManagement {
    /// Resource Manager's endpoint and token scope for `environment` (`azureEnvironment`), or
    /// the endpoint `AZURE_RESOURCE_MANAGER_ENDPOINT` names (with the public cloud's scope
    /// unless the environment says otherwise); `None` for an unknown cloud.
    pub fn cloud(environment: &str, endpoint: Option<String>) -> Option<(String, String)> {
        let host = match environment.to_ascii_lowercase().as_str() {
            "" | "azurepubliccloud" | "azurepublic" => "https://management.azure.com",
            "azurechinacloud" | "azurechina" => "https://management.chinacloudapi.cn",
            "azureusgovernmentcloud" | "azureusgovernment" => {
                "https://management.usgovcloudapi.net"
            }
            _ => return None,
        };
        let endpoint = endpoint
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| host.to_string());
        Some((
            endpoint.trim_end_matches('/').to_string(),
            format!("{host}/.default"),
        ))
    }
}

impl Arm {
    /// A client for `namespace` (its host name: the namespace is its first label).
    pub(super) fn new(
        settings: EntityManagement,
        namespace: &str,
        credential: Arc<Credential>,
    ) -> Result<Self, ArmError> {
        let http = crate::oauth::http_client(None).map_err(|e| ArmError::Request {
            what: "the HTTP client".into(),
            message: e,
        })?;
        let name = namespace.split('.').next().unwrap_or(namespace);
        let name = name.split(':').next().unwrap_or(name);
        let base = format!(
            "{}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.EventHub/namespaces/{name}",
            settings.endpoint, settings.subscription, settings.resource_group
        );
        Ok(Self {
            http,
            settings,
            base,
            credential,
        })
    }

    /// Makes event hub `hub` unless it exists.
    pub(super) async fn ensure_hub(&self, hub: &str) -> Result<(), ArmError> {
        let body = serde_json::json!({
            "properties": {
                "messageRetentionInDays": self.settings.retention_days,
                "partitionCount": self.settings.partitions,
            }
        });
        self.ensure(
            &format!("eventhubs/{hub}"),
            &format!("event hub {hub}"),
            body,
        )
        .await
    }

    /// Makes consumer group `group` of `hub` unless it exists.
    pub(super) async fn ensure_consumer_group(
        &self,
        hub: &str,
        group: &str,
    ) -> Result<(), ArmError> {
        self.ensure(
            &format!("eventhubs/{hub}/consumergroups/{group}"),
            &format!("consumer group {group} of event hub {hub}"),
            serde_json::json!({"properties": {}}),
        )
        .await
    }

    /// `GET` the resource; on 404, `PUT` it with `body`.
    async fn ensure(
        &self,
        path: &str,
        what: &str,
        body: serde_json::Value,
    ) -> Result<(), ArmError> {
        let token = self
            .credential
            .token(&self.settings.scope)
            .await
            .map_err(|e| ArmError::Token(e.to_string()))?;
        let url = format!("{}/{path}?api-version={API_VERSION}", self.base);
        let token = &token;
        let send = |request: reqwest::RequestBuilder, what: String| async move {
            let r = request
                .bearer_auth(token)
                .timeout(Duration::from_secs(15))
                .send()
                .await
                .map_err(|e| ArmError::Request {
                    what: what.clone(),
                    message: e.to_string(),
                })?;
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            Ok::<_, ArmError>((status, text, what))
        };
        let (status, text, looked) =
            send(self.http.get(&url), format!("looking up {what}")).await?;
        match status {
            200 => return Ok(()),
            404 => {}
            _ => return Err(status_error(looked, status, &text)),
        }
        tracing::info!(
            what,
            "azure event hubs: creating it through azure resource manager"
        );
        let (status, text, made) =
            send(self.http.put(&url).json(&body), format!("creating {what}")).await?;
        match status {
            200..=202 => Ok(()),
            _ => Err(status_error(made, status, &text)),
        }
    }
}

fn status_error(what: String, status: u16, body: &str) -> ArmError {
    ArmError::Status {
        what,
        status,
        body: body.chars().take(300).collect(),
    }
}
