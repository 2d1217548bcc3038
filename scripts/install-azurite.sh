#!/usr/bin/env bash
# Installs the pinned Azurite (npm `azurite`, the Azure Storage emulator) into
# <repo>/.natty/azurite (git-ignored, no global install) when it is missing or another version,
# and prints the absolute path of its `azurite-blob` binary on stdout:
#
#     NATTY_AZURITE=$(scripts/install-azurite.sh)
#
# Only the final path goes to stdout; every diagnostic goes to stderr. The capture store tests
# (natty-runtime/tests/capture_store.rs) run this binary as a real Azure Blob server on loopback.
set -euo pipefail

PINNED_VERSION="3.37.0"

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="$repo_root/.natty/azurite"
target="$prefix/node_modules/.bin/azurite-blob"
marker="$prefix/.natty-installed"

log() { printf 'install-azurite: %s\n' "$*" >&2; }

# Prints the installed azurite version from its package.json, or fails if there is none.
installed_version() {
    node -p 'require(process.argv[1]).version' "$prefix/node_modules/azurite/package.json" 2>/dev/null
}

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "node and npm are needed to install and run azurite@$PINNED_VERSION (e.g. apt-get install nodejs npm)"
    exit 1
fi

# 1. An install from an earlier run. Only the pinned version counts, so that bumping
#    PINNED_VERSION replaces a stale install instead of silently keeping it. The marker is written
#    last, so an interrupted install is never taken for a finished one.
if [[ -x "$target" && -f "$marker" ]]; then
    if version="$(installed_version)" && [[ "$version" == "$PINNED_VERSION" ]]; then
        log "using $target (azurite $PINNED_VERSION)"
        printf '%s\n' "$target"
        exit 0
    fi
    log "replacing $prefix: azurite there is not $PINNED_VERSION"
fi

# 2. The pinned release from the npm registry, local to the prefix.
rm -rf "$prefix"
mkdir -p "$prefix"
log "installing azurite@$PINNED_VERSION from npm into $prefix"
# npm's output would otherwise land on stdout and break `X=$(...)`.
npm install --prefix "$prefix" --no-audit --no-fund --no-save --loglevel=error \
    "azurite@$PINNED_VERSION" >&2

if ! [[ -x "$target" ]] || ! version="$(installed_version)" || [[ "$version" != "$PINNED_VERSION" ]]; then
    log "installed into $prefix but $target is missing or azurite is not $PINNED_VERSION"
    exit 1
fi
printf '%s\n' "$PINNED_VERSION" >"$marker"
log "installed $target (azurite $version)"
printf '%s\n' "$target"
