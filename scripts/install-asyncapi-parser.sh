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

PINNED_VERSION="3.6.3"

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="$repo_root/.natty/asyncapi"
package="$prefix/node_modules/@asyncapi/parser/package.json"
validator="$prefix/validate-asyncapi.cjs"
marker="$prefix/.natty-installed"

log() { printf 'install-asyncapi-parser: %s\n' "$*" >&2; }

# Prints the installed parser version from its package.json, or fails if there is none.
installed_version() {
    node -p 'require(process.argv[1]).version' "$package" 2>/dev/null
}

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "node and npm are needed to install and run @asyncapi/parser@$PINNED_VERSION (e.g. apt-get install nodejs npm)"
    exit 1
fi

# The validator is copied on every run, so an edit to scripts/ is picked up without a reinstall;
# it lives beside node_modules because that is where `require` looks.
install_validator() {
    cp "$repo_root/scripts/validate-asyncapi.cjs" "$validator.tmp"
    mv "$validator.tmp" "$validator"
}

# 1. An install from an earlier run. Only the pinned version counts, so that bumping
#    PINNED_VERSION replaces a stale install instead of silently keeping it. The marker is written
#    last, so an interrupted install is never taken for a finished one.
if [[ -f "$marker" ]]; then
    if version="$(installed_version)" && [[ "$version" == "$PINNED_VERSION" ]]; then
        install_validator
        log "using $validator (@asyncapi/parser $PINNED_VERSION)"
        printf '%s\n' "$validator"
        exit 0
    fi
    log "replacing $prefix: @asyncapi/parser there is not $PINNED_VERSION"
fi

# 2. The pinned release from the npm registry, local to the prefix.
rm -rf "$prefix"
mkdir -p "$prefix"
log "installing @asyncapi/parser@$PINNED_VERSION from npm into $prefix"
# npm's output would otherwise land on stdout and break `X=$(...)`.
npm install --prefix "$prefix" --no-audit --no-fund --no-save --loglevel=error \
    "@asyncapi/parser@$PINNED_VERSION" >&2

if ! version="$(installed_version)" || [[ "$version" != "$PINNED_VERSION" ]]; then
    log "installed into $prefix but @asyncapi/parser is missing or not $PINNED_VERSION"
    exit 1
fi
install_validator
printf '%s\n' "$PINNED_VERSION" >"$marker"
log "installed $validator (@asyncapi/parser $version)"
printf '%s\n' "$validator"
