#!/usr/bin/env node
// One DP-SGD step through the TenSafe API from Node: exchange the API key for an
// access token, create a private (DP) LoRA training client, run ForwardBackward and
// OptimStep (waiting on both futures), then read the privacy spent.
//
// Usage: node bin/train-step.mjs [--connection-file FILE] [--base-model NAME]
//          [--noise-multiplier X] [--max-grad-norm C] [--delta D]
// Reads the services and the API key from the connection file written by `tensafe up`
// (default $TENSAFE_CONNECTION_FILE, else .tensafe/connection.json; $TENSAFE_API_KEY
// overrides the key), and its TLS settings: the connection file's `tls` block
// (`tensafe up --tls`) or $TENSAFE_CA_FILE, $TENSAFE_CLIENT_CERT_FILE,
// $TENSAFE_CLIENT_KEY_FILE. Prints one JSON object with the client id, loss, step and
// privacy spent; exits 1 on an error.

import process from "node:process";
import { parseArgs } from "node:util";

import { TenSafeClient, defaultConnectionPath, nextTokenDatum, trainerV1 } from "@tensafe/client";

const { values: args } = parseArgs({
  options: {
    "connection-file": { type: "string", default: defaultConnectionPath() },
    "base-model": { type: "string" },
    "noise-multiplier": { type: "string", default: "1.0" },
    "max-grad-norm": { type: "string", default: "1.0" },
    delta: { type: "string", default: "1e-5" },
  },
});


async function main() {
  const client = TenSafeClient.fromConnectionFile(args["connection-file"]);
  try {
    const exchanged = await client.login();
    let baseModel = args["base-model"];
    if (!baseModel) {
      const models = await client.listBaseModels();
      if (models.length === 0) throw new Error("the deployment serves no base model");
      baseModel = models[0].name;
    }
    const training = await client.createTrainingClient({
      baseModel,
      lora: { rank: 4, alpha: 8, seed: 7n },
      dp: {
        noise: { case: "noiseMultiplier", value: Number(args["noise-multiplier"]) },
        maxGradNorm: Number(args["max-grad-norm"]),
        delta: Number(args.delta),
        accountant: trainerV1.Accountant.RDP,
      },
    });
    // Short token sequences inside any vocabulary of >= 64 ids.
    const batch = [nextTokenDatum([3, 9, 14, 22, 31, 40]), nextTokenDatum([5, 11, 17, 23, 29, 37])];
    const forwardBackward = await (await training.forwardBackward(batch)).result();
    const optim = await (
      await training.optimStep({ learningRate: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8 })
    ).result();
    const spent = await training.privacySpent();
    console.log(
      JSON.stringify({
        tenant_id: exchanged.tenantId,
        training_client_id: training.id,
        base_model: baseModel,
        private: training.info.private,
        metrics: forwardBackward.metrics,
        optim_step: Number(optim.step),
        privacy_spent: {
          epsilon: spent.epsilon,
          delta: spent.delta,
          steps: Number(spent.steps),
          noise_multiplier: spent.noiseMultiplier,
          accountant: trainerV1.Accountant[spent.accountant],
          private: spent.private,
        },
      }),
    );
  } finally {
    client.close();
  }
}

main().catch((error) => {
  console.error(`train-step: ${error.message}`);
  process.exit(1);
});
