"""pubsub.pulsar on the broker, seen through Apache Pulsar's own Python client (`pulsar-client`,
a binding of the C++ client) on the repository's Pulsar test broker: the message the sidecar
publishes (the envelope as the payload, `partitionKey` as the key, the other publish metadata
as properties, on persistent://public/default/<topic>), a message published by that client
reaching the app, and a subscription that lives through the broker dropping every
connection."""

import json

import pytest

from conftest import PulsarBroker, eventually, received, require_broker

COMPONENT = """apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: pubsub
spec:
  type: pubsub.pulsar
  version: v1
  metadata:
  - {{name: host, value: "{host}"}}
  - {{name: redeliveryDelay, value: "500ms"}}
"""


@pytest.fixture
def broker():
    require_broker("pulsar")
    b = PulsarBroker()
    yield b
    b.stop()


@pytest.fixture
def client(broker):
    import pulsar

    c = pulsar.Client(broker.url, operation_timeout_seconds=10)
    yield c
    c.close()


def test_bytes_both_ways(sidecar_factory, app_factory, broker, client):
    import pulsar

    topic = "persistent://public/default/orders"
    probe = client.subscribe(topic, "probe", consumer_type=pulsar.ConsumerType.Shared)
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "orders", "route": "/orders"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory([COMPONENT.format(host=broker.url)], app_port=app.port)
    s.wait_ready()
    s.publish("orders", json.dumps({"orderId": 5}), partitionKey="customer-7", region="eu")
    message = probe.receive(timeout_millis=15000)
    probe.acknowledge(message)
    assert message.partition_key() == "customer-7"
    assert message.properties() == {"region": "eu"}
    event = json.loads(message.data())
    assert event["data"] == {"orderId": 5} and event["topic"] == "orders"
    assert event["source"] == "checkout" and event["type"] == "com.dapr.event.sent"
    assert event["pubsubname"] == "pubsub"
    # a message published by Pulsar's client reaches the app (subscription "checkout")
    foreign = {"specversion": "1.0", "id": "p-1", "source": "pulsar", "type": "t",
               "datacontenttype": "application/json", "data": {"from": "pulsar"}}
    producer = client.create_producer(topic)
    producer.send(json.dumps(foreign).encode(), properties={"origin": "pulsar-client"},
                  partition_key="k")

    def both():
        bodies = [json.loads(r["body"]) for r in received(app.port, "/orders")]
        return bodies if len(bodies) == 2 else None
    bodies = eventually(both, 15, "both messages at the app")
    assert {b["id"] for b in bodies} == {event["id"], "p-1"}


def test_a_subscription_outlives_dropped_connections(sidecar_factory, app_factory, broker, client):
    """The broker ends every connection twice while messages flow: each one published by
    Pulsar's client reaches the app."""
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "jobs", "route": "/jobs"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory([COMPONENT.format(host=broker.url)], app_port=app.port)
    s.wait_ready()
    producer = client.create_producer("persistent://public/default/jobs")
    sent = set()
    for i in range(30):
        if i in (10, 20):
            broker.drop_connections()
        for attempt in range(100):
            try:
                producer.send(json.dumps({"specversion": "1.0", "id": f"j-{i}", "source": "t",
                                          "type": "t", "data": {"n": i}}).encode())
                break
            except Exception:  # noqa: BLE001 - the client reconnects; try again
                if attempt == 99:
                    raise
        sent.add(f"j-{i}")

    def all_there():
        ids = {json.loads(r["body"])["id"] for r in received(app.port, "/jobs")}
        return ids if sent <= ids else None
    eventually(all_there, 30, "every message at the app after the dropped connections")
