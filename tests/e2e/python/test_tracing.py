"""Traces: spans exported to receivers in this file that speak the real protocols — Zipkin v2
JSON over HTTP, OTLP over gRPC (a grpcio server of `opentelemetry-proto`'s TraceService) and
OTLP over HTTP/protobuf — for a publish → Redis → delivery round trip: names, kinds,
parent/child links, the trace id the app receives, and sampling; the streaming and bulk
delivery paths (spans and ingress counts); and both OTLP protocols over
TLS (`isSecure: true`), verified against the system's roots as Go daprd's exporters do."""

import json
import ssl
import subprocess
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from conftest import eventually
from test_configuration import config_file



def subs(topic="orders"):
    return json.dumps([{"pubsubname": "redis", "topic": topic, "route": f"/{topic}"}])


REDIS = ("apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: redis}\n"
         "spec: {type: pubsub.redis, version: v1, metadata: [{name: redisHost, value: '127.0.0.1:6379'}, "
         "{name: redisDB, value: '9'}]}\n")
CLIENT_KIND = 3  # SPAN_KIND_CLIENT


class Spans:
    """Spans received, as (trace_id, span_id, parent_id, name, kind, attributes) tuples."""

    def __init__(self):
        self.items = []
        self.lock = threading.Lock()

    def add(self, span):
        with self.lock:
            self.items.append(span)

    def of_trace(self, trace_id):
        with self.lock:
            return [s for s in self.items if s["trace_id"] == trace_id]


def otlp_spans(req, spans):
    for rs in req.resource_spans:
        service = {a.key: a.value.string_value for a in rs.resource.attributes}.get("service.name")
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.add({"trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                           "parent_id": s.parent_span_id.hex() or None, "name": s.name,
                           "kind": "CLIENT" if s.kind == CLIENT_KIND else str(s.kind),
                           "service": service,
                           "attributes": {a.key: a.value.string_value for a in s.attributes}})


class HttpReceiver:
    """Zipkin (`POST /api/v2/spans`, JSON) and OTLP/HTTP (`POST /v1/traces`, protobuf);
    over TLS with `tls` = (certificate file, key file)."""

    def __init__(self, tls=None):
        self.spans = Spans()
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/api/v2/spans":
                    for s in json.loads(body):
                        spans.add({"trace_id": s["traceId"], "span_id": s["id"],
                                   "parent_id": s.get("parentId"), "name": s["name"], "kind": s["kind"],
                                   "service": s["localEndpoint"]["serviceName"], "attributes": s["tags"]})
                    self.send_response(202)
                elif self.path == "/v1/traces":
                    assert self.headers["Content-Type"] == "application/x-protobuf"
                    req = trace_service_pb2.ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    otlp_spans(req, spans)
                    self.send_response(200)
                else:
                    self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


class GrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """OTLP/gRPC; over TLS with `tls` = (certificate file, key file)."""

    def __init__(self, tls=None):
        self.spans = Spans()
        self.metadata = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        if tls:
            cert, key = (open(f, "rb").read() for f in tls)
            creds = grpc.ssl_server_credentials([(key, cert)])
            self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        else:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        otlp_spans(request, self.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def stop(self):
        self.server.stop(0)


@pytest.fixture
def receivers():
    h, g = HttpReceiver(), GrpcReceiver()
    yield h, g
    h.stop()
    g.stop()


def tracing_config(rate, *exporters):
    """A Configuration file tracing at `rate` to the `exporters` (YAML lines under tracing)."""
    return config_file("  tracing:\n" f"    samplingRate: \"{rate}\"\n"
                       + "".join(f"    {e}\n" for e in exporters))


def otel(port, protocol, secure):
    return (f"otel: {{endpointAddress: \"127.0.0.1:{port}\", protocol: {protocol}, "
            f"isSecure: {'true' if secure else 'false'}}}")


def traced_sidecar(sidecar_factory, app_factory, app_id, topic, cfg, env=None):
    """An app subscribed to `topic` on Redis and its sidecar with Configuration `cfg`."""
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs(topic)})
    s = sidecar_factory([REDIS], app_id=app_id, app_port=app.port, env=env, extra_args=["--config", cfg])
    s.wait_ready()
    return s, app


def round_trip(s, app, trace_id, parent="b7ad6b7169203331", flags="01", topic="orders"):
    r = requests.post(f"{s.http}/v1.0/publish/redis/{topic}", json={"trace": trace_id},
                      headers={"traceparent": f"00-{trace_id}-{parent}-{flags}"})
    assert r.status_code == 204, r.text

    def delivered():
        got = requests.get(f"http://127.0.0.1:{app.port}/_received").json()
        mine = [g for g in got if json.loads(g["body"])["data"] == {"trace": trace_id}]
        return mine[0] if mine else None
    req = eventually(delivered, 20, f"delivery of {trace_id}")
    headers = {k.lower(): v for k, v in req["headers"].items()}
    return r.headers.get("traceparent"), headers["traceparent"]


def check_trace(spans, trace_id, response_tp, app_tp, service):
    got = eventually(lambda: (lambda x: x if len(x) == 2 else None)(spans.of_trace(trace_id)), 20,
                     f"two spans of {trace_id}")
    by_name = {s["name"]: s for s in got}
    publish, delivery = by_name["/v1.0/publish/redis/orders"], by_name["pubsub/orders"]
    assert publish["parent_id"] == "b7ad6b7169203331", "child of the caller's span"
    assert delivery["parent_id"] == publish["span_id"], "delivery is a child of the publish span"
    assert publish["kind"] == "CLIENT" and delivery["kind"] == "CLIENT"
    assert publish["service"] == service and delivery["service"] == service
    assert publish["attributes"]["dapr.protocol"] == "http"
    assert publish["attributes"]["dapr.status_code"] == "204"
    assert publish["attributes"]["messaging.system"] == "pubsub"
    assert delivery["attributes"]["messaging.destination.name"] == "orders"
    # the publish answer names the publish span; the app gets the delivery span
    assert response_tp == f"00-{trace_id}-{publish['span_id']}-01"
    assert app_tp == f"00-{trace_id}-{delivery['span_id']}-01"


def test_zipkin_and_otlp_grpc_get_the_round_trip(sidecar_factory, app_factory, receivers):
    http_rx, grpc_rx = receivers
    cfg = config_file(
        "  tracing:\n"
        "    samplingRate: \"1\"\n"
        f"    zipkin: {{endpointAddress: \"http://127.0.0.1:{http_rx.port}/api/v2/spans\"}}\n"
        f"    otel: {{endpointAddress: \"127.0.0.1:{grpc_rx.port}\", protocol: grpc, isSecure: false,"
        " headers: \"x-tenant=shop\"}\n")
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs()})
    s = sidecar_factory([REDIS], app_id="traced", app_port=app.port, extra_args=["--config", cfg])
    s.wait_ready()
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    response_tp, app_tp = round_trip(s, app, trace_id)
    check_trace(http_rx.spans, trace_id, response_tp, app_tp, "traced")
    check_trace(grpc_rx.spans, trace_id, response_tp, app_tp, "traced")
    assert any(m.get("x-tenant") == "shop" for m in grpc_rx.metadata), grpc_rx.metadata

    # a caller that did not sample gets no span at rate 1; one that did, does
    unsampled, sampled = "1" * 32, "2" * 32
    round_trip(s, app, unsampled, flags="00")
    round_trip(s, app, sampled)
    eventually(lambda: len(http_rx.spans.of_trace(sampled)) == 2, 20, "spans of the sampled trace")
    assert http_rx.spans.of_trace(unsampled) == []


def test_otlp_http_and_rate_zero(sidecar_factory, app_factory, receivers):
    http_rx, _ = receivers
    on = tracing_config("1", otel(http_rx.port, "http", False))
    off = tracing_config("0", f"zipkin: {{endpointAddress: \"http://127.0.0.1:{http_rx.port}/api/v2/spans\"}}")
    # its own topic: the traced sidecar's consumer group must not pick this message up
    quiet, app = traced_sidecar(sidecar_factory, app_factory, "quiet", "quiet", off)
    silent_trace = "3" * 32
    round_trip(quiet, app, silent_trace, topic="quiet")
    quiet.stop()

    s, app2 = traced_sidecar(sidecar_factory, app_factory, "traced-http", "orders", on)
    trace_id = "4" * 32
    response_tp, app_tp = round_trip(s, app2, trace_id)
    check_trace(http_rx.spans, trace_id, response_tp, app_tp, "traced-http")
    assert http_rx.spans.of_trace(silent_trace) == [], "samplingRate 0 exports nothing"


@pytest.fixture
def collector_tls(tmp_path):
    """A CA and a collector certificate for 127.0.0.1 signed by it: (ca, cert, key) files."""
    ca_key, ca, key, csr, cert = (str(tmp_path / n) for n in
                                  ("ca.key", "ca.pem", "key.pem", "req.csr", "cert.pem"))
    ext = tmp_path / "leaf.ext"
    ext.write_text("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n")

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test collector CA",
            "-keyout", ca_key, "-out", ca)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", csr)
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
            "-extfile", str(ext), "-out", cert)
    return ca, cert, key


def publish_and_delivery_spans(spans, trace_id):
    got = eventually(lambda: (lambda x: x if len(x) == 2 else None)(spans.of_trace(trace_id)), 20,
                     f"two spans of {trace_id}")
    by_parent = {s["parent_id"]: s for s in got}
    publish = by_parent["b7ad6b7169203331"]
    assert by_parent[publish["span_id"]]["name"].startswith("pubsub/")
    return publish


def test_otlp_over_tls_on_both_protocols(sidecar_factory, app_factory, collector_tls):
    ca, cert, key = collector_tls
    http_rx, grpc_rx = HttpReceiver(tls=(cert, key)), GrpcReceiver(tls=(cert, key))
    try:
        for n, (protocol, rx) in enumerate([("grpc", grpc_rx), ("http", http_rx)]):
            topic = f"tls-{protocol}"
            # the collector's CA is the only root this sidecar trusts
            s, app = traced_sidecar(sidecar_factory, app_factory, topic, topic,
                                    tracing_config("1", otel(rx.port, protocol, True)),
                                    env={"SSL_CERT_FILE": ca})
            trace_id = f"{n + 5}" * 32
            response_tp, _ = round_trip(s, app, trace_id, topic=topic)
            publish = publish_and_delivery_spans(rx.spans, trace_id)
            assert response_tp == f"00-{trace_id}-{publish['span_id']}-01"

        # without the CA the collector's certificate is refused: the export fails, said once
        s, app = traced_sidecar(sidecar_factory, app_factory, "tls-untrusted", "tls-untrusted",
                                tracing_config("1", otel(grpc_rx.port, "grpc", True)))
        trace_id = "9" * 32
        round_trip(s, app, trace_id, topic="tls-untrusted")
        eventually(lambda: "trace export failed" in s.output(), 20, "the failed export logged")
        assert grpc_rx.spans.of_trace(trace_id) == []
    finally:
        http_rx.stop()
        grpc_rx.stop()


# subscribes, answers one event with success and holds the stream open until told (the SDK's
# close cancels the call, which can overtake an answer not yet sent)
ONE_EVENT_STREAM = r"""
import json, sys
from dapr.clients import DaprClient
with DaprClient() as c:
    sub = c.subscribe(pubsub_name="pubsub", topic=sys.argv[1])
    print("subscribed", flush=True)
    msg = None
    while msg is None:
        msg = sub.next_message()
    sub.respond_success(msg)
    print(json.dumps(msg.data()), flush=True)
    sys.stdin.readline()
    sub.close()
"""


def test_streaming_and_bulk_deliveries_are_traced_and_counted(sidecar_factory, app_factory, receivers):
    """The two delivery paths besides the per-message app call: a streaming subscription (the
    SDK's `DaprClient.subscribe`) and a bulk subscription. Each delivery is a `pubsub/<topic>`
    span, child of the publish span, and is counted in the ingress series."""
    import os
    import sys

    http_rx, _ = receivers
    cfg = tracing_config("1", f"zipkin: {{endpointAddress: \"http://127.0.0.1:{http_rx.port}/api/v2/spans\"}}")
    bulk_subs = json.dumps([{"pubsubname": "pubsub", "topic": "bulkt", "route": "/bulkt",
                             "bulkSubscribe": {"enabled": True, "maxMessagesCount": 10,
                                               "maxAwaitDurationMs": 100}}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": bulk_subs})
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/bulkt": {"bulk": True}}).raise_for_status()
    s = sidecar_factory(app_id="paths", app_port=app.port, extra_args=["--config", cfg])
    s.wait_ready()
    stream = subprocess.Popen([sys.executable, "-c", ONE_EVENT_STREAM, "streamt"], env={**os.environ, **s.sdk_env()},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert stream.stdout.readline().strip() == "subscribed"
        for topic, trace_id in (("streamt", "5" * 32), ("bulkt", "6" * 32)):
            r = requests.post(f"{s.http}/v1.0/publish/pubsub/{topic}", json={"t": topic},
                              headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"})
            assert r.status_code == 204, r.text
            publish = publish_and_delivery_spans(http_rx.spans, trace_id)
            assert publish["name"] == f"/v1.0/publish/pubsub/{topic}"
            delivery = [x for x in http_rx.spans.of_trace(trace_id) if x is not publish][0]
            assert delivery["name"] == f"pubsub/{topic}"
            assert delivery["attributes"]["messaging.destination.name"] == topic
        assert json.loads(stream.stdout.readline()) == {"t": "streamt"}
        text = requests.get(f"http://127.0.0.1:{s.metrics_port}/metrics").text
    finally:
        stream.communicate("\n", timeout=20)
    ingress = [line for line in text.splitlines() if line.startswith("dapr_component_pubsub_ingress_count{")]
    assert any('topic="streamt"' in line and 'process_status="success"' in line and line.endswith(" 1")
               for line in ingress), ingress
    bulk = [line for line in text.splitlines()
            if line.startswith("dapr_component_pubsub_ingress_bulk_event_count{") and 'topic="bulkt"' in line]
    assert bulk and bulk[0].endswith(" 1"), bulk
