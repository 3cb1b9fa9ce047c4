"""Delivery to apps through daprd-rs: a plain HTTP app, the Python SDK's gRPC `App` and
FastAPI `DaprApp`, with the pub/sub under test (in-memory, or a broker: DAPRD_E2E_PUBSUB).
Outcomes are observed through the dead-letter topic: with one configured, a message the app
did not accept goes there and is acked, whatever the broker."""

import json
import time

import pytest
import requests

from conftest import PUBSUB, eventually, pubsub_component

SUBS = json.dumps([
    {"pubsubname": "pubsub", "topic": "orders", "route": "/orders"},
    {"pubsubname": "pubsub", "topic": "routed", "routes": {
        "rules": [{"match": 'event.type == "widget" && event.data.price > 100', "path": "/expensive"},
                  {"match": "has(event.data.orderId)", "path": "/with-order"}],
        "default": "/routed-default"}},
    {"pubsubname": "pubsub", "topic": "raw", "route": "/raw", "metadata": {"rawPayload": "true"}},
    {"pubsubname": "pubsub", "topic": "dlq.all", "route": "/dlq"},
] + [{"pubsubname": "pubsub", "topic": f"outcome-{i}", "route": f"/outcome-{i}", "deadLetterTopic": "dlq.all"}
     for i in range(8)])


def received(app_port, path=None):
    got = requests.get(f"http://127.0.0.1:{app_port}/_received", timeout=5).json()
    return [r for r in got if path is None or r["path"] == path]


def test_plain_http_app_gets_the_exact_cloudevent(sidecar_factory, app_factory):
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": SUBS})
    s = sidecar_factory(app_port=app.port)
    s.wait_ready()
    r = requests.post(s.http + "/v1.0/publish/pubsub/orders", json={"orderId": 7},
                      headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    assert r.status_code == 204
    got = eventually(lambda: received(app.port, "/orders"), 10, "delivery to /orders")
    req = got[0]
    headers = {k.lower(): v for k, v in req["headers"].items()}
    assert headers["content-type"] == "application/cloudevents+json"
    assert headers["pubsubname"] == "pubsub"
    assert headers["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    ce = json.loads(req["body"])
    assert ce["data"] == {"orderId": 7}
    assert ce["datacontenttype"] == "application/json"
    assert ce["source"] == "checkout" and ce["type"] == "com.dapr.event.sent"
    assert ce["topic"] == "orders" and ce["pubsubname"] == "pubsub" and ce["specversion"] == "1.0"
    assert ce["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    # the body is the published bytes, not a re-serialisation: same id as in the envelope
    assert len(ce["id"]) == 36

    md = requests.get(s.http + "/v1.0/metadata").json()
    subs = {x["topic"]: x for x in md["subscriptions"]}
    assert subs["orders"]["type"] == "PROGRAMMATIC"
    assert subs["orders"]["rules"] == [{"path": "/orders"}]
    assert subs["routed"]["rules"][0]["match"].startswith("event.type")
    assert subs["outcome-0"]["deadLetterTopic"] == "dlq.all"
    assert md["appConnectionProperties"]["port"] == app.port


def test_every_http_outcome_row(sidecar_factory, app_factory):
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": SUBS})
    s = sidecar_factory(app_port=app.port)
    s.wait_ready()
    rows = [  # (status, body, goes to the dead-letter topic?)
        (200, "", False),
        (200, '{"status":"SUCCESS"}', False),
        (200, '{"status":""}', False),
        (200, '{"status":"RETRY"}', True),
        (200, '{"status":"DROP"}', True),
        (200, '{"status":"success"}', True),   # lowercase is an unknown status → retry
        (404, "", True),                        # since v1.17: DROP path, DLT
        (500, '{"status":"SUCCESS"}', True),    # non-2xx bodies are ignored → retry
    ]
    modes = {f"/outcome-{i}": {"status": st, "body": body} for i, (st, body, _) in enumerate(rows)}
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json=modes).raise_for_status()
    for i in range(len(rows)):
        s.publish(f"outcome-{i}", json.dumps({"row": i}))
    eventually(lambda: len([r for r in received(app.port) if r["path"].startswith("/outcome-")]) == len(rows),
               10, "every outcome row delivered")
    expected = sorted(i for i, (_, _, dlt) in enumerate(rows) if dlt)
    def dead_rows():
        got = sorted(json.loads(r["body"])["data"]["row"] for r in received(app.port, "/dlq"))
        return got if got == expected else None
    eventually(dead_rows, 10, f"dead-lettered rows {expected}")


def test_cel_routing_and_raw_payloads(sidecar_factory, app_factory):
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": SUBS})
    s = sidecar_factory(app_port=app.port)
    s.wait_ready()
    s.publish("routed", json.dumps({"price": 150}), **{"cloudevent.type": "widget"})
    s.publish("routed", json.dumps({"orderId": 1, "price": 5}), **{"cloudevent.type": "widget"})
    s.publish("routed", json.dumps({"x": 1}))
    for path in ("/expensive", "/with-order", "/routed-default"):
        eventually(lambda: received(app.port, path), 10, f"delivery to {path}")
    s.publish("raw", "plain bytes", content_type="text/plain", rawPayload="true")
    got = eventually(lambda: received(app.port, "/raw"), 10, "raw delivery")
    ce = json.loads(got[0]["body"])
    assert ce["data_base64"] == "cGxhaW4gYnl0ZXM="
    assert ce["datacontenttype"] == "application/octet-stream"
    assert ce["source"] == "Dapr" and ce["topic"] == "raw"
    assert got[0]["headers"]["Content-Type"] == "application/cloudevents+json"


def test_declarative_subscriptions_with_scopes(sidecar_factory, app_factory):
    app = app_factory("http_app.py")  # no GET /dapr/subscribe (404)
    decl = """apiVersion: dapr.io/v2alpha1
kind: Subscription
metadata: {name: mine}
spec:
  pubsubname: pubsub
  topic: decl
  routes: {default: /decl}
scopes: [checkout]
---
apiVersion: dapr.io/v1alpha1
kind: Subscription
metadata: {name: theirs}
spec: {pubsubname: pubsub, topic: other, route: /other}
scopes: [someone-else]
"""
    s = sidecar_factory([pubsub_component("pubsub"), decl], app_port=app.port)
    s.wait_ready()
    s.publish("decl", '{"a":1}')
    s.publish("other", '{"a":2}')
    eventually(lambda: received(app.port, "/decl"), 10, "declarative delivery")
    md = requests.get(s.http + "/v1.0/metadata").json()
    assert [(x["topic"], x["type"]) for x in md["subscriptions"]] == [("decl", "DECLARATIVE")]
    assert received(app.port, "/other") == []


def test_subscription_scoping_blocks_topics(sidecar_factory, app_factory):
    subs = json.dumps([{"pubsubname": "scoped", "topic": "allowed", "route": "/allowed"},
                       {"pubsubname": "scoped", "topic": "denied", "route": "/denied"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory([pubsub_component("scoped", subscriptionScopes="checkout=allowed")], app_port=app.port)
    s.wait_ready()
    md = requests.get(s.http + "/v1.0/metadata").json()
    assert [x["topic"] for x in md["subscriptions"]] == ["allowed"]
    assert "subscription to topic 'denied' on pubsub 'scoped' is not allowed" in s.output()


def test_python_sdk_grpc_app(sidecar_factory, app_factory):
    app = app_factory("grpc_app.py")
    s = sidecar_factory(app_port=app.port, app_protocol="grpc")
    s.wait_ready()
    s.publish("orders", json.dumps({"orderId": 3}))
    s.publish("flaky", json.dumps({"n": "flaky"}))
    s.publish("bad", json.dumps({"n": "bad"}))
    s.publish("orders", "hello", content_type="text/plain")
    def routes():
        lines = app.lines()
        return lines if len([x for x in lines if x["route"] == "dlq.all"]) == 2 and len(lines) >= 6 else None
    lines = eventually(routes, 15, "gRPC app deliveries and dead letters")
    orders = [x for x in lines if x["route"] == "orders"]
    assert len(orders) == 2, orders
    # in either order: without ordering keys a broker such as Pub/Sub or SQS promises none
    hello, json_order = sorted(orders, key=lambda x: x.get("content_type") != "text/plain")
    order = json_order["data"]
    assert (json.loads(order) if isinstance(order, str) else order) == {"orderId": 3}
    assert json_order["source"] == "checkout" and json_order["type"] == "com.dapr.event.sent"
    assert json_order["topic"] == "orders" and json_order["pubsubname"] == "pubsub"
    assert hello["data"] == "hello" and hello["content_type"] == "text/plain"
    dead = sorted(json.dumps(x["data"]) for x in lines if x["route"] == "dlq.all")
    assert len(dead) == 2
    md = requests.get(s.http + "/v1.0/metadata").json()
    topics = {x["topic"]: x for x in md["subscriptions"]}
    assert topics["flaky"]["deadLetterTopic"] == "dlq.all" and topics["flaky"]["type"] == "PROGRAMMATIC"


def test_python_sdk_fastapi_app(sidecar_factory, app_factory):
    app = app_factory("fastapi_app.py")
    s = sidecar_factory(app_port=app.port)
    s.wait_ready()
    s.publish("orders", json.dumps({"orderId": 9}))
    s.publish("fastapi-dead", json.dumps({"n": 1}))
    lines = eventually(lambda: app.lines() if len(app.lines()) >= 3 else None, 15, "FastAPI deliveries")
    by_route = {x["route"]: x["event"] for x in lines}
    assert by_route["orders"]["data"] == {"orderId": 9}
    assert by_route["orders"]["topic"] == "orders"
    assert by_route["dlq.fastapi"]["data"] == {"n": 1}, "DROP goes to the dead-letter topic"


def test_sigterm_lets_in_flight_deliveries_finish(sidecar_factory, app_factory):
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "slow", "route": "/slow"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory(app_port=app.port)
    s.wait_ready()
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/slow": {"sleep": 1.5}}).raise_for_status()
    s.publish("slow", '{"n":1}')
    eventually(lambda: requests.get(f"http://127.0.0.1:{app.port}/_started").json(), 10, "delivery to start")
    s.proc.terminate()
    assert s.proc.wait(timeout=15) == 0
    exited_at = time.time()
    done = received(app.port, "/slow")
    assert len(done) == 1, "the in-flight delivery completed before daprd exited"
    assert done[0]["done"] <= exited_at
    assert "daprd shutdown complete" in s.output()
    assert "still in flight" not in s.output()


def test_app_api_token_and_max_concurrency(sidecar_factory, app_factory):
    # Two subscriptions: the in-memory component delivers to each on its own, so only
    # --app-max-concurrency 1 keeps their slow deliveries from overlapping.
    subs = json.dumps([{"pubsubname": "pubsub", "topic": t, "route": f"/{t}"} for t in ("conc-a", "conc-b")])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory(app_port=app.port, env={"APP_API_TOKEN": "app-secret"},
                        extra_args=("--app-max-concurrency", "1"))
    s.wait_ready()
    requests.post(f"http://127.0.0.1:{app.port}/_mode",
                  json={"/conc-a": {"sleep": 0.4}, "/conc-b": {"sleep": 0.4}}).raise_for_status()
    s.publish("conc-a", '{"i":1}')
    s.publish("conc-b", '{"i":2}')
    got = eventually(lambda: len(received(app.port)) == 2 and received(app.port), 10, "2 deliveries")
    assert all(r["headers"].get("Dapr-Api-Token") == "app-secret" for r in got), got[0]["headers"]
    started = sorted(x["at"] for x in requests.get(f"http://127.0.0.1:{app.port}/_started").json())
    assert started[1] - started[0] >= 0.35, f"deliveries overlapped: {started}"


RESILIENCY = """apiVersion: dapr.io/v1alpha1
kind: Resiliency
metadata: {name: myresiliency}
spec:
  policies:
    retries:
      threeTimes: {policy: constant, duration: 50ms, maxRetries: 3}
      only503: {policy: constant, duration: 10ms, maxRetries: 5, matching: {httpStatusCodes: "503"}}
  targets:
    components:
      pubsub:
        inbound: {retry: threeTimes}
      strict:
        inbound: {retry: only503}
"""


def test_inbound_retries_follow_the_resiliency_policy(sidecar_factory, app_factory):
    subs = json.dumps([
        {"pubsubname": "pubsub", "topic": "r-ok", "route": "/r-ok", "deadLetterTopic": "dlq.all"},
        {"pubsubname": "pubsub", "topic": "r-never", "route": "/r-never", "deadLetterTopic": "dlq.all"},
        {"pubsubname": "strict", "topic": "r-404", "route": "/r-404", "deadLetterTopic": "dlq.strict"},
        {"pubsubname": "strict", "topic": "r-503", "route": "/r-503", "deadLetterTopic": "dlq.strict"},
        # one dead-letter topic per component: on a real broker both components share it
        {"pubsubname": "pubsub", "topic": "dlq.all", "route": "/dlq"},
        {"pubsubname": "strict", "topic": "dlq.strict", "route": "/dlq-strict"},
    ])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory([pubsub_component("pubsub"), pubsub_component("strict"), RESILIENCY], app_port=app.port)
    s.wait_ready()
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={
        "/r-ok": {"status": 200, "body": '{"status":"RETRY"}', "fail_first": 2},
        "/r-never": {"status": 500},
        "/r-404": {"status": 400, "fail_first": 1},
        "/r-503": {"status": 503, "fail_first": 2},
    }).raise_for_status()
    for t, ps in (("r-ok", "pubsub"), ("r-never", "pubsub"), ("r-404", "strict"), ("r-503", "strict")):
        s.publish(t, '{"t":"%s"}' % t, pubsub=ps)
    counts = lambda path: len(received(app.port, path))
    eventually(lambda: counts("/r-never") == 4 and counts("/dlq") == 1, 10, "4 attempts then the DLT")
    # each topic has its own broker subscription (on Kafka its own group member): they run
    # side by side, so wait for each rather than assume one finished before another
    eventually(lambda: counts("/r-ok") == 3, 10, "2 RETRY answers, then success on the 3rd attempt")
    eventually(lambda: counts("/r-503") == 3, 10, "503 matches the policy: retried until it succeeds")
    eventually(lambda: counts("/dlq-strict") == 1, 10, "400 is not in matching: no retry, straight to the DLT")
    assert counts("/r-404") == 1
    assert (counts("/r-ok"), counts("/r-503"), counts("/r-never")) == (3, 3, 4), "no extra attempts"
    dead = [json.loads(r["body"])["data"]["t"] for r in received(app.port, "/dlq") + received(app.port, "/dlq-strict")]
    assert sorted(dead) == ["r-404", "r-never"]


def test_bulk_subscribe_over_http(sidecar_factory, app_factory):
    subs = json.dumps([
        {"pubsubname": "pubsub", "topic": "bulk", "route": "/bulk", "deadLetterTopic": "dlq.all",
         "bulkSubscribe": {"enabled": True, "maxMessagesCount": 10, "maxAwaitDurationMs": 100}},
        {"pubsubname": "pubsub", "topic": "dlq.all", "route": "/dlq"},
    ])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory(app_port=app.port)
    s.wait_ready()
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/bulk": {"bulk": True}}).raise_for_status()
    for st in ("SUCCESS", "DROP", "RETRY", "MAYBE"):
        s.publish("bulk", json.dumps({"status": st}))
    eventually(lambda: len(received(app.port, "/dlq")) == 3, 10, "DROP, RETRY and unknown entries dead-lettered")
    dead = sorted(json.loads(r["body"])["data"]["status"] for r in received(app.port, "/dlq"))
    assert dead == ["DROP", "MAYBE", "RETRY"]
    req = received(app.port, "/bulk")[0]
    assert req["headers"]["Content-Type"] == "application/json"
    body = json.loads(req["body"])
    assert body["type"] == "com.dapr.event.sent.bulk"
    assert body["topic"] == "bulk" and body["pubsubname"] == "pubsub"
    assert body["metadata"]["pubsubName"] == "pubsub"
    entry = body["entries"][0]
    assert entry["contentType"] == "application/cloudevents+json"
    assert entry["event"]["topic"] == "bulk" and entry["event"]["source"] == "checkout"
    assert len(entry["entryId"]) == 36
    md = requests.get(s.http + "/v1.0/metadata").json()
    assert {x["topic"] for x in md["subscriptions"]} == {"bulk", "dlq.all"}



def test_bulk_entries_the_app_asks_to_retry_are_retried_per_policy(sidecar_factory, app_factory):
    subs = json.dumps([
        {"pubsubname": "pubsub", "topic": "bulk-r", "route": "/bulk-r", "deadLetterTopic": "dlq.all",
         "bulkSubscribe": {"enabled": True, "maxMessagesCount": 10, "maxAwaitDurationMs": 500}},
        {"pubsubname": "pubsub", "topic": "dlq.all", "route": "/dlq"},
    ])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory([pubsub_component("pubsub"), RESILIENCY], app_port=app.port)
    s.wait_ready()
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/bulk-r": {"bulk": True}}).raise_for_status()
    for st in ("SUCCESS", "RETRY", "DROP"):
        s.publish("bulk-r", json.dumps({"status": st}))
    # threeTimes: 1 attempt + 3 retries of the RETRY entry, then its dead letter
    eventually(lambda: len(received(app.port, "/dlq")) == 2, 10, "RETRY (after its retries) and DROP dead-lettered")
    sent = [e["event"]["data"]["status"] for r in received(app.port, "/bulk-r")
            for e in json.loads(r["body"])["entries"]]
    assert sorted(sent) == ["DROP"] + ["RETRY"] * 4 + ["SUCCESS"], f"only RETRY is sent again: {sent}"
    dead = sorted(json.loads(r["body"])["data"]["status"] for r in received(app.port, "/dlq"))
    assert dead == ["DROP", "RETRY"]


def test_subscriptions_follow_app_health(sidecar_factory, app_factory):
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "health", "route": "/h"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs, "HEALTHY": "0"})
    s = sidecar_factory(app_port=app.port, extra_args=(
        "--enable-app-health-check", "--app-health-probe-interval", "1", "--app-health-threshold", "1"))
    app_url = f"http://127.0.0.1:{app.port}"
    subs_now = lambda: requests.get(s.http + "/v1.0/metadata").json().get("subscriptions", [])
    assert requests.get(s.http + "/v1.0/healthz").status_code == 500, "not ready while the app is unhealthy"
    assert subs_now() == []
    requests.post(app_url + "/_health", json={"healthy": True}).raise_for_status()
    s.wait_ready()
    eventually(lambda: len(subs_now()) == 1, 10, "subscription started once healthy")
    s.publish("health", '{"n":1}')
    eventually(lambda: len(received(app.port, "/h")) == 1, 10, "delivery while healthy")
    requests.post(app_url + "/_health", json={"healthy": False}).raise_for_status()
    eventually(lambda: subs_now() == [], 10, "subscriptions stopped while unhealthy")
    s.publish("health", '{"n":2}')
    requests.post(app_url + "/_health", json={"healthy": True}).raise_for_status()
    eventually(lambda: len(subs_now()) == 1, 10, "subscriptions back once healthy")
    s.publish("health", '{"n":3}')
    # What happens to n=2, published while unsubscribed, is the broker's semantics: the Redis
    # consumer group outlives the subscription (kept), a new JetStream consumer with the
    # default deliverPolicy "all" replays the stream, while the in-memory bus and the
    # auto-deleted RabbitMQ queue (deletedWhenUnused) do not keep it. The Kafka group resumes
    # from its committed offset and the SQS queue stays subscribed to the SNS topic: both keep
    # it. MQTT (cleanSession false, so the topic stays subscribed) keeps it too: the message
    # that arrives while no subscription wants it is held unacknowledged and handed to the
    # subscription that comes back. A durable Pulsar subscription keeps its cursor without
    # consumers: it keeps it too, as does a GCP subscription (it lives on the server, and the
    # stream that stopped ended the orderly way, handing back what it held). A Service Bus
    # subscription or queue is an entity of its own on the server: it keeps it too. An event
    # hub keeps every event and the consumer group resumes after its checkpoint: kept, and
    # its four partitions may hand 2 and 3 over in either order.
    expected = {"redis": [1, 2, 3], "jetstream": [1, 1, 2, 3], "kafka": [1, 2, 3],
                "aws.snssqs": [1, 2, 3], "mqtt3": [1, 2, 3], "pulsar": [1, 2, 3],
                "gcp.pubsub": [1, 2, 3], "azure.servicebus.topics": [1, 2, 3],
                "azure.servicebus.queues": [1, 2, 3], "azure.eventhubs": [1, 2, 3]}.get(PUBSUB, [1, 3])
    numbers = lambda: [json.loads(r["body"])["data"]["n"] for r in received(app.port, "/h")]
    if PUBSUB in ("aws.snssqs", "pulsar", "gcp.pubsub", "azure.servicebus.topics",
                  "azure.servicebus.queues", "azure.eventhubs"):
        # a standard SQS queue promises no order: 2 and 3 may come in one receive, in parallel
        # (as Pulsar's async processMode, a GCP streaming pull and a Service Bus receiver's
        # credit hand 2 and 3 to the app at once)
        unordered = numbers
        numbers = lambda: sorted(unordered())
    eventually(lambda: numbers() == expected, 10, f"deliveries {expected} after recovery")


def test_block_shutdown_keeps_publishing_up_and_stops_subscriptions(sidecar_factory, app_factory):
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "blocked", "route": "/b"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory(app_port=app.port, extra_args=("--dapr-block-shutdown-duration", "2s"))
    s.wait_ready()
    started = time.monotonic()
    s.proc.terminate()
    eventually(lambda: "blocking shutdown" in s.output(), 10, "the shutdown block to begin")
    r = requests.post(s.http + "/v1.0/publish/pubsub/blocked", data='{"n":1}', headers={"content-type": "application/json"})
    assert r.status_code == 204, "outbound APIs stay up during the block"
    assert s.proc.wait(timeout=15) == 0
    assert time.monotonic() - started >= 1.9, "the block lasted the configured duration"
    assert received(app.port, "/b") == [], "subscriptions stopped at once"


HEALTH_CHECKED = ("--enable-app-health-check", "--app-health-probe-interval", "1",
                  "--app-health-threshold", "1")


def test_https_and_grpcs_app_channels(sidecar_factory, app_factory, self_signed_cert):
    # With app health checks on: the probes go over TLS as the deliveries do, so the
    # subscriptions start (a plain-text probe would keep the app unhealthy and them stopped).
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "orders", "route": "/orders"}])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs, **self_signed_cert})
    s = sidecar_factory(app_port=app.port, app_protocol="https", extra_args=HEALTH_CHECKED)
    s.wait_ready()
    s.publish("orders", '{"tls":"https"}')
    def tls_received():
        got = requests.get(f"https://127.0.0.1:{app.port}/_received", verify=False, timeout=5).json()
        return [json.loads(r["body"])["data"] for r in got if r["path"] == "/orders"]
    assert eventually(tls_received, 10, "delivery over https") == [{"tls": "https"}]

    if PUBSUB == "azure.servicebus.queues":
        # a queue has one set of receivers whatever the app id: the first sidecar, still
        # running, would compete for the second one's message
        s.proc.terminate()
        assert s.proc.wait(timeout=15) == 0
    gapp = app_factory("grpc_app.py", env=self_signed_cert)
    # another app id: with a consumer-group broker the same id would share the first's group
    g = sidecar_factory(app_id="checkout-grpcs", app_port=gapp.port, app_protocol="grpcs",
                        extra_args=HEALTH_CHECKED)
    g.wait_ready()
    g.publish("orders", '{"tls":"grpcs"}')
    lines = eventually(lambda: gapp.lines(), 10, "delivery over grpcs")
    assert lines[0]["route"] == "orders"


def test_expired_and_undecodable_messages_go_to_the_dead_letter_topic(sidecar_factory, app_factory):
    subs = json.dumps([
        {"pubsubname": "pubsub", "topic": "expiring", "route": "/x", "deadLetterTopic": "dlq.all"},
        {"pubsubname": "pubsub", "topic": "dlq.all", "route": "/dlq", "metadata": {"rawPayload": "true"}},
    ])
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory(app_port=app.port)
    s.wait_ready()
    expired = {"id": "old-1", "source": "s", "type": "t", "specversion": "1.0", "datacontenttype": "application/json",
               "data": {"n": "expired"}, "expiration": "2020-01-01T00:00:00Z"}
    s.publish("expiring", json.dumps(expired), content_type="application/cloudevents+json")
    s.publish("expiring", "not a cloudevent", content_type="text/plain", rawPayload="true")
    got = eventually(lambda: len(received(app.port, "/dlq")) == 2 and received(app.port, "/dlq"), 10, "both dead-lettered")
    import base64
    payloads = sorted(base64.b64decode(json.loads(r["body"])["data_base64"]) for r in got)
    assert payloads[0] == b"not a cloudevent"
    assert json.loads(payloads[1])["id"] == "old-1", "the original bytes are republished"
    assert received(app.port, "/x") == [], "neither reached the app"


def test_disable_init_endpoints_subscribe(sidecar_factory, app_factory):
    subs = json.dumps([{"pubsubname": "pubsub", "topic": "prog", "route": "/prog"}])
    decl = "apiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata: {name: d}\nspec: {pubsubname: pubsub, topic: decl, routes: {default: /decl}}\n"
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    s = sidecar_factory([pubsub_component("pubsub"), decl], app_port=app.port, extra_args=("--disable-init-endpoints", "subscribe"))
    s.wait_ready()
    md = requests.get(s.http + "/v1.0/metadata").json()
    assert [x["topic"] for x in md["subscriptions"]] == ["decl"]

