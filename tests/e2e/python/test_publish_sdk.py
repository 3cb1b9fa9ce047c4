"""Publishing through daprd-rs with the official Python SDK (gRPC) and plain HTTP."""

import os
import subprocess
import sys
import json

import grpc
import pytest
import requests

from conftest import DAPRD, PUBSUB, ROOT, pubsub_component


def run_sdk(sidecar, code: str) -> str:
    """Runs `code` in a fresh interpreter whose environment points the SDK at `sidecar`,
    exactly as `dapr run` would set it up for an app."""
    env = dict(os.environ)
    env.update(sidecar.sdk_env())
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + "\n--- daprd ---\n" + sidecar.output()
    return out.stdout


def test_grpc_publish_event_and_publish_events(sidecar):
    out = run_sdk(sidecar, """
from dapr.clients import DaprClient
with DaprClient() as c:
    c.publish_event(pubsub_name='pubsub', topic_name='orders', data='{"orderId": 1}', data_content_type='application/json')
    c.publish_event(pubsub_name='pubsub', topic_name='orders', data=b'raw', publish_metadata={'rawPayload': 'true'})
    r = c.publish_events(pubsub_name='pubsub', topic_name='orders', data=['a', 'b', 'c'], data_content_type='text/plain')
    print('failed=%d' % len(r.failed_entries))
    md = c.get_metadata()
    print('id=' + md.application_id)
    print('components=' + ','.join(f'{x.name}:{x.type}' for x in md.registered_components))
""")
    assert "failed=0" in out
    assert "id=checkout" in out
    assert f"components=pubsub:pubsub.{PUBSUB}" in out


def test_grpc_errors_reach_the_sdk_with_codes_and_details(sidecar_factory):
    s = sidecar_factory([pubsub_component("pubsub"), pubsub_component("scoped", allowedTopics="only")])
    out = run_sdk(s, """
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError
with DaprClient() as c:
    for ps, topic, md in [('nope', 't', {}), ('pubsub', 't', {'rawPayload': 'nah'}), ('scoped', 'other', {})]:
        try:
            c.publish_event(pubsub_name=ps, topic_name=topic, data='x', publish_metadata=md)
            print('no error')
        except DaprGrpcError as e:
            print(e.code().name, e.error_code(), e.details())
""")
    lines = out.strip().splitlines()
    assert lines[0].startswith("INVALID_ARGUMENT DAPR_PUBSUB_NOT_FOUND pubsub nope is not found"), out
    assert lines[1].startswith("INVALID_ARGUMENT DAPR_PUBSUB_METADATA_DESERIALIZATION"), out
    assert lines[2].startswith("PERMISSION_DENIED DAPR_PUBSUB_FORBIDDEN topic other is not allowed for app id checkout"), out


def test_http_publish_and_error_rows_with_requests(sidecar_factory):
    s = sidecar_factory([pubsub_component("pubsub"), pubsub_component("scoped", publishingScopes="checkout=mine")])
    r = requests.post(s.http + "/v1.0/publish/pubsub/orders", json={"a": 1})
    assert r.status_code == 204 and r.content == b""
    r = requests.post(s.http + "/v1.0/publish/bulk/pubsub/orders",
                      json=[{"entryId": "1", "event": "x", "contentType": "text/plain"}])
    assert r.status_code == 204
    rows = [
        ("/v1.0/publish/nope/t", {}, "x", 404, "ERR_PUBSUB_NOT_FOUND"),
        ("/v1.0/publish/pubsub/", {}, "x", 404, "ERR_TOPIC_NAME_EMPTY"),
        ("/v1.0/publish/pubsub/t?metadata.rawPayload=nope", {}, "x", 400, "ERR_PUBSUB_REQUEST_METADATA"),
        ("/v1.0/publish/pubsub/t", {"content-type": "application/cloudevents+json"}, "nope", 500, "ERR_PUBSUB_CLOUD_EVENTS_SER"),
        ("/v1.0/publish/scoped/other", {}, "x", 403, "ERR_PUBSUB_FORBIDDEN"),
        ("/v1.0-alpha1/publish/bulk/pubsub/t", {}, "not json", 400, "ERR_PUBSUB_EVENTS_SER"),
    ]
    for path, headers, body, status, code in rows:
        r = requests.post(s.http + path, headers=headers, data=body)
        assert r.status_code == status, (path, r.status_code, r.text)
        assert r.headers["content-type"] == "application/json"
        assert r.json()["errorCode"] == code, (path, r.text)
    assert requests.post(s.http + "/v1.0/publish/scoped/mine", data="x").status_code == 204


def test_api_token_over_both_protocols(sidecar_factory):
    s = sidecar_factory(env={"DAPR_API_TOKEN": "tok"})
    r = requests.post(s.http + "/v1.0/publish/pubsub/tokens", data="x")
    assert r.status_code == 401 and r.text.strip() == "invalid api token"
    r = requests.post(s.http + "/v1.0/publish/pubsub/tokens", data="x", headers={"dapr-api-token": "tok"})
    assert r.status_code == 204
    assert requests.get(s.http + "/v1.0/healthz").status_code == 204
    env_code = """
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError
with DaprClient() as c:
    try:
        c.publish_event(pubsub_name='pubsub', topic_name='tokens', data='x')
        print('published')
    except DaprGrpcError as e:
        print(e.code().name)
"""
    assert run_sdk(s, env_code).strip() == "UNAUTHENTICATED"
    env = dict(os.environ)
    env.update(s.sdk_env())
    env["DAPR_API_TOKEN"] = "tok"
    out = subprocess.run([sys.executable, "-c", env_code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "published", out.stderr


def test_sdk_unchanged_against_the_readme_command():
    """`daprd --app-id checkout --resources-path examples/resources` on the default ports
    serves an SDK that is given no configuration at all."""
    import socket
    for port in (3500, 50001):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is busy on this machine")
    proc = subprocess.Popen([str(DAPRD), "--app-id", "checkout", "--resources-path", str(ROOT / "examples" / "resources")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        code = """
from dapr.clients import DaprClient
with DaprClient() as c:
    c.wait(20)
    c.publish_event(pubsub_name='pubsub', topic_name='orders', data='{"x":1}', data_content_type='application/json')
    print('ok')
"""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DAPR_")}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "ok", out.stderr
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0, "SIGTERM leads to a clean exit"


def test_bad_resources_exit_nonzero_naming_file_component_and_field(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: ps}\nspec:\n  type: pubsub.nope\n"
        "---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: ps2}\nspec: {type: pubsub.hazelcast}\n")
    (tmp_path / "worse.yml").write_text("apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: x}\nspec: [\n")
    out = subprocess.run([str(DAPRD), "--app-id", "a", "--resources-path", str(tmp_path),
                          "--dapr-http-port", "0", "--dapr-grpc-port", "0"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert 'bad.yaml: component "ps": field spec.type: unknown component type "pubsub.nope"' in out.stderr, out.stderr
    assert 'component "ps2": field spec.type' in out.stderr and "removed from Dapr in v1.11" in out.stderr
    assert "worse.yml" in out.stderr and "invalid YAML" in out.stderr
    v = subprocess.run([str(DAPRD), "validate", "--resources-path", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert v.returncode != 0 and "3 problem(s) found" in v.stderr, v.stderr
    ok = subprocess.run([str(DAPRD), "validate", "--resources-path", str(ROOT / "examples" / "resources")],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
