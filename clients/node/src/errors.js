'use strict';
/**
 * Errors: a failed call rejects with a ParamServerError carrying the gRPC
 * status code and, when the service sent one, the google.rpc.ErrorInfo of
 * the google.rpc.Status in the trailing metadata ("grpc-status-details-bin").
 */

const grpc = require('@grpc/grpc-js');

/** Names of gRPC status codes, by number. */
const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/**
 * A failed call. `code` is the gRPC status code (a number, see grpc.status),
 * `codeName` its name; `reason`, `domain` and `errorMetadata` come from the
 * google.rpc.ErrorInfo in the trailing metadata when the server sent one
 * (reason is e.g. "JOB_NOT_FOUND"; see ErrorReason in job_service.proto).
 * `attempts` is how many times the call was tried (UNAVAILABLE is retried).
 */
class ParamServerError extends Error {
  constructor({ method, code, details, reason = '', domain = '', errorMetadata = {}, cause }) {
    const codeName = CODE_NAMES[code] || String(code);
    super(`${method}: ${codeName}${reason ? ` (${reason})` : ''}: ${details}`, cause ? { cause } : undefined);
    this.name = 'ParamServerError';
    this.method = method;
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.reason = reason;
    this.domain = domain;
    this.errorMetadata = errorMetadata;
    this.attempts = 1;
  }
}

/*
 * google.rpc.Status is not part of protos/, so its few fields are read with a
 * minimal protobuf wire-format reader instead of pulling in more .proto files:
 *   Status    { int32 code = 1; string message = 2; repeated Any details = 3; }
 *   Any       { string type_url = 1; bytes value = 2; }
 *   ErrorInfo { string reason = 1; string domain = 2; map<string,string> metadata = 3; }
 * (a map entry is { string key = 1; string value = 2; }).
 */

/** Reads a varint at `pos`; returns [value, next position]. */
function readVarint(buf, pos) {
  let value = 0;
  let scale = 1;
  for (let i = 0; i < 10; i += 1) {
    if (pos >= buf.length) throw new Error('truncated varint');
    const byte = buf[pos++];
    value += (byte & 0x7f) * scale;
    if ((byte & 0x80) === 0) return [value, pos];
    scale *= 128;
  }
  throw new Error('varint too long');
}

/** Yields {field, wire, value} for each field of an encoded message; value is a Number or a Buffer. */
function* wireFields(buf) {
  let pos = 0;
  while (pos < buf.length) {
    let key;
    [key, pos] = readVarint(buf, pos);
    const field = Math.floor(key / 8);
    const wire = key % 8;
    if (wire === 0) {
      let value;
      [value, pos] = readVarint(buf, pos);
      yield { field, wire, value };
    } else if (wire === 2) {
      let length;
      [length, pos] = readVarint(buf, pos);
      if (pos + length > buf.length) throw new Error('truncated field');
      yield { field, wire, value: buf.subarray(pos, pos + length) };
      pos += length;
    } else if (wire === 1 || wire === 5) {
      pos += wire === 1 ? 8 : 4; // fixed64 / fixed32: not used by these messages
    } else {
      throw new Error(`unsupported wire type ${wire}`);
    }
  }
}

/** Decodes google.rpc.ErrorInfo. */
function decodeErrorInfo(buf) {
  const info = { reason: '', domain: '', metadata: {} };
  for (const { field, wire, value } of wireFields(buf)) {
    if (wire !== 2) continue;
    if (field === 1) info.reason = value.toString('utf8');
    else if (field === 2) info.domain = value.toString('utf8');
    else if (field === 3) {
      let key = '';
      let val = '';
      for (const entry of wireFields(value)) {
        if (entry.wire !== 2) continue;
        if (entry.field === 1) key = entry.value.toString('utf8');
        else if (entry.field === 2) val = entry.value.toString('utf8');
      }
      info.metadata[key] = val;
    }
  }
  return info;
}

/** Decodes google.rpc.Status from "grpc-status-details-bin"; returns its ErrorInfo or null. */
function decodeStatusDetails(buf) {
  for (const { field, wire, value } of wireFields(buf)) {
    if (field !== 3 || wire !== 2) continue; // details (google.protobuf.Any)
    let typeUrl = '';
    let payload = null;
    for (const any of wireFields(value)) {
      if (any.wire !== 2) continue;
      if (any.field === 1) typeUrl = any.value.toString('utf8');
      else if (any.field === 2) payload = any.value;
    }
    if (typeUrl.endsWith('/google.rpc.ErrorInfo') && payload) return decodeErrorInfo(payload);
  }
  return null;
}

/** Turns what grpc-js rejected with into a ParamServerError. */
function toError(err, method) {
  if (err instanceof ParamServerError) return err;
  if (typeof err?.code !== 'number' || !err.metadata) {
    // Not a gRPC status (e.g. a local bug or a bad input): keep it as is.
    return err;
  }
  let info = null;
  const raw = err.metadata.get('grpc-status-details-bin');
  if (raw.length > 0) {
    try {
      info = decodeStatusDetails(Buffer.from(raw[0]));
    } catch {
      info = null; // undecodable details: the code and message still say what failed
    }
  }
  return new ParamServerError({
    method,
    code: err.code,
    details: err.details ?? err.message,
    reason: info?.reason ?? '',
    domain: info?.domain ?? '',
    errorMetadata: info?.metadata ?? {},
    cause: err,
  });
}

module.exports = { ParamServerError, CODE_NAMES, toError, decodeStatusDetails, decodeErrorInfo };
