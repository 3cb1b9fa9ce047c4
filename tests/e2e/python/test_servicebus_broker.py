"""pubsub.azure.servicebus.queues and .topics on the wire, seen through Microsoft's own Python
client (`azure-servicebus`, its pure-Python AMQP stack) on the repository's Service Bus test
broker: the message the sidecar publishes (the envelope as the body, `MessageId`, `Label` and
`PartitionKey` as the message's own fields, the other publish metadata as application
properties), and a message sent by that client reaching the app with Service Bus's metadata.
Azure's client authenticates with the broker's `$cbs` and addresses entities by their full
URI: the test broker answers it as Service Bus does. (Its peek-lock receiver wants the lock
token as the delivery tag, which the broker's AMQP library cannot set: it receives in
receive-and-delete mode.)"""

import json

import pytest

from conftest import ServiceBusBroker, eventually, received, require_broker

COMPONENT = """apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: pubsub
spec:
  type: pubsub.azure.servicebus.{kind}
  version: v1
  metadata:
  - {{name: connectionString, value: "{cs}"}}
"""


@pytest.fixture
def broker():
    require_broker("azure.servicebus.queues")
    b = ServiceBusBroker()
    yield b
    b.stop()


@pytest.fixture
def client(broker):
    from azure.servicebus import ServiceBusClient

    with ServiceBusClient.from_connection_string(broker.url) as c:
        yield c


def test_the_sidecars_message_as_azures_client_reads_it(sidecar_factory, broker, client):
    from azure.servicebus import ServiceBusReceiveMode

    s = sidecar_factory([COMPONENT.format(kind="queues", cs=broker.url)])
    s.wait_ready()
    s.publish("orders", json.dumps({"orderId": 5}), MessageId="m-5", Label="created",
              PartitionKey="customer-7", region="eu")
    with client.get_queue_receiver("orders", max_wait_time=15,
                                   receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as r:
        messages = r.receive_messages(max_message_count=1, max_wait_time=15)
    assert len(messages) == 1
    m = messages[0]
    assert m.message_id == "m-5" and m.subject == "created"
    assert m.partition_key == "customer-7"
    props = {k.decode(): v.decode() for k, v in m.application_properties.items()}
    assert props["region"] == "eu"
    assert "MessageId" not in props and "Label" not in props
    event = json.loads(b"".join(m.body))
    assert event["data"] == {"orderId": 5} and event["topic"] == "orders"
    assert event["source"] == "checkout" and event["pubsubname"] == "pubsub"


def test_a_message_from_azures_client_reaches_the_app(sidecar_factory, app_factory, broker,
                                                      client):
    from azure.servicebus import ServiceBusMessage

    subs = json.dumps([{"pubsubname": "pubsub", "topic": "orders", "route": "/orders"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory([COMPONENT.format(kind="topics", cs=broker.url)], app_port=app.port)
    s.wait_ready()  # the subscription "checkout" of topic "orders" exists from here on
    foreign = {"specversion": "1.0", "id": "sb-1", "source": "azure", "type": "t",
               "datacontenttype": "application/json", "data": {"from": "azure"}}
    with client.get_topic_sender("orders") as sender:
        sender.send_messages(ServiceBusMessage(json.dumps(foreign), message_id="sb-1",
                                               application_properties={"origin": "azure"}))
    got = eventually(lambda: received(app.port, "/orders"), 15, "the message at the app")
    body = json.loads(got[0]["body"])
    assert body["id"] == "sb-1" and body["data"] == {"from": "azure"}
    # Service Bus's metadata reaches the app as Go daprd passes it: metadata.<key> headers
    headers = {k.lower(): v for k, v in got[0]["headers"].items()}
    assert headers["metadata.messageid"] == "sb-1"
    assert headers["metadata.origin"] == "azure"
    assert headers["metadata.deliverycount"] == "1"
    assert headers["metadata.enqueuedtimeutc"].endswith(" GMT")


def test_sessions_from_azures_client_reach_the_app_in_order(sidecar_factory, app_factory,
                                                            broker, client):
    """A subscription with `requireSessions` (its metadata in the app's subscription, as Dapr
    passes it): the sidecar creates the subscription requiring sessions, and the messages that
    Azure's client sends with a session id reach the app in order within each session, with
    `metadata.SessionId`."""
    from azure.servicebus import ServiceBusMessage

    subs = json.dumps([{"pubsubname": "pubsub", "topic": "orders", "route": "/orders",
                        "metadata": {"requireSessions": "true", "maxConcurrentSessions": "2",
                                     "sessionIdleTimeoutInSec": "1"}}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory([COMPONENT.format(kind="topics", cs=broker.url)], app_port=app.port)
    s.wait_ready()
    with client.get_topic_sender("orders") as sender:
        for n in range(4):
            for session in ("s1", "s2", "s3"):
                event = {"specversion": "1.0", "id": f"{session}-{n}", "source": "azure",
                         "type": "t", "datacontenttype": "application/json",
                         "data": {"session": session, "n": n}}
                sender.send_messages(ServiceBusMessage(json.dumps(event), session_id=session))
    got = eventually(lambda: (r := received(app.port, "/orders")) and len(r) >= 12 and r,
                     30, "twelve messages at the app")
    by_session = {}
    for r in got:
        data = json.loads(r["body"])["data"]
        headers = {k.lower(): v for k, v in r["headers"].items()}
        assert headers["metadata.sessionid"] == data["session"]
        by_session.setdefault(data["session"], []).append(data["n"])
    assert by_session == {"s1": [0, 1, 2, 3], "s2": [0, 1, 2, 3], "s3": [0, 1, 2, 3]}
