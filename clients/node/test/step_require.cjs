'use strict';
// The step of step_body.js with the package loaded by require() (CommonJS).
const ps = require('paramserver-client');
const { main } = require('./step_body.js');

main(ps, process.argv.slice(2)).then(
  () => process.exit(0),
  (err) => {
    console.error(err && err.stack ? err.stack : err);
    process.exit(1);
  },
);
