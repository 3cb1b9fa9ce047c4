"""The fault suite: the same scenarios against every component with a broker (Redis,
RabbitMQ, MQTT, JetStream, Kafka, SNS/SQS, GCP Pub/Sub, Pulsar, Service Bus, Event Hubs), counting with a sequence number in every
message. *lost* = published with a 2xx and never delivered to the app; *dup* = deliveries
beyond the first.

- subscriber sidecar SIGTERM mid-stream, repeated, with a CPU hog running: lost 0, dup 0,
  nothing on the dead-letter topic, exit code 0;
- subscriber sidecar SIGKILL, restarted after 2 s: lost 0, dup within the in-flight window;
- publisher sidecar SIGTERM at full speed: every message answered 2xx reaches the app;
- the app answering 500 / RETRY for every tenth message, with and without a resiliency
  policy, with a dead-letter topic: exact delivery counts, each poison message on the
  dead-letter topic once;
- the app down for 10 s: lost 0, sidecar CPU under 5 % meanwhile (deliveries wait for the
  app to listen again instead of each trying and failing);
- a slow app (its handler takes twice the broker's redelivery timeout): no message is
  delivered a second time while its first delivery is still in the app's hands;
- a poison message retried forever (no dead-letter topic), then a subscriber restart: it is
  still there afterwards, not skipped.

Each test has its own topic and consumer group on the shared brokers (a private tansu for
Kafka); the durable settings a production user would choose are set (RabbitMQ durable queues
that outlive their consumer, MQTT persistent sessions, JetStream durable consumers). The
README's delivery guarantees table quotes what this suite measures."""

import ctypes
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

from conftest import (NATS_URL, PUBSUB_EMULATOR, SNSSQS_ENDPOINT, PulsarBroker, ServiceBusBroker,
                      _nats, azurite_connection_string, eventually, require_broker,
                      start_tansu)

BROKERS = ["redis", "rabbitmq", "mqtt3", "jetstream", "kafka", "aws.snssqs", "gcp.pubsub",
           "pulsar", "azure.servicebus.topics", "azure.servicebus.queues", "azure.eventhubs"]
# SIGTERMs per run of the graceful test (the 20 is FAULT_SIGTERMS=20)
SIGTERMS = int(os.environ.get("FAULT_SIGTERMS", "4"))
# Most deliveries a SIGKILL may repeat: what the app had in hand, unacknowledged; for Kafka
# what was processed since the last offset commit (every second, as sarama), here at the
# suite's 100 messages/s.
PUBLISH_RATE = 100
INFLIGHT_WINDOW = {"kafka": 2 * PUBLISH_RATE}
# How long redelivery after a SIGKILL may take. Google's Pub/Sub emulator (0.8.20) never ends
# a streaming pull whose client vanished or cancelled it without half-closing it: its pusher
# for that stream keeps pulling the subscription's messages every 50 ms and writes them to
# the gone stream, where each waits out its ack deadline (10 s here) again. Each redelivery
# round a message goes to that leftover pusher or to the live subscriber's about half the
# time (measured: one more emulator pusher thread per killed or cancelled stream, and
# messages coming back in 10-second rounds, some after 70 s). Real Pub/Sub ends such a stream
# and redelivers its messages after the deadline. 240 s leaves a message 24 rounds.
# Event Hubs: the killed instance's partition claims stand until they expire (60 s without
# renewal); the restarted one takes one partition over at once and one more every 10 s while
# the dead owner holds more than its share, the rest when the claims expire.
REDELIVERY_AFTER_KILL = {"gcp.pubsub": 240, "azure.eventhubs": 120}


class Broker:
    """Component metadata with durable, per-test names for one broker kind."""

    def __init__(self, kind, addr=None, private=None):
        """`addr` ("127.0.0.1:port"): the broker to use instead of the shared one (a private
        broker, or a proxy in front of one); without it Kafka gets a private tansu.
        `private`: the repository's test broker that `addr` leads to (its keys)."""
        self.kind = kind
        self.addr = addr
        require_broker(kind)
        self.tag = uuid.uuid4().hex[:10]
        self.topic = f"fault{self.tag}"
        self.dlt = f"dlq{self.tag}"
        self.tansu = start_tansu() if kind == "kafka" and not addr else None
        # Pulsar: a private test broker (the repository's own) per test
        self.pulsar = PulsarBroker() if kind == "pulsar" and not addr else None
        # Service Bus: a private test broker (the repository's own) per test; no maximum
        # delivery count to speak of (Service Bus's 10 would dead-letter the poison message
        # the suite retries forever)
        self.servicebus = (ServiceBusBroker(max_delivery_count=1_000_000)
                           if kind.startswith("azure.") and not addr else None)
        self.private = private
        self.nats_url = f"nats://{addr}" if addr else NATS_URL
        self.stream = None
        if kind == "jetstream":
            self.stream = "fault-" + self.tag

            async def create(js):
                # file storage (JetStream's default) keeps acknowledged data; the
                # dead-letter subject has a stream of its own (a dead-letter republish keeps
                # the CloudEvent id, which one stream would drop as a duplicate)
                await js.add_stream(name=self.stream, subjects=[self.topic], max_age=600)
                await js.add_stream(name=self.stream + "-dlt", subjects=[self.dlt],
                                    max_age=600)
            _nats(create, self.nats_url)

    def component(self, role, **extra):
        """`role` ("pub" or "sub") keeps client ids apart where the broker needs that."""
        group = f"g{self.tag}"
        meta = {
            "redis": {"redisHost": "localhost:6379", "consumerID": group,
                      "processingTimeout": "2s", "redeliverInterval": "500ms"},
            # requeueInFailure: a message the app could not take goes back to the queue
            # (Dapr's default discards it)
            "rabbitmq": {"connectionString": "amqp://guest:guest@localhost:5672",
                         "consumerID": group, "durable": "true", "deletedWhenUnused": "false",
                         "requeueInFailure": "true"},
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
            # a project per test; the shortest ack deadline Pub/Sub allows
            "gcp.pubsub": {"endpoint": PUBSUB_EMULATOR, "projectId": f"fault{self.tag}",
                           "consumerID": group, "ackDeadline": "10s"},
            # a refused message comes back after redeliveryDelay (Dapr's default: 30 s)
            "pulsar": {"host": self.pulsar.url if self.pulsar else "", "consumerID": group,
                       "redeliveryDelay": "500ms"},
            # the subscription is `consumerID`; a message whose receiver died comes back when
            # its lock (60 s on the test broker) expires
            "azure.servicebus.topics": {
                "connectionString": self.servicebus.url if self.servicebus else "",
                "consumerID": group},
            # the queue is the topic's name: every receiver of it competes
            "azure.servicebus.queues": {
                "connectionString": self.servicebus.url if self.servicebus else ""},
            # the test broker's event hub (4 partitions), consumer group `consumerID`,
            # checkpoints in the session's Azurite; a refused event is handed again after
            # backOffDuration without end (the suite's poison message is retried forever)
            "azure.eventhubs": {
                "connectionString": self.servicebus.url if self.servicebus else "",
                "consumerID": group, "storageConnectionString": azurite_connection_string(),
                "storageContainerName": f"fault{self.tag}", "backOffDuration": "500ms",
                "backOffMaxRetries": "-1"},
        }[self.kind]
        if self.addr and self.kind.startswith("azure."):
            meta["connectionString"] = self.private.url_at(self.addr)
        elif self.addr:
            key, value = {
                "redis": ("redisHost", self.addr),
                "rabbitmq": ("connectionString", f"amqp://guest:guest@{self.addr}"),
                "mqtt3": ("url", f"tcp://{self.addr}"),
                "jetstream": ("natsURL", self.nats_url),
                "kafka": ("brokers", self.addr),
                "aws.snssqs": ("endpoint", f"http://{self.addr}"),
                "gcp.pubsub": ("endpoint", self.addr),
                "pulsar": ("host", f"pulsar://{self.addr}"),
            }[self.kind]
            meta[key] = value
        meta.update(extra)
        items = "[" + ", ".join(f'{{name: {k}, value: "{v}"}}' for k, v in meta.items()) + "]"
        return (f"apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: pubsub\n"
                f"spec:\n  type: pubsub.{self.kind}\n  version: v1\n  metadata: {items}\n")

    def subscriptions(self, dead_letters=True):
        subs = [{"pubsubname": "pubsub", "topic": self.topic, "route": "/t",
                 **({"deadLetterTopic": self.dlt} if dead_letters else {})}]
        if dead_letters and self.kind != "jetstream":
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
            info = await js.stream_info(self.stream + "-dlt", subjects_filter=self.dlt)
            count["n"] = sum((info.state.subjects or {}).values())
        _nats(read, self.nats_url)
        return count["n"]

    def dead_letter_seqs(self, app_port):
        """The seq of each message on the dead-letter topic."""
        if self.kind != "jetstream":
            return seqs(app_port, "/dlt")
        out = []

        async def read(js):
            sub = await js.pull_subscribe(self.dlt, durable=None, stream=self.stream + "-dlt")
            while True:
                try:
                    msgs = await sub.fetch(100, timeout=1)
                except Exception:  # noqa: BLE001 - nats.errors.TimeoutError: no more
                    break
                for m in msgs:
                    out.append(json.loads(m.data)["data"]["seq"])
                    await m.ack()
        _nats(read, self.nats_url)
        return out

    def cleanup(self):
        if self.tansu:
            self.tansu.stop()
        if self.pulsar:
            self.pulsar.stop()
        if self.servicebus:
            self.servicebus.stop()
        if self.stream:
            async def delete(js):
                await js.delete_stream(self.stream)
                await js.delete_stream(self.stream + "-dlt")
            _nats(delete, self.nats_url)


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
        # (sent, answered, seq, 2xx) per request, monotonic seconds
        self.log = []
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
            sent = time.monotonic()
            try:
                r = session.post(self.url, json={"seq": seq}, timeout=10)
                good = r.status_code == 204
            except requests.RequestException:
                good = False
            with self.lock:
                self.log.append((sent, time.monotonic(), seq, good))
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


def started_seqs(app_port, path="/t"):
    """The seq of every delivery the app has begun to handle (finished or not)."""
    got = requests.get(f"http://127.0.0.1:{app_port}/_started", timeout=5).json()
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


def wait_all(app_port, want, timeout, what, publisher=None, moments=None):
    """Waits until the app has every seq in `want`. On failure it says where the missing ones
    went, and, given the `publisher` and named `moments` (monotonic seconds: "killed",
    "restarted"...), when each was sent and answered relative to them."""
    missing = {}

    def done():
        missing["seqs"] = sorted(want - set(seqs(app_port)))
        return not missing["seqs"]
    try:
        eventually(done, timeout, what)
    except AssertionError as e:
        lost = missing.get("seqs", [])
        # where the missing ones went: begun by the app but never answered, or moved to the
        # dead-letter topic (a delivery that failed), or never seen by the app at all
        started = set(started_seqs(app_port))
        dead = set(seqs(app_port, "/dlt"))
        raise AssertionError(
            f"{e}: {len(lost)} lost, e.g. {lost[:20]}; of these begun by the app: "
            f"{sorted(started.intersection(lost))[:20]}, on the dead-letter topic: "
            f"{sorted(dead.intersection(lost))[:20]}{timeline(publisher, moments, lost)}"
        ) from None


def timeline(publisher, moments, lost):
    """When the first lost seqs were sent and answered, relative to `moments`."""
    if publisher is None or not moments:
        return ""
    when = {seq: (sent, answered) for sent, answered, seq, good in publisher.log if good}
    out = []
    for seq in lost[:5]:
        if seq in when:
            sent, answered = when[seq]
            rel = ", ".join(f"{name} {sent - at:+.3f}/{answered - at:+.3f} s"
                            for name, at in moments.items())
            out.append(f"seq {seq} sent/answered: {rel}")
    return "; " + "; ".join(out) if out else ""


def test_subscriber_sigterm_mid_stream_loses_and_duplicates_nothing(
        broker, sidecar_factory, app_factory, cpu_hog):
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": broker.subscriptions()})
    requests.post(f"http://127.0.0.1:{app.port}/_mode",
                  json={"/t": {"sleep": 0.01}}, timeout=5)
    pub = sidecar_factory([broker.component("pub")], app_id="pub")
    sub = start_subscriber(broker, app, sidecar_factory)
    n = 60 * (SIGTERMS + 1)
    publisher = Publisher(pub, broker.topic, n, rate=PUBLISH_RATE)
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
    publisher = Publisher(pub, broker.topic, 200, rate=PUBLISH_RATE)
    eventually(lambda: len(seqs(app.port)) >= 40, 60, "deliveries before SIGKILL")
    terminate(sub, signal.SIGKILL)
    time.sleep(2)  # the outage the scenario asks for, not synchronisation
    sub = start_subscriber(broker, app, sidecar_factory)
    publisher.join()
    assert publisher.failed == 0
    # Redelivery of what the killed sidecar held takes the broker's redelivery timeout.
    wait_all(app.port, publisher.ok, REDELIVERY_AFTER_KILL.get(broker.kind, 90),
             "every published message after the SIGKILL")
    got = seqs(app.port)
    dup = len(got) - len(set(got))
    window = INFLIGHT_WINDOW.get(broker.kind, 32)
    assert dup <= window, f"{dup} duplicates after one SIGKILL (window {window})"
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


RESILIENCY = """apiVersion: dapr.io/v1alpha1
kind: Resiliency
metadata:
  name: fault-retries
spec:
  policies:
    retries:
      twice:
        policy: constant
        duration: 100ms
        maxRetries: 2
  targets:
    components:
      pubsub:
        inbound:
          retry: twice
"""


@pytest.mark.parametrize("answer,resiliency", [("500", False), ("RETRY", True)],
                         ids=["500-no-policy", "RETRY-retry-twice"])
def test_poison_messages_go_to_the_dead_letter_topic_once(
        broker, sidecar_factory, app_factory, answer, resiliency):
    mode = {"status": 500} if answer == "500" else {"body": '{"status": "RETRY"}'}
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": broker.subscriptions()})
    requests.post(f"http://127.0.0.1:{app.port}/_mode",
                  json={"/t": {**mode, "poison_mod": 10}}, timeout=5)
    resources = [broker.component("sub")] + ([RESILIENCY] if resiliency else [])
    sub = sidecar_factory(resources, app_id="sub", app_port=app.port)
    sub.wait_ready(30)
    pub = sidecar_factory([broker.component("pub")], app_id="pub")
    n = 50
    publisher = Publisher(pub, broker.topic, n)
    publisher.join()
    assert publisher.ok == set(range(n))
    poison = {s for s in range(n) if s % 10 == 0}
    eventually(lambda: set(broker.dead_letter_seqs(app.port)) >= poison, 60,
               "every poison message on the dead-letter topic")
    eventually(lambda: set(seqs(app.port)) >= set(range(n)), 60, "every message delivered")
    time.sleep(1)  # a redelivery that should not come would come within this
    got = seqs(app.port)
    attempts = 3 if resiliency else 1
    for s in range(n):
        want = attempts if s in poison else 1
        assert got.count(s) == want, f"seq {s}: {got.count(s)} deliveries, want {want}"
    dead = broker.dead_letter_seqs(app.port)
    assert sorted(dead) == sorted(poison), f"dead letters {sorted(dead)}"


def cpu_seconds(pid):
    """The CPU time of process `pid`, all threads, from its CPU-time clock (the scheduler's
    exact count; /proc/<pid>/stat counts timer ticks, which a process woken by timers can be
    charged more of than it ran)."""
    libc = ctypes.CDLL(None, use_errno=True)
    clock = ctypes.c_int()
    if libc.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
        return time.clock_gettime(clock.value)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_app_down_for_10s_loses_nothing(broker, sidecar_factory, app_factory):
    subs = broker.subscriptions(dead_letters=False)
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    sub = sidecar_factory([broker.component("sub")], app_id="sub", app_port=app.port)
    sub.wait_ready(30)
    pub = sidecar_factory([broker.component("pub")], app_id="pub")
    Publisher(pub, broker.topic, 10).join()
    eventually(lambda: set(seqs(app.port)) >= set(range(10)), 30, "deliveries before")
    port = app.port
    app.stop()
    cpu0, t0 = cpu_seconds(sub.proc.pid), time.monotonic()
    Publisher(pub, broker.topic, 40).join()  # seq 0..39 again, while the app is down
    time.sleep(10)  # the outage the scenario asks for
    cpu = (cpu_seconds(sub.proc.pid) - cpu0) / (time.monotonic() - t0)
    assert cpu < 0.05, f"sidecar CPU {cpu:.1%} while the app was down"
    # The same app again on the same port.
    back = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs, "PORT": str(port)})
    assert back.port == port
    eventually(lambda: set(seqs(back.port)) >= set(range(40)), 90,
               "the messages published while the app was down")


# The broker's redelivery timeout in the suite's settings (Redis processingTimeout, JetStream
# ackWait, SQS messageVisibilityTimeout); the others have none.
REDELIVERY_TIMEOUT = {"redis": 2, "jetstream": 2, "aws.snssqs": 2}


def test_slow_app_gets_no_concurrent_duplicate(broker, sidecar_factory, app_factory):
    slow = 2 * REDELIVERY_TIMEOUT.get(broker.kind, 2)
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": broker.subscriptions()})
    requests.post(f"http://127.0.0.1:{app.port}/_mode",
                  json={"/t": {"sleep": slow}}, timeout=5)
    sub = sidecar_factory([broker.component("sub")], app_id="sub", app_port=app.port)
    sub.wait_ready(30)
    pub = sidecar_factory([broker.component("pub")], app_id="pub")
    Publisher(pub, broker.topic, 3).join()
    eventually(lambda: set(seqs(app.port)) >= {0, 1, 2}, 60, "the slow deliveries")
    time.sleep(REDELIVERY_TIMEOUT.get(broker.kind, 2) + 1)  # a stray redelivery would come
    got = started_seqs(app.port)
    assert sorted(got) == [0, 1, 2], f"deliveries begun {sorted(got)} (handler {slow} s)"


def test_poison_retried_forever_survives_a_restart(broker, sidecar_factory, app_factory):
    subs = broker.subscriptions(dead_letters=False)
    app = app_factory("http_app.py", env={"SUBSCRIPTIONS": subs})
    # seq 0 fails (500) until the app is told otherwise
    requests.post(f"http://127.0.0.1:{app.port}/_mode",
                  json={"/t": {"status": 500, "poison_mod": 1000}}, timeout=5)
    sub = start_subscriber(broker, app, sidecar_factory)
    pub = sidecar_factory([broker.component("pub")], app_id="pub")
    Publisher(pub, broker.topic, 5).join()
    eventually(lambda: started_seqs(app.port).count(0) >= 2, 60, "the poison message retried")
    rc, out = terminate(sub, signal.SIGTERM)
    assert rc == 0, out[-3000:]
    before = started_seqs(app.port).count(0)
    requests.post(f"http://127.0.0.1:{app.port}/_mode", json={"/t": {}}, timeout=5)
    start_subscriber(broker, app, sidecar_factory)
    eventually(lambda: started_seqs(app.port).count(0) > before, 60,
               "the poison message after the restart")
    eventually(lambda: set(seqs(app.port)) >= set(range(5)), 60, "every message")
