// A small TenSafe client for Node on @grpc/grpc-js and the stubs that protoc-gen-es
// generates from protos/ into ../gen (regenerate with `python scripts/gen_node.py`).
//
// Every call is a plain unary gRPC call whose method path, request and response types
// come from the generated service descriptors, so a contract change shows up here as a
// regenerated descriptor rather than a hand-kept copy. Training calls return futures
// (tensafe.common.v1.Future); `waitFuture` blocks on FutureService.WaitFuture and
// unpacks the result into the message type the caller names.

import { readFileSync } from "node:fs";
import process from "node:process";
import grpc from "@grpc/grpc-js";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { anyUnpack, durationFromMs } from "@bufbuild/protobuf/wkt";

import { AuthService } from "../gen/tensafe/auth/v1/auth_service_pb.js";
import { FutureService, FutureStatus } from "../gen/tensafe/common/v1/common_pb.js";
import { TrainerService } from "../gen/tensafe/trainer/v1/trainer_service_pb.js";

/** A failed call or future, with its gRPC status code. */
export class TenSafeError extends Error {
  constructor(message, { code } = {}) {
    super(message);
    this.name = "TenSafeError";
    this.code = code;
  }
}

/**
 * TLS settings for TenSafeClient: a CA bundle and an optional client certificate (PEM
 * file paths), each from the first place that has it: `explicit`, the environment
 * (TENSAFE_CA_FILE, TENSAFE_CLIENT_CERT_FILE, TENSAFE_CLIENT_KEY_FILE), the `tls` block
 * of the connection file (`tensafe up --tls`). Returns null when nothing asks for TLS.
 */
export function resolveTls(connection = {}, explicit = {}, env = process.env) {
  const stored = connection.tls || {};
  const tls = {
    caFile: explicit.caFile || env.TENSAFE_CA_FILE || stored.ca_file || null,
    clientCertFile:
      explicit.clientCertFile || env.TENSAFE_CLIENT_CERT_FILE || stored.client_cert_file || null,
    clientKeyFile:
      explicit.clientKeyFile || env.TENSAFE_CLIENT_KEY_FILE || stored.client_key_file || null,
  };
  if (!tls.caFile && !tls.clientCertFile && !tls.clientKeyFile) return null;
  if (!tls.clientCertFile !== !tls.clientKeyFile) {
    throw new TenSafeError("a client certificate and its key are given together", {
      code: grpc.status.INVALID_ARGUMENT,
    });
  }
  return tls;
}

/** Channel credentials: TLS (CA bundle, client certificate) with `tls`, else plaintext. */
export function channelCredentials(tls) {
  if (!tls) return grpc.credentials.createInsecure();
  const read = (path) => (path ? readFileSync(path) : null);
  return grpc.credentials.createSsl(
    read(tls.caFile), read(tls.clientKeyFile), read(tls.clientCertFile),
  );
}

/** Reads the connection file that `tensafe up` writes (services, api_key, tls). */
export function readConnection(path) {
  const connection = JSON.parse(readFileSync(path, "utf8"));
  if (!connection.services || typeof connection.services !== "object") {
    throw new TenSafeError(`${path} has no services`, { code: grpc.status.FAILED_PRECONDITION });
  }
  return connection;
}

function unary(client, service, methodName, request, metadata, timeoutMs) {
  const method = service.method[methodName];
  if (!method || method.methodKind !== "unary") {
    throw new TypeError(`${service.typeName} has no unary method ${methodName}`);
  }
  const path = `/${service.typeName}/${method.name}`;
  return new Promise((resolve, reject) => {
    client.makeUnaryRequest(
      path,
      (message) => Buffer.from(toBinary(method.input, message)),
      (bytes) => fromBinary(method.output, bytes),
      create(method.input, request),
      metadata,
      { deadline: new Date(Date.now() + timeoutMs) },
      (error, response) => {
        if (error) {
          reject(new TenSafeError(`${path}: ${error.details || error.message}`, {
            code: error.code,
          }));
        } else {
          resolve(response);
        }
      },
    );
  });
}

/**
 * The auth, trainer and future services of one deployment, authenticated with an
 * access token obtained from an API key.
 */
export class TenSafeClient {
  /**
   * @param {{auth: string, trainer: string}} addresses host:port of each service.
   * @param {{timeoutMs?: number, tls?: {caFile?: string, clientCertFile?: string,
   *   clientKeyFile?: string} | null}} options per-call deadline (default 60 s); TLS
   *   settings from `resolveTls` (null or absent: plaintext).
   */
  constructor(addresses, { timeoutMs = 60_000, tls = null } = {}) {
    const credentials = channelCredentials(tls);
    this.timeoutMs = timeoutMs;
    this.auth = new grpc.Client(addresses.auth, credentials);
    this.trainer = new grpc.Client(addresses.trainer, credentials);
    this.accessToken = null;
  }

  /** Closes both channels. */
  close() {
    this.auth.close();
    this.trainer.close();
  }

  _metadata() {
    const metadata = new grpc.Metadata();
    if (this.accessToken === null) {
      throw new TenSafeError("call exchangeApiKey first", { code: grpc.status.UNAUTHENTICATED });
    }
    metadata.set("authorization", `Bearer ${this.accessToken}`);
    return metadata;
  }

  /** AuthService.ExchangeApiKey; keeps the access token for later calls. */
  async exchangeApiKey(apiKey) {
    const response = await unary(
      this.auth, AuthService, "exchangeApiKey", { apiKey }, new grpc.Metadata(), this.timeoutMs,
    );
    this.accessToken = response.accessToken;
    return response;
  }

  /** A TrainerService unary call by its generated (camelCase) method name. */
  callTrainer(methodName, request) {
    return unary(this.trainer, TrainerService, methodName, request, this._metadata(), this.timeoutMs);
  }

  /**
   * Waits on FutureService.WaitFuture until the future finishes, then unpacks its
   * result into `resultSchema`. A failed or cancelled future raises TenSafeError.
   */
  async waitFuture(future, resultSchema, { pollMs = 30_000 } = {}) {
    let current = future;
    while (current.status === FutureStatus.PENDING || current.status === FutureStatus.RUNNING) {
      const response = await unary(
        this.trainer,
        FutureService,
        "waitFuture",
        { futureId: current.id, timeout: durationFromMs(pollMs) },
        this._metadata(),
        pollMs + this.timeoutMs,
      );
      current = response.future;
    }
    if (current.status === FutureStatus.SUCCEEDED && current.outcome.case === "result") {
      const result = anyUnpack(current.outcome.value, resultSchema);
      if (result === undefined) {
        throw new TenSafeError(
          `future ${current.id}: result is ${current.outcome.value.typeUrl}, ` +
            `not ${resultSchema.typeName}`,
          { code: grpc.status.INTERNAL },
        );
      }
      return result;
    }
    const error = current.outcome.case === "error" ? current.outcome.value : undefined;
    throw new TenSafeError(
      `future ${current.id} ${FutureStatus[current.status]}: ${error?.message ?? "no result"}`,
      { code: error?.code ?? grpc.status.UNKNOWN },
    );
  }
}
