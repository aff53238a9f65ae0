#!/usr/bin/env bash
# Opaque TCP through the proxy's transparent outbound listener, against HAProxy in TCP
# mode, each on the same pinned core.
#
#   bench/tcp.sh                      # every load, 3 interleaved rounds of 10 s
#   DURATION=30 ROUNDS=5 bench/tcp.sh
#   MODES="conn" bench/tcp.sh         # some loads only: conn, stream1, stream8
#   PROXIES="tandem haproxy haproxy-splice" bench/tcp.sh   # also HAProxy with
#                                     # `option splice-auto` (kernel splice, no copy
#                                     # through user space)
#   BUILD=0 bench/tcp.sh              # the binaries in target/release as they are
#
# Needs root (a network namespace, nat rules), 2 CPUs, and installs what it lacks with
# apt-get (wrk, iperf3, HAProxy, iptables). Interception as in an injected pod: the
# script makes a network namespace joined to the host by a veth pair (host side
# 10.79.0.1/30, inside 10.79.0.2/30), runs `tandem-proxy init` in it (outbound TCP from
# every UID but 2102 redirected to port 4140), and runs the proxy under test in it as
# UID 2102 on 0.0.0.0:4140. The load generator runs in the namespace as root and
# connects to a "service" address, 10.96.0.10, which the nat rules redirect to the
# proxy; the proxy connects to the backends on the host side of the veth. HAProxy
# (mode tcp, balance roundrobin, nbthread 1) runs in Tandem's place, same UID, same
# port, one proxy at a time, so both pay the same nat and conntrack: the only
# difference is the proxy. Each run starts the proxy afresh (its binary copied once at
# the start, so a rebuild during the run changes nothing) and stops it after.
#
# The proxy under test runs alone on CPU 0 with one thread (Tandem `--threads 1`,
# HAProxy `nbthread 1`); the load generator and the backends share CPU 1.
#
# Loads:
# - "conn": short connections. wrk, 64 connections, each request with `Connection:
#   close`, to service port 8080, which is in Tandem's `--opaque-ports`: Tandem
#   forwards it as opaque TCP at once (no protocol detection, no HTTP parsing), as
#   HAProxy in mode tcp does; every request is a new connection through the proxy to
#   one of two `tandem backend`s (balanced per connection). Reported: connections/s,
#   p50/p99 latency (connect + request + response, wrk's), the proxy's CPU per
#   connection (user + system, /proc/PID/stat), socket errors wrk counted.
# - "stream1", "stream8": throughput. iperf3 -c for DURATION s with 1 and with 8
#   parallel streams (client to server) to service port 5201 (also opaque). Reported:
#   Gbit/s received by the server, the proxy's CPU per GB moved (10^9 bytes). Both
#   proxies get ONE backend here, an `iperf3 -s` on the host side: iperf3's control
#   connection and its data connections must reach the same server, and balanced per
#   connection over two servers they would be split and the test would fail.
# Both: how busy each core was during the run (/proc/stat): when the load core is near
# 100%, the load, not the proxy, sets the rate, and the proxy's CPU per connection or
# per GB is the figure to read. The kernel's receive work for what the proxy sends
# (over loopback to the client, over the veth to the backends) runs in softirq on the
# proxy's core and is mostly charged to the proxy, as it would be in a pod; the same
# for both proxies.
#
# Each figure is the median over ROUNDS interleaved rounds (every load through every
# proxy, then again), with the ratio Tandem / HAProxy. A 2 s warm-up precedes each
# run. Results are printed and written to bench/results/tcp-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
MODES=${MODES:-conn stream1 stream8}
PROXIES=${PROXIES:-tandem haproxy}
CONNECTIONS=${CONNECTIONS:-64}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
BUILD=${BUILD:-1}

PROXY_UID=2102
OUTBOUND_PORT=4140
HOST_IP=10.79.0.1
NS_IP=10.79.0.2
SERVICE_IP=10.96.0.10
CONN_SERVICE_PORT=8080
STREAM_SERVICE_PORT=5201
NS=tandem-tcp-bench-$$
VETH_HOST=ttb$$h
VETH_NS=ttb$$n

[ "$(id -u)" = 0 ] || { echo "needs root: a network namespace and nat rules" >&2; exit 1; }

need() {
  local missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v iperf3 >/dev/null || missing+=(iperf3)
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v ss >/dev/null || missing+=(iproute2)
  command -v taskset >/dev/null || missing+=(util-linux)
  command -v setpriv >/dev/null || missing+=(util-linux)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
  fi
}
need
[ "$(nproc)" -ge 2 ] || { echo "needs at least 2 CPUs (proxy on one, load on the other)" >&2; exit 1; }

[ "$BUILD" = 0 ] || build_release
TARGET=${CARGO_TARGET_DIR:-target}

bench_workdir tandem-tcp-bench
PROXY_PID=""
tcp_cleanup() {
  [ -z "$PROXY_PID" ] || { kill "$PROXY_PID" 2>/dev/null || true; wait "$PROXY_PID" 2>/dev/null || true; }
  bench_cleanup
  ip netns del "$NS" 2>/dev/null || true
  ip link del "$VETH_HOST" 2>/dev/null || true
}
trap tcp_cleanup EXIT
trap 'exit 130' INT TERM

# The binaries, where UID 2102 can run them, and fixed for the whole run.
chmod 755 "$WORK"
mkdir -p "$WORK/bin"
cp "$TARGET/release/tandem-proxy" "$TARGET/release/tandem" "$WORK/bin/"
PROXY_BIN=$WORK/bin/tandem-proxy
TANDEM_BIN=$WORK/bin/tandem

in_ns() { ip netns exec "$NS" "$@"; }

# --- the namespace: a pod's network, its nat rules ------------------------------------
ip netns add "$NS"
ip link add "$VETH_HOST" type veth peer name "$VETH_NS"
ip link set "$VETH_NS" netns "$NS"
ip addr add "$HOST_IP/30" dev "$VETH_HOST"
ip link set "$VETH_HOST" up
in_ns ip link set lo up
in_ns ip addr add "$NS_IP/30" dev "$VETH_NS"
in_ns ip link set "$VETH_NS" up
in_ns ip route add default via "$HOST_IP"
in_ns "$PROXY_BIN" init --outbound-port "$OUTBOUND_PORT" --inbound-port 4143 --admin-port 4191 \
  --proxy-uid "$PROXY_UID" --ipv6 off >"$WORK/init.log" 2>&1 || { cat "$WORK/init.log" >&2; exit 1; }
# The namespace's own sysctls (the host's are left alone): short connections at
# several thousand a second for minutes would otherwise run out of ephemeral ports to
# the one service address (TIME_WAIT) and fill the conntrack table.
in_ns sysctl -qw net.ipv4.ip_local_port_range="1024 65000" net.ipv4.tcp_tw_reuse=1
in_ns sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_time_wait=5 2>/dev/null ||
  echo "note: could not shorten conntrack's TIME_WAIT in the namespace" >&2

# wait_listen [ns] PORT: until something listens on PORT (TCP), here or in the namespace.
wait_listen() {
  local run=() port=$1
  if [ "$1" = ns ]; then run=(ip netns exec "$NS"); port=$2; fi
  for _ in $(seq 1 200); do
    [ -n "$("${run[@]}" ss -Hltn "sport = :$port")" ] && return 0
    sleep 0.05
  done
  echo "nothing listens on port $port${run:+ in the namespace}" >&2; exit 1
}

# --- backends, on the host side, on the load's core -----------------------------------
B1=$(free_port); B2=$(free_port); IPERF_PORT=$(free_port)
taskset -c "$LOAD_CPU" "$TANDEM_BIN" backend --name instance-1 --listen "$HOST_IP:$B1" --quiet >/dev/null &
PIDS+=($!)
taskset -c "$LOAD_CPU" "$TANDEM_BIN" backend --name instance-2 --listen "$HOST_IP:$B2" --quiet >/dev/null &
PIDS+=($!)
taskset -c "$LOAD_CPU" iperf3 -s -B "$HOST_IP" -p "$IPERF_PORT" >"$WORK/iperf3-server.log" 2>&1 &
PIDS+=($!)
wait_listen "$B1"; wait_listen "$B2"; wait_listen "$IPERF_PORT"

# --- the proxies under test --------------------------------------------------------------
# haproxy_config NAME BACKENDS...: mode tcp, round robin over BACKENDS.
haproxy_config() {
  local name=$1 i=0; shift
  {
    echo "global"
    echo "  nbthread 1"
    echo "  maxconn 4000"
    echo "defaults"
    echo "  mode tcp"
    echo "  timeout connect 2s"
    echo "  timeout client 60s"
    echo "  timeout server 60s"
    [ "$name" != haproxy-splice ] || echo "  option splice-auto"
    echo "listen outbound"
    echo "  bind 0.0.0.0:$OUTBOUND_PORT"
    echo "  balance roundrobin"
    for b in "$@"; do i=$((i + 1)); echo "  server s$i $b"; done
  } > "$WORK/$name-$#.cfg"
  echo "$WORK/$name-$#.cfg"
}

# start_proxy NAME LOAD: starts the proxy in the namespace, as UID 2102, on CPU 0;
# sets PROXY_PID.
start_proxy() {
  local name=$1 load=$2 backends log="$WORK/$1-$2.log"
  case $load in
    conn) backends=("$HOST_IP:$B1" "$HOST_IP:$B2") ;;
    *) backends=("$HOST_IP:$IPERF_PORT") ;;
  esac
  local as_proxy=(setpriv --reuid "$PROXY_UID" --regid "$PROXY_UID" --clear-groups)
  case $name in
    tandem)
      taskset -c "$PROXY_CPU" ip netns exec "$NS" "${as_proxy[@]}" "$PROXY_BIN" \
        --outbound-listen "0.0.0.0:$OUTBOUND_PORT" --admin 127.0.0.1:4191 \
        --backends "$(IFS=,; echo "${backends[*]}")" \
        --opaque-ports "$CONN_SERVICE_PORT,$STREAM_SERVICE_PORT" --threads 1 --shutdown-grace 1s \
        >/dev/null 2>>"$log" &
      ;;
    haproxy*)
      local cfg
      cfg=$(haproxy_config "$name" "${backends[@]}")
      taskset -c "$PROXY_CPU" ip netns exec "$NS" "${as_proxy[@]}" haproxy -db -f "$cfg" >/dev/null 2>>"$log" &
      ;;
  esac
  PROXY_PID=$!
  wait_listen ns "$OUTBOUND_PORT"
}

stop_proxy() {
  kill "$PROXY_PID" 2>/dev/null || true
  wait "$PROXY_PID" 2>/dev/null || true
  PROXY_PID=""
  # The next proxy binds the same port.
  for _ in $(seq 1 100); do
    [ -z "$(in_ns ss -Hltn "sport = :$OUTBOUND_PORT")" ] && return 0
    sleep 0.05
  done
}

to_ms() { # wrk prints 512.00us / 1.23ms / 1.01s
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}

# Every load is bounded: its own duration, and `timeout` in case it hangs.
wrk_run() { # SECONDS OUT
  timeout $(($1 + 30)) taskset -c "$LOAD_CPU" ip netns exec "$NS" wrk -t1 -c"$CONNECTIONS" -d"$1s" --latency \
    -H "Connection: close" "http://$SERVICE_IP:$CONN_SERVICE_PORT/" >"$2"
}
iperf_run() { # SECONDS STREAMS OUT
  timeout $(($1 + 30)) taskset -c "$LOAD_CPU" ip netns exec "$NS" iperf3 -c "$SERVICE_IP" -p "$STREAM_SERVICE_PORT" \
    -t "$1" -P "$2" -J >"$3"
}

# run_load LOAD → "units rate p50_ms p99_ms errors": units are connections (conn) or
# bytes (stream*), rate connections/s or Gbit/s.
run_load() {
  local out="$WORK/load.out"
  case $1 in
    conn)
      wrk_run "$DURATION" "$out" || echo "wrk failed" >&2
      local reqs rps p50 p99 errors
      reqs=$(awk '/requests in/ { print $1 }' "$out")
      rps=$(awk '/Requests\/sec/ { print $2 }' "$out")
      p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
      p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
      errors=$(awk '/Socket errors/ { gsub(",", ""); n = $4 + $6 + $8 + $10 } /Non-2xx/ { n += $NF } END { print n + 0 }' "$out")
      echo "${reqs:-0} ${rps:-0} ${p50:-0} ${p99:-0} ${errors:-0}"
      ;;
    stream*)
      iperf_run "$DURATION" "${1#stream}" "$out" || true
      python3 - "$out" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
    s = r["end"]["sum_received"]
    print(s["bytes"], s["bits_per_second"] / 1e9, 0, 0, 0)
except Exception as e:
    print(f"iperf3 failed: {e}", file=sys.stderr)
    print(0, 0, 0, 0, 1)
EOF
      ;;
  esac
}

warm_up() {
  case $1 in
    conn) wrk_run "$WARMUP" /dev/null || true ;;
    stream*) iperf_run "$WARMUP" "${1#stream}" /dev/null || true ;;
  esac
}

# --- measuring ---------------------------------------------------------------------------
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
for round in $(seq "$ROUNDS"); do
for load in $MODES; do
  for p in $PROXIES; do
    start_proxy "$p" "$load"
    warm_up "$load"
    before=$(cpu_ticks "$PROXY_PID"); proxy_core_before=$(core_ticks "$PROXY_CPU"); load_core_before=$(core_ticks "$LOAD_CPU")
    read -r units rate p50 p99 errors < <(run_load "$load")
    after=$(cpu_ticks "$PROXY_PID"); proxy_core_after=$(core_ticks "$PROXY_CPU"); load_core_after=$(core_ticks "$LOAD_CPU")
    peak=$(rss_kib "$PROXY_PID" VmHWM)
    stop_proxy
    case $load in
      conn) cpu=$(us_per_request "$before" "$after" "$units") ;;                      # µs per connection
      *) cpu=$(awk -v b="$before" -v a="$after" -v u="$units" -v hz="$CLK_TCK" \
           'BEGIN { printf "%.1f", (a - b) / hz * 1e3 / (u > 0 ? u / 1e9 : 1) }') ;;  # ms per GB
    esac
    proxy_busy=$(busy_pct "$proxy_core_before" "$proxy_core_after")
    load_busy=$(busy_pct "$load_core_before" "$load_core_after")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$load" "$p" "$rate" "$p50" "$p99" "$cpu" "$proxy_busy" "$load_busy" "$errors" "$peak" "$units" >> "$RESULTS"
    echo "done: round $round/$ROUNDS $load $p ($rate $([ "$load" = conn ] && echo conn/s || echo Gbit/s), CPU $cpu $([ "$load" = conn ] && echo µs/conn || echo ms/GB))" >&2
  done
done
done

# --- report ------------------------------------------------------------------------------
# median LOAD PROXY COLUMN (1-based, of results.tsv)
median() {
  awk -F'\t' -v m="$1" -v p="$2" -v c="$3" '$1 == m && $2 == p { print $c }' "$RESULTS" | sort -g |
    awk '{ v[NR] = $1 } END { print (NR == 0 ? 0 : NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
total() { awk -F'\t' -v m="$1" -v p="$2" -v c="$3" '$1 == m && $2 == p { t += $c } END { print t + 0 }' "$RESULTS"; }
highest() { awk -F'\t' -v m="$1" -v p="$2" -v c="$3" '$1 == m && $2 == p && $c > x { x = $c } END { print x + 0 }' "$RESULTS"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "–" }'; }
series() { awk -F'\t' -v m="$1" -v p="$2" -v c="$3" -v f="$4" '$1 == m && $2 == p { printf "%s" f, sep, $c; sep = "," }' "$RESULTS"; }

report() {
  echo "# tandem-proxy vs HAProxy: opaque TCP through the outbound listener"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M') UTC, $(nproc) CPUs ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), kernel $(uname -r);"
  echo "proxy in a network namespace as UID $PROXY_UID behind \`tandem-proxy init\`'s nat rules, pinned to CPU $PROXY_CPU with 1 thread;"
  echo "load (in the namespace) and backends (host side of a veth) on CPU $LOAD_CPU; ${DURATION}s per run after ${WARMUP}s of warm-up;"
  echo "medians of $ROUNDS interleaved rounds (peak RSS: the highest)."
  echo "$(haproxy -v | head -1 | cut -d' ' -f1-3) (mode tcp$(case " $PROXIES " in *" haproxy-splice "*) echo "; haproxy-splice: option splice-auto";; esac)), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $(iperf3 -v | head -1 | cut -d' ' -f1-2), $("$PROXY_BIN" --version) ($(git describe --always --dirty 2>/dev/null || echo '?'))."
  echo
  if [[ " $MODES " == *" conn "* ]]; then
    echo "Short connections: wrk, $CONNECTIONS connections, \`Connection: close\` (one connection per request), to an opaque port, two backends balanced per connection."
    echo
    echo "| proxy | conn/s | ×HAProxy | p50 ms | p99 ms | CPU µs/conn | ×HAProxy | proxy core busy | load core busy | socket errors (all rounds) | peak RSS MiB |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    local hr hc
    hr=$(median conn haproxy 3); hc=$(median conn haproxy 6)
    for p in $PROXIES; do
      local r c
      r=$(median conn "$p" 3); c=$(median conn "$p" 6)
      printf '| %s | %.0f | %s | %.3f | %.3f | %.2f | %s | %s%% | %s%% | %s | %.1f |\n' "$p" "$r" "$(ratio "$r" "$hr")" \
        "$(median conn "$p" 4)" "$(median conn "$p" 5)" "$c" "$(ratio "$c" "$hc")" \
        "$(median conn "$p" 7)" "$(median conn "$p" 8)" "$(total conn "$p" 9)" "$(awk -v k="$(highest conn "$p" 10)" 'BEGIN { print k / 1024 }')"
    done
    echo
  fi
  local streams=()
  for load in $MODES; do [[ $load == stream* ]] && streams+=("$load"); done
  if [ ${#streams[@]} -gt 0 ]; then
    echo "Throughput: iperf3 -c, client to server, one backend (iperf3's control and data connections must reach the same server)."
    echo
    echo "| load | proxy | Gbit/s | ×HAProxy | CPU ms/GB | ×HAProxy | proxy core busy | load core busy | failed runs | peak RSS MiB |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for load in "${streams[@]}"; do
      local hr hc
      hr=$(median "$load" haproxy 3); hc=$(median "$load" haproxy 6)
      for p in $PROXIES; do
        local r c
        r=$(median "$load" "$p" 3); c=$(median "$load" "$p" 6)
        printf '| %s | %s | %.2f | %s | %.1f | %s | %s%% | %s%% | %s | %.1f |\n' "iperf3 -P ${load#stream}" "$p" "$r" "$(ratio "$r" "$hr")" \
          "$c" "$(ratio "$c" "$hc")" "$(median "$load" "$p" 7)" "$(median "$load" "$p" 8)" "$(total "$load" "$p" 9)" \
          "$(awk -v k="$(highest "$load" "$p" 10)" 'BEGIN { print k / 1024 }')"
      done
    done
    echo
  fi
  if [ "$ROUNDS" -gt 1 ]; then
    echo "Each round ($(echo "$PROXIES" | sed 's/ / \/ /g')): rate, then CPU per unit:"
    echo
    for load in $MODES; do
      printf -- '- %s:' "$load"
      local sep=""
      for p in $PROXIES; do printf '%s %s' "$sep" "$(series "$load" "$p" 3 '%.4g')"; sep=" /"; done
      printf ';'
      sep=""
      for p in $PROXIES; do printf '%s %s' "$sep" "$(series "$load" "$p" 6 '%s')"; sep=" /"; done
      echo
    done
  fi
}
mkdir -p bench/results
OUT="bench/results/tcp-$(date -u +%Y%m%d-%H%M%S).md"
report | tee "$OUT"
echo >&2
echo "written to $OUT" >&2
