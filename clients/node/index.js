'use strict';
/**
 * paramserver-client: a Node.js client for paramserver (optimizer-as-a-service over gRPC).
 *
 *   const { JobClient, Worker } = require('paramserver-client');
 *   const jobs = new JobClient('127.0.0.1:50051', { token: adminToken });
 *   const job = await jobs.createJob([['w', [33, 5]]], { optimizer: 'sgd', hyperparameters: { lr: 0.5 } });
 *   const worker = await Worker.join('127.0.0.1:50051', job.job_id, 'node-worker', { token: job.worker_token });
 *   if (worker.uploadParameters) await worker.upload(initialParams);   // Float32Array
 *   const { version, params } = await worker.pull(0);
 *   await worker.push(0, grad, lossTerms);                             // Float32Array, integer
 *   await worker.leave();                                              // also stops the heartbeats
 *   worker.close();
 *
 * The contract is the package's bundled copy of protos/paramserver/v1/*.proto,
 * loaded at run time with @grpc/proto-loader. Control-plane calls (JobService)
 * go to the front door; uploads, pushes and pulls go straight to every shard
 * of the job's shard map, concurrently. Every call carries a deadline, the
 * token (if any) and, when mutating, a request_id that is reused when the call
 * is retried after UNAVAILABLE. Failures are thrown as ParamServerError,
 * which carries the gRPC status code and, when the server sent one, the
 * google.rpc.ErrorInfo reason.
 */

const proto = require('./src/proto');
const errors = require('./src/errors');
const struct = require('./src/struct');
const calls = require('./src/calls');
const credentials = require('./src/credentials');
const settings = require('./src/settings');
const { JobClient, newRequestId } = require('./src/job_client');
const { Worker, CHUNK_ELEMENTS } = require('./src/worker');

module.exports = {
  JobClient,
  Worker,
  ParamServerError: errors.ParamServerError,
  DType: proto.DType,
  StepOutcome: proto.StepOutcome,
  ParameterPoint: proto.ParameterPoint,
  JobState: proto.JobState,
  WorkerLossPolicy: proto.WorkerLossPolicy,
  Reason: proto.Reason,
  CHUNK_ELEMENTS,
  DEFAULT_RETRY: calls.DEFAULT_RETRY,
  DEFAULT_TIMEOUT_MS: settings.DEFAULT_TIMEOUT_MS,
  DEFAULT_PULL_TIMEOUT_MS: settings.DEFAULT_PULL_TIMEOUT_MS,
  PROTO_ROOT: proto.PROTO_ROOT,
  newRequestId,
  toStruct: struct.toStruct,
  fromStruct: struct.fromStruct,
  toValue: struct.toValue,
  fromValue: struct.fromValue,
  decodeStatusDetails: errors.decodeStatusDetails,
  channelCredentials: (tls) => credentials.channelSecurity(tls).credentials,
  tokenMetadata: (token) => credentials.tokenMetadata(credentials.resolveToken(token)),
  // The raw service constructors, for calls this wrapper does not cover
  // (give them channelCredentials() and tokenMetadata()).
  JobService: proto.pb.JobService,
  ShardService: proto.pb.ShardService,
};
