'use strict';
/**
 * A small Node.js client for paramserver (optimizer-as-a-service over gRPC).
 *
 *   const ps = require('./paramserver');
 *   const jobs = new ps.JobClient('127.0.0.1:50051');
 *   const worker = await ps.Worker.join('127.0.0.1:50051', jobId, 'node-worker');
 *   if (worker.uploadParameters) await worker.upload(initialParams);   // Float32Array
 *   const { version, params } = await worker.pull(0);
 *   await worker.push(0, grad, lossTerms);                             // Float32Array, integer
 *   await worker.leave();                                              // also stops the heartbeats
 *
 * The contract is protos/paramserver/v1/*.proto, loaded at run time with
 * @grpc/proto-loader. Control-plane calls (JobService) go to the front door;
 * uploads, pushes and pulls go straight to every shard of the job's shard map,
 * concurrently. Every call carries a deadline and every mutating call a fresh
 * request_id. Failures are thrown as ParamServerError, which carries the gRPC
 * status code and, when the server sent one, the google.rpc.ErrorInfo reason.
 *
 * A joined worker holds a lease (JoinJobResponse.lease) and knows the job's
 * generation (Job.generation); both go into every push header and pull
 * request. A Worker created by join() renews its lease with a Heartbeat every
 * lease_timeout_s / 3 seconds (pushes and pulls renew it too) until leave()
 * or close().
 */

const crypto = require('node:crypto');
const os = require('node:os');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// ---------------------------------------------------------------------------
// Loading the contract
// ---------------------------------------------------------------------------

/** The repository's protos/ folder (this file lives in clients/node/). */
const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILES = ['paramserver/v1/job_service.proto', 'paramserver/v1/shard_service.proto'];

/**
 * Loader options. uint64 fields (offsets, counts, versions, loss_terms,
 * leases, generations) are decoded as decimal strings so that no value is silently rounded; toInt()
 * turns them into Numbers after checking that they are exact. Enums are
 * Numbers, unset fields get their defaults and `msg.kind` names the member of
 * a oneof that is set ("header" or "chunk").
 */
const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: Number,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_ROOT],
};

const packageDefinition = protoLoader.loadSync(PROTO_FILES, LOADER_OPTIONS);
const pb = grpc.loadPackageDefinition(packageDefinition).paramserver.v1;

// ---------------------------------------------------------------------------
// Constants of the wire format (tensor.proto, shard_service.proto)
// ---------------------------------------------------------------------------

/** DType enum values. Only fp32 is produced and consumed by this client. */
const DType = Object.freeze({ UNSPECIFIED: 0, FLOAT32: 1, BFLOAT16: 2, FLOAT16: 3 });

/** ParameterPoint enum values (which values a pull serves). */
const ParameterPoint = Object.freeze({ UNSPECIFIED: 0, TRAIN: 1, EVAL: 2 });

/** StepOutcome enum values. */
const StepOutcome = Object.freeze({ UNSPECIFIED: 0, PENDING: 1, APPLIED: 2, SKIPPED: 3 });

/** JobState enum values. */
const JobState = Object.freeze({
  UNSPECIFIED: 0, AWAITING_PARAMETERS: 1, RUNNING: 2, CREATING: 3, RECOVERING: 4, FAILED: 5,
});

/** Elements per pushed/uploaded chunk: 1 MiB of fp32, the size the protos recommend. */
const CHUNK_ELEMENTS = 262144;

/** The service accepts gRPC messages up to 64 MiB; accept answers as large. */
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
const CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
};

/** Default deadline of control-plane calls, uploads and pushes (ms). */
const DEFAULT_TIMEOUT_MS = 60_000;
/** Default deadline of a pull, which may wait for the slowest worker (ms). */
const DEFAULT_PULL_TIMEOUT_MS = 600_000;

const LITTLE_ENDIAN_HOST = os.endianness() === 'LE';

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/** Names of gRPC status codes, by number. */
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/**
 * A failed call. `code` is the gRPC status code (a number, see grpc.status),
 * `codeName` its name; `reason`, `domain` and `errorMetadata` come from the
 * google.rpc.ErrorInfo in the trailing metadata when the server sent one
 * (reason is e.g. "JOB_NOT_FOUND"; see ErrorReason in job_service.proto).
 */
class ParamServerError extends Error {
  constructor({ method, code, details, reason = '', domain = '', errorMetadata = {}, cause }) {
    const codeName = CODE_NAMES[code] || String(code);
    super(`${method}: ${codeName}${reason ? ` (${reason})` : ''}: ${details}`, cause ? { cause } : undefined);
    this.name = 'ParamServerError';
    this.method = method;
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.reason = reason;
    this.domain = domain;
    this.errorMetadata = errorMetadata;
  }
}

/*
 * google.rpc.Status is not part of protos/, so its few fields are read with a
 * minimal protobuf wire-format reader instead of pulling in more .proto files:
 *   Status    { int32 code = 1; string message = 2; repeated Any details = 3; }
 *   Any       { string type_url = 1; bytes value = 2; }
 *   ErrorInfo { string reason = 1; string domain = 2; map<string,string> metadata = 3; }
 * (a map entry is { string key = 1; string value = 2; }).
 */

/** Reads a varint at `pos`; returns [value, next position]. */
function readVarint(buf, pos) {
  let value = 0;
  let scale = 1;
  for (let i = 0; i < 10; i += 1) {
    if (pos >= buf.length) throw new Error('truncated varint');
    const byte = buf[pos++];
    value += (byte & 0x7f) * scale;
    if ((byte & 0x80) === 0) return [value, pos];
    scale *= 128;
  }
  throw new Error('varint too long');
}

/** Yields {field, wire, value} for each field of an encoded message; value is a Number or a Buffer. */
function* wireFields(buf) {
  let pos = 0;
  while (pos < buf.length) {
    let key;
    [key, pos] = readVarint(buf, pos);
    const field = Math.floor(key / 8);
    const wire = key % 8;
    if (wire === 0) {
      let value;
      [value, pos] = readVarint(buf, pos);
      yield { field, wire, value };
    } else if (wire === 2) {
      let length;
      [length, pos] = readVarint(buf, pos);
      if (pos + length > buf.length) throw new Error('truncated field');
      yield { field, wire, value: buf.subarray(pos, pos + length) };
      pos += length;
    } else if (wire === 1 || wire === 5) {
      pos += wire === 1 ? 8 : 4; // fixed64 / fixed32: not used by these messages
    } else {
      throw new Error(`unsupported wire type ${wire}`);
    }
  }
}

/** Decodes google.rpc.ErrorInfo. */
function decodeErrorInfo(buf) {
  const info = { reason: '', domain: '', metadata: {} };
  for (const { field, wire, value } of wireFields(buf)) {
    if (wire !== 2) continue;
    if (field === 1) info.reason = value.toString('utf8');
    else if (field === 2) info.domain = value.toString('utf8');
    else if (field === 3) {
      let key = '';
      let val = '';
      for (const entry of wireFields(value)) {
        if (entry.wire !== 2) continue;
        if (entry.field === 1) key = entry.value.toString('utf8');
        else if (entry.field === 2) val = entry.value.toString('utf8');
      }
      info.metadata[key] = val;
    }
  }
  return info;
}

/** Decodes google.rpc.Status from "grpc-status-details-bin"; returns its ErrorInfo or null. */
function decodeStatusDetails(buf) {
  for (const { field, wire, value } of wireFields(buf)) {
    if (field !== 3 || wire !== 2) continue; // details (google.protobuf.Any)
    let typeUrl = '';
    let payload = null;
    for (const any of wireFields(value)) {
      if (any.wire !== 2) continue;
      if (any.field === 1) typeUrl = any.value.toString('utf8');
      else if (any.field === 2) payload = any.value;
    }
    if (typeUrl.endsWith('/google.rpc.ErrorInfo') && payload) return decodeErrorInfo(payload);
  }
  return null;
}

/** Turns what grpc-js rejected with into a ParamServerError. */
function toError(err, method) {
  if (err instanceof ParamServerError) return err;
  if (typeof err?.code !== 'number' || !err.metadata) {
    // Not a gRPC status (e.g. a local bug or a bad input): keep it as is.
    return err;
  }
  let info = null;
  const raw = err.metadata.get('grpc-status-details-bin');
  if (raw.length > 0) {
    try {
      info = decodeStatusDetails(Buffer.from(raw[0]));
    } catch {
      info = null; // undecodable details: the code and message still say what failed
    }
  }
  return new ParamServerError({
    method,
    code: err.code,
    details: err.details ?? err.message,
    reason: info?.reason ?? '',
    domain: info?.domain ?? '',
    errorMetadata: info?.metadata ?? {},
    cause: err,
  });
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/** A fresh idempotency key. */
function newRequestId() {
  return crypto.randomUUID();
}

/** The grpc-js call options for a deadline `ms` from now. */
function deadline(ms) {
  return { deadline: new Date(Date.now() + ms) };
}

/** A uint64 from the wire (a decimal string) as an exact Number. */
function toInt(value, what) {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`${what} = ${value} is not a safe non-negative integer`);
  return n;
}

/** A JS value as a google.protobuf.Value (for hyperparameters and schedule parameters). */
function toValue(v) {
  if (v === null || v === undefined) return { null_value: 0 };
  if (typeof v === 'number') return { number_value: v };
  if (typeof v === 'string') return { string_value: v };
  if (typeof v === 'boolean') return { bool_value: v };
  if (Array.isArray(v)) return { list_value: { values: v.map(toValue) } };
  if (typeof v === 'object') return { struct_value: toStruct(v) };
  throw new TypeError(`cannot encode ${typeof v} in a google.protobuf.Value`);
}

/** A plain object as a google.protobuf.Struct. */
function toStruct(obj) {
  const fields = {};
  for (const [k, v] of Object.entries(obj || {})) fields[k] = toValue(v);
  return { fields };
}

/** A decoded google.protobuf.Value as a JS value. */
function fromValue(v) {
  switch (v?.kind) {
    case 'number_value': return v.number_value;
    case 'string_value': return v.string_value;
    case 'bool_value': return v.bool_value;
    case 'list_value': return (v.list_value.values || []).map(fromValue);
    case 'struct_value': return fromStruct(v.struct_value);
    default: return null;
  }
}

/** A decoded google.protobuf.Struct as a plain object. */
function fromStruct(s) {
  const out = {};
  for (const [k, v] of Object.entries(s?.fields || {})) out[k] = fromValue(v);
  return out;
}

/** Elements [offset, offset + count) of a Float32Array as little-endian fp32 bytes. */
function encodeFloat32(arr, offset, count) {
  if (LITTLE_ENDIAN_HOST) {
    // A view, no copy: the serializer copies it into the message.
    return Buffer.from(arr.buffer, arr.byteOffset + offset * 4, count * 4);
  }
  const buf = Buffer.allocUnsafe(count * 4);
  for (let i = 0; i < count; i += 1) buf.writeFloatLE(arr[offset + i], i * 4);
  return buf;
}

/** Writes little-endian fp32 bytes into `out` starting at element `offset`. */
function decodeFloat32Into(out, offset, data) {
  if (LITTLE_ENDIAN_HOST) {
    // Byte copy into the (aligned) target; `data` itself may be unaligned.
    new Uint8Array(out.buffer, out.byteOffset + offset * 4, data.length).set(data);
    return;
  }
  for (let i = 0; i < data.length / 4; i += 1) out[offset + i] = data.readFloatLE(i * 4);
}

/** Yields [offset, count] pieces of at most `step` elements covering [start, start + length). */
function* split(start, length, step) {
  for (let off = start; off < start + length; off += step) yield [off, Math.min(step, start + length - off)];
}

/** Promise wrapper of a unary call. */
function unaryCall(client, method, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    client[method](request, deadline(timeoutMs), (err, resp) => (err ? reject(toError(err, method)) : resolve(resp)));
  });
}

/**
 * A client-streaming call: writes `messages` (any iterable), honouring
 * back-pressure, then half-closes and resolves with the answer.
 */
function clientStreamCall(client, method, messages, timeoutMs) {
  return new Promise((resolve, reject) => {
    let finished = false;
    const call = client[method](deadline(timeoutMs), (err, resp) => {
      finished = true;
      if (err) reject(toError(err, method));
      else resolve(resp);
    });
    // Resolves when the stream can take more data, or when the call is over
    // (after an error 'drain' never comes).
    const writable = () =>
      new Promise((done) => {
        const onEvent = () => {
          call.removeListener('drain', onEvent);
          call.removeListener('status', onEvent);
          done();
        };
        call.on('drain', onEvent);
        call.on('status', onEvent);
      });
    (async () => {
      for (const msg of messages) {
        if (finished) return;
        if (!call.write(msg)) await writable();
      }
      if (!finished) call.end();
    })().catch((e) => {
      // A bad message (e.g. a serialization failure): abandon the call.
      finished = true;
      call.cancel();
      reject(e);
    });
  });
}

// ---------------------------------------------------------------------------
// Control plane
// ---------------------------------------------------------------------------

/**
 * JobService calls on the front door at `address` ("host:port").
 * Options: timeoutMs (deadline of each call, default 60 s).
 */
class JobClient {
  constructor(address, { timeoutMs = DEFAULT_TIMEOUT_MS } = {}) {
    this.address = address;
    this.timeoutMs = timeoutMs;
    this.client = new pb.JobService(address, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  }

  /**
   * Creates a job. With `resume: true`, an existing job of that `jobId` with the
   * same description is returned (to continue it); without, that is
   * ALREADY_EXISTS (JOB_ALREADY_EXISTS).
   * `parameters` is a list of [name, shape] pairs in flat-space order.
   * Settings: jobId, optimizer ("sgd" | "adam" | "adamw"), hyperparameters
   * (plain object), schedule, scheduleParameters, numWorkers, numShards,
   * maxGradNorm, shardNumCpus, shardNumGpus, resume. Resolves with the Job.
   */
  createJob(parameters, {
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
    resume = false,
  } = {}) {
    const spec = {
      parameters: parameters.map(([name, shape]) => ({ name, shape, dtype: DType.FLOAT32 })),
      optimizer: { name: optimizer, hyperparameters: toStruct(hyperparameters) },
      schedule: { name: schedule, parameters: toStruct(scheduleParameters) },
      num_workers: numWorkers,
      num_shards: numShards,
      max_grad_norm: maxGradNorm,
      shard_num_cpus: shardNumCpus,
      shard_num_gpus: shardNumGpus,
    };
    const request = { request_id: newRequestId(), job_id: jobId, spec, resume };
    return unaryCall(this.client, 'CreateJob', request, this.timeoutMs);
  }

  /** The job with its shard map and published version. */
  getJob(jobId) {
    return unaryCall(this.client, 'GetJob', { job_id: jobId }, this.timeoutMs);
  }

  /** Every job of the service. */
  async listJobs() {
    const resp = await unaryCall(this.client, 'ListJobs', {}, this.timeoutMs);
    return resp.jobs;
  }

  /**
   * Joins a job; resolves with the JoinJobResponse {worker_id, job,
   * upload_parameters, lease, lease_timeout_s}. The lease (a decimal string)
   * goes into every push, pull, heartbeat and leave of this membership; renew
   * it within lease_timeout_s seconds (heartbeat(), or any push or pull).
   */
  joinJob(jobId, workerName = '') {
    const request = { request_id: newRequestId(), job_id: jobId, worker_name: workerName };
    return unaryCall(this.client, 'JoinJob', request, this.timeoutMs);
  }

  /**
   * Renews worker `workerId`'s `lease` (a Number or a decimal string).
   * Resolves with the HeartbeatResponse {version, state, generation}; rejects
   * with ABORTED (LEASE_EXPIRED or LEASE_SUPERSEDED) when the lease has ended
   * (join again).
   */
  heartbeat(jobId, workerId, lease) {
    const request = { job_id: jobId, worker_id: workerId, lease };
    return unaryCall(this.client, 'Heartbeat', request, this.timeoutMs);
  }

  /**
   * Leaves a job, freeing the worker id. `lease` is the lease JoinJob gave
   * (0 = whatever lease the worker id holds).
   */
  async leaveJob(jobId, workerId, lease = 0) {
    const request = { request_id: newRequestId(), job_id: jobId, worker_id: workerId, lease };
    await unaryCall(this.client, 'LeaveJob', request, this.timeoutMs);
  }

  /** Deletes a job and its state. */
  async deleteJob(jobId) {
    await unaryCall(this.client, 'DeleteJob', { request_id: newRequestId(), job_id: jobId }, this.timeoutMs);
  }

  /** Closes the channel. */
  close() {
    this.client.close();
  }
}

// ---------------------------------------------------------------------------
// Data plane
// ---------------------------------------------------------------------------

/** The shards of `job`'s shard map, each with its ranges and a ShardService client. */
function connectShards(job) {
  return job.shards.map((s) => ({
    index: s.index,
    address: s.address,
    ranges: s.ranges.map((r) => [toInt(r.start, 'range.start'), toInt(r.length, 'range.length')]),
    client: new pb.ShardService(s.address, grpc.credentials.createInsecure(), CHANNEL_OPTIONS),
  }));
}

/**
 * One worker's data plane: uploads, pushes and pulls against every shard of
 * `job` (a Job message, e.g. JoinJobResponse.job) as worker `workerId`.
 * Options: timeoutMs (uploads and pushes, default 60 s), pullTimeoutMs
 * (pulls, default 600 s), address (the front door, needed by leave() and the
 * heartbeats), uploadParameters (JoinJobResponse.upload_parameters), lease
 * (JoinJobResponse.lease) and leaseTimeoutS (JoinJobResponse.lease_timeout_s).
 *
 * `lease` and `generation` (job.generation) go into every push header and
 * pull request. With `address`, `lease` and `leaseTimeoutS` the worker sends
 * a Heartbeat every leaseTimeoutS / 3 seconds until leave() or close(), on an
 * unref()'d timer (it does not keep the process alive).
 */
class Worker {
  constructor(job, workerId, {
    address = '',
    uploadParameters = false,
    timeoutMs = DEFAULT_TIMEOUT_MS,
    pullTimeoutMs = DEFAULT_PULL_TIMEOUT_MS,
    lease = 0,
    leaseTimeoutS = 0,
  } = {}) {
    this.job = job;
    this.jobId = job.job_id;
    this.workerId = workerId;
    this.address = address;
    this.uploadParameters = uploadParameters;
    this.timeoutMs = timeoutMs;
    this.pullTimeoutMs = pullTimeoutMs;
    /** This membership's lease (JoinJobResponse.lease). */
    this.lease = toInt(lease, 'lease');
    /** The job's generation this worker knows (Job.generation). */
    this.generation = toInt(job.generation, 'generation');
    this.leaseTimeoutS = Number(leaseTimeoutS) || 0;
    this.totalElements = toInt(job.total_elements, 'total_elements');
    this.shards = connectShards(job);
    this.heartbeatTimer = null;
    this.heartbeatClient = null;
    this.heartbeatInFlight = false;
    if (this.address && this.lease && this.leaseTimeoutS > 0) this.startHeartbeat();
  }

  /**
   * Joins `jobId` through the front door at `address`, connects to its shards
   * and starts renewing the lease in the background.
   */
  static async join(address, jobId, workerName = '', options = {}) {
    const jobs = new JobClient(address, options);
    try {
      const resp = await jobs.joinJob(jobId, workerName);
      return new Worker(resp.job, resp.worker_id, {
        ...options,
        address,
        uploadParameters: resp.upload_parameters,
        lease: resp.lease,
        leaseTimeoutS: resp.lease_timeout_s,
      });
    } finally {
      jobs.close();
    }
  }

  /**
   * Starts the heartbeat timer: a Heartbeat every leaseTimeoutS / 3 seconds
   * (a tick is skipped while the previous heartbeat is still in flight). A
   * failed heartbeat is retried at the next tick, except ABORTED (the lease
   * ended: LEASE_EXPIRED or LEASE_SUPERSEDED), which stops the timer with a
   * warning; the next push or pull then fails with the same reason.
   */
  startHeartbeat() {
    if (this.heartbeatTimer) return;
    const everyMs = (this.leaseTimeoutS * 1000) / 3;
    this.heartbeatClient = new JobClient(this.address, { timeoutMs: Math.max(everyMs, 1000) });
    this.heartbeatTimer = setInterval(() => this.beat(), everyMs);
    this.heartbeatTimer.unref();
  }

  /** One heartbeat tick (see startHeartbeat()). */
  async beat() {
    if (this.heartbeatInFlight || !this.heartbeatClient) return;
    this.heartbeatInFlight = true;
    const jobs = this.heartbeatClient;
    try {
      await jobs.heartbeat(this.jobId, this.workerId, this.lease);
    } catch (err) {
      if (jobs !== this.heartbeatClient) return; // stopped meanwhile
      if (err?.code === grpc.status.ABORTED) {
        console.warn(`paramserver: worker ${this.workerId} of job ${this.jobId}: heartbeats stopped: ${err.message}`);
        this.stopHeartbeat();
      }
      // Anything else (e.g. UNAVAILABLE, a deadline): retried at the next tick.
    } finally {
      this.heartbeatInFlight = false;
    }
  }

  /** Stops the heartbeat timer and closes its channel (idempotent). */
  stopHeartbeat() {
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
    if (this.heartbeatClient) this.heartbeatClient.close();
    this.heartbeatClient = null;
  }

  /**
   * Re-reads the job (GetJob through the front door) and adopts its
   * generation and shard map; resolves with the job's published version.
   * Call it after a push or pull failed with ABORTED (JOB_ROLLED_BACK), then
   * pull errorMetadata.resume_version and go on from that step. Do not call
   * it while pushes or pulls are in flight.
   */
  async refresh() {
    if (!this.address) throw new Error('refresh() needs the front door address (create the Worker with join())');
    const jobs = new JobClient(this.address, { timeoutMs: this.timeoutMs });
    let job;
    try {
      job = await jobs.getJob(this.jobId);
    } finally {
      jobs.close();
    }
    for (const s of this.shards) s.client.close();
    this.job = job;
    this.generation = toInt(job.generation, 'generation');
    this.shards = connectShards(job);
    return toInt(job.version, 'version');
  }

  /** Checks that `values` is a Float32Array of the whole flat space. */
  checkFlat(values, what) {
    if (!(values instanceof Float32Array)) throw new TypeError(`${what} must be a Float32Array`);
    if (values.length !== this.totalElements) {
      throw new RangeError(`${what} has ${values.length} elements; the job has ${this.totalElements}`);
    }
  }

  /** The fp32 chunks of `flat` that shard `shard` owns, as TensorChunk objects. */
  *chunks(shard, flat) {
    for (const [start, length] of shard.ranges) {
      for (const [offset, count] of split(start, length, CHUNK_ELEMENTS)) {
        yield { offset, count, dtype: DType.FLOAT32, data: encodeFloat32(flat, offset, count) };
      }
    }
  }

  /** Uploads the initial parameters (a Float32Array of the whole model) to every shard. */
  async upload(params, requestId = newRequestId()) {
    this.checkFlat(params, 'params');
    const self = this;
    function* stream(shard) {
      yield { header: { job_id: self.jobId, request_id: requestId } };
      for (const chunk of self.chunks(shard, params)) yield { chunk };
    }
    const answers = await Promise.all(
      this.shards.map((s) => clientStreamCall(s.client, 'UploadParameters', stream(s), this.timeoutMs)),
    );
    return answers.reduce((n, a) => n + toInt(a.elements, 'elements'), 0);
  }

  /**
   * Pushes this worker's gradient (a Float32Array of the whole model) of the
   * SUMMED loss over `lossTerms` terms for `step` to every shard. Resolves
   * with {outcome, version, report}: the outcome of the shard that completed
   * the step (or PENDING), the lowest version reported, and the step report.
   */
  async push(step, grad, lossTerms, requestId = newRequestId()) {
    this.checkFlat(grad, 'grad');
    if (!Number.isSafeInteger(lossTerms) || lossTerms < 0) throw new RangeError('lossTerms must be an integer >= 0');
    const header = {
      job_id: this.jobId,
      worker_id: this.workerId,
      step,
      request_id: requestId,
      loss_terms: lossTerms,
      lease: this.lease,
      generation: this.generation,
    };
    const self = this;
    function* stream(shard) {
      yield { header };
      for (const chunk of self.chunks(shard, grad)) yield { chunk };
    }
    const answers = await Promise.all(
      this.shards.map((s) => clientStreamCall(s.client, 'PushGradients', stream(s), this.timeoutMs)),
    );
    const done = answers.find((a) => a.outcome !== StepOutcome.PENDING);
    return {
      outcome: done ? done.outcome : StepOutcome.PENDING,
      version: Math.min(...answers.map((a) => toInt(a.version, 'version'))),
      report: done ? done.report : null,
    };
  }

  /**
   * Waits until every shard has published `minVersion` and reads the whole
   * model. Resolves with {version, params, lastStep}: the lowest version any
   * shard served (in synchronous training all serve the same), the
   * parameters (written into `out` if given, else a new Float32Array), and
   * the report of the step that produced the version (null for version 0).
   * `point` 'EVAL' reads the evaluation point (Schedule-Free's averaged x; the
   * parameters themselves for every other rule); the default is 'TRAIN'.
   */
  async pull(minVersion, out = new Float32Array(this.totalElements), point = 'TRAIN') {
    this.checkFlat(out, 'out');
    const results = await Promise.all(this.shards.map((s) => this.pullShard(s, minVersion, out, point)));
    return {
      version: Math.min(...results.map((r) => r.version)),
      params: out,
      lastStep: results.find((r) => r.lastStep)?.lastStep ?? null,
    };
  }

  /** Pulls one shard's ranges into `out`. */
  async pullShard(shard, minVersion, out, point = 'TRAIN') {
    const method = `PullParameters[${shard.index}]`;
    if (!(point in ParameterPoint)) throw new Error(`unknown point ${point}; use TRAIN or EVAL`);
    const request = {
      job_id: this.jobId,
      min_version: minVersion,
      dtype: DType.FLOAT32,
      point: ParameterPoint[point],
      worker_id: this.workerId,
      lease: this.lease,
      generation: this.generation,
    };
    const expected = shard.ranges.reduce((n, [, length]) => n + length, 0);
    let version = -1;
    let lastStep = null;
    let got = 0;
    try {
      const call = shard.client.PullParameters(request, deadline(this.pullTimeoutMs));
      for await (const msg of call) {
        if (msg.kind === 'header') {
          version = toInt(msg.header.version, 'version');
          lastStep = msg.header.last_step; // null when absent (version 0)
          continue;
        }
        const { offset: rawOffset, count: rawCount, dtype, data } = msg.chunk;
        const offset = toInt(rawOffset, 'chunk.offset');
        const count = toInt(rawCount, 'chunk.count');
        if (dtype !== DType.FLOAT32 || data.length !== count * 4 || offset + count > this.totalElements) {
          throw new Error(`${method}: bad chunk (offset ${offset}, count ${count}, dtype ${dtype}, ${data.length} bytes)`);
        }
        decodeFloat32Into(out, offset, data);
        got += count;
      }
    } catch (err) {
      throw toError(err, method);
    }
    if (version < 0 || got !== expected) {
      throw new Error(`${method}: shard sent ${got} of ${expected} elements${version < 0 ? ' and no header' : ''}`);
    }
    return { version, lastStep };
  }

  /**
   * Stops the heartbeats and leaves the job through the front door with this
   * worker's lease (needs the `address` option or join()).
   */
  async leave() {
    this.stopHeartbeat();
    if (!this.address) throw new Error('leave() needs the front door address (create the Worker with join())');
    const jobs = new JobClient(this.address, { timeoutMs: this.timeoutMs });
    try {
      await jobs.leaveJob(this.jobId, this.workerId, this.lease);
    } finally {
      jobs.close();
    }
  }

  /** Stops the heartbeats and closes the shard channels. */
  close() {
    this.stopHeartbeat();
    for (const s of this.shards) s.client.close();
  }
}

module.exports = {
  JobClient,
  Worker,
  ParamServerError,
  DType,
  StepOutcome,
  ParameterPoint,
  JobState,
  CHUNK_ELEMENTS,
  PROTO_ROOT,
  newRequestId,
  toStruct,
  fromStruct,
  decodeStatusDetails,
  // The raw service constructors, for calls this wrapper does not cover.
  JobService: pb.JobService,
  ShardService: pb.ShardService,
};
