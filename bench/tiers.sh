#!/usr/bin/env bash
# What locality-aware balancing costs in throughput: the same HTTP/1.1 load through
# two proxies on one control plane, one with no locality (plain weighted round robin
# over all endpoints) and one in zone-a with callers' shares (zone-aware routing over
# three groups: 62.5% / 25% / 12.5%). Each proxy alone on CPU 0; backends and wrk on
# CPU 1; runs interleaved. Prints requests/s and CPU per request, and the ratio.
#
#   bench/tiers.sh            (DURATION=10 ROUNDS=3 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
# shellcheck source=bench/lib.sh
. bench/lib.sh
command -v wrk >/dev/null || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >&2; }
build_release
TARGET=${CARGO_TARGET_DIR:-target}

bench_workdir tandem-tiers

# 8 backends: zone-a ×2, zone-b ×4, zone-c ×2, one region; callers 40/40/20.
{
  echo "services:"
  echo "  - name: web"
  echo "    port: 80"
  echo "    callers: {zone-a: 40, zone-b: 40, zone-c: 20}"
  echo "    endpoints:"
} > "$WORK/services.yaml"
for zone in zone-a zone-a zone-b zone-b zone-b zone-b zone-c zone-c; do
  port=$(free_port)
  taskset -c 1 "$TARGET/release/tandem" backend --name "$zone" --listen "127.0.0.1:$port" --quiet >/dev/null &
  PIDS+=($!)
  wait_port "$port"
  echo "      - {address: \"127.0.0.1:$port\", region: region-1, zone: $zone}" >> "$WORK/services.yaml"
done
CP=$(free_port)
taskset -c 1 "$TARGET/release/tandem" control-plane --source "file:$WORK/services.yaml" --listen "127.0.0.1:$CP" --admin 127.0.0.1:0 >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$CP"

declare -A PORT PID
start_proxy() { # name, extra args...
  local name=$1; shift
  PORT[$name]=$(free_port)
  taskset -c 0 "$TARGET/release/tandem-proxy" --control-plane "127.0.0.1:$CP" --threads 1 \
    --listen "127.0.0.1:${PORT[$name]}" --admin 127.0.0.1:0 "$@" >/dev/null 2>&1 &
  PID[$name]=$!; PIDS+=($!)
  wait_port "${PORT[$name]}"
}
start_proxy flat
start_proxy zone-aware --locality region-1/zone-a

declare -A RPS CPU
for round in $(seq 1 "$ROUNDS"); do
  for name in flat zone-aware; do
    taskset -c 1 wrk -t1 -c64 -d2s -H 'Host: web' "http://127.0.0.1:${PORT[$name]}/" >/dev/null
    before=$(cpu_ticks "${PID[$name]}")
    out=$(taskset -c 1 wrk -t1 -c64 -d"${DURATION}s" -H 'Host: web' "http://127.0.0.1:${PORT[$name]}/")
    after=$(cpu_ticks "${PID[$name]}")
    reqs=$(echo "$out" | awk '/requests in/ { print $1 }')
    rps=$(echo "$out" | awk '/Requests\/sec/ { print $2 }')
    RPS[$name]="${RPS[$name]:-} $rps"
    CPU[$name]="${CPU[$name]:-} $(us_per_request "$before" "$after" "$reqs")"
    echo "round $round $name: $rps req/s" >&2
  done
done
mean() { echo "$1" | awk '{ s = 0; for (i = 1; i <= NF; i++) s += $i; printf "%.2f", s / NF }'; }
echo "# Locality tiers vs plain round robin, $(date -u +%Y-%m-%d), $(nproc) CPUs, $ROUNDS × ${DURATION}s interleaved"
echo
echo "| proxy | req/s (mean) | CPU µs/req (mean) |"
echo "| --- | ---: | ---: |"
for name in flat zone-aware; do
  echo "| $name | $(mean "${RPS[$name]}") | $(mean "${CPU[$name]}") |"
done
echo
awk -v f="$(mean "${RPS[flat]}")" -v z="$(mean "${RPS[zone-aware]}")" 'BEGIN { printf "zone-aware / flat throughput: %.3f\n", z / f }'
