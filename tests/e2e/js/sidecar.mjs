// Starts the built daprd binary on free loopback ports with its own resources dir.
import { execFileSync, spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { mkdtempSync, readFileSync, writeFileSync, rmSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const DAPRD = process.env.DAPRD_BIN ?? join(ROOT, "target", "debug", "daprd");

// The pub/sub component the tests run against: pubsub.in-memory unless DAPRD_E2E_PUBSUB names
// a broker component (scripts/test.sh runs the suites once per broker). Each test gets its own
// slice of the shared broker (see isolateBroker), so runs never see each other's messages.
export const PUBSUB = process.env.DAPRD_E2E_PUBSUB ?? "in-memory";
const BROKERS = ["in-memory", "redis", "rabbitmq", "mqtt3", "jetstream", "kafka", "aws.snssqs", "gcp.pubsub", "pulsar",
  "azure.servicebus.topics", "azure.servicebus.queues", "azure.eventhubs"];
if (!BROKERS.includes(PUBSUB)) throw new Error(`DAPRD_E2E_PUBSUB must be one of ${BROKERS}`);
const REDIS_DB = "9"; // the e2e database, flushed before each test
const NATS_URL = "localhost:4222";
// SNS/SQS: a local moto server (.ci/run starts it), reset before each test
const SNSSQS_ENDPOINT = process.env.SNSSQS_ENDPOINT ?? "http://127.0.0.1:4566";
// GCP Pub/Sub: Google's emulator (scripts/services.sh starts it); a project of its own per test
const PUBSUB_EMULATOR = process.env.PUBSUB_EMULATOR_HOST ?? "127.0.0.1:8085";
let testTag = "t";
let kafkaPort = 0;
let pulsarUrl = "";
let serviceBusConnection = "";
// the repository's Pulsar test broker (Pulsar's binary protocol; no Apache Pulsar server can be
// installed here): cargo build -p daprd-testkit --features pulsar --bin pulsar-testbroker
const PULSAR_BROKER = process.env.PULSAR_TESTBROKER_BIN ?? join(ROOT, "target", "debug", "pulsar-testbroker");
// the repository's Service Bus test broker (AMQP 1.0 with CBS and peek-lock; Microsoft's emulator
// is a container image): cargo build -p daprd-testkit --features servicebus --bin servicebus-testbroker
const SERVICEBUS_BROKER = process.env.SERVICEBUS_TESTBROKER_BIN ?? join(ROOT, "target", "debug", "servicebus-testbroker");

function brokerMetadata() {
  return {
    "in-memory": {},
    redis: { redisHost: "localhost:6379", redisDB: REDIS_DB },
    // queues are <consumerID>-<topic>: one set per test, still shared by one app id
    rabbitmq: { connectionString: "amqp://guest:guest@localhost:5672", consumerID: `{appID}-${testTag}` },
    // the MQTT client id must be unique per sidecar
    mqtt3: { url: "tcp://localhost:1883", consumerID: "{appID}-{uuid}" },
    jetstream: { natsURL: `nats://${NATS_URL}` },
    // a private tansu broker per test (isolateBroker): it creates no topic on demand, hence
    // autoCreateTopics (a daprd-rs extension); a fresh broker holds only this test's messages,
    // so groups start from the oldest offset; one partition keeps topic-wide order
    kafka: {
      brokers: `127.0.0.1:${kafkaPort}`, authType: "none", initialOffset: "oldest",
      autoCreateTopics: "true", autoCreateTopicPartitions: "1", backOffDuration: "1s",
    },
    "aws.snssqs": {
      endpoint: SNSSQS_ENDPOINT, region: "us-east-1", accessKey: "test", secretKey: "test",
      messageVisibilityTimeout: "2",
    },
    "gcp.pubsub": { endpoint: PUBSUB_EMULATOR, projectId: `e2e-${testTag}` },
    // a private test broker per test (isolateBroker); a refused message comes back after
    // redeliveryDelay (Dapr's default: 30 s)
    pulsar: { host: pulsarUrl, redeliveryDelay: "500ms" },
    // a private Service Bus test broker per test (isolateBroker)
    "azure.servicebus.topics": { connectionString: serviceBusConnection },
    "azure.servicebus.queues": { connectionString: serviceBusConnection },
    // the test broker's event hubs (made by the first READ) with checkpoints in this
    // process's Azurite, a container per test; a refused event comes again after 1 s
    "azure.eventhubs": {
      connectionString: serviceBusConnection, storageConnectionString: azuriteConnection,
      storageContainerName: `e2e-${testTag}`, backOffDuration: "1s", backOffMaxRetries: "-1",
    },
  }[PUBSUB];
}

export function pubsubComponent(name, metadata = {}) {
  const merged = { ...brokerMetadata(), ...metadata };
  // consumerID names the SQS queue: two components of one app need two queues
  if (PUBSUB === "aws.snssqs" && !("consumerID" in metadata)) merged.consumerID = `{appID}-${name}`;
  const items = Object.entries(merged).map(([k, v]) => `{name: ${k}, value: "${v}"}`).join(", ");
  return `apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: ${name}\nspec:\n  type: pubsub.${PUBSUB}\n  version: v1\n  metadata: [${items}]\n`;
}

/** Gives the next test a fresh slice of the broker under test; returns its cleanup. */
export async function isolateBroker() {
  testTag = randomUUID().replaceAll("-", "").slice(0, 10);
  if (PUBSUB === "redis") execFileSync("redis-cli", ["-n", REDIS_DB, "FLUSHDB"]);
  if (PUBSUB === "aws.snssqs") {
    const r = await fetch(`${SNSSQS_ENDPOINT}/moto-api/reset`, { method: "POST" });
    if (!r.ok) throw new Error(`moto reset: ${r.status}`);
  }
  if (PUBSUB === "kafka") return startTansu();
  if (PUBSUB === "pulsar") {
    const { first, stop } = await startOwnBroker(PULSAR_BROKER);
    pulsarUrl = first;
    return stop;
  }
  if (PUBSUB.startsWith("azure.")) {
    // the Service Bus test broker serves event hubs too
    const { first, stop } = await startOwnBroker(SERVICEBUS_BROKER);
    serviceBusConnection = first;
    if (PUBSUB === "azure.eventhubs") await startAzurite();
    return stop;
  }
  if (PUBSUB !== "jetstream") return async () => {};
  // Dapr's JetStream component needs streams holding the subjects: single-token topic names
  // in one stream ("*"), dead-letter topics "dlq.<x>" in another (a dead-letter republish
  // keeps the Nats-Msg-Id and would be dropped as a duplicate in the source's stream).
  const { connect } = await import("nats");
  const nc = await connect({ servers: NATS_URL });
  const jsm = await nc.jetstreamManager();
  const name = `e2e-js-${testTag}`;
  await jsm.streams.add({ name, subjects: ["*"], max_age: 600e9 });
  await jsm.streams.add({ name: `${name}-dlt`, subjects: ["dlq.>"], max_age: 600e9 });
  return async () => {
    await jsm.streams.delete(name);
    await jsm.streams.delete(`${name}-dlt`);
    await nc.close();
  };
}

// Azurite (Microsoft's Azure Storage emulator; scripts/services.sh installs it into .azurite):
// one Blob service per test process, started on first use, stopped when the process exits.
const AZURITE_BLOB = process.env.AZURITE_BLOB ?? join(ROOT, ".azurite", "node_modules", ".bin", "azurite-blob");
const AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
let azuriteConnection = "";

async function startAzurite() {
  if (azuriteConnection) return;
  const port = await freePort();
  const location = mkdtempSync(join(tmpdir(), "azurite-"));
  const proc = spawn(AZURITE_BLOB, ["--blobHost", "127.0.0.1", "--blobPort", String(port),
    "--location", location, "--silent", "--skipApiVersionCheck", "--loose"], { stdio: "ignore" });
  proc.unref();
  process.on("exit", () => {
    proc.kill("SIGKILL");
    rmSync(location, { recursive: true, force: true });
  });
  const deadline = Date.now() + 30_000;
  while (!(await listening(port))) {
    if (Date.now() > deadline) throw new Error(`Azurite did not listen on ${port} within 30 s`);
    await new Promise((r) => setTimeout(r, 100));
  }
  azuriteConnection = `DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=${AZURITE_KEY};`
    + `BlobEndpoint=http://127.0.0.1:${port}/devstoreaccount1;`;
}

/** One of the repository's own test brokers on a free port: its first line of output (how to
 * reach it) and its stop. */
async function startOwnBroker(binary) {
  const port = await freePort();
  const proc = spawn(binary, ["--port", String(port)], { stdio: ["pipe", "pipe", "ignore"] });
  const first = await new Promise((res, rej) => {
    let out = "";
    proc.stdout.on("data", (d) => {
      out += d;
      if (out.includes("\n")) res(out.split("\n")[0].trim());
    });
    proc.on("error", rej);
    proc.on("exit", () => rej(new Error(`${binary} exited before it listened`)));
  });
  const stop = async () => {
    proc.kill("SIGKILL");
    await new Promise((r) => (proc.exitCode !== null || proc.signalCode !== null ? r() : proc.on("exit", r)));
  };
  return { first, stop };
}

/** Whether something accepts connections on 127.0.0.1:`port`. */
function listening(port) {
  return new Promise((res) => {
    const sock = connect(port, "127.0.0.1");
    sock.on("connect", () => { sock.destroy(); res(true); });
    sock.on("error", () => res(false));
  });
}

/** A private Kafka-protocol broker (tansu, in-memory storage) on a free port; returns its stop. */
async function startTansu() {
  kafkaPort = await freePort();
  const url = `tcp://127.0.0.1:${kafkaPort}`;
  const proc = spawn("tansu", ["broker", "--listener-url", url, "--advertised-listener-url", url,
    "--storage-engine", "memory://tansu/"], { stdio: "ignore" });
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (await listening(kafkaPort)) break;
    if (Date.now() > deadline) throw new Error("tansu did not listen");
    await new Promise((r) => setTimeout(r, 50));
  }
  return async () => {
    proc.kill("SIGKILL");
    await new Promise((r) => (proc.exitCode !== null ? r() : proc.on("exit", r)));
  };
}

// Ports for the tests' servers come from below the kernel's range of local ports for outgoing
// connections: a poller connecting to a port nobody listens on yet could otherwise be given
// that very port as its own and connect to itself, and the server could not bind it.
const EPHEMERAL_LOW = (() => {
  try {
    return Number(readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/)[0]);
  } catch {
    return 32768;
  }
})();
const PORT_LOW = Math.max(1024, EPHEMERAL_LOW - 12000);

function bindable(port) {
  return new Promise((res) => {
    const srv = createServer();
    srv.once("error", () => res(false));
    srv.listen(port, "127.0.0.1", () => srv.close(() => res(true)));
  });
}

export async function freePort() {
  for (let i = 0; i < 1000; i++) {
    const port = PORT_LOW + Math.floor(Math.random() * (EPHEMERAL_LOW - PORT_LOW));
    if (await bindable(port)) return port;
  }
  throw new Error(`no free port in ${PORT_LOW}..${EPHEMERAL_LOW}`);
}

// Sidecars not yet stopped: stopSidecars() ends them even when a test failed half-way (a
// running child would keep the test process alive).
const live = new Set();
export async function stopSidecars() {
  await Promise.all([...live].map((s) => s.stop()));
}

export async function startSidecar({ resources = [pubsubComponent("pubsub")], appId = "checkout", env = {}, appPort, appProtocol = "http", waitFor = "/v1.0/healthz/outbound" } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "daprd-e2e-js-"));
  resources.forEach((doc, i) => writeFileSync(join(dir, `c${i}.yaml`), doc));
  const httpPort = await freePort();
  const grpcPort = await freePort();
  let output = "";
  const proc = spawn(DAPRD, [
    "--app-id", appId, "--dapr-http-port", String(httpPort), "--dapr-grpc-port", String(grpcPort),
    "--dapr-listen-addresses", "127.0.0.1", "--resources-path", dir,
    "--metrics-port", "0", "--metrics-listen-address", "127.0.0.1",
    ...(appPort ? ["--app-port", String(appPort), "--app-protocol", appProtocol] : []),
  ], { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  proc.stdout.on("data", (d) => (output += d));
  proc.stderr.on("data", (d) => (output += d));
  const http = `http://127.0.0.1:${httpPort}`;
  const waitUntil = async (path) => {
    const deadline = Date.now() + 20000;
    for (;;) {
      if (proc.exitCode !== null) throw new Error(`daprd exited ${proc.exitCode}: ${output}`);
      try {
        const r = await fetch(`${http}${path}`);
        if (r.status === 204) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > deadline) throw new Error(`daprd not healthy at ${path}: ${output}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  const sidecar = {
    http, httpPort, grpcPort, output: () => output, waitUntil,
    async stop() {
      live.delete(sidecar);
      if (proc.exitCode === null && proc.signalCode === null) {
        const exited = new Promise((r) => proc.once("exit", r));
        proc.kill("SIGTERM");
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
  live.add(sidecar);
  if (waitFor) await waitUntil(waitFor);
  return sidecar;
}
