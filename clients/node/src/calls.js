'use strict';
/**
 * Calls: deadlines, the token metadata and retries.
 *
 * Every call carries a deadline (per attempt) and the caller's token. A call
 * answered UNAVAILABLE (the service or a shard is restarting, a job is being
 * recovered, a connection dropped) is tried again, at most `attempts` times
 * in all, after a jittered exponential backoff. A mutating call sends the
 * SAME request (and so the same request_id) on every attempt: the service
 * answers a repeated request_id with the first answer, so a retry never
 * applies anything twice. Nothing else is retried.
 */

const grpc = require('@grpc/grpc-js');

const { ParamServerError, toError } = require('./errors');
const { tokenMetadata } = require('./credentials');

/** Default retry policy: the same as the Python client's RetryPolicy. */
const DEFAULT_RETRY = Object.freeze({ attempts: 6, initialBackoffMs: 100, maxBackoffMs: 2000, multiplier: 2 });

/** A complete retry policy from the `retry` option (false = a single attempt). */
function retryPolicy(option) {
  if (option === false) return { ...DEFAULT_RETRY, attempts: 1 };
  if (option === undefined || option === null || option === true) return { ...DEFAULT_RETRY };
  if (typeof option !== 'object') throw new TypeError('retry must be an object {attempts, initialBackoffMs, maxBackoffMs, multiplier} or false');
  const policy = { ...DEFAULT_RETRY, ...option };
  if (!Number.isInteger(policy.attempts) || policy.attempts < 1) throw new RangeError('retry.attempts must be an integer >= 1');
  for (const k of ['initialBackoffMs', 'maxBackoffMs', 'multiplier']) {
    if (typeof policy[k] !== 'number' || !(policy[k] >= 0)) throw new RangeError(`retry.${k} must be a number >= 0`);
  }
  return policy;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Runs `attempt(n)` (n = 1, 2, ...) until it resolves, retrying a
 * ParamServerError with code UNAVAILABLE under `policy`. The final error
 * carries `attempts`.
 */
async function withRetry(policy, attempt) {
  let backoff = policy.initialBackoffMs;
  for (let n = 1; ; n += 1) {
    try {
      return await attempt(n);
    } catch (err) {
      if (err instanceof ParamServerError) err.attempts = n;
      if (!(err instanceof ParamServerError) || err.code !== grpc.status.UNAVAILABLE || n >= policy.attempts) throw err;
    }
    await sleep(backoff * (0.5 + Math.random() / 2));
    backoff = Math.min(policy.maxBackoffMs, backoff * policy.multiplier);
  }
}

/** The grpc-js call options for a deadline `ms` from now. */
function deadline(ms) {
  return { deadline: new Date(Date.now() + ms) };
}

/**
 * A unary call with retries. `ctx`: {timeoutMs, retry (a policy), token()
 * (the token to send, read at each attempt)}; `label` names the call in errors.
 */
function unaryCall(client, method, request, ctx, label = method) {
  return withRetry(ctx.retry, () => new Promise((resolve, reject) => {
    client[method](request, tokenMetadata(ctx.token()), deadline(ctx.timeoutMs), (err, resp) => {
      if (err) reject(toError(err, label));
      else resolve(resp);
    });
  }));
}

/**
 * One client-streaming call: writes `messages` (any iterable), honouring
 * back-pressure, then half-closes and resolves with the answer.
 */
function clientStreamOnce(client, method, messages, ctx, label) {
  return new Promise((resolve, reject) => {
    let finished = false;
    const call = client[method](tokenMetadata(ctx.token()), deadline(ctx.timeoutMs), (err, resp) => {
      finished = true;
      if (err) reject(toError(err, label));
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

/**
 * A client-streaming call with retries: `makeMessages()` gives a fresh
 * iterable of the same messages (the same header, so the same request_id)
 * for each attempt.
 */
function clientStreamCall(client, method, makeMessages, ctx, label = method) {
  return withRetry(ctx.retry, () => clientStreamOnce(client, method, makeMessages(), ctx, label));
}

/**
 * A server-streaming call with retries: `consume(stream)` reads one attempt's
 * stream (an async iterable of messages) and resolves with the result; an
 * attempt that fails UNAVAILABLE, even midway, is started over.
 */
function serverStreamCall(client, method, request, ctx, consume, label = method) {
  return withRetry(ctx.retry, async () => {
    const call = client[method](request, tokenMetadata(ctx.token()), deadline(ctx.timeoutMs));
    try {
      return await consume(call);
    } catch (err) {
      call.cancel();
      throw toError(err, label);
    }
  });
}

module.exports = { DEFAULT_RETRY, retryPolicy, withRetry, deadline, unaryCall, clientStreamCall, serverStreamCall };
