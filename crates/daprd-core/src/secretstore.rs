//! The secret-store contract, used to resolve `secretKeyRef` in component metadata.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::metadata::{Metadata, MetadataError};

/// An error from a secret store.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The secret does not exist.
    #[error("secret {0:?} not found")]
    NotFound(String),
    /// The store could not be read.
    #[error("reading secret store: {0}")]
    Io(String),
    /// The store's metadata is invalid.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
}

/// A live secret store.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// The secret `name`: one or more key/value pairs.
    async fn get_secret(&self, name: &str) -> Result<BTreeMap<String, String>, SecretError>;
}

/// Builds secret stores of one type.
#[async_trait]
pub trait SecretStoreFactory: Send + Sync {
    /// Canonical type, e.g. `secretstores.local.env`.
    fn component_type(&self) -> &'static str;

    /// Checks `metadata` without any I/O.
    fn validate(&self, metadata: &Metadata) -> Vec<MetadataError>;

    /// Opens the store.
    async fn open(&self, metadata: &Metadata) -> Result<Arc<dyn SecretStore>, SecretError>;
}
