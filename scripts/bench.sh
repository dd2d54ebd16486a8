#!/usr/bin/env bash
# Reproduces the figures in BENCHMARKS.md: builds release, starts the server pinned to core 0,
# runs the load generator pinned to core 1, and prints one JSON line per run.
# Usage: scripts/bench.sh [runs-per-figure]   (default 3; the table reports medians)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
PORT=${PORT:-8000}
export SWITCHBOARD_TOKEN_HMAC_SECRET=${SWITCHBOARD_TOKEN_HMAC_SECRET:-bench-secret}
DATA=$(mktemp -d)
cargo build --release -q
ulimit -n 20000
start_server() {
  SWITCHBOARD_LOG=warn SWITCHBOARD_LISTEN=127.0.0.1:$PORT SWITCHBOARD_DATA_DIR=$DATA \
    SWITCHBOARD_CLIENT__COMMAND_RATE=100000 SWITCHBOARD_CLIENT__COMMAND_BURST=100000 \
    taskset -c 0 ./target/release/switchboard serve 2>>"$DATA/server.log" &
  SERVER=$!
  for _ in $(seq 50); do curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "server did not start" >&2; exit 1
}
stop_server() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; }
trap 'kill $SERVER 2>/dev/null || true; rm -rf "$DATA"' EXIT
bench() { taskset -c 1 ./target/release/switchboard bench "$@" --url "ws://127.0.0.1:$PORT/connection/websocket" --server-pid "$SERVER"; }

for n in 10000 19500; do
  for _ in $(seq "$RUNS"); do start_server; bench conns --n "$n" --hold 3s; stop_server; done
done
start_server
for _ in $(seq "$RUNS"); do
  bench fanout --subs 1000 --rate 100 --size 70 --duration 10s
  bench fanout --subs 1000 --rate 50 --size 70 --duration 10s
  bench fanout --subs 10000 --rate 2 --size 70 --duration 15s
  # Slow consumers: the same load without and with 20 subscribers that never read.
  bench fanout --subs 200 --rate 50 --size 16000 --duration 10s
  bench fanout --subs 200 --rate 50 --size 16000 --duration 10s --stalled 20
done
stop_server
# The kernel's floor for the same pattern: raw 70-byte write()s from one core.
gcc -O2 -pthread crates/bench/floor/floor.c -o "$DATA/floor"
for _ in $(seq "$RUNS"); do
  "$DATA/floor" 1000 100 5; "$DATA/floor" 1000 50 5; "$DATA/floor" 9000 2 10
done
