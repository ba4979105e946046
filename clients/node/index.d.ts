// Types of paramserver-client (hand-written; the runtime is index.js).
//
// Messages keep the .proto field names. uint64 fields arrive as decimal
// strings (`Uint64`) and are accepted as Numbers or decimal strings; enums are
// Numbers; google.protobuf.Struct fields of Jobs arrive as plain objects.

/// <reference types="node" />

import type { ChannelCredentials, Metadata, ServiceClientConstructor } from '@grpc/grpc-js';

/** A uint64 as it arrives: a decimal string (convert with Number() when safe). */
export type Uint64 = string;
/** A uint64 as a request accepts it. */
export type Uint64Input = number | string;

/** What a google.protobuf.Value holds. */
export type JsonValue = null | number | string | boolean | JsonValue[] | { [key: string]: JsonValue };
/** What a google.protobuf.Struct holds. */
export interface JsonObject {
  [key: string]: JsonValue;
}

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

/** TLS settings: PEM file paths or Buffers. */
export interface TlsOptions {
  /** Root certificate(s) to trust (default: the system's). */
  ca?: string | Buffer | Uint8Array;
  /** This client's certificate chain, for mutual TLS (with `key`). */
  cert?: string | Buffer | Uint8Array;
  /** This client's private key, for mutual TLS (with `cert`). */
  key?: string | Buffer | Uint8Array;
  /** The name the servers' certificates carry, when it is not the host of the address. */
  serverName?: string;
}

/** Retries of calls answered UNAVAILABLE (jittered exponential backoff). */
export interface RetryOptions {
  /** Tries in all (1 = no retry). Default 6. */
  attempts?: number;
  /** Wait before the first retry (ms). Default 100. */
  initialBackoffMs?: number;
  /** Longest wait between tries (ms). Default 2000. */
  maxBackoffMs?: number;
  /** Growth of the wait. Default 2. */
  multiplier?: number;
}

/** Options of every client. */
export interface ClientOptions {
  /** Deadline of each call attempt (ms). Default 60 000. */
  timeoutMs?: number;
  /**
   * Sent as "authorization: Bearer TOKEN" on every call (front door and shards).
   * Default $PARAMSERVER_TOKEN; null or '' = no token.
   */
  token?: string | null;
  /**
   * TLS ({ca, cert, key}), true (TLS with the system roots) or false (plaintext).
   * Default: TLS when $PARAMSERVER_TLS_CA, $PARAMSERVER_TLS_CERT or $PARAMSERVER_TLS_KEY is set.
   */
  tls?: TlsOptions | boolean | null;
  /** Retries of UNAVAILABLE answers; false = none. */
  retry?: RetryOptions | false;
  /** Extra grpc-js channel arguments. */
  channelOptions?: Record<string, string | number>;
}

/** Options of a Worker (ClientOptions plus its membership). */
export interface WorkerOptions extends ClientOptions {
  /** Deadline of each pull attempt (ms). Default 600 000. */
  pullTimeoutMs?: number;
  /** The front door ("host:port"), for leave(), refresh() and the heartbeats. */
  address?: string;
  /** JoinJobResponse.upload_parameters. */
  uploadParameters?: boolean;
  /** JoinJobResponse.lease. */
  lease?: Uint64Input;
  /** JoinJobResponse.lease_timeout_s. */
  leaseTimeoutS?: number;
}

/** A parameter of the model description: [name, shape] or {name, shape, group}. */
export type ParameterInput = [name: string, shape: number[]] | { name: string; shape: number[]; group?: string };

/** A parameter group of createJob(). */
export interface ParamGroupInput {
  name: string;
  patterns?: string[];
  ndims?: number[];
  /** '' = the job's optimizer, with these hyperparameters overriding the job's. */
  optimizer?: string;
  hyperparameters?: JsonObject;
}

/** createJob()'s settings. */
export interface CreateJobOptions {
  /** [A-Za-z0-9._-]{1,64}; '' = the service picks one. */
  jobId?: string;
  /** "sgd", "adam", "adamw", "lion", ... Default "adamw". */
  optimizer?: string;
  /** E.g. {lr: 0.5, betas: [0.9, 0.999], nesterov: false}. */
  hyperparameters?: JsonObject;
  /** Default "constant". */
  schedule?: string;
  scheduleParameters?: JsonObject;
  numWorkers?: number;
  numShards?: number;
  maxGradNorm?: number;
  shardNumCpus?: number;
  shardNumGpus?: number;
  minWorkers?: number;
  maxWorkers?: number;
  workerTimeoutS?: number;
  /** A WorkerLossPolicy value. */
  onWorkerLost?: number;
  snapshotEverySteps?: number;
  snapshotKeepLast?: number;
  snapshotEverySeconds?: number;
  replicaEverySteps?: number;
  shardMemoryBudgetBytes?: Uint64Input;
  shardDeviceMemoryBudgetBytes?: Uint64Input;
  paramGroups?: ParamGroupInput[];
  /** A snapshot directory, or "JOB_ID" / "JOB_ID:latest". */
  restoreFrom?: string;
  /** Return an existing job of that id and description instead of ALREADY_EXISTS. */
  resume?: boolean;
}

/** Per-call overrides of JobClient.call(). */
export interface CallOverrides {
  timeoutMs?: number;
  retry?: Required<RetryOptions>;
}

// ---------------------------------------------------------------------------
// Messages (as decoded: proto field names, uint64 as strings, enums as numbers)
// ---------------------------------------------------------------------------

export interface Range {
  start: Uint64;
  length: Uint64;
}

export interface ParameterSpec {
  name: string;
  shape: Uint64[];
  dtype: number;
  group: string;
}

export interface OptimizerConfig {
  name: string;
  hyperparameters: JsonObject;
}

export interface ScheduleConfig {
  name: string;
  parameters: JsonObject;
}

export interface SpikeGuardConfig {
  window: number;
  warmup: number;
  threshold_std: number;
}

export interface ParamGroup {
  name: string;
  patterns: string[];
  ndims: number[];
  optimizer: OptimizerConfig | null;
}

export interface JobSpec {
  parameters: ParameterSpec[];
  optimizer: OptimizerConfig | null;
  schedule: ScheduleConfig | null;
  num_workers: number;
  num_shards: number;
  max_grad_norm: number;
  shard_num_cpus: number;
  shard_num_gpus: number;
  snapshot_every_steps: number;
  snapshot_keep_last: number;
  snapshot_every_seconds: number;
  spike_guard: SpikeGuardConfig | null;
  param_groups: ParamGroup[];
  shard_memory_budget_bytes: Uint64;
  shard_device_memory_budget_bytes: Uint64;
  min_workers: number;
  max_workers: number;
  worker_timeout_s: number;
  on_worker_lost: number;
  replica_every_steps: number;
}

export interface WorkerInfo {
  worker_id: number;
  name: string;
  lease: Uint64;
  idle_s: number;
  lost: boolean;
}

export interface ParameterLayout {
  name: string;
  offset: Uint64;
  numel: Uint64;
  group: number;
}

export interface GroupInfo {
  name: string;
  optimizer: string;
  hyperparameters: JsonObject;
  lr: number;
}

export interface ShardMemory {
  budget_bytes: Uint64;
  resident_bytes: Uint64;
  buffer_bytes: Uint64;
  spilled_bytes: Uint64;
  read_bytes: Uint64;
  written_bytes: Uint64;
  read_bytes_per_second: number;
  write_bytes_per_second: number;
}

export interface ShardInfo {
  index: number;
  address: string;
  ranges: Range[];
  version: Uint64;
  initialized: boolean;
  memory: ShardMemory | null;
  unreachable: boolean;
  node: string;
}

export interface Job {
  job_id: string;
  spec: JobSpec | null;
  /** A JobState value. */
  state: number;
  shards: ShardInfo[];
  version: Uint64;
  total_elements: Uint64;
  layout: ParameterLayout[];
  workers: number[];
  skipped_steps: Record<string, Uint64>;
  members: WorkerInfo[];
  state_reason: string;
  generation: Uint64;
  recoveries: number;
  recovered_from: string;
  groups: GroupInfo[];
  total_steps: Uint64;
  /** A new worker token (only in CreateJob's answer, when the service runs with credentials). */
  worker_token: string;
  /** The tenant that owns the job ('' without credentials). */
  tenant: string;
}

export interface JoinJobResponse {
  worker_id: number;
  job: Job;
  upload_parameters: boolean;
  lease: Uint64;
  lease_timeout_s: number;
}

export interface HeartbeatResponse {
  version: Uint64;
  state: number;
  generation: Uint64;
}

export interface RotateJobTokenResponse {
  /** The new worker token ("psj.JOB_ID.SECRET"). */
  worker_token: string;
  /** When the tokens issued before stop being accepted (Unix seconds). */
  previous_expire_at: number;
}

export interface Snapshot {
  path: string;
  job_id: string;
  version: Uint64;
  applied_steps: Uint64;
  shards: number;
  bytes: Uint64;
  created_at: string;
}

export interface StepReport {
  step: Uint64;
  /** A StepOutcome value. */
  outcome: number;
  skip_reason: string;
  grad_norm: number;
  clip_coef: number;
  lr: number;
  loss_terms: Uint64;
  workers: number[];
  missing_workers: number[];
}

export interface PushResult {
  /** A StepOutcome value: that of the shard that completed the step, or PENDING. */
  outcome: number;
  /** The lowest version the shards reported. */
  version: number;
  report: StepReport | null;
}

export interface PullResult {
  /** The lowest version any shard served. */
  version: number;
  params: Float32Array;
  /** The report of the step that produced the version (null for version 0). */
  lastStep: StepReport | null;
}

/** The google.rpc.ErrorInfo of an error. */
export interface ErrorInfo {
  reason: string;
  domain: string;
  metadata: Record<string, string>;
}

// ---------------------------------------------------------------------------
// Errors and constants
// ---------------------------------------------------------------------------

/** The ErrorInfo reasons of ErrorReason (job_service.proto). */
export type ReasonName =
  | 'JOB_NOT_FOUND' | 'JOB_ALREADY_EXISTS' | 'INVALID_FIELD' | 'DTYPE_UNSUPPORTED' | 'CHUNK_OUT_OF_RANGE'
  | 'LENGTH_MISMATCH' | 'LAYOUT_MISMATCH' | 'STEP_ALREADY_APPLIED' | 'STEP_NOT_READY' | 'MESSAGE_TOO_LARGE'
  | 'NON_FINITE_GRADIENT' | 'PARAMETERS_NOT_INITIALIZED' | 'PARAMETERS_ALREADY_INITIALIZED'
  | 'DUPLICATE_CONTRIBUTION' | 'REQUEST_ID_REUSED' | 'JOB_FULL' | 'WORKER_NOT_FOUND' | 'UNKNOWN_NAME'
  | 'INTERNAL_ERROR' | 'NO_LOSS_TERMS' | 'SERVICE_UNAVAILABLE' | 'INCONSISTENT_LOSS_TERMS' | 'SNAPSHOT_CORRUPT'
  | 'SNAPSHOT_NOT_FOUND' | 'SNAPSHOT_FAILED' | 'SNAPSHOT_INCOMPATIBLE' | 'SNAPSHOT_IN_PROGRESS' | 'GRADIENT_SPIKE'
  | 'SPILL_DISK_FULL' | 'JOURNAL_CORRUPT' | 'LEASE_EXPIRED' | 'LEASE_SUPERSEDED' | 'STEP_WAITING_FOR_WORKERS'
  | 'JOB_FAILED' | 'JOB_ROLLED_BACK' | 'JOB_RECOVERING' | 'SHARDS_UNSCHEDULABLE' | 'WORKER_LOST' | 'SHARD_LOST'
  | 'LR_MISMATCH' | 'LIMIT_EXCEEDED' | 'UNAUTHENTICATED' | 'PERMISSION_DENIED' | 'QUOTA_EXCEEDED'
  | 'TOO_MANY_STREAMS';

/** Reason name -> the same name (built from the bundled protos). */
export declare const Reason: Readonly<Record<ReasonName, ReasonName> & Record<string, string>>;

/**
 * A failed call: the gRPC status and the service's ErrorInfo.
 * `err.code === 16` (UNAUTHENTICATED), `err.reason === 'PERMISSION_DENIED'`, ...
 */
export declare class ParamServerError extends Error {
  constructor(init: {
    method: string;
    code: number;
    details: string;
    reason?: string;
    domain?: string;
    errorMetadata?: Record<string, string>;
    cause?: unknown;
  });
  name: string;
  /** The call, e.g. "CreateJob" or "PushGradients[1]". */
  method: string;
  /** The gRPC status code (see grpc.status). */
  code: number;
  /** Its name, e.g. "UNAUTHENTICATED". */
  codeName: string;
  /** The status message. */
  details: string;
  /** ErrorInfo.reason ('' when the service sent none). */
  reason: ReasonName | (string & {});
  /** ErrorInfo.domain ("paramserver"). */
  domain: string;
  /** ErrorInfo.metadata, e.g. {field: "spec.num_workers"} or {resume_version: "12"}. */
  errorMetadata: Record<string, string>;
  /** How many times the call was tried. */
  attempts: number;
}

export declare const DType: Readonly<{ UNSPECIFIED: 0; FLOAT32: 1; BFLOAT16: 2; FLOAT16: 3 }>;
export declare const ParameterPoint: Readonly<{ UNSPECIFIED: 0; TRAIN: 1; EVAL: 2 }>;
export declare const StepOutcome: Readonly<{ UNSPECIFIED: 0; PENDING: 1; APPLIED: 2; SKIPPED: 3 }>;
export declare const JobState: Readonly<{
  UNSPECIFIED: 0; AWAITING_PARAMETERS: 1; RUNNING: 2; CREATING: 3; RECOVERING: 4; FAILED: 5;
}>;
export declare const WorkerLossPolicy: Readonly<{ UNSPECIFIED: 0; WAIT: 1; CONTINUE: 2; FAIL: 3 }>;

/** Elements per pushed/uploaded chunk (1 MiB of fp32). */
export declare const CHUNK_ELEMENTS: number;
export declare const DEFAULT_RETRY: Readonly<Required<RetryOptions>>;
export declare const DEFAULT_TIMEOUT_MS: number;
export declare const DEFAULT_PULL_TIMEOUT_MS: number;
/** The package's protos/ folder (the include root of the bundled .proto files). */
export declare const PROTO_ROOT: string;

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/** JobService calls on the front door. */
export declare class JobClient {
  constructor(address: string, options?: ClientOptions);
  readonly address: string;
  timeoutMs: number;
  /** Whether the channel uses TLS. */
  readonly secure: boolean;
  /** The token sent ('' = none). */
  token: string;
  /** The grpc-js JobService client. */
  readonly client: import('@grpc/grpc-js').Client;

  /** Sends `token` from now on (null or '' = none). */
  setToken(token: string | null): void;
  /** One unary JobService call by method name (e.g. "GetJob"), with the token, deadline and retries. */
  call<T = unknown>(method: string, request: object, overrides?: CallOverrides): Promise<T>;

  createJob(parameters: ParameterInput[], options?: CreateJobOptions): Promise<Job>;
  getJob(jobId: string): Promise<Job>;
  listJobs(): Promise<Job[]>;
  joinJob(jobId: string, workerName?: string): Promise<JoinJobResponse>;
  heartbeat(jobId: string, workerId: number, lease: Uint64Input, overrides?: CallOverrides): Promise<HeartbeatResponse>;
  leaveJob(jobId: string, workerId: number, lease?: Uint64Input): Promise<void>;
  deleteJob(jobId: string): Promise<void>;
  /** A new worker token; the previous ones stay valid previousValidS more seconds (default 0). */
  rotateJobToken(jobId: string, previousValidS?: number): Promise<RotateJobTokenResponse>;
  createSnapshot(jobId: string): Promise<Snapshot>;
  listSnapshots(jobId: string): Promise<Snapshot[]>;
  /** With expectedGeneration: only if the job is still at that generation (else GENERATION_CHANGED). */
  rollbackJob(jobId: string, snapshot: string, options?: { expectedGeneration?: Uint64Input }): Promise<Job>;
  close(): void;
}

/** One shard of a Worker's shard map. */
export interface ShardConnection {
  index: number;
  address: string;
  /** [start, length] pairs. */
  ranges: Array<[number, number]>;
  client: import('@grpc/grpc-js').Client;
}

/** A worker's data plane against every shard of its job. */
export declare class Worker {
  constructor(job: Job, workerId: number, options?: WorkerOptions);
  /** Joins `jobId` and starts the heartbeats; `options.token` is the job's worker token. */
  static join(address: string, jobId: string, workerName?: string, options?: WorkerOptions): Promise<Worker>;

  job: Job;
  readonly jobId: string;
  readonly workerId: number;
  readonly address: string;
  /** Whether this worker must upload the initial parameters. */
  readonly uploadParameters: boolean;
  timeoutMs: number;
  pullTimeoutMs: number;
  /** The token sent to the shards and the front door ('' = none). */
  token: string;
  lease: number;
  generation: number;
  leaseTimeoutS: number;
  readonly totalElements: number;
  shards: ShardConnection[];
  heartbeatTimer: NodeJS.Timeout | null;

  /** Sends `token` from now on (e.g. after RotateJobToken). */
  setToken(token: string | null): void;
  upload(params: Float32Array, requestId?: string): Promise<number>;
  push(step: Uint64Input, grad: Float32Array, lossTerms: number, requestId?: string): Promise<PushResult>;
  pull(minVersion: Uint64Input, out?: Float32Array, point?: 'TRAIN' | 'EVAL'): Promise<PullResult>;
  /** Re-reads the job and adopts its generation and shard map; resolves with its version. */
  refresh(): Promise<number>;
  startHeartbeat(): void;
  stopHeartbeat(): void;
  leave(): Promise<void>;
  close(): void;
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/** A fresh idempotency key (a UUID). */
export declare function newRequestId(): string;
/** A plain object as a google.protobuf.Struct message (as the loader encodes it). */
export declare function toStruct(obj: JsonObject | null | undefined): { fields: Record<string, object> };
/** A decoded google.protobuf.Struct as a plain object. */
export declare function fromStruct(struct: { fields?: Record<string, object> } | null | undefined): JsonObject;
/** A JS value as a google.protobuf.Value message. */
export declare function toValue(value: JsonValue | undefined): object;
/** A decoded google.protobuf.Value as a JS value. */
export declare function fromValue(value: object | null | undefined): JsonValue;
/** The ErrorInfo of an encoded google.rpc.Status ("grpc-status-details-bin"), or null. */
export declare function decodeStatusDetails(buf: Uint8Array): ErrorInfo | null;
/** The channel credentials the clients use for `tls` (see ClientOptions.tls; undefined = from the environment). */
export declare function channelCredentials(tls?: TlsOptions | boolean | null): ChannelCredentials;
/** Call metadata carrying `token` (undefined = $PARAMSERVER_TOKEN). */
export declare function tokenMetadata(token?: string | null): Metadata;
/** The raw JobService client constructor (for calls this wrapper does not cover). */
export declare const JobService: ServiceClientConstructor;
/** The raw ShardService client constructor. */
export declare const ShardService: ServiceClientConstructor;
