"""Outbound resiliency: a publish to a broker that is down is retried per the policy, then
fails with ERR_PUBSUB_PUBLISH_MESSAGE; publishing works again once the broker is back."""

import subprocess
import tempfile

import requests

from conftest import eventually, free_port

RESILIENCY = """apiVersion: dapr.io/v1alpha1
kind: Resiliency
metadata: {name: outbound}
spec:
  policies:
    retries:
      threeTimes: {policy: constant, duration: 100ms, maxRetries: 3}
  targets:
    components:
      pubsub:
        outbound: {retry: threeTimes}
"""


def redis_component(port):
    return f"""apiVersion: dapr.io/v1alpha1
kind: Component
metadata: {{name: pubsub}}
spec:
  type: pubsub.redis
  version: v1
  metadata:
  - {{name: redisHost, value: "127.0.0.1:{port}"}}
  - {{name: dialTimeout, value: "1s"}}
  - {{name: writeTimeout, value: "1s"}}
"""


def start_redis(port, workdir):
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    eventually(lambda: subprocess.run(["redis-cli", "-p", str(port), "PING"], capture_output=True, text=True).stdout.strip() == "PONG",
               10, "private redis")
    return proc


def test_publish_retries_per_outbound_policy(sidecar_factory):
    port = free_port()
    work = tempfile.TemporaryDirectory()
    redis = start_redis(port, work.name)
    try:
        s = sidecar_factory([redis_component(port), RESILIENCY])
        s.publish("orders", '{"n":1}')
        redis.terminate()
        redis.wait(timeout=10)
        before = s.output().count("operation failed; retrying")
        r = requests.post(s.http + "/v1.0/publish/pubsub/orders", data='{"n":2}', headers={"content-type": "application/json"})
        assert r.status_code == 500 and r.json()["errorCode"] == "ERR_PUBSUB_PUBLISH_MESSAGE", r.text
        assert s.output().count("operation failed; retrying") - before == 3, "3 retries after the first attempt"
        redis = start_redis(port, work.name)
        eventually(lambda: requests.post(s.http + "/v1.0/publish/pubsub/orders", data="{}",
                                         headers={"content-type": "application/json"}).status_code == 204,
                   20, "publishing to recover once the broker is back")
    finally:
        redis.terminate()
        redis.wait(timeout=10)
        work.cleanup()
