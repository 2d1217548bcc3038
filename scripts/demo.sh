#!/usr/bin/env bash
# The ticketing demo end to end on a fresh machine: installs nats-server if missing, builds
# the example, starts two listener instances with NATS_URL unset (the first starts a local
# development server, the second finds it), publishes tickets, shows how the two instances
# split them, and shuts both down with SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
NATTY_NATS_SERVER="$(scripts/install-nats-server.sh)"
export NATTY_NATS_SERVER
cargo build --quiet -p natty-examples --bins
bin=target/debug

work="$(mktemp -d)"
# A free port, so the demo never collides with a server already on 4222.
NATTY_DEV_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export NATTY_DEV_PORT NATTY_DEV_DIR="$work/dev"
unset NATS_URL
pids=()
cleanup() { for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
# Waits (10 s at most) until listener $1 logs that it runs.
wait_running() {
    for _ in $(seq 1 200); do
        grep -q "natty is running" "$work/$1.err" 2>/dev/null && return 0
        sleep 0.05
    done
    cat "$work/$1.err"; return 1
}

echo "== starting listener A (starts the development nats-server on port $NATTY_DEV_PORT)"
INSTANCE=A "$bin/ticket-listener" >"$work/a.out" 2>"$work/a.err" &
pids+=($!)
wait_running a
grep "development nats-server" "$work/a.err" | sed 's/^.*INFO [^ ]* //' || { cat "$work/a.err"; exit 1; }

echo "== starting listener B (same durable: the two share the work)"
INSTANCE=B "$bin/ticket-listener" >"$work/b.out" 2>"$work/b.err" &
pids+=($!)
wait_running b

echo "== publishing 20 tickets"
NATS_URL="nats://127.0.0.1:$NATTY_DEV_PORT" "$bin/ticket-publisher" 20 | tail -n 3
for _ in $(seq 1 200); do
    [[ $(cat "$work/a.out" "$work/b.out" | grep -c "handled ticket") -ge 20 ]] && break
    sleep 0.05
done

echo "== what each instance handled"
cat "$work/a.out" "$work/b.out"
echo "== A handled $(grep -c "handled ticket" "$work/a.out"), B handled $(grep -c "handled ticket" "$work/b.out"); each ticket once"

echo "== SIGTERM: B, then A (A owns the development server)"
kill -TERM "${pids[1]}"; wait "${pids[1]}" && echo "B exited with 0"
kill -TERM "${pids[0]}"; wait "${pids[0]}" && echo "A exited with 0"
pids=()
