// Publishing through daprd-rs with the official JavaScript SDK, over HTTP and gRPC.
import { test, after, before } from "node:test";
import assert from "node:assert/strict";
import { DaprClient, CommunicationProtocolEnum, LogLevel } from "@dapr/dapr";
import { startSidecar, pubsubComponent, isolateBroker, PUBSUB } from "./sidecar.mjs";

let sidecar;
let cleanup;
before(async () => {
  cleanup = await isolateBroker();
  sidecar = await startSidecar({ resources: [pubsubComponent("pubsub"), pubsubComponent("scoped", { allowedTopics: "only" })] });
});
after(async () => {
  await sidecar?.stop();
  await cleanup?.();
});

// The HTTP client returns `{ error }`; the gRPC client throws `{ error }`.
async function publishOutcome(promise) {
  try {
    return await promise;
  } catch (thrown) {
    return thrown;
  }
}

function client(protocol) {
  const port = protocol === CommunicationProtocolEnum.GRPC ? sidecar.grpcPort : sidecar.httpPort;
  return new DaprClient({
    daprHost: "127.0.0.1",
    daprPort: String(port),
    communicationProtocol: protocol,
    logger: { level: LogLevel.Error },
  });
}

for (const [name, protocol] of [["HTTP", CommunicationProtocolEnum.HTTP], ["gRPC", CommunicationProtocolEnum.GRPC]]) {
  test(`${name}: publish JSON, text and bulk`, async () => {
    const c = client(protocol);
    try {
      let r = await c.pubsub.publish("pubsub", "orders", { orderId: 1 });
      assert.equal(r.error, undefined, String(r.error));
      r = await c.pubsub.publish("pubsub", "orders", "plain text", { contentType: "text/plain" });
      assert.equal(r.error, undefined, String(r.error));
      const bulk = await c.pubsub.publishBulk("pubsub", "orders", ["a", { b: 1 }]);
      assert.deepEqual(bulk.failedMessages, []);
      const md = await c.metadata.get();
      assert.equal(md.id, "checkout");
      assert.ok(md.components.some((x) => x.name === "pubsub" && x.type === `pubsub.${PUBSUB}`), JSON.stringify(md));
    } finally {
      await c.stop();
    }
  });

  test(`${name}: unknown pubsub and forbidden topic come back as errors`, async () => {
    const c = client(protocol);
    try {
      const r1 = await publishOutcome(c.pubsub.publish("nope", "orders", { a: 1 }));
      assert.ok(r1.error, "publishing to an unknown pubsub fails");
      assert.match(String(r1.error?.message ?? r1.error), /pubsub nope is not found|ERR_PUBSUB_NOT_FOUND|INVALID_ARGUMENT/);
      const r2 = await publishOutcome(c.pubsub.publish("scoped", "other", { a: 1 }));
      assert.ok(r2.error, "publishing to a topic outside allowedTopics fails");
      assert.match(String(r2.error?.message ?? r2.error), /not allowed for app id checkout|ERR_PUBSUB_FORBIDDEN|PERMISSION_DENIED/);
      const r3 = await publishOutcome(c.pubsub.publish("scoped", "only", { a: 1 }));
      assert.equal(r3.error, undefined);
    } finally {
      await c.stop();
    }
  });
}

test("the README command serves an SDK given no configuration", async (t) => {
  const { spawn } = await import("node:child_process");
  const { DAPRD } = await import("./sidecar.mjs");
  const net = await import("node:net");
  const busy = (port) => new Promise((res) => {
    const s = net.connect(port, "127.0.0.1");
    s.once("connect", () => { s.destroy(); res(true); });
    s.once("error", () => res(false));
  });
  if ((await busy(3500)) || (await busy(50001))) {
    t.skip("default ports are busy on this machine");
    return;
  }
  const root = new URL("../../../", import.meta.url).pathname;
  const proc = spawn(DAPRD, ["--app-id", "checkout", "--resources-path", `${root}examples/resources`], { stdio: "ignore" });
  try {
    const deadline = Date.now() + 20000;
    while (!(await busy(3500)) || !(await busy(50001))) {
      assert.ok(Date.now() < deadline, "daprd did not start listening");
      await new Promise((r) => setTimeout(r, 50));
    }
    for (const protocol of [CommunicationProtocolEnum.HTTP, CommunicationProtocolEnum.GRPC]) {
      const env = { ...process.env };
      delete process.env.DAPR_HTTP_PORT;
      delete process.env.DAPR_GRPC_PORT;
      const c = new DaprClient({ communicationProtocol: protocol, logger: { level: LogLevel.Error } });
      try {
        const r = await c.pubsub.publish("pubsub", "orders", { orderId: 42 });
        assert.equal(r.error, undefined, String(r.error));
      } finally {
        await c.stop();
        Object.assign(process.env, env);
      }
    }
  } finally {
    const exited = new Promise((r) => proc.once("exit", r));
    proc.kill("SIGTERM");
    assert.equal(await exited, 0, "SIGTERM leads to a clean exit");
  }
});
