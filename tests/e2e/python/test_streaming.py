"""Streaming subscriptions (SubscribeTopicEventsAlpha1) with the official Python SDK's
`DaprClient.subscribe`: works without an app port, several streams per topic, and a closed
stream leaves no phantom consumer behind (the Go daprd bug dapr/dapr#10228)."""

import json
import os
import subprocess
import sys

import pytest
import requests

from conftest import PUBSUB, eventually

STREAM_CLIENT = r"""
import json, sys, time
from dapr.clients import DaprClient
name, topic, count, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
with DaprClient() as c:
    sub = c.subscribe(pubsub_name='pubsub', topic=topic, dead_letter_topic='dlq.stream' if mode == 'drop' else None)
    print('subscribed', flush=True)
    got = 0
    later = set()
    while count == 0 or got < count:  # count 0: until data {"n": 1} .. {"n": 10} all came
        msg = sub.next_message()
        if msg is None:
            continue
        got += 1
        print(json.dumps({'id': msg.id(), 'data': msg.data(), 'topic': msg.topic(),
                          'pubsub': msg.pubsub_name(), 'type': msg.type(), 'source': msg.source()}), flush=True)
        if mode == 'drop':
            sub.respond_drop(msg)
        else:
            sub.respond_success(msg)
        if count == 0 and isinstance(msg.data(), dict) and msg.data().get('n', 0) > 0:
            later.add(msg.data()['n'])
            if len(later) == 10:
                break
    sub.close()
    print('closed', flush=True)
"""


def start_stream(sidecar, topic, count, mode="success"):
    env = dict(os.environ)
    env.update(sidecar.sdk_env())
    proc = subprocess.Popen([sys.executable, "-c", STREAM_CLIENT, "s", topic, str(count), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "subscribed", line + proc.stderr.read()
    return proc


def streaming_subs(sidecar, topic):
    md = requests.get(sidecar.http + "/v1.0/metadata").json()
    return [s for s in md.get("subscriptions", []) if s["topic"] == topic and s["type"] == "STREAMING"]


def test_two_streams_then_one_closed_leaves_no_phantom(sidecar):
    a = start_stream(sidecar, "live", 1)
    b = start_stream(sidecar, "live", 0)
    eventually(lambda: len(streaming_subs(sidecar, "live")) == 2, 10, "two streaming subscriptions")
    # Both streams are subscribed: with a consumer-group broker (Redis, RabbitMQ) they compete,
    # otherwise both get every message. Publish n=0 until stream A has had one and closed.
    def a_done():
        if a.poll() is None:
            sidecar.publish("live", json.dumps({"n": 0}))
            return False
        return True
    eventually(a_done, 20, "stream A to receive a message and close")
    out_a, _ = a.communicate(timeout=20)
    first = json.loads(out_a.splitlines()[0])  # "subscribed" was already read
    assert first["data"] == {"n": 0} and first["topic"] == "live" and first["pubsub"] == "pubsub"
    assert first["source"] == "checkout" and first["type"] == "com.dapr.event.sent"
    assert out_a.splitlines()[-1] == "closed"
    # stream A is gone: its broker subscription must be gone with it
    eventually(lambda: len(streaming_subs(sidecar, "live")) == 1, 10, "the closed stream to unsubscribe")
    for n in range(1, 11):
        sidecar.publish("live", json.dumps({"n": n}))
    out_b, err_b = b.communicate(timeout=30)
    got = [json.loads(line)["data"]["n"] for line in out_b.splitlines()[:-1]]
    # every later message reaches B once (order is the broker's: RabbitMQ's default
    # concurrencyMode "parallel" may deliver 2 before 1)
    after = sorted(n for n in got if n > 0)
    assert after == list(range(1, 11)), (got, err_b)
    # besides them only n=0 (those stream A had in hand when it closed come back, in any order)
    assert all(n == 0 for n in got if n not in after), got


def test_stream_drop_goes_to_dead_letter_topic(sidecar):
    dlq = start_stream(sidecar, "dlq.stream", 1)
    src = start_stream(sidecar, "stream-src", 1, mode="drop")
    eventually(lambda: streaming_subs(sidecar, "dlq.stream") and streaming_subs(sidecar, "stream-src"), 10, "streams")
    sidecar.publish("stream-src", json.dumps({"poison": True}))
    src.communicate(timeout=20)
    out, _ = dlq.communicate(timeout=20)
    assert json.loads(out.splitlines()[0])["data"] == {"poison": True}


def test_stream_errors(sidecar):
    code = r"""
from dapr.clients import DaprClient
with DaprClient() as c:
    try:
        sub = c.subscribe(pubsub_name='nope', topic='t')
        sub.next_message()
        print('no error')
    except Exception as e:
        print(type(e).__name__, str(e)[:300])
"""
    env = dict(os.environ)
    env.update(sidecar.sdk_env())
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "pubsub nope is not found" in out.stdout, out.stdout + out.stderr


def test_grpc_unimplemented_on_topic_event_is_handled_without_dead_letter(sidecar_factory, app_factory):
    app = app_factory("grpc_unimplemented_app.py")
    s = sidecar_factory(app_port=app.port, app_protocol="grpc")
    s.wait_ready()
    dlq = start_stream(s, "dlq.all", 1)
    eventually(lambda: streaming_subs(s, "dlq.all"), 10, "dlq observer stream")
    s.publish("orders", json.dumps({"n": 1}))
    eventually(lambda: "app does not implement OnTopicEvent" in s.output(), 10, "the UNIMPLEMENTED answer")
    # and nothing went to the dead-letter topic: a marker published there arrives first
    s.publish("dlq.all", json.dumps({"marker": True}))
    out, _ = dlq.communicate(timeout=20)
    assert json.loads(out.splitlines()[0])["data"] == {"marker": True}


def test_grpc_app_channel_sends_app_api_token_and_trace(sidecar_factory, app_factory):
    app = app_factory("grpc_token_app.py")
    s = sidecar_factory(app_port=app.port, app_protocol="grpc", env={"APP_API_TOKEN": "grpc-secret"})
    s.wait_ready()
    s.publish("orders", json.dumps({"n": 1}))
    lines = eventually(lambda: [x for x in app.lines() if x["call"] == "event"], 10, "delivery to the gRPC app")
    assert lines[0]["token"] == "grpc-secret" and lines[0]["topic"] == "orders"
    assert lines[0]["traceparent"].startswith("00-")
    assert [x["token"] for x in app.lines() if x["call"] == "list"] == ["grpc-secret"], "discovery carries it too"
