#!/usr/bin/env node
// Checks grpc.health.v1.Health/Check on each TenSafe service.
//
// Usage: node bin/health.mjs [--connection-file FILE] [host:port ...]
// With no addresses, reads the services from the connection file written by
// `tensafe up` (default .tensafe/connection.json), with its TLS settings (or
// $TENSAFE_CA_FILE and the client certificate variables). Prints one line per service and
// exits 0 only if every service reports SERVING.

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

import { channelCredentials, resolveTls } from "../lib/tensafe.mjs";

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
  const connection = args.length > 0 ? {} : JSON.parse(readFileSync(file, "utf8"));
  const credentials = channelCredentials(resolveTls(connection));
  const addresses = args.length > 0
    ? args.map((address) => [address, address])
    : Object.entries(connection.services);
  return addresses.map(([name, address]) => [name, address, credentials]);
}

function check(address, credentials) {
  return new Promise((resolve) => {
    const client = new Health(address, credentials);
    const deadline = new Date(Date.now() + 5000);
    client.Check({ service: "" }, { deadline }, (err, response) => {
      client.close();
      resolve(err ? `UNREACHABLE (${grpc.status[err.code]})` : response.status);
    });
  });
}

const results = await Promise.all(
  targets(process.argv.slice(2)).map(async ([name, address, credentials]) => [
    name, address, await check(address, credentials),
  ]),
);
for (const [name, address, status] of results) console.log(`${name} ${address} ${status}`);
process.exit(results.every(([, , status]) => status === "SERVING") ? 0 : 1);
