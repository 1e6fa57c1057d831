#!/usr/bin/env node
// Checks grpc.health.v1.Health/Check on each TenSafe service.
//
// Usage: node bin/health.mjs [--connection-file FILE] [host:port ...]
// With no addresses, reads the services from the connection file written by
// `tensafe up` (default .tensafe/connection.json). Prints one line per service and
// exits 0 only if every service reports SERVING.

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = dirname(fileURLToPath(import.meta.url));
const definition = protoLoader.loadSync("grpc/health/v1/health.proto", {
  includeDirs: [join(here, "..", "proto")],
  enums: String,
});
const { Health } = grpc.loadPackageDefinition(definition).grpc.health.v1;

function targets(argv) {
  const args = [...argv];
  let file = process.env.TENSAFE_CONNECTION_FILE || ".tensafe/connection.json";
  const i = args.indexOf("--connection-file");
  if (i >= 0) {
    file = args[i + 1];
    args.splice(i, 2);
  }
  if (args.length > 0) return args.map((address) => [address, address]);
  const connection = JSON.parse(readFileSync(file, "utf8"));
  return Object.entries(connection.services);
}

function check(address) {
  return new Promise((resolve) => {
    const client = new Health(address, grpc.credentials.createInsecure());
    const deadline = new Date(Date.now() + 5000);
    client.Check({ service: "" }, { deadline }, (err, response) => {
      client.close();
      resolve(err ? `UNREACHABLE (${grpc.status[err.code]})` : response.status);
    });
  });
}

const results = await Promise.all(
  targets(process.argv.slice(2)).map(async ([name, address]) => [name, address, await check(address)]),
);
for (const [name, address, status] of results) console.log(`${name} ${address} ${status}`);
process.exit(results.every(([, , status]) => status === "SERVING") ? 0 : 1);
