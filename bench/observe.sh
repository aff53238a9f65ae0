#!/usr/bin/env bash
# What observing costs: the proxy's CPU per request with tracing off, on at sample
# ratio 0, and on at ratio 1.0 (every request a span, exported to a real Jaeger), side
# by side; and the metrics scrape of a proxy holding 1,000 destinations.
#
#   bench/observe.sh                 # 10 s per run, 3 interleaved rounds
#   DURATION=30 ROUNDS=5 bench/observe.sh
#   CALLGRIND=0 bench/observe.sh     # without the instruction counts (valgrind)
#
# Loads, as bench/compare.sh runs them: wrk (HTTP/1.1 keep-alive, 64 connections,
# HTTP/1.1 to the backends) and h2load (h2c, 64 connections x 10 streams, HTTP/2 to the
# backends). Each proxy variant runs alone on CPU 0 with one thread; the two `tandem
# backend`s, the load and Jaeger run on CPU 1. CPU per request is read from
# /proc/PID/stat (the export task runs in the proxy, so it is counted); each figure
# is the median over the rounds. Timings on a shared machine move by several percent
# from run to run, so the instructions per request (callgrind, bench/callgrind.sh)
# are given beside them: they do not.
# Jaeger is the one tests/cluster/build-tools.sh builds (about 9 minutes the first
# time). Printed as markdown.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2}
CALLGRIND=${CALLGRIND:-1}
DESTINATIONS=${DESTINATIONS:-1000}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

for tool in wrk h2load curl python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install wrk nghttp2-client curl python3)" >&2; exit 1; }
done
[ "$CALLGRIND" = 0 ] || command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind), or CALLGRIND=0" >&2; exit 1; }
tests/cluster/build-tools.sh jaeger >/dev/null
JAEGER=$(tests/cluster/build-tools.sh --print-bin-dir jaeger)/jaeger
build_release
TARGET=${CARGO_TARGET_DIR:-target}
PROXY_BIN=$TARGET/release/tandem-proxy
TANDEM_BIN=$TARGET/release/tandem

bench_workdir tandem-observe

# --- Jaeger (OTLP in, memory storage), on the load's CPU ------------------------------
OTLP=$(free_port); JHEALTH=$(free_port)
cat > "$WORK/jaeger.yaml" <<EOF
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces: {receivers: [otlp], processors: [batch], exporters: [jaeger_storage_exporter]}
  telemetry:
    metrics: {level: basic, readers: [{pull: {exporter: {prometheus: {host: 127.0.0.1, port: $(free_port)}}}}]}
extensions:
  healthcheckv2: {use_v2: true, http: {endpoint: "127.0.0.1:$JHEALTH"}}
  jaeger_storage: {backends: {mem: {memory: {max_traces: 100000}}}}
  jaeger_query:
    storage: {traces: mem}
    enable_tracing: false
    http: {endpoint: "127.0.0.1:$(free_port)"}
    grpc: {endpoint: "127.0.0.1:$(free_port)"}
receivers:
  otlp: {protocols: {grpc: {endpoint: "127.0.0.1:$OTLP"}, http: {endpoint: "127.0.0.1:$(free_port)"}}}
processors: {batch: {}}
exporters: {jaeger_storage_exporter: {trace_storage: mem}}
EOF
taskset -c "$LOAD_CPU" "$JAEGER" --config="$WORK/jaeger.yaml" >"$WORK/jaeger.log" 2>&1 &
PIDS+=($!)
wait_port "$JHEALTH"

# --- backends ---------------------------------------------------------------------------
B1=$(free_port); B2=$(free_port)
for b in "$B1" "$B2"; do
  taskset -c "$LOAD_CPU" "$TANDEM_BIN" backend --name "b$b" --listen "127.0.0.1:$b" --quiet >/dev/null &
  PIDS+=($!)
done
wait_port "$B1"; wait_port "$B2"

# --- the proxy variants: tracing off, ratio 0, ratio 1, for each load -------------------
VARIANTS=(off ratio-0 ratio-1)
declare -A PORT PID ADMIN
flags_of() {
  case $1 in
    off) ;;
    ratio-0) echo "--trace-collector 127.0.0.1:$OTLP --trace-sample-ratio 0" ;;
    ratio-1) echo "--trace-collector 127.0.0.1:$OTLP --trace-sample-ratio 1" ;;
  esac
}
for load in h1 h2c; do
  protocol=auto; [ "$load" = h2c ] && protocol=http2
  for v in "${VARIANTS[@]}"; do
    k="$load/$v"; PORT[$k]=$(free_port); ADMIN[$k]=$(free_port)
    # shellcheck disable=SC2046 # the flags are words
    taskset -c "$PROXY_CPU" "$PROXY_BIN" --backends "127.0.0.1:$B1,127.0.0.1:$B2" --backend-protocol "$protocol" \
      --threads 1 --listen "127.0.0.1:${PORT[$k]}" --admin "127.0.0.1:${ADMIN[$k]}" \
      --service-name "bench-$v" $(flags_of "$v") >/dev/null 2>"$WORK/proxy-$load-$v.log" &
    PID[$k]=$!; PIDS+=($!)
  done
done
for k in "${!PORT[@]}"; do wait_port "${PORT[$k]}"; done

# run LOAD VARIANT → "requests/s us-per-request"
run() {
  local k="$1/$2" port out="$WORK/out" before after requests rps
  port=${PORT[$k]}
  case $1 in
    h1) taskset -c "$LOAD_CPU" wrk -t1 -c64 -d"${WARMUP}s" "http://127.0.0.1:$port/" >/dev/null ;;
    h2c) taskset -c "$LOAD_CPU" h2load -t1 -c64 -m10 -D"$WARMUP" "http://127.0.0.1:$port/" >/dev/null ;;
  esac
  before=$(cpu_ticks "${PID[$k]}")
  case $1 in
    h1)
      taskset -c "$LOAD_CPU" wrk -t1 -c64 -d"${DURATION}s" "http://127.0.0.1:$port/" >"$out"
      requests=$(awk '/requests in/ { print $1 }' "$out")
      rps=$(awk '/^Requests\/sec/ { printf "%.0f", $2 }' "$out") ;;
    h2c)
      taskset -c "$LOAD_CPU" h2load -t1 -c64 -m10 -D"$DURATION" "http://127.0.0.1:$port/" >"$out"
      requests=$(awk '/^requests:/ { print $8 }' "$out")
      rps=$(awk '/^finished in/ { gsub(",", "", $4); printf "%.0f", $4 }' "$out") ;;
  esac
  after=$(cpu_ticks "${PID[$k]}")
  echo "$rps $(us_per_request "$before" "$after" "$requests")"
}

declare -A RPS CPU
for round in $(seq 1 "$ROUNDS"); do
  for load in h1 h2c; do
    for v in "${VARIANTS[@]}"; do
      read -r rps cpu < <(run "$load" "$v")
      RPS[$load/$v]+="$rps "; CPU[$load/$v]+="$cpu "
      echo "round $round $load $v: $rps req/s, $cpu us/request" >&2
    done
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
spans() { curl -s "http://127.0.0.1:$1/metrics" | awk -v r="$2" '$1 == "tandem_proxy_trace_spans_total{result=\"" r "\"}" { print $2 }'; }

echo "# Observability's cost, $(date -u +%Y-%m-%d), $(nproc) CPUs ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo))"
echo
echo "Tracing: proxy CPU per request, median of $ROUNDS interleaved ${DURATION}-second runs per variant"
echo
echo "| load | variant | requests/s | proxy CPU µs/request | vs off |"
echo "| --- | --- | ---: | ---: | ---: |"
for load in h1 h2c; do
  off=$(echo "${CPU[$load/off]}" | median)
  for v in "${VARIANTS[@]}"; do
    cpu=$(echo "${CPU[$load/$v]}" | median)
    ratio=$(awk -v a="$cpu" -v b="$off" 'BEGIN { printf "%.3f", a / b }')
    echo "| $load | $v | $(echo "${RPS[$load/$v]}" | median) | $cpu | ${ratio}x |"
  done
done
echo
for load in h1 h2c; do
  echo "Spans of the $load ratio-1 proxy: exported $(spans "${ADMIN[$load/ratio-1]}" exported), dropped $(spans "${ADMIN[$load/ratio-1]}" queue_full) (queue full) + $(spans "${ADMIN[$load/ratio-1]}" export_failed) (export failed)."
done

# --- instructions per request (callgrind) ----------------------------------------------
if [ "$CALLGRIND" != 0 ]; then
  echo
  echo "Tracing: instructions per request (callgrind, bench/callgrind.sh, N=${N:-20000})"
  echo
  echo "| variant | h2c | h1 |"
  echo "| --- | ---: | ---: |"
  for v in "${VARIANTS[@]}"; do
    row=$(PROXY_FLAGS="$(flags_of "$v")" bench/callgrind.sh "$PROXY_BIN" | awk -F'|' '/release/ { gsub(/ /, "", $3); gsub(/ /, "", $4); print $3 " | " $4 }')
    echo "| $v | $row |"
  done
fi

# --- a metrics scrape with many destinations ---------------------------------------------
# A control plane serving DESTINATIONS services (one endpoint each: a backend), a proxy
# asked for every one of them once, then /metrics read 20 times.
{
  echo "services:"
  for i in $(seq 1 "$DESTINATIONS"); do
    echo "  - {name: svc-$i, port: 80, endpoints: [{address: \"127.0.0.1:$B1\"}]}"
  done
} > "$WORK/services.yaml"
CP=$(free_port); CP_ADMIN=$(free_port)
taskset -c "$LOAD_CPU" "$TANDEM_BIN" control-plane --source "file:$WORK/services.yaml" \
  --listen "127.0.0.1:$CP" --admin "127.0.0.1:$CP_ADMIN" >/dev/null 2>"$WORK/cp.log" &
PIDS+=($!)
wait_port "$CP"
P=$(free_port); PA=$(free_port)
taskset -c "$PROXY_CPU" "$PROXY_BIN" --control-plane "127.0.0.1:$CP" --threads 1 \
  --listen "127.0.0.1:$P" --admin "127.0.0.1:$PA" --max-destinations $((DESTINATIONS + 10)) >/dev/null 2>"$WORK/proxy-many.log" &
PIDS+=($!)
wait_port "$P"
python3 - "$P" "$DESTINATIONS" <<'EOF'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
for i in range(1, n + 1):
    conn.request("GET", "/", headers={"Host": f"svc-{i}"})
    r = conn.getresponse(); r.read()
    if r.status != 200:
        sys.exit(f"svc-{i}: {r.status}")
EOF
times=()
for _ in $(seq 1 20); do
  times+=("$(curl -s -o "$WORK/metrics.txt" -w '%{time_total}' "http://127.0.0.1:$PA/metrics")")
done
echo
echo "Metrics scrape of a proxy holding $DESTINATIONS destinations (one endpoint each), 20 scrapes:"
echo
echo "| median time | slowest | size | series |"
echo "| ---: | ---: | ---: | ---: |"
echo "| $(printf '%s\n' "${times[@]}" | sort -g | awk '{ a[NR] = $1 } END { printf "%.1f ms", a[int((NR + 1) / 2)] * 1000 }') | $(printf '%s\n' "${times[@]}" | sort -g | tail -1 | awk '{ printf "%.1f ms", $1 * 1000 }') | $(wc -c < "$WORK/metrics.txt" | awk '{ printf "%.0f KiB", $1 / 1024 }') | $(grep -vc '^#' "$WORK/metrics.txt") |"
