'use strict';
/**
 * Checks of the package that need no paramserver: a fake JobService and
 * ShardService (grpc-js servers built from the package's own protos) answer
 * UNAVAILABLE a few times and record what arrives.
 *
 *   node test/offline.js [tls_dir]        (npm test runs it without tls_dir)
 *
 * - google.protobuf.Struct: numbers, strings, booleans, null, nested objects
 *   and arrays survive the codec and a server's echo;
 * - retries: UNAVAILABLE is retried, bounded, with the SAME request_id (unary
 *   calls, pushes, uploads) and pulls start over;
 * - tokens: "authorization: Bearer TOKEN" on the front door and the shards,
 *   from the option or $PARAMSERVER_TOKEN, none with token: null;
 * - errors: code and ErrorInfo reason/metadata;
 * - with tls_dir (ca.pem, server.pem, server.key, client.pem, client.key):
 *   mutual TLS from $PARAMSERVER_TLS_CA/CERT/KEY on the front door and the
 *   shard channel, refused without a client certificate and in plaintext.
 *
 * Prints "offline: ok" and exits 0 when every check passes.
 */

const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const ps = require('paramserver-client');

const FAST = { attempts: 4, initialBackoffMs: 1, maxBackoffMs: 5, multiplier: 2 };
const UNAVAILABLE = { code: grpc.status.UNAVAILABLE, details: 'try again' };

// ---------------------------------------------------------------------------
// google.rpc.Status with an ErrorInfo, encoded by hand (as the service sends it)
// ---------------------------------------------------------------------------

function varint(n) {
  const out = [];
  while (n > 127) {
    out.push((n & 0x7f) | 0x80);
    n = Math.floor(n / 128);
  }
  out.push(n);
  return Buffer.from(out);
}
const bytesField = (num, buf) => Buffer.concat([varint(num * 8 + 2), varint(buf.length), buf]);
const strField = (num, s) => bytesField(num, Buffer.from(s, 'utf8'));

function statusError(code, reason, details, metadata = {}) {
  const info = Buffer.concat([
    strField(1, reason),
    strField(2, 'paramserver'),
    ...Object.entries(metadata).map(([k, v]) => bytesField(3, Buffer.concat([strField(1, k), strField(2, v)]))),
  ]);
  const any = Buffer.concat([strField(1, 'type.googleapis.com/google.rpc.ErrorInfo'), bytesField(2, info)]);
  const status = Buffer.concat([varint(1 * 8), varint(code), strField(2, details), bytesField(3, any)]);
  const md = new grpc.Metadata();
  md.set('grpc-status-details-bin', status);
  return { code, details, metadata: md };
}

// ---------------------------------------------------------------------------
// The fake service
// ---------------------------------------------------------------------------

const HYPER = {
  lr: 0.5,
  betas: [0.9, 0.999],
  nesterov: false,
  name: 'x',
  nothing: null,
  nested: { a: [1, 'two', true, null, { deep: -1.5 }], empty: {}, list: [] },
};
const TOTAL = 6;

function fakeServices(seen, address) {
  const auth = (call) => call.metadata.get('authorization')[0] ?? null;
  const jobOf = (jobId) => ({
    job_id: jobId,
    total_elements: String(TOTAL),
    generation: '0',
    shards: [{ index: 0, address: address(), ranges: [{ start: '0', length: String(TOTAL) }] }],
  });
  const counts = {};
  const nth = (key) => (counts[key] = (counts[key] || 0) + 1);
  const jobService = {
    CreateJob(call, cb) {
      seen.push({ method: 'CreateJob', request_id: call.request.request_id, auth: auth(call) });
      if (nth('create') <= 2) return cb(UNAVAILABLE);
      return cb(null, { ...jobOf(call.request.job_id), spec: call.request.spec, worker_token: 'psj.j.secret' });
    },
    GetJob(call, cb) {
      seen.push({ method: 'GetJob', auth: auth(call) });
      if (call.request.job_id === 'denied') {
        return cb(statusError(grpc.status.PERMISSION_DENIED, 'PERMISSION_DENIED', 'not your job', { job_id: 'denied' }));
      }
      return cb(null, jobOf(call.request.job_id));
    },
    DeleteJob(call, cb) {
      seen.push({ method: 'DeleteJob', request_id: call.request.request_id, auth: auth(call) });
      cb(UNAVAILABLE);
    },
    RotateJobToken(call, cb) {
      seen.push({ method: 'RotateJobToken', request_id: call.request.request_id, previous_valid_s: call.request.previous_valid_s });
      if (nth('rotate') === 1) return cb(UNAVAILABLE);
      return cb(null, { worker_token: 'psj.j.new', previous_expire_at: 1234.5 });
    },
  };
  const streamIn = (call, done) => {
    const msgs = [];
    call.on('data', (m) => msgs.push(m));
    call.on('end', () => done(msgs));
  };
  const shardService = {
    UploadParameters(call, cb) {
      streamIn(call, (msgs) => {
        seen.push({ method: 'UploadParameters', request_id: msgs[0].header.request_id, auth: auth(call) });
        if (nth('upload') === 1) return cb(UNAVAILABLE);
        return cb(null, { elements: String(TOTAL) });
      });
    },
    PushGradients(call, cb) {
      streamIn(call, (msgs) => {
        const chunks = msgs.filter((m) => m.kind === 'chunk').length;
        seen.push({ method: 'PushGradients', request_id: msgs[0].header.request_id, chunks, auth: auth(call) });
        if (nth('push') <= 2) return cb(UNAVAILABLE);
        return cb(null, { outcome: ps.StepOutcome.APPLIED, version: '1', contributions: 1, expected: 1 });
      });
    },
    PullParameters(call) {
      seen.push({ method: 'PullParameters', auth: auth(call), lease: call.request.lease });
      const values = Float32Array.from({ length: TOTAL }, (_, i) => i + 0.25);
      call.write({ header: { version: '1', elements: String(TOTAL) } });
      if (nth('pull') === 1) {
        // Half the data, then the shard goes away: the pull must start over.
        call.write({ chunk: { offset: 0, count: 3, dtype: ps.DType.FLOAT32, data: Buffer.from(values.buffer, 0, 12) } });
        call.emit('error', UNAVAILABLE);
        return;
      }
      call.write({ chunk: { offset: 0, count: TOTAL, dtype: ps.DType.FLOAT32, data: Buffer.from(values.buffer) } });
      call.end();
    },
  };
  return { jobService, shardService };
}

function serve(credentials, seen) {
  const server = new grpc.Server();
  let addr = '';
  const { jobService, shardService } = fakeServices(seen, () => addr);
  server.addService(ps.JobService.service, jobService);
  server.addService(ps.ShardService.service, shardService);
  return new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', credentials, (err, port) => {
      if (err) return reject(err);
      addr = `127.0.0.1:${port}`;
      return resolve({ server, address: addr });
    });
  });
}

async function rejection(promise) {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  throw new assert.AssertionError({ message: 'expected the call to fail' });
}

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

function checkStructCodec() {
  const def = ps.JobService.service.CreateJob;
  const request = { request_id: 'r', job_id: 'j', spec: { optimizer: { name: 'sgd', hyperparameters: ps.toStruct(HYPER) } } };
  const back = def.requestDeserialize(def.requestSerialize(request));
  assert.deepEqual(ps.fromStruct(back.spec.optimizer.hyperparameters), HYPER);
  // undefined properties are left out (as JSON.stringify does); typed arrays become lists.
  assert.deepEqual(ps.fromStruct(ps.toStruct({ a: undefined, b: 1 })), { b: 1 });
  assert.deepEqual(ps.fromValue(ps.toValue(new Float32Array([0.5, 2]))), [0.5, 2]);
  assert.throws(() => ps.toStruct({ f: () => 1 }), TypeError);
}

async function checkPlaintext() {
  const seen = [];
  const { server, address } = await serve(grpc.ServerCredentials.createInsecure(), seen);
  try {
    // Token from the environment; CreateJob retried twice with one request_id.
    process.env.PARAMSERVER_TOKEN = 'env-token';
    const jobs = new ps.JobClient(address, { retry: FAST });
    const job = await jobs.createJob([['w', [2, 3]]], { jobId: 'j', optimizer: 'sgd', hyperparameters: HYPER });
    assert.deepEqual(job.spec.optimizer.hyperparameters, HYPER, 'the Struct came back through a server');
    assert.equal(job.worker_token, 'psj.j.secret');
    const creates = seen.filter((s) => s.method === 'CreateJob');
    assert.equal(creates.length, 3);
    assert.equal(new Set(creates.map((s) => s.request_id)).size, 1, 'a retry must reuse the request_id');
    assert.ok(creates[0].request_id.length > 0);
    assert.ok(creates.every((s) => s.auth === 'Bearer env-token'), JSON.stringify(creates));

    // Bounded: DeleteJob is always UNAVAILABLE.
    const del = await rejection(jobs.deleteJob('j'));
    assert.ok(del instanceof ps.ParamServerError);
    assert.equal(del.code, grpc.status.UNAVAILABLE);
    assert.equal(del.attempts, FAST.attempts);
    const deletes = seen.filter((s) => s.method === 'DeleteJob');
    assert.equal(deletes.length, FAST.attempts);
    assert.equal(new Set(deletes.map((s) => s.request_id)).size, 1);
    // retry: false = one attempt.
    const once = new ps.JobClient(address, { retry: false });
    const delOnce = await rejection(once.deleteJob('j'));
    assert.equal(delOnce.attempts, 1);
    once.close();

    // Errors keep the code and the ErrorInfo; not retried.
    const denied = await rejection(jobs.getJob('denied'));
    assert.equal(denied.code, grpc.status.PERMISSION_DENIED);
    assert.equal(denied.codeName, 'PERMISSION_DENIED');
    assert.equal(denied.reason, ps.Reason.PERMISSION_DENIED);
    assert.equal(denied.domain, 'paramserver');
    assert.deepEqual(denied.errorMetadata, { job_id: 'denied' });
    assert.equal(denied.attempts, 1);

    // RotateJobToken: retried with one request_id, previous_valid_s sent.
    const rotated = await jobs.rotateJobToken('j', 30);
    assert.equal(rotated.worker_token, 'psj.j.new');
    assert.equal(rotated.previous_expire_at, 1234.5);
    const rotations = seen.filter((s) => s.method === 'RotateJobToken');
    assert.equal(rotations.length, 2);
    assert.equal(rotations[0].request_id, rotations[1].request_id);
    assert.equal(rotations[0].previous_valid_s, 30);

    // token: null = no authorization metadata, even with $PARAMSERVER_TOKEN set.
    const anonymous = new ps.JobClient(address, { token: null });
    seen.length = 0;
    await anonymous.getJob('j');
    assert.equal(seen[0].auth, null);
    anonymous.close();
    jobs.close();

    // The data plane: the worker token on every shard call; the same request_id on every retry.
    seen.length = 0;
    const worker = new ps.Worker(job, 0, { token: 'worker-token', lease: 7, retry: FAST });
    assert.equal(await worker.upload(new Float32Array(TOTAL).fill(1)), TOTAL);
    const pushed = await worker.push(0, new Float32Array(TOTAL).fill(0.5), 2);
    assert.equal(pushed.outcome, ps.StepOutcome.APPLIED);
    assert.equal(pushed.version, 1);
    worker.setToken('rotated-token');
    const pulled = await worker.pull(1);
    assert.deepEqual(Array.from(pulled.params), [0.25, 1.25, 2.25, 3.25, 4.25, 5.25]);
    worker.close();
    const uploads = seen.filter((s) => s.method === 'UploadParameters');
    const pushes = seen.filter((s) => s.method === 'PushGradients');
    const pulls = seen.filter((s) => s.method === 'PullParameters');
    assert.equal(uploads.length, 2);
    assert.equal(uploads[0].request_id, uploads[1].request_id);
    assert.equal(pushes.length, 3);
    assert.equal(new Set(pushes.map((s) => s.request_id)).size, 1, 'a retried push must reuse the request_id');
    assert.ok(pushes.every((s) => s.chunks === 1), 'each attempt resends the whole stream');
    assert.equal(pulls.length, 2, 'a pull cut short by UNAVAILABLE starts over');
    assert.ok([...uploads, ...pushes].every((s) => s.auth === 'Bearer worker-token'));
    assert.ok(pulls.every((s) => s.auth === 'Bearer rotated-token' && s.lease === '7'));
    delete process.env.PARAMSERVER_TOKEN;
  } finally {
    server.forceShutdown();
  }
}

async function checkMutualTls(dir) {
  const read = (f) => fs.readFileSync(path.join(dir, f));
  const seen = [];
  const creds = grpc.ServerCredentials.createSsl(read('ca.pem'), [{ cert_chain: read('server.pem'), private_key: read('server.key') }], true);
  const { server, address } = await serve(creds, seen);
  try {
    // From the environment: the front door and the shard channel both use mutual TLS.
    process.env.PARAMSERVER_TLS_CA = path.join(dir, 'ca.pem');
    process.env.PARAMSERVER_TLS_CERT = path.join(dir, 'client.pem');
    process.env.PARAMSERVER_TLS_KEY = path.join(dir, 'client.key');
    const jobs = new ps.JobClient(address, { token: 'admin', retry: false });
    assert.equal(jobs.secure, true);
    const job = await jobs.getJob('tls-job');
    jobs.close();
    const worker = new ps.Worker(job, 0, { token: 'w', retry: { ...FAST, attempts: 2 } });
    const pulled = await worker.pull(1);
    assert.equal(pulled.params[5], 5.25);
    worker.close();
    assert.deepEqual(seen.map((s) => [s.method, s.auth]), [['GetJob', 'Bearer admin'], ['PullParameters', 'Bearer w'], ['PullParameters', 'Bearer w']]);
    // Buffers work as well as paths.
    const buffers = new ps.JobClient(address, { tls: { ca: read('ca.pem'), cert: read('client.pem'), key: read('client.key') } });
    await buffers.getJob('tls-job');
    buffers.close();

    // Without a client certificate, or in plaintext: refused.
    const noCert = new ps.JobClient(address, { tls: { ca: path.join(dir, 'ca.pem') }, retry: false, timeoutMs: 5000 });
    const e1 = await rejection(noCert.getJob('tls-job'));
    noCert.close();
    assert.ok(e1 instanceof ps.ParamServerError && e1.code === grpc.status.UNAVAILABLE, String(e1));
    const plain = new ps.JobClient(address, { tls: false, retry: false, timeoutMs: 5000 });
    const e2 = await rejection(plain.getJob('tls-job'));
    plain.close();
    assert.ok(e2 instanceof ps.ParamServerError && e2.code === grpc.status.UNAVAILABLE, String(e2));
    // cert without key is a usage error.
    assert.throws(() => new ps.JobClient(address, { tls: { cert: read('client.pem') } }), /go together/);
  } finally {
    for (const k of ['PARAMSERVER_TLS_CA', 'PARAMSERVER_TLS_CERT', 'PARAMSERVER_TLS_KEY']) delete process.env[k];
    server.forceShutdown();
  }
}

async function main(argv) {
  delete process.env.PARAMSERVER_TOKEN;
  for (const k of ['PARAMSERVER_TLS_CA', 'PARAMSERVER_TLS_CERT', 'PARAMSERVER_TLS_KEY']) delete process.env[k];
  checkStructCodec();
  console.log('offline: struct ok');
  await checkPlaintext();
  console.log('offline: retries, tokens and errors ok');
  if (argv[0]) {
    await checkMutualTls(argv[0]);
    console.log('offline: mutual TLS ok');
  }
  console.log('offline: ok');
}

main(process.argv.slice(2)).then(
  () => process.exit(0),
  (err) => {
    console.error(err && err.stack ? err.stack : err);
    process.exit(1);
  },
);
