#!/usr/bin/env bash
# Makes sure headless Chromium is installed (Debian's `chromium` package, with apt-get when it is
# missing: root is needed then) and prints the absolute path of its binary on stdout:
#
#     NATTY_CHROMIUM=$(scripts/install-chromium.sh)
#
# Only the final path goes to stdout; every diagnostic goes to stderr. The console's browser
# test (tests/console.rs) loads a running service's page in it.
set -euo pipefail

log() { printf 'install-chromium: %s\n' "$*" >&2; }

find_chromium() { command -v chromium || command -v chromium-browser; }

if path="$(find_chromium)"; then
    log "using $path"
    printf '%s\n' "$path"
    exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
    log "chromium is missing and installing it needs root: sudo apt-get install chromium"
    exit 1
fi
log "installing Debian's chromium package"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
path="$(find_chromium)"
log "installed $path"
printf '%s\n' "$path"
