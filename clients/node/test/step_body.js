'use strict';
/**
 * One SGD step through the package, driven by tests/e2e/test_node_package.py
 * from a fresh directory where the packed package is installed. The entry
 * scripts (step_require.cjs, step_import.mjs) load the package by name and
 * call main(ps, argv):
 *
 *   node step_require.cjs <config.json> <out.json>
 *
 * config: {address, job_id, params: [...], grad: [...], loss_terms, lr,
 *          hyperparameters, auth: null | {admin_token}}
 *
 * Without `auth` every call goes without a token. With `auth`, the admin
 * token comes from $PARAMSERVER_TOKEN (the test sets it to auth.admin_token);
 * the job is created with it, the worker steps use the job's worker token
 * from the CreateJob answer, and the script records what a call without a
 * token, the worker token on DeleteJob and a rotated-out token get. TLS, when
 * the service needs it, comes from $PARAMSERVER_TLS_CA/CERT/KEY.
 *
 * out: {job, hyperparameters (as getJob returned them), worker_id, version0,
 *       version1, version, push_outcome, [auth checks]}
 */

const assert = require('node:assert/strict');
const fs = require('node:fs');

/** Runs `fn` and returns the error it rejects with, as {code, codeName, reason} (null when it resolved). */
async function failure(fn) {
  try {
    await fn();
    return null;
  } catch (err) {
    return { code: err.code ?? null, codeName: err.codeName ?? '', reason: err.reason ?? '', message: String(err.message) };
  }
}

async function main(ps, [configPath, outPath]) {
  const cfg = JSON.parse(fs.readFileSync(configPath, 'utf8'));
  const out = {};
  const auth = cfg.auth || null;
  if (auth) assert.equal(process.env.PARAMSERVER_TOKEN, auth.admin_token, 'the test passes the admin token in PARAMSERVER_TOKEN');

  // The admin (or, without credentials, anyone) creates the job; the token comes from the environment.
  const admin = new ps.JobClient(cfg.address);
  let worker = null;
  let created = false;
  try {
    const job = await admin.createJob([['w', [33, 5]], ['b', [5]]], {
      jobId: cfg.job_id,
      optimizer: 'sgd',
      hyperparameters: cfg.hyperparameters,
      numWorkers: 1,
      numShards: 2,
    });
    created = true;
    assert.equal(job.job_id, cfg.job_id);
    out.created_hyperparameters = job.spec.optimizer.hyperparameters;
    out.worker_token_prefix = job.worker_token ? job.worker_token.split('.').slice(0, 2).join('.') : '';
    const workerToken = auth ? job.worker_token : null;
    if (auth) assert.ok(workerToken, 'CreateJob answered without a worker_token');

    // getJob reads the Struct back as a plain object (with the worker token when authenticated).
    const reader = new ps.JobClient(cfg.address, { token: workerToken ?? undefined });
    try {
      const got = await reader.getJob(cfg.job_id);
      out.hyperparameters = got.spec.optimizer.hyperparameters;
      out.group_hyperparameters = got.groups[0].hyperparameters;
      out.worker_token_echoed = got.worker_token;
    } finally {
      reader.close();
    }

    if (auth) {
      // No token at all: UNAUTHENTICATED on the front door.
      const anonymous = new ps.JobClient(cfg.address, { token: null });
      out.no_token = await failure(() => anonymous.getJob(cfg.job_id));
      anonymous.close();
      // A worker token may not delete its job.
      const asWorker = new ps.JobClient(cfg.address, { token: workerToken });
      out.worker_delete = await failure(() => asWorker.deleteJob(cfg.job_id));
      asWorker.close();
    }

    // The worker's steps, with the worker token (none without credentials).
    worker = await ps.Worker.join(cfg.address, cfg.job_id, 'node-packed', { token: workerToken });
    out.worker_id = worker.workerId;
    out.upload = worker.uploadParameters;
    if (worker.uploadParameters) await worker.upload(Float32Array.from(cfg.params));
    const v0 = await worker.pull(0);
    out.version0 = Array.from(v0.params);

    if (auth) {
      // A shard refuses a call without a token too.
      const tokenless = new ps.Worker(worker.job, worker.workerId, { token: null, lease: worker.lease, retry: false });
      out.shard_no_token = await failure(() => tokenless.pull(0));
      tokenless.close();
    }

    const pushed = await worker.push(0, Float32Array.from(cfg.grad), cfg.loss_terms);
    out.push_outcome = Object.keys(ps.StepOutcome).find((k) => ps.StepOutcome[k] === pushed.outcome);

    if (auth) {
      // Rotate: the old token is refused at once (previous_valid_s = 0); the worker switches.
      const rotated = await admin.rotateJobToken(cfg.job_id, 0);
      assert.ok(rotated.worker_token && rotated.worker_token !== workerToken);
      const old = new ps.JobClient(cfg.address, { token: workerToken });
      out.old_token_after_rotation = await failure(() => old.getJob(cfg.job_id));
      old.close();
      worker.setToken(rotated.worker_token);
      out.previous_expire_at = rotated.previous_expire_at;
    }

    const v1 = await worker.pull(1);
    out.version1 = Array.from(v1.params);
    out.version = v1.version;
    await worker.leave();
  } finally {
    if (worker) worker.close();
    if (created && auth) {
      // Delete it here: the test's own clean-up may not hold the admin token.
      await admin.deleteJob(cfg.job_id);
      out.deleted = true;
    }
    admin.close();
  }
  fs.writeFileSync(outPath, JSON.stringify(out));
}

module.exports = { main };
