// @tensafe/client: the TenSafe services from Node, on Connect-ES (gRPC over HTTP/2).
//
// The wrapper (TenSafeClient and friends) plus the generated messages and service
// descriptors of every contract, re-exported as namespaces (`trainerV1.DType`, ...),
// so a user needs one import.

export {
  CHUNK_BYTES,
  type AdamParamsInit,
  type ClientOptions,
  type ConnectionFileOptions,
  type DatumInit,
  type ForwardBackwardResult,
  type Identity,
  type OptimStepResult,
  PendingResult,
  type SaveAdapterResult,
  type SaveStateResult,
  TenSafeClient,
  type TenantCredentials,
  TrainingClient,
  nextTokenDatum,
} from "./client.js";
export {
  type Connection,
  type ConnectionTls,
  ENV,
  type ServiceAddresses,
  type TlsFiles,
  defaultConnectionPath,
  findApiKey,
  http2TlsOptions,
  readConnection,
  resolveTls,
} from "./connection.js";
export { Code, TenSafeError, grpcCodeName } from "./errors.js";
export { type HealthResult, checkHealth } from "./health.js";

export * as authV1 from "../gen/tensafe/auth/v1/auth_service_pb.js";
export * as commonV1 from "../gen/tensafe/common/v1/common_pb.js";
export * as heV1 from "../gen/tensafe/he/v1/he_service_pb.js";
export * as registryV1 from "../gen/tensafe/registry/v1/registry_service_pb.js";
export * as trainerV1 from "../gen/tensafe/trainer/v1/trainer_service_pb.js";
