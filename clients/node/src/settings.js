'use strict';
/** Options every client takes: deadline, token, TLS, retries and channel arguments. */

const { resolveToken, channelSecurity } = require('./credentials');
const { retryPolicy } = require('./calls');

/** Default deadline of control-plane calls, uploads and pushes (ms). */
const DEFAULT_TIMEOUT_MS = 60_000;
/** Default deadline of a pull, which may wait for the slowest worker (ms). */
const DEFAULT_PULL_TIMEOUT_MS = 600_000;

/** The service accepts gRPC messages up to 64 MiB; accept answers as large. */
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
const CHANNEL_OPTIONS = Object.freeze({
  'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
});

/**
 * The resolved settings of a client: {timeoutMs, token, retry, credentials,
 * channelOptions, secure}. `options`: timeoutMs, token, tls, retry,
 * channelOptions (extra grpc-js channel arguments).
 */
function resolveSettings({ timeoutMs = DEFAULT_TIMEOUT_MS, token, tls, retry, channelOptions = {} } = {}) {
  if (typeof timeoutMs !== 'number' || !(timeoutMs > 0)) throw new RangeError('timeoutMs must be a number > 0');
  const security = channelSecurity(tls);
  return {
    timeoutMs,
    token: resolveToken(token),
    retry: retryPolicy(retry),
    credentials: security.credentials,
    secure: security.secure,
    channelOptions: { ...CHANNEL_OPTIONS, ...security.channelOptions, ...channelOptions },
  };
}

module.exports = { DEFAULT_TIMEOUT_MS, DEFAULT_PULL_TIMEOUT_MS, MAX_MESSAGE_BYTES, CHANNEL_OPTIONS, resolveSettings };
