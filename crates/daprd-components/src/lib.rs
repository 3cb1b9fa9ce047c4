//! daprd-rs components: one module per component type, heavy ones behind Cargo features.
//!
//! [`builtin_registry`] is the one list of what this build contains. Components depend on
//! `daprd-core` only; they never see the API servers or the delivery engine.

#[cfg(feature = "servicebus")]
pub mod entra;
#[cfg(feature = "eventhubs")]
pub mod eventhubs;
#[cfg(feature = "gcp")]
pub mod gcp;
#[cfg(feature = "in-memory")]
pub mod in_memory;
#[cfg(feature = "jetstream")]
pub mod jetstream;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "mqtt3")]
pub mod mqtt3;
#[cfg(feature = "oauth")]
pub mod oauth;
#[cfg(feature = "pulsar")]
pub mod pulsar;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis")]
pub mod redis;
pub mod secretstores;
#[cfg(feature = "servicebus")]
pub mod servicebus;
#[cfg(feature = "snssqs")]
pub mod snssqs;
#[cfg(any(
    feature = "jetstream",
    feature = "kafka",
    feature = "rabbitmq",
    feature = "gcp",
    feature = "pulsar",
    feature = "servicebus"
))]
mod stop;

use std::sync::Arc;

use daprd_core::registry::Registry;

/// Every component type compiled into this build.
pub fn builtin_registry() -> Registry {
    let mut registry = Registry::new();
    #[cfg(feature = "in-memory")]
    registry.register_pubsub(Arc::new(in_memory::InMemoryFactory));
    #[cfg(feature = "redis")]
    registry.register_pubsub(Arc::new(redis::RedisFactory));
    #[cfg(feature = "rabbitmq")]
    registry.register_pubsub(Arc::new(rabbitmq::RabbitFactory));
    #[cfg(feature = "jetstream")]
    registry.register_pubsub(Arc::new(jetstream::JetStreamFactory));
    #[cfg(feature = "mqtt3")]
    registry.register_pubsub(Arc::new(mqtt3::MqttFactory));
    #[cfg(feature = "kafka")]
    registry.register_pubsub(Arc::new(kafka::KafkaFactory));
    #[cfg(feature = "snssqs")]
    registry.register_pubsub(Arc::new(snssqs::SnsSqsFactory));
    #[cfg(feature = "gcp")]
    registry.register_pubsub(Arc::new(gcp::GcpPubSubFactory));
    #[cfg(feature = "pulsar")]
    registry.register_pubsub(Arc::new(pulsar::PulsarFactory));
    #[cfg(feature = "servicebus")]
    registry.register_pubsub(Arc::new(servicebus::ServiceBusFactory::TOPICS));
    #[cfg(feature = "servicebus")]
    registry.register_pubsub(Arc::new(servicebus::ServiceBusFactory::QUEUES));
    #[cfg(feature = "eventhubs")]
    registry.register_pubsub(Arc::new(eventhubs::EventHubsFactory));
    // What a smaller build leaves out answers with the feature that brings it in.
    #[cfg(not(feature = "in-memory"))]
    registry.compiled_out("pubsub.in-memory", "in-memory");
    #[cfg(not(feature = "redis"))]
    registry.compiled_out("pubsub.redis", "redis");
    #[cfg(not(feature = "rabbitmq"))]
    registry.compiled_out("pubsub.rabbitmq", "rabbitmq");
    #[cfg(not(feature = "jetstream"))]
    registry.compiled_out("pubsub.jetstream", "jetstream");
    #[cfg(not(feature = "mqtt3"))]
    registry.compiled_out("pubsub.mqtt3", "mqtt3");
    #[cfg(not(feature = "kafka"))]
    registry.compiled_out("pubsub.kafka", "kafka");
    #[cfg(not(feature = "snssqs"))]
    registry.compiled_out("pubsub.aws.snssqs", "snssqs");
    #[cfg(not(feature = "gcp"))]
    registry.compiled_out("pubsub.gcp.pubsub", "gcp");
    #[cfg(not(feature = "pulsar"))]
    registry.compiled_out("pubsub.pulsar", "pulsar");
    #[cfg(not(feature = "servicebus"))]
    for t in [
        "pubsub.azure.servicebus.topics",
        "pubsub.azure.servicebus.queues",
    ] {
        registry.compiled_out(t, "servicebus");
    }
    #[cfg(not(feature = "eventhubs"))]
    registry.compiled_out("pubsub.azure.eventhubs", "eventhubs");
    registry.register_secret_store(Arc::new(secretstores::local_env::LocalEnvFactory));
    registry.register_secret_store(Arc::new(secretstores::local_file::LocalFileFactory));
    registry
}

#[cfg(test)]
mod tests {
    use super::*;
    use daprd_core::registry::RegistryError;

    #[test]
    fn registry_resolves_known_aliases_and_reports_the_rest() {
        let r = builtin_registry();
        assert!(r.resolve("pubsub.In-Memory", "v1").is_ok());
        assert!(r.resolve("pubsub.in-memory", "").is_ok());
        assert!(r.resolve("pubsub.in-memory", "v0").is_ok());
        assert!(matches!(
            r.resolve("pubsub.in-memory", "v2"),
            Err(RegistryError::Version { .. })
        ));
        assert!(r.resolve("secretstores.local.env", "v1").is_ok());
        #[cfg(feature = "mqtt3")]
        assert!(
            r.resolve("pubsub.MQTT", "v1").is_ok(),
            "alias of pubsub.mqtt3"
        );
        #[cfg(feature = "pulsar")]
        assert!(r.resolve("pubsub.pulsar", "v1").is_ok());
        #[cfg(feature = "servicebus")]
        for t in [
            "pubsub.azure.servicebus.topics",
            "pubsub.azure.servicebus",
            "pubsub.azure.servicebus.queues",
            "pubsub.azure.servicebusqueues",
        ] {
            assert!(r.resolve(t, "v1").is_ok(), "{t}");
        }
        let e = r.resolve("pubsub.kubemq", "v1").err().unwrap();
        assert!(matches!(e, RegistryError::NotSupportedYet { .. }), "{e}");
        assert!(e.to_string().contains("not supported yet"));
        #[cfg(feature = "kafka")]
        assert!(r.resolve("pubsub.kafka", "v1").is_ok());
        #[cfg(not(feature = "snssqs"))]
        {
            let e = r.resolve("pubsub.snssqs", "v1").err().unwrap();
            assert!(
                matches!(
                    e,
                    RegistryError::CompiledOut {
                        feature: "snssqs",
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains("--features snssqs"), "{e}");
        }
        let e = r.resolve("pubsub.hazelcast", "v1").err().unwrap();
        assert!(e.to_string().contains("removed from Dapr in v1.11"), "{e}");
        let e = r.resolve("pubsub.natsstreaming", "v1").err().unwrap();
        assert!(e.to_string().contains("removed from Dapr in v1.13"), "{e}");
        let e = r.resolve("pubsub.nope", "v1").err().unwrap();
        assert!(e.to_string().contains("pubsub.in-memory"), "{e}");
    }

    #[test]
    fn every_dapr_pubsub_type_is_known_by_name() {
        let r = builtin_registry();
        for names in daprd_core::registry::DAPR_PUBSUB_TYPES {
            for name in *names {
                let res = r.resolve(name, "v1");
                assert!(
                    !matches!(res, Err(RegistryError::Unknown { .. })),
                    "{name} should be known"
                );
            }
        }
    }
}
