#!/usr/bin/env bash
# Fuzzes every parser of untrusted bytes (cargo-fuzz / libFuzzer, fuzz/), one target
# at a time on one core, and prints per target: executions, exec/s, coverage (cov,
# ft: libFuzzer's last stats line) and crashes.
#
#   bench/fuzz.sh [TARGET...]          each target FUZZ_SECONDS (default 600) s
#   bench/fuzz.sh --smoke [TARGET...]  each target FUZZ_SMOKE_SECONDS (default 15) s,
#                                      after replaying every fuzz/regressions input;
#                                      exits non-zero on any crash (for scripts/test.sh)
#   bench/fuzz.sh --list               the targets
#
# Needs the nightly toolchain (rustup toolchain install nightly); installs cargo-fuzz
# if it is missing. The corpus grows in fuzz/corpus/<target> (git-ignored) from the
# checked-in seeds in fuzz/seeds/<target>; crashes land in fuzz/artifacts/<target>,
# logs in fuzz/logs. libFuzzer stops a target at its first crash: keep the input
# under fuzz/regressions/<target>/ and add a unit test beside the parser.
#
# Environment: FUZZ_SECONDS, FUZZ_SMOKE_SECONDS, FUZZ_ARGS (more libFuzzer flags).
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."
root=$(pwd)

TARGETS=(http1_request http1_response http1_chunked h2_frames hpack services_file discovery)

# Longest input libFuzzer makes per target: room for a real message, not for
# megabytes that only slow each execution down.
max_len() {
  case $1 in
    h2_frames) echo 32768 ;;
    services_file | discovery) echo 16384 ;;
    *) echo 8192 ;;
  esac
}

# The libFuzzer dictionary of a target (fuzz/dicts), if it has one.
dict() {
  case $1 in
    http1_request | http1_response) echo fuzz/dicts/http1.dict ;;
    *) [ -f "fuzz/dicts/$1.dict" ] && echo "fuzz/dicts/$1.dict" ;;
  esac
}

smoke=0
targets=()
for arg in "$@"; do
  case $arg in
    --smoke) smoke=1 ;;
    --list) printf '%s\n' "${TARGETS[@]}"; exit 0 ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $arg (see --help)" >&2; exit 2 ;;
    *)
      if [[ " ${TARGETS[*]} " != *" $arg "* ]]; then
        echo "error: no fuzz target $arg; targets: ${TARGETS[*]}" >&2
        exit 2
      fi
      targets+=("$arg")
      ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${TARGETS[@]}")
if [ "$smoke" = 1 ]; then
  seconds=${FUZZ_SMOKE_SECONDS:-15}
else
  seconds=${FUZZ_SECONDS:-600}
fi

# --- toolchain ------------------------------------------------------------------------
if ! command -v rustup >/dev/null || ! rustup toolchain list | grep -q '^nightly'; then
  echo "error: the fuzz targets need the nightly toolchain (libFuzzer, sanitizers):" >&2
  echo "       rustup toolchain install nightly" >&2
  exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

echo "== building the fuzz targets (nightly, AddressSanitizer, debug assertions)"
mkdir -p fuzz/logs
# `cargo fuzz build` builds one target or all of them.
builds=("")
[ ${#targets[@]} -eq ${#TARGETS[@]} ] || builds=("${targets[@]}")
for b in "${builds[@]}"; do
  # shellcheck disable=SC2086
  if ! (cd fuzz && cargo +nightly fuzz build -a $b) >fuzz/logs/build.log 2>&1; then
    tail -n 30 fuzz/logs/build.log >&2
    echo "error: the fuzz targets did not build (fuzz/logs/build.log)" >&2
    exit 1
  fi
done
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
bin_dir=$root/fuzz/target/$triple/release
for t in "${targets[@]}"; do
  [ -x "$bin_dir/$t" ] || { echo "error: fuzz target $t did not build" >&2; exit 1; }
done

failed=()
rows=()

# --- regressions (smoke) ----------------------------------------------------------------
if [ "$smoke" = 1 ]; then
  for t in "${targets[@]}"; do
    dir=fuzz/regressions/$t
    [ -d "$dir" ] || continue
    mapfile -t inputs < <(find "$dir" -type f ! -name '*.md' | sort)
    [ ${#inputs[@]} -gt 0 ] || continue
    echo "== $t: replaying ${#inputs[@]} regression input(s)"
    if ! "$bin_dir/$t" -runs=1 "${inputs[@]}" >"fuzz/logs/$t.regressions.log" 2>&1; then
      echo "error: a regression input of $t crashes again; see fuzz/logs/$t.regressions.log" >&2
      grep -m 5 -E 'panicked|ERROR|Running:' "fuzz/logs/$t.regressions.log" >&2 || true
      failed+=("$t (regression)")
    fi
  done
fi

# --- fuzzing ----------------------------------------------------------------------------
field() { # field NAME LINE: the number after "NAME:" in a libFuzzer stats line
  sed -n "s/.* $1: \([0-9]*\).*/\1/p" <<<"$2"
}

for t in "${targets[@]}"; do
  corpus=fuzz/corpus/$t
  artifacts=fuzz/artifacts/$t
  log=fuzz/logs/$t.log
  mkdir -p "$corpus" "$artifacts"
  seeds=()
  [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
  flags=()
  d=$(dict "$t" || true)
  [ -z "$d" ] || flags+=("-dict=$d")
  echo "== $t: fuzzing for ${seconds}s (corpus $corpus: $(find "$corpus" -type f | wc -l) inputs)"
  before=$(ls -1 "$artifacts")
  status=0
  # One process, one core (what -jobs=1 amounts to, without a second process).
  # shellcheck disable=SC2086
  "$bin_dir/$t" "$corpus" "${seeds[@]}" \
    -max_total_time="$seconds" -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" "${flags[@]}" ${FUZZ_ARGS:-} \
    >"$log" 2>&1 || status=$?
  new=$(comm -13 <(printf '%s\n' "$before") <(ls -1 "$artifacts") | sed '/^$/d')
  crashes=$(printf '%s' "$new" | grep -c . || true)
  [ "$status" -eq 0 ] || [ "$crashes" -gt 0 ] || crashes=1
  last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -n 1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  if [ -z "$execs" ]; then # no final stats after a crash: the last status line
    execs=$(sed -n 's/^#\([0-9]*\).*/\1/p' <<<"$last")
  fi
  rows+=("$(printf '%-15s %12s %8s %7s %8s %7s' "$t" "${execs:-?}" "${rate:-?}" \
    "$(field cov "$last")" "$(field ft "$last")" "$crashes")")
  if [ "$crashes" -gt 0 ]; then
    failed+=("$t")
    echo "   CRASH: see $log; input(s):" >&2
    printf '%s\n' "$new" | sed "s|^|     $artifacts/|" >&2
    grep -m 3 -E 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer' "$log" | sed 's/^/     /' >&2 || true
  fi
done

echo
echo "== fuzzing: ${seconds}s per target, one core each ($(nproc) cores on this machine)"
printf '%-15s %12s %8s %7s %8s %7s\n' target executions exec/s cov ft crashes
printf '%s\n' "${rows[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
