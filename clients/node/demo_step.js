#!/usr/bin/env node
'use strict';
/**
 * One training step from Node, for the end-to-end test:
 *
 *   node demo_step.js <address> <job_id> <params_json_path> <grad_json_path> <out_json_path>
 *
 * Joins the job as worker "node", uploads the initial parameters (a JSON array
 * of numbers) if asked to, pulls version 0, pushes the gradient for step 0
 * (grad file: {"loss_terms": n, "grad": [...]}), pulls version 1 and writes
 * {"worker_id", "version0", "version1", "version"} to the output file. Then
 * it leaves the job. Exit status 0 on success, 1 with a message otherwise.
 * The Worker sends its lease and the job's generation with every push and
 * pull and renews the lease with heartbeats until it leaves. A token
 * ($PARAMSERVER_TOKEN: the job's worker token) and TLS ($PARAMSERVER_TLS_CA,
 * $PARAMSERVER_TLS_CERT, $PARAMSERVER_TLS_KEY) come from the environment.
 */

const fs = require('node:fs');

const { Worker } = require('paramserver-client');

const USAGE = 'usage: node demo_step.js <address> <job_id> <params_json_path> <grad_json_path> <out_json_path>';

/** Reads and parses a JSON file. */
function readJson(file) {
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}

/** A JSON array of numbers as a Float32Array. */
function toFloat32(values, what) {
  if (!Array.isArray(values) || !values.every((v) => typeof v === 'number')) {
    throw new TypeError(`${what} must be a JSON array of numbers`);
  }
  return Float32Array.from(values);
}

async function main(argv) {
  if (argv.length !== 5) throw new Error(USAGE);
  const [address, jobId, paramsPath, gradPath, outPath] = argv;

  const params = toFloat32(readJson(paramsPath), 'params');
  const gradFile = readJson(gradPath);
  const grad = toFloat32(gradFile.grad, 'grad');
  const lossTerms = gradFile.loss_terms;

  const worker = await Worker.join(address, jobId, 'node');
  let failure = null;
  try {
    if (worker.uploadParameters) await worker.upload(params);

    const v0 = await worker.pull(0);
    const version0 = Array.from(v0.params); // pull() fills a fresh Float32Array each time

    await worker.push(0, grad, lossTerms);
    const v1 = await worker.pull(1);

    const result = {
      worker_id: worker.workerId,
      version0,
      version1: Array.from(v1.params),
      version: v1.version,
    };
    fs.writeFileSync(outPath, JSON.stringify(result));
  } catch (err) {
    failure = err;
  }

  // Leave even when the step failed, so the worker slot is freed; report the
  // step's error first, and a failed leave only if the step succeeded.
  try {
    await worker.leave();
  } catch (err) {
    if (!failure) failure = err;
    else process.stderr.write(`demo_step: leaving the job failed too: ${err.message}\n`);
  } finally {
    worker.close();
  }
  if (failure) throw failure;
}

main(process.argv.slice(2)).then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`demo_step: ${err.message}\n`); // ParamServerError messages name the reason
    process.exit(1);
  },
);
