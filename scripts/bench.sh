#!/usr/bin/env bash
# Runs the benchmark program (release build): natty against raw async-nats on the same
# nats-server in the same run, and against FastStream (Python) on the same server.
# Extra arguments go to natty-bench, e.g. `scripts/bench.sh --rounds 3 --only consume`.
set -euo pipefail
cd "$(dirname "$0")/.."
NATTY_NATS_SERVER="$(NATTY_PIN=1 scripts/install-nats-server.sh)"
export NATTY_NATS_SERVER
python="$(bench/faststream/install.sh)"
cargo build --release --locked -p natty-bench
# The footprint scenario's service, built on its own so that it has natty-runtime's default
# features, as a user's service does (built with natty-bench, it would take the benchmark's).
cargo build --release --locked -p natty-bench-idle
# And built for size (fat LTO, one codegen unit), as a service whose footprint matters would be.
cargo build --profile release-small --locked -p natty-bench-idle
exec target/release/natty-bench --faststream "$python" "$@"
