'use strict';
/** The data plane: a worker's uploads, pushes and pulls against every shard of its job. */

const os = require('node:os');

const grpc = require('@grpc/grpc-js');

const { pb, DType, ParameterPoint, StepOutcome } = require('./proto');
const { resolveToken } = require('./credentials');
const { clientStreamCall, serverStreamCall } = require('./calls');
const { resolveSettings, DEFAULT_PULL_TIMEOUT_MS } = require('./settings');
const { JobClient, newRequestId } = require('./job_client');

/** Elements per pushed/uploaded chunk: 1 MiB of fp32, the size the protos recommend. */
const CHUNK_ELEMENTS = 262144;

const LITTLE_ENDIAN_HOST = os.endianness() === 'LE';

/** A uint64 from the wire (a decimal string) as an exact Number. */
function toInt(value, what) {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`${what} = ${value} is not a safe non-negative integer`);
  return n;
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

/**
 * One worker's data plane: uploads, pushes and pulls against every shard of
 * `job` (a Job message, e.g. JoinJobResponse.job) as worker `workerId`.
 * Options: timeoutMs (uploads and pushes, default 60 s), pullTimeoutMs
 * (pulls, default 600 s), address (the front door, needed by leave(),
 * refresh() and the heartbeats), uploadParameters
 * (JoinJobResponse.upload_parameters), lease (JoinJobResponse.lease),
 * leaseTimeoutS (JoinJobResponse.lease_timeout_s), and the connection options
 * of JobClient: token (the job's worker token, or an admin token; default
 * $PARAMSERVER_TOKEN), tls, retry, channelOptions. The token and the TLS
 * settings are used on the shard channels and on the front door alike.
 *
 * `lease` and `generation` (job.generation) go into every push header and
 * pull request. With `address`, `lease` and `leaseTimeoutS` the worker sends
 * a Heartbeat every leaseTimeoutS / 3 seconds until leave() or close(), on an
 * unref()'d timer (it does not keep the process alive).
 */
class Worker {
  constructor(job, workerId, options = {}) {
    const {
      address = '',
      uploadParameters = false,
      pullTimeoutMs = DEFAULT_PULL_TIMEOUT_MS,
      lease = 0,
      leaseTimeoutS = 0,
    } = options;
    const settings = resolveSettings(options);
    this.options = { ...options, token: settings.token };
    this.job = job;
    this.jobId = job.job_id;
    this.workerId = workerId;
    this.address = address;
    this.uploadParameters = uploadParameters;
    this.timeoutMs = settings.timeoutMs;
    this.pullTimeoutMs = pullTimeoutMs;
    this.retry = settings.retry;
    this.token = settings.token;
    this.credentials = settings.credentials;
    this.channelOptions = settings.channelOptions;
    /** This membership's lease (JoinJobResponse.lease). */
    this.lease = toInt(lease, 'lease');
    /** The job's generation this worker knows (Job.generation). */
    this.generation = toInt(job.generation, 'generation');
    this.leaseTimeoutS = Number(leaseTimeoutS) || 0;
    this.totalElements = toInt(job.total_elements, 'total_elements');
    this.shards = this.connectShards(job);
    this.heartbeatTimer = null;
    this.heartbeatInFlight = false;
    /** The front door client (heartbeats, refresh, leave), made on first use. */
    this.frontDoor = null;
    if (this.address && this.lease && this.leaseTimeoutS > 0) this.startHeartbeat();
  }

  /**
   * Joins `jobId` through the front door at `address`, connects to its shards
   * and starts renewing the lease in the background. `options` are the
   * Worker's (token: the job's worker token from CreateJob or RotateJobToken).
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
   * Sends `token` from now on, to the shards and the front door (e.g. the new
   * worker token after RotateJobToken); calls in flight keep the old one.
   */
  setToken(token) {
    this.token = resolveToken(token === undefined ? null : token);
    this.options = { ...this.options, token: this.token };
    if (this.frontDoor) this.frontDoor.setToken(this.token);
  }

  /** The shards of `job`'s shard map, each with its ranges and a ShardService client. */
  connectShards(job) {
    return job.shards.map((s) => ({
      index: s.index,
      address: s.address,
      ranges: s.ranges.map((r) => [toInt(r.start, 'range.start'), toInt(r.length, 'range.length')]),
      client: new pb.ShardService(s.address, this.credentials, this.channelOptions),
    }));
  }

  /** The call context of shard calls with deadline `timeoutMs`. */
  ctx(timeoutMs) {
    return { timeoutMs, retry: this.retry, token: () => this.token };
  }

  /** The JobClient on the front door (needs the `address` option or join()). */
  jobs(what) {
    if (!this.address) throw new Error(`${what} needs the front door address (create the Worker with join())`);
    if (!this.frontDoor) this.frontDoor = new JobClient(this.address, this.options);
    return this.frontDoor;
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
    this.jobs('heartbeats');
    this.heartbeatTimer = setInterval(() => this.beat(everyMs), everyMs);
    this.heartbeatTimer.unref();
  }

  /** One heartbeat tick (see startHeartbeat()). */
  async beat(everyMs) {
    if (this.heartbeatInFlight || !this.heartbeatTimer) return;
    this.heartbeatInFlight = true;
    const timer = this.heartbeatTimer;
    try {
      await this.jobs('heartbeats').heartbeat(this.jobId, this.workerId, this.lease, {
        timeoutMs: Math.max(everyMs, 1000),
        retry: { ...this.retry, attempts: 1 }, // the next tick is the retry
      });
    } catch (err) {
      if (timer !== this.heartbeatTimer) return; // stopped meanwhile
      if (err?.code === grpc.status.ABORTED) {
        console.warn(`paramserver: worker ${this.workerId} of job ${this.jobId}: heartbeats stopped: ${err.message}`);
        this.stopHeartbeat();
      }
      // Anything else (e.g. UNAVAILABLE, a deadline): retried at the next tick.
    } finally {
      this.heartbeatInFlight = false;
    }
  }

  /** Stops the heartbeat timer (idempotent). */
  stopHeartbeat() {
    if (this.heartbeatTimer) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
  }

  /**
   * Re-reads the job (GetJob through the front door) and adopts its
   * generation and shard map; resolves with the job's published version.
   * Call it after a push or pull failed with ABORTED (JOB_ROLLED_BACK), then
   * pull errorMetadata.resume_version and go on from that step. Do not call
   * it while pushes or pulls are in flight.
   */
  async refresh() {
    const job = await this.jobs('refresh()').getJob(this.jobId);
    for (const s of this.shards) s.client.close();
    this.job = job;
    this.generation = toInt(job.generation, 'generation');
    this.shards = this.connectShards(job);
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

  /**
   * Uploads the initial parameters (a Float32Array of the whole model) to
   * every shard; resolves with the number of elements stored. A shard that
   * answers UNAVAILABLE gets the same upload (same request_id) again.
   */
  async upload(params, requestId = newRequestId()) {
    this.checkFlat(params, 'params');
    const self = this;
    function* stream(shard) {
      yield { header: { job_id: self.jobId, request_id: requestId } };
      for (const chunk of self.chunks(shard, params)) yield { chunk };
    }
    const answers = await Promise.all(
      this.shards.map((s) => clientStreamCall(s.client, 'UploadParameters', () => stream(s), this.ctx(this.timeoutMs),
        `UploadParameters[${s.index}]`)),
    );
    return answers.reduce((n, a) => n + toInt(a.elements, 'elements'), 0);
  }

  /**
   * Pushes this worker's gradient (a Float32Array of the whole model) of the
   * SUMMED loss over `lossTerms` terms for `step` to every shard. Resolves
   * with {outcome, version, report}: the outcome of the shard that completed
   * the step (or PENDING), the lowest version reported, and the step report.
   * A shard that answers UNAVAILABLE gets the same push (same request_id)
   * again: it is applied once.
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
      this.shards.map((s) => clientStreamCall(s.client, 'PushGradients', () => stream(s), this.ctx(this.timeoutMs),
        `PushGradients[${s.index}]`)),
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
    if (!(point in ParameterPoint) || point === 'UNSPECIFIED') throw new Error(`unknown point ${point}; use TRAIN or EVAL`);
    const results = await Promise.all(this.shards.map((s) => this.pullShard(s, minVersion, out, point)));
    return {
      version: Math.min(...results.map((r) => r.version)),
      params: out,
      lastStep: results.find((r) => r.lastStep)?.lastStep ?? null,
    };
  }

  /** Pulls one shard's ranges into `out` (started over when the shard answers UNAVAILABLE). */
  pullShard(shard, minVersion, out, point = 'TRAIN') {
    const method = `PullParameters[${shard.index}]`;
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
    const consume = async (call) => {
      let version = -1;
      let lastStep = null;
      let got = 0;
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
      if (version < 0 || got !== expected) {
        throw new Error(`${method}: shard sent ${got} of ${expected} elements${version < 0 ? ' and no header' : ''}`);
      }
      return { version, lastStep };
    };
    return serverStreamCall(shard.client, 'PullParameters', request, this.ctx(this.pullTimeoutMs), consume, method);
  }

  /**
   * Stops the heartbeats and leaves the job through the front door with this
   * worker's lease (needs the `address` option or join()).
   */
  async leave() {
    this.stopHeartbeat();
    await this.jobs('leave()').leaveJob(this.jobId, this.workerId, this.lease);
  }

  /** Stops the heartbeats and closes the shard channels and the front door channel. */
  close() {
    this.stopHeartbeat();
    for (const s of this.shards) s.client.close();
    if (this.frontDoor) this.frontDoor.close();
    this.frontDoor = null;
  }
}

module.exports = { Worker, CHUNK_ELEMENTS, toInt };
