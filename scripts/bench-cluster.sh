#!/usr/bin/env bash
# Fan-out across nodes: `switchboard bench fanout` with subscribers on node A and the publisher
# on node B, so every delivery crosses the broker; and the same load on one node for reference.
#   scripts/bench-cluster.sh [memory|redis|nats ...]   (default: all three)
# Needs a release build (cargo build --release), PostgreSQL on 5432, Redis on 6379, NATS on
# 4222. Prints one JSON line per engine. Set SUBS, RATE, DURATION to change the load.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/switchboard
SUBS=${SUBS:-1000}
RATE=${RATE:-50}
DURATION=${DURATION:-20s}
SECRET=bench-cluster-secret
engines=("$@")
[ ${#engines[@]} -eq 0 ] && engines=(memory redis nats)

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

start_node() { # name port broker schema
  local dir="$work/$1"; mkdir -p "$dir"
  SWITCHBOARD_LISTEN=127.0.0.1:$2 SWITCHBOARD_DATA_DIR=$dir SWITCHBOARD_NAME=$1 \
  SWITCHBOARD_TOKEN_HMAC_SECRET=$SECRET SWITCHBOARD_API_KEY=k SWITCHBOARD_LOG=warn \
  SWITCHBOARD_DATABASE_URL="postgres://postgres@127.0.0.1:5432/test?options%5Bsearch_path%5D=$4" \
  SWITCHBOARD_BROKER_URL=$3 SWITCHBOARD_BROKER__PREFIX=$4 \
  SWITCHBOARD_CLIENT__COMMAND_RATE=100000 SWITCHBOARD_CLIENT__COMMAND_BURST=100000 \
    taskset -c 0 "$BIN" serve >"$dir/log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$2) 2>/dev/null && return; sleep 0.1; done
  echo "node $1 did not start" >&2; cat "$dir/log" >&2; exit 1
}

for engine in "${engines[@]}"; do
  schema="sbbench_${engine}_$$"
  psql -q -h 127.0.0.1 -U postgres test -c "CREATE SCHEMA $schema" >/dev/null
  case $engine in
    memory) url=""; ;;
    redis) url=redis://127.0.0.1:6379 ;;
    nats) url=nats://127.0.0.1:4222 ;;
  esac
  start_node a 8301 "$url" "$schema"
  pub=ws://127.0.0.1:8301/connection/websocket
  if [ "$engine" != memory ]; then
    start_node b 8302 "$url" "$schema"
    pub=ws://127.0.0.1:8302/connection/websocket
  fi
  out=$(SWITCHBOARD_TOKEN_HMAC_SECRET=$SECRET taskset -c 1 "$BIN" bench fanout \
    --url ws://127.0.0.1:8301/connection/websocket --publish-url "$pub" \
    --subs "$SUBS" --rate "$RATE" --duration "$DURATION" --channel "bench")
  echo "{\"engine\":\"$engine\",\"report\":$out}"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  psql -q -h 127.0.0.1 -U postgres test -c "DROP SCHEMA $schema CASCADE" >/dev/null
done
