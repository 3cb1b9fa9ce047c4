"""The core SDK end-to-end scenarios against every built-in broker component (the matrix of
issue 4): a plain HTTP app gets the exact CloudEvent and DROP goes to the dead-letter topic,
the Python SDK publishes over gRPC to a `dapr.ext.grpc.App`, and a streaming subscription
receives. Topics are unique per test so runs on a shared broker do not see each other."""

import asyncio
import json
import os
import subprocess
import sys
import uuid

import pytest
import requests

from conftest import eventually, received

BROKERS = ["in-memory", "redis", "rabbitmq", "mqtt3", "jetstream"]


def component(kind):
    meta = {
        "in-memory": [],
        "redis": [("redisHost", "localhost:6379")],
        "rabbitmq": [("connectionString", "amqp://guest:guest@localhost:5672")],
        # the MQTT client id must be unique per sidecar
        "mqtt3": [("url", "tcp://localhost:1883"), ("consumerID", "{uuid}")],
        "jetstream": [("natsURL", "nats://localhost:4222")],
    }[kind]
    items = "[" + ", ".join(f'{{name: {k}, value: "{v}"}}' for k, v in meta) + "]"
    return (f"apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: pubsub\n"
            f"spec:\n  type: pubsub.{kind}\n  version: v1\n  metadata: {items}\n")


class Topics:
    def __init__(self, kind):
        self.kind = kind
        self.tag = uuid.uuid4().hex[:12]
        self.streams = []

    def name(self, base):
        return f"{base}-{self.tag}"

    def prepare(self, *groups):
        """JetStream needs streams holding the subjects (as in Dapr). A dead-letter subject
        gets its own stream: a republish keeps the CloudEvent id, hence the Nats-Msg-Id,
        and JetStream would drop it as a duplicate within one stream (so does Go daprd)."""
        if self.kind != "jetstream":
            return
        import nats

        async def create():
            nc = await nats.connect("nats://localhost:4222")
            js = nc.jetstream()
            for i, names in enumerate(groups):
                name = f"e2e-{self.tag}-{i}"
                await js.add_stream(name=name, subjects=list(names), max_age=600)
                self.streams.append(name)
            await nc.close()
        asyncio.run(create())

    def cleanup(self):
        if self.streams:
            import nats

            async def delete():
                nc = await nats.connect("nats://localhost:4222")
                for name in self.streams:
                    await nc.jetstream().delete_stream(name)
                await nc.close()
            asyncio.run(delete())


@pytest.fixture(params=BROKERS)
def broker(request):
    t = Topics(request.param)
    yield t
    t.cleanup()


def test_http_app_exact_cloudevent_and_dead_letter(broker, sidecar_factory, app_factory):
    orders, dead, dlq = broker.name("orders"), broker.name("dead"), broker.name("dlq")
    broker.prepare([orders, dead], [dlq])
    subs = json.dumps([
        {"pubsubname": "pubsub", "topic": orders, "route": "/orders"},
        {"pubsubname": "pubsub", "topic": dead, "route": "/dead", "deadLetterTopic": dlq},
        {"pubsubname": "pubsub", "topic": dlq, "route": "/dlq"},
    ])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/dead": {"body": '{"status":"DROP"}'}}).raise_for_status()
    s = sidecar_factory([component(broker.kind)], app_port=app.port)
    s.wait_ready()
    s.publish(orders, json.dumps({"orderId": 1}))
    s.publish(dead, json.dumps({"poison": True}))
    got = eventually(lambda: received(app.port, "/orders"), 15, f"{broker.kind}: delivery")
    ce = json.loads(got[0]["body"])
    assert ce["data"] == {"orderId": 1} and ce["topic"] == orders and ce["pubsubname"] == "pubsub"
    assert ce["source"] == "checkout" and ce["type"] == "com.dapr.event.sent"
    assert got[0]["headers"]["Content-Type"] == "application/cloudevents+json"
    dl = eventually(lambda: received(app.port, "/dlq"), 15, f"{broker.kind}: dead letter")
    assert json.loads(dl[0]["body"])["data"] == {"poison": True}


def test_sdk_grpc_publish_to_grpc_app(broker, sidecar_factory, app_factory):
    # grpc_app.py subscribes to the fixed topic "orders"; isolate it with a fresh consumer
    if broker.kind == "jetstream":
        broker.prepare(["orders", "flaky", "bad", "routed"], ["dlq.all"])
    app = app_factory("grpc_app.py")
    s = sidecar_factory([component(broker.kind)], app_port=app.port, app_protocol="grpc",
                        app_id=f"grpc-{broker.tag}")
    s.wait_ready()
    marker = broker.tag
    env = dict(os.environ)
    env.update(s.sdk_env())
    code = f"""
from dapr.clients import DaprClient
with DaprClient() as c:
    c.publish_event(pubsub_name='pubsub', topic_name='orders', data='{{"marker": "{marker}"}}', data_content_type='application/json')
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    def mine():
        for line in app.lines():
            data = line["data"]
            if isinstance(data, str):
                try:
                    data = json.loads(data)
                except ValueError:
                    continue
            if line["route"] == "orders" and isinstance(data, dict) and data.get("marker") == marker:
                return line
        return None
    line = eventually(mine, 15, f"{broker.kind}: gRPC app delivery")
    assert line["source"] == f"grpc-{broker.tag}"


def test_streaming_subscription(broker, sidecar_factory):
    topic = broker.name("live")
    broker.prepare([topic])
    s = sidecar_factory([component(broker.kind)])
    env = dict(os.environ)
    env.update(s.sdk_env())
    code = f"""
import json
from dapr.clients import DaprClient
with DaprClient() as c:
    sub = c.subscribe(pubsub_name='pubsub', topic='{topic}')
    print('subscribed', flush=True)
    while True:
        msg = sub.next_message()
        if msg is None:
            continue
        print(json.dumps(msg.data()), flush=True)
        sub.respond_success(msg)
        break
    sub.close()
"""
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "subscribed"
    eventually(lambda: any(x["topic"] == topic for x in requests.get(s.http + "/v1.0/metadata").json().get("subscriptions", [])),
               10, "the stream to subscribe")
    s.publish(topic, json.dumps({"streamed": broker.kind}))
    out, err = proc.communicate(timeout=30)
    assert json.loads(out.splitlines()[0]) == {"streamed": broker.kind}, err


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_consumer_groups_across_sidecars(kind, sidecar_factory, app_factory):
    """Two sidecars with the same app id share the consumer group (split the messages);
    a sidecar with another app id gets every message."""
    topic = f"groups-{uuid.uuid4().hex[:12]}"
    subs = json.dumps([{"pubsubname": "pubsub", "topic": topic, "route": "/g"}])
    apps = [app_factory("http_app.py", env={"SUBSCRIPTIONS": subs}) for _ in range(3)]
    cars = [sidecar_factory([component(kind)], app_port=apps[0].port, app_id="shared"),
            sidecar_factory([component(kind)], app_port=apps[1].port, app_id="shared"),
            sidecar_factory([component(kind)], app_port=apps[2].port, app_id="other")]
    for c in cars:
        c.wait_ready()
    n = 40
    for i in range(n):
        cars[0].publish(topic, json.dumps({"i": i}))
    def ids(app):
        return [json.loads(r["body"])["data"]["i"] for r in received(app.port, "/g")]
    eventually(lambda: len(ids(apps[2])) == n, 20, "the other app id to get every message")
    eventually(lambda: len(ids(apps[0])) + len(ids(apps[1])) == n, 20, "the shared group to get every message once")
    shared = ids(apps[0]) + ids(apps[1])
    assert sorted(shared) == list(range(n)), "each message once across the two replicas"
    assert ids(apps[0]) and ids(apps[1]), f"both replicas took a share ({len(ids(apps[0]))}/{len(ids(apps[1]))})"


def test_bulk_publish_reaches_the_app(broker, sidecar_factory, app_factory):
    topic = broker.name("bulk")
    broker.prepare([topic])
    subs = json.dumps([{"pubsubname": "pubsub", "topic": topic, "route": "/bulk"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory([component(broker.kind)], app_port=app.port)
    s.wait_ready()
    entries = [{"entryId": str(i), "event": {"i": i}, "contentType": "application/json"} for i in range(10)]
    r = requests.post(f"{s.http}/v1.0/publish/bulk/pubsub/{topic}", json=entries)
    assert r.status_code == 204, r.text
    got = eventually(lambda: len(received(app.port, "/bulk")) == 10 and received(app.port, "/bulk"), 15,
                     f"{broker.kind}: 10 bulk-published events")
    assert sorted(json.loads(x["body"])["data"]["i"] for x in got) == list(range(10))


def test_bulk_subscribe_flushes_on_count_with_a_concurrent_component(sidecar_factory, app_factory):
    """Redis hands messages to daprd from 10 workers at once, so the default bulk subscriber
    fills batches: none exceeds maxMessagesCount, and batches of several entries occur."""
    topic = f"bulksub-{uuid.uuid4().hex[:12]}"
    subs = json.dumps([{"pubsubname": "pubsub", "topic": topic, "route": "/bulk",
                        "bulkSubscribe": {"enabled": True, "maxMessagesCount": 5, "maxAwaitDurationMs": 1000}}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/bulk": {"bulk": True}}).raise_for_status()
    s = sidecar_factory([component("redis")], app_port=app.port)
    s.wait_ready()
    entries = [{"entryId": str(i), "event": {"i": i}, "contentType": "application/json"} for i in range(40)]
    assert requests.post(f"{s.http}/v1.0/publish/bulk/pubsub/{topic}", json=entries).status_code == 204
    def batches():
        got = [json.loads(r["body"])["entries"] for r in received(app.port, "/bulk")]
        return got if sum(len(b) for b in got) == 40 else None
    got = eventually(batches, 20, "40 entries in bulk deliveries")
    sizes = [len(b) for b in got]
    assert max(sizes) <= 5, sizes
    assert max(sizes) > 1, f"no batch held more than one entry: {sizes}"
    assert sorted(e["event"]["data"]["i"] for b in got for e in b) == list(range(40))
