"""Kubernetes mode with the official Python SDK: daprd started as the sidecar injector starts
it, its identity from a Sentry and its resources (a Redis component, a v2alpha1 Subscription)
from an operator — the test control plane of the repository (`test-controlplane`: Dapr's
Sentry and operator protocols over mTLS with SPIFFE ids) — publishing with `DaprClient` and
delivering to a `dapr-ext-fastapi` app; then a component update from the operator's stream
applied live."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import requests

from conftest import DAPRD, Sidecar, eventually

CONTROLPLANE = DAPRD.parent / "test-controlplane"
NAMESPACE = "shop"


class ControlPlane:
    def __init__(self, resources_dir):
        assert CONTROLPLANE.exists(), (
            f"{CONTROLPLANE} is missing: cargo build -p daprd-testkit --features controlplane")
        self.proc = subprocess.Popen(
            [str(CONTROLPLANE), "--resources", str(resources_dir), "--namespace", NAMESPACE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.proc.stdout.readline())

    def command(self, cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        assert json.loads(self.proc.stdout.readline()) == {"ok": True}

    def daprd_args(self):
        return ["--mode", "kubernetes", "--control-plane-address", self.info["operator"],
                "--sentry-address", self.info["sentry"], "--enable-mtls",
                "--control-plane-trust-domain", self.info["trust_domain"],
                "--control-plane-namespace", self.info["control_plane_namespace"]]

    def daprd_env(self):
        return {"NAMESPACE": NAMESPACE, "POD_NAME": "checkout-7d9f",
                "DAPR_TRUST_ANCHORS": self.info["trust_anchors"],
                # the test machine runs as root; the check itself is tested in Rust
                "DAPR_UNSAFE_SKIP_CONTAINER_UID_GID_CHECK": "true"}

    def stop(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def redis_component(tag, note):
    return {"apiVersion": "dapr.io/v1alpha1", "kind": "Component",
            "metadata": {"name": "pubsub", "namespace": NAMESPACE},
            "spec": {"type": "pubsub.redis", "version": "v1", "metadata": [
                {"name": "redisHost", "value": "localhost:6379"},
                {"name": "redisDB", "value": "5"},
                {"name": "consumerID", "value": tag},
                {"name": "note", "value": note}]},
            "auth": {"secretStore": "kubernetes"},
            "scopes": ["checkout"]}


def publish_with_sdk(sidecar, topic, orders):
    env = dict(os.environ)
    env.update(sidecar.sdk_env())
    code = f"""
import json
from dapr.clients import DaprClient
with DaprClient() as c:
    for n in {orders!r}:
        c.publish_event(pubsub_name='pubsub', topic_name={topic!r},
                        data=json.dumps({{'order': n}}), data_content_type='application/json')
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr + "\n--- daprd ---\n" + sidecar.output()


def test_kubernetes_mode_with_the_python_sdk(app_factory, tmp_path):
    tag = "k8s-" + uuid.uuid4().hex[:8]
    topic = tag + "-orders"
    (tmp_path / "1-component.json").write_text(json.dumps(redis_component(tag, "v1")))
    (tmp_path / "2-subscription.json").write_text(json.dumps({
        "apiVersion": "dapr.io/v2alpha1", "kind": "Subscription",
        "metadata": {"name": "orders", "namespace": NAMESPACE},
        "spec": {"pubsubname": "pubsub", "topic": topic,
                 "routes": {"default": "/events/pubsub/orders"}},
        "scopes": ["checkout"]}))
    # another app's component: scoped out
    other = redis_component(tag, "v1")
    other["metadata"]["name"] = "billing-only"
    other["scopes"] = ["billing"]
    (tmp_path / "3-other.json").write_text(json.dumps(other))
    cp = ControlPlane(tmp_path)
    app = app_factory("fastapi_app.py")
    sidecar = None
    try:
        sidecar = Sidecar([], env=cp.daprd_env(), extra_args=cp.daprd_args(), app_port=app.port)
        sidecar.wait_ready()
        md = requests.get(sidecar.http + "/v1.0/metadata", timeout=5).json()
        assert [c["name"] for c in md["components"]] == ["pubsub"], md
        assert any(s["topic"] == topic for s in md["subscriptions"]), md

        publish_with_sdk(sidecar, topic, [1, 2, 3])

        def orders():
            return sorted(line["event"]["data"]["order"] for line in app.lines()
                          if line["event"].get("topic") == topic)
        eventually(lambda: orders() == [1, 2, 3], 20, "the three orders delivered")

        # A component update on the operator's stream applies live.
        cp.command({"push": "Component", "type": 2, "doc": redis_component(tag, "v2")})
        eventually(lambda: "hot reload: component updated" in sidecar.output(), 20,
                   "the update applied")
        publish_with_sdk(sidecar, topic, [4])
        eventually(lambda: orders() == [1, 2, 3, 4], 20, "delivered after the update")

        metrics = requests.get(f"http://127.0.0.1:{sidecar.metrics_port}/metrics", timeout=5).text
        assert 'dapr_runtime_mtls_init_total{app_id="checkout"} 1' in metrics, metrics[-2000:]
    finally:
        if sidecar:
            sidecar.stop()
        cp.stop()
