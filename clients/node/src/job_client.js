'use strict';
/** The control plane: JobService calls on the front door. */

const crypto = require('node:crypto');

const { pb, DType } = require('./proto');
const { toStruct, plainJob } = require('./struct');
const { resolveToken } = require('./credentials');
const { unaryCall } = require('./calls');
const { resolveSettings } = require('./settings');

/** A fresh idempotency key. */
function newRequestId() {
  return crypto.randomUUID();
}

/** A parameter of the model description: [name, shape] or {name, shape, group}. */
function parameterSpec(p) {
  const { name, shape, group = '' } = Array.isArray(p) ? { name: p[0], shape: p[1] } : p || {};
  if (typeof name !== 'string' || !Array.isArray(shape)) throw new TypeError('a parameter is [name, shape] or {name, shape, group}');
  return { name, shape, dtype: DType.FLOAT32, group };
}

/** A ParamGroup from {name, patterns, ndims, optimizer, hyperparameters}. */
function paramGroup({ name, patterns = [], ndims = [], optimizer = '', hyperparameters = {} }) {
  return { name, patterns, ndims, optimizer: { name: optimizer, hyperparameters: toStruct(hyperparameters) } };
}

/**
 * JobService calls on the front door at `address` ("host:port").
 * Options: timeoutMs (deadline of each attempt, default 60 s), token (sent as
 * "authorization: Bearer TOKEN"; default $PARAMSERVER_TOKEN), tls ({ca,
 * cert, key, serverName}, true or false; default from $PARAMSERVER_TLS_CA,
 * $PARAMSERVER_TLS_CERT, $PARAMSERVER_TLS_KEY), retry ({attempts,
 * initialBackoffMs, maxBackoffMs, multiplier} or false) and channelOptions.
 *
 * Every mutating call makes one request_id and sends it on every retry.
 * Jobs come back with their google.protobuf.Struct fields as plain objects
 * (spec.optimizer.hyperparameters, spec.schedule.parameters,
 * groups[i].hyperparameters, ...).
 */
class JobClient {
  constructor(address, options = {}) {
    this.address = address;
    const settings = resolveSettings(options);
    this.timeoutMs = settings.timeoutMs;
    this.retry = settings.retry;
    this.secure = settings.secure;
    this.token = settings.token;
    this.client = new pb.JobService(address, settings.credentials, settings.channelOptions);
  }

  /** Sends `token` from now on (null or '' = none). */
  setToken(token) {
    this.token = resolveToken(token === undefined ? null : token);
  }

  /** One unary JobService call; `overrides` may set timeoutMs and retry. */
  call(method, request, overrides = {}) {
    const ctx = {
      timeoutMs: overrides.timeoutMs ?? this.timeoutMs,
      retry: overrides.retry ?? this.retry,
      token: () => this.token,
    };
    return unaryCall(this.client, method, request, ctx);
  }

  /**
   * Creates a job. With `resume: true`, an existing job of that `jobId` with the
   * same description is returned (to continue it); without, that is
   * ALREADY_EXISTS (JOB_ALREADY_EXISTS).
   * `parameters` is a list of [name, shape] pairs (or {name, shape, group}) in
   * flat-space order. Settings: jobId, optimizer ("sgd" | "adam" | "adamw" |
   * ...), hyperparameters (a plain object: numbers, strings, booleans, arrays,
   * objects), schedule, scheduleParameters, numWorkers, numShards,
   * maxGradNorm, shardNumCpus, shardNumGpus, minWorkers, maxWorkers,
   * workerTimeoutS, onWorkerLost, snapshotEverySteps, snapshotKeepLast,
   * snapshotEverySeconds, replicaEverySteps, shardMemoryBudgetBytes,
   * shardDeviceMemoryBudgetBytes, paramGroups, restoreFrom, resume. Resolves
   * with the Job; with credentials, its `worker_token` is the token workers
   * use.
   */
  async createJob(parameters, {
    jobId = '',
    optimizer = 'adamw',
    hyperparameters = {},
    schedule = 'constant',
    scheduleParameters = {},
    numWorkers = 1,
    numShards = 1,
    maxGradNorm = 0,
    shardNumCpus = 0,
    shardNumGpus = 0,
    minWorkers = 0,
    maxWorkers = 0,
    workerTimeoutS = 0,
    onWorkerLost = 0,
    snapshotEverySteps = 0,
    snapshotKeepLast = 0,
    snapshotEverySeconds = 0,
    replicaEverySteps = 0,
    shardMemoryBudgetBytes = 0,
    shardDeviceMemoryBudgetBytes = 0,
    paramGroups = [],
    restoreFrom = '',
    resume = false,
  } = {}) {
    const spec = {
      parameters: (parameters || []).map(parameterSpec),
      optimizer: { name: optimizer, hyperparameters: toStruct(hyperparameters) },
      schedule: { name: schedule, parameters: toStruct(scheduleParameters) },
      num_workers: numWorkers,
      num_shards: numShards,
      max_grad_norm: maxGradNorm,
      shard_num_cpus: shardNumCpus,
      shard_num_gpus: shardNumGpus,
      min_workers: minWorkers,
      max_workers: maxWorkers,
      worker_timeout_s: workerTimeoutS,
      on_worker_lost: onWorkerLost,
      snapshot_every_steps: snapshotEverySteps,
      snapshot_keep_last: snapshotKeepLast,
      snapshot_every_seconds: snapshotEverySeconds,
      replica_every_steps: replicaEverySteps,
      shard_memory_budget_bytes: shardMemoryBudgetBytes,
      shard_device_memory_budget_bytes: shardDeviceMemoryBudgetBytes,
      param_groups: paramGroups.map(paramGroup),
    };
    const request = { request_id: newRequestId(), job_id: jobId, spec, restore_from: restoreFrom, resume };
    return plainJob(await this.call('CreateJob', request));
  }

  /** The job with its shard map and published version. */
  async getJob(jobId) {
    return plainJob(await this.call('GetJob', { job_id: jobId }));
  }

  /** Every job of the service (with credentials: of the admin token's tenant). */
  async listJobs() {
    const resp = await this.call('ListJobs', {});
    return resp.jobs.map(plainJob);
  }

  /**
   * Joins a job; resolves with the JoinJobResponse {worker_id, job,
   * upload_parameters, lease, lease_timeout_s}. The lease (a decimal string)
   * goes into every push, pull, heartbeat and leave of this membership; renew
   * it within lease_timeout_s seconds (heartbeat(), or any push or pull).
   */
  async joinJob(jobId, workerName = '') {
    const request = { request_id: newRequestId(), job_id: jobId, worker_name: workerName };
    const resp = await this.call('JoinJob', request);
    plainJob(resp.job);
    return resp;
  }

  /**
   * Renews worker `workerId`'s `lease` (a Number or a decimal string).
   * Resolves with the HeartbeatResponse {version, state, generation}; rejects
   * with ABORTED (LEASE_EXPIRED or LEASE_SUPERSEDED) when the lease has ended
   * (join again).
   */
  heartbeat(jobId, workerId, lease, overrides = {}) {
    return this.call('Heartbeat', { job_id: jobId, worker_id: workerId, lease }, overrides);
  }

  /**
   * Leaves a job, freeing the worker id. `lease` is the lease JoinJob gave
   * (0 = whatever lease the worker id holds).
   */
  async leaveJob(jobId, workerId, lease = 0) {
    const request = { request_id: newRequestId(), job_id: jobId, worker_id: workerId, lease };
    await this.call('LeaveJob', request);
  }

  /** Deletes a job and its state (admin token). */
  async deleteJob(jobId) {
    await this.call('DeleteJob', { request_id: newRequestId(), job_id: jobId });
  }

  /**
   * Issues a new worker token for a job (admin token). The tokens issued
   * before stay valid for `previousValidS` more seconds (0 = refused at once;
   * at most a week). Resolves with {worker_token, previous_expire_at} (Unix
   * seconds). Give the new token to the workers: `worker.setToken(token)`.
   */
  rotateJobToken(jobId, previousValidS = 0) {
    const request = { request_id: newRequestId(), job_id: jobId, previous_valid_s: previousValidS };
    return this.call('RotateJobToken', request);
  }

  /** Takes a consistent snapshot of a job; resolves with the Snapshot once it is durable. */
  createSnapshot(jobId) {
    return this.call('CreateSnapshot', { request_id: newRequestId(), job_id: jobId });
  }

  /** The committed snapshots of a job, oldest first. */
  async listSnapshots(jobId) {
    const resp = await this.call('ListSnapshots', { job_id: jobId });
    return resp.snapshots;
  }

  /**
   * Restores a running job in place to `snapshot` (a snapshot path); resolves with the Job (admin token).
   * With `{ expectedGeneration }` only if the job is still at that generation, else a ServiceError
   * GENERATION_CHANGED (ABORTED): several workers resuming from one checkpoint roll it back once.
   */
  async rollbackJob(jobId, snapshot, options = {}) {
    const req = { request_id: newRequestId(), job_id: jobId, snapshot };
    if (options.expectedGeneration !== undefined && options.expectedGeneration !== null) {
      req.expected_generation = options.expectedGeneration;
    }
    return plainJob(await this.call('RollbackJob', req));
  }

  /** Closes the channel. */
  close() {
    this.client.close();
  }
}

module.exports = { JobClient, newRequestId };
