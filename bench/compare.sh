#!/usr/bin/env bash
# Compares tandem-proxy with HAProxy and nginx on this machine, on loopback.
#
#   bench/compare.sh            # 10 s per run
#   DURATION=30 bench/compare.sh
#   MODES="h1 h2c" bench/compare.sh   # only these loads (h1, h1-h2up, h2c, h2c-h1up,
#                                     # h2tls, h1-capped, h2c-capped, h2tls-capped)
#   ROUNDS=1 bench/compare.sh          # one round instead of three
#   CAP_PERCENT=60 bench/compare.sh    # the capped loads' share of the proxy's core
#   TANDEM_H2_UPSTREAM=http1 bench/compare.sh   # Tandem's upstream protocol for the
#                                                # HTTP/2 loads (default http2)
#
# Two `tandem backend` instances and the load generators run on CPU 1; the proxy
# under test runs alone on CPU 0 with one thread/worker, so every proxy gets the
# same single core. Every proxy balances round robin over the same two backends
# (which speak HTTP/1.1 and h2c), each in its best configuration: for HTTP/1.1 loads
# all three speak HTTP/1.1 upstream; for HTTP/2 loads Tandem (`--backend-protocol
# http2`) and HAProxy (`proto h2`) multiplex HTTP/2 upstream; nginx can only speak
# HTTP/1.1 upstream.
# Loads: wrk (HTTP/1.1 keep-alive, 64 connections), h2load (h2c, and h2 over TLS;
# 64 connections, 10 streams each). "h1-h2up" is the HTTP/1.1 load with HTTP/2 to
# the backends where a proxy can (Tandem `--backend-protocol http2`, as it speaks to
# other proxies in a mesh; HAProxy `proto h2`; nginx cannot, so HTTP/1.1): the
# backends multiplex, costing the load core less per request. "h2c-h1up" is the h2c
# load with HTTP/1.1 to the backends for every proxy: each stream in flight then
# needs a backend connection of its own, which is what sets a proxy's memory.
# Reported: requests/s, p50/p99 latency, proxy
# CPU per request (from /proc/PID/stat), how busy each core was during the run
# (/proc/stat: when the load core is near 100%, the load, not the proxy, sets the
# requests/s), the CPU the two backends spent per request (their share of the load
# core, which the proxy's way of using upstream connections changes), peak RSS
# (VmHWM) and idle RSS, and each figure's ratio to HAProxy's. Before the loads, on
# fresh processes, the memory one more connection costs: an idle keep-alive client
# connection (1,000 of them, after one request each) and a pooled backend connection
# (400 requests at once to a slow path, then the clients gone, the backend
# connections kept for reuse): the RSS they add, divided by their number.
# The "-capped" loads are the same loads with each proxy held to CAP_PERCENT (50) of
# its core by a cgroup CFS quota (10 ms periods): on two CPUs the load core saturates
# at about the rate one proxy on a whole core serves, so the full-core loads can hide
# what a proxy's CPU per request is worth; capped, the load core keeps headroom and
# the proxy sets the rate. Throttling adds up to a period's wait to some requests, so
# read their p99 as the quota's, not the proxy's.
# The runs are interleaved in ROUNDS rounds (every load through every proxy, then
# again), and each figure is the median over the rounds (peak RSS: the highest): on a
# shared virtual machine one run of the same binary can differ from the next by 20%,
# and interleaving spreads that over all three proxies.
# Results are printed and written to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh

DURATION=${DURATION:-10}
MODES=${MODES:-h1 h1-h2up h2c h2c-h1up h2tls h1-capped h2c-capped h2tls-capped}
CAP_PERCENT=${CAP_PERCENT:-50}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
TANDEM_H2_UPSTREAM=${TANDEM_H2_UPSTREAM:-http2}

need() {
  local missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v h2load >/dev/null || missing+=(nghttp2-client)
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v nginx >/dev/null || missing+=(nginx-light)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v taskset >/dev/null || missing+=(util-linux)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
  fi
}
need
[ "$(nproc)" -ge 2 ] || { echo "needs at least 2 CPUs (proxy on one, load on the other)" >&2; exit 1; }

build_release
TARGET=${CARGO_TARGET_DIR:-target}
PROXY_BIN=$TARGET/release/tandem-proxy
TANDEM_BIN=$TARGET/release/tandem

bench_workdir tandem-bench
case " $MODES " in *-capped*) cpu_cap_init "$CAP_PERCENT" ;; esac


# --- backends ------------------------------------------------------------------------
B1=$(free_port); B2=$(free_port)
taskset -c "$LOAD_CPU" "$TANDEM_BIN" backend --name instance-1 --listen "127.0.0.1:$B1" --quiet >/dev/null &
PIDS+=($!)
taskset -c "$LOAD_CPU" "$TANDEM_BIN" backend --name instance-2 --listen "127.0.0.1:$B2" --quiet >/dev/null &
PIDS+=($!)
BACKEND_PIDS=("${PIDS[@]}")
wait_port "$B1"; wait_port "$B2"

openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
  -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" > "$WORK/combined.pem"

# --- the proxies under test ------------------------------------------------------------
declare -A PLAIN TLS H2C H1H2 H2H1 PID_OF TLS_PID_OF H1H2_PID_OF H2H1_PID_OF

# Tandem: one process per upstream protocol (HTTP/1.1 for the HTTP/1.1 load, HTTP/2
# for the h2c load), and one terminating TLS.
declare -A H2C_PID_OF
PLAIN[tandem]=$(free_port); H2C[tandem]=$(free_port); TLS[tandem]=$(free_port)
taskset -c "$PROXY_CPU" "$PROXY_BIN" --backends "127.0.0.1:$B1,127.0.0.1:$B2" \
  --threads 1 --listen "127.0.0.1:${PLAIN[tandem]}" --admin 127.0.0.1:0 >/dev/null 2>"$WORK/tandem.log" &
PID_OF[tandem]=$!; PIDS+=($!)
taskset -c "$PROXY_CPU" "$PROXY_BIN" --backends "127.0.0.1:$B1,127.0.0.1:$B2" --backend-protocol "$TANDEM_H2_UPSTREAM" \
  --threads 1 --listen "127.0.0.1:${H2C[tandem]}" --admin 127.0.0.1:0 >/dev/null 2>"$WORK/tandem-h2c.log" &
H2C_PID_OF[tandem]=$!; PIDS+=($!)
# HTTP/1.1 clients with HTTP/2 upstream: the h2c process takes both; h2c clients
# with HTTP/1.1 upstream: the plain process takes both.
H1H2[tandem]=${H2C[tandem]}; H1H2_PID_OF[tandem]=${H2C_PID_OF[tandem]}
H2H1[tandem]=${PLAIN[tandem]}; H2H1_PID_OF[tandem]=${PID_OF[tandem]}
taskset -c "$PROXY_CPU" "$PROXY_BIN" --backends "127.0.0.1:$B1,127.0.0.1:$B2" --backend-protocol "$TANDEM_H2_UPSTREAM" \
  --threads 1 --listen "127.0.0.1:${TLS[tandem]}" --admin 127.0.0.1:0 \
  --tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem" >/dev/null 2>"$WORK/tandem-tls.log" &
TLS_PID_OF[tandem]=$!; PIDS+=($!)

PLAIN[haproxy]=$(free_port); H2C[haproxy]=$(free_port); TLS[haproxy]=$(free_port); H1H2[haproxy]=$(free_port); H2H1[haproxy]=$(free_port)
cat > "$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend fe_h1
  bind 127.0.0.1:${PLAIN[haproxy]}
  default_backend be_h1
frontend fe_h1h2
  bind 127.0.0.1:${H1H2[haproxy]}
  default_backend be_h2
frontend fe_h2h1
  bind 127.0.0.1:${H2H1[haproxy]} proto h2
  default_backend be_h1
frontend fe_h2
  bind 127.0.0.1:${H2C[haproxy]} proto h2
  bind 127.0.0.1:${TLS[haproxy]} ssl crt $WORK/combined.pem alpn h2,http/1.1
  default_backend be_h2
backend be_h1
  balance roundrobin
  server s1 127.0.0.1:$B1
  server s2 127.0.0.1:$B2
backend be_h2
  balance roundrobin
  server s1 127.0.0.1:$B1 proto h2
  server s2 127.0.0.1:$B2 proto h2
EOF
taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg" >/dev/null 2>"$WORK/haproxy.log" &
PID_OF[haproxy]=$!; H2C_PID_OF[haproxy]=$!; TLS_PID_OF[haproxy]=$!; H1H2_PID_OF[haproxy]=$!; H2H1_PID_OF[haproxy]=$!; PIDS+=($!)

PLAIN[nginx]=$(free_port); H2C[nginx]=$(free_port); TLS[nginx]=$(free_port)
mkdir -p "$WORK/nginx"
cat > "$WORK/nginx.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 8000; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  keepalive_requests 1000000;
  upstream be { server 127.0.0.1:$B1; server 127.0.0.1:$B2; keepalive 256; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:${PLAIN[nginx]};
    listen 127.0.0.1:${H2C[nginx]} http2;
    listen 127.0.0.1:${TLS[nginx]} ssl http2;
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
taskset -c "$PROXY_CPU" nginx -c "$WORK/nginx.conf" -p "$WORK/nginx" >/dev/null 2>"$WORK/nginx.log" &
PID_OF[nginx]=$!; H2C_PID_OF[nginx]=$!; TLS_PID_OF[nginx]=$!; PIDS+=($!)
H1H2[nginx]=${PLAIN[nginx]}; H1H2_PID_OF[nginx]=$!
H2H1[nginx]=${H2C[nginx]}; H2H1_PID_OF[nginx]=$!

for p in tandem haproxy nginx; do wait_port "${PLAIN[$p]}"; wait_port "${H2C[$p]}"; wait_port "${TLS[$p]}"; wait_port "${H1H2[$p]}"; wait_port "${H2H1[$p]}"; done

# --- measuring ---------------------------------------------------------------------------

# Idle RSS: after start-up and a handful of requests, before any load.
declare -A IDLE
for p in tandem haproxy nginx; do
  for _ in 1 2 3 4 5; do curl -s -o /dev/null "http://127.0.0.1:${PLAIN[$p]}/" || true; done
  IDLE[$p]=$(rss_kib "${PID_OF[$p]}" VmRSS)
done

# Memory per connection, on the fresh HTTP/1.1 processes: bytes of RSS one more idle
# client connection costs, and one more pooled backend connection.
IDLE_CLIENTS=${IDLE_CLIENTS:-1000}
POOLED=${POOLED:-400}
declare -A PER_CLIENT PER_POOLED
for p in tandem haproxy nginx; do
  pid=${PID_OF[$p]}
  before=$(rss_kib "$pid" VmRSS)
  coproc HOLD { python3 bench/conns.py idle "${PLAIN[$p]}" "$IDLE_CLIENTS"; }
  read -r _ready <&"${HOLD[0]}"
  after=$(rss_kib "$pid" VmRSS)
  eval "exec ${HOLD[1]}>&-"; wait "$HOLD_PID" 2>/dev/null || true
  PER_CLIENT[$p]=$(( (after - before) * 1024 / IDLE_CLIENTS ))
  before=$(rss_kib "$pid" VmRSS)
  python3 bench/conns.py concurrent "${PLAIN[$p]}" "$POOLED" /delay/500
  sleep 1  # the clients' closes reach the proxy (a measurement pause, not a synchronisation)
  after=$(rss_kib "$pid" VmRSS)
  PER_POOLED[$p]=$(( (after - before) * 1024 / POOLED ))
done

to_ms() { # wrk prints 512.00us / 1.23ms / 1.01s
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}

url_of() { if [ "$1" = h2tls ]; then echo "https://127.0.0.1:$2/"; else echo "http://127.0.0.1:$2/"; fi; }

# warm_up MODE PORT: a short run whose figures are not kept (pools, caches, allocator).
warm_up() {
  case $1 in
    h1*) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" "$(url_of "$1" "$2")" >/dev/null ;;
    *) taskset -c "$LOAD_CPU" h2load -t1 -c"$CONNECTIONS" -m10 -D"$WARMUP" "$(url_of "$1" "$2")" >/dev/null ;;
  esac
}

# run_load MODE PORT → prints "requests rps p50_ms p99_ms"
run_load() {
  local mode=$1 port=$2 out="$WORK/load.out"
  case $mode in
    h1*)
      taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:$port/" >"$out"
      local reqs rps p50 p99
      reqs=$(awk '/requests in/ { print $1 }' "$out")
      rps=$(awk '/Requests\/sec/ { print $2 }' "$out")
      p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
      p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
      echo "$reqs $rps $p50 $p99"
      ;;
    h2c|h2tls|h2c-h1up)
      local url
      url=$(url_of "$mode" "$port")
      # h2load appends to its log: without this, each run's percentiles would be
      # taken over every run before it too.
      rm -f "$WORK/h2.log"
      taskset -c "$LOAD_CPU" h2load -t1 -c"$CONNECTIONS" -m10 -D"$DURATION" --log-file="$WORK/h2.log" "$url" >"$out"
      local reqs rps
      reqs=$(awk '/^requests:/ { print $8 }' "$out")   # succeeded
      rps=$(awk '/^finished in/ { gsub(",", "", $4); print $4 }' "$out")
      # The log has one line per request: start, status, duration in microseconds.
      sort -n -k3 "$WORK/h2.log" | awk -v n="$(wc -l < "$WORK/h2.log")" '
        { d[NR] = $3 }
        END { p50 = d[int(n * 0.50) > 0 ? int(n * 0.50) : 1]; p99 = d[int(n * 0.99) > 0 ? int(n * 0.99) : 1];
              printf "%.3f %.3f\n", p50 / 1000, p99 / 1000 }' > "$WORK/pct"
      echo "$reqs $rps $(cat "$WORK/pct")"
      ;;
  esac
}

RESULTS="$WORK/results.tsv"
: > "$RESULTS"
for round in $(seq "$ROUNDS"); do
for mode in $MODES; do
  load=${mode%-capped}
  for p in tandem haproxy nginx; do
    case $load in h1) port=${PLAIN[$p]}; pid=${PID_OF[$p]};; h1-h2up) port=${H1H2[$p]}; pid=${H1H2_PID_OF[$p]};; h2c) port=${H2C[$p]}; pid=${H2C_PID_OF[$p]};; h2c-h1up) port=${H2H1[$p]}; pid=${H2H1_PID_OF[$p]};; h2tls) port=${TLS[$p]}; pid=${TLS_PID_OF[$p]};; esac
    [ "$load" = "$mode" ] || cpu_cap "$pid"
    warm_up "$load" "$port"
    before=$(cpu_ticks "$pid"); backends_before=$(cpu_ticks "${BACKEND_PIDS[@]}"); proxy_core_before=$(core_ticks "$PROXY_CPU"); load_core_before=$(core_ticks "$LOAD_CPU")
    read -r reqs rps p50 p99 < <(run_load "$load" "$port")
    after=$(cpu_ticks "$pid"); backends_after=$(cpu_ticks "${BACKEND_PIDS[@]}"); proxy_core_after=$(core_ticks "$PROXY_CPU"); load_core_after=$(core_ticks "$LOAD_CPU")
    [ "$load" = "$mode" ] || cpu_uncap "$pid"
    cpu_us=$(us_per_request "$before" "$after" "$reqs")
    backends_us=$(us_per_request "$backends_before" "$backends_after" "$reqs")
    peak=$(rss_kib "$pid" VmHWM)
    proxy_busy=$(busy_pct "$proxy_core_before" "$proxy_core_after")
    load_busy=$(busy_pct "$load_core_before" "$load_core_after")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$p" "$rps" "$p50" "$p99" "$cpu_us" "$peak" "$reqs" "$proxy_busy" "$load_busy" "$backends_us" >> "$RESULTS"
    echo "done: round $round/$ROUNDS $mode $p ($rps req/s)" >&2
  done
done
done

# --- report ------------------------------------------------------------------------------
# One row per (load, proxy), in the order first measured: the median of each figure
# over the rounds, the highest peak RSS.
median_rows() {
  for mode in $MODES; do
    for p in tandem haproxy nginx; do
      local row=("$mode" "$p")
      for col in 3 4 5 6 9 10 11; do
        row+=("$(awk -F'\t' -v m="$mode" -v p="$p" -v c="$col" '$1 == m && $2 == p { print $c }' "$RESULTS" | sort -g |
          awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }')")
      done
      row+=("$(awk -F'\t' -v m="$mode" -v p="$p" '$1 == m && $2 == p && $7 > max { max = $7 } END { print max }' "$RESULTS")")
      (IFS=$'\t'; echo "${row[*]}")
    done
  done
}
report() {
  echo "# tandem-proxy vs HAProxy and nginx"
  echo
  echo "$(date -u +%Y-%m-%d), $(nproc) CPUs ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)),"
  echo "proxy pinned to CPU $PROXY_CPU with 1 thread; backends and load on CPU $LOAD_CPU; ${DURATION}s per run, $CONNECTIONS connections;"
  echo "medians of $ROUNDS interleaved rounds (peak RSS: the highest); \"capped\": the proxy held to $CAP_PERCENT% of its core (CFS quota)."
  echo "$(haproxy -v | head -1 | cut -d' ' -f1-3), $(nginx -v 2>&1 | cut -d' ' -f3), $("$PROXY_BIN" --version);"
  echo "upstream for the HTTP/2 loads: Tandem $TANDEM_H2_UPSTREAM, HAProxy h2, nginx http1; for h1-h2up: Tandem $TANDEM_H2_UPSTREAM, HAProxy h2, nginx http1."
  echo
  echo "| load | proxy | req/s | ×HAProxy | p50 ms | p99 ms | CPU µs/req | ×HAProxy | proxy core busy | load core busy | backends CPU µs/req | peak RSS MiB | idle RSS MiB |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  median_rows | awk -F'\t' -v cap="$CAP_PERCENT" -v idle_t="${IDLE[tandem]}" -v idle_h="${IDLE[haproxy]}" -v idle_n="${IDLE[nginx]}" '
    { key = $1; rps[key, $2] = $3; cpu[key, $2] = $6; line[NR] = $0 }
    END {
      idle["tandem"] = idle_t; idle["haproxy"] = idle_h; idle["nginx"] = idle_n
      names["h1"] = "HTTP/1.1 (wrk)"; names["h2c"] = "h2c (h2load)"; names["h2tls"] = "h2 + TLS (h2load)"
      names["h1-h2up"] = "HTTP/1.1 (wrk), HTTP/2 upstream"
      names["h2c-h1up"] = "h2c (h2load), HTTP/1.1 upstream"
      split("h1 h2c h2tls", loads, " ")
      for (l in loads) names[loads[l] "-capped"] = names[loads[l]] ", capped at " cap "%"
      for (i = 1; i <= NR; i++) {
        split(line[i], f, "\t")
        hr = rps[f[1], "haproxy"]; hc = cpu[f[1], "haproxy"]
        printf "| %s | %s | %.0f | %.2f | %.3f | %.3f | %.2f | %.2f | %d%% | %d%% | %.2f | %.1f | %.1f |\n",
          names[f[1]], f[2], f[3], (hr > 0 ? f[3] / hr : 0), f[4], f[5], f[6], (hc > 0 ? f[6] / hc : 0),
          f[7], f[8], f[9], f[10] / 1024, idle[f[2]] / 1024
      }
    }'
  echo
  echo "Memory per connection (RSS added, fresh HTTP/1.1 processes): an idle keep-alive client connection ($IDLE_CLIENTS of them), a pooled backend connection ($POOLED requests at once, then the clients gone):"
  echo
  echo "| proxy | per idle client connection KiB | per pooled backend connection KiB |"
  echo "| --- | ---: | ---: |"
  for p in tandem haproxy nginx; do
    awk -v p="$p" -v c="${PER_CLIENT[$p]}" -v b="${PER_POOLED[$p]}" 'BEGIN { printf "| %s | %.1f | %.1f |\n", p, c / 1024, b / 1024 }'
  done
  if [ "$ROUNDS" -gt 1 ]; then
    echo
    echo "Requests/s of each round (tandem / haproxy / nginx):"
    echo
    for mode in $MODES; do
      printf -- '- %s:' "$mode"
      for p in tandem haproxy nginx; do
        printf ' %s' "$(awk -F'\t' -v m="$mode" -v p="$p" '$1 == m && $2 == p { printf "%s%.0f", sep, $3; sep = "," }' "$RESULTS")"
        [ "$p" = nginx ] || printf ' /'
      done
      echo
    done
  fi
}
mkdir -p bench/results
OUT="bench/results/$(date -u +%Y%m%d-%H%M%S).md"
report | tee "$OUT"
echo >&2
echo "written to $OUT" >&2
