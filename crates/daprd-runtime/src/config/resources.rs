//! Loading resource manifests from `--resources-path` directories (Dapr's standalone
//! loader): `.yaml`/`.yml` files read non-recursively in name order, several documents per
//! file, documents routed by `apiVersion` + `kind`.
//!
//! Parsing is pure: every problem in every file is collected as a [`ResourceError`] naming
//! the file, the component and the field, and nothing panics on any input.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_norway::Value;

/// A problem in a resources directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceError {
    /// File (or directory) at fault.
    pub file: PathBuf,
    /// Component name, when known.
    pub component: Option<String>,
    /// Field path (`spec.metadata[2].value`), when known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ResourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(c) = &self.component {
            write!(f, ": component {c:?}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ResourceError {}

/// Where a metadata item's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataSource {
    /// A literal value (scalars as text, other YAML values as JSON).
    Value(String),
    /// A secret: `secretKeyRef { name, key }` (key defaults to name).
    Secret {
        /// Secret name.
        name: String,
        /// Key within the secret.
        key: String,
    },
    /// An environment variable (`envRef`).
    Env(String),
}

/// One `spec.metadata` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataItem {
    /// Property name.
    pub name: String,
    /// Where the value comes from.
    pub source: MetadataSource,
}

/// A parsed `Component` manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentManifest {
    /// File it came from.
    pub file: PathBuf,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `spec.type`.
    pub ty: String,
    /// `spec.version`.
    pub version: String,
    /// `spec.ignoreErrors`.
    pub ignore_errors: bool,
    /// `spec.initTimeout` (default 5s; invalid values fall back to 5s, as in Dapr).
    pub init_timeout: std::time::Duration,
    /// `spec.metadata`, in order.
    pub metadata: Vec<MetadataItem>,
    /// `auth.secretStore`.
    pub secret_store: Option<String>,
    /// Top-level `scopes`.
    pub scopes: Vec<String>,
}

/// A document of another kind, kept for the loaders of later issues.
#[derive(Debug, Clone)]
pub struct OtherManifest {
    /// File it came from.
    pub file: PathBuf,
    /// `kind`.
    pub kind: String,
    /// The whole document.
    pub doc: Value,
}

/// Everything read from the resources directories.
#[derive(Debug, Default)]
pub struct Resources {
    /// Components that apply to this app, in load order.
    pub components: Vec<ComponentManifest>,
    /// Other Dapr resources (Subscription, Resiliency, Configuration, ...).
    pub others: Vec<OtherManifest>,
    /// Every problem found.
    pub errors: Vec<ResourceError>,
    /// Things worth a warning (skipped files, defaulted values, ...).
    pub warnings: Vec<String>,
}

/// Who is loading (for `scopes` and the namespace rule).
#[derive(Debug, Clone)]
pub struct LoadContext<'a> {
    /// App id (empty: keep components of every scope).
    pub app_id: &'a str,
    /// `NAMESPACE`, when set.
    pub namespace: Option<&'a str>,
}

/// Reads every directory in `paths`.
pub fn load_resources(paths: &[PathBuf], ctx: &LoadContext<'_>) -> Resources {
    let mut out = Resources::default();
    for dir in paths {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                out.errors.push(ResourceError {
                    file: dir.clone(),
                    component: None,
                    field: None,
                    message: format!("cannot read resources directory: {e}"),
                });
                continue;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().map(|t| !t.is_dir()).unwrap_or(false))
            .map(|e| e.path())
            .collect();
        files.sort();
        for file in files {
            let ext = file
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase);
            if !matches!(ext.as_deref(), Some("yaml" | "yml")) {
                out.warnings.push(format!(
                    "{}: skipped, not a .yaml or .yml file",
                    file.display()
                ));
                continue;
            }
            match std::fs::read(&file) {
                Ok(bytes) => parse_file(&file, &bytes, ctx, &mut out),
                Err(e) => out.errors.push(ResourceError {
                    file: file.clone(),
                    component: None,
                    field: None,
                    message: format!("cannot read file: {e}"),
                }),
            }
        }
    }
    check_duplicates(&mut out);
    out
}

/// Splits a file into documents the way Dapr does (on `"\n---"`).
pub fn split_documents(text: &str) -> Vec<&str> {
    text.split("\n---").collect()
}

/// Parses one file's bytes into `out`.
pub fn parse_file(file: &Path, bytes: &[u8], ctx: &LoadContext<'_>, out: &mut Resources) {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            out.errors.push(ResourceError {
                file: file.to_path_buf(),
                component: None,
                field: None,
                message: format!("not valid UTF-8: {e}"),
            });
            return;
        }
    };
    for (index, raw) in split_documents(text).into_iter().enumerate() {
        // The separator line may carry trailing text ("--- # comment"); drop that line's rest.
        let doc_text = if index == 0 {
            raw
        } else {
            raw.split_once('\n').map_or("", |(_, rest)| rest)
        };
        if doc_text.trim().is_empty() {
            continue;
        }
        let err = |message: String| ResourceError {
            file: file.to_path_buf(),
            component: None,
            field: None,
            message,
        };
        let doc: Value = match serde_norway::from_str(doc_text) {
            Ok(v) => v,
            Err(e) => {
                out.errors
                    .push(err(format!("document {}: invalid YAML: {e}", index + 1)));
                continue;
            }
        };
        if doc.is_null() {
            continue;
        }
        let Value::Mapping(_) = &doc else {
            out.errors.push(err(format!(
                "document {}: expected a mapping with apiVersion and kind",
                index + 1
            )));
            continue;
        };
        let kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if kind == "Component" && api_version == "dapr.io/v1alpha1" {
            if let Some(c) = parse_component(file, &doc, &mut out.errors, &mut out.warnings) {
                if !applies(&c, ctx, &mut out.warnings) {
                    continue;
                }
                out.components.push(c);
            }
        } else if api_version.starts_with("dapr.io/") && !kind.is_empty() {
            out.others.push(OtherManifest {
                file: file.to_path_buf(),
                kind,
                doc,
            });
        } else {
            out.warnings.push(format!(
                "{}: document {} skipped: not a Dapr resource (apiVersion {api_version:?}, kind {kind:?})",
                file.display(),
                index + 1
            ));
        }
    }
}

fn applies(c: &ComponentManifest, ctx: &LoadContext<'_>, warnings: &mut Vec<String>) -> bool {
    if let Some(ns) = ctx.namespace {
        if !c.namespace.is_empty() && c.namespace != ns {
            warnings.push(format!(
                "{}: component {:?} skipped: namespace {:?} is not {ns:?}",
                c.file.display(),
                c.name,
                c.namespace
            ));
            return false;
        }
    }
    if !ctx.app_id.is_empty() && !c.scopes.is_empty() && !c.scopes.iter().any(|s| s == ctx.app_id) {
        warnings.push(format!(
            "{}: component {:?} skipped: app {:?} is not in its scopes",
            c.file.display(),
            c.name,
            ctx.app_id
        ));
        return false;
    }
    true
}

fn check_duplicates(out: &mut Resources) {
    let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
    let mut dups = Vec::new();
    for c in &out.components {
        if let Some(first) = seen.get(c.name.as_str()) {
            dups.push(ResourceError {
                file: c.file.clone(),
                component: Some(c.name.clone()),
                field: Some("metadata.name".into()),
                message: format!(
                    "duplicate definition of Component name {} (first defined in {})",
                    c.name,
                    first.display()
                ),
            });
        } else {
            seen.insert(&c.name, &c.file);
        }
    }
    out.errors.extend(dups);
}

/// Text of a YAML scalar as Dapr sees it; other values as JSON.
fn scalar_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Tagged(t) => scalar_text(&t.value),
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}

/// A component name must be usable as a URL path segment.
pub fn validate_component_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is required".into());
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '/' | '%' | '?' | '#') || c.is_whitespace())
    {
        return Err(format!("{name:?} must not contain {c:?}"));
    }
    Ok(())
}

fn parse_component(
    file: &Path,
    doc: &Value,
    errors: &mut Vec<ResourceError>,
    warnings: &mut Vec<String>,
) -> Option<ComponentManifest> {
    let name = doc
        .get("metadata")
        .and_then(|m| m.get("name"))
        .map(scalar_text)
        .unwrap_or_default();
    let before = errors.len();
    let mut fail = |field: &str, message: String| {
        errors.push(ResourceError {
            file: file.to_path_buf(),
            component: (!name.is_empty()).then(|| name.clone()),
            field: Some(field.into()),
            message,
        });
    };
    if let Err(e) = validate_component_name(&name) {
        fail("metadata.name", e);
    }
    let namespace = doc
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .map(scalar_text)
        .unwrap_or_default();
    let spec = doc.get("spec");
    if spec.is_none() {
        fail("spec", "is required".into());
    }
    let spec_field = |k: &str| spec.and_then(|s| s.get(k));
    let ty = match spec_field("type") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(v) if !v.is_null() && !matches!(v, Value::String(_)) => {
            fail("spec.type", "must be a string such as pubsub.redis".into());
            String::new()
        }
        _ => {
            fail("spec.type", "is required".into());
            String::new()
        }
    };
    let version = spec_field("version").map(scalar_text).unwrap_or_default();
    let ignore_errors = ignore_errors(spec_field("ignoreErrors"), &mut fail);
    let init_timeout = init_timeout(spec_field("initTimeout"), |text| {
        warnings.push(format!(
            "{}: component {name:?}: field spec.initTimeout: {text:?} is not a Go duration such as \"5s\"; using 5s as daprd does",
            file.display()
        ));
    });
    let metadata = metadata_items(spec_field("metadata"), &mut fail);
    let secret_store = doc
        .get("auth")
        .and_then(|a| a.get("secretStore"))
        .map(scalar_text)
        .filter(|s| !s.is_empty());
    let scopes = match doc.get("scopes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(s)) => s
            .iter()
            .map(scalar_text)
            .map(|s| s.trim().to_string())
            .collect(),
        Some(_) => {
            fail("scopes", "must be a list of app ids".into());
            Vec::new()
        }
    };
    if errors.len() > before {
        return None;
    }
    Some(ComponentManifest {
        file: file.to_path_buf(),
        name,
        namespace,
        ty,
        version,
        ignore_errors,
        init_timeout,
        metadata,
        secret_store,
        scopes,
    })
}

/// Reports a problem with a field of the resource being read.
type Fail<'a> = dyn FnMut(&str, String) + 'a;

/// `spec.ignoreErrors`: a boolean, or a string Go reads as one.
fn ignore_errors(v: Option<&Value>, fail: &mut Fail<'_>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => daprd_core::metadata::parse_loose_bool(&scalar_text(v)).unwrap_or_else(|| {
            fail(
                "spec.ignoreErrors",
                format!("{:?} is not a boolean", scalar_text(v)),
            );
            false
        }),
    }
}

/// `spec.initTimeout`: a Go duration; anything else is 5 s with a warning, as daprd does.
fn init_timeout(v: Option<&Value>, warn: impl FnOnce(String)) -> std::time::Duration {
    let default = std::time::Duration::from_secs(5);
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return default;
    };
    let text = scalar_text(v);
    match daprd_core::duration::parse_go_duration(&text) {
        Ok(d) if !d.is_zero() => d,
        _ => {
            warn(text);
            default
        }
    }
}

/// `spec.metadata`: `{name, value | secretKeyRef | envRef}` items.
fn metadata_items(v: Option<&Value>, fail: &mut Fail<'_>) -> Vec<MetadataItem> {
    let items = match v {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Sequence(items)) => items,
        Some(_) => {
            fail(
                "spec.metadata",
                "must be a list of {name, value} items".into(),
            );
            return Vec::new();
        }
    };
    let mut metadata = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("spec.metadata[{i}]");
        let Value::Mapping(_) = item else {
            fail(&field, "must be a mapping with name and value".into());
            continue;
        };
        let name = item.get("name").map(scalar_text).unwrap_or_default();
        if name.trim().is_empty() {
            fail(&format!("{field}.name"), "is required".into());
            continue;
        }
        let field = format!("spec.metadata[{i}] ({name})");
        if let Some(source) = metadata_source(item, &field, fail) {
            metadata.push(MetadataItem { name, source });
        }
    }
    metadata
}

/// Where one metadata item's value comes from: `value`, else `secretKeyRef`, else `envRef`
/// (never a `DAPR_` variable or the app's token), else empty.
fn metadata_source(item: &Value, field: &str, fail: &mut Fail<'_>) -> Option<MetadataSource> {
    if let Some(value) = item.get("value").filter(|v| !v.is_null()) {
        return Some(MetadataSource::Value(scalar_text(value)));
    }
    if let Some(secret) = item.get("secretKeyRef").filter(|v| !v.is_null()) {
        let name = secret.get("name").map(scalar_text).unwrap_or_default();
        if name.is_empty() {
            fail(&format!("{field}.secretKeyRef.name"), "is required".into());
            return None;
        }
        let key = secret
            .get("key")
            .map(scalar_text)
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| name.clone());
        return Some(MetadataSource::Secret { name, key });
    }
    if let Some(var) = item
        .get("envRef")
        .map(scalar_text)
        .filter(|v| !v.is_empty())
    {
        let upper = var.to_ascii_uppercase();
        if upper.starts_with("DAPR_") || upper == "APP_API_TOKEN" {
            fail(
                &format!("{field}.envRef"),
                format!("environment variable {var:?} may not be referenced"),
            );
            return None;
        }
        return Some(MetadataSource::Env(var));
    }
    Some(MetadataSource::Value(String::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, ctx: &LoadContext<'_>) -> Resources {
        let mut out = Resources::default();
        parse_file(Path::new("res/file.yaml"), text.as_bytes(), ctx, &mut out);
        check_duplicates(&mut out);
        out
    }

    const CTX: LoadContext<'static> = LoadContext {
        app_id: "app1",
        namespace: None,
    };

    #[test]
    fn parses_a_full_component() {
        let r = parse(
            r#"
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: pubsub
  namespace: prod
spec:
  type: pubsub.redis
  version: v1
  ignoreErrors: true
  initTimeout: 1m
  metadata:
  - name: redisHost
    value: localhost:6379
  - name: port
    value: 6379
  - name: enabled
    value: true
  - name: password
    secretKeyRef:
      name: redis
      key: pw
  - name: other
    secretKeyRef: { name: only }
  - name: fromEnv
    envRef: MY_VAR
  - name: complex
    value: { a: 1 }
auth:
  secretStore: local
scopes: [app1, app2]
"#,
            &CTX,
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let c = &r.components[0];
        assert_eq!(c.name, "pubsub");
        assert_eq!(c.namespace, "prod");
        assert_eq!(c.ty, "pubsub.redis");
        assert!(c.ignore_errors);
        assert_eq!(c.init_timeout, std::time::Duration::from_secs(60));
        assert_eq!(c.metadata[1].source, MetadataSource::Value("6379".into()));
        assert_eq!(c.metadata[2].source, MetadataSource::Value("true".into()));
        assert_eq!(
            c.metadata[3].source,
            MetadataSource::Secret {
                name: "redis".into(),
                key: "pw".into()
            }
        );
        assert_eq!(
            c.metadata[4].source,
            MetadataSource::Secret {
                name: "only".into(),
                key: "only".into()
            }
        );
        assert_eq!(c.metadata[5].source, MetadataSource::Env("MY_VAR".into()));
        assert_eq!(
            c.metadata[6].source,
            MetadataSource::Value(r#"{"a":1}"#.into())
        );
        assert_eq!(c.secret_store.as_deref(), Some("local"));
    }

    #[test]
    fn several_documents_and_other_kinds() {
        let r = parse(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: a}\nspec: {type: pubsub.in-memory}\n---\napiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {name: s}\nspec: {topic: t}\n---\n\n---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: b}\nspec: {type: pubsub.in-memory}\n",
            &CTX,
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(
            r.components
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(r.others.len(), 1);
        assert_eq!(r.others[0].kind, "Subscription");
    }

    #[test]
    fn every_problem_names_file_component_and_field() {
        let r = parse(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: bad}\nspec:\n  ignoreErrors: maybe\n  metadata:\n  - value: x\n  - name: s\n    secretKeyRef: {key: k}\n  - name: e\n    envRef: DAPR_API_TOKEN\nscopes: notalist\n---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: a/b}\nspec: {type: pubsub.in-memory}\n",
            &CTX,
        );
        let lines: Vec<String> = r.errors.iter().map(ToString::to_string).collect();
        let fields: Vec<&str> = r.errors.iter().filter_map(|e| e.field.as_deref()).collect();
        assert!(fields.contains(&"spec.type"), "{lines:?}");
        assert!(fields.contains(&"spec.ignoreErrors"), "{lines:?}");
        assert!(fields.contains(&"spec.metadata[0].name"), "{lines:?}");
        assert!(
            fields.contains(&"spec.metadata[1] (s).secretKeyRef.name"),
            "{lines:?}"
        );
        assert!(fields.contains(&"spec.metadata[2] (e).envRef"), "{lines:?}");
        assert!(fields.contains(&"scopes"), "{lines:?}");
        assert!(fields.contains(&"metadata.name"), "{lines:?}");
        assert!(
            lines.iter().all(|l| l.starts_with("res/file.yaml")),
            "{lines:?}"
        );
        assert!(lines[0].contains("component \"bad\""), "{lines:?}");
        assert!(r.components.is_empty());
    }

    #[test]
    fn invalid_yaml_is_reported_not_panicked() {
        for text in [
            "a: [",
            "\t- : :",
            "- just\n- a list",
            "kind: Component\napiVersion: dapr.io/v1alpha1\nmetadata: [1]\nspec: 3",
            "\u{0}",
        ] {
            let r = parse(text, &CTX);
            assert!(!r.errors.is_empty() || !r.warnings.is_empty(), "{text:?}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // Deterministic pseudo-random documents built from YAML-ish fragments and raw bytes.
        let fragments: [&[u8]; 16] = [
            b"apiVersion: dapr.io/v1alpha1\n",
            b"kind: Component\n",
            b"metadata:\n",
            b"  name: x\n",
            b"spec:\n",
            b"  type: pubsub.in-memory\n",
            b"  metadata:\n",
            b"  - name: a\n",
            b"    value: [1, {b: c}]\n",
            b"    secretKeyRef: 7\n",
            b"---\n",
            b"scopes: {a: b}\n",
            b"\t: - ? ! & * |\n",
            b"\xff\xfe\x00",
            b"  initTimeout: -1h\n",
            b"  ignoreErrors: [true]\n",
        ];
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2000 {
            let mut doc = Vec::new();
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mut r = rng;
            for _ in 0..(r % 12) {
                doc.extend_from_slice(fragments[(r % 16) as usize]);
                r = r.rotate_left(5).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            }
            let mut out = Resources::default();
            parse_file(Path::new("fuzz.yaml"), &doc, &CTX, &mut out);
        }
    }

    #[test]
    fn duplicates_are_fatal() {
        let doc = "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: a}\nspec: {type: pubsub.in-memory}\n";
        let r = parse(&format!("{doc}---\n{doc}"), &CTX);
        assert_eq!(r.errors.len(), 1);
        assert!(r.errors[0]
            .message
            .contains("duplicate definition of Component name a"));
    }

    #[test]
    fn scopes_and_namespace_filter() {
        let doc = "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: a, namespace: prod}\nspec: {type: pubsub.in-memory}\nscopes: [other]\n";
        assert!(parse(doc, &CTX).components.is_empty());
        let doc2 = "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: a, namespace: prod}\nspec: {type: pubsub.in-memory}\n";
        assert_eq!(parse(doc2, &CTX).components.len(), 1);
        let ns = LoadContext {
            app_id: "app1",
            namespace: Some("dev"),
        };
        assert!(parse(doc2, &ns).components.is_empty());
        let ns = LoadContext {
            app_id: "app1",
            namespace: Some("prod"),
        };
        assert_eq!(parse(doc2, &ns).components.len(), 1);
    }

    #[test]
    fn invalid_init_timeout_falls_back_with_warning() {
        let r = parse("apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: a}\nspec: {type: pubsub.in-memory, initTimeout: 5}\n", &CTX);
        assert_eq!(
            r.components[0].init_timeout,
            std::time::Duration::from_secs(5)
        );
        assert!(r.warnings[0].contains("spec.initTimeout"));
    }

    #[test]
    fn missing_directory_is_an_error() {
        let r = load_resources(&[PathBuf::from("/nonexistent/daprd-rs")], &CTX);
        assert_eq!(r.errors.len(), 1);
        assert!(r.errors[0].to_string().contains("/nonexistent/daprd-rs"));
    }
}
