"""Hot reload: component and subscription files change while the sidecar runs and traffic
flows. Every message published with a 2xx is delivered exactly once, no publish fails because
of a reload, a broken file keeps the old instance serving, a removed component answers
"pubsub not found" and comes back clean, and a Configuration can turn it off. Against the real
brokers on loopback (Redis, RabbitMQ) and the in-memory component."""

import base64
import json
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from conftest import REDIS_DB, eventually
from test_configuration import config_file

RELOADS = 20


def component(kind, value, name="pubsub"):
    """A component of `kind` whose metadata differs by `value` in a harmless setting."""
    md = {
        "in-memory": {"note": f"v{value}"},
        "redis": {"redisHost": "localhost:6379", "redisDB": REDIS_DB, "concurrency": str(10 + value % 2)},
        "rabbitmq": {"connectionString": "amqp://guest:guest@localhost:5672",
                     "consumerID": "reload-" + TAG, "prefetchCount": str(value % 2)},
    }[kind]
    items = ", ".join(f'{{name: {k}, value: "{v}"}}' for k, v in md.items())
    return (f"apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {{name: {name}}}\n"
            f"spec:\n  type: pubsub.{kind}\n  version: v1\n  metadata: [{items}]\n")


TAG = uuid.uuid4().hex[:8]


def subscription(route, topic="orders", pubsub="pubsub"):
    return (f"apiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {{name: sub-{topic}}}\n"
            f"spec:\n  pubsubname: {pubsub}\n  topic: {topic}\n  routes:\n    default: {route}\n")


def save(path: Path, text: str, rename: bool):
    """Writes `text` to `path` as an editor does: to a temporary file renamed over it, or by
    truncating and writing in place."""
    if rename:
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    else:
        with open(path, "w") as f:
            f.write(text)


def count(sidecar, line):
    return sidecar.output().count(line)


class Publisher:
    """Publishes {"n": i} to `topic` at a steady rate until stopped; keeps what got a 2xx and
    what did not."""

    def __init__(self, sidecar, topic="orders"):
        self.url = f"{sidecar.http}/v1.0/publish/pubsub/{topic}"
        self.ok, self.failed = [], []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        n = 0
        with requests.Session() as s:
            while not self.stopped.wait(0.01):
                r = s.post(self.url, json={"n": n}, timeout=10)
                (self.ok if r.status_code // 100 == 2 else self.failed).append((n, r.status_code, r.text))
                n += 1

    def stop(self):
        self.stopped.set()
        self.thread.join(timeout=20)


def received_numbers(app):
    got = requests.get(f"http://127.0.0.1:{app.port}/_received").json()
    return [json.loads(r["body"])["data"]["n"] for r in got if r["path"].startswith("/orders")]


def start(sidecar_factory, app_factory, resources, extra_args=()):
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": "[]"})
    s = sidecar_factory(resources, app_id="reload", app_port=app.port, extra_args=list(extra_args))
    s.wait_ready()
    return s, app


@pytest.mark.parametrize("kind", ["in-memory", "redis", "rabbitmq"])
def test_traffic_through_reloads_loses_and_duplicates_nothing(sidecar_factory, app_factory, kind):
    if kind == "redis":
        subprocess.run(["redis-cli", "-n", REDIS_DB, "DEL", "orders"], check=True, capture_output=True)
    s, app = start(sidecar_factory, app_factory, [component(kind, 0), subscription("/orders-0")])
    comp, sub = Path(s.dir.name, "c0.yaml"), Path(s.dir.name, "c1.yaml")
    pub = Publisher(s)
    try:
        eventually(lambda: len(received_numbers(app)) >= 5, 20, "first deliveries")
        for i in range(1, RELOADS + 1):
            save(comp, component(kind, i), rename=i % 2 == 0)
            eventually(lambda: count(s, "hot reload: component updated") == i, 20,
                       f"component reload {i}: " + s.output()[-2000:])
        for i in range(1, RELOADS + 1):
            save(sub, subscription(f"/orders-{i % 2}"), rename=i % 2 == 1)
            eventually(lambda: count(s, "hot reload: subscription updated in place") == i, 20,
                       f"subscription reload {i}")
        # the new route is in use
        before = len(received_numbers(app))
        eventually(lambda: len(received_numbers(app)) > before + 3, 20, "deliveries after the reloads")
    finally:
        pub.stop()
    assert pub.failed == [], pub.failed[:5]
    sent = sorted(n for n, _, _ in pub.ok)
    assert len(sent) > 100, "traffic flowed during the reloads"
    try:
        eventually(lambda: set(received_numbers(app)) >= set(sent), 30, "every accepted message delivered")
    except AssertionError:
        missing = sorted(set(sent) - set(received_numbers(app)))
        warnings = [line for line in s.output().splitlines()
                    if "WARN" in line or "ERROR" in line or "retry" in line.lower() or "queued" in line]
        raise AssertionError(f"{len(missing)} of {len(sent)} never delivered: {missing[:20]}; "
                             f"warnings: {warnings[:20]}") from None
    got = received_numbers(app)
    dups = sorted(n for n in set(got) if got.count(n) > 1)
    assert dups == [], f"delivered twice: {dups[:10]}"
    # one save, one reload: no reload for the truncate alone, none twice
    assert count(s, "hot reload: component updated") == RELOADS
    assert count(s, "hot reload: subscription updated in place") == RELOADS
    paths = {r["path"] for r in requests.get(f"http://127.0.0.1:{app.port}/_received").json()}
    assert paths == {"/orders-0", "/orders-1"}


def publish_ok(s, n):
    r = requests.post(f"{s.http}/v1.0/publish/pubsub/orders", json={"n": n}, timeout=10)
    return r.status_code == 204


def test_a_broken_file_keeps_the_old_instance_and_a_fix_applies(sidecar_factory, app_factory):
    s, app = start(sidecar_factory, app_factory, [component("redis", 0), subscription("/orders")])
    comp = Path(s.dir.name, "c0.yaml")
    broken = [
        ("bad yaml", "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: pubsub\n  spec: [\n",
         "what the file held before is kept"),
        ("unknown type", component("redis", 0).replace("pubsub.redis", "pubsub.nosuch"),
         "spec.type"),
        ("missing metadata", component("redis", 0).replace('{name: redisHost, value: "localhost:6379"}, ', ""),
         "redisHost"),
        ("unreachable broker", component("redis", 0).replace("localhost:6379", "127.0.0.1:1"),
         "init failed"),
    ]
    n = 0
    for what, text, message in broken:
        errors = count(s, "the component is kept as it was") + count(s, "what the file held before is kept")
        save(comp, text, rename=True)
        eventually(lambda: count(s, "the component is kept as it was")
                   + count(s, "what the file held before is kept") > errors, 30, f"{what} refused")
        assert message in s.output(), what
        # the old instance still serves both ways
        n += 1
        assert publish_ok(s, n), what
        eventually(lambda: n in received_numbers(app), 20, f"delivery after {what}")
    assert count(s, "hot reload: component updated") == 0
    # the fix applies
    save(comp, component("redis", 1), rename=False)
    eventually(lambda: count(s, "hot reload: component updated") == 1, 30, "the fixed file applied")
    n += 1
    assert publish_ok(s, n)
    eventually(lambda: n in received_numbers(app), 20, "delivery after the fix")


def test_removed_component_is_not_found_and_comes_back_clean(sidecar_factory, app_factory):
    s, app = start(sidecar_factory, app_factory, [component("in-memory", 0), subscription("/orders")])
    comp = Path(s.dir.name, "c0.yaml")
    assert publish_ok(s, 1)
    eventually(lambda: 1 in received_numbers(app), 20, "first delivery")
    comp.unlink()
    eventually(lambda: count(s, "hot reload: component removed") == 1, 20, "removal")
    r = requests.post(f"{s.http}/v1.0/publish/pubsub/orders", json={"n": 2})
    assert r.status_code == 404 and r.json()["errorCode"] == "ERR_PUBSUB_NOT_FOUND", r.text
    md = requests.get(f"{s.http}/v1.0/metadata").json()
    assert all(c["name"] != "pubsub" for c in md.get("components", [])), md
    assert all(x["pubsubname"] != "pubsub" for x in md.get("subscriptions", [])), md
    # re-added: a new instance, its subscription started again
    save(comp, component("in-memory", 5), rename=True)
    eventually(lambda: count(s, "hot reload: component added") == 1, 20, "re-added")
    eventually(lambda: any(x["pubsubname"] == "pubsub"
                           for x in requests.get(f"{s.http}/v1.0/metadata").json().get("subscriptions", [])),
               20, "subscription back")
    assert publish_ok(s, 3)
    eventually(lambda: 3 in received_numbers(app), 20, "delivery after re-adding")
    assert received_numbers(app).count(1) == 1 and 2 not in received_numbers(app)


def test_a_new_component_and_subscription_appear_in_metadata(sidecar_factory, app_factory):
    s, app = start(sidecar_factory, app_factory, [component("in-memory", 0)])
    Path(s.dir.name, "extra.yaml").write_text(component("in-memory", 0, name="extra") + "---\n"
                                             + subscription("/orders-extra", pubsub="extra"))
    eventually(lambda: count(s, "hot reload: component added") == 1, 20, "added")
    md = eventually(lambda: (lambda m: m if any(x["pubsubname"] == "extra" for x in m.get("subscriptions", []))
                             else None)(requests.get(f"{s.http}/v1.0/metadata").json()), 20, "metadata")
    assert {c["name"] for c in md["components"]} == {"pubsub", "extra"}
    r = requests.post(f"{s.http}/v1.0/publish/extra/orders", json={"n": 7})
    assert r.status_code == 204
    eventually(lambda: 7 in received_numbers(app), 20, "delivery through the new component")


def test_hot_reload_off_in_the_configuration(sidecar_factory, app_factory):
    cfg = config_file("  features:\n  - name: HotReload\n    enabled: false\n")
    s, app = start(sidecar_factory, app_factory, [component("in-memory", 0)], extra_args=["--config", cfg])
    assert "hot reload is off" in s.output()
    Path(s.dir.name, "c0.yaml").unlink()
    Path(s.dir.name, "extra.yaml").write_text(component("in-memory", 0, name="extra"))
    # nothing watches: a second later the removed component still serves, the new one is not there
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert publish_ok(s, 1)
    assert requests.post(f"{s.http}/v1.0/publish/extra/orders", json={}).status_code == 404
    assert "hot reload:" not in s.output()


def resiliency(retries):
    return ("apiVersion: dapr.io/v1alpha1\nkind: Resiliency\nmetadata: {name: res}\nspec:\n  policies:\n"
            f"    retries:\n      appRetry: {{policy: constant, duration: 10ms, maxRetries: {retries}}}\n"
            "  targets:\n    components:\n      pubsub:\n        inbound: {retry: appRetry}\n")


def attempts(app, n):
    started = requests.get(f"http://127.0.0.1:{app.port}/_started").json()
    return sum(1 for r in started if json.loads(r["body"])["data"]["n"] == n)


def test_resiliency_changes_apply_to_the_next_delivery(sidecar_factory, app_factory):
    s, app = start(sidecar_factory, app_factory, [component("in-memory", 0), subscription("/orders")])
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/orders": {"status": 500}}).raise_for_status()
    res = Path(s.dir.name, "res.yaml")
    n = 0
    for version, retries in enumerate([None, 2, 4]):
        if retries is not None:
            save(res, resiliency(retries), rename=version % 2 == 0)
            eventually(lambda: count(s, "hot reload: resiliency policies updated") == version, 20,
                       f"resiliency {version}")
        n += 1
        assert publish_ok(s, n)
        want = 1 + (retries or 0)
        eventually(lambda: attempts(app, n) == want, 20, f"{want} attempts of message {n}")
        # deliveries of one subscription are serial: once the next message is tried, this
        # one's attempts are final
        assert publish_ok(s, n + 100)
        eventually(lambda: attempts(app, n + 100) >= 1, 20, "the next message")
        assert attempts(app, n) == want


def test_programmatic_subscriptions_are_asked_again_when_their_component_changes(sidecar_factory,
                                                                                 app_factory):
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": json.dumps(
        [{"pubsubname": "pubsub", "topic": "p1", "route": "/orders-p1"}])})
    s = sidecar_factory([component("in-memory", 0)], app_id="reload", app_port=app.port)
    s.wait_ready()

    def topics():
        return sorted(x["topic"] for x in requests.get(f"{s.http}/v1.0/metadata").json().get("subscriptions", []))
    assert topics() == ["p1"]
    requests.post(f"http://127.0.0.1:{app.port}/_subscriptions",
                  data=json.dumps([{"pubsubname": "pubsub", "topic": "p2", "route": "/orders-p2"}])).raise_for_status()
    # a new component: only subscriptions on it would be taken from the answer
    Path(s.dir.name, "other.yaml").write_text(component("in-memory", 0, name="other"))
    eventually(lambda: count(s, "hot reload: component added") == 1, 20, "other added")
    assert topics() == ["p1"]
    # its component changes: asked again
    save(Path(s.dir.name, "c0.yaml"), component("in-memory", 1), rename=True)
    eventually(lambda: topics() == ["p2"], 20, "the app's new answer applied")
    r = requests.post(f"{s.http}/v1.0/publish/pubsub/p2", json={"n": 9})
    assert r.status_code == 204
    eventually(lambda: 9 in received_numbers(app), 20, "delivery on the new programmatic subscription")


def subscription_v1(topic, route, metadata=None, scopes=None):
    md = f"\n  metadata: {json.dumps(metadata)}" if metadata else ""
    sc = f"\nscopes: {json.dumps(scopes)}" if scopes is not None else ""
    return (f"apiVersion: dapr.io/v1alpha1\nkind: Subscription\nmetadata: {{name: v1-{topic}}}\n"
            f"spec:\n  pubsubname: pubsub\n  topic: {topic}\n  route: {route}{md}{sc}\n")


def test_subscription_metadata_scopes_and_removal(sidecar_factory, app_factory):
    """v1alpha1: new subscription metadata resubscribes (rawPayload: the app then gets the raw
    body), scoping the app out removes the subscription, deleting the file removes it, and a
    new file adds it back."""
    s, app = start(sidecar_factory, app_factory, [component("redis", 0), subscription_v1("orders", "/orders")])
    sub = Path(s.dir.name, "c1.yaml")

    def subscribed():
        return [x for x in requests.get(f"{s.http}/v1.0/metadata").json().get("subscriptions", [])
                if x["topic"] == "orders"]

    def bodies():
        return [json.loads(r["body"]) for r in requests.get(f"http://127.0.0.1:{app.port}/_received").json()]
    assert publish_ok(s, 1)
    eventually(lambda: any(b.get("data") == {"n": 1} for b in bodies()), 20, "CloudEvent delivery")
    save(sub, subscription_v1("orders", "/orders", metadata={"rawPayload": "true"}), rename=True)
    eventually(lambda: count(s, "hot reload: subscription started") == 1, 20, "resubscribed")
    assert subscribed()[0]["metadata"] == {"rawPayload": "true"}
    assert publish_ok(s, 2)
    # raw payload: what the broker holds (here the publish's CloudEvent) arrives base64-encoded
    # in data_base64 of a new envelope
    def raw_delivered():
        for b in bodies():
            if "data_base64" in b:
                return json.loads(base64.b64decode(b["data_base64"]))["data"] == {"n": 2}
        return False
    eventually(raw_delivered, 20, "raw delivery")
    # scoped to another app: removed
    save(sub, subscription_v1("orders", "/orders", scopes=["someone-else"]), rename=False)
    eventually(lambda: count(s, "hot reload: subscription removed") == 1, 20, "scoped out")
    assert subscribed() == []
    # back, then the file deleted
    save(sub, subscription_v1("orders", "/orders"), rename=True)
    eventually(lambda: len(subscribed()) == 1, 20, "back")
    sub.unlink()
    eventually(lambda: count(s, "hot reload: subscription removed") == 2, 20, "file removed")
    assert subscribed() == []
    n_before = len(bodies())
    assert publish_ok(s, 3)
    Path(s.dir.name, "again.yaml").write_text(subscription_v1("orders", "/orders"))
    # Redis keeps what was published meanwhile for the consumer group: it arrives once back
    eventually(lambda: any(b.get("data") == {"n": 3} for b in bodies()[n_before:]), 20, "delivered after re-adding")
