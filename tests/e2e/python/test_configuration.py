"""The Configuration resource (`--config`): API allow and deny lists over HTTP and through the
official Python SDK over gRPC, and a bad file stopping the start with named fields."""

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from conftest import DAPRD, Sidecar, pubsub_component
from test_publish_sdk import run_sdk


def config_file(spec: str) -> str:
    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="config-", delete=False)
    f.write("apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata: {name: appconfig}\n"
            "spec:\n" + spec)
    f.close()
    return f.name


def test_http_allow_list_serves_only_what_it_names(sidecar_factory):
    cfg = config_file("  api:\n    allowed:\n    - {name: metadata, version: v1, protocol: http}\n")
    s = sidecar_factory([pubsub_component("pubsub")], extra_args=["--config", cfg])
    r = requests.post(f"{s.http}/v1.0/publish/pubsub/orders", json={"a": 1})
    # not served at all: Go's plain 404, no Dapr error code
    assert r.status_code == 404 and r.text == "404 page not found\n", r.text
    assert requests.get(f"{s.http}/v1.0/metadata").status_code == 200
    assert requests.get(f"{s.http}/v1.0/healthz").status_code == 204, "health stays open"
    assert requests.post(f"{s.http}/v1.0/shutdown").status_code == 404


def test_http_deny_list_wins_and_grpc_rules_leave_http_alone(sidecar_factory):
    cfg = config_file(
        "  api:\n"
        "    allowed:\n"
        "    - {name: publish, version: v1, protocol: http}\n"
        "    - {name: metadata, version: v1, protocol: grpc}\n"
        "    denied:\n"
        "    - {name: publish, version: v1.0, protocol: http}\n")
    s = sidecar_factory([pubsub_component("pubsub")], extra_args=["--config", cfg])
    assert requests.post(f"{s.http}/v1.0/publish/pubsub/orders", json={"a": 1}).status_code == 404
    assert requests.get(f"{s.http}/v1.0/metadata").status_code == 404, "not in the HTTP allow list"


def test_grpc_allow_list_through_the_python_sdk(sidecar_factory):
    cfg = config_file("  api:\n    allowed:\n    - {name: publish, version: v1, protocol: grpc}\n")
    s = sidecar_factory([pubsub_component("pubsub")], extra_args=["--config", cfg])
    out = run_sdk(s, """
import grpc
from dapr.clients import DaprClient
with DaprClient() as c:
    c.publish_event(pubsub_name='pubsub', topic_name='orders', data='{"a": 1}', data_content_type='application/json')
    print('published')
    try:
        c.get_metadata()
        print('metadata answered')
    except Exception as e:
        code = getattr(e, 'code', lambda: None)()
        print('metadata refused', code.name if code else type(e).__name__, str(e))
""")
    assert "published" in out, out
    assert "metadata refused UNIMPLEMENTED" in out, out
    # HTTP has no rule: everything is served there
    assert requests.get(f"{s.http}/v1.0/metadata").status_code == 200


def test_grpc_deny_list_through_the_python_sdk(sidecar_factory):
    cfg = config_file("  api:\n    denied:\n    - {name: publish, version: v1, protocol: grpc}\n")
    s = sidecar_factory([pubsub_component("pubsub")], extra_args=["--config", cfg])
    out = run_sdk(s, """
from dapr.clients import DaprClient
with DaprClient() as c:
    try:
        c.publish_event(pubsub_name='pubsub', topic_name='orders', data='x')
        print('published')
    except Exception as e:
        code = getattr(e, 'code', lambda: None)()
        print('publish refused', code.name if code else type(e).__name__)
    print('metadata', c.get_metadata().application_id)
""")
    assert "publish refused UNIMPLEMENTED" in out, out
    assert "metadata checkout" in out, out


def test_a_bad_configuration_stops_the_start_naming_each_field(tmp_path):
    cfg = config_file("  tracing: {samplingRate: \"often\"}\n"
                      "  api: {allowed: [{name: publish, version: v1, protocol: smtp}]}\n")
    res = tmp_path / "res"
    res.mkdir()
    (res / "ps.yaml").write_text(pubsub_component("pubsub"))
    out = subprocess.run([str(DAPRD), "--app-id", "a", "--dapr-http-port", "0",
                          "--dapr-grpc-port", "0", "--resources-path", str(res), "--config", cfg],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "field spec.tracing.samplingRate" in out.stderr, out.stderr
    assert "field spec.api.allowed[0].protocol" in out.stderr, out.stderr
    Path(cfg).unlink()


def api_log_lines(sidecar, marker):
    return [line for line in sidecar.output().splitlines() if marker in line]


def test_api_logging_with_the_flag(sidecar_factory):
    s = sidecar_factory([pubsub_component("pubsub")], extra_args=["--enable-api-logging"])
    requests.post(f"{s.http}/v1.0/publish/pubsub/orders", json={"a": 1}).raise_for_status()
    run_sdk(s, """
from dapr.clients import DaprClient
with DaprClient() as c:
    c.publish_event(pubsub_name='pubsub', topic_name='orders', data='x')
""")
    http_lines = [line for line in api_log_lines(s, "HTTP API Called") if "/v1.0/publish/" in line]
    assert http_lines and "POST /v1.0/publish/pubsub/orders" in http_lines[0], http_lines
    assert "code=204" in http_lines[0], http_lines[0]
    grpc_lines = [line for line in api_log_lines(s, "gRPC API Called") if "PublishEvent" in line]
    assert grpc_lines and "/dapr.proto.runtime.v1.Dapr/PublishEvent" in grpc_lines[0], grpc_lines
    assert "code=Ok" in grpc_lines[0], grpc_lines[0]


def test_api_logging_from_the_configuration_obfuscated_without_health(sidecar_factory):
    cfg = config_file("  logging: {apiLogging: {enabled: true, obfuscateURLs: true, "
                      "omitHealthChecks: true}}\n")
    s = sidecar_factory([pubsub_component("pubsub")], extra_args=["--config", cfg])
    requests.get(f"{s.http}/v1.0/healthz").raise_for_status()
    requests.post(f"{s.http}/v1.0/publish/pubsub/orders", json={"a": 1}).raise_for_status()
    lines = api_log_lines(s, "HTTP API Called")
    assert any("POST PublishEvent" in line for line in lines), lines
    assert not any("orders" in line for line in lines), "obfuscateURLs: no path"
    assert not any("Healthz" in line or "healthz" in line for line in lines), lines
    # the flag, when given, wins over the Configuration
    quiet = sidecar_factory([pubsub_component("pubsub")],
                            extra_args=["--config", cfg, "--enable-api-logging=false"])
    requests.post(f"{quiet.http}/v1.0/publish/pubsub/orders", json={"a": 1}).raise_for_status()
    assert not api_log_lines(quiet, "HTTP API Called")


def test_unix_domain_sockets_serve_both_apis(tmp_path):
    import http.client
    import socket
    import sys
    import time

    from conftest import eventually, free_port

    res = tmp_path / "res"
    res.mkdir()
    (res / "ps.yaml").write_text(pubsub_component("pubsub"))
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    public, http_port = free_port(), free_port()
    proc = subprocess.Popen([str(DAPRD), "--app-id", "uds", "--resources-path", str(res),
                             "--unix-domain-socket", str(sockets),
                             "--dapr-http-port", str(http_port),
                             "--dapr-public-port", str(public)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        eventually(lambda: requests.get(f"http://127.0.0.1:{public}/v1.0/healthz/outbound",
                                        timeout=1).status_code == 204, 20, "daprd up")
        http_socket = sockets / "dapr-http-uds.socket"
        grpc_socket = sockets / "dapr-grpc-uds.socket"
        assert http_socket.exists() and grpc_socket.exists(), list(sockets.iterdir())

        class UnixConnection(http.client.HTTPConnection):
            def connect(self):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(http_socket))

        c = UnixConnection("localhost")
        c.request("POST", "/v1.0/publish/pubsub/orders", body=b'{"a":1}',
                  headers={"content-type": "application/json"})
        assert c.getresponse().status == 204
        c = UnixConnection("localhost")
        c.request("GET", "/v1.0/metadata")
        assert b'"id":"uds"' in c.getresponse().read()
        # the APIs are not on TCP as well
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{http_port}/v1.0/metadata", timeout=2)
        # the gRPC API through the socket with the SDK's own client: grpc-python names the
        # socket path, percent-encoded, as :authority, which the sidecar must take as Go
        # daprd does. Several calls on one connection: the later ones reuse HPACK entries.
        out = subprocess.run([sys.executable, "-c", f"""
from dapr.clients import DaprClient
with DaprClient(address="unix://{grpc_socket}") as d:
    for i in range(3):
        d.publish_event(pubsub_name="pubsub", topic_name="orders", data=b"x")
    print("app id", d.get_metadata().application_id)
"""], capture_output=True, text=True, timeout=60,
            # the SDK waits for the sidecar's health endpoint: the public port serves it
            env={**os.environ, "DAPR_HTTP_ENDPOINT": f"http://127.0.0.1:{public}"})
        assert "app id uds" in out.stdout, out.stdout + out.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=20)
