// The client against a real stack (`tensafe up` on a temporary data dir): auth,
// training through futures, checkpoints, the registry and HE-LoRA sessions, and the
// gRPC codes of refusals, and bin/train-step.mjs. One stack for the whole file; the tests run in order and
// build on each other (the adapter the trainer publishes is the one HE uses).

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import {
  Code,
  TenSafeClient,
  TenSafeError,
  checkHealth,
  commonV1,
  nextTokenDatum,
  trainerV1,
} from "@tensafe/client";

import { PACKAGE_DIR, assertBuilt, startStack } from "./stack.mjs";

assertBuilt();

const BASE_MODEL = "tiny-llama"; // what `tensafe up` installs in a fresh data dir
const ADAPTER = "node-adapter";
const LORA = { rank: 4, alpha: 8 };


/** Asserts that `promise` rejects with a TenSafeError of gRPC code `codeName`. */
async function rejectsWith(promise, codeName, where) {
  await assert.rejects(promise, (error) => {
    assert.ok(error instanceof TenSafeError, `not a TenSafeError: ${error}`);
    assert.equal(error.codeName, codeName, error.message);
    if (where) assert.equal(error.where, where);
    return true;
  });
}

describe("against tensafe up", { timeout: 600_000 }, () => {
  let stack;
  let admin;
  let trainer;
  let credentials;
  let training;

  before(async () => {
    stack = await startStack();
    admin = TenSafeClient.fromConnectionFile(stack.connectionFile, {
      apiKey: stack.connection.api_key,
    });
  });

  after(async () => {
    admin?.close();
    trainer?.close();
    await stack?.stop();
  });

  it("reports every service SERVING over grpc.health.v1", async () => {
    const results = await checkHealth(stack.connection.services);
    assert.deepEqual(
      results.map((r) => [r.service, r.status]).sort(),
      [["auth", "SERVING"], ["he_runtime", "SERVING"], ["registry", "SERVING"], ["trainer", "SERVING"]],
    );
  });

  it("exchanges the admin key, creates a tenant and trains as its trainer, not as admin", async () => {
    const exchanged = await admin.login();
    assert.ok(exchanged.scopes.includes("platform_admin"));
    credentials = await admin.createTenantWithTrainer("node-tenant");
    trainer = new TenSafeClient(stack.connection.services, { apiKey: credentials.apiKey });
    await trainer.login();
    const identity = trainer.identity;
    assert.equal(identity.tenantId, credentials.tenantId);
    assert.equal(identity.principalId, credentials.principalId);
    assert.ok(identity.scopes.includes("train"));
    assert.ok(!identity.scopes.includes("platform_admin"));
    assert.ok(identity.expires.getTime() > Date.now());
  });

  it("refreshes its token on request and keeps working with the new one", async () => {
    const before = await trainer.accessToken();
    const refreshed = await trainer.refresh();
    assert.notEqual(refreshed.accessToken, before);
    assert.equal(await trainer.accessToken(), refreshed.accessToken);
    const models = await trainer.listBaseModels();
    assert.ok(models.map((model) => model.name).includes(BASE_MODEL));
  });

  it("renews a token that is about to expire before the call", async () => {
    // A renewal margin longer than the token's life: every call must exchange first.
    const eager = new TenSafeClient(stack.connection.services, {
      apiKey: credentials.apiKey,
      tokenTtlMs: 60_000,
      tokenRenewalMarginMs: 120_000,
    });
    try {
      await eager.listBaseModels();
      const first = eager.identity.expires.getTime();
      await new Promise((resolve) => setTimeout(resolve, 1100)); // JWT times are in seconds
      await eager.listBaseModels();
      assert.ok(eager.identity.expires.getTime() > first);
    } finally {
      eager.close();
    }
  });

  it("refuses a wrong API key with UNAUTHENTICATED", async () => {
    const stranger = new TenSafeClient(stack.connection.services, { apiKey: "tsk_wrong_key" });
    try {
      await rejectsWith(stranger.listBaseModels(), "UNAUTHENTICATED", "/tensafe.auth.v1.AuthService/ExchangeApiKey");
    } finally {
      stranger.close();
    }
  });

  it("runs a DP step through futures: ForwardBackward, OptimStep, privacy spent", async () => {
    training = await trainer.createTrainingClient({
      baseModel: BASE_MODEL,
      lora: { ...LORA, seed: 7n },
      dp: {
        noise: { case: "noiseMultiplier", value: 1.0 },
        maxGradNorm: 1.0,
        delta: 1e-5,
        accountant: trainerV1.Accountant.RDP,
      },
    });
    assert.ok(training.id);
    assert.equal(training.info.private, true);

    const pending = await training.forwardBackward([
      nextTokenDatum([3, 9, 14, 22, 31, 40]),
      nextTokenDatum([5, 11, 17, 23, 29, 37]),
    ]);
    const state = await trainer.getFuture(pending.id);
    assert.equal(state.id, pending.id);
    assert.equal(state.kind, pending.future.kind);
    const fb = await pending.result();
    assert.equal(fb.metrics["tokens:sum"], 10);
    const loss = fb.metrics["loss:sum"];
    // Ten next-token predictions by a small pretrained model: finite, positive, and
    // below ten uniform guesses over a 32k vocabulary.
    assert.ok(Number.isFinite(loss) && loss > 0 && loss < 10 * Math.log(32_000), `${loss}`);

    const optim = await training.optimStep({ learningRate: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8 });
    assert.equal((await optim.result()).step, 1n);
    // A finished future can be waited on again by id, from the trainer's record.
    const again = await trainer.waitFuture(optim.id, trainerV1.OptimStepResultSchema);
    assert.equal(again.step, 1n);
    assert.equal((await trainer.getFuture(optim.id)).status, commonV1.FutureStatus.SUCCEEDED);

    const spent = await training.privacySpent();
    assert.equal(spent.private, true);
    assert.equal(spent.steps, 1n);
    assert.equal(spent.noiseMultiplier, 1.0);
    assert.ok(spent.epsilon > 0 && Number.isFinite(spent.epsilon), `${spent.epsilon}`);
  });

  it("saves a checkpoint", async () => {
    const saved = await (await training.saveState("node-ckpt")).result();
    assert.equal(saved.step, 1n);
    assert.match(saved.path, /node-ckpt$/);
  });

  it("names the field of a bad request and the missing training client", async () => {
    await rejectsWith(training.forwardBackward([]), "INVALID_ARGUMENT", "/tensafe.trainer.v1.TrainerService/ForwardBackward");
    await rejectsWith(trainer.trainingClient("no-such-client"), "NOT_FOUND");
    await rejectsWith(trainer.waitFuture("no-such-future", trainerV1.OptimStepResultSchema), "NOT_FOUND");
  });

  it("publishes the adapter and finds it in the registry (list, get)", async () => {
    const published = await (await training.saveAdapter(ADAPTER)).result();
    assert.equal(published.adapterName, ADAPTER);
    assert.equal(published.version, 1n);
    assert.match(published.packageSha256, /^[0-9a-f]{64}$/);
    const adapters = await trainer.listAdapters();
    assert.deepEqual(adapters.map((adapter) => adapter.name), [ADAPTER]);
    const adapter = await trainer.getAdapter(ADAPTER);
    assert.equal(adapter.latestVersion, 1n);
    await rejectsWith(trainer.getAdapter("no-such-adapter"), "NOT_FOUND", "/tensafe.registry.v1.RegistryService/GetAdapter");
    // Another tenant's registry does not show it.
    assert.ok(!(await admin.listAdapters()).some((a) => a.name === ADAPTER));
  });

  it("opens an HE-LoRA session with real CKKS keys, applies a layer, closes it", async () => {
    const config = JSON.parse(readFileSync(join(stack.dataDir, "models", BASE_MODEL, "config.json"), "utf8"));
    const hidden = config.hidden_size;
    const keysDir = mkdtempSync(join(tmpdir(), "tensafe-node-he-"));
    try {
      const keys = JSON.parse(
        execFileSync(stack.python, [
          join(PACKAGE_DIR, "test", "he_keys.py"),
          String(hidden), String(hidden), String(LORA.rank), String(LORA.alpha), keysDir,
        ], { encoding: "utf8" }),
      );
      const spec = {
        hiddenSize: BigInt(hidden),
        outputSize: BigInt(hidden),
        rank: BigInt(LORA.rank),
        alpha: LORA.alpha,
        tokens: 1n,
        parameters: {
          polyModulusDegree: BigInt(keys.poly_modulus_degree),
          coeffModulusBits: keys.coeff_modulus_bits,
          scaleBits: keys.scale_bits,
        },
      };
      const plan = await trainer.compilePlan(spec);
      assert.deepEqual(plan.rotationSteps.map(Number), keys.rotation_steps);

      await rejectsWith(trainer.createHeSession({ adapterName: ADAPTER }), "INVALID_ARGUMENT");
      const galoisKeys = readFileSync(join(keysDir, "galois_keys.bin"));
      const session = await trainer.createHeSession(
        { adapterName: ADAPTER, spec, sealParameters: readFileSync(join(keysDir, "parameters.bin")) },
        galoisKeys,
        { chunkBytes: 256 * 1024 }, // several chunks: the keys are MBs
      );
      assert.ok(galoisKeys.length > 256 * 1024);
      assert.equal(session.plan.planId, plan.planId);
      assert.equal(session.keyBytes, BigInt(galoisKeys.length));
      assert.ok(session.layers.length > 0);
      assert.equal((await trainer.getHeSession(session.id)).id, session.id);

      // One token's encrypted activations through a square (hidden x hidden) layer:
      // the runtime answers with the plan's ciphertexts and the work the plan states.
      const layer = session.layers.find((name) => name.endsWith("q_proj"));
      assert.ok(layer, session.layers.join(", "));
      const ciphertexts = Array.from({ length: keys.input_ciphertexts }, (_, index) =>
        readFileSync(join(keysDir, `ciphertext-${index}.bin`)));
      const applied = await trainer.applyLora(session.id, layer, ciphertexts, { chunkBytes: 64 * 1024 });
      assert.equal(applied.ciphertexts.length, keys.output_ciphertexts);
      assert.ok(applied.ciphertexts.every((blob) => blob.length > 0));
      assert.equal(applied.summary.counts.rotations, plan.rotations);
      assert.equal(applied.summary.counts.rescales, plan.rescales);
      await rejectsWith(trainer.applyLora(session.id, "no.such.layer", ciphertexts), "INVALID_ARGUMENT");
      await trainer.closeHeSession(session.id);
      await rejectsWith(trainer.getHeSession(session.id), "NOT_FOUND");
    } finally {
      rmSync(keysDir, { recursive: true, force: true });
    }
  });

  it("bin/train-step.mjs spends exactly the RDP ε of one Gaussian step", () => {
    const noise = 1.5;
    const delta = 1e-5;
    const report = JSON.parse(
      execFileSync("node", [
        join(PACKAGE_DIR, "bin", "train-step.mjs"),
        "--connection-file", stack.connectionFile,
        "--noise-multiplier", String(noise),
        "--delta", String(delta),
      ], { encoding: "utf8", env: { ...process.env, TENSAFE_API_KEY: credentials.apiKey } }),
    );
    assert.equal(report.tenant_id, credentials.tenantId);
    assert.equal(report.base_model, BASE_MODEL);
    assert.equal(report.optim_step, 1);
    assert.equal(report.privacy_spent.accountant, "RDP");
    assert.equal(report.privacy_spent.steps, 1);
    // The client hands in its own batches, so a step is a full Gaussian mechanism (no
    // subsampling amplification): what dp_accounting's RDP accountant computes.
    const expected = Number(
      execFileSync(stack.python, ["-c", [
        "import dp_accounting",
        "from dp_accounting.rdp import rdp_privacy_accountant as r",
        "a = r.RdpAccountant()",
        `a.compose(dp_accounting.GaussianDpEvent(${noise}))`,
        `print(a.get_epsilon(${delta}))`,
      ].join("\n")], { encoding: "utf8" }),
    );
    assert.ok(Math.abs(report.privacy_spent.epsilon - expected) <= 1e-6 * expected,
      `${report.privacy_spent.epsilon} != ${expected}`);
  });

  it("keeps Connect's code numbers: gRPC's", () => {
    assert.equal(Code.NotFound, 5);
  });
});
