"""pubsub.gcp.pubsub on the broker, seen through Google's own Python client
(`google-cloud-pubsub`) on the same Pub/Sub emulator: the entities the component creates, the
bytes it publishes (the envelope as the data, no attributes, the ordering key), and messages
published by that client reaching the app."""

import json
import uuid

import pytest
import requests

from conftest import PUBSUB_EMULATOR, eventually, received, require_broker

COMPONENT = """apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: pubsub
spec:
  type: pubsub.gcp.pubsub
  version: v1
  metadata:
  - {{name: projectId, value: "{project}"}}
  - {{name: endpoint, value: "{endpoint}"}}
"""


def component(project, **extra):
    items = "".join(f'  - {{name: {k}, value: "{v}"}}\n' for k, v in extra.items())
    return COMPONENT.format(project=project, endpoint=PUBSUB_EMULATOR) + items


@pytest.fixture
def gcp():
    """Google's clients on the emulator, and a project of this test's own."""
    require_broker("gcp.pubsub")
    import grpc
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    # plaintext channels to the emulator, given explicitly: PUBSUB_EMULATOR_HOST set in this
    # process would be inherited by every sidecar the later tests start
    publisher = pubsub_v1.PublisherClient(
        transport=PublisherGrpcTransport(channel=grpc.insecure_channel(PUBSUB_EMULATOR)))
    subscriber = pubsub_v1.SubscriberClient(
        transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(PUBSUB_EMULATOR)))
    return publisher, subscriber, "bytes-" + uuid.uuid4().hex[:10]


def pull_one(subscriber, subscription):
    """One message of `subscription` (acknowledged), waiting up to 15 s."""
    def pulled():
        r = subscriber.pull(subscription=subscription, max_messages=1, timeout=2)
        return r.received_messages or None
    got = eventually(pulled, 15, f"a message on {subscription}")[0]
    subscriber.acknowledge(subscription=subscription, ack_ids=[got.ack_id])
    return got.message


def test_entities_and_bytes(sidecar_factory, app_factory, gcp):
    publisher, subscriber, project = gcp
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "orders", "route": "/orders"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory([component(project)], app_port=app.port)
    s.wait_ready()
    # the topic and the <consumerID>-<topic> subscription (consumerID = app id)
    topic = publisher.topic_path(project, "orders")
    assert [t.name for t in publisher.list_topics(project=f"projects/{project}")] == [topic]
    sub = subscriber.get_subscription(subscription=subscriber.subscription_path(project, "checkout-orders"))
    assert sub.topic == topic and sub.ack_deadline_seconds == 20
    assert not sub.enable_message_ordering and not sub.dead_letter_policy.dead_letter_topic
    # an independent subscription on the topic sees the bytes the sidecar publishes
    probe = subscriber.subscription_path(project, "probe")
    subscriber.create_subscription(name=probe, topic=topic)
    s.publish("orders", json.dumps({"orderId": 5}))
    message = pull_one(subscriber, probe)
    assert dict(message.attributes) == {} and message.ordering_key == ""
    event = json.loads(message.data)
    assert event["data"] == {"orderId": 5} and event["topic"] == "orders"
    assert event["source"] == "checkout" and event["type"] == "com.dapr.event.sent"
    assert event["pubsubname"] == "pubsub"
    # a message published by Google's client reaches the app
    foreign = {"specversion": "1.0", "id": "g-1", "source": "google", "type": "t",
               "datacontenttype": "application/json", "data": {"from": "google"}}
    publisher.publish(topic, json.dumps(foreign).encode()).result(timeout=10)
    def both():
        bodies = [json.loads(r["body"]) for r in received(app.port, "/orders")]
        return bodies if len(bodies) == 2 else None
    bodies = eventually(both, 15, "both messages at the app")
    assert {b["id"] for b in bodies} == {event["id"], "g-1"}


def test_ordering_key_and_dead_letter_policy(sidecar_factory, app_factory, gcp):
    publisher, subscriber, project = gcp
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "jobs", "route": "/jobs"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory([component(project, enableMessageOrdering="true", orderingKey="fallback",
                                   deadLetterTopic="jobs-dlq", maxDeliveryAttempts="7",
                                   ackDeadline="30s")], app_port=app.port)
    s.wait_ready()
    sub = subscriber.get_subscription(subscription=subscriber.subscription_path(project, "checkout-jobs"))
    assert sub.enable_message_ordering and sub.ack_deadline_seconds == 30
    assert sub.dead_letter_policy.dead_letter_topic == publisher.topic_path(project, "jobs-dlq")
    assert sub.dead_letter_policy.max_delivery_attempts == 7
    probe = subscriber.subscription_path(project, "probe")
    subscriber.create_subscription(name=probe, topic=publisher.topic_path(project, "jobs"))
    s.publish("jobs", json.dumps({"n": 1}), orderingKey="customer-7")
    assert pull_one(subscriber, probe).ordering_key == "customer-7"
    s.publish("jobs", json.dumps({"n": 2}))
    assert pull_one(subscriber, probe).ordering_key == "fallback"
    eventually(lambda: len(received(app.port, "/jobs")) == 2, 15, "both at the app")


def test_disabled_entity_management_creates_nothing(sidecar_factory, gcp):
    publisher, _, project = gcp
    s = sidecar_factory([component(project, disableEntityManagement="true")])
    s.wait_ready()
    r = requests.post(f"{s.http}/v1.0/publish/pubsub/missing", json={"n": 1})
    assert r.status_code == 500 and r.json()["errorCode"] == "ERR_PUBSUB_PUBLISH_MESSAGE", r.text
    assert "NotFound" in r.json()["message"], r.text
    assert list(publisher.list_topics(project=f"projects/{project}")) == []
    publisher.create_topic(name=publisher.topic_path(project, "present"))
    s.publish("present", json.dumps({"n": 1}))
