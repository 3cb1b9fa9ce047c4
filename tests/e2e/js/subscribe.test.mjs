// Delivery to apps written with the official JavaScript SDK's DaprServer, over HTTP and gRPC.
import { afterEach, beforeEach, test } from "node:test";
import assert from "node:assert/strict";
import { DaprClient, DaprServer, CommunicationProtocolEnum, DaprPubSubStatusEnum, LogLevel } from "@dapr/dapr";
import { startSidecar, stopSidecars, freePort, isolateBroker } from "./sidecar.mjs";

let cleanup;
beforeEach(async () => {
  cleanup = await isolateBroker();
});
afterEach(async () => {
  await stopSidecars();
  await cleanup?.();
});

async function eventually(check, what, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

for (const [name, protocol, appProtocol] of [
  ["HTTP", CommunicationProtocolEnum.HTTP, "http"],
  ["gRPC", CommunicationProtocolEnum.GRPC, "grpc"],
]) {
  test(`DaprServer over ${name} receives events and dead letters`, async () => {
    const appPort = await freePort();
    // daprd waits for the app port before discovering subscriptions.
    const sidecar = await startSidecar({ appPort, appProtocol, waitFor: "/v1.0/healthz/outbound" });
    const daprPort = String(protocol === CommunicationProtocolEnum.GRPC ? sidecar.grpcPort : sidecar.httpPort);
    const server = new DaprServer({
      serverHost: "127.0.0.1",
      serverPort: String(appPort),
      communicationProtocol: protocol,
      clientOptions: { daprHost: "127.0.0.1", daprPort, communicationProtocol: protocol },
      logger: { level: LogLevel.Error },
    });
    const got = { orders: [], dlq: [] };
    await server.pubsub.subscribe("pubsub", "orders", async (data) => {
      got.orders.push(data);
    });
    await server.pubsub.subscribeWithOptions("pubsub", "poison", {
      deadLetterTopic: "dlq.js",
      // (the SDK treats a thrown error as SUCCESS, so the handler says DROP explicitly)
      callback: async () => DaprPubSubStatusEnum.DROP,
    });
    await server.pubsub.subscribe("pubsub", "dlq.js", async (data) => {
      got.dlq.push(data);
    });
    await server.start();
    const client = new DaprClient({ daprHost: "127.0.0.1", daprPort: String(sidecar.httpPort), logger: { level: LogLevel.Error } });
    try {
      await sidecar.waitUntil("/v1.0/healthz");
      let r = await client.pubsub.publish("pubsub", "orders", { orderId: 5 });
      assert.equal(r.error, undefined);
      r = await client.pubsub.publish("pubsub", "poison", { bad: true });
      assert.equal(r.error, undefined);
      await eventually(() => got.orders.length === 1 && got.dlq.length === 1, "deliveries");
      assert.deepEqual(got.orders[0], { orderId: 5 });
      assert.deepEqual(got.dlq[0], { bad: true });
      const md = await client.metadata.get();
      const topics = md.subscriptions.map((s) => s.topic).sort();
      assert.deepEqual(topics, ["dlq.js", "orders", "poison"]);
    } finally {
      await client.stop();
      // The sidecar goes first: a gRPC app server only stops once daprd's connection closes.
      await sidecar.stop();
      await server.stop();
    }
  });
}

for (const [name, protocol, appProtocol] of [
  ["HTTP", CommunicationProtocolEnum.HTTP, "http"],
  ["gRPC", CommunicationProtocolEnum.GRPC, "grpc"],
]) {
  // Over gRPC the JS SDK implements only OnBulkTopicEventAlpha1: this also proves the fallback.
  test(`DaprServer.subscribeBulk over ${name}`, async () => {
    const appPort = await freePort();
    const sidecar = await startSidecar({ appPort, appProtocol, waitFor: "/v1.0/healthz/outbound" });
    const daprPort = String(protocol === CommunicationProtocolEnum.GRPC ? sidecar.grpcPort : sidecar.httpPort);
    const server = new DaprServer({
      serverHost: "127.0.0.1",
      serverPort: String(appPort),
      communicationProtocol: protocol,
      clientOptions: { daprHost: "127.0.0.1", daprPort, communicationProtocol: protocol },
      logger: { level: LogLevel.Error },
    });
    const got = [];
    await server.pubsub.subscribeBulk("pubsub", "bulk-orders", async (data) => {
      got.push(data);
    }, { maxMessagesCount: 10, maxAwaitDurationMs: 100 });
    await server.start();
    const client = new DaprClient({ daprHost: "127.0.0.1", daprPort: String(sidecar.httpPort), logger: { level: LogLevel.Error } });
    try {
      await sidecar.waitUntil("/v1.0/healthz");
      for (const n of [1, 2, 3]) {
        const r = await client.pubsub.publish("pubsub", "bulk-orders", { n });
        assert.equal(r.error, undefined);
      }
      await eventually(() => got.length === 3, "3 bulk-delivered events");
      assert.deepEqual(got.map((d) => d.n).sort(), [1, 2, 3]);
      const md = await client.metadata.get();
      assert.deepEqual(md.subscriptions.map((s) => s.topic), ["bulk-orders"]);
    } finally {
      await client.stop();
      await sidecar.stop();
      await server.stop();
    }
  });
}
