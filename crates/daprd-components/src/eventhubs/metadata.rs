//! `pubsub.azure.eventhubs` metadata: Dapr's keys and defaults (those of Go daprd's shared
//! Event Hubs metadata), parsed without I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use daprd_core::metadata::{Metadata, MetadataError, MetadataReader};

pub use super::arm::EntityManagement;
use super::checkpoints::StorageAccount;
use crate::servicebus::ConnectionString;

/// The scope of Event Hubs' Entra ID tokens.
pub const ENTRA_SCOPE: &str = "https://eventhubs.azure.net/.default";

/// Parsed Event Hubs metadata.
#[derive(Debug, Clone)]
pub struct EventHubsMetadata {
    /// The namespace and its key, from `connectionString`, or `eventHubNamespace` with
    /// Microsoft Entra ID.
    pub connection: ConnectionString,
    /// The connection string's `EntityPath`: the one event hub it is for (a topic of another
    /// name is refused).
    pub hub: Option<String>,
    /// `consumerID` (daprd sets it to the app id; alias `consumerGroup`): the consumer group
    /// subscriptions read as. Required to subscribe.
    pub consumer_group: Option<String>,
    /// `storageAccountName` with `storageAccountKey`, or `storageConnectionString`: where
    /// checkpoints and partition ownership are kept. Required to subscribe.
    pub storage: Option<StorageAccount>,
    /// `storageContainerName`. Required to subscribe.
    pub container: Option<String>,
    /// `enableInOrderMessageDelivery` (false): one event of a partition at a time in the
    /// app's hands; otherwise up to [`IN_FLIGHT`] per partition, checkpointed in order.
    pub in_order: bool,
    /// `getAllMessageProperties` (false): hand the events' application properties to the
    /// app too.
    pub all_properties: bool,
    /// `backOffMaxRetries` (3, as Go's component; -1: forever) and `backOffDuration` (5s):
    /// how often, and after what pause, an event the app did not take is handed again before
    /// it is left (logged; the partition goes on, and no checkpoint passes the event, so a
    /// restart hands it again).
    pub max_retries: Option<u64>,
    /// See `max_retries`.
    pub retry_pause: Duration,
    /// How long a network step (connect, attach, publish) may take.
    pub timeout: Duration,
    /// `enableEntityManagement` (with `eventHubNamespace`): missing event hubs and consumer
    /// groups are made through Azure Resource Manager.
    pub entity_management: Option<EntityManagement>,
}

/// `subscriptionID` and `resourceGroupName` (required), `partitionCount` (1, up to 1024) and
/// `messageRetentionInDays` (1, up to 90), and the cloud's Resource Manager.
fn entity_management(md: &Metadata, r: &mut MetadataReader<'_>) -> Option<EntityManagement> {
    let subscription = r.required("subscriptionID", " (for enableEntityManagement)");
    let resource_group = r.required("resourceGroupName", " (for enableEntityManagement)");
    let partitions = r.int("partitionCount", 1, 1..=1024);
    let retention = r.int("messageRetentionInDays", 1, 1..=90);
    let environment = md
        .get_non_empty("azureEnvironment")
        .or_else(|| md.get_non_empty("azureCloud"))
        .unwrap_or_default();
    let Some((endpoint, scope)) = EntityManagement::cloud(
        environment,
        std::env::var("AZURE_RESOURCE_MANAGER_ENDPOINT").ok(),
    ) else {
        // the Entra ID settings report the unknown cloud
        return None;
    };
    Some(EntityManagement {
        subscription,
        resource_group,
        partitions: u32::try_from(partitions).unwrap_or(1),
        retention_days: u32::try_from(retention).unwrap_or(1),
        endpoint,
        scope,
    })
}

/// Events of one partition in the app's hands at once, unless in order.
pub const IN_FLIGHT: usize = 32;

impl EventHubsMetadata {
    /// Parses and checks `md`.
    ///
    /// # Errors
    /// Every bad key.
    pub fn parse(md: &Metadata) -> Result<Self, Vec<MetadataError>> {
        let mut r = MetadataReader::new(md);
        let connection = match (
            md.get_non_empty("connectionString"),
            md.get_non_empty("eventHubNamespace"),
        ) {
            (Some(_), Some(_)) => {
                r.fail(
                    "eventHubNamespace",
                    "only one of connectionString or eventHubNamespace should be passed",
                );
                None
            }
            (Some(cs), None) => match ConnectionString::parse(cs) {
                Ok(c) => Some(c),
                Err(e) => {
                    r.fail("connectionString", e);
                    None
                }
            },
            (None, Some(ns)) => {
                // Go daprd: a bare namespace name gets Azure's suffix (not a `host:port`)
                let ns = if ns.contains('.') || ns.contains(':') {
                    ns.to_string()
                } else {
                    format!("{ns}.servicebus.windows.net")
                };
                crate::servicebus::entra_namespace("eventHubNamespace", &ns, md, &mut r)
            }
            (None, None) => {
                r.fail(
                    "connectionString",
                    "one of connectionString or eventHubNamespace is required",
                );
                None
            }
        };
        let connection = connection.map(|mut c| {
            c.scope = ENTRA_SCOPE;
            c
        });
        let entity_management = if r.bool("enableEntityManagement", false) {
            if md.get_non_empty("eventHubNamespace").is_some() {
                entity_management(md, &mut r)
            } else {
                // Go daprd: only with Entra ID
                tracing::warn!("azure event hubs: enableEntityManagement is ignored with a connection string (it needs Microsoft Entra ID: eventHubNamespace)");
                None
            }
        } else {
            None
        };
        let consumer_group = md
            .get_non_empty("consumerID")
            .or_else(|| md.get_non_empty("consumerGroup"))
            .map(str::to_string);
        let storage = match (
            md.get_non_empty("storageConnectionString"),
            md.get_non_empty("storageAccountName"),
        ) {
            (Some(cs), _) => match StorageAccount::from_connection_string(cs) {
                Ok(a) => Some(a),
                Err(e) => {
                    r.fail("storageConnectionString", e.to_string());
                    None
                }
            },
            (None, Some(name)) => match md.get_non_empty("storageAccountKey") {
                Some(key) => match StorageAccount::with_key(name, key) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        r.fail("storageAccountKey", e.to_string());
                        None
                    }
                },
                None => {
                    r.fail(
                        "storageAccountKey",
                        "is required with storageAccountName (Microsoft Entra ID for Blob Storage is not supported yet)",
                    );
                    None
                }
            },
            (None, None) => None,
        };
        let container = md.get_non_empty("storageContainerName").map(str::to_string);
        let in_order = r.bool("enableInOrderMessageDelivery", false);
        let all_properties = r.bool("getAllMessageProperties", false);
        let max_retries = r.int("backOffMaxRetries", 3, -1..=i64::MAX);
        let retry_pause = r.duration(
            "backOffDuration",
            Duration::from_millis(1),
            Duration::from_secs(5),
        );
        r.finish(|| {
            let connection = connection.unwrap_or_else(|| ConnectionString::unset(ENTRA_SCOPE));
            Self {
                entity_management,
                hub: connection.entity_path.clone(),
                connection,
                consumer_group,
                storage,
                container,
                in_order,
                all_properties,
                max_retries: u64::try_from(max_retries).ok(),
                retry_pause,
                timeout: Duration::from_secs(60),
            }
        })
    }
}

/// A subscription's own keys: `requireAllProperties` (the application properties too) and
/// `checkPointFrequencyPerPartition` (1: a checkpoint after every event).
#[derive(Debug, Clone, Copy)]
pub struct SubscribeOptions {
    /// `requireAllProperties`, else the component's `getAllMessageProperties`.
    pub all_properties: bool,
    /// `checkPointFrequencyPerPartition`.
    pub checkpoint_every: u64,
}

impl SubscribeOptions {
    /// Reads a subscription's metadata.
    ///
    /// # Errors
    /// A bad value.
    pub fn parse(
        md: &BTreeMap<String, String>,
        component: &EventHubsMetadata,
    ) -> Result<Self, MetadataError> {
        let all_properties = match md.get("requireAllProperties").map(String::as_str) {
            None | Some("") => component.all_properties,
            Some(v) => daprd_core::metadata::parse_loose_bool(v).ok_or_else(|| {
                MetadataError::new("requireAllProperties", format!("{v:?} is not a boolean"))
            })?,
        };
        let checkpoint_every = match md
            .get("checkPointFrequencyPerPartition")
            .map(String::as_str)
        {
            None | Some("") => 1,
            Some(v) => v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                MetadataError::new(
                    "checkPointFrequencyPerPartition",
                    format!("{v:?} is not a positive whole number"),
                )
            })?,
        };
        Ok(Self {
            all_properties,
            checkpoint_every,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> Metadata {
        let mut m = Metadata::new();
        for (k, v) in pairs {
            m.insert(*k, *v);
        }
        m
    }

    const CS: &str = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=a2V5;EntityPath=hub";

    #[test]
    fn connection_string_with_entity_path() {
        let m = EventHubsMetadata::parse(&md(&[("connectionString", CS), ("consumerID", "app")]))
            .expect("parses");
        assert_eq!(m.hub.as_deref(), Some("hub"));
        assert_eq!(m.consumer_group.as_deref(), Some("app"));
        assert_eq!(m.connection.scope, ENTRA_SCOPE);
        assert_eq!(m.max_retries, Some(3));
    }

    #[test]
    fn exactly_one_of_connection_string_and_namespace() {
        let e = EventHubsMetadata::parse(&md(&[])).expect_err("neither");
        assert_eq!(e[0].field, "connectionString");
        let e = EventHubsMetadata::parse(&md(&[
            ("connectionString", CS),
            ("eventHubNamespace", "ns"),
        ]))
        .expect_err("both");
        assert_eq!(e[0].field, "eventHubNamespace");
    }

    #[test]
    fn storage_key_is_required_with_the_account_name() {
        let e = EventHubsMetadata::parse(&md(&[
            ("connectionString", CS),
            ("storageAccountName", "acct"),
        ]))
        .expect_err("no key");
        assert_eq!(e[0].field, "storageAccountKey");
    }

    #[test]
    fn entity_management_needs_entra_id_a_subscription_and_a_resource_group() {
        let entra = [
            ("eventHubNamespace", "myns"),
            ("azureTenantId", "t"),
            ("azureClientId", "c"),
            ("azureClientSecret", "s"),
            ("enableEntityManagement", "true"),
        ];
        let e = EventHubsMetadata::parse(&md(&entra)).expect_err("no subscription");
        let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["subscriptionID", "resourceGroupName"]);
        let mut all = entra.to_vec();
        all.extend([("subscriptionID", "sub"), ("resourceGroupName", "rg")]);
        let m = EventHubsMetadata::parse(&md(&all)).expect("parses");
        // a bare namespace name gets Azure's suffix, as in Go
        assert_eq!(m.connection.host, "myns.servicebus.windows.net");
        let em = m.entity_management.expect("on");
        assert_eq!((em.partitions, em.retention_days), (1, 1));
        assert_eq!(em.scope, "https://management.azure.com/.default");
        // with a connection string it is ignored (Go: it needs Entra ID)
        let m = EventHubsMetadata::parse(&md(&[
            ("connectionString", CS),
            ("enableEntityManagement", "true"),
        ]))
        .expect("parses");
        assert!(m.entity_management.is_none());
    }

    #[test]
    fn checkpoint_frequency_must_be_positive() {
        let m = EventHubsMetadata::parse(&md(&[("connectionString", CS)])).expect("parses");
        let mut sub = BTreeMap::new();
        sub.insert(
            "checkPointFrequencyPerPartition".to_string(),
            "0".to_string(),
        );
        let e = SubscribeOptions::parse(&sub, &m).expect_err("zero");
        assert_eq!(e.field, "checkPointFrequencyPerPartition");
        sub.insert(
            "checkPointFrequencyPerPartition".to_string(),
            "5".to_string(),
        );
        assert_eq!(
            SubscribeOptions::parse(&sub, &m)
                .expect("five")
                .checkpoint_every,
            5
        );
    }
}
