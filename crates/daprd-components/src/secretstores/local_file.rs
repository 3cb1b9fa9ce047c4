//! `secretstores.local.file`: secrets read from a JSON file (`secretsFile`, required).
//! Nested objects are flattened with `nestedSeparator` (default `:`). With
//! `multiValued: true` each top-level key is a secret holding the keys beneath it.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use daprd_core::metadata::{Metadata, MetadataError};
use daprd_core::secretstore::{SecretError, SecretStore, SecretStoreFactory};
use serde_json::Value;

/// Builds `secretstores.local.file` stores.
pub struct LocalFileFactory;

#[async_trait]
impl SecretStoreFactory for LocalFileFactory {
    fn component_type(&self) -> &'static str {
        "secretstores.local.file"
    }

    fn validate(&self, metadata: &Metadata) -> Vec<MetadataError> {
        let mut errors = Vec::new();
        if metadata.get_non_empty("secretsFile").is_none() {
            errors.push(MetadataError::new("secretsFile", "is required"));
        }
        if let Err(e) = metadata.get_bool("multiValued", false) {
            errors.push(e);
        }
        errors
    }

    async fn open(&self, metadata: &Metadata) -> Result<Arc<dyn SecretStore>, SecretError> {
        let path = metadata
            .get_non_empty("secretsFile")
            .ok_or_else(|| MetadataError::new("secretsFile", "is required"))?;
        let separator = metadata.get("nestedSeparator").unwrap_or(":").to_string();
        let multi = metadata.get_bool("multiValued", false)?;
        let text = std::fs::read(path)
            .map_err(|e| SecretError::Io(format!("reading secretsFile {path:?}: {e}")))?;
        let root: Value = serde_json::from_slice(&text)
            .map_err(|e| SecretError::Io(format!("secretsFile {path:?} is not valid json: {e}")))?;
        let Value::Object(obj) = root else {
            return Err(SecretError::Io(format!(
                "secretsFile {path:?} must hold a json object"
            )));
        };
        let mut secrets: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (key, value) in obj {
            if multi {
                let mut flat = BTreeMap::new();
                match value {
                    Value::Object(inner) => {
                        for (k, v) in inner {
                            flatten(&k, v, &separator, &mut flat);
                        }
                    }
                    other => flatten(&key, other, &separator, &mut flat),
                }
                secrets.insert(key, flat);
            } else {
                let mut flat = BTreeMap::new();
                flatten(&key, value, &separator, &mut flat);
                for (k, v) in flat {
                    secrets.insert(k.clone(), [(k, v)].into_iter().collect());
                }
            }
        }
        Ok(Arc::new(LocalFileStore { secrets }))
    }
}

fn flatten(prefix: &str, value: Value, sep: &str, out: &mut BTreeMap<String, String>) {
    match value {
        Value::Object(obj) => {
            for (k, v) in obj {
                flatten(&format!("{prefix}{sep}{k}"), v, sep, out);
            }
        }
        Value::String(s) => {
            out.insert(prefix.to_string(), s);
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

struct LocalFileStore {
    secrets: BTreeMap<String, BTreeMap<String, String>>,
}

#[async_trait]
impl SecretStore for LocalFileStore {
    async fn get_secret(&self, name: &str) -> Result<BTreeMap<String, String>, SecretError> {
        self.secrets
            .get(name)
            .cloned()
            .ok_or_else(|| SecretError::NotFound(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_and_flattens() {
        let dir = std::env::temp_dir().join(format!("daprd-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("s.json");
        std::fs::write(
            &file,
            r#"{"redis":{"password":"pw","port":6379},"plain":"v"}"#,
        )
        .unwrap();
        let mut md = Metadata::new();
        md.insert("secretsFile", file.to_string_lossy().to_string());
        let store = LocalFileFactory.open(&md).await.unwrap();
        assert_eq!(
            store.get_secret("redis:password").await.unwrap()["redis:password"],
            "pw"
        );
        assert_eq!(
            store.get_secret("redis:port").await.unwrap()["redis:port"],
            "6379"
        );
        assert_eq!(store.get_secret("plain").await.unwrap()["plain"], "v");
        assert!(store.get_secret("redis").await.is_err());

        md.insert("multiValued", "true");
        let store = LocalFileFactory.open(&md).await.unwrap();
        assert_eq!(store.get_secret("redis").await.unwrap()["password"], "pw");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_file_is_required() {
        let errs = LocalFileFactory.validate(&Metadata::new());
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "secretsFile");
    }
}
