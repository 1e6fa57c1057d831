// @tensafe/client as another package sees it: a temporary package that depends on
// file:clients/node imports it by name (the `exports` map), and TypeScript checks a
// consumer against the published types (and rejects a wrong call).

import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { PACKAGE_DIR, assertBuilt } from "./stack.mjs";

assertBuilt();

const TSC = join(PACKAGE_DIR, "node_modules", "typescript", "bin", "tsc");

describe("a package that depends on @tensafe/client", { timeout: 180_000 }, () => {
  let consumer;

  before(() => {
    consumer = mkdtempSync(join(tmpdir(), "tensafe-node-consumer-"));
    writeFileSync(
      join(consumer, "package.json"),
      JSON.stringify({
        name: "consumer",
        private: true,
        type: "module",
        dependencies: { "@tensafe/client": `file:${PACKAGE_DIR}` },
      }),
    );
    execFileSync("npm", ["install", "--offline", "--no-audit", "--no-fund", "--loglevel=error"], {
      cwd: consumer,
      stdio: "pipe",
    });
    writeFileSync(
      join(consumer, "tsconfig.json"),
      JSON.stringify({
        compilerOptions: {
          module: "NodeNext",
          moduleResolution: "NodeNext",
          target: "ES2022",
          strict: true,
          noEmit: true,
          typeRoots: [join(PACKAGE_DIR, "node_modules", "@types")],
          types: ["node"],
        },
      }),
    );
  });

  after(() => rmSync(consumer, { recursive: true, force: true }));

  it("imports it by name", () => {
    const script =
      'const m = await import("@tensafe/client");' +
      "const g = await import(\"@tensafe/client/gen/tensafe/trainer/v1/trainer_service_pb.js\");" +
      "console.log(JSON.stringify({ client: typeof m.TenSafeClient, error: typeof m.TenSafeError," +
      " sameSchema: m.trainerV1.DatumSchema === g.DatumSchema }));";
    const out = execFileSync("node", ["--input-type=module", "-e", script], { cwd: consumer, encoding: "utf8" });
    assert.deepEqual(JSON.parse(out), { client: "function", error: "function", sameSchema: true });
  });

  function typecheck(source) {
    writeFileSync(join(consumer, "main.ts"), source);
    return spawnSync("node", [TSC, "-p", "."], { cwd: consumer, encoding: "utf8" });
  }

  it("type-checks a consumer against its types, and rejects a wrong call", () => {
    const good = typecheck(`
      import { TenSafeClient, TenSafeError, trainerV1, type DatumInit } from "@tensafe/client";
      const client = TenSafeClient.fromConnectionFile(".tensafe/connection.json");
      const datum: DatumInit = { modelInput: { chunks: [] }, lossFnInputs: {
        weights: { dtype: trainerV1.DType.FLOAT32, floatData: [1] } } };
      export async function step(): Promise<bigint> {
        const training = await client.createTrainingClient({ baseModel: "tiny-llama" });
        await (await training.forwardBackward([datum])).result();
        const optim = await training.optimStep({ learningRate: 1e-3 });
        try {
          return (await optim.result()).step;
        } catch (error) {
          if (error instanceof TenSafeError) console.log(error.codeName, error.code);
          throw error;
        }
      }
    `);
    assert.equal(good.status, 0, good.stdout + good.stderr);
    const bad = typecheck(`
      import { TenSafeClient } from "@tensafe/client";
      const client = new TenSafeClient({ auth: "127.0.0.1:1" });
      export const wrong = client.createTrainingClient({ baseModel: 7 });
    `);
    assert.notEqual(bad.status, 0);
    assert.match(bad.stdout, /main\.ts\(4,.*TS2322: Type .number. is not assignable to type .string./);
  });
});
