// TenSafeClient: the TenSafe services over gRPC (HTTP/2) with Connect-ES.
//
// The typed Connect clients of every service are public (`client.trainer`,
// `client.registry`, ...), each call authenticated with an access token obtained from
// the API key and renewed before it expires; failures arrive as TenSafeError with the
// gRPC code. On top of them sit the calls a user makes most: training clients whose
// calls return futures (PendingResult) that wait on FutureService.WaitFuture, the
// registry's list/get, and HE-LoRA sessions (create, get, apply, close). Message
// types, request and response shapes all come from the code protoc-gen-es generates
// from protos/ (../gen), nothing is kept by hand.

import { randomUUID } from "node:crypto";
import type * as http2 from "node:http2";

import type {
  DescMessage,
  DescService,
  MessageInitShape,
  MessageShape,
} from "@bufbuild/protobuf";
import { anyUnpack, durationFromMs, timestampDate } from "@bufbuild/protobuf/wkt";
import {
  type Client,
  type Interceptor,
  type Transport,
  createClient,
} from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";

import {
  AuthService,
  type ExchangeApiKeyResponse,
  PrincipalKind,
  Role,
} from "../gen/tensafe/auth/v1/auth_service_pb.js";
import {
  type Future,
  FutureService,
  FutureStatus,
} from "../gen/tensafe/common/v1/common_pb.js";
import {
  type ApplyLoraRequestSchema,
  type ApplyLoraSummary,
  type CreateSessionHeaderSchema,
  type CreateSessionRequestSchema,
  HeRuntimeService,
  type Plan,
  type PlanSpecSchema,
  type Session,
} from "../gen/tensafe/he/v1/he_service_pb.js";
import {
  type Adapter,
  RegistryService,
} from "../gen/tensafe/registry/v1/registry_service_pb.js";
import {
  type AdamParamsSchema,
  type BaseModel,
  type CreateTrainingClientRequestSchema,
  type DatumSchema,
  DType,
  ForwardBackwardResultSchema,
  OptimStepResultSchema,
  type PrivacySpent,
  SaveAdapterResultSchema,
  SaveStateResultSchema,
  type TrainingClient as TrainingClientInfo,
  TrainerService,
} from "../gen/tensafe/trainer/v1/trainer_service_pb.js";
import {
  type Connection,
  type ServiceAddresses,
  type TlsFiles,
  defaultConnectionPath,
  findApiKey,
  http2TlsOptions,
  readConnection,
  resolveTls,
} from "./connection.js";
import { Code, TenSafeError } from "./errors.js";

/** Bytes per streamed chunk of keys or ciphertexts (1 MiB, as the Python SDK). */
export const CHUNK_BYTES = 1024 * 1024;

/** Settings of a TenSafeClient. */
export interface ClientOptions {
  /** The API key (else `$TENSAFE_API_KEY`, else the connection file's `api_key`). */
  apiKey?: string;
  /** TLS files; null or absent: plaintext (see resolveTls for the defaults). */
  tls?: TlsFiles | null;
  /** Deadline of each unary call in milliseconds (default 60 s). */
  timeoutMs?: number;
  /** Renew the access token this long before it expires (default 60 s). */
  tokenRenewalMarginMs?: number;
  /** Requested access token lifetime in milliseconds (the server caps it at 15 min). */
  tokenTtlMs?: number;
}

/** Settings of TenSafeClient.fromConnectionFile. */
export interface ConnectionFileOptions extends Omit<ClientOptions, "tls"> {
  /** TLS files that win over the environment and the connection file's `tls` block. */
  tls?: TlsFiles;
}

/** Who the client acts as, from the last token exchange. */
export interface Identity {
  tenantId: string;
  principalId: string;
  scopes: string[];
  expires: Date;
}

/** A new tenant's ids and the API key of its trainer (the secret is shown once). */
export interface TenantCredentials {
  tenantId: string;
  principalId: string;
  apiKey: string;
}

/** Names the service for error messages, e.g. `/tensafe.trainer.v1.TrainerService/OptimStep`. */
function methodPath(service: DescService, method: string): string {
  return `/${service.typeName}/${method}`;
}

// The typed Connect client of `service` whose methods throw TenSafeError naming the
// method (unary and client-streaming calls when awaited, streaming responses while
// they are read) instead of Connect's ConnectError.
function typedClient<Service extends DescService>(
  service: Service,
  transport: Transport,
): Client<Service> {
  type Method = (...args: unknown[]) => unknown;
  const client = createClient(service, transport) as unknown as Record<string, Method>;
  const typed: Record<string, Method> = {};
  for (const method of service.methods) {
    const call = client[method.localName] as Method;
    const where = methodPath(service, method.name);
    if (method.methodKind === "unary" || method.methodKind === "client_streaming") {
      typed[method.localName] = async (...args) => {
        try {
          return await call(...args);
        } catch (error) {
          throw TenSafeError.fromCall(error, where);
        }
      };
    } else {
      typed[method.localName] = async function* (...args) {
        try {
          yield* call(...args) as AsyncIterable<unknown>;
        } catch (error) {
          throw TenSafeError.fromCall(error, where);
        }
      };
    }
  }
  return typed as unknown as Client<Service>;
}

/** A result a training call will produce: the future, and a way to wait for it. */
export class PendingResult<Result> {
  constructor(
    private readonly client: TenSafeClient,
    /** The future as the call returned it. */
    readonly future: Future,
    private readonly schema: DescMessage,
  ) {}

  /** The future's id (FutureService.GetFuture / WaitFuture / CancelFuture take it). */
  get id(): string {
    return this.future.id;
  }

  /**
   * Waits until the future finishes and returns its result.
   *
   * @throws TenSafeError with the future's error code when it failed or was cancelled.
   */
  result(options: { pollMs?: number } = {}): Promise<Result> {
    return this.client.waitFuture(this.future, this.schema, options) as Promise<Result>;
  }
}

/** A training data point (tensafe.trainer.v1.Datum), as an init object. */
export type DatumInit = MessageInitShape<typeof DatumSchema>;

/**
 * A next-token-prediction datum for `cross_entropy`: the model reads `tokens` without
 * the last and predicts each following token (targets = tokens shifted by one), each
 * with weight 1.
 */
export function nextTokenDatum(tokens: ReadonlyArray<number | bigint>): DatumInit {
  const ids = tokens.map((token) => BigInt(token));
  const targets = ids.slice(1);
  return {
    modelInput: {
      chunks: [{ chunk: { case: "encodedText", value: { tokens: ids.slice(0, -1) } } }],
    },
    lossFnInputs: {
      target_tokens: { dtype: DType.INT64, intData: targets },
      weights: { dtype: DType.FLOAT32, floatData: targets.map(() => 1) },
    },
  };
}
/** Adam settings (tensafe.trainer.v1.AdamParams), as an init object. */
export type AdamParamsInit = MessageInitShape<typeof AdamParamsSchema>;
/** The result types of the training calls. */
export type ForwardBackwardResult = MessageShape<typeof ForwardBackwardResultSchema>;
export type OptimStepResult = MessageShape<typeof OptimStepResultSchema>;
export type SaveStateResult = MessageShape<typeof SaveStateResultSchema>;
export type SaveAdapterResult = MessageShape<typeof SaveAdapterResultSchema>;

/** One LoRA training client on the trainer (tensafe.trainer.v1.TrainingClient). */
export class TrainingClient {
  constructor(
    private readonly client: TenSafeClient,
    /** The training client as the trainer last returned it. */
    readonly info: TrainingClientInfo,
  ) {}

  /** The server-assigned id. */
  get id(): string {
    return this.info.id;
  }

  /** ForwardBackward on a batch: loss and gradients (clipped and noised under DP). */
  async forwardBackward(
    data: DatumInit[],
    options: { lossFn?: string; lossFnConfig?: Record<string, number> } = {},
  ): Promise<PendingResult<ForwardBackwardResult>> {
    const response = await this.client.trainer.forwardBackward({
      trainingClientId: this.id,
      data,
      lossFn: options.lossFn ?? "cross_entropy",
      lossFnConfig: options.lossFnConfig ?? {},
      requestId: randomUUID(),
    });
    return this.client.pending(response.future, ForwardBackwardResultSchema);
  }

  /** OptimStep: one Adam step with the accumulated gradients. */
  async optimStep(adamParams: AdamParamsInit): Promise<PendingResult<OptimStepResult>> {
    const response = await this.client.trainer.optimStep({
      trainingClientId: this.id,
      adamParams,
      requestId: randomUUID(),
    });
    return this.client.pending(response.future, OptimStepResultSchema);
  }

  /** SaveState: a named checkpoint (weights, optimizer and accountant state). */
  async saveState(name: string): Promise<PendingResult<SaveStateResult>> {
    const response = await this.client.trainer.saveState({
      trainingClientId: this.id,
      name,
      requestId: randomUUID(),
    });
    return this.client.pending(response.future, SaveStateResultSchema);
  }

  /** SaveAdapter: publishes the adapter to the registry as a signed, encrypted TGSP. */
  async saveAdapter(adapterName: string): Promise<PendingResult<SaveAdapterResult>> {
    const response = await this.client.trainer.saveAdapter({
      trainingClientId: this.id,
      adapterName,
      requestId: randomUUID(),
    });
    return this.client.pending(response.future, SaveAdapterResultSchema);
  }

  /** GetPrivacySpent: (ε, δ) spent so far by this client's DP accountant. */
  async privacySpent(): Promise<PrivacySpent> {
    const { privacySpent } = await this.client.trainer.getPrivacySpent({
      trainingClientId: this.id,
    });
    return required(privacySpent, "GetPrivacySpentResponse.privacy_spent");
  }

  /** DeleteTrainingClient. */
  async delete(): Promise<void> {
    await this.client.trainer.deleteTrainingClient({ trainingClientId: this.id });
  }
}

function required<T>(value: T | undefined, field: string): T {
  if (value === undefined) {
    throw new TenSafeError(`the response has no ${field}`, Code.Internal, { where: field });
  }
  return value;
}

function address(addresses: ServiceAddresses, service: string): string {
  const value = addresses[service];
  if (!value) {
    throw new TenSafeError(
      `no address for the ${service} service`,
      Code.FailedPrecondition,
      { where: service },
    );
  }
  return value;
}

/**
 * The services of one TenSafe deployment, authenticated with access tokens obtained
 * from an API key (AuthService.ExchangeApiKey) and renewed before they expire.
 */
export class TenSafeClient {
  /** AuthService (tenants, principals, API keys, audit); calls carry the token. */
  readonly auth: Client<typeof AuthService>;

  private readonly exchanger: Client<typeof AuthService>;
  private readonly addresses: ServiceAddresses;
  private readonly transports = new Map<string, Transport>();
  private readonly sessions: Http2SessionManager[] = [];
  private readonly nodeOptions: http2.SecureClientSessionOptions;
  private readonly scheme: "http" | "https";
  private readonly timeoutMs: number;
  private readonly renewalMarginMs: number;
  private readonly tokenTtlMs: number | undefined;
  private apiKey: string | undefined;
  private token: { value: string; expires: Date } | null = null;
  private exchanging: Promise<ExchangeApiKeyResponse> | null = null;
  private lastExchange: ExchangeApiKeyResponse | null = null;

  /**
   * A client of the deployment a connection file describes (default:
   * `$TENSAFE_CONNECTION_FILE`, else `.tensafe/connection.json`), with its TLS block and
   * API key unless the options or the environment say otherwise.
   */
  static fromConnectionFile(
    path: string = defaultConnectionPath(),
    options: ConnectionFileOptions = {},
  ): TenSafeClient {
    const connection: Connection = readConnection(path);
    return new TenSafeClient(connection.services, {
      ...options,
      apiKey: findApiKey(options.apiKey, connection),
      tls: resolveTls(connection, options.tls ?? {}),
    });
  }

  /**
   * @param addresses host:port of each service (a connection file's `services`).
   * @param options API key, TLS files, deadlines.
   */
  constructor(addresses: ServiceAddresses, options: ClientOptions = {}) {
    this.timeoutMs = options.timeoutMs ?? 60_000;
    this.renewalMarginMs = options.tokenRenewalMarginMs ?? 60_000;
    this.tokenTtlMs = options.tokenTtlMs;
    this.apiKey = options.apiKey;
    this.addresses = addresses;
    const tls = options.tls ?? null;
    this.scheme = tls ? "https" : "http";
    this.nodeOptions = http2TlsOptions(tls);
    address(addresses, "auth");
    this.exchanger = typedClient(AuthService, this.transport("auth", false));
    this.auth = typedClient(AuthService, this.transport("auth", true));
  }

  // The getters below build a client on the cached transport each time (a plain
  // object of closures, cheap); an absent address fails at the first use.

  /** TrainerService. @throws TenSafeError FAILED_PRECONDITION without its address. */
  get trainer(): Client<typeof TrainerService> {
    return typedClient(TrainerService, this.transport("trainer", true));
  }

  /** FutureService (served by the trainer). */
  get futures(): Client<typeof FutureService> {
    return typedClient(FutureService, this.transport("trainer", true));
  }

  /** RegistryService. @throws TenSafeError FAILED_PRECONDITION without its address. */
  get registry(): Client<typeof RegistryService> {
    return typedClient(RegistryService, this.transport("registry", true));
  }

  /** HeRuntimeService. @throws TenSafeError FAILED_PRECONDITION without its address. */
  get heRuntime(): Client<typeof HeRuntimeService> {
    return typedClient(HeRuntimeService, this.transport("he_runtime", true));
  }

  // One HTTP/2 connection per service, shared by its clients; the authenticated
  // transport adds the access token to each call.
  private transport(service: string, authenticated: boolean): Transport {
    const key = `${service}:${authenticated}`;
    let transport = this.transports.get(key);
    if (transport === undefined) {
      const baseUrl = `${this.scheme}://${address(this.addresses, service)}`;
      const sessionManager = new Http2SessionManager(baseUrl, {}, this.nodeOptions);
      this.sessions.push(sessionManager);
      const withToken: Interceptor = (next) => async (request) => {
        request.header.set("authorization", `Bearer ${await this.accessToken()}`);
        return next(request);
      };
      transport = createGrpcTransport({
        baseUrl,
        sessionManager,
        defaultTimeoutMs: this.timeoutMs,
        interceptors: authenticated ? [withToken] : [],
      });
      this.transports.set(key, transport);
    }
    return transport;
  }

  /** Closes every connection; calls made after this open new ones. */
  close(): void {
    for (const session of this.sessions) session.abort();
  }

  // --- auth ---------------------------------------------------------------------

  /**
   * ExchangeApiKey: exchanges the API key (this one, else the one given at
   * construction) for an access token that later calls carry.
   */
  async login(apiKey?: string): Promise<ExchangeApiKeyResponse> {
    if (apiKey !== undefined) this.apiKey = findApiKey(apiKey, null);
    return this.refresh();
  }

  /** Exchanges the API key for a fresh access token now (concurrent callers share it). */
  refresh(): Promise<ExchangeApiKeyResponse> {
    if (this.exchanging === null) {
      const apiKey = this.apiKey ?? findApiKey(undefined, null);
      this.exchanging = this.exchanger
        .exchangeApiKey({
          apiKey,
          ttl: this.tokenTtlMs === undefined ? undefined : durationFromMs(this.tokenTtlMs),
        })
        .then((response) => {
          const expires = timestampDate(required(response.expireTime, "expire_time"));
          this.token = { value: response.accessToken, expires };
          this.lastExchange = response;
          return response;
        })
        .finally(() => {
          this.exchanging = null;
        });
    }
    return this.exchanging;
  }

  /**
   * Creates a tenant, a user principal with the trainer role in it and an API key for
   * that principal (needs a platform admin's key). Train with the returned key, not
   * the admin's: `new TenSafeClient(addresses, { apiKey: credentials.apiKey })`.
   */
  async createTenantWithTrainer(
    displayName: string,
    { trainerName = "trainer" }: { trainerName?: string } = {},
  ): Promise<TenantCredentials> {
    const { tenant } = await this.auth.createTenant({ displayName, requestId: randomUUID() });
    const tenantId = required(tenant, "tenant").id;
    const { principal } = await this.auth.createPrincipal({
      kind: PrincipalKind.USER,
      name: trainerName,
      roles: [Role.TRAINER],
      tenantId,
      requestId: randomUUID(),
    });
    const principalId = required(principal, "principal").id;
    const key = await this.auth.createApiKey({
      principalId,
      description: `${trainerName} (trainer)`,
      requestId: randomUUID(),
    });
    return { tenantId, principalId, apiKey: key.secret };
  }

  /** The tenant and principal of the current token; null before the first exchange. */
  get identity(): Identity | null {
    if (this.lastExchange === null || this.token === null) return null;
    return {
      tenantId: this.lastExchange.tenantId,
      principalId: this.lastExchange.principalId,
      scopes: [...this.lastExchange.scopes],
      expires: this.token.expires,
    };
  }

  /** A valid access token, exchanged or renewed when missing or about to expire. */
  async accessToken(): Promise<string> {
    const fresh =
      this.token !== null && this.token.expires.getTime() - Date.now() > this.renewalMarginMs;
    if (!fresh) await this.refresh();
    return (this.token as { value: string }).value;
  }

  // --- trainer and futures ------------------------------------------------------

  /** ListBaseModels. */
  async listBaseModels(): Promise<BaseModel[]> {
    return (await this.trainer.listBaseModels({})).baseModels;
  }

  /** CreateTrainingClient (a request id is added when absent). */
  async createTrainingClient(
    request: MessageInitShape<typeof CreateTrainingClientRequestSchema>,
  ): Promise<TrainingClient> {
    const response = await this.trainer.createTrainingClient({
      requestId: randomUUID(),
      ...request,
    });
    return new TrainingClient(this, required(response.trainingClient, "training_client"));
  }

  /** GetTrainingClient: an existing training client by id. */
  async trainingClient(trainingClientId: string): Promise<TrainingClient> {
    const response = await this.trainer.getTrainingClient({ trainingClientId });
    return new TrainingClient(this, required(response.trainingClient, "training_client"));
  }

  /** A future of a result of type `schema`, to wait on later. */
  pending<Schema extends DescMessage>(
    future: Future | undefined,
    schema: Schema,
  ): PendingResult<MessageShape<Schema>> {
    return new PendingResult(this, required(future, "future"), schema);
  }

  /** FutureService.GetFuture: the future's current state, without waiting. */
  async getFuture(futureId: string): Promise<Future> {
    return required((await this.futures.getFuture({ futureId })).future, "future");
  }

  /**
   * Waits on FutureService.WaitFuture (in rounds of `pollMs`, default 30 s) until the
   * future finishes, then unpacks its result into `schema`.
   *
   * @throws TenSafeError with the future's error code when it failed or was
   *   cancelled, INTERNAL when the result is of another type.
   */
  async waitFuture<Schema extends DescMessage>(
    future: Future | string,
    schema: Schema,
    { pollMs = 30_000 }: { pollMs?: number } = {},
  ): Promise<MessageShape<Schema>> {
    let current = typeof future === "string" ? await this.getFuture(future) : future;
    while (current.status === FutureStatus.PENDING || current.status === FutureStatus.RUNNING) {
      const response = await this.futures.waitFuture(
        { futureId: current.id, timeout: durationFromMs(pollMs) },
        { timeoutMs: pollMs + this.timeoutMs },
      );
      current = required(response.future, "future");
    }
    const where = `future ${current.id}`;
    if (current.status === FutureStatus.SUCCEEDED && current.outcome.case === "result") {
      const result = anyUnpack(current.outcome.value, schema);
      if (result === undefined) {
        throw new TenSafeError(
          `${where}: result is ${current.outcome.value.typeUrl}, not ${schema.typeName}`,
          Code.Internal,
          { where },
        );
      }
      return result;
    }
    const error = current.outcome.case === "error" ? current.outcome.value : undefined;
    throw new TenSafeError(
      `${where} ${FutureStatus[current.status]}: ${error?.message ?? "no result"}`,
      (error?.code as Code | undefined) ?? Code.Unknown,
      { where },
    );
  }

  // --- registry -----------------------------------------------------------------

  /** ListAdapters: every adapter of the tenant (all pages). */
  async listAdapters(): Promise<Adapter[]> {
    const adapters: Adapter[] = [];
    let pageToken = "";
    do {
      const page = await this.registry.listAdapters({ pageSize: 1000, pageToken });
      adapters.push(...page.adapters);
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
    return adapters;
  }

  /** GetAdapter. */
  async getAdapter(adapterName: string): Promise<Adapter> {
    return required((await this.registry.getAdapter({ adapterName })).adapter, "adapter");
  }

  // --- HE-LoRA ------------------------------------------------------------------

  /** CompilePlan: the plan the runtime would use for these shapes and parameters. */
  async compilePlan(spec: MessageInitShape<typeof PlanSpecSchema>): Promise<Plan> {
    return required((await this.heRuntime.compilePlan({ spec })).plan, "plan");
  }

  /**
   * CreateSession: the header, then the serialized SEAL Galois keys in chunks. The
   * keys (and the secret key, which never leaves the caller) come from a CKKS
   * implementation on the caller's side; `galoisKeysSize` is filled in here.
   */
  async createHeSession(
    header: MessageInitShape<typeof CreateSessionHeaderSchema>,
    galoisKeys: Uint8Array = new Uint8Array(),
    { chunkBytes = CHUNK_BYTES }: { chunkBytes?: number } = {},
  ): Promise<Session> {
    async function* requests(): AsyncGenerator<MessageInitShape<typeof CreateSessionRequestSchema>> {
      yield {
        part: {
          case: "header",
          value: { requestId: randomUUID(), ...header, galoisKeysSize: BigInt(galoisKeys.length) },
        },
      };
      for (let start = 0; start < galoisKeys.length; start += chunkBytes) {
        yield { part: { case: "galoisKeysChunk", value: galoisKeys.subarray(start, start + chunkBytes) } };
      }
    }
    const response = await this.heRuntime.createSession(requests());
    return required(response.session, "session");
  }

  /** GetSession. */
  async getHeSession(sessionId: string): Promise<Session> {
    return required((await this.heRuntime.getSession({ sessionId })).session, "session");
  }

  /**
   * ApplyLora: streams serialized ciphertexts of one adapted layer and returns the
   * result ciphertexts (still encrypted) and the runtime's summary.
   */
  async applyLora(
    sessionId: string,
    layer: string,
    ciphertexts: Uint8Array[],
    { chunkBytes = CHUNK_BYTES }: { chunkBytes?: number } = {},
  ): Promise<{ ciphertexts: Uint8Array[]; summary: ApplyLoraSummary }> {
    async function* requests(): AsyncGenerator<MessageInitShape<typeof ApplyLoraRequestSchema>> {
      yield { part: { case: "header", value: { sessionId, layer, ciphertexts: BigInt(ciphertexts.length) } } };
      for (const [index, blob] of ciphertexts.entries()) {
        // Every ciphertext sends at least one chunk, the one marked last.
        for (let start = 0; ; start += chunkBytes) {
          const end = start + chunkBytes;
          yield {
            part: {
              case: "chunk",
              value: { index: BigInt(index), data: blob.subarray(start, end), last: end >= blob.length },
            },
          };
          if (end >= blob.length) break;
        }
      }
    }
    const results: Uint8Array[] = [];
    let current: Uint8Array[] = [];
    let summary: ApplyLoraSummary | undefined;
    const outOfOrder = (): TenSafeError =>
      new TenSafeError("ApplyLora response chunks out of order", Code.DataLoss, { where: "ApplyLora" });
    for await (const response of this.heRuntime.applyLora(requests())) {
      if (response.part.case === "summary") {
        summary = response.part.value;
        continue;
      }
      if (response.part.case !== "chunk") throw outOfOrder();
      const chunk = response.part.value;
      if (summary !== undefined || Number(chunk.index) !== results.length) throw outOfOrder();
      current.push(chunk.data);
      if (chunk.last) {
        results.push(Buffer.concat(current));
        current = [];
      }
    }
    if (summary === undefined || current.length > 0) {
      throw new TenSafeError("ApplyLora response ended without a summary", Code.DataLoss, {
        where: "ApplyLora",
      });
    }
    return { ciphertexts: results, summary };
  }

  /** CloseSession: the runtime deletes the session's keys. */
  async closeHeSession(sessionId: string): Promise<void> {
    await this.heRuntime.closeSession({ sessionId });
  }
}
