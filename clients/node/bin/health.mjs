#!/usr/bin/env node
// Checks grpc.health.v1.Health/Check on each TenSafe service.
//
// Usage: node bin/health.mjs [--connection-file FILE] [host:port ...]
// With no addresses, reads the services from the connection file written by
// `tensafe up` (default $TENSAFE_CONNECTION_FILE, else .tensafe/connection.json), with
// its TLS settings (or $TENSAFE_CA_FILE and the client certificate variables). Prints
// one line per service and exits 0 only if every service reports SERVING.

import process from "node:process";
import { parseArgs } from "node:util";

import { checkHealth, defaultConnectionPath, readConnection, resolveTls } from "@tensafe/client";

const { values, positionals } = parseArgs({
  options: { "connection-file": { type: "string", default: defaultConnectionPath() } },
  allowPositionals: true,
});

try {
  const connection = positionals.length > 0 ? {} : readConnection(values["connection-file"]);
  const addresses =
    positionals.length > 0
      ? Object.fromEntries(positionals.map((address) => [address, address]))
      : connection.services;
  const results = await checkHealth(addresses, { tls: resolveTls(connection) });
  for (const { service, address, status } of results) console.log(`${service} ${address} ${status}`);
  process.exit(results.every((result) => result.serving) ? 0 : 1);
} catch (error) {
  console.error(`health: ${error.message}`);
  process.exit(1);
}
