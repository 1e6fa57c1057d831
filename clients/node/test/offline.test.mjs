// What the client decides on its own, without a stack: settings, API keys, errors.

import assert from "node:assert/strict";
import { createServer } from "node:net";
import { test } from "node:test";

import {
  Code,
  TenSafeClient,
  TenSafeError,
  findApiKey,
  grpcCodeName,
  resolveTls,
} from "@tensafe/client";

import { assertBuilt } from "./stack.mjs";

assertBuilt();

test("gRPC code names are gRPC's spelling", () => {
  assert.equal(grpcCodeName(Code.InvalidArgument), "INVALID_ARGUMENT");
  assert.equal(grpcCodeName(Code.NotFound), "NOT_FOUND");
  assert.equal(grpcCodeName(Code.Canceled), "CANCELLED");
  assert.equal(Code.FailedPrecondition, 9); // the gRPC number
});

test("an empty API key is an error naming where it came from, never a fall-through", () => {
  const connection = { api_key: "tsk_admin", path: "/x/connection.json" };
  const blank = (fn, source) =>
    assert.throws(fn, (error) => {
      assert.ok(error instanceof TenSafeError);
      assert.equal(error.codeName, "INVALID_ARGUMENT");
      assert.equal(error.where, source);
      return true;
    });
  blank(() => findApiKey("", connection, {}), "apiKey");
  blank(() => findApiKey("  ", connection, { TENSAFE_API_KEY: "tsk_env" }), "apiKey");
  blank(() => findApiKey(undefined, connection, { TENSAFE_API_KEY: "" }), "TENSAFE_API_KEY");
  blank(() => findApiKey(undefined, { ...connection, api_key: " " }, {}), "/x/connection.json:api_key");
  assert.equal(findApiKey(undefined, connection, { TENSAFE_API_KEY: " tsk_env " }), "tsk_env");
  assert.equal(findApiKey(undefined, connection, {}), "tsk_admin");
  assert.throws(() => findApiKey(undefined, null, {}), { code: Code.Unauthenticated });
});

test("TLS files come from the arguments, then the environment, then the connection file", () => {
  const connection = { tls: { ca_file: "/c/ca.pem", client_cert_file: "/c/c.pem", client_key_file: "/c/k.pem" } };
  assert.equal(resolveTls({}, {}, {}), null);
  assert.deepEqual(resolveTls(connection, { caFile: "/a/ca.pem" }, { TENSAFE_CA_FILE: "/e/ca.pem" }), {
    caFile: "/a/ca.pem",
    clientCertFile: "/c/c.pem",
    clientKeyFile: "/c/k.pem",
  });
  assert.equal(resolveTls(connection, {}, { TENSAFE_CA_FILE: "/e/ca.pem" }).caFile, "/e/ca.pem");
  assert.throws(() => resolveTls({}, { clientCertFile: "/a/c.pem" }, {}), (error) => {
    assert.equal(error.code, Code.InvalidArgument);
    assert.equal(error.where, "clientKeyFile");
    return true;
  });
});

test("an unreadable TLS file is INVALID_ARGUMENT naming the setting", () => {
  assert.throws(
    () => new TenSafeClient({ auth: "127.0.0.1:1" }, { tls: { caFile: "/nonexistent/ca.pem" } }),
    (error) => error instanceof TenSafeError && error.code === Code.InvalidArgument && error.where === "caFile",
  );
});

test("a service without an address fails with FAILED_PRECONDITION at first use", () => {
  const client = new TenSafeClient({ auth: "127.0.0.1:1" }, { apiKey: "tsk_x" });
  assert.throws(() => client.registry, (error) => {
    assert.ok(error instanceof TenSafeError);
    assert.equal(error.codeName, "FAILED_PRECONDITION");
    assert.equal(error.where, "registry");
    return true;
  });
  client.close();
});

test("a call to an address where nothing listens is UNAVAILABLE, naming the method", async () => {
  // A port that was free a moment ago: bind, read it, close.
  const server = createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  const client = new TenSafeClient({ auth: `127.0.0.1:${port}` }, { apiKey: "tsk_x", timeoutMs: 5_000 });
  await assert.rejects(client.login(), (error) => {
    assert.ok(error instanceof TenSafeError);
    assert.equal(error.codeName, "UNAVAILABLE");
    assert.equal(error.where, "/tensafe.auth.v1.AuthService/ExchangeApiKey");
    return true;
  });
  client.close();
});
