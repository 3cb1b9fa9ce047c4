//! The Dapr operator as the source of resources in Kubernetes mode: the namespace's
//! Configuration, Components, Subscriptions and Resiliencies listed at start over mTLS (the
//! workload identity presented, the operator checked by SPIFFE id), then kept current from the
//! operator's update streams for hot reload.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use daprd_proto::operator::v1::{
    operator_client::OperatorClient as Grpc, ComponentUpdateRequest, GetConfigurationRequest,
    ListComponentsRequest, ListResiliencyRequest, ListSubscriptionsRequest,
    ResiliencyUpdateRequest, ResourceEventType, SubscriptionUpdateRequest,
};
use serde_json::Value;
use tonic::transport::Channel;

use super::identity::Identity;
use super::spiffe::{SpiffeId, SpiffeServerVerifier, TrustAnchors, TrustFailure};
use crate::config::resources::{parse_file, LoadContext, Resources};

/// How long one list call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the operator gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The operator is not who it should be (trust anchors, SPIFFE id): a configuration error.
    #[error("operator at {address}: {failure}")]
    Trust {
        /// `--control-plane-address`.
        address: String,
        /// What did not match.
        failure: TrustFailure,
    },
    /// Unreachable or no answer in time.
    #[error("operator at {address} is unavailable: {message}")]
    Unavailable {
        /// `--control-plane-address`.
        address: String,
        /// Cause.
        message: String,
    },
    /// The operator answered with an error (a namespace it refuses for this identity).
    #[error("operator at {address} refused {call}: {code:?}: {message}")]
    Refused {
        /// `--control-plane-address`.
        address: String,
        /// The method.
        call: &'static str,
        /// gRPC status code.
        code: tonic::Code,
        /// The operator's message.
        message: String,
    },
    /// A resource the operator sent is not JSON.
    #[error("operator at {address} sent a {kind} that is not JSON: {message}")]
    Invalid {
        /// `--control-plane-address`.
        address: String,
        /// Component, Subscription, ...
        kind: &'static str,
        /// Cause.
        message: String,
    },
    /// The address is not `host:port`.
    #[error("invalid --control-plane-address {0:?}: expected host:port")]
    Address(String),
}

impl OperatorError {
    /// Whether trying again cannot help.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Trust { .. } | Self::Address(_))
    }
}

/// Where the operator is and who asks.
#[derive(Debug, Clone)]
pub struct OperatorOptions {
    /// `--control-plane-address` (`host:port`).
    pub address: String,
    /// `DAPR_TRUST_ANCHORS`.
    pub anchors: TrustAnchors,
    /// The operator's expected id.
    pub operator_id: SpiffeId,
    /// `NAMESPACE`.
    pub namespace: String,
}

/// A client of the operator presenting the workload identity.
#[derive(Clone)]
pub struct OperatorClient {
    grpc: Grpc<Channel>,
    verifier: Arc<SpiffeServerVerifier>,
    opts: OperatorOptions,
}

/// The resources of one kind, in the operator's order, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Named(Vec<(String, Value)>);

impl Named {
    fn from_docs(docs: Vec<Value>) -> Self {
        Self(docs.into_iter().map(|d| (name_of(&d), d)).collect())
    }

    /// Applies an update event: created or updated replaces (or appends), deleted removes.
    fn apply(&mut self, kind: ResourceEventType, doc: Value) {
        let name = name_of(&doc);
        let at = self.0.iter().position(|(n, _)| *n == name);
        match (kind, at) {
            (ResourceEventType::Deleted, Some(i)) => {
                self.0.remove(i);
            }
            (ResourceEventType::Deleted, None) => {}
            (_, Some(i)) => self.0[i].1 = doc,
            (_, None) => self.0.push((name, doc)),
        }
    }

    /// The documents.
    pub fn docs(&self) -> impl Iterator<Item = &Value> {
        self.0.iter().map(|(_, d)| d)
    }
}

fn name_of(doc: &Value) -> String {
    doc.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// What the operator holds for this namespace.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Components.
    pub components: Named,
    /// Subscriptions.
    pub subscriptions: Named,
    /// Resiliencies.
    pub resiliencies: Named,
}

impl Snapshot {
    /// The resources as the loader reads them: each document parsed as a file named
    /// `operator/<kind>/<name>` would be (so scopes apply and errors name the resource),
    /// Kubernetes secrets the operator resolved decoded.
    pub fn resources(&self, ctx: &LoadContext<'_>) -> Resources {
        let mut out = Resources::default();
        let kinds = [
            ("components", &self.components),
            ("subscriptions", &self.subscriptions),
            ("resiliencies", &self.resiliencies),
        ];
        for (kind, named) in kinds {
            for (name, doc) in &named.0 {
                let mut doc = doc.clone();
                if kind == "components" {
                    decode_kubernetes_secrets(&mut doc);
                }
                let text = doc.to_string();
                let file = PathBuf::from(format!("operator/{kind}/{name}"));
                parse_file(&file, text.as_bytes(), ctx, &mut out);
            }
        }
        out
    }
}

/// The operator resolves a component's `secretKeyRef`s to the built-in `kubernetes` store
/// itself and sends each value base64-encoded in `value`: decode those in place.
fn decode_kubernetes_secrets(doc: &mut Value) {
    let store = doc
        .pointer("/auth/secretStore")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !(store.is_empty() || store == "kubernetes") {
        return;
    }
    let Some(items) = doc
        .pointer_mut("/spec/metadata")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for item in items {
        let has_ref = item
            .pointer("/secretKeyRef/name")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        if !has_ref {
            continue;
        }
        let decoded = item
            .get("value")
            .and_then(Value::as_str)
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        if let (Some(value), Some(obj)) = (decoded, item.as_object_mut()) {
            obj.insert("value".into(), Value::String(value));
            obj.remove("secretKeyRef");
        }
    }
    // Resolved: the built-in `kubernetes` store has nothing left to do (a reference the
    // operator could not resolve still names it, and fails as an undefined store).
    let unresolved = doc
        .pointer("/spec/metadata")
        .and_then(Value::as_array)
        .is_some_and(|items| items.iter().any(|i| i.get("secretKeyRef").is_some()));
    if !unresolved {
        if let Some(auth) = doc.get_mut("auth").and_then(Value::as_object_mut) {
            auth.remove("secretStore");
        }
    }
}

fn parse_docs(
    address: &str,
    kind: &'static str,
    raw: Vec<Vec<u8>>,
) -> Result<Vec<Value>, OperatorError> {
    raw.iter()
        .map(|b| {
            serde_json::from_slice(b).map_err(|e| OperatorError::Invalid {
                address: address.to_string(),
                kind,
                message: e.to_string(),
            })
        })
        .collect()
}

impl OperatorClient {
    /// A client (connecting lazily) presenting `identity`.
    ///
    /// # Errors
    /// A bad address.
    pub fn new(opts: OperatorOptions, identity: &Arc<Identity>) -> Result<Self, OperatorError> {
        let verifier = SpiffeServerVerifier::new(opts.anchors.clone(), opts.operator_id.clone());
        let channel = super::spiffe::control_plane_channel(
            &opts.address,
            verifier.clone(),
            Some(identity.presenter()),
        )
        .map_err(|_| OperatorError::Address(opts.address.clone()))?;
        Ok(Self {
            grpc: Grpc::new(channel),
            verifier,
            opts,
        })
    }

    fn failed(&self, call: &'static str, status: &tonic::Status) -> OperatorError {
        let address = self.opts.address.clone();
        if let Some(failure) = self.verifier.take_rejection() {
            return OperatorError::Trust { address, failure };
        }
        let message = status.message().to_string();
        if super::spiffe::is_outage(status.code()) {
            OperatorError::Unavailable { address, message }
        } else {
            OperatorError::Refused {
                address,
                call,
                code: status.code(),
                message,
            }
        }
    }

    async fn call<T>(
        &self,
        call: &'static str,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, OperatorError> {
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Err(_) => Err(OperatorError::Unavailable {
                address: self.opts.address.clone(),
                message: format!("no answer to {call} within {CALL_TIMEOUT:?}"),
            }),
            Ok(Err(status)) => Err(self.failed(call, &status)),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    /// The Configuration `name` (JSON), `None` when the operator has none by that name.
    ///
    /// # Errors
    /// See [`OperatorError`].
    pub async fn configuration(&self, name: &str) -> Result<Option<Vec<u8>>, OperatorError> {
        let mut grpc = self.grpc.clone();
        let r = self
            .call(
                "GetConfiguration",
                grpc.get_configuration(GetConfigurationRequest {
                    name: name.to_string(),
                    namespace: self.opts.namespace.clone(),
                }),
            )
            .await?;
        Ok((!r.configuration.is_empty()).then_some(r.configuration))
    }

    /// Lists the namespace's components, subscriptions and resiliencies.
    ///
    /// # Errors
    /// See [`OperatorError`].
    pub async fn snapshot(&self) -> Result<Snapshot, OperatorError> {
        let ns = self.opts.namespace.clone();
        let address = &self.opts.address;
        let mut grpc = self.grpc.clone();
        let components = self
            .call(
                "ListComponents",
                grpc.list_components(ListComponentsRequest {
                    namespace: ns.clone(),
                }),
            )
            .await?
            .components;
        let subscriptions = self
            .call(
                "ListSubscriptionsV2",
                grpc.list_subscriptions_v2(ListSubscriptionsRequest {
                    namespace: ns.clone(),
                }),
            )
            .await?
            .subscriptions;
        let resiliencies = self
            .call(
                "ListResiliency",
                grpc.list_resiliency(ListResiliencyRequest { namespace: ns }),
            )
            .await?
            .resiliencies;
        Ok(Snapshot {
            components: Named::from_docs(parse_docs(address, "Component", components)?),
            subscriptions: Named::from_docs(parse_docs(address, "Subscription", subscriptions)?),
            resiliencies: Named::from_docs(parse_docs(address, "Resiliency", resiliencies)?),
        })
    }

    /// Follows the update streams from `snapshot` on: each change (or a different list after
    /// a broken stream was reopened) becomes the next [`Resources`] of the returned source.
    pub fn watch(self, snapshot: Snapshot) -> OperatorSource {
        let (tx, rx) = tokio::sync::watch::channel(None);
        tokio::spawn(follow(self, snapshot, tx));
        OperatorSource { rx }
    }
}

/// One event from any of the three streams.
enum Event {
    Component(ResourceEventType, Vec<u8>),
    Subscription(ResourceEventType, Vec<u8>),
    Resiliency(ResourceEventType, Vec<u8>),
}

type Snapshots = tokio::sync::watch::Sender<Option<(u64, Snapshot)>>;

/// Opens the streams, then lists (so no change falls between the list the sidecar started
/// from and the first event), then applies events until a stream breaks; again and again.
async fn follow(client: OperatorClient, mut snapshot: Snapshot, tx: Snapshots) {
    let mut generation = 0u64;
    let mut pause = Duration::from_millis(100);
    let mut publish = |snapshot: &Snapshot| {
        generation += 1;
        let _ = tx.send(Some((generation, snapshot.clone())));
    };
    loop {
        if tx.is_closed() {
            return; // the reloader is gone
        }
        let (events_tx, mut events) = tokio::sync::mpsc::channel::<Event>(64);
        let listed = match open_streams(&client, events_tx).await {
            Ok(()) => client.snapshot().await,
            Err(e) => Err(e),
        };
        match listed {
            Ok(s) => {
                pause = Duration::from_millis(100);
                if s != snapshot {
                    snapshot = s;
                    publish(&snapshot);
                }
            }
            Err(e) => {
                tracing::warn!("hot reload: the operator's update streams: {e}; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
                continue;
            }
        }
        // Until one of the streams ends or breaks (every sender then goes with the task).
        // Events from before the list may repeat what it holds: applied by name, they end
        // in the same state.
        while let Some(event) = events.recv().await {
            let (named, kind, ty, raw) = match event {
                Event::Component(t, b) => (&mut snapshot.components, "Component", t, b),
                Event::Subscription(t, b) => (&mut snapshot.subscriptions, "Subscription", t, b),
                Event::Resiliency(t, b) => (&mut snapshot.resiliencies, "Resiliency", t, b),
            };
            match serde_json::from_slice::<Value>(&raw) {
                Ok(doc) => {
                    tracing::info!(kind, name = %name_of(&doc), event = ?ty, "operator: resource update");
                    named.apply(ty, doc);
                    publish(&snapshot);
                }
                Err(e) => tracing::warn!(kind, "operator sent an update that is not JSON: {e}"),
            }
        }
        tracing::warn!("operator update stream ended; reopening");
        tokio::time::sleep(pause).await;
    }
}

/// Opens the three update streams; each feeds `events` until it ends, then all are dropped.
async fn open_streams(
    client: &OperatorClient,
    events: tokio::sync::mpsc::Sender<Event>,
) -> Result<(), OperatorError> {
    let ns = client.opts.namespace.clone();
    let mut grpc = client.grpc.clone();
    let mut components = client
        .call(
            "ComponentUpdate",
            grpc.component_update(ComponentUpdateRequest {
                namespace: ns.clone(),
            }),
        )
        .await?;
    let mut subscriptions = client
        .call(
            "SubscriptionUpdate",
            grpc.subscription_update(SubscriptionUpdateRequest {
                namespace: ns.clone(),
            }),
        )
        .await?;
    let mut resiliencies = client
        .call(
            "ResiliencyUpdate",
            grpc.resiliency_update(ResiliencyUpdateRequest { namespace: ns }),
        )
        .await?;
    tokio::spawn(async move {
        let ty = |t: i32| ResourceEventType::try_from(t).unwrap_or(ResourceEventType::Unknown);
        loop {
            let event = tokio::select! {
                m = components.message() => match m {
                    Ok(Some(e)) => Event::Component(ty(e.r#type), e.component),
                    _ => return,
                },
                m = subscriptions.message() => match m {
                    Ok(Some(e)) => Event::Subscription(ty(e.r#type), e.subscription),
                    _ => return,
                },
                m = resiliencies.message() => match m {
                    Ok(Some(e)) => Event::Resiliency(ty(e.r#type), e.resiliency),
                    _ => return,
                },
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// The operator as a hot reload [`crate::reload::ResourceSource`]: the latest snapshot after
/// each change, as resources for this app.
pub struct OperatorSource {
    rx: tokio::sync::watch::Receiver<Option<(u64, Snapshot)>>,
}

impl OperatorSource {
    /// The next snapshot (changes that came in between are folded into it).
    pub async fn next_snapshot(&mut self) -> Option<Snapshot> {
        self.rx.changed().await.ok()?;
        self.rx.borrow_and_update().as_ref().map(|(_, s)| s.clone())
    }
}

/// [`OperatorSource`] with the app's load context, for the reloader.
pub struct OperatorResources {
    /// The snapshots.
    pub source: OperatorSource,
    /// `--app-id`.
    pub app_id: String,
    /// `NAMESPACE`.
    pub namespace: String,
}

#[async_trait::async_trait]
impl crate::reload::ResourceSource for OperatorResources {
    async fn next(&mut self) -> Option<Resources> {
        let snapshot = self.source.next_snapshot().await?;
        Some(snapshot.resources(&LoadContext {
            app_id: &self.app_id,
            namespace: Some(&self.namespace),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_secrets_arrive_base64_encoded_and_are_decoded() {
        let mut doc = serde_json::json!({
            "metadata": {"name": "redis"},
            "spec": {"type": "pubsub.redis", "version": "v1", "metadata": [
                {"name": "redisHost", "value": "localhost:6379"},
                {"name": "redisPassword", "value": "czNjcjN0", "secretKeyRef": {"name": "redis", "key": "password"}},
            ]},
        });
        decode_kubernetes_secrets(&mut doc);
        assert_eq!(doc["spec"]["metadata"][1]["value"], "s3cr3t");
        let mut named =
            serde_json::json!({"auth": {"secretStore": "kubernetes"}, "spec": {"metadata": []}});
        decode_kubernetes_secrets(&mut named);
        assert!(
            named.pointer("/auth/secretStore").is_none(),
            "the built-in store: nothing left"
        );
        assert!(doc["spec"]["metadata"][1].get("secretKeyRef").is_none());
        assert_eq!(doc["spec"]["metadata"][0]["value"], "localhost:6379");

        // Another secret store resolves its own references.
        let mut vault = serde_json::json!({
            "auth": {"secretStore": "vault"},
            "spec": {"metadata": [{"name": "p", "value": "", "secretKeyRef": {"name": "x"}}]},
        });
        let before = vault.clone();
        decode_kubernetes_secrets(&mut vault);
        assert_eq!(vault, before);
    }

    #[test]
    fn update_events_create_replace_and_delete_by_name() {
        let doc = |name: &str, v: u32| serde_json::json!({"metadata": {"name": name}, "v": v});
        let mut named = Named::from_docs(vec![doc("a", 1), doc("b", 1)]);
        named.apply(ResourceEventType::Updated, doc("a", 2));
        named.apply(ResourceEventType::Created, doc("c", 1));
        named.apply(ResourceEventType::Deleted, doc("b", 1));
        named.apply(ResourceEventType::Deleted, doc("zz", 1));
        let got: Vec<(String, u64)> = named
            .0
            .iter()
            .map(|(n, d)| (n.clone(), d["v"].as_u64().unwrap_or(0)))
            .collect();
        assert_eq!(got, vec![("a".to_string(), 2), ("c".to_string(), 1)]);
    }
}
