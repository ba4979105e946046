// ESM entry of paramserver-client: the CommonJS module's exports, by name and as the default.
import ps from './index.js';

export default ps;
export const {
  JobClient,
  Worker,
  ParamServerError,
  DType,
  StepOutcome,
  ParameterPoint,
  JobState,
  WorkerLossPolicy,
  Reason,
  CHUNK_ELEMENTS,
  DEFAULT_RETRY,
  DEFAULT_TIMEOUT_MS,
  DEFAULT_PULL_TIMEOUT_MS,
  PROTO_ROOT,
  newRequestId,
  toStruct,
  fromStruct,
  toValue,
  fromValue,
  decodeStatusDetails,
  channelCredentials,
  tokenMetadata,
  JobService,
  ShardService,
} = ps;
