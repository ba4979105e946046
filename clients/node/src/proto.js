'use strict';
/**
 * The contract: the package's own copies of protos/paramserver/v1/*.proto
 * (protos/ next to src/; `npm run sync-protos` refreshes them from the
 * repository), loaded at run time with @grpc/proto-loader. Nothing outside
 * the package folder is read.
 */

const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

/** The package's protos/ folder (the include root of the bundled .proto files). */
const PROTO_ROOT = path.resolve(__dirname, '..', 'protos');
const PROTO_FILES = ['paramserver/v1/job_service.proto', 'paramserver/v1/shard_service.proto'];

/**
 * Loader options. Field names stay as in the .proto files (keepCase), except
 * in google.protobuf's well-known types, which protobufjs defines itself in
 * camelCase (Value.numberValue, ...; see struct.js). uint64 fields (offsets,
 * counts, versions, loss_terms, leases, generations) are decoded as decimal
 * strings so that no value is silently rounded. Enums are Numbers, unset
 * fields get their defaults and `msg.kind` names the member of a oneof that
 * is set ("header" or "chunk").
 */
const LOADER_OPTIONS = Object.freeze({
  keepCase: true,
  longs: String,
  enums: Number,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_ROOT],
});

const packageDefinition = protoLoader.loadSync(PROTO_FILES, { ...LOADER_OPTIONS });
const pb = grpc.loadPackageDefinition(packageDefinition).paramserver.v1;

/** name -> number of a proto enum, from the loaded definition. */
function enumValues(fullName) {
  const def = packageDefinition[fullName];
  if (!def || !def.type || !Array.isArray(def.type.value)) throw new Error(`${fullName} is not an enum of the bundled protos`);
  return Object.fromEntries(def.type.value.map((v) => [v.name, v.number]));
}

/**
 * An enum's values without its prefix ("DTYPE_FLOAT32" -> FLOAT32), frozen.
 * `prefix` is the part every value name starts with.
 */
function shortEnum(fullName, prefix) {
  const out = {};
  for (const [name, number] of Object.entries(enumValues(fullName))) {
    out[name.startsWith(prefix) ? name.slice(prefix.length) : name] = number;
  }
  return Object.freeze(out);
}

/** DType enum values. Only fp32 is produced and consumed by this client. */
const DType = shortEnum('paramserver.v1.DType', 'DTYPE_');
/** ParameterPoint enum values (which values a pull serves). */
const ParameterPoint = shortEnum('paramserver.v1.ParameterPoint', 'PARAMETER_POINT_');
/** StepOutcome enum values. */
const StepOutcome = shortEnum('paramserver.v1.StepOutcome', 'STEP_OUTCOME_');
/** JobState enum values. */
const JobState = shortEnum('paramserver.v1.JobState', 'JOB_STATE_');
/** WorkerLossPolicy enum values (JobSpec.on_worker_lost). */
const WorkerLossPolicy = shortEnum('paramserver.v1.WorkerLossPolicy', 'WORKER_LOSS_POLICY_');
/**
 * The ErrorInfo reasons the service sends (ErrorReason in job_service.proto),
 * name -> name: compare `err.reason === Reason.JOB_NOT_FOUND`.
 */
const Reason = Object.freeze(
  Object.fromEntries(
    Object.keys(enumValues('paramserver.v1.ErrorReason'))
      .filter((n) => n !== 'ERROR_REASON_UNSPECIFIED')
      .map((n) => [n, n]),
  ),
);

/** The field names protobufjs uses for google.protobuf.Value's members, by field number. */
function valueFieldNames() {
  const def = packageDefinition['google.protobuf.Value'];
  const byNumber = Object.fromEntries(def.type.field.map((f) => [f.number, f.name]));
  return Object.freeze({
    null: byNumber[1], number: byNumber[2], string: byNumber[3], bool: byNumber[4], struct: byNumber[5], list: byNumber[6],
  });
}

module.exports = {
  PROTO_ROOT,
  PROTO_FILES,
  LOADER_OPTIONS,
  packageDefinition,
  pb,
  DType,
  ParameterPoint,
  StepOutcome,
  JobState,
  WorkerLossPolicy,
  Reason,
  VALUE_FIELDS: valueFieldNames(),
};
