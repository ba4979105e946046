// The step of step_body.js with the package loaded by import (ESM): named exports, the default
// export and the namespace must agree.
import assert from 'node:assert/strict';
import ps, { JobClient, Worker, StepOutcome } from 'paramserver-client';
import * as ns from 'paramserver-client';
import body from './step_body.js';

assert.equal(JobClient, ps.JobClient);
assert.equal(Worker, ns.Worker);
assert.equal(StepOutcome, ns.default.StepOutcome);

body.main({ JobClient, Worker, StepOutcome }, process.argv.slice(2)).then(
  () => process.exit(0),
  (err) => {
    console.error(err && err.stack ? err.stack : err);
    process.exit(1);
  },
);
