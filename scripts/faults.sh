#!/usr/bin/env bash
# The fault suite (see docs/RELIABILITY.md), in one command:
#   crates/server/tests/crash.rs      kill -9 during send bursts, SQLite and PostgreSQL
#   tests/compat/js crash, docs_crash the same with the npm SDK and y-websocket (through
#                                     crates/server/tests/sdk_compat.rs; PostgreSQL too)
#   crates/server/tests/faults.rs     database outage (PostgreSQL behind a TCP proxy), read-only
#                                     and full data directory (tmpfs), 60 s of connection churn
# Needs PostgreSQL on 127.0.0.1:5432 (database test), root (the tests mount tmpfs), node/npm.
# Without one of them the tests that need it print SKIPPED; with CI set they fail instead.
# Takes about 3 minutes after the build. Extra arguments go to every cargo test command
# (e.g. --release).
set -euo pipefail
cd "$(dirname "$0")/.."

# The churn test opens thousands of sockets at once.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  echo "faults.sh: PostgreSQL is not answering on 127.0.0.1:5432; its tests will skip (or fail under CI)" >&2
fi

step() { echo; echo "== $*"; }
step "kill -9 during send bursts (crash.rs)"
cargo test -p switchboard "$@" --test crash -- --nocapture
step "kill -9 with the npm SDK and y-websocket (tests/compat/js crash, docs_crash)"
SB_JS_SUITES=crash,docs_crash cargo test -p switchboard "$@" --test sdk_compat -- js_ --nocapture
step "database outage, read-only and full data directory, connection churn (faults.rs)"
cargo test -p switchboard "$@" --test faults -- --nocapture
echo
echo "faults.sh: all fault tests passed"
