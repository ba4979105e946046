// Compiled by `npm run check-types` only (tsc --noEmit): the public API as a CommonJS user sees it.
import ps = require('paramserver-client');
import { JobClient, Worker, ParamServerError, Reason, StepOutcome, type Job, type JsonObject } from 'paramserver-client';

async function main(address: string): Promise<void> {
  const admin = new JobClient(address, { token: 'an-admin-token', retry: { attempts: 3, initialBackoffMs: 50 } });
  const hyperparameters: JsonObject = { lr: 0.5, betas: [0.9, 0.999], nesterov: false, note: null, nested: { a: 'x' } };
  const job: Job = await admin.createJob([['w', [33, 5]], { name: 'b', shape: [5] }], {
    jobId: 'demo', optimizer: 'sgd', hyperparameters, numWorkers: 1, numShards: 2,
  });
  const lr: number = job.spec?.optimizer?.hyperparameters.lr as number;
  const rotated = await admin.rotateJobToken(job.job_id, 60);
  const expires: number = rotated.previous_expire_at;
  const worker = await Worker.join(address, job.job_id, 'node', {
    token: job.worker_token, tls: { ca: '/path/ca.pem', cert: Buffer.from(''), key: '/path/key.pem' },
  });
  worker.setToken(rotated.worker_token);
  if (worker.uploadParameters) await worker.upload(new Float32Array(worker.totalElements));
  const { version, params, lastStep } = await worker.pull(0);
  const pushed = await worker.push(version, params, 3);
  if (pushed.outcome === StepOutcome.APPLIED && lastStep) console.log(lastStep.grad_norm, lr, expires);
  try {
    await admin.deleteJob(job.job_id);
  } catch (err) {
    if (err instanceof ParamServerError && err.reason === Reason.PERMISSION_DENIED) console.log(err.code, err.errorMetadata.job_id);
  }
  await worker.leave();
  worker.close();
  admin.close();
  const jobs: Job[] = await new ps.JobClient(address, { tls: false, token: null }).listJobs();
  console.log(jobs.length, ps.DType.FLOAT32, ps.PROTO_ROOT, ps.fromStruct(ps.toStruct({ a: 1 })).a);
}

void main('127.0.0.1:50051');
