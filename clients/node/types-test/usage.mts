// Compiled by `npm run check-types` only (tsc --noEmit): the public API as an ESM user sees it.
import ps, { JobClient, Worker, ParamServerError, type PullResult } from 'paramserver-client';

const jobs = new JobClient('127.0.0.1:50051', { timeoutMs: 5000 });
const job = await jobs.getJob('demo');
const worker = new Worker(job, 0, { address: jobs.address, token: process.env.PARAMSERVER_TOKEN });
const pulled: PullResult = await worker.pull(0, undefined, 'EVAL');
const err = new ParamServerError({ method: 'GetJob', code: 5, details: 'no such job' });
console.log(pulled.version, err.codeName, ps.Reason.JOB_NOT_FOUND, ps.tokenMetadata('t').get('authorization'));
worker.close();
