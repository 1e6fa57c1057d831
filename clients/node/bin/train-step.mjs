#!/usr/bin/env node
// One DP-SGD step through the TenSafe API from Node: exchange the API key for an
// access token, create a private (DP) LoRA training client, run ForwardBackward and
// OptimStep (waiting on both futures), then read the privacy spent.
//
// Usage: node bin/train-step.mjs [--connection-file FILE] [--base-model NAME]
//          [--noise-multiplier X] [--max-grad-norm C] [--delta D]
// Reads the services and the API key from the connection file written by `tensafe up`
// (default .tensafe/connection.json; $TENSAFE_API_KEY overrides the key), and its TLS
// settings: the connection file's `tls` block (`tensafe up --tls`) or $TENSAFE_CA_FILE,
// $TENSAFE_CLIENT_CERT_FILE, $TENSAFE_CLIENT_KEY_FILE. Prints one
// JSON object with the client id, loss, step and privacy spent; exits 1 on an error.

import { randomUUID } from "node:crypto";
import process from "node:process";
import { parseArgs } from "node:util";

import {
  Accountant,
  DType,
  ForwardBackwardResultSchema,
  OptimStepResultSchema,
} from "../gen/tensafe/trainer/v1/trainer_service_pb.js";
import { TenSafeClient, readConnection, resolveTls } from "../lib/tensafe.mjs";

const { values: args } = parseArgs({
  options: {
    "connection-file": {
      type: "string",
      default: process.env.TENSAFE_CONNECTION_FILE || ".tensafe/connection.json",
    },
    "base-model": { type: "string" },
    "noise-multiplier": { type: "string", default: "1.0" },
    "max-grad-norm": { type: "string", default: "1.0" },
    delta: { type: "string", default: "1e-5" },
  },
});

// A short token sequence inside any vocabulary of >= 64 ids; the model predicts each
// next token (cross_entropy on target_tokens = tokens shifted by one).
function datum(tokens) {
  const inputs = tokens.slice(0, -1).map(BigInt);
  const targets = tokens.slice(1).map(BigInt);
  return {
    modelInput: { chunks: [{ chunk: { case: "encodedText", value: { tokens: inputs } } }] },
    lossFnInputs: {
      target_tokens: { dtype: DType.INT64, intData: targets },
      weights: { dtype: DType.FLOAT32, floatData: targets.map(() => 1.0) },
    },
  };
}

async function main() {
  const connection = readConnection(args["connection-file"]);
  const apiKey = process.env.TENSAFE_API_KEY || connection.api_key;
  const client = new TenSafeClient(connection.services, { tls: resolveTls(connection) });
  try {
    const exchanged = await client.exchangeApiKey(apiKey);

    let baseModel = args["base-model"];
    if (!baseModel) {
      const { baseModels } = await client.callTrainer("listBaseModels", {});
      if (baseModels.length === 0) throw new Error("the deployment serves no base model");
      baseModel = baseModels[0].name;
    }
    const { trainingClient } = await client.callTrainer("createTrainingClient", {
      baseModel,
      lora: { rank: 4, alpha: 8, seed: 7n },
      dp: {
        noise: { case: "noiseMultiplier", value: Number(args["noise-multiplier"]) },
        maxGradNorm: Number(args["max-grad-norm"]),
        delta: Number(args.delta),
        accountant: Accountant.RDP,
      },
      requestId: randomUUID(),
    });

    const batch = [datum([3, 9, 14, 22, 31, 40]), datum([5, 11, 17, 23, 29, 37])];
    const forwardBackward = await client.callTrainer("forwardBackward", {
      trainingClientId: trainingClient.id,
      data: batch,
      lossFn: "cross_entropy",
      requestId: randomUUID(),
    });
    const fbResult = await client.waitFuture(forwardBackward.future, ForwardBackwardResultSchema);

    const optim = await client.callTrainer("optimStep", {
      trainingClientId: trainingClient.id,
      adamParams: { learningRate: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8 },
      requestId: randomUUID(),
    });
    const optimResult = await client.waitFuture(optim.future, OptimStepResultSchema);

    const { privacySpent } = await client.callTrainer("getPrivacySpent", {
      trainingClientId: trainingClient.id,
    });
    const report = {
      tenant_id: exchanged.tenantId,
      training_client_id: trainingClient.id,
      base_model: baseModel,
      private: trainingClient.private,
      metrics: fbResult.metrics,
      optim_step: Number(optimResult.step),
      privacy_spent: {
        epsilon: privacySpent.epsilon,
        delta: privacySpent.delta,
        steps: Number(privacySpent.steps),
        noise_multiplier: privacySpent.noiseMultiplier,
        accountant: Accountant[privacySpent.accountant],
        private: privacySpent.private,
      },
    };
    console.log(JSON.stringify(report));
  } finally {
    client.close();
  }
}

main().catch((error) => {
  console.error(`train-step: ${error.message}`);
  process.exit(1);
});
