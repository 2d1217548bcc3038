#!/usr/bin/env bash
# Installs the pinned puppeteer-core (npm; it drives a Chromium installed apart, and downloads
# none) into <repo>/.natty/puppeteer (git-ignored, no global install) when it is missing or
# another version, copies tests/browser/console.cjs beside it, and prints the absolute path of
# that copy on stdout:
#
#     NATTY_CONSOLE_DRIVER=$(scripts/install-puppeteer.sh)
#     node "$NATTY_CONSOLE_DRIVER" ...   # see the script
#
# Only the final path goes to stdout; every diagnostic goes to stderr.
set -euo pipefail

repo_root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="$repo_root/.natty/puppeteer"
driver="$prefix/console.cjs"
source "$repo_root/scripts/lib/npm-pinned.sh"

npm_pinned install-puppeteer puppeteer-core 24.43.1 "$prefix"
# Copied on every run, so an edit is picked up without a reinstall; it lives beside
# node_modules because that is where `require` looks.
cp "$repo_root/tests/browser/console.cjs" "$driver.tmp"
mv "$driver.tmp" "$driver"
printf '%s\n' "$driver"
