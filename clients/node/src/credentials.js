'use strict';
/**
 * Credentials: a bearer token sent as "authorization: Bearer TOKEN" metadata on
 * every call (front door and shards alike), and the channel security (TLS or
 * mutual TLS, else plaintext), for every channel a client opens.
 *
 *   token: the `token` option; when it is undefined, $PARAMSERVER_TOKEN; null
 *          or '' = no token.
 *   tls:   the `tls` option {ca, cert, key, serverName} (each of ca/cert/key a
 *          file path or a Buffer of PEM; ca = root certificate(s) to trust,
 *          default the system's; cert + key = this client's certificate for
 *          mutual TLS), `true` = TLS with the system roots, `false` =
 *          plaintext; when it is undefined, $PARAMSERVER_TLS_CA,
 *          $PARAMSERVER_TLS_CERT and $PARAMSERVER_TLS_KEY (file paths): TLS
 *          when any of them is set, else plaintext.
 */

const fs = require('node:fs');

const grpc = require('@grpc/grpc-js');

/** The metadata key tokens travel in. */
const AUTHORIZATION = 'authorization';

/** The token to send: the option, else $PARAMSERVER_TOKEN; '' = none. */
function resolveToken(token) {
  const value = token === undefined ? process.env.PARAMSERVER_TOKEN : token;
  if (value === null || value === undefined) return '';
  if (typeof value !== 'string') throw new TypeError('token must be a string');
  return value.trim();
}

/** A PEM given as a Buffer, a Uint8Array or a file path, as a Buffer (null when absent). */
function pem(value, what) {
  if (value === undefined || value === null || value === '') return null;
  if (Buffer.isBuffer(value)) return value;
  if (value instanceof Uint8Array) return Buffer.from(value);
  if (typeof value === 'string') {
    try {
      return fs.readFileSync(value);
    } catch (err) {
      throw new Error(`tls.${what}: cannot read ${value}: ${err.message}`, { cause: err });
    }
  }
  throw new TypeError(`tls.${what} must be a file path or a Buffer`);
}

/** The TLS settings to use ({ca, cert, key, serverName}), or null for plaintext. */
function resolveTls(tls) {
  if (tls === false || tls === null) return null;
  if (tls === true) return {};
  if (tls === undefined) {
    const env = {
      ca: process.env.PARAMSERVER_TLS_CA || undefined,
      cert: process.env.PARAMSERVER_TLS_CERT || undefined,
      key: process.env.PARAMSERVER_TLS_KEY || undefined,
    };
    return env.ca || env.cert || env.key ? env : null;
  }
  if (typeof tls !== 'object') throw new TypeError('tls must be an object {ca, cert, key}, true or false');
  return tls;
}

/**
 * What a client needs to open channels: `credentials` (grpc ChannelCredentials),
 * `channelOptions` (extra channel arguments, e.g. the TLS server name) and
 * `secure` (whether TLS is on).
 */
function channelSecurity(tlsOption) {
  const tls = resolveTls(tlsOption);
  if (!tls) return { credentials: grpc.credentials.createInsecure(), channelOptions: {}, secure: false };
  const ca = pem(tls.ca, 'ca');
  const cert = pem(tls.cert, 'cert');
  const key = pem(tls.key, 'key');
  if (Boolean(cert) !== Boolean(key)) {
    throw new Error('tls.cert and tls.key go together (PARAMSERVER_TLS_CERT and PARAMSERVER_TLS_KEY): give both for mutual TLS, or neither');
  }
  const channelOptions = {};
  if (tls.serverName) {
    // The name the server's certificate must carry, when it is not the host of the address.
    channelOptions['grpc.ssl_target_name_override'] = tls.serverName;
    channelOptions['grpc.default_authority'] = tls.serverName;
  }
  return { credentials: grpc.credentials.createSsl(ca, key, cert), channelOptions, secure: true };
}

/** The call metadata carrying `token` (empty metadata without a token). */
function tokenMetadata(token) {
  const md = new grpc.Metadata();
  if (token) md.set(AUTHORIZATION, `Bearer ${token}`);
  return md;
}

module.exports = { AUTHORIZATION, resolveToken, resolveTls, channelSecurity, tokenMetadata };
