#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ one after another, each for SECONDS (default 600).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      # all targets by default
#
# Each target starts from a scratch copy of its committed corpus (fuzz/corpus/TARGET), kept
# outside git in $FUZZ_WORK (default: ${TMPDIR:-/tmp}/switchboard-fuzz) so new inputs never
# bloat the repository; the scratch corpus persists between runs. Runs niced, one job, one
# worker: the machine is shared. Needs cargo-fuzz (`cargo install cargo-fuzz`); the stable
# toolchain works through RUSTC_BOOTSTRAP=1 (cargo fuzz uses nightly-only flags).
#
# Memory: -rss_limit_mb=2048 catches memory really used. yrs reserves room for declared
# counts with `try_reserve` (address space, untouched); an allocation the system refuses must
# fail as it does in production, so ASan returns null instead of aborting
# (allocator_may_return_null=1) and single allocations are allowed up to $FUZZ_MALLOC_LIMIT_MB
# (256 GiB: 2^32 entries of 24 bytes, the most a u32 count can ask for through try_reserve).
#
# Leaks: LeakSanitizer is on. FUZZ_DETECT_LEAKS=0 turns it off, for runs past the known
# leak inside yrs 0.28.1 (fuzz/known/ywebsocket-yrs-leak-on-reload, see fuzz/README.md).
#
# Prints each target's executions and whether it crashed; exits non-zero if any did. A
# crashing input is left in fuzz/artifacts/TARGET/ (git-ignored); reproduce it with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...`.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
all_targets=(client_command ywebsocket config rest_bodies)

seconds=600
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
  seconds="$1"
  shift
fi
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  targets=("${all_targets[@]}")
fi

work="${FUZZ_WORK:-${TMPDIR:-/tmp}/switchboard-fuzz}"
export RUSTC_BOOTSTRAP=1
# The server's build script would build the web app; the fuzz targets do not need it.
export SWITCHBOARD_SKIP_WEB=1
export ASAN_OPTIONS="${ASAN_OPTIONS:-allocator_may_return_null=1}"

command -v cargo-fuzz >/dev/null || {
  echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2
  exit 2
}

echo "== building ${targets[*]}"
for t in "${targets[@]}"; do
  nice -n 19 cargo fuzz build --fuzz-dir "$repo/fuzz" "$t"
done

failed=0
summary=()
for t in "${targets[@]}"; do
  corpus="$work/corpus/$t"
  mkdir -p "$corpus" "$work/logs" "$repo/fuzz/artifacts/$t"
  cp -n "$repo/fuzz/corpus/$t/"* "$corpus/" 2>/dev/null || true
  log="$work/logs/$t.log"
  echo "== $t for ${seconds}s (corpus $corpus, log $log)"
  # -jobs=1 runs the fuzzer in a child that writes fuzz-0.log in the current directory.
  cd "$work/logs"
  rm -f fuzz-0.log
  started=$SECONDS
  set +e
  nice -n 19 cargo fuzz run --fuzz-dir "$repo/fuzz" "$t" "$corpus" -- \
    -max_total_time="$seconds" -jobs=1 -workers=1 -timeout=10 -rss_limit_mb=2048 -detect_leaks="${FUZZ_DETECT_LEAKS:-1}" \
    -malloc_limit_mb="${FUZZ_MALLOC_LIMIT_MB:-262144}" \
    -print_final_stats=1 -artifact_prefix="$repo/fuzz/artifacts/$t/" >"$log.parent" 2>&1
  rc=$?
  set -e
  ran=$((SECONDS - started))
  cat "$log.parent" fuzz-0.log >"$log" 2>/dev/null || cp "$log.parent" "$log"
  cd "$repo"
  execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || true)"
  if [[ -z "$execs" ]]; then
    execs="$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#' || true)"
  fi
  if [[ $rc -ne 0 ]] || grep -qE 'ERROR: libFuzzer|==ERROR|deadly signal|Test unit written' "$log"; then
    verdict="CRASHED (exit $rc; see $log and fuzz/artifacts/$t/)"
    failed=1
  else
    verdict="no crash"
  fi
  line="$t: ${execs:-?} execs in ${seconds}s (${ran}s with the build), $verdict"
  echo "$line"
  summary+=("$line")
done

echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
