#!/usr/bin/env node
// Validates an AsyncAPI document (a file named as the argument, or stdin) with the official
// parser, @asyncapi/parser, which checks it against the AsyncAPI JSON Schema and the spec's
// rules (references resolve, operation messages belong to their channel, ...).
//
// Prints every diagnostic as `severity path: message` on stderr and exits 1 when any is an
// error, 0 otherwise. scripts/install-asyncapi-parser.sh copies this file next to the
// parser's node_modules, so that `require` finds it; run that copy.
'use strict';

const fs = require('fs');
const { Parser } = require('@asyncapi/parser');

// Spectral's severities, as @asyncapi/parser reports them.
const SEVERITIES = ['error', 'warning', 'info', 'hint'];

async function main() {
  const file = process.argv[2];
  const text = fs.readFileSync(file === undefined || file === '-' ? 0 : file, 'utf8');
  const { diagnostics } = await new Parser().parse(text);
  let errors = 0;
  for (const diagnostic of diagnostics) {
    const severity = SEVERITIES[diagnostic.severity] || String(diagnostic.severity);
    if (diagnostic.severity === 0) errors += 1;
    const path = (diagnostic.path || []).join('.') || '<root>';
    process.stderr.write(`${severity} ${path}: ${diagnostic.message} [${diagnostic.code}]\n`);
  }
  process.stderr.write(`validate-asyncapi: ${errors} error(s), ${diagnostics.length - errors} other diagnostic(s)\n`);
  process.exit(errors === 0 ? 0 : 1);
}

main().catch((error) => {
  process.stderr.write(`validate-asyncapi: ${error && error.stack ? error.stack : error}\n`);
  process.exit(2);
});
