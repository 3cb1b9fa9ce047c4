"""pubsub.azure.eventhubs on the wire, seen through Microsoft's own Python client
(`azure-eventhub`, its pure-Python AMQP stack) on the repository's test broker (its event
hubs; checkpoints in an Azurite): the event the sidecar publishes (the envelope as the body,
`partitionKey` as the event's partition key) as Azure's consumer reads it,
and events that Azure's producer sends in a batch reaching the app with Event Hubs' metadata.
Azure's client authenticates with the broker's `$cbs`, reads the hub's partitions on
`$management` and addresses the hub by its full URI: the test broker answers it as Event Hubs
does."""

import json
import threading

import pytest

from conftest import (ServiceBusBroker, azurite_connection_string, eventually, received,
                      require_broker)

COMPONENT = """apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: pubsub
spec:
  type: pubsub.azure.eventhubs
  version: v1
  metadata:
  - {{name: connectionString, value: "{cs}"}}
  - {{name: storageConnectionString, value: "{storage}"}}
  - {{name: storageContainerName, value: "{container}"}}
"""


@pytest.fixture
def broker():
    require_broker("azure.eventhubs")
    b = ServiceBusBroker()
    yield b
    b.stop()


def component(broker, container, in_order=False):
    c = COMPONENT.format(cs=broker.url, storage=azurite_connection_string(),
                         container=container)
    if in_order:
        c += '  - {name: enableInOrderMessageDelivery, value: "true"}\n'
    return c


def test_the_sidecars_event_as_azures_consumer_reads_it(sidecar_factory, broker):
    from azure.eventhub import EventHubConsumerClient

    s = sidecar_factory([component(broker, "wire")])
    s.wait_ready()
    # the hub exists once something read it: the consumer below, or a subscription
    got, lock = [], threading.Lock()

    def on_event(partition, event):
        if event is not None:
            with lock:
                got.append((partition.partition_id, event))

    consumer = EventHubConsumerClient.from_connection_string(
        broker.url, consumer_group="$Default", eventhub_name="orders")
    worker = threading.Thread(target=consumer.receive, daemon=True,
                              kwargs={"on_event": on_event, "starting_position": "-1"})
    worker.start()
    try:
        assert consumer.get_partition_ids() == ["0", "1", "2", "3"]
        s.publish("orders", json.dumps({"orderId": 5}), partitionKey="customer-7",
                  region="eu")
        eventually(lambda: got, 30, "the event at Azure's consumer")
    finally:
        consumer.close()
    _, event = got[0]
    # the client hands annotations over as it decoded them (AMQP strings as bytes)
    text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
    assert text(event.partition_key) == "customer-7"
    # Dapr's publish API hands the component no content type (as Go daprd's): the event has
    # none, as Go's component sends it
    assert event.content_type is None
    assert not event.properties, "other publish metadata is not carried (as Go daprd)"
    body = json.loads(event.body_as_str())
    assert body["data"] == {"orderId": 5} and body["topic"] == "orders"
    assert body["source"] == "checkout" and body["pubsubname"] == "pubsub"
    assert event.sequence_number == 0 and event.offset == "0"


def test_a_batch_from_azures_producer_reaches_the_app(sidecar_factory, app_factory, broker):
    from azure.eventhub import EventData, EventHubProducerClient

    subs = json.dumps([{"pubsubname": "pubsub", "topic": "orders", "route": "/orders"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    # one event of a partition at a time: in the order sent
    s = sidecar_factory([component(broker, "batch", in_order=True)], app_port=app.port)
    s.wait_ready()  # the subscription reads every partition from here on
    producer = EventHubProducerClient.from_connection_string(broker.url,
                                                             eventhub_name="orders")
    with producer:
        batch = producer.create_batch(partition_key="k-1")
        for n in range(3):
            event = {"specversion": "1.0", "id": f"eh-{n}", "source": "azure", "type": "t",
                     "datacontenttype": "application/json", "data": {"n": n}}
            e = EventData(json.dumps(event))
            e.properties = {"origin": "azure"}
            batch.add(e)
        producer.send_batch(batch)
    got = eventually(lambda: (r := received(app.port, "/orders")) and len(r) >= 3 and r,
                     30, "three events at the app")
    # one partition key, one partition: in the order sent
    assert [json.loads(r["body"])["data"]["n"] for r in got] == [0, 1, 2]
    headers = {k.lower(): v for k, v in got[0]["headers"].items()}
    # Event Hubs' metadata reaches the app as Go daprd passes it: a header per key
    assert headers["x-opt-partition-key"] == "k-1"
    assert headers["x-opt-sequence-number"] == "0"
    assert headers["x-opt-offset"] == "0"
    assert headers["x-opt-enqueued-time"].endswith("Z")
    assert "origin" not in headers, "application properties only when asked for"
