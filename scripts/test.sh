#!/usr/bin/env bash
# Runs every test: installs the pinned nats-server, moto, Azurite, the AsyncAPI parser,
# puppeteer-core and Debian's chromium when missing, then the whole workspace's tests (unit, integration against real servers, trybuild UI
# tests, doc tests).
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
NATTY_NATS_SERVER="$(NATTY_PIN=1 scripts/install-nats-server.sh)"
# The capture store tests run moto (S3) and Azurite (Azure Blob) on loopback.
NATTY_MOTO_SERVER="$(scripts/install-moto.sh)"
NATTY_AZURITE="$(scripts/install-azurite.sh)"
# The AsyncAPI test validates the document with the official parser (node).
NATTY_ASYNCAPI_VALIDATOR="$(scripts/install-asyncapi-parser.sh)"
# The console's browser test drives headless Chromium with puppeteer-core (node).
NATTY_CHROMIUM="$(scripts/install-chromium.sh)"
NATTY_CONSOLE_DRIVER="$(scripts/install-puppeteer.sh)"
export NATTY_NATS_SERVER NATTY_MOTO_SERVER NATTY_AZURITE NATTY_ASYNCAPI_VALIDATOR NATTY_CHROMIUM NATTY_CONSOLE_DRIVER
cargo test --workspace --all-targets --locked "$@"
# --all-targets leaves out doc tests; the examples in the docs must compile and run too.
cargo test --workspace --doc --locked "$@"
