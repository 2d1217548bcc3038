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

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="$repo_root/.natty/azurite"
target="$prefix/node_modules/.bin/azurite-blob"
source "$repo_root/scripts/lib/npm-pinned.sh"

npm_pinned install-azurite azurite 3.37.0 "$prefix" "$target"
printf '%s\n' "$target"
