#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: the same for the same binary
# and load whatever else the machine is doing, so two builds can be compared on a
# busy or shared machine where timings cannot.
#
#   bench/callgrind.sh                          # target/release/tandem-proxy
#   bench/callgrind.sh OLD_PROXY NEW_PROXY      # several binaries, side by side
#   LOADS="h2c h1" N=20000 bench/callgrind.sh
#   PROXY_FLAGS="--trace-collector 127.0.0.1:4317" bench/callgrind.sh   # more proxy flags
#
# Loads (h2load, 64 connections, N requests, start-up and shutdown included):
#   h2c       h2c clients, 10 streams each, HTTP/2 to the backends (--backend-protocol http2)
#   h1        HTTP/1.1 keep-alive clients (h2load --h1), HTTP/1.1 to the backends
#   h1-h2up   HTTP/1.1 clients, HTTP/2 to the backends (the client side of a mesh hop)
#   h2c-h1up  h2c clients, HTTP/1.1 to the backends (the server side of a mesh hop)
# The proxy runs with one thread; the two backends are `tandem backend`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh

LOADS=${LOADS:-h2c h1}
N=${N:-20000}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
command -v h2load >/dev/null || { echo "needs h2load (apt-get install nghttp2-client)" >&2; exit 1; }

BINS=("$@")
if [ ${#BINS[@]} -eq 0 ]; then
  cargo build --release -p tandem-proxy >&2
  BINS=("${CARGO_TARGET_DIR:-target}/release/tandem-proxy")
fi
TANDEM=${CARGO_TARGET_DIR:-target}/release/tandem
[ -x "$TANDEM" ] || TANDEM=${CARGO_TARGET_DIR:-target}/debug/tandem
[ -x "$TANDEM" ] || { echo "needs a built tandem binary for the backends (cargo build)" >&2; exit 1; }

bench_workdir tandem-callgrind
B1=$(free_port); B2=$(free_port)
"$TANDEM" backend --name instance-1 --listen "127.0.0.1:$B1" --quiet >/dev/null & PIDS+=($!)
"$TANDEM" backend --name instance-2 --listen "127.0.0.1:$B2" --quiet >/dev/null & PIDS+=($!)
wait_port "$B1"; wait_port "$B2"

# instructions BIN LOAD → instructions per request
instructions() {
  local bin=$1 load=$2 port admin out="$WORK/callgrind.out" protocol=auto h1=()
  port=$(free_port); admin=$(free_port)
  case $load in
    h2c) protocol=http2 ;;
    h1) h1=(--h1) ;;
    h1-h2up) h1=(--h1); protocol=http2 ;;
    h2c-h1up) protocol=http1 ;;
    *) echo "unknown load $load (h2c h1 h1-h2up h2c-h1up)" >&2; exit 1 ;;
  esac
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" \
    --backends "127.0.0.1:$B1,127.0.0.1:$B2" --backend-protocol "$protocol" --threads 1 \
    --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" ${PROXY_FLAGS:-} >/dev/null 2>"$WORK/valgrind.log" &
  local pid=$!
  for _ in $(seq 1 600); do
    curl -sf -o /dev/null "http://127.0.0.1:$admin/ready" && break
    sleep 0.1
  done
  h2load "${h1[@]}" -t1 -c64 -m10 -n "$N" "http://127.0.0.1:$port/" > "$WORK/h2load.out"
  grep -q "$N succeeded" "$WORK/h2load.out" || { cat "$WORK/h2load.out" >&2; exit 1; }
  curl -s -X POST -o /dev/null "http://127.0.0.1:$admin/shutdown" || true
  wait "$pid" || true
  awk -v n="$N" '/^(summary|totals):/ { printf "%.0f\n", $2 / n; exit }' "$out"
}

printf '| binary | %s |\n' "$(echo "$LOADS" | sed 's/ / | /g')"
printf '| --- |%s\n' "$(for _ in $LOADS; do printf ' ---: |'; done)"
for bin in "${BINS[@]}"; do
  row="| $bin |"
  for load in $LOADS; do
    row="$row $(instructions "$bin" "$load") |"
  done
  echo "$row"
done
echo
echo "instructions per request (callgrind Ir / $N requests, start-up and shutdown included)"
