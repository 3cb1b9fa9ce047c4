"""Fixtures: start the built daprd binary on free loopback ports with a resources dir."""

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[3]
DAPRD = Path(os.environ.get("DAPRD_BIN", ROOT / "target" / "debug" / "daprd"))

IN_MEMORY = """apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: {name}
spec:
  type: pubsub.in-memory
  version: v1
  metadata: {metadata}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_memory(name: str, **metadata: str) -> str:
    items = "[" + ", ".join(f'{{name: {k}, value: "{v}"}}' for k, v in metadata.items()) + "]"
    return IN_MEMORY.format(name=name, metadata=items)


class Sidecar:
    def __init__(self, resources, app_id="checkout", env=None, extra_args=()):
        self.dir = tempfile.TemporaryDirectory(prefix="daprd-e2e-")
        for i, doc in enumerate(resources):
            Path(self.dir.name, f"c{i}.yaml").write_text(doc)
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.app_id = app_id
        self.env = dict(os.environ)
        self.env.update(env or {})
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [str(DAPRD), "-app-id", app_id, "--dapr-http-port", str(self.http_port),
             "--dapr-grpc-port=" + str(self.grpc_port), "--dapr-listen-addresses", "127.0.0.1",
             "--resources-path", self.dir.name, "--log-level", "debug", *extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
        )
        self.http = f"http://127.0.0.1:{self.http_port}"
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daprd exited with {self.proc.returncode}: {self.output()}")
            try:
                if requests.get(self.http + "/v1.0/healthz/outbound", timeout=1).status_code == 204:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("daprd did not become healthy: " + self.output())
            time.sleep(0.05)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def sdk_env(self):
        """Point the official SDKs at this sidecar the standard way (env vars)."""
        return {"DAPR_HTTP_PORT": str(self.http_port), "DAPR_GRPC_PORT": str(self.grpc_port),
                "DAPR_RUNTIME_HOST": "127.0.0.1"}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.dir.cleanup()


@pytest.fixture
def sidecar_factory():
    started = []

    def make(resources=None, **kw):
        s = Sidecar(resources or [in_memory("pubsub")], **kw)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def sidecar(sidecar_factory):
    return sidecar_factory()
