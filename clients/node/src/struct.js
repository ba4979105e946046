'use strict';
/**
 * JS values <-> google.protobuf.Struct / Value (hyperparameters, schedule
 * parameters, GroupInfo.hyperparameters).
 *
 * protobufjs defines the well-known types itself, with camelCase field names
 * (numberValue, stringValue, boolValue, structValue, listValue, nullValue)
 * whatever `keepCase` says for the .proto files; the names are read from the
 * loaded definition (proto.js: VALUE_FIELDS) rather than assumed, so the
 * conversion follows the loader.
 */

const { VALUE_FIELDS: F } = require('./proto');

/** google.protobuf.NullValue.NULL_VALUE (enums are decoded as Numbers). */
const NULL_VALUE = 0;

/** A JS value as a google.protobuf.Value: numbers, strings, booleans, null, arrays and plain objects. */
function toValue(v) {
  if (v === null || v === undefined) return { [F.null]: NULL_VALUE };
  switch (typeof v) {
    case 'number': return { [F.number]: v };
    case 'string': return { [F.string]: v };
    case 'boolean': return { [F.bool]: v };
    case 'object':
      if (Array.isArray(v)) return { [F.list]: { values: v.map(toValue) } };
      if (ArrayBuffer.isView(v)) return { [F.list]: { values: Array.from(v, (x) => toValue(Number(x))) } };
      return { [F.struct]: toStruct(v) };
    default:
      throw new TypeError(`cannot encode a ${typeof v} in a google.protobuf.Value`);
  }
}

/** A plain object as a google.protobuf.Struct (properties whose value is undefined are left out, as JSON does). */
function toStruct(obj) {
  if (obj === null || obj === undefined) return { fields: {} };
  if (typeof obj !== 'object' || Array.isArray(obj)) throw new TypeError('a google.protobuf.Struct is made from a plain object');
  const fields = {};
  for (const [k, v] of Object.entries(obj)) {
    if (v !== undefined) fields[k] = toValue(v);
  }
  return { fields };
}

/** Which member of a decoded Value is set (the oneof's `kind`, else the first member present). */
function valueKind(v) {
  if (v === null || v === undefined || typeof v !== 'object') return null;
  if (typeof v.kind === 'string' && v.kind) return v.kind;
  for (const name of [F.number, F.string, F.bool, F.struct, F.list, F.null]) {
    if (v[name] !== undefined && v[name] !== null) return name;
  }
  return null;
}

/** A decoded google.protobuf.Value as a JS value (null for NullValue or an unset Value). */
function fromValue(v) {
  const kind = valueKind(v);
  switch (kind) {
    case F.number: return Number(v[F.number]);
    case F.string: return v[F.string];
    case F.bool: return Boolean(v[F.bool]);
    case F.list: return ((v[F.list] && v[F.list].values) || []).map(fromValue);
    case F.struct: return fromStruct(v[F.struct]);
    default: return null;
  }
}

/** A decoded google.protobuf.Struct as a plain object ({} for an unset Struct). */
function fromStruct(s) {
  const out = {};
  for (const [k, v] of Object.entries((s && s.fields) || {})) out[k] = fromValue(v);
  return out;
}

/** Whether `s` looks like a decoded google.protobuf.Struct (and not a plain object already). */
function isStruct(s) {
  return s !== null && typeof s === 'object' && !Array.isArray(s) && Object.keys(s).length === 1
    && s.fields !== null && typeof s.fields === 'object';
}

/**
 * A Job message with its Structs as plain objects: spec.optimizer.hyperparameters,
 * spec.schedule.parameters, spec.param_groups[i].optimizer.hyperparameters and
 * groups[i].hyperparameters. Returns the same (modified) object.
 */
function plainJob(job) {
  if (!job || typeof job !== 'object') return job;
  const plain = (holder, key) => {
    if (!holder || typeof holder !== 'object') return;
    if (holder[key] === null || holder[key] === undefined) holder[key] = {};
    else if (isStruct(holder[key])) holder[key] = fromStruct(holder[key]);
  };
  const spec = job.spec;
  if (spec) {
    plain(spec.optimizer, 'hyperparameters');
    plain(spec.schedule, 'parameters');
    for (const g of spec.param_groups || []) plain(g.optimizer, 'hyperparameters');
  }
  for (const g of job.groups || []) plain(g, 'hyperparameters');
  return job;
}

module.exports = { toValue, toStruct, fromValue, fromStruct, plainJob };
