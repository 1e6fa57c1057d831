// grpc.health.v1.Health/Check on TenSafe services (no credentials needed).

import { createClient } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";

import {
  Health,
  HealthCheckResponse_ServingStatus as ServingStatus,
} from "../gen/grpc/health/v1/health_pb.js";
import { type TlsFiles, http2TlsOptions } from "./connection.js";
import { TenSafeError } from "./errors.js";

/** The answer of one service: SERVING, NOT_SERVING, ... or UNREACHABLE (code). */
export interface HealthResult {
  service: string;
  address: string;
  status: string;
  serving: boolean;
}

/**
 * Checks each `name -> host:port` (a connection file's `services`) once, in parallel,
 * each within `timeoutMs` (default 5 s). Never throws for a service that does not
 * answer: its status says why.
 */
export async function checkHealth(
  addresses: Record<string, string | undefined>,
  { tls = null, timeoutMs = 5_000 }: { tls?: TlsFiles | null; timeoutMs?: number } = {},
): Promise<HealthResult[]> {
  const nodeOptions = http2TlsOptions(tls);
  const entries = Object.entries(addresses).filter(
    (entry): entry is [string, string] => entry[1] !== undefined,
  );
  return Promise.all(
    entries.map(async ([service, address]) => {
      const baseUrl = `${tls ? "https" : "http"}://${address}`;
      const sessionManager = new Http2SessionManager(baseUrl, {}, nodeOptions);
      const health = createClient(Health, createGrpcTransport({ baseUrl, sessionManager }));
      try {
        const { status } = await health.check({ service: "" }, { timeoutMs });
        const name = ServingStatus[status] ?? `STATUS_${status}`;
        return { service, address, status: name, serving: status === ServingStatus.SERVING };
      } catch (error) {
        const failed = TenSafeError.fromCall(error, "/grpc.health.v1.Health/Check");
        return { service, address, status: `UNREACHABLE (${failed.codeName})`, serving: false };
      } finally {
        sessionManager.abort();
      }
    }),
  );
}
