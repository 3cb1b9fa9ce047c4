//! The shared conformance suite against every component of this build. Broker-backed
//! components use the broker on loopback (`REDIS_HOST`, default `localhost:6379`).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use daprd_core::pubsub::{PubSub, PubSubFactory};
use daprd_testkit::conformance::{self, metadata_with_group, Connect, Traits};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_conformance() {
    // Each instance has its own bus, so the cross-instance "groups" case does not apply;
    // in-memory has no redelivery.
    let connect: Connect = Arc::new(|_group| {
        Box::pin(async {
            Arc::new(daprd_components::in_memory::InMemoryPubSub::new(
                "conformance",
            )) as Arc<dyn PubSub>
        })
    });
    conformance::many_messages_arrive(&connect).await;
    conformance::bulk_publish(&connect).await;
    conformance::outcomes(
        &connect,
        Traits {
            redelivers_on_retry: false,
            competing_consumers: false,
            redelivery_wait: Duration::ZERO,
            ordered: true,
            native_ttl: false,
        },
    )
    .await;
    conformance::ordering(&connect).await;
    conformance::graceful_stop(&connect, false, Duration::ZERO).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_conformance() {
    let host = daprd_testkit::broker_address("REDIS_HOST", "localhost:6379", "Redis");
    let connect: Connect = Arc::new(move |group| {
        let host = host.clone();
        Box::pin(async move {
            let md = metadata_with_group(
                &group,
                &[
                    ("redisHost", &host),
                    ("processingTimeout", "500"),
                    ("redeliverInterval", "200"),
                    ("concurrency", "1"),
                ],
            );
            daprd_components::redis::RedisFactory
                .connect("conformance", &md)
                .await
                .unwrap()
        })
    });
    conformance::run(
        connect,
        Traits {
            redelivers_on_retry: true,
            competing_consumers: true,
            redelivery_wait: Duration::from_secs(5),
            ordered: true,
            native_ttl: false,
        },
    )
    .await;
}

#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_conformance() {
    let uri = daprd_testkit::broker_address(
        "RABBITMQ_URI",
        "amqp://guest:guest@localhost:5672",
        "RabbitMQ",
    );
    let connect: Connect = Arc::new(move |group| {
        let uri = uri.clone();
        Box::pin(async move {
            // requeueInFailure makes RETRY redeliver (Dapr's default discards it). The
            // graceful-stop case needs the queue to outlive its consumer (Dapr's default
            // deletedWhenUnused: true drops it, and its messages, with the last consumer).
            let deleted_when_unused = if group.starts_with("stop-") {
                "false"
            } else {
                "true"
            };
            let md = metadata_with_group(
                &group,
                &[
                    ("connectionString", &uri),
                    ("requeueInFailure", "true"),
                    ("concurrencyMode", "single"),
                    ("prefetchCount", "1"),
                    ("deletedWhenUnused", deleted_when_unused),
                ],
            );
            daprd_components::rabbitmq::RabbitFactory
                .connect("conformance", &md)
                .await
                .unwrap()
        })
    });
    conformance::run(
        connect,
        Traits {
            redelivers_on_retry: true,
            competing_consumers: true,
            redelivery_wait: Duration::from_secs(5),
            ordered: true,
            native_ttl: true,
        },
    )
    .await;
}

#[cfg(feature = "jetstream")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_conformance() {
    let url = daprd_testkit::broker_address("NATS_URL", "nats://localhost:4222", "NATS JetStream");
    // Dapr's component needs the stream to exist: one stream captures every conformance topic.
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "daprd-rs-conformance".into(),
        subjects: vec![format!("{}>", conformance::TOPIC_PREFIX)],
        max_age: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .unwrap();
    let connect: Connect = Arc::new(move |group| {
        let url = url.clone();
        Box::pin(async move {
            // competing consumers need durableName + queueGroupName (consumerID is unused)
            let md = metadata_with_group(
                &group,
                &[
                    ("natsURL", &url),
                    ("durableName", &group),
                    ("queueGroupName", &group),
                    ("deliverPolicy", "new"),
                ],
            );
            daprd_components::jetstream::JetStreamFactory
                .connect("conformance", &md)
                .await
                .unwrap()
        })
    });
    conformance::run(
        connect,
        Traits {
            redelivers_on_retry: true,
            competing_consumers: true,
            redelivery_wait: Duration::from_secs(5),
            ordered: true,
            native_ttl: false,
        },
    )
    .await;
}

#[cfg(feature = "mqtt3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt3_conformance() {
    let url = daprd_testkit::broker_address("MQTT_URL", "tcp://localhost:1883", "Mosquitto (MQTT)");
    let connect: Connect = Arc::new(move |group| {
        let url = url.clone();
        Box::pin(async move {
            let md = metadata_with_group(&group, &[("url", &url), ("qos", "1")]);
            daprd_components::mqtt3::MqttFactory
                .connect("conformance", &md)
                .await
                .unwrap()
        })
    });
    // MQTT: consumerID is the client id (no consumer groups; the same id twice kicks the
    // first client off). The broker redelivers an unacked message only on reconnect, so the
    // component hands a RETRY message to the handler again itself.
    let traits = Traits {
        redelivers_on_retry: true,
        competing_consumers: false,
        redelivery_wait: Duration::from_secs(1),
        ordered: true,
        native_ttl: false,
    };
    conformance::many_messages_arrive(&connect).await;
    conformance::bulk_publish(&connect).await;
    conformance::outcomes(&connect, traits).await;
    conformance::ordering(&connect).await;
    // A persistent session (cleanSession false): the next client with the same id gets what
    // the stopped one had not acknowledged.
    conformance::graceful_stop(&connect, true, Duration::from_secs(1)).await;
}

/// Kafka metadata for the conformance cases: a fresh group reads each new topic from the
/// start (a group joins after the first publishes), RETRY is retried in place after 200 ms.
#[cfg(feature = "kafka")]
pub fn kafka_metadata(group: &str) -> daprd_core::metadata::Metadata {
    let brokers = daprd_testkit::broker_address("KAFKA_BROKERS", "127.0.0.1:9092", "tansu (Kafka)");
    metadata_with_group(
        group,
        &[
            ("brokers", &brokers),
            ("authType", "none"),
            ("initialOffset", "oldest"),
            ("backOffDuration", "200ms"),
            // tansu creates no topic on demand (as Kafka with auto.create.topics.enable off)
            ("autoCreateTopics", "true"),
            ("autoCreateTopicPartitions", "3"),
        ],
    )
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_conformance() {
    fn connect_with(partitions: &'static str) -> Connect {
        Arc::new(move |group| {
            Box::pin(async move {
                let mut md = kafka_metadata(&group);
                md.insert("autoCreateTopicPartitions", partitions);
                daprd_components::kafka::KafkaFactory
                    .connect("conformance", &md)
                    .await
                    .unwrap()
            })
        })
    }
    // Three partitions: two group members split them. Kafka orders per partition only, so
    // the topic-wide ordering case runs on a one-partition topic (per-key order on several
    // partitions is in tests/kafka_broker.rs).
    conformance::run(
        connect_with("3"),
        Traits {
            redelivers_on_retry: true,
            competing_consumers: true,
            redelivery_wait: Duration::from_secs(1),
            ordered: false,
            native_ttl: false,
        },
    )
    .await;
    conformance::ordering(&connect_with("1")).await;
}

/// SNS/SQS metadata for the conformance cases against a local server (`SNSSQS_ENDPOINT`,
/// default moto on `http://127.0.0.1:4566`): RETRY comes back after a 1 s visibility timeout.
/// Standard (non-FIFO) SNS/SQS promises no order, so the ordering case is not run.
#[cfg(feature = "snssqs")]
pub fn snssqs_metadata(group: &str) -> daprd_core::metadata::Metadata {
    let endpoint =
        daprd_testkit::broker_address("SNSSQS_ENDPOINT", "http://127.0.0.1:4566", "moto (SNS/SQS)");
    metadata_with_group(
        group,
        &[
            ("endpoint", &endpoint),
            ("region", "us-east-1"),
            ("accessKey", "test"),
            ("secretKey", "test"),
            ("messageVisibilityTimeout", "1"),
            ("concurrencyMode", "single"),
        ],
    )
}

#[cfg(feature = "snssqs")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snssqs_conformance() {
    let connect: Connect = Arc::new(move |group| {
        Box::pin(async move {
            daprd_components::snssqs::SnsSqsFactory
                .connect("conformance", &snssqs_metadata(&group))
                .await
                .unwrap()
        })
    });
    // A batch of messages waiting for their turn in one consumer (one at a time, 600 ms each,
    // visibility 1 s) must not reach the other consumer of the queue as well.
    conformance::slow_competing_consumers(
        &connect,
        Duration::from_millis(600),
        Duration::from_secs(5),
    )
    .await;
    conformance::run(
        connect,
        Traits {
            redelivers_on_retry: true,
            competing_consumers: true,
            redelivery_wait: Duration::from_secs(3),
            ordered: false,
            native_ttl: false,
        },
    )
    .await;
}

/// `pubsub.gcp.pubsub` against Google's Pub/Sub emulator (`PUBSUB_EMULATOR_HOST`, default
/// `127.0.0.1:8085`); a fresh project per run keeps runs apart. A nack redelivers at once.
#[cfg(feature = "gcp")]
pub fn gcp_metadata(
    project: &str,
    group: &str,
    extra: &[(&str, &str)],
) -> daprd_core::metadata::Metadata {
    let endpoint = daprd_testkit::broker_address(
        "PUBSUB_EMULATOR_HOST",
        "127.0.0.1:8085",
        "the Pub/Sub emulator",
    );
    let mut md = metadata_with_group(
        group,
        &[
            ("endpoint", &endpoint),
            ("projectId", project),
            ("ackDeadline", "10s"),
        ],
    );
    for (k, v) in extra {
        md.insert(*k, *v);
    }
    md
}

#[cfg(feature = "gcp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_conformance() {
    let project = conformance::random_name("project");
    let connect_with = |extra: &'static [(&'static str, &'static str)]| -> Connect {
        let project = project.clone();
        Arc::new(move |group| {
            let project = project.clone();
            Box::pin(async move {
                daprd_components::gcp::GcpPubSubFactory
                    .connect("conformance", &gcp_metadata(&project, &group, extra))
                    .await
                    .unwrap()
            })
        })
    };
    // One ordering key for every publish: its messages arrive, and are handled, in order.
    conformance::ordering(&connect_with(&[
        ("enableMessageOrdering", "true"),
        ("orderingKey", "conformance"),
    ]))
    .await;
    let connect = connect_with(&[]);
    conformance::run(
        connect,
        Traits {
            redelivers_on_retry: true,
            competing_consumers: true,
            redelivery_wait: Duration::from_secs(5),
            ordered: false,
            native_ttl: false,
        },
    )
    .await;
}

/// `pubsub.pulsar` against the test broker of `daprd_testkit::pulsar` (Pulsar's binary
/// protocol; no Apache Pulsar server can be installed here), one broker per run, in process.
/// A refused message comes back after `redeliveryDelay`.
#[cfg(feature = "pulsar")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulsar_conformance() {
    let broker = Arc::new(daprd_testkit::pulsar::TestBroker::start(0).await.unwrap());
    let connect_with = |extra: &'static [(&'static str, &'static str)]| -> Connect {
        let url = broker.url();
        Arc::new(move |group| {
            let url = url.clone();
            Box::pin(async move {
                let mut md =
                    metadata_with_group(&group, &[("host", &url), ("redeliveryDelay", "200ms")]);
                for (k, v) in extra {
                    md.insert(*k, *v);
                }
                daprd_components::pulsar::PulsarFactory
                    .connect("conformance", &md)
                    .await
                    .unwrap()
            })
        })
    };
    // One message at a time on an exclusive subscription: in publish order.
    conformance::ordering(&connect_with(&[
        ("processMode", "sync"),
        ("subscribeType", "exclusive"),
        ("disableBatching", "true"),
    ]))
    .await;
    // The producer's batching off, as `many_messages_arrive` publishes one at a time and
    // a batch waits `batchingMaxPublishDelay` for company; the batches case is below.
    conformance::run(
        connect_with(&[("disableBatching", "true")]),
        Traits {
            redelivers_on_retry: true,
            competing_consumers: true,
            redelivery_wait: Duration::from_secs(5),
            ordered: false,
            native_ttl: false,
        },
    )
    .await;
}

/// `pubsub.azure.servicebus.topics` and `.queues` against the test broker of
/// `daprd_testkit::servicebus` (AMQP 1.0 with Service Bus's addressing, CBS and peek-lock; no
/// Service Bus emulator can run here), one broker per run, in process. Locks last 2 s there,
/// so a message whose link went away is available again soon. A queue is shared by every
/// consumer whatever its `consumerID`, so the groups case is for topics only.
#[cfg(feature = "servicebus")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servicebus_conformance() {
    use daprd_components::servicebus::ServiceBusFactory;
    let broker = Arc::new(
        daprd_testkit::servicebus::TestBroker::start(0)
            .await
            .unwrap(),
    );
    broker.configure(Duration::from_secs(2), 100);
    let connect_with =
        |factory: ServiceBusFactory, extra: &'static [(&'static str, &'static str)]| -> Connect {
            let factory = Arc::new(factory);
            let cs = broker.connection_string();
            Arc::new(move |group| {
                let (cs, factory) = (cs.clone(), factory.clone());
                Box::pin(async move {
                    let mut md = metadata_with_group(
                        &group,
                        &[("connectionString", &cs), ("lockRenewalInSec", "1")],
                    );
                    for (k, v) in extra {
                        md.insert(*k, *v);
                    }
                    factory.connect("conformance", &md).await.unwrap()
                })
            })
        };
    let traits = Traits {
        redelivers_on_retry: true,
        competing_consumers: true,
        redelivery_wait: Duration::from_secs(5),
        ordered: false,
        native_ttl: false,
    };
    conformance::run(connect_with(ServiceBusFactory::TOPICS, &[]), traits).await;
    // one message at a time: in publish order; and no read-ahead, for the TTL case
    let one = connect_with(ServiceBusFactory::TOPICS, &[("maxActiveMessages", "1")]);
    conformance::ordering(&one).await;
    conformance::ttl(&one).await;
    let queues = connect_with(ServiceBusFactory::QUEUES, &[]);
    conformance::many_messages_arrive(&queues).await;
    conformance::bulk_publish(&queues).await;
    conformance::outcomes(&queues, traits).await;
    conformance::graceful_stop(&queues, true, traits.redelivery_wait).await;
    conformance::ttl(&connect_with(
        ServiceBusFactory::QUEUES,
        &[("maxActiveMessages", "1")],
    ))
    .await;
}
