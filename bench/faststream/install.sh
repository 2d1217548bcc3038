#!/usr/bin/env bash
# Installs FastStream (and its pinned dependencies) for bench/faststream/bench.py into
# <repo>/.natty/faststream-venv and prints that venv's python path on stdout (only that;
# diagnostics go to stderr). Idempotent: does nothing if the venv already has the pins.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$repo/.natty/faststream-venv"
requirements="$here/requirements.txt"
python="$venv/bin/python"

# True when every `name==version` pin in requirements.txt is installed in the venv.
pins_installed() {
    [[ -x "$python" ]] || return 1
    "$python" - "$requirements" <<'PY'
import re, sys
from importlib import metadata
ok = True
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", line)
    if not match:
        sys.exit(f"unpinned requirement: {line}")
    name, version = match.groups()
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have != version:
        print(f"{name}: want {version}, have {have}", file=sys.stderr)
        ok = False
sys.exit(0 if ok else 1)
PY
}

if pins_installed 2>/dev/null; then
    echo "faststream venv up to date: $venv" >&2
else
    echo "installing faststream into $venv" >&2
    if [[ ! -x "$python" ]]; then
        mkdir -p "$repo/.natty"
        python3 -m venv "$venv" >&2
    fi
    "$python" -m pip install --quiet --disable-pip-version-check --require-virtualenv \
        -r "$requirements" >&2
    pins_installed >&2 || { echo "faststream venv does not match $requirements" >&2; exit 1; }
fi

echo "$python"
