"""The fault suite, continued: faults of the broker and of the network between sidecar and
broker, against every component with a broker, counting with a sequence number in every
message (*lost* = published with a 2xx and never delivered to the app).

- broker SIGKILL mid-stream, restarted after 5 s on the same port and data, with the setting a
  production user would choose to keep acknowledged data (Redis AOF with fsync always,
  RabbitMQ durable queues with persistent messages and publisher confirms, Mosquitto
  persistence saved on every change, JetStream file storage, tansu on SQLite, the Service Bus
  test broker — also the Event Hubs one — with a data directory): lost 0; no request sent while the broker is down is
  answered 2xx before it returns; publishing and delivery resume within 1 s of its return.
  SNS/SQS is left out: its test server (moto) keeps everything in memory, so killing it is not
  a fault AWS can have; so are Pulsar, whose test broker keeps no data, and GCP Pub/Sub, whose
  emulator keeps everything in memory.
- a 5 s and a 30 s network blackhole: a TCP proxy between the sidecars and the broker stops
  forwarding (it neither reads nor writes, and connects no new connection, so bytes wait as
  on a dropped route), then forwards again: lost 0, publishing and delivery resume within 2 s,
  the sidecars' RSS stays bounded while it lasts.

Each test has private broker processes (or, for the blackhole, its own names on the shared
brokers behind its own proxy) on free ports."""

import os
import select
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import (SERVICEBUS_BROKER, SHARED_BROKERS, PulsarBroker, ServiceBusBroker,
                      eventually, free_port, start_tansu, wait_listening)
from test_faults import Broker, Publisher, seqs, wait_all


def started(app_port):
    """Wall-clock start time of every delivery the app has begun."""
    got = requests.get(f"http://127.0.0.1:{app_port}/_started", timeout=5).json()
    return [r["at"] for r in got if r["path"] == "/t"]


def resumed(publisher, app_port, what):
    """Waits for publishing and delivery to resume from now on (the broker is back); stops
    the publisher; returns the seconds until the first 2xx and until the first delivery."""
    back, back_wall = time.monotonic(), time.time()
    eventually(lambda: any(good and answered >= back
                           for _, answered, _, good in publisher.log), 30,
               f"a 2xx publish after {what}")
    eventually(lambda: any(at >= back_wall for at in started(app_port)), 30,
               f"a delivery after {what}")
    publisher.halt = True
    publisher.join()
    first_ok = min(a for _, a, _, good in publisher.log if good and a >= back) - back
    first_delivery = min(at for at in started(app_port) if at >= back_wall) - back_wall
    return first_ok, first_delivery


def warnings(sidecar, name, most=40):
    """The last `most` warning and error lines of a sidecar's log, for a failure's message
    (where a lost message went is often in them)."""
    marks = (" WARN ", " ERROR ", '"level":"warning"', '"level":"error"')
    lines = [line for line in sidecar.output().splitlines() if any(m in line for m in marks)]
    return f"{name} sidecar's last warnings:\n" + "\n".join(lines[-most:])


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PrivateBroker:
    """A broker process of the test's own on a free port, keeping acknowledged data on disk;
    `kill` SIGKILLs it (with its process group), `start` starts it again on the same port and
    data."""

    def __init__(self, kind):
        self.kind = kind
        self.port = free_port()
        self.tmp = tempfile.TemporaryDirectory(prefix="fault-broker-")
        self.dir = Path(self.tmp.name)
        # Mosquitto and RabbitMQ drop to users of their own: their data must be theirs to write
        self.dir.chmod(0o777)
        self.proc = None
        self.env = dict(os.environ)
        self.cwd = None
        if kind == "mqtt3":
            (self.dir / "mosquitto.conf").write_text(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                f"persistence_location {self.dir}/\nautosave_interval 1\n"
                "autosave_on_changes true\n")
        if kind == "rabbitmq":
            # a node of its own: own name, ports, database, logs, no plugins; the Debian
            # rabbitmq-server drops to the rabbitmq user, so its directories are open to it
            for sub in ("mnesia", "log"):
                (self.dir / sub).mkdir()
            (self.dir / "enabled_plugins").write_text("[].")
            (self.dir / "rabbitmq.conf").write_text("")
            (self.dir / "env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
            for p in self.dir.iterdir():
                p.chmod(0o777)
            self.env.update({
                "RABBITMQ_CONF_ENV_FILE": str(self.dir / "env.conf"),
                "RABBITMQ_NODENAME": f"fault{self.port}@localhost",
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(free_port()),
                "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
                "RABBITMQ_PID_FILE": str(self.dir / "pid"),
                "RABBITMQ_FEATURE_FLAGS_FILE": str(self.dir / "feature_flags"),
            })
        if kind == "kafka":
            self.cwd = self.dir
        self.url = None  # the Service Bus test broker's connection string
        self.start()

    def command(self):
        d, p = str(self.dir), str(self.port)
        return {
            "redis": ["redis-server", "--port", p, "--bind", "127.0.0.1", "--save", "",
                      "--appendonly", "yes", "--appendfsync", "always", "--dir", d],
            "rabbitmq": ["rabbitmq-server"],
            "mqtt3": ["mosquitto", "-c", f"{d}/mosquitto.conf"],
            "jetstream": ["nats-server", "-a", "127.0.0.1", "-p", p, "-js", "-sd", d],
            "kafka": ["tansu", "broker", "--listener-url", f"tcp://127.0.0.1:{p}",
                      "--advertised-listener-url", f"tcp://127.0.0.1:{p}",
                      "--storage-engine", "sqlite://tansu.db"],
            # no maximum delivery count to speak of (as the suite's other Service Bus tests)
            "servicebus": [str(SERVICEBUS_BROKER), "--port", p, "--data-dir", d,
                           "--max-delivery-count", "1000000"],
        }["servicebus" if self.kind.startswith("azure.") else self.kind]

    def start(self):
        if self.kind.startswith("azure."):
            # it runs until its input closes, and says its connection string first
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True, start_new_session=True)
            self.url = self.proc.stdout.readline().strip()
        else:
            self.proc = subprocess.Popen(self.command(), env=self.env, cwd=self.cwd,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_listening(self.port, 60, self.kind)

    def url_at(self, addr):
        """The Service Bus test broker's connection string with `addr` as the endpoint."""
        return self.url.replace(f"127.0.0.1:{self.port}", addr, 1)

    def kill(self):
        if self.kind == "rabbitmq":
            # the Debian script starts the node in a session of its own (as the rabbitmq
            # user); the node writes its process id here
            node = int((self.dir / "pid").read_text().strip())
            os.killpg(os.getpgid(node), signal.SIGKILL)
        else:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        # the port is closed once the process is gone (RabbitMQ's beam runs under a shell)
        eventually(lambda: not _open(self.port), 10, f"{self.kind} to be gone")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.kill()
        self.tmp.cleanup()


def _open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# What a user keeps acknowledged data with, on the client side (the broker side is in
# PrivateBroker).
DURABLE = {
    # reconnectWaitSeconds: the pause between reconnects (Dapr's default 3 s would be the
    # resume time); 0 is our floor of 100 ms
    "rabbitmq": {"deliveryMode": "2", "publisherConfirm": "true", "reconnectWaitSeconds": "0"},
    # reconnecting every 100 ms (our floor), publishes retried from 50 ms: Service Bus's
    # defaults (2 s doubling to 300 s, 500 ms doubling) would be the resume time
    **{kind: {"minConnectionRecoveryInSec": "0", "maxConnectionRecoveryInSec": "0",
              "publishInitialRetryIntervalInMs": "50"}
       for kind in ("azure.servicebus.topics", "azure.servicebus.queues")},
}


@pytest.mark.parametrize("kind", ["redis", "rabbitmq", "mqtt3", "jetstream", "kafka",
                                  "azure.servicebus.topics", "azure.servicebus.queues",
                                  "azure.eventhubs"])
def test_broker_sigkill_for_5s_loses_nothing(kind, sidecar_factory, app_factory):
    pb = PrivateBroker(kind)
    private = pb if kind.startswith("azure.") else None
    broker = Broker(kind, addr=f"127.0.0.1:{pb.port}", private=private)
    try:
        extra = DURABLE.get(kind, {})
        app = app_factory("http_app.py",
                          env={"SUBSCRIPTIONS": broker.subscriptions(dead_letters=False)})
        sub = sidecar_factory([broker.component("sub", **extra)], app_id="sub",
                              app_port=app.port)
        sub.wait_ready(30)
        pub = sidecar_factory([broker.component("pub", **extra)], app_id="pub")
        publisher = Publisher(pub, broker.topic, 1_000_000, threads=2, rate=50)
        eventually(lambda: len(seqs(app.port)) >= 40, 60, "deliveries before the broker dies")
        pb.kill()
        down = time.monotonic()
        time.sleep(5)  # the outage the scenario asks for, not synchronisation
        restarting = time.monotonic()
        pb.start()
        listening = time.monotonic()
        first_ok, first_delivery = resumed(publisher, app.port, "the broker's return")
        during = [a - down for s, a, _, good in publisher.log
                  if good and s > down and a < restarting]
        assert not during, f"{len(during)} publishes answered 2xx while the broker was down"
        print(f"{kind}: publish resumed {first_ok:.2f} s, delivery {first_delivery:.2f} s "
              f"after the broker's return; {publisher.failed} publishes refused")
        assert first_ok <= 1.0, f"publishing resumed {first_ok:.2f} s after the broker"
        assert first_delivery <= 1.0, f"delivery resumed {first_delivery:.2f} s after the broker"
        try:
            wait_all(app.port, publisher.ok, 60, "every publish answered 2xx", publisher,
                     {"killed": down, "restarted": restarting, "listening": listening})
        except AssertionError as e:
            raise AssertionError(f"{e}\n{warnings(pub, 'pub')}\n{warnings(sub, 'sub')}") from None
    finally:
        broker.cleanup()
        pb.stop()


class Proxy:
    """A TCP proxy on a free port in front of 127.0.0.1:`upstream` that can stop forwarding.
    While blackholed it neither reads nor writes on any connection and connects no new
    connection upstream: bytes wait in the kernel's buffers and TCP's flow control, as on a
    route that drops packets and later comes back."""

    def __init__(self, upstream=None):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarding = threading.Event()
        self.forwarding.set()
        self.closed = False
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self):
        self.forwarding.clear()

    def restore(self):
        self.forwarding.set()

    def close(self):
        self.closed = True
        self.forwarding.set()
        self.listener.close()
        for s in self.sockets:
            s.close()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client):
        self.forwarding.wait()
        try:
            server = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            client.close()
            return
        self.sockets.append(server)
        for a, b in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while not self.closed:
                self.forwarding.wait()
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready or not self.forwarding.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except (OSError, ValueError):
            # ValueError: the other direction's pump closed the sockets first
            for s in (src, dst):
                s.close()


SHARED_PORT = {kind: port for kind, (_, port) in SHARED_BROKERS.items()}
BLACKHOLE_RSS_GROWTH_MIB = 32


@pytest.mark.parametrize("seconds", [5, 30])
@pytest.mark.parametrize("kind", ["redis", "rabbitmq", "mqtt3", "jetstream", "aws.snssqs",
                                  "kafka", "pulsar", "gcp.pubsub", "azure.servicebus.topics",
                                  "azure.servicebus.queues", "azure.eventhubs"])
def test_network_blackhole_loses_nothing(kind, seconds, sidecar_factory, app_factory):
    # Kafka, 30 s: longer than the 10 s sessionTimeout, so the consumer rejoins its group under
    # a new member id (stock tansu 0.6 never let it in: scripts/tansu-rejoin.patch)
    blackhole(kind, seconds, sidecar_factory, app_factory)


def test_kafka_blackhole_within_the_session_loses_nothing(sidecar_factory, app_factory):
    """The 30 s outage again, inside a 60 s sessionTimeout: the consumer keeps its session
    (and its partitions), so nothing depends on the group forming again."""
    blackhole("kafka", 30, sidecar_factory, app_factory, extra={"sessionTimeout": "60s"})


def blackhole(kind, seconds, sidecar_factory, app_factory, extra=None):
    """Cuts the network between both sidecars and the broker for `seconds`: nothing lost,
    publishing and delivery back within 2 s, RSS bounded meanwhile."""
    extra = extra or {}
    proxy = Proxy(SHARED_PORT.get(kind))
    private = None  # a private broker behind the proxy
    if kind == "kafka":
        # tansu sends clients to the address it advertises: the proxy's
        private = start_tansu(advertised=proxy.port)
        proxy.upstream = private.port
    if kind == "pulsar":
        # the test broker's lookups send clients to the proxy too
        private = PulsarBroker(advertised=proxy.port)
        proxy.upstream = private.port
    if kind.startswith("azure."):
        # the test broker (AMQP and its management API on one port; event hubs too), no
        # maximum delivery count
        private = ServiceBusBroker(max_delivery_count=1_000_000)
        proxy.upstream = private.port
    broker = Broker(kind, addr=f"127.0.0.1:{proxy.port}", private=private)
    try:
        app = app_factory("http_app.py",
                          env={"SUBSCRIPTIONS": broker.subscriptions(dead_letters=False)})
        sub = sidecar_factory([broker.component("sub", **extra)], app_id="sub",
                              app_port=app.port)
        sub.wait_ready(30)
        pub = sidecar_factory([broker.component("pub", **extra)], app_id="pub")
        publisher = Publisher(pub, broker.topic, 1_000_000, threads=2, rate=50)
        eventually(lambda: len(seqs(app.port)) >= 40, 60, "deliveries before the blackhole")
        before = {s.proc.pid: rss_mib(s.proc.pid) for s in (pub, sub)}
        peak = dict(before)
        proxy.blackhole()
        cut = time.monotonic()
        end = cut + seconds
        while time.monotonic() < end:  # the outage the scenario asks for, sampled
            for pid in peak:
                peak[pid] = max(peak[pid], rss_mib(pid))
            time.sleep(0.5)
        proxy.restore()
        restored = time.monotonic()
        first_ok, first_delivery = resumed(publisher, app.port, "the blackhole")
        growth = {pid: peak[pid] - before[pid] for pid in peak}
        print(f"{kind} {seconds} s: publish resumed {first_ok:.2f} s, delivery "
              f"{first_delivery:.2f} s after; RSS growth {growth} MiB; "
              f"{publisher.failed} publishes refused")
        assert first_ok <= 2.0, f"publishing resumed {first_ok:.2f} s after the blackhole"
        assert first_delivery <= 2.0, f"delivery resumed {first_delivery:.2f} s after"
        assert max(growth.values()) <= BLACKHOLE_RSS_GROWTH_MIB, f"RSS grew {growth} MiB"
        try:
            wait_all(app.port, publisher.ok, 60, "every publish answered 2xx", publisher,
                     {"cut": cut, "restored": restored})
        except AssertionError as e:
            raise AssertionError(f"{e}\n{warnings(pub, 'pub')}\n{warnings(sub, 'sub')}") from None
    finally:
        broker.cleanup()
        proxy.close()
        if private:
            private.stop()
