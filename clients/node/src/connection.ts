// Where a TenSafe deployment is and how to reach it: the connection file that
// `tensafe up` writes, TLS files, the API key. Mirrors tensafe.client.connection,
// tensafe.client.channels.resolve_tls and tensafe.client.auth.find_api_key.

import { readFileSync } from "node:fs";
import type * as http2 from "node:http2";
import process from "node:process";

import { Code, TenSafeError } from "./errors.js";

/** The host:port of each service (the keys of the connection file's `services`). */
export interface ServiceAddresses {
  auth: string;
  trainer?: string;
  registry?: string;
  he_runtime?: string;
  [service: string]: string | undefined;
}

/** The `tls` block of a connection file (paths as `tensafe up --tls` writes them). */
export interface ConnectionTls {
  ca_file?: string;
  client_cert_file?: string;
  client_key_file?: string;
}

/** What this client reads of the connection file written by `tensafe up`. */
export interface Connection {
  services: ServiceAddresses;
  api_key?: string;
  tls?: ConnectionTls;
  /** The file it was read from. */
  path?: string;
}

/**
 * TLS settings: PEM files of a CA bundle that verifies the services, and of a client
 * certificate and its key for mutual TLS (given together).
 */
export interface TlsFiles {
  caFile?: string | null;
  clientCertFile?: string | null;
  clientKeyFile?: string | null;
}

/** Environment variables this client reads. */
export const ENV = {
  connectionFile: "TENSAFE_CONNECTION_FILE",
  apiKey: "TENSAFE_API_KEY",
  caFile: "TENSAFE_CA_FILE",
  clientCertFile: "TENSAFE_CLIENT_CERT_FILE",
  clientKeyFile: "TENSAFE_CLIENT_KEY_FILE",
} as const;

/** `$TENSAFE_CONNECTION_FILE`, else `.tensafe/connection.json` (as the Python SDK). */
export function defaultConnectionPath(env: NodeJS.ProcessEnv = process.env): string {
  return env[ENV.connectionFile] || ".tensafe/connection.json";
}

/**
 * Reads a connection file.
 *
 * @throws TenSafeError FAILED_PRECONDITION when the file is missing, is not JSON or
 *   has no `services`.
 */
export function readConnection(path: string = defaultConnectionPath()): Connection {
  let document: unknown;
  try {
    document = JSON.parse(readFileSync(path, "utf8"));
  } catch (error) {
    throw new TenSafeError(
      `cannot read the connection file ${path} (start a stack with \`tensafe up\`): ` +
        `${(error as Error).message}`,
      Code.FailedPrecondition,
      { where: path, cause: error },
    );
  }
  const services = (document as { services?: unknown } | null)?.services;
  if (typeof services !== "object" || services === null || !("auth" in services)) {
    throw new TenSafeError(`${path} has no services.auth`, Code.FailedPrecondition, {
      where: path,
    });
  }
  return { ...(document as Connection), path };
}

/**
 * TLS settings, each file from the first place that has it: `explicit`, the
 * environment (TENSAFE_CA_FILE, TENSAFE_CLIENT_CERT_FILE, TENSAFE_CLIENT_KEY_FILE),
 * the connection file's `tls` block. Null when nothing asks for TLS (plaintext).
 *
 * @throws TenSafeError INVALID_ARGUMENT when a client certificate comes without its
 *   key or the reverse.
 */
export function resolveTls(
  connection: Pick<Connection, "tls"> = {},
  explicit: TlsFiles = {},
  env: NodeJS.ProcessEnv = process.env,
): TlsFiles | null {
  const stored = connection.tls ?? {};
  const tls: TlsFiles = {
    caFile: explicit.caFile || env[ENV.caFile] || stored.ca_file || null,
    clientCertFile:
      explicit.clientCertFile || env[ENV.clientCertFile] || stored.client_cert_file || null,
    clientKeyFile:
      explicit.clientKeyFile || env[ENV.clientKeyFile] || stored.client_key_file || null,
  };
  if (!tls.caFile && !tls.clientCertFile && !tls.clientKeyFile) return null;
  if (!tls.clientCertFile !== !tls.clientKeyFile) {
    const missing = tls.clientCertFile ? "clientKeyFile" : "clientCertFile";
    throw new TenSafeError(
      `${missing}: a client certificate and its key are given together`,
      Code.InvalidArgument,
      { where: missing },
    );
  }
  return tls;
}

function nonBlank(value: string, source: string, hint: string): string {
  const key = value.trim();
  if (key === "") {
    throw new TenSafeError(`${source}: empty API key; ${hint}`, Code.InvalidArgument, {
      where: source,
    });
  }
  return key;
}

/**
 * The API key to use. The first source that is *given* decides: `explicit`, else
 * `$TENSAFE_API_KEY`, else the connection file's `api_key`. An empty or blank key is
 * an error naming that source, never a fall-through to the next one (an empty
 * variable in a script would otherwise run as the connection file's platform admin).
 *
 * @throws TenSafeError INVALID_ARGUMENT for a blank key, UNAUTHENTICATED for none.
 */
export function findApiKey(
  explicit: string | undefined,
  connection: Pick<Connection, "api_key" | "path"> | null,
  env: NodeJS.ProcessEnv = process.env,
): string {
  if (explicit !== undefined) {
    return nonBlank(explicit, "apiKey", `pass a key, or leave apiKey out to use ${ENV.apiKey}`);
  }
  const fromEnv = env[ENV.apiKey];
  if (fromEnv !== undefined) {
    return nonBlank(fromEnv, ENV.apiKey, "set it to an API key, or unset it");
  }
  if (connection?.api_key !== undefined) {
    return nonBlank(connection.api_key, `${connection.path ?? "connection"}:api_key`, "");
  }
  throw new TenSafeError(
    `no API key: pass apiKey, set ${ENV.apiKey}, or use a connection file with api_key`,
    Code.Unauthenticated,
    { where: "apiKey" },
  );
}

function readPem(setting: string, path: string | null | undefined): Buffer | undefined {
  if (!path) return undefined;
  try {
    return readFileSync(path);
  } catch (error) {
    throw new TenSafeError(`cannot read ${path}`, Code.InvalidArgument, {
      where: setting,
      cause: error,
    });
  }
}

/**
 * The options of Node's `http2.connect` for `tls` (the files are read now); empty for
 * plaintext (null).
 *
 * @throws TenSafeError INVALID_ARGUMENT naming the setting whose file cannot be read.
 */
export function http2TlsOptions(tls: TlsFiles | null): http2.SecureClientSessionOptions {
  if (tls === null) return {};
  return {
    ca: readPem("caFile", tls.caFile),
    cert: readPem("clientCertFile", tls.clientCertFile),
    key: readPem("clientKeyFile", tls.clientKeyFile),
  };
}
