// Starts the built daprd binary on free loopback ports with its own resources dir.
import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const DAPRD = process.env.DAPRD_BIN ?? join(ROOT, "target", "debug", "daprd");

export function inMemory(name, metadata = {}) {
  const items = Object.entries(metadata).map(([k, v]) => `{name: ${k}, value: "${v}"}`).join(", ");
  return `apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: ${name}\nspec:\n  type: pubsub.in-memory\n  version: v1\n  metadata: [${items}]\n`;
}

export function freePort() {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
    srv.on("error", rej);
  });
}

export async function startSidecar({ resources = [inMemory("pubsub")], appId = "checkout", env = {}, appPort, appProtocol = "http", waitFor = "/v1.0/healthz/outbound" } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "daprd-e2e-js-"));
  resources.forEach((doc, i) => writeFileSync(join(dir, `c${i}.yaml`), doc));
  const httpPort = await freePort();
  const grpcPort = await freePort();
  let output = "";
  const proc = spawn(DAPRD, [
    "--app-id", appId, "--dapr-http-port", String(httpPort), "--dapr-grpc-port", String(grpcPort),
    "--dapr-listen-addresses", "127.0.0.1", "--resources-path", dir,
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
  if (waitFor) await waitUntil(waitFor);
  return {
    http, httpPort, grpcPort, output: () => output, waitUntil,
    async stop() {
      if (proc.exitCode === null) {
        const exited = new Promise((r) => proc.once("exit", r));
        proc.kill("SIGTERM");
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
