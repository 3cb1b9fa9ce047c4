"""The fault suite: the same scenarios against every component with a broker (Redis,
RabbitMQ, MQTT, JetStream, Kafka, SNS/SQS), counting with a sequence number in every
message. *lost* = published with a 2xx and never delivered to the app; *dup* = deliveries
beyond the first.

- subscriber sidecar SIGTERM mid-stream, repeated, with a CPU hog running: lost 0, dup 0,
  nothing on the dead-letter topic, exit code 0;
- subscriber sidecar SIGKILL, restarted after 2 s: lost 0, dup within the in-flight window;
- publisher sidecar SIGTERM at full speed: every message answered 2xx reaches the app.

Each test has its own topic and consumer group on the shared brokers (a private tansu for
Kafka); the durable settings a production user would choose are set (RabbitMQ durable queues
that outlive their consumer, MQTT persistent sessions, JetStream durable consumers). The
README's delivery guarantees table quotes what this suite measures."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests

from conftest import SNSSQS_ENDPOINT, eventually, start_tansu

BROKERS = ["redis", "rabbitmq", "mqtt3", "jetstream", "kafka", "aws.snssqs"]
# SIGTERMs per run of the graceful test (the 20 is FAULT_SIGTERMS=20)
SIGTERMS = int(os.environ.get("FAULT_SIGTERMS", "4"))
# Most deliveries a SIGKILL may repeat: what the app had in hand, unacknowledged
INFLIGHT_WINDOW = 32


class Broker:
    """Component metadata with durable, per-test names for one broker kind."""

    def __init__(self, kind):
        self.kind = kind
        self.tag = uuid.uuid4().hex[:10]
        self.topic = f"fault{self.tag}"
        self.dlt = f"dlq{self.tag}"
        self.tansu = start_tansu() if kind == "kafka" else None
        self.stream = None
        if kind == "jetstream":
            self.stream = "fault-" + self.tag

            async def create(js):
                # file storage (JetStream's default) keeps acknowledged data
                await js.add_stream(name=self.stream, subjects=[self.topic, self.dlt],
                                    max_age=600)
            _nats(create)

    def component(self, role):
        """`role` ("pub" or "sub") keeps client ids apart where the broker needs that."""
        group = f"g{self.tag}"
        meta = {
            "redis": {"redisHost": "localhost:6379", "consumerID": group,
                      "processingTimeout": "2s", "redeliverInterval": "500ms"},
            "rabbitmq": {"connectionString": "amqp://guest:guest@localhost:5672",
                         "consumerID": group, "durable": "true", "deletedWhenUnused": "false"},
            # the client id is the session: the same one after a restart, cleanSession false
            "mqtt3": {"url": "tcp://localhost:1883", "consumerID": f"{group}-{role}",
                      "qos": "1", "cleanSession": "false"},
            "jetstream": {"natsURL": "nats://localhost:4222", "durableName": group,
                          "queueGroupName": group, "ackWait": "2s"},
            "kafka": {"brokers": f"127.0.0.1:{self.tansu.port}" if self.tansu else "",
                      "authType": "none", "consumerGroup": group, "initialOffset": "oldest",
                      "autoCreateTopics": "true", "autoCreateTopicPartitions": "1"},
            "aws.snssqs": {"endpoint": SNSSQS_ENDPOINT, "region": "us-east-1",
                           "accessKey": "test", "secretKey": "test", "consumerID": group,
                           "messageVisibilityTimeout": "2"},
        }[self.kind]
        items = "[" + ", ".join(f'{{name: {k}, value: "{v}"}}' for k, v in meta.items()) + "]"
        return (f"apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: pubsub\n"
                f"spec:\n  type: pubsub.{self.kind}\n  version: v1\n  metadata: {items}\n")

    def subscriptions(self):
        subs = [{"pubsubname": "pubsub", "topic": self.topic, "route": "/t",
                 "deadLetterTopic": self.dlt}]
        if self.kind != "jetstream":
            # A JetStream durable consumer serves one subject: the dead-letter subject is
            # counted in the stream instead (dead_letters).
            subs.append({"pubsubname": "pubsub", "topic": self.dlt, "route": "/dlt"})
        return json.dumps(subs)

    def dead_letters(self, app_port):
        """How many messages went to the dead-letter topic."""
        if self.kind != "jetstream":
            return len(seqs(app_port, "/dlt"))
        count = {}

        async def read(js):
            info = await js.stream_info(self.stream, subjects_filter=self.dlt)
            count["n"] = sum((info.state.subjects or {}).values())
        _nats(read)
        return count["n"]

    def cleanup(self):
        if self.tansu:
            self.tansu.stop()
        if self.stream:
            async def delete(js):
                await js.delete_stream(self.stream)
            _nats(delete)


def _nats(action):
    import nats

    async def run():
        nc = await nats.connect("nats://localhost:4222")
        try:
            await action(nc.jetstream())
        finally:
            await nc.close()
    asyncio.run(run())


@pytest.fixture(params=BROKERS)
def broker(request):
    b = Broker(request.param)
    yield b
    b.cleanup()


class Publisher:
    """Publishes seq 0..n-1 through a sidecar from `threads` threads; records the 2xx ones."""

    def __init__(self, sidecar, topic, n, threads=1, rate=None):
        self.ok = set()
        self.failed = 0
        self.halt = False
        self.lock = threading.Lock()
        self.next = 0
        self.n = n
        self.url = f"{sidecar.http}/v1.0/publish/pubsub/{topic}"
        self.rate = rate
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def take(self):
        with self.lock:
            if self.next >= self.n:
                return None
            self.next += 1
            return self.next - 1

    def run(self):
        session = requests.Session()
        while not self.halt and (seq := self.take()) is not None:
            try:
                r = session.post(self.url, json={"seq": seq}, timeout=10)
                good = r.status_code == 204
            except requests.RequestException:
                good = False
            with self.lock:
                if good:
                    self.ok.add(seq)
                else:
                    self.failed += 1
            if self.rate:
                time.sleep(1 / self.rate)  # pacing, not synchronisation

    def join(self):
        for t in self.threads:
            t.join(timeout=120)


def seqs(app_port, path="/t"):
    got = requests.get(f"http://127.0.0.1:{app_port}/_received", timeout=5).json()
    return [json.loads(r["body"])["data"]["seq"] for r in got if r["path"] == path]


def start_subscriber(broker, app, sidecar_factory):
    s = sidecar_factory([broker.component("sub")], app_id="sub", app_port=app.port)
    s.wait_ready(30)
    return s


def terminate(sidecar, sig):
    sidecar.proc.send_signal(sig)
    rc = sidecar.proc.wait(timeout=30)
    out = sidecar.output()
    sidecar.dir.cleanup()
    return rc, out


@pytest.fixture
def cpu_hog():
    """One busy process for the length of a test (the machine has two cores)."""
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield
    p.kill()
    p.wait()


def wait_all(app_port, want, timeout, what):
    def done():
        got = set(seqs(app_port))
        return want <= got
    eventually(done, timeout, what)


def test_subscriber_sigterm_mid_stream_loses_and_duplicates_nothing(
        broker, sidecar_factory, app_factory, cpu_hog):
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": broker.subscriptions()})
    requests.post(f"http://127.0.0.1:{app.port}/_mode",
                  json={"/t": {"sleep": 0.01}}, timeout=5)
    pub = sidecar_factory([broker.component("pub")], app_id="pub")
    sub = start_subscriber(broker, app, sidecar_factory)
    n = 60 * (SIGTERMS + 1)
    publisher = Publisher(pub, broker.topic, n, rate=100)
    for i in range(SIGTERMS):
        seen = len(seqs(app.port))
        eventually(lambda: len(seqs(app.port)) >= seen + 20, 60,
                   f"deliveries before SIGTERM {i + 1}")
        rc, out = terminate(sub, signal.SIGTERM)
        assert rc == 0, out[-3000:]
        assert "grace period elapsed" not in out, out[-3000:]
        sub = start_subscriber(broker, app, sidecar_factory)
    publisher.join()
    assert publisher.failed == 0, "publishes failed while only the subscriber restarted"
    wait_all(app.port, publisher.ok, 60, "every published message")
    got = seqs(app.port)
    dup = len(got) - len(set(got))
    assert dup == 0, f"{dup} duplicate deliveries over {SIGTERMS} SIGTERMs"
    assert broker.dead_letters(app.port) == 0, "a shutdown sent messages to the dead-letter topic"


def test_subscriber_sigkill_loses_nothing(broker, sidecar_factory, app_factory):
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": broker.subscriptions()})
    requests.post(f"http://127.0.0.1:{app.port}/_mode",
                  json={"/t": {"sleep": 0.01}}, timeout=5)
    pub = sidecar_factory([broker.component("pub")], app_id="pub")
    sub = start_subscriber(broker, app, sidecar_factory)
    publisher = Publisher(pub, broker.topic, 200, rate=100)
    eventually(lambda: len(seqs(app.port)) >= 40, 60, "deliveries before SIGKILL")
    terminate(sub, signal.SIGKILL)
    time.sleep(2)  # the outage the scenario asks for, not synchronisation
    sub = start_subscriber(broker, app, sidecar_factory)
    publisher.join()
    assert publisher.failed == 0
    # Redelivery of what the killed sidecar held takes the broker's redelivery timeout.
    wait_all(app.port, publisher.ok, 90, "every published message after the SIGKILL")
    got = seqs(app.port)
    dup = len(got) - len(set(got))
    assert dup <= INFLIGHT_WINDOW, f"{dup} duplicates after one SIGKILL"
    print(f"{broker.kind}: SIGKILL duplicates = {dup}")


def test_publisher_sigterm_every_2xx_is_delivered(broker, sidecar_factory, app_factory):
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": broker.subscriptions()})
    sub = start_subscriber(broker, app, sidecar_factory)
    pub = sidecar_factory([broker.component("pub")], app_id="pub")
    publisher = Publisher(pub, broker.topic, 100_000, threads=4)
    eventually(lambda: len(publisher.ok) >= 200, 60, "publishes before SIGTERM")
    rc, out = terminate(pub, signal.SIGTERM)
    assert rc == 0, out[-3000:]
    eventually(lambda: publisher.failed > 0, 10, "requests after the SIGTERM to be refused")
    publisher.halt = True
    publisher.join()
    wait_all(app.port, publisher.ok, 60, "every publish answered 2xx")
