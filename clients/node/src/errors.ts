// Errors of the TenSafe client: one class for every failed call, future or
// client-side check, carrying the gRPC status code.
//
// Connect's `Code` enum has the gRPC status numbers (NOT_FOUND = 5, ...); `codeName`
// spells them as gRPC does. A failed call keeps Connect's ConnectError as `cause`
// (with the response metadata and error details).

import { Code, ConnectError } from "@connectrpc/connect";

export { Code };

/** The gRPC spelling of a status code: `Code.NotFound` -> `"NOT_FOUND"`. */
export function grpcCodeName(code: Code): string {
  if (code === Code.Canceled) return "CANCELLED"; // Connect spells it the American way
  const name = Code[code] as string | undefined;
  if (name === undefined) return `CODE_${code}`;
  return name.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/** A failed call, future or client-side check, with its gRPC status code. */
export class TenSafeError extends Error {
  /** The gRPC status code (Connect's Code has the same numbers). */
  readonly code: Code;
  /**
   * What failed: the method (`/tensafe.trainer.v1.TrainerService/OptimStep`), the
   * future (`future <id>`) or the setting a client-side check refused.
   */
  readonly where: string;
  /** The server's message (or the check's), without the prefixes of `message`. */
  readonly rawMessage: string;

  constructor(message: string, code: Code, options: { where?: string; cause?: unknown } = {}) {
    const where = options.where ?? "";
    super(`[${grpcCodeName(code)}] ${where ? `${where}: ` : ""}${message}`, {
      cause: options.cause,
    });
    this.name = "TenSafeError";
    this.code = code;
    this.where = where;
    this.rawMessage = message;
  }

  /** The status code as gRPC names it, e.g. `"INVALID_ARGUMENT"`. */
  get codeName(): string {
    return grpcCodeName(this.code);
  }

  /**
   * Converts anything a call threw into a TenSafeError (a ConnectError keeps its code
   * and message and becomes the `cause`; anything else is UNKNOWN).
   */
  static fromCall(error: unknown, where: string): TenSafeError {
    if (error instanceof TenSafeError) return error;
    const connect = ConnectError.from(error);
    // A TenSafeError raised inside an interceptor (the token exchange) reaches here
    // wrapped by Connect as UNKNOWN: it is the real failure.
    if (connect.cause instanceof TenSafeError) return connect.cause;
    return new TenSafeError(connect.rawMessage, connect.code, { where, cause: connect });
  }
}
