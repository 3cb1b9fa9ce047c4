//! Component types known to this build, keyed by (type, version), case-insensitive.
//!
//! Besides the components that are built in, the registry knows the name of every
//! pub/sub type Dapr ships (so a configuration written for Go daprd gets a precise
//! "not supported yet" instead of "unknown") and the types Dapr has removed.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::pubsub::PubSubFactory;
use crate::secretstore::SecretStoreFactory;

/// Every pub/sub type Dapr ships, with its aliases (canonical name first).
pub const DAPR_PUBSUB_TYPES: &[&[&str]] = &[
    &["pubsub.in-memory"],
    &["pubsub.redis"],
    &["pubsub.rabbitmq"],
    &["pubsub.mqtt3", "pubsub.mqtt"],
    &["pubsub.jetstream"],
    &["pubsub.kafka"],
    &["pubsub.pulsar"],
    &["pubsub.aws.snssqs", "pubsub.snssqs"],
    &["pubsub.gcp.pubsub"],
    &["pubsub.azure.servicebus.topics", "pubsub.azure.servicebus"],
    &[
        "pubsub.azure.servicebus.queues",
        "pubsub.azure.servicebusqueues",
    ],
    &["pubsub.azure.eventhubs"],
    &["pubsub.kubemq"],
    &["pubsub.rocketmq"],
    &["pubsub.solace.amqp"],
];

/// Pub/sub types Dapr has removed, with the release that removed them.
pub const REMOVED_PUBSUB_TYPES: &[(&str, &str)] = &[
    ("pubsub.hazelcast", "v1.11"),
    ("pubsub.natsstreaming", "v1.13"),
];

/// Why a component type cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// Dapr knows the type but this build does not include it.
    #[error(
        "component type {ty:?} is not supported yet by daprd-rs (this build supports: {available})"
    )]
    NotSupportedYet {
        /// Requested type.
        ty: String,
        /// Comma list of supported types.
        available: String,
    },
    /// This project implements the type, but this build was made without its Cargo feature.
    #[error(
        "component type {ty:?} is not in this build of daprd-rs: build it with the Cargo feature {feature:?} (cargo build -p daprd --features {feature})"
    )]
    CompiledOut {
        /// Requested type.
        ty: String,
        /// The Cargo feature of the `daprd` crate that brings it in.
        feature: &'static str,
    },
    /// Dapr removed the type.
    #[error("component type {ty:?} was removed from Dapr in {release}; couldn't find message bus {ty}/{version}")]
    Removed {
        /// Requested type.
        ty: String,
        /// Requested version.
        version: String,
        /// Dapr release that removed it.
        release: &'static str,
    },
    /// Nobody knows the type.
    #[error("unknown component type {ty:?} (this build supports: {available})")]
    Unknown {
        /// Requested type.
        ty: String,
        /// Comma list of supported types.
        available: String,
    },
    /// The type exists but not in this version.
    #[error("couldn't find {ty}/{version}: supported versions are {supported}")]
    Version {
        /// Requested type.
        ty: String,
        /// Requested version.
        version: String,
        /// Comma list of supported versions.
        supported: String,
    },
}

/// A component factory found in the registry.
#[derive(Clone)]
pub enum Factory {
    /// A pub/sub component.
    PubSub(Arc<dyn PubSubFactory>),
    /// A secret store.
    SecretStore(Arc<dyn SecretStoreFactory>),
}

impl Factory {
    /// Canonical type name.
    pub fn component_type(&self) -> &'static str {
        match self {
            Factory::PubSub(f) => f.component_type(),
            Factory::SecretStore(f) => f.component_type(),
        }
    }
}

/// The component types of this build.
#[derive(Clone, Default)]
pub struct Registry {
    by_name: BTreeMap<String, Factory>,
    canonical: Vec<&'static str>,
    /// Types implemented but left out of this build, with the feature that brings them in.
    compiled_out: BTreeMap<String, &'static str>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a pub/sub factory under its type and aliases.
    pub fn register_pubsub(&mut self, factory: Arc<dyn PubSubFactory>) {
        self.canonical.push(factory.component_type());
        for name in
            std::iter::once(factory.component_type()).chain(factory.aliases().iter().copied())
        {
            self.by_name
                .insert(name.to_ascii_lowercase(), Factory::PubSub(factory.clone()));
        }
    }

    /// Notes that `component_type` (and its Dapr aliases) exists in this project but was left
    /// out of this build; resolving it names `feature`.
    pub fn compiled_out(&mut self, component_type: &str, feature: &'static str) {
        let lower = component_type.to_ascii_lowercase();
        let names = DAPR_PUBSUB_TYPES
            .iter()
            .find(|names| names.contains(&lower.as_str()))
            .map_or_else(
                || vec![lower.clone()],
                |n| n.iter().map(|s| s.to_string()).collect(),
            );
        for name in names {
            self.compiled_out.insert(name, feature);
        }
    }

    /// Registers a secret-store factory under its type.
    pub fn register_secret_store(&mut self, factory: Arc<dyn SecretStoreFactory>) {
        self.canonical.push(factory.component_type());
        self.by_name.insert(
            factory.component_type().to_ascii_lowercase(),
            Factory::SecretStore(factory),
        );
    }

    /// The canonical types of this build, sorted.
    pub fn available(&self) -> Vec<&'static str> {
        let mut v = self.canonical.clone();
        v.sort_unstable();
        v
    }

    /// Finds the factory for `ty` (case-insensitive, aliases accepted) and `version`.
    ///
    /// # Errors
    /// [`RegistryError`] saying whether the type is unknown, removed from Dapr, known but
    /// not built yet, or lacks the version.
    pub fn resolve(&self, ty: &str, version: &str) -> Result<Factory, RegistryError> {
        let lower = ty.trim().to_ascii_lowercase();
        let available = || self.available().join(", ");
        let Some(factory) = self.by_name.get(&lower) else {
            if let Some(feature) = self.compiled_out.get(&lower) {
                return Err(RegistryError::CompiledOut {
                    ty: ty.to_string(),
                    feature,
                });
            }
            if let Some((_, release)) = REMOVED_PUBSUB_TYPES.iter().find(|(n, _)| *n == lower) {
                return Err(RegistryError::Removed {
                    ty: ty.to_string(),
                    version: display_version(version),
                    release,
                });
            }
            if DAPR_PUBSUB_TYPES
                .iter()
                .any(|names| names.contains(&lower.as_str()))
            {
                return Err(RegistryError::NotSupportedYet {
                    ty: ty.to_string(),
                    available: available(),
                });
            }
            return Err(RegistryError::Unknown {
                ty: ty.to_string(),
                available: available(),
            });
        };
        let versions: &[&str] = match factory {
            Factory::PubSub(f) => f.versions(),
            Factory::SecretStore(_) => &["v1"],
        };
        let wanted = normalise_version(version);
        if versions.iter().any(|v| v.eq_ignore_ascii_case(&wanted)) {
            Ok(factory.clone())
        } else {
            Err(RegistryError::Version {
                ty: ty.to_string(),
                version: version.to_string(),
                supported: versions.join(", "),
            })
        }
    }
}

/// `""` and `"v0"` select the initial version `v1`, as in Dapr.
pub fn normalise_version(version: &str) -> String {
    let v = version.trim().to_ascii_lowercase();
    if v.is_empty() || v == "v0" {
        "v1".into()
    } else {
        v
    }
}

fn display_version(version: &str) -> String {
    normalise_version(version)
}
