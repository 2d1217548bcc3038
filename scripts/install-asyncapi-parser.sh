#!/usr/bin/env bash
# Installs the pinned AsyncAPI parser (npm `@asyncapi/parser`, the reference validator of the
# AsyncAPI spec) into <repo>/.natty/asyncapi (git-ignored, no global install) when it is missing
# or another version, copies scripts/validate-asyncapi.cjs beside it, and prints the absolute
# path of that copy on stdout:
#
#     NATTY_ASYNCAPI_VALIDATOR=$(scripts/install-asyncapi-parser.sh)
#     node "$NATTY_ASYNCAPI_VALIDATOR" document.json   # exit 1 on any validation error
#
# Only the final path goes to stdout; every diagnostic goes to stderr. The AsyncAPI test
# (tests/asyncapi.rs) validates the document a service prints for `--asyncapi` with it.
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="$repo_root/.natty/asyncapi"
validator="$prefix/validate-asyncapi.cjs"
source "$repo_root/scripts/lib/npm-pinned.sh"

npm_pinned install-asyncapi-parser @asyncapi/parser 3.6.3 "$prefix"
# Copied on every run, so an edit to scripts/ is picked up without a reinstall; it lives beside
# node_modules because that is where `require` looks.
cp "$repo_root/scripts/validate-asyncapi.cjs" "$validator.tmp"
mv "$validator.tmp" "$validator"
printf '%s\n' "$validator"
