"""Prometheus metrics: a real Prometheus server (Debian's `prometheus`, installed by
scripts/services.sh) scrapes the sidecar; every assertion goes through Prometheus's HTTP query
API. Publishes come from the official Python SDK (gRPC) and plain HTTP; deliveries go to a
plain HTTP app that accepts some messages and drops others."""

import json
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from conftest import DAPRD, eventually, free_port, pubsub_component
from test_configuration import config_file
from test_publish_sdk import run_sdk

PROMETHEUS = shutil.which("prometheus")
# Go daprd's default latency buckets (milliseconds)
DAPR_LATENCY_BUCKETS = ["1", "2", "3", "4", "5", "6", "8", "10", "13", "16", "20", "25", "30", "40",
                        "50", "65", "80", "100", "130", "160", "200", "250", "300", "400", "500",
                        "650", "800", "1000", "2000", "5000", "10000", "20000", "50000", "100000",
                        "+Inf"]

SUBS = json.dumps([{"pubsubname": "pubsub", "topic": "orders", "route": "/orders"}])


class Prometheus:
    """A Prometheus server scraping `targets` every second."""

    def __init__(self, targets):
        self.dir = tempfile.TemporaryDirectory(prefix="prometheus-")
        cfg = Path(self.dir.name, "prometheus.yml")
        cfg.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "- job_name: daprd\n"
            "  metrics_path: /metrics\n"
            f"  static_configs: [{{targets: {json.dumps(targets)}}}]\n")
        self.port = free_port()
        self.log = open(Path(self.dir.name, "log"), "w+")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={self.dir.name}/data",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

        def ready():
            assert self.proc.poll() is None, "prometheus exited: " + self.output()
            try:
                return requests.get(self.url + "/-/ready", timeout=1).status_code == 200
            except requests.RequestException:
                return False
        eventually(ready, 30, "prometheus ready")

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def query(self, q):
        r = requests.get(self.url + "/api/v1/query", params={"query": q}, timeout=5)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def value(self, q):
        """The single value of `q`, or None while Prometheus has none."""
        res = self.query(q)
        return float(res[0]["value"][1]) if len(res) == 1 else None

    def wait_value(self, q, want, timeout=30):
        got = {}

        def check():
            got["v"] = self.value(q)
            return got["v"] == want
        try:
            eventually(check, timeout, f"{q} == {want}")
        except AssertionError as e:
            raise AssertionError(f"{e}; last value {got.get('v')}") from None

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        self.dir.cleanup()


@pytest.fixture
def prometheus_factory():
    if PROMETHEUS is None:
        pytest.fail("prometheus is not installed (scripts/services.sh installs it)")
    started = []

    def make(targets):
        p = Prometheus(targets)
        started.append(p)
        return p
    yield make
    for p in started:
        p.stop()


def test_prometheus_scrapes_dapr_series(sidecar_factory, app_factory, prometheus_factory):
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": SUBS})
    s = sidecar_factory(app_id="metrics", app_port=app.port)
    s.wait_ready()
    prom = prometheus_factory([f"127.0.0.1:{s.metrics_port}"])
    prom.wait_value('up{job="daprd"}', 1)

    # the app drops every message of /orders after the first 10
    run_sdk(s, """
from dapr.clients import DaprClient
with DaprClient() as c:
    for i in range(7):
        c.publish_event(pubsub_name='pubsub', topic_name='orders', data='{"n": %d}' % i, data_content_type='application/json')
""")
    for i in range(7, 10):
        s.publish("orders", json.dumps({"n": i}))
    eventually(lambda: len(requests.get(f"http://127.0.0.1:{app.port}/_received").json()) == 10, 20,
               "ten deliveries")
    requests.post(f"http://127.0.0.1:{app.port}/_mode",
                  json={"/orders": {"status": 200, "body": '{"status":"DROP"}'}}).raise_for_status()
    for i in range(10, 12):
        s.publish("orders", json.dumps({"n": i}))

    egress = 'dapr_component_pubsub_egress_count{app_id="metrics",component="pubsub",namespace="default",success="true",topic="orders"}'
    prom.wait_value(egress, 12)
    ingress = 'dapr_component_pubsub_ingress_count{{app_id="metrics",component="pubsub",process_status="{}",status="{}",topic="orders"}}'
    prom.wait_value(ingress.format("success", "success"), 10)
    prom.wait_value(ingress.format("drop", "success"), 2)
    prom.wait_value('dapr_component_pubsub_ingress_dropped_count{by="app",reason="drop",topic="orders"}', 2)
    prom.wait_value('dapr_component_pubsub_ingress_in_flight{topic="orders"}', 0)
    prom.wait_value('dapr_component_pubsub_subscriptions{app_id="metrics",topic="orders",type="programmatic"}', 1)

    # latency histograms with Dapr's buckets; every publish is in +Inf and in the count
    buckets = prom.query('dapr_component_pubsub_egress_latencies_bucket{app_id="metrics",success="true",topic="orders"}')
    assert sorted((b["metric"]["le"] for b in buckets), key=lambda x: float(x)) == DAPR_LATENCY_BUCKETS
    assert prom.value('dapr_component_pubsub_egress_latencies_count{app_id="metrics",topic="orders"}') == 12
    assert prom.value('dapr_component_pubsub_egress_latencies_bucket{app_id="metrics",topic="orders",le="+Inf"}') == 12
    assert prom.value('dapr_component_pubsub_ingress_latencies_count{process_status="success",topic="orders"}') == 10

    # the HTTP and gRPC API servers
    prom.wait_value('dapr_http_server_request_count{app_id="metrics",method="POST",path="/v1.0/publish/pubsub/orders",status="204"}', 5)
    prom.wait_value('dapr_grpc_io_server_completed_rpcs{app_id="metrics",grpc_server_method="/dapr.proto.runtime.v1.Dapr/PublishEvent",grpc_server_status="OK"}', 7)
    # the latency by method only, as Go daprd's view (its status is in the count)
    assert prom.value('dapr_grpc_io_server_server_latency_count{app_id="metrics",grpc_server_method="/dapr.proto.runtime.v1.Dapr/PublishEvent"}') == 7
    assert not prom.query('dapr_grpc_io_server_server_latency_count{grpc_server_status!=""}')
    # bytes per RPC: the request message (pubsub, topic, 8 data bytes, content type: >= 44 bytes)
    publish = 'grpc_server_method="/dapr.proto.runtime.v1.Dapr/PublishEvent"'
    assert prom.value('dapr_grpc_io_server_received_bytes_per_rpc_count{%s}' % publish) == 7
    assert prom.value('dapr_grpc_io_server_received_bytes_per_rpc_sum{%s}' % publish) >= 7 * 44
    assert prom.value('dapr_grpc_io_server_received_bytes_per_rpc_bucket{%s,le="1024"}' % publish) == 7
    assert prom.value('dapr_grpc_io_server_sent_bytes_per_rpc_sum{%s}' % publish) == 0

    # the app channel: every delivery was answered 200 (SUCCESS or DROP in the body)
    prom.wait_value('dapr_http_client_completed_count{app_id="metrics",method="POST",path="/orders",status="200"}', 12)
    assert prom.value('dapr_http_client_roundtrip_latency_count{app_id="metrics",path="/orders"}') == 12

    # components and the process
    assert prom.value('dapr_runtime_component_loaded{app_id="metrics"}') == 1
    assert prom.value('dapr_runtime_component_init_total{app_id="metrics"}') == 1
    rss = prom.value('process_resident_memory_bytes{job="daprd"}')
    assert rss is not None and 1e6 < rss < 200e6, rss
    assert prom.value('process_open_fds{job="daprd"}') >= 3

    # a made-up path adds no series of its own (the router's 404 has an empty path label)
    for i in range(3):
        assert requests.get(f"{s.http}/made/up/{i}").status_code == 404
    prom.wait_value('sum(dapr_http_server_request_count{app_id="metrics",method="GET",path="",status="404"})', 3)
    assert prom.query('dapr_http_server_request_count{path=~"/made/up/.*"}') == []

    # more publishes raise the counter Prometheus sees
    for i in range(3):
        s.publish("orders", json.dumps({"n": 100 + i}))
    prom.wait_value(egress, 15)


def test_failed_publish_is_counted_apart(sidecar_factory, prometheus_factory):
    # a stream key Redis holds as a string: every XADD to it fails (WRONGTYPE)
    key = f"metrics-wrongtype-{free_port()}"
    subprocess.run(["redis-cli", "-n", "9", "SET", key, "x"], check=True, capture_output=True)
    res = ("apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: redis}\n"
           "spec: {type: pubsub.redis, version: v1, metadata: [{name: redisHost, value: '127.0.0.1:6379'}, "
           "{name: redisDB, value: '9'}]}\n")
    retries = ("apiVersion: dapr.io/v1alpha1\nkind: Resiliency\nmetadata: {name: outbound-retries}\n"
               "spec:\n  policies:\n    retries:\n      twice: {policy: constant, duration: 10ms, maxRetries: 2}\n"
               "  targets:\n    components:\n      redis:\n        outbound: {retry: twice}\n")
    try:
        s = sidecar_factory([pubsub_component("pubsub"), res, retries], app_id="failing")
        prom = prometheus_factory([f"127.0.0.1:{s.metrics_port}"])
        for _ in range(2):
            r = requests.post(f"{s.http}/v1.0/publish/redis/{key}", json={"a": 1})
            assert r.status_code >= 400, r.text
        prom.wait_value('dapr_component_pubsub_egress_count{app_id="failing",component="redis",success="false",topic="%s"}' % key, 2)
        prom.wait_value('dapr_http_server_request_count{app_id="failing",path="/v1.0/publish/redis/%s",status="%d"}'
                        % (key, r.status_code), 2)
        assert prom.value('dapr_component_pubsub_egress_count{app_id="failing",success="true"}') is None
        # the retry policy ran once per publish and retried twice each time
        labels = 'app_id="failing",flow_direction="outbound",name="outbound-retries",policy="retry",target="pubsub_redis"'
        prom.wait_value('dapr_resiliency_count{%s}' % labels, 2)
        prom.wait_value('dapr_resiliency_activations_total{%s}' % labels, 4)
        assert prom.value('dapr_resiliency_loaded{app_id="failing",name="outbound-retries"}') == 1
    finally:
        subprocess.run(["redis-cli", "-n", "9", "DEL", key], capture_output=True)


def metrics_text(port):
    return requests.get(f"http://127.0.0.1:{port}/", timeout=5).text


def sample(text, series):
    """The value of the one sample named `series` (with its labels) in `text`, or None."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_error_codes_and_the_grpc_app_channel(sidecar_factory, app_factory):
    cfg = config_file("  metric:\n    recordErrorCodes: true\n")
    app = app_factory("grpc_app.py")
    s = sidecar_factory(app_id="codes", app_port=app.port, app_protocol="grpc", extra_args=["--config", cfg])
    s.wait_ready()
    # a pubsub that does not exist, over HTTP and over gRPC (the official SDK)
    r = requests.post(f"{s.http}/v1.0/publish/nope/orders", json={"a": 1})
    assert r.status_code == 404 and r.json()["errorCode"] == "ERR_PUBSUB_NOT_FOUND", r.text
    run_sdk(s, """
from dapr.clients import DaprClient
with DaprClient() as c:
    try:
        c.publish_event(pubsub_name='nope', topic_name='orders', data='x')
    except Exception:
        pass
    else:
        raise SystemExit('a publish to a missing pubsub was accepted')
""")
    codes = 'dapr_error_code_total{app_id="codes",category="pubsub",error_code="ERR_PUBSUB_NOT_FOUND"}'
    assert sample(metrics_text(s.metrics_port), codes) == 2

    # the gRPC app channel: OnTopicEvent calls with their status and message sizes
    for i in range(2):
        s.publish("orders", json.dumps({"n": i}))
    method = 'app_id="codes",grpc_client_method="/dapr.proto.runtime.v1.AppCallback/OnTopicEvent"'
    ok = f'dapr_grpc_io_client_completed_rpcs{{{method},grpc_client_status="OK"}}'
    text = eventually(lambda: (lambda t: t if sample(t, ok) == 2 else None)(metrics_text(s.metrics_port)),
                      15, "two OnTopicEvent calls counted")
    assert sample(text, f'dapr_grpc_io_client_roundtrip_latency_count{{{method},grpc_client_status="OK"}}') == 2
    # each request carries the CloudEvent's id, source, type, topic and data: well over 100 bytes
    assert sample(text, f'dapr_grpc_io_client_sent_bytes_per_rpc_sum{{{method}}}') > 2 * 100
    assert sample(text, f'dapr_grpc_io_client_received_bytes_per_rpc_count{{{method}}}') == 2

    # without recordErrorCodes nothing is counted
    plain = sidecar_factory(app_id="nocodes")
    assert requests.post(f"{plain.http}/v1.0/publish/nope/orders", json={}).status_code == 404
    text = metrics_text(plain.metrics_port)
    assert "dapr_http_server_request_count{" in text and "dapr_error_code_total{" not in text


def test_redeliveries_are_counted(sidecar_factory, app_factory):
    # Redis hands a message the app did not accept out again after processingTimeout
    topic = f"redeliver-{free_port()}"
    res = ("apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: redis}\n"
           "spec: {type: pubsub.redis, version: v1, metadata: [{name: redisHost, value: '127.0.0.1:6379'}, "
           "{name: redisDB, value: '9'}, {name: processingTimeout, value: 1s}, {name: redeliverInterval, value: 1s}]}\n")
    subs = json.dumps([{"pubsubname": "redis", "topic": topic, "route": "/orders"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    requests.post(f"http://127.0.0.1:{app.port}/_mode",
                  json={"/orders": {"status": 200, "body": '{"status":"RETRY"}'}}).raise_for_status()
    s = sidecar_factory([res], app_id="again", app_port=app.port)
    s.wait_ready()
    assert requests.post(f"{s.http}/v1.0/publish/redis/{topic}", json={"n": 1}).status_code == 204
    series = ('dapr_component_pubsub_ingress_redelivered_count{app_id="again",component="redis",'
              f'namespace="default",topic="{topic}"}}')
    retry = ('dapr_component_pubsub_ingress_count{app_id="again",component="redis",namespace="default",'
             f'process_status="retry",status="retry",topic="{topic}"}}')

    def redelivered_twice():
        text = metrics_text(s.metrics_port)
        return text if (sample(text, series) or 0) >= 2 else None
    text = eventually(redelivered_twice, 30, "two redeliveries counted")
    # every delivery but the first is a redelivery
    assert sample(text, series) in (sample(text, retry) - 1, sample(text, retry)), text
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/orders": {}}).raise_for_status()
    ok = retry.replace('process_status="retry",status="retry"', 'process_status="success",status="success"')
    eventually(lambda: sample(metrics_text(s.metrics_port), ok) == 1, 30, "accepted at last")


def test_metric_spec_rules_buckets_and_disabled(sidecar_factory):
    cfg = config_file(
        "  metric:\n"
        "    enabled: true\n"
        "    latencyDistributionBuckets: [5, 50]\n"
        "    rules:\n"
        "    - name: dapr_component_pubsub_egress_count\n"
        "      labels:\n"
        "      - name: topic\n"
        "        regex: {\"orders-*\": \"^orders-\"}\n")
    s = sidecar_factory(app_id="ruled", extra_args=["--config", cfg])
    for t in ("orders-1", "orders-2", "payments"):
        s.publish(t, "{}")
    text = metrics_text(s.metrics_port)
    assert 'dapr_component_pubsub_egress_count{app_id="ruled",component="pubsub",namespace="default",success="true",topic="orders-*"} 2' in text, text
    assert 'topic="payments"} 1' in text
    les = [line.split('le="')[1].split('"')[0] for line in text.splitlines()
           if line.startswith('dapr_component_pubsub_egress_latencies_bucket{') and 'topic="payments"' in line]
    assert les == ["5", "50", "+Inf"], les

    # spec.metric.enabled false: the port serves process_* only
    off = sidecar_factory(app_id="off", extra_args=["--config", config_file("  metric: {enabled: false}\n")])
    off.publish("orders", "{}")
    text = metrics_text(off.metrics_port)
    assert "process_resident_memory_bytes" in text and "dapr_" not in text, text


def test_enable_metrics_false_listens_nowhere_and_a_taken_port_is_fatal(tmp_path):
    (tmp_path / "c.yaml").write_text(pubsub_component("pubsub"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([str(DAPRD), "--app-id", "a", "--dapr-http-port", "0", "--dapr-grpc-port", "0",
                              "--resources-path", str(tmp_path), "--metrics-listen-address", "127.0.0.1",
                              "--metrics-port", str(port)], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port} for the metrics server" in out.stdout + out.stderr, out

    metrics_port = free_port()
    http_port = free_port()
    proc = subprocess.Popen([str(DAPRD), "--app-id", "a", "--dapr-http-port", str(http_port),
                             "--dapr-grpc-port", "0", "--resources-path", str(tmp_path),
                             "--metrics-port", str(metrics_port), "--enable-metrics=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def healthy():
            assert proc.poll() is None, "daprd exited"
            try:
                return requests.get(f"http://127.0.0.1:{http_port}/v1.0/healthz", timeout=1).status_code == 204
            except requests.RequestException:
                return False
        eventually(healthy, 20, "daprd healthy")
        with socket.socket() as c:
            assert c.connect_ex(("127.0.0.1", metrics_port)) != 0, "nothing listens on the metrics port"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
