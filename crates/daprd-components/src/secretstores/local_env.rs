//! `secretstores.local.env`: each secret is an environment variable of this process.
//! Metadata `prefix` (optional) is prepended to the secret name. `DAPR_*` variables and
//! `APP_API_TOKEN` are never served.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::secretstore::{SecretError, SecretStore, SecretStoreFactory};

/// Builds `secretstores.local.env` stores.
pub struct LocalEnvFactory;

#[async_trait]
impl SecretStoreFactory for LocalEnvFactory {
    fn component_type(&self) -> &'static str {
        "secretstores.local.env"
    }

    fn validate(&self, _metadata: &Metadata) -> Vec<MetadataError> {
        Vec::new()
    }

    async fn open(&self, metadata: &Metadata) -> Result<Arc<dyn SecretStore>, SecretError> {
        Ok(Arc::new(LocalEnvStore {
            prefix: metadata.get("prefix").unwrap_or("").to_string(),
        }))
    }
}

struct LocalEnvStore {
    prefix: String,
}

fn forbidden(var: &str) -> bool {
    let upper = var.to_ascii_uppercase();
    upper.starts_with("DAPR_") || upper == "APP_API_TOKEN"
}

#[async_trait]
impl SecretStore for LocalEnvStore {
    async fn get_secret(&self, name: &str) -> Result<BTreeMap<String, String>, SecretError> {
        let var = format!("{}{}", self.prefix, name);
        if forbidden(&var) {
            return Err(SecretError::NotFound(name.to_string()));
        }
        match std::env::var(&var) {
            Ok(value) => Ok([(name.to_string(), value)].into_iter().collect()),
            Err(_) => Err(SecretError::NotFound(name.to_string())),
        }
    }
}
