#!/usr/bin/env node
'use strict';
/**
 * Copies the repository's contract (../../protos/paramserver/v1/*.proto) into
 * this package's protos/ folder, which is what the package loads and ships:
 *
 *   npm run sync-protos            copy (and remove bundled files that no longer exist)
 *   npm run check-protos           exit 1 when the bundled copies differ
 *
 * The copies are checked in; tests/e2e/test_node_package.py fails when they drift.
 */

const fs = require('node:fs');
const path = require('node:path');

const PACKAGE_DIR = path.resolve(__dirname, '..');
const SOURCE = path.resolve(PACKAGE_DIR, '..', '..', 'protos', 'paramserver', 'v1');
const TARGET = path.join(PACKAGE_DIR, 'protos', 'paramserver', 'v1');

function protoFiles(dir) {
  if (!fs.existsSync(dir)) return [];
  return fs.readdirSync(dir).filter((f) => f.endsWith('.proto')).sort();
}

function main(argv) {
  const check = argv.includes('--check');
  const sources = protoFiles(SOURCE);
  if (sources.length === 0) {
    process.stderr.write(`sync-protos: no .proto files under ${SOURCE} (run it inside the repository)\n`);
    return 2;
  }
  const problems = [];
  if (!check) fs.mkdirSync(TARGET, { recursive: true });
  for (const name of sources) {
    const src = fs.readFileSync(path.join(SOURCE, name));
    const dst = path.join(TARGET, name);
    const same = fs.existsSync(dst) && fs.readFileSync(dst).equals(src);
    if (same) continue;
    if (check) problems.push(`${name} differs from protos/paramserver/v1/${name}`);
    else {
      fs.writeFileSync(dst, src);
      process.stdout.write(`sync-protos: updated protos/paramserver/v1/${name}\n`);
    }
  }
  for (const name of protoFiles(TARGET)) {
    if (sources.includes(name)) continue;
    if (check) problems.push(`${name} is bundled but not in the repository's protos/`);
    else {
      fs.unlinkSync(path.join(TARGET, name));
      process.stdout.write(`sync-protos: removed protos/paramserver/v1/${name}\n`);
    }
  }
  if (problems.length > 0) {
    process.stderr.write(`sync-protos --check: the bundled protos are stale (run npm run sync-protos):\n  ${problems.join('\n  ')}\n`);
    return 1;
  }
  return 0;
}

process.exitCode = main(process.argv.slice(2));
