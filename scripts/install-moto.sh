#!/usr/bin/env bash
# Installs the pinned moto S3 server (`moto_server`, PyPI `moto[server]`) into a Python venv at
# <repo>/.natty/moto (git-ignored) when it is missing or another version, and prints the
# absolute path of the `moto_server` binary on stdout:
#
#     NATTY_MOTO_SERVER=$(scripts/install-moto.sh)
#
# Only the final path goes to stdout; every diagnostic goes to stderr. The capture store tests
# (natty-runtime/tests/capture_store.rs) run this binary as a real S3 server on loopback.
set -euo pipefail

PINNED_VERSION="5.2.5"

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$repo_root/.natty/moto"
target="$venv/bin/moto_server"
marker="$venv/.natty-installed"

log() { printf 'install-moto: %s\n' "$*" >&2; }

# Prints the installed moto version, or fails if the venv's Python cannot import it.
installed_version() {
    "$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null
}

# 1. An install from an earlier run. Only the pinned version counts, so that bumping
#    PINNED_VERSION replaces a stale install instead of silently keeping it.
if [[ -x "$target" && -f "$marker" ]]; then
    if version="$(installed_version)" && [[ "$version" == "$PINNED_VERSION" ]]; then
        log "using $target (moto $PINNED_VERSION)"
        printf '%s\n' "$target"
        exit 0
    fi
    log "replacing $venv: moto there does not run or is not $PINNED_VERSION"
fi

# 2. The pinned release from PyPI, into a fresh venv.
if ! command -v python3 >/dev/null 2>&1; then
    log "python3 (with the venv module) is needed to install moto[server]==$PINNED_VERSION from PyPI"
    exit 1
fi

# A venv records its own absolute path in its scripts' shebangs, so it cannot be built elsewhere
# and renamed into place. Instead a marker file, written last, says the install finished: an
# interrupted run leaves no marker, and step 1 then rebuilds the venv.
rm -rf "$venv"
mkdir -p "$repo_root/.natty"
log "creating a venv at $venv"
python3 -m venv "$venv" >&2
log "installing moto[server]==$PINNED_VERSION from PyPI"
# pip's own progress output would otherwise land on stdout and break `X=$(...)`.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    "moto[server]==$PINNED_VERSION" >&2

if ! [[ -x "$target" ]] || ! version="$(installed_version)" || [[ "$version" != "$PINNED_VERSION" ]]; then
    log "installed into $venv but $target is missing or moto is not $PINNED_VERSION"
    exit 1
fi
printf '%s\n' "$PINNED_VERSION" >"$marker"
log "installed $target (moto $version)"
printf '%s\n' "$target"
