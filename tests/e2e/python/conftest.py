"""Fixtures: start the built daprd binary on free loopback ports with a resources dir."""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[3]
DAPRD = Path(os.environ.get("DAPRD_BIN", ROOT / "target" / "debug" / "daprd"))

# The pub/sub component the suites run against: pubsub.in-memory unless DAPRD_E2E_PUBSUB
# names a broker component (the matrix of issue 4: scripts/test.sh runs the suites once per
# broker). Each test gets its own consumer groups / database / stream, so runs on the shared
# brokers never see each other's messages.
PUBSUB = os.environ.get("DAPRD_E2E_PUBSUB", "in-memory")
BROKERS = ("in-memory", "redis", "rabbitmq", "mqtt3", "jetstream", "kafka", "aws.snssqs",
           "gcp.pubsub", "pulsar", "azure.servicebus.topics", "azure.servicebus.queues",
           "azure.eventhubs")
# the components the Service Bus test broker serves (it is an Event Hubs namespace too)
SERVICEBUS = ("azure.servicebus.topics", "azure.servicebus.queues", "azure.eventhubs")
assert PUBSUB in BROKERS, f"DAPRD_E2E_PUBSUB must be one of {BROKERS}"
REDIS_DB = "9"  # the e2e database, flushed before each test
NATS_URL = "nats://localhost:4222"
# SNS/SQS: a local moto server (.ci/run starts it), reset before each test
SNSSQS_ENDPOINT = os.environ.get("SNSSQS_ENDPOINT", "http://127.0.0.1:4566")
# GCP Pub/Sub: Google's emulator (scripts/services.sh starts it); a project of its own per test
PUBSUB_EMULATOR = os.environ.get("PUBSUB_EMULATOR_HOST", "127.0.0.1:8085")
_test_tag = {"value": "t"}
_kafka = {"port": None}
_pulsar = {"url": None}
_servicebus = {"cs": None}

COMPONENT = """apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: {name}
spec:
  type: pubsub.{kind}
  version: v1
  metadata: {metadata}
"""


def broker_metadata() -> dict:
    """Connection and isolation metadata for the broker under test."""
    tag = _test_tag["value"]
    return {
        "in-memory": {},
        "redis": {"redisHost": "localhost:6379", "redisDB": REDIS_DB},
        # queues are <consumerID>-<topic>: one set per test, still shared by one app id
        "rabbitmq": {"connectionString": "amqp://guest:guest@localhost:5672",
                     "consumerID": "{appID}-" + tag},
        # the MQTT client id must be unique per sidecar
        "mqtt3": {"url": "tcp://localhost:1883", "consumerID": "{appID}-{uuid}"},
        "jetstream": {"natsURL": NATS_URL},
        # a private tansu broker per test (see isolated_broker); it creates no topic on
        # demand, hence autoCreateTopics (a daprd-rs extension). A fresh broker has only this
        # test's messages, so groups read from the oldest offset: no race with the join.
        # One partition: the suites expect topic-wide order (Kafka orders per partition;
        # several partitions are covered by the Rust conformance suite).
        "kafka": {"brokers": f"127.0.0.1:{_kafka['port']}", "authType": "none",
                  "initialOffset": "oldest", "autoCreateTopics": "true",
                  "autoCreateTopicPartitions": "1", "backOffDuration": "1s"},
        "aws.snssqs": {"endpoint": SNSSQS_ENDPOINT, "region": "us-east-1", "accessKey": "test",
                       "secretKey": "test", "messageVisibilityTimeout": "2"},
        "gcp.pubsub": {"endpoint": PUBSUB_EMULATOR, "projectId": "e2e-" + tag},
        # a private test broker per test (see isolated_broker); a refused message comes back
        # after redeliveryDelay (Dapr's default: 30 s)
        "pulsar": {"host": _pulsar["url"], "redeliveryDelay": "500ms"},
        # a private Service Bus test broker per test (see isolated_broker)
        "azure.servicebus.topics": {"connectionString": _servicebus["cs"]},
        "azure.servicebus.queues": {"connectionString": _servicebus["cs"]},
        # the test broker's event hubs (made by the first READ, 4 partitions) with
        # checkpoints in the session's Azurite, a container per test; a refused event is
        # handed again after backOffDuration, without end (as the suites expect of RETRY)
        "azure.eventhubs": {"connectionString": _servicebus["cs"],
                            "storageConnectionString": azurite_connection_string(),
                            "storageContainerName": "e2e-" + tag,
                            "backOffDuration": "1s", "backOffMaxRetries": "-1"},
    }[PUBSUB]


AZURITE_BLOB = Path(os.environ.get("AZURITE_BLOB",
                                   ROOT / ".azurite" / "node_modules" / ".bin" / "azurite-blob"))
# Azurite's well-known development account
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")
_azurite = {"port": None}


def azurite_connection_string() -> str:
    """The storage connection string of this session's Azurite Blob service (Microsoft's
    Azure Storage emulator), started on first use and stopped when the session ends."""
    if _azurite["port"] is None:
        if not AZURITE_BLOB.exists():
            pytest.fail(f"{AZURITE_BLOB} is missing: scripts/services.sh installs Azurite",
                        pytrace=False)
        import atexit

        port = free_port()
        location = tempfile.mkdtemp(prefix="azurite-")
        proc = subprocess.Popen(
            [str(AZURITE_BLOB), "--blobHost", "127.0.0.1", "--blobPort", str(port),
             "--location", location, "--silent", "--skipApiVersionCheck", "--loose"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop():
            proc.kill()
            proc.wait()
            shutil.rmtree(location, ignore_errors=True)
        atexit.register(stop)
        wait_listening(port, 30, "Azurite")
        _azurite["port"] = port
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{_azurite['port']}/{AZURITE_ACCOUNT};")


# The shared brokers on loopback (scripts/services.sh starts them): name and port.
SHARED_BROKERS = {"redis": ("Redis", 6379), "rabbitmq": ("RabbitMQ", 5672),
                  "mqtt3": ("Mosquitto (MQTT)", 1883), "jetstream": ("NATS JetStream", 4222),
                  "aws.snssqs": ("moto (SNS/SQS)", int(SNSSQS_ENDPOINT.rsplit(":", 1)[1])),
                  "gcp.pubsub": ("the Pub/Sub emulator", int(PUBSUB_EMULATOR.rsplit(":", 1)[1]))}


def require_broker(kind):
    """Fails the test with one line when the shared broker of `kind` does not answer."""
    if kind in ("pulsar",) + SERVICEBUS:
        feature, binary = (("pulsar", PULSAR_BROKER) if kind == "pulsar"
                           else ("servicebus", SERVICEBUS_BROKER))
        if not binary.exists():
            pytest.fail(f"{binary} is missing: run `cargo build -p daprd-testkit "
                        f"--features {feature} --bin {binary.name}`", pytrace=False)
        return
    if kind == "kafka":
        if shutil.which("tansu") is None:
            pytest.fail("tansu (Kafka) is not installed: run `bash scripts/services.sh`",
                        pytrace=False)
        return
    if kind not in SHARED_BROKERS:
        return
    name, port = SHARED_BROKERS[kind]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        pytest.fail(f"{name} is not reachable on 127.0.0.1:{port}: start the test brokers "
                    "with `bash scripts/services.sh`", pytrace=False)


@pytest.fixture(autouse=True)
def isolated_broker(request):
    """Gives each test a fresh slice of the broker under test."""
    import uuid

    require_broker(PUBSUB)
    _test_tag["value"] = uuid.uuid4().hex[:10]
    if PUBSUB == "redis":
        subprocess.run(["redis-cli", "-n", REDIS_DB, "FLUSHDB"], check=True, capture_output=True)
    if PUBSUB == "aws.snssqs":
        requests.post(SNSSQS_ENDPOINT + "/moto-api/reset", timeout=10).raise_for_status()
    kafka = start_tansu() if PUBSUB == "kafka" else None
    if kafka:
        _kafka["port"] = kafka.port
    own = None  # the repository's own test broker, if the broker under test is one
    if PUBSUB == "pulsar":
        own = PulsarBroker()
        _pulsar["url"] = own.url
    if PUBSUB in SERVICEBUS:
        own = ServiceBusBroker()
        _servicebus["cs"] = own.url
    stream = None
    if PUBSUB == "jetstream":
        # Dapr's JetStream component needs streams holding the subjects: the tests use
        # single-token topic names, taken by one stream ("*"), and dead-letter topics named
        # "dlq.<x>", taken by a second one. A dead-letter republish keeps the CloudEvent id,
        # hence the Nats-Msg-Id, and would be dropped as a duplicate in the source's stream
        # (as with Go daprd).
        stream = "e2e-" + _test_tag["value"]

        async def create(js):
            await js.add_stream(name=stream, subjects=["*"], max_age=600)
            await js.add_stream(name=stream + "-dlt", subjects=["dlq.>"], max_age=600)
        _nats(create)
    yield
    if kafka:
        kafka.stop()
    if own:
        own.stop()
    if stream:
        async def delete(js):
            await js.delete_stream(stream)
            await js.delete_stream(stream + "-dlt")
        _nats(delete)


class Tansu:
    """A private Kafka-protocol broker (tansu) on `port`: in-memory storage unless `storage`
    names another (e.g. "sqlite://tansu.db", relative to `cwd`); clients are sent to
    `advertised` (default: `port`), which lets a proxy stand in front of it."""

    def __init__(self, port, advertised=None, storage="memory://tansu/", cwd=None):
        self.port = port
        url = f"tcp://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            ["tansu", "broker", "--listener-url", url, "--advertised-listener-url",
             f"tcp://127.0.0.1:{advertised or port}", "--storage-engine", storage],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


PULSAR_BROKER = Path(os.environ.get("PULSAR_TESTBROKER_BIN",
                                   ROOT / "target" / "debug" / "pulsar-testbroker"))
SERVICEBUS_BROKER = Path(os.environ.get("SERVICEBUS_TESTBROKER_BIN",
                                       ROOT / "target" / "debug" / "servicebus-testbroker"))


class RepoBroker:
    """One of the repository's own test brokers (a process speaking a broker's real wire
    protocol, where no server can be installed here), in memory, on a free port: its first
    line of output is how to reach it; `drop_connections` on its input cuts every client."""

    def __init__(self, binary, expect, args=()):
        self.proc = subprocess.Popen([str(binary), "--port", str(free_port()), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith(expect), f"{binary.name} said {self.url!r}"

    def drop_connections(self):
        self.proc.stdin.write("drop_connections\n")
        self.proc.stdin.flush()

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class PulsarBroker(RepoBroker):
    """The Pulsar test broker (Pulsar's binary protocol: no Apache Pulsar server can be
    installed here)."""

    def __init__(self, advertised=None):
        """`advertised`: the port lookups send clients to (a proxy in front of it)."""
        super().__init__(PULSAR_BROKER, "pulsar://",
                         ["--advertised-port", str(advertised)] if advertised else [])
        self.port = int(self.url.rsplit(":", 1)[1])


class ServiceBusBroker(RepoBroker):
    """The Azure Service Bus test broker (AMQP 1.0 with Service Bus's CBS, addressing and
    peek-lock: Microsoft's emulator is a container image); `url` is its connection string."""

    def __init__(self, max_delivery_count=10):
        """`max_delivery_count`: deliveries before a message is dead-lettered (Service Bus's
        default: 10)."""
        super().__init__(SERVICEBUS_BROKER, "Endpoint=sb://",
                         ["--max-delivery-count", str(max_delivery_count)])
        self.port = int(self.url.split("sb://", 1)[1].split(";", 1)[0].rsplit(":", 1)[1])

    def url_at(self, addr):
        """The connection string with `addr` ("host:port", a proxy in front of it) as the
        endpoint."""
        return self.url.replace(f"127.0.0.1:{self.port}", addr, 1)


def wait_listening(port, timeout=10, what="a broker"):
    def up():
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    eventually(up, timeout, f"{what} to listen on {port}")


def start_tansu(port=None, **kw) -> Tansu:
    t = Tansu(port or free_port(), **kw)
    wait_listening(t.port, 10, "tansu")
    return t


def _nats(action, url=NATS_URL):
    import asyncio

    import nats

    async def run():
        nc = await nats.connect(url)
        try:
            await action(nc.jetstream())
        finally:
            await nc.close()
    asyncio.run(run())


def eventually(check, timeout, what):
    """Polls `check` until it returns a truthy value; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - keep polling until the deadline
            last_error = e
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error})")


def received(app_port, path=None):
    """What the test app apps/http_app.py has been handed, oldest first: every
    delivery, or only those to `path`."""
    got = requests.get(f"http://127.0.0.1:{app_port}/_received", timeout=5).json()
    return [r for r in got if path is None or r["path"] == path]


def _server_ports() -> tuple[int, int]:
    """Ports for the tests' servers: the 12,000 below the kernel's first ephemeral port.

    A poller connecting to a port nobody listens on yet could otherwise be given that very
    port as its own and connect to itself (a TCP simultaneous open), and the server could not
    bind it.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    high = max(ephemeral, 2048)
    return max(1024, high - 12000), high


def free_port() -> int:
    low, high = _server_ports()
    for _ in range(1000):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {low}..{high}")


def pubsub_component(name: str, **metadata: str) -> str:
    """A pub/sub component named `name` of the kind under test (in-memory by default)."""
    merged = {**broker_metadata(), **metadata}
    if PUBSUB == "aws.snssqs" and "consumerID" not in metadata:
        # consumerID names the SQS queue: two components of one app need two queues
        merged["consumerID"] = "{appID}-" + name
    items = "[" + ", ".join(f'{{name: {k}, value: "{v}"}}' for k, v in merged.items()) + "]"
    return COMPONENT.format(name=name, kind=PUBSUB, metadata=items)


def appending_log():
    """A temporary file for a child's output, opened with O_APPEND: the child writes at the
    end whatever offset it shares with our reads (output() seeks to 0; without O_APPEND the
    child then wrote over its own log from there on)."""
    import fcntl
    f = tempfile.TemporaryFile()
    flags = fcntl.fcntl(f.fileno(), fcntl.F_GETFL)
    fcntl.fcntl(f.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)
    return f


class Sidecar:
    def __init__(self, resources, app_id="checkout", env=None, extra_args=(), app_port=None,
                 app_protocol="http"):
        self.dir = tempfile.TemporaryDirectory(prefix="daprd-e2e-")
        for i, doc in enumerate(resources):
            Path(self.dir.name, f"c{i}.yaml").write_text(doc)
        self.app_id = app_id
        self.env = dict(os.environ)
        self.env.update(env or {})
        # free_port() only finds a port free now; another process (an outgoing connection's
        # ephemeral port) can take it before daprd binds. Such a start is tried again on
        # fresh ports; any other failure is reported at once.
        for attempt in range(3):
            self.http_port = free_port()
            self.grpc_port = free_port()
            self.metrics_port = free_port()
            self.log = appending_log()
            self.proc = subprocess.Popen(
                [str(DAPRD), "-app-id", app_id, "--dapr-http-port", str(self.http_port),
                 "--dapr-grpc-port=" + str(self.grpc_port), "--dapr-listen-addresses", "127.0.0.1",
                 "--metrics-port", str(self.metrics_port), "--metrics-listen-address", "127.0.0.1",
                 "--resources-path", self.dir.name, "--log-level", "debug",
                 *(["--app-port", str(app_port), "--app-protocol", app_protocol] if app_port else []),
                 *extra_args],
                stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
            )
            self.http = f"http://127.0.0.1:{self.http_port}"
            if self._wait_started(last=attempt == 2):
                return

    def _wait_started(self, last):
        """True once the outbound health answers; False when the start lost its port race
        (and `last` is False); raises on any other failure."""
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                if not last and "Address already in use" in self.output():
                    return False
                raise RuntimeError(f"daprd exited with {self.proc.returncode}: {self.output()}")
            try:
                if requests.get(self.http + "/v1.0/healthz/outbound", timeout=1).status_code == 204:
                    return True
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("daprd did not become healthy: " + self.output())
            time.sleep(0.05)

    def wait_ready(self, timeout=20):
        """Waits for /v1.0/healthz: 204 once the app's subscriptions have started."""
        eventually(lambda: requests.get(self.http + "/v1.0/healthz", timeout=1).status_code == 204,
                   timeout, "daprd healthz (subscriptions started): " + self.output()[-3000:])

    def publish(self, topic, data, content_type="application/json", pubsub="pubsub", **metadata):
        query = "&".join(f"metadata.{k}={v}" for k, v in metadata.items())
        r = requests.post(f"{self.http}/v1.0/publish/{pubsub}/{topic}?{query}", data=data,
                          headers={"content-type": content_type})
        assert r.status_code == 204, r.text
        return r

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def sdk_env(self):
        """Point the official SDKs at this sidecar the standard way (env vars)."""
        return {"DAPR_HTTP_PORT": str(self.http_port), "DAPR_GRPC_PORT": str(self.grpc_port),
                "DAPR_RUNTIME_HOST": "127.0.0.1"}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.dir.cleanup()


@pytest.fixture
def sidecar_factory():
    started = []

    def make(resources=None, **kw):
        s = Sidecar(resources or [pubsub_component("pubsub")], **kw)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def sidecar(sidecar_factory):
    return sidecar_factory()


class App:
    """A test app process listening on a free port."""

    def __init__(self, script, env=None):
        self.port = int((env or {}).get("PORT") or free_port())
        self.out = tempfile.NamedTemporaryFile(prefix="app-out-", suffix=".jsonl", delete=False).name
        full_env = dict(os.environ)
        full_env.update({"OUT": self.out, "PYTHONUNBUFFERED": "1"})
        full_env.update(env or {})
        self.log = appending_log()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "apps" / script), str(self.port)],
                                     env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        def listening():
            if self.proc.poll() is not None:
                raise AssertionError("app exited: " + self.output())
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        eventually(listening, 30, f"{script} to listen")

    def output(self):
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def lines(self):
        with open(self.out) as f:
            return [json.loads(line) for line in f if line.strip()]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if os.path.exists(self.out):
            os.unlink(self.out)


@pytest.fixture
def app_factory():
    started = []

    def make(script, **kw):
        a = App(script, **kw)
        started.append(a)
        return a

    yield make
    for a in started:
        a.stop()


@pytest.fixture(scope="session")
def self_signed_cert(tmp_path_factory):
    """A throwaway self-signed certificate for 127.0.0.1 (the app side of https/grpcs)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return {"TLS_CERT": str(cert), "TLS_KEY": str(key)}
