//! The component store: builds every loaded manifest through the registry and holds the
//! live pub/sub components by name.
//!
//! Building runs in named steps: [`plan`] (pure: resolve each type in the registry, check
//! references), then [`build`] (open secret stores, resolve `secretKeyRef`/`envRef`,
//! substitute placeholders, default `consumerID`, validate every component's metadata,
//! and — unless only validating — connect each one within its `initTimeout`). Every
//! problem is collected; none stops the others from being checked.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use daprd_core::pubsub::PubSub;
use daprd_core::registry::{Factory, Registry};
use daprd_core::secretstore::SecretStore;
use daprd_core::Metadata;

use crate::config::configuration::SecretScope;
use crate::config::resources::{ComponentManifest, MetadataSource, ResourceError, Resources};
use crate::scoping::ScopingRules;

/// A live pub/sub component and what daprd keeps beside it.
pub struct PubSubEntry {
    /// Component name.
    pub name: String,
    /// The component.
    pub component: Arc<dyn PubSub>,
    /// Topic scoping.
    pub scoping: ScopingRules,
    /// Namespace prepended to every topic when the component is namespace-scoped.
    pub topic_prefix: Option<String>,
}

impl PubSubEntry {
    /// Broker topic for an API topic (namespace prefix applied).
    pub fn broker_topic(&self, topic: &str) -> String {
        match &self.topic_prefix {
            Some(p) => format!("{p}{topic}"),
            None => topic.to_string(),
        }
    }
}

/// A component as reported by the metadata API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredComponent {
    /// Name.
    pub name: String,
    /// Type as written in the manifest.
    pub ty: String,
    /// Version as written (`v1` when empty).
    pub version: String,
    /// Feature names.
    pub capabilities: Vec<String>,
}

impl RegisteredComponent {
    /// The entry for manifest `c` with `features` as capabilities.
    fn of(c: &ComponentManifest, features: &[daprd_core::pubsub::Feature]) -> Self {
        Self {
            name: c.name.clone(),
            ty: c.ty.clone(),
            version: daprd_core::registry::normalise_version(&c.version),
            capabilities: features.iter().map(|f| f.as_str().to_string()).collect(),
        }
    }
}

/// The live components. Hot reload replaces entries one at a time; a reader holds the
/// `Arc` it got for as long as it works with it.
#[derive(Default)]
pub struct ComponentStore {
    pubsubs: RwLock<BTreeMap<String, Arc<PubSubEntry>>>,
    secret_stores: RwLock<BTreeMap<String, Arc<dyn SecretStore>>>,
    registered: RwLock<Vec<RegisteredComponent>>,
    failed: Vec<String>,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ComponentStore {
    /// The pub/sub named `name`.
    pub fn pubsub(&self, name: &str) -> Option<Arc<PubSubEntry>> {
        read(&self.pubsubs).get(name).cloned()
    }

    /// Every pub/sub.
    pub fn pubsubs(&self) -> Vec<Arc<PubSubEntry>> {
        read(&self.pubsubs).values().cloned().collect()
    }

    /// The open secret stores by name.
    pub fn secret_stores(&self) -> BTreeMap<String, Arc<dyn SecretStore>> {
        read(&self.secret_stores).clone()
    }

    /// Components for the metadata API, in load order.
    pub fn registered(&self) -> Vec<RegisteredComponent> {
        read(&self.registered).clone()
    }

    /// Types of the components that failed and were skipped (`ignoreErrors`).
    pub fn failed(&self) -> &[String] {
        &self.failed
    }

    /// Puts `built` in place of the component of the same name (publishes from now on go
    /// to it) and returns the pub/sub it replaced, if any.
    pub fn put(&self, manifest: &ComponentManifest, built: Built) -> Option<Arc<PubSubEntry>> {
        let (features, old) = match built {
            Built::PubSub(entry) => {
                let features = entry.component.features().to_vec();
                let old = write(&self.pubsubs).insert(manifest.name.clone(), entry);
                write(&self.secret_stores).remove(&manifest.name);
                (features, old)
            }
            Built::SecretStore(store) => {
                write(&self.secret_stores).insert(manifest.name.clone(), store);
                (Vec::new(), write(&self.pubsubs).remove(&manifest.name))
            }
        };
        let entry = RegisteredComponent::of(manifest, &features);
        let mut registered = write(&self.registered);
        match registered.iter_mut().find(|r| r.name == manifest.name) {
            Some(r) => *r = entry,
            None => registered.push(entry),
        }
        old
    }

    /// Takes the component named `name` out; returns the pub/sub it was, if one.
    pub fn remove(&self, name: &str) -> Option<Arc<PubSubEntry>> {
        write(&self.registered).retain(|r| r.name != name);
        write(&self.secret_stores).remove(name);
        write(&self.pubsubs).remove(name)
    }

    /// Closes every pub/sub component.
    pub async fn close_all(&self) {
        for entry in self.pubsubs() {
            if let Err(e) = entry.component.close().await {
                tracing::warn!(component = %entry.name, error = %e, "closing component failed");
            }
        }
    }
}

/// A component built and connected, ready to be put in the store.
pub enum Built {
    /// A pub/sub.
    PubSub(Arc<PubSubEntry>),
    /// A secret store.
    SecretStore(Arc<dyn SecretStore>),
}

/// Who the components are built for.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// App id (`{appID}`, default `consumerID`).
    pub app_id: String,
    /// Namespace (`{namespace}` → `<namespace>.<app-id>`, topic prefix).
    pub namespace: String,
    /// `POD_NAME` (`{podName}`).
    pub pod_name: Option<String>,
    /// Connect pub/subs (false for `daprd validate`).
    pub connect: bool,
    /// The Configuration's `secrets.scopes`: which secrets a `secretKeyRef` may read.
    pub secret_scopes: Vec<SecretScope>,
}

/// A manifest with its factory.
pub struct Planned {
    /// The manifest.
    pub manifest: ComponentManifest,
    /// Its factory.
    pub factory: Factory,
}

fn err(c: &ComponentManifest, field: Option<&str>, message: impl Into<String>) -> ResourceError {
    ResourceError {
        file: c.file.clone(),
        component: Some(c.name.clone()),
        field: field.map(str::to_string),
        message: message.into(),
    }
}

/// Resolves every manifest's type in `registry` and checks secret-store references.
/// Secret stores come first in the result, then the rest, each in load order.
pub fn plan(resources: &Resources, registry: &Registry) -> (Vec<Planned>, Vec<ResourceError>) {
    let mut errors = Vec::new();
    let mut stores = Vec::new();
    let mut others = Vec::new();
    for c in &resources.components {
        match registry.resolve(&c.ty, &c.version) {
            Ok(factory) => {
                let planned = Planned {
                    manifest: c.clone(),
                    factory,
                };
                match planned.factory {
                    Factory::SecretStore(_) => stores.push(planned),
                    Factory::PubSub(_) => others.push(planned),
                }
            }
            Err(e) => errors.push(err(c, Some("spec.type"), e.to_string())),
        }
    }
    let store_names: Vec<&str> = stores.iter().map(|p| p.manifest.name.as_str()).collect();
    for p in &others {
        let uses_secrets = p
            .manifest
            .metadata
            .iter()
            .any(|m| matches!(m.source, MetadataSource::Secret { .. }));
        match (&p.manifest.secret_store, uses_secrets) {
            (Some(s), _) if !store_names.contains(&s.as_str()) => errors.push(err(
                &p.manifest,
                Some("auth.secretStore"),
                format!("secret store {s:?} is not defined (define a secretstores.* component with that name)"),
            )),
            (None, true) => errors.push(err(
                &p.manifest,
                Some("auth.secretStore"),
                "secretKeyRef is used but auth.secretStore names no secret store",
            )),
            _ => {}
        }
    }
    stores.extend(others);
    (stores, errors)
}

/// Replaces `{uuid}`, `{appID}`, `{namespace}` and `{podName}` in `value`.
/// Returns the new value and whether `{namespace}` was used.
pub fn substitute(value: &str, ctx: &BuildContext) -> Result<(String, bool), String> {
    let mut out = value.to_string();
    let namespaced = out.contains("{namespace}");
    if namespaced {
        out = out.replace("{namespace}", &format!("{}.{}", ctx.namespace, ctx.app_id));
    }
    out = out.replace("{appID}", &ctx.app_id);
    if out.contains("{podName}") {
        match &ctx.pod_name {
            Some(pod) => out = out.replace("{podName}", pod),
            None => {
                return Err(
                    "uses {podName} but the POD_NAME environment variable is not set".into(),
                )
            }
        }
    }
    while let Some(pos) = out.find("{uuid}") {
        out.replace_range(pos..pos + 6, &uuid::Uuid::new_v4().to_string());
    }
    Ok((out, namespaced))
}

async fn resolve_metadata(
    c: &ComponentManifest,
    stores: &BTreeMap<String, Arc<dyn SecretStore>>,
    ctx: &BuildContext,
    errors: &mut Vec<ResourceError>,
) -> (Metadata, bool) {
    let mut md = Metadata::new();
    let mut namespaced = false;
    for (i, item) in c.metadata.iter().enumerate() {
        let field = format!("spec.metadata[{i}] ({})", item.name);
        let raw = match &item.source {
            MetadataSource::Value(v) => v.clone(),
            MetadataSource::Env(var) => std::env::var(var).unwrap_or_default(),
            MetadataSource::Secret { name, key } => {
                let Some((store_name, store)) = c
                    .secret_store
                    .as_ref()
                    .and_then(|s| stores.get(s).map(|store| (s, store)))
                else {
                    continue; // reported by plan() or the store failed to open
                };
                if let Some(scope) = ctx.secret_scopes.iter().find(|s| &s.store == store_name) {
                    if !scope.allows(name) {
                        errors.push(err(
                            c,
                            Some(&format!("{field}.secretKeyRef")),
                            format!("secret {name:?} of secret store {store_name:?} is not allowed by the Configuration's secrets.scopes"),
                        ));
                        continue;
                    }
                }
                match store.get_secret(name).await {
                    Ok(secret) => match secret.get(key) {
                        Some(v) => v.clone(),
                        None => {
                            errors.push(err(
                                c,
                                Some(&format!("{field}.secretKeyRef")),
                                format!("secret {name:?} has no key {key:?}"),
                            ));
                            continue;
                        }
                    },
                    Err(e) => {
                        errors.push(err(
                            c,
                            Some(&format!("{field}.secretKeyRef")),
                            e.to_string(),
                        ));
                        continue;
                    }
                }
            }
        };
        match substitute(&raw, ctx) {
            Ok((v, ns)) => {
                namespaced |= ns;
                md.insert(item.name.clone(), v);
            }
            Err(e) => errors.push(err(c, Some(&field), e)),
        }
    }
    (md, namespaced)
}

/// Builds one planned component: resolves its metadata (secrets from `stores`), validates
/// it and, with `ctx.connect`, opens or connects it within its `initTimeout`. `None` when it
/// was not built: its problems are in `errors`, or it failed with `ignoreErrors` (logged),
/// or nothing connects (`daprd validate`).
pub async fn build_one(
    p: &Planned,
    stores: &BTreeMap<String, Arc<dyn SecretStore>>,
    ctx: &BuildContext,
    errors: &mut Vec<ResourceError>,
) -> Result<Option<Built>, Ignored> {
    let c = &p.manifest;
    let (mut md, namespaced) = resolve_metadata(c, stores, ctx, errors).await;
    if let Factory::PubSub(_) = &p.factory {
        if md.get_non_empty("consumerID").is_none() {
            md.insert("consumerID", ctx.app_id.clone());
        }
    }
    let problems = match &p.factory {
        Factory::SecretStore(f) => f.validate(&md),
        Factory::PubSub(f) => f.validate(&md),
    };
    if !problems.is_empty() {
        errors.extend(
            problems
                .into_iter()
                .map(|e| err(c, Some(&format!("spec.metadata ({})", e.field)), e.problem)),
        );
        return Ok(None);
    }
    match &p.factory {
        Factory::SecretStore(f) => match f.open(&md).await {
            Ok(s) => Ok(Some(Built::SecretStore(s))),
            Err(e) if c.ignore_errors => {
                tracing::warn!(component = %c.name, error = %e, "secret store failed to open; ignored (ignoreErrors)");
                Err(Ignored)
            }
            Err(e) => {
                errors.push(err(c, None, format!("secret store failed to open: {e}")));
                Ok(None)
            }
        },
        Factory::PubSub(f) => {
            if !ctx.connect || !errors.is_empty() {
                return Ok(None);
            }
            let connected = tokio::time::timeout(c.init_timeout, f.connect(&c.name, &md)).await;
            let component = match connected {
                Ok(Ok(component)) => component,
                Ok(Err(e)) if c.ignore_errors => {
                    tracing::warn!(component = %c.name, error = %e, "component failed to initialise; ignored (ignoreErrors)");
                    return Err(Ignored);
                }
                Err(_) if c.ignore_errors => {
                    tracing::warn!(component = %c.name, timeout = ?c.init_timeout, "component init timed out; ignored (ignoreErrors)");
                    return Err(Ignored);
                }
                Ok(Err(e)) => {
                    errors.push(err(c, None, format!("init failed: {e}")));
                    return Ok(None);
                }
                Err(_) => {
                    errors.push(err(
                        c,
                        Some("spec.initTimeout"),
                        format!("init did not finish within {:?}", c.init_timeout),
                    ));
                    return Ok(None);
                }
            };
            Ok(Some(Built::PubSub(Arc::new(PubSubEntry {
                name: c.name.clone(),
                scoping: ScopingRules::from_metadata(&md),
                topic_prefix: namespaced.then(|| ctx.namespace.clone()),
                component,
            }))))
        }
    }
}

/// A component that failed with `spec.ignoreErrors: true`: logged and left out.
#[derive(Debug, Clone, Copy)]
pub struct Ignored;

/// Builds the component store from `resources`.
///
/// # Errors
/// Every problem found, each naming file, component and field. A component whose
/// `spec.ignoreErrors` is true only logs its connect failure.
pub async fn build(
    resources: &Resources,
    registry: &Registry,
    ctx: &BuildContext,
) -> Result<ComponentStore, Vec<ResourceError>> {
    let (planned, mut errors) = plan(resources, registry);
    let mut store = ComponentStore::default();
    for p in planned {
        let c = &p.manifest;
        let stores = read(&store.secret_stores).clone();
        match build_one(&p, &stores, ctx, &mut errors).await {
            Ok(Some(built)) => {
                if let Built::PubSub(_) = &built {
                    tracing::info!(component = %c.name, r#type = %c.ty, "component loaded");
                }
                store.put(c, built);
            }
            // validated only (or not built because of earlier problems)
            Ok(None) => write(&store.registered).push(RegisteredComponent::of(c, &[])),
            Err(Ignored) => store.failed.push(c.ty.clone()),
        }
    }
    if errors.is_empty() {
        Ok(store)
    } else {
        store.close_all().await;
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::resources::{parse_file, LoadContext};
    use std::path::Path;

    fn ctx() -> BuildContext {
        BuildContext {
            app_id: "checkout".into(),
            namespace: "prod".into(),
            pod_name: None,
            connect: true,
            secret_scopes: Vec::new(),
        }
    }

    fn resources(text: &str) -> Resources {
        let mut r = Resources::default();
        parse_file(
            Path::new("f.yaml"),
            text.as_bytes(),
            &LoadContext {
                app_id: "checkout",
                namespace: None,
            },
            &mut r,
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        r
    }

    #[test]
    fn placeholders() {
        let (v, ns) = substitute("{namespace}-{appID}", &ctx()).unwrap();
        assert_eq!(v, "prod.checkout-checkout");
        assert!(ns);
        let (a, _) = substitute("{uuid}/{uuid}", &ctx()).unwrap();
        let parts: Vec<&str> = a.split('/').collect();
        assert_eq!(parts[0].len(), 36);
        assert_ne!(parts[0], parts[1], "each {{uuid}} is a new one");
        assert!(substitute("{podName}", &ctx())
            .unwrap_err()
            .contains("POD_NAME"));
        let mut c = ctx();
        c.pod_name = Some("pod-1".into());
        assert_eq!(substitute("x-{podName}", &c).unwrap().0, "x-pod-1");
    }

    #[tokio::test]
    async fn builds_in_memory_with_env_secret_and_namespace() {
        // SAFETY of the test: a variable name unique to this test.
        std::env::set_var("DAPRD_RS_TEST_SECRET_1", "s3cret");
        let r = resources(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: env}\nspec: {type: secretstores.local.env, version: v1}\n---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: ps}\nspec:\n  type: pubsub.in-memory\n  version: v1\n  metadata:\n  - name: pw\n    secretKeyRef: {name: DAPRD_RS_TEST_SECRET_1}\n  - name: consumerID\n    value: '{namespace}'\nauth: {secretStore: env}\n",
        );
        let store = build(&r, &daprd_components::builtin_registry(), &ctx())
            .await
            .unwrap();
        let ps = store.pubsub("ps").unwrap();
        assert_eq!(ps.topic_prefix.as_deref(), Some("prod"));
        assert_eq!(ps.broker_topic("orders"), "prodorders");
        assert_eq!(store.registered().len(), 2);
        assert_eq!(store.registered()[0].ty, "secretstores.local.env");
        assert_eq!(
            store.registered()[1].capabilities,
            vec!["SUBSCRIBE_WILDCARDS"]
        );
    }

    #[tokio::test]
    async fn every_problem_is_collected() {
        let r = resources(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: a}\nspec: {type: pubsub.kubemq}\n---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: b}\nspec: {type: pubsub.hazelcast}\n---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: c}\nspec:\n  type: pubsub.in-memory\n  metadata:\n  - name: x\n    secretKeyRef: {name: s}\n---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: d}\nspec: {type: pubsub.in-memory, metadata: [{name: id, value: '{podName}'}]}\n",
        );
        let errs = build(&r, &daprd_components::builtin_registry(), &ctx())
            .await
            .err()
            .unwrap();
        let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 4, "{lines:#?}");
        assert!(
            lines[0].contains("component \"a\"") && lines[0].contains("not supported yet"),
            "{lines:#?}"
        );
        assert!(
            lines[1].contains("component \"b\"") && lines[1].contains("removed"),
            "{lines:#?}"
        );
        assert!(
            lines[2].contains("component \"c\"") && lines[2].contains("auth.secretStore"),
            "{lines:#?}"
        );
        assert!(
            lines[3].contains("component \"d\"") && lines[3].contains("POD_NAME"),
            "{lines:#?}"
        );
    }

    #[tokio::test]
    async fn missing_secret_is_reported() {
        let r = resources(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: env}\nspec: {type: secretstores.local.env}\n---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: ps}\nspec:\n  type: pubsub.in-memory\n  metadata:\n  - name: pw\n    secretKeyRef: {name: DAPRD_RS_TEST_NO_SUCH_VAR}\nauth: {secretStore: env}\n",
        );
        let errs = build(&r, &daprd_components::builtin_registry(), &ctx())
            .await
            .err()
            .unwrap();
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs[0].field.as_deref(),
            Some("spec.metadata[0] (pw).secretKeyRef")
        );
    }

    #[tokio::test]
    async fn secret_scopes_limit_secret_references() {
        std::env::set_var("DAPRD_RS_TEST_SCOPED_A", "a-value");
        std::env::set_var("DAPRD_RS_TEST_SCOPED_B", "b-value");
        let r = resources(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: env}\nspec: {type: secretstores.local.env}\n---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: ps}\nspec:\n  type: pubsub.in-memory\n  metadata:\n  - name: a\n    secretKeyRef: {name: DAPRD_RS_TEST_SCOPED_A}\n  - name: b\n    secretKeyRef: {name: DAPRD_RS_TEST_SCOPED_B}\nauth: {secretStore: env}\n",
        );
        let mut scoped = ctx();
        scoped.secret_scopes = vec![SecretScope {
            store: "env".into(),
            default_deny: true,
            allowed: vec!["DAPRD_RS_TEST_SCOPED_A".into()],
            denied: Vec::new(),
        }];
        let errs = build(&r, &daprd_components::builtin_registry(), &scoped)
            .await
            .err()
            .unwrap();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            errs[0].field.as_deref(),
            Some("spec.metadata[1] (b).secretKeyRef")
        );
        assert!(errs[0].message.contains("secrets.scopes"), "{}", errs[0]);
        // without scopes both resolve
        assert!(build(&r, &daprd_components::builtin_registry(), &ctx())
            .await
            .is_ok());
    }
}
