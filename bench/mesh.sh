#!/usr/bin/env bash
# The mesh hop (issue 26, "Performance"): load -> client proxy -> mutual TLS -> server
# proxy -> backend, Tandem's pair against an HAProxy pair doing the same mutual TLS,
# the same Tandem pair in plaintext, the cost of a fresh and of a resumed mTLS
# handshake, and the rate of certificates the issuer sustains.
#
#   bench/mesh.sh                         # 3 interleaved rounds of 10 s, then handshakes
#                                         # and Certify
#   DURATION=30 ROUNDS=5 bench/mesh.sh
#   PAIRS="tandem-mtls haproxy-mtls" bench/mesh.sh   # some pairs only (default: tandem-mtls
#                                         # haproxy-mtls haproxy-mtls-h1 tandem-plain)
#   HANDSHAKE_SECONDS=0 CERTIFY_REQUESTS=0 bench/mesh.sh   # the pairs only
#   BUILD=0 bench/mesh.sh                 # the binaries in target/release as they are
#   CALLGRIND=1 bench/mesh.sh             # instructions per request of each Tandem proxy
#   CALLGRIND=1 PROXIES="OLD NEW" bench/mesh.sh   # of several proxy binaries, side by side
#
# Needs root (a network namespace, nat rules), 2 CPUs, the tests' Kubernetes control
# plane (scripts/cluster.sh: etcd, kube-apiserver, kube-controller-manager, built once
# from Go modules into ~/.cache/tandem-tools, about 11 minutes the first time), and
# installs what it lacks with apt-get (wrk, h2load, HAProxy, openssl, iptables, curl).
#
# Everything Tandem's pair runs on is real: the script brings up the cluster control
# plane (`scripts/cluster.sh up --dir <tmp> --watch-pid <this script>`, taken down at
# exit), creates ServiceAccounts bench-client and bench-server in namespace default and
# a token for each from the API server's TokenRequest (`kubectl create token --audience
# tandem`), and starts two control planes on the host:
# - the issuer: `tandem control-plane --source kubernetes --identity-listen
#   10.78.0.1:0 --identity-cert-san 10.78.0.1 --namespace default`; it makes its root
#   and issuer (Secret tandem-identity-issuer) and the trust roots (ConfigMap
#   tandem-trust-roots), which the script hands the proxies as a file, as injection
#   would mount it. Each proxy makes its key in memory, sends a CSR and its token to
#   Certify, the control plane checks the token with a real TokenReview and signs.
# - discovery: `tandem control-plane --source file:services.yaml`, with the service
#   `bench-server` (one endpoint, 10.78.0.2:8080, identity
#   spiffe://cluster.local/ns/default/sa/bench-server) and `bench-server-plain` (the
#   same endpoint without an identity).
#
# The server side is a pod: a network namespace joined to the host by a veth pair
# (host 10.78.0.1/30, inside 10.78.0.2/30) with `tandem-proxy init`'s nat rules
# (inbound TCP redirected to 4143, except port 8443, left to HAProxy), the backend
# `tandem backend --listen 127.0.0.1:8080` on the pod's loopback, and the server proxy
# as UID 2102. The client proxy runs on the host (as UID 2102 too), listens on
# loopback and is where wrk sends its requests; its upstream is the pod's address.
#
# Pairs (each run starts its pair afresh and stops it after):
# - tandem-mtls: client `tandem-proxy --listen 127.0.0.1:P --control-plane ...
#   --identity-address 10.78.0.1:I --identity .../sa/bench-client ...`, requests with
#   `Host: bench-server`; it speaks HTTP/2 inside TLS 1.3 to the endpoint (one pooled
#   connection, checked: the server's certificate must name .../sa/bench-server); in
#   the pod the nat rules send it to the server proxy's `--inbound-listen
#   0.0.0.0:4143` (identity .../sa/bench-server), which requires the client's
#   certificate, terminates, and forwards HTTP/1.1 to 127.0.0.1:8080.
# - haproxy-mtls: client HAProxy on the host (`bind 127.0.0.1:P`, `server s1
#   10.78.0.2:8443 ssl crt client.pem ca-file ca.pem verify required verifyhost
#   bench-server alpn h2`, `http-reuse always`), server HAProxy in the pod (`bind :8443
#   ssl crt server.pem ca-file ca.pem verify required alpn h2,http/1.1`) to
#   127.0.0.1:8080. Certificates from openssl: a CA, EC P-256 leaves. Both TLS 1.3 only
#   (`ssl-min-ver TLSv1.3`), as Tandem's mesh is. HTTP/2 on the hop, multiplexed.
# - haproxy-mtls-h1: the same without `alpn h2` on the client's server line: HTTP/1.1
#   keep-alive on the hop, a TLS connection per concurrent request. The ratios and
#   targets are against whichever of the two HAProxy pairs spent less CPU per request
#   in the run (its best configuration); the report says which.
# - tandem-plain: the same Tandem pair with no --identity* flags, `Host:
#   bench-server-plain` (no identity in discovery): plaintext between the proxies, and
#   then, as Tandem does without mTLS, HTTP/1.1 keep-alive on the hop (a pool of up to
#   one connection per concurrent request), not HTTP/2.
# Every proxy has one thread (Tandem `--threads 1`, HAProxy `nbthread 1`); both proxies
# of a pair share CPU 0 (taskset); wrk (64 connections, HTTP/1.1 keep-alive, one
# thread) and the backend share CPU 1. The control planes and the cluster run
# unpinned and are idle during the runs (the same for every pair).
#
# Reported per pair: requests/s; p50 and p99 latency (wrk's); CPU per request of the
# pair (both proxies' user + system time from /proc/PID/stat, summed) and of each
# proxy, and how much of the pair's was system time (the kernel's TCP and veth
# work); how busy each core was (/proc/stat); peak RSS of each proxy under load
# (VmHWM); the mesh hop's TCP connections at the end of the run and, for Tandem, the
# mTLS handshakes the pair made (tandem_proxy_mesh_tls_handshakes_total, both sides)
# and the inbound connections by transport (checked: mtls from .../sa/bench-client
# for tandem-mtls, plaintext for tandem-plain, else the run is marked); requests/s
# and CPU per request of tandem-mtls against tandem-plain: the price of mTLS.
# Medians of ROUNDS interleaved rounds (every pair once per round), 2 s of warm-up
# before each run; peak RSS is the highest over the rounds.
#
# Handshakes (HANDSHAKE_SECONDS per kind, default 5): Tandem's client proxy pools its
# connection (one handshake per run), so handshakes are measured at the server proxy
# of each pair, the side that pays for every client that connects: one Python ssl
# client on CPU 1, a connection at a time for HANDSHAKE_SECONDS, each a TCP connect
# and a TLS 1.3 handshake with a client certificate, then waiting for what the server
# sends after it (its session tickets; Tandem's HTTP/2 SETTINGS too) and closing.
# "fresh": no session offered (a full handshake: ECDHE, the server's certificate and
# signature, the client's certificate checked); "resumed": the session from the
# previous connection offered (PSK with ECDHE; checked with session_reused). Reported:
# handshakes/s of that one client, its p50 handshake time, and the server proxy's CPU
# per handshake. For Tandem the client offers ALPN tandem.io/h2 to the pod's port
# 8080 (redirected to the inbound listener, which terminates only mesh TLS) with a
# certificate for .../sa/bench-client signed by the mesh's issuer, its key read from
# the Secret tandem-identity-issuer as an operator could (Tandem's proxies never
# write their keys, so this is the only way a test client gets a mesh certificate);
# for HAProxy, the client certificate of its CA to port 8443. openssl s_time is not
# used: it cannot offer an ALPN.
#
# Certify (CERTIFY_REQUESTS, default 5000, CERTIFY_CONCURRENCY at once, default 16):
# h2load on CPU 1 sends CertifyRequests (gRPC over HTTP/2 over TLS, one body: the
# bench-client identity, its token and a P-256 CSR made with openssl) to the issuer's
# identity endpoint; each is a TokenReview to the API server and a signature.
# Reported: certificates/s, mean time per call, certificates issued and refused (the
# control plane's counters, so a failed call is not counted as a certificate), the
# control plane's and the API server's CPU per certificate, the mean signing time
# (tandem_control_plane_certificate_signing_seconds). The control plane and the
# cluster are not pinned (both cores); the first 100 calls warm up. Every call carries
# the same token, as a proxy's renewals do: the API server may answer its
# TokenReviews from its token cache.
#
# CALLGRIND=1: instead of the rounds, handshakes and Certify, each Tandem pair (of
# PAIRS) runs both its proxies under callgrind while h2load (HTTP/1.1, 64 connections,
# CALLGRIND_REQUESTS requests, default 20000) sends through it; reported: instructions
# per request of the client proxy, the server proxy and the pair (start-up and
# shutdown included). Counted instructions do not move with what else the machine
# does, so two builds compare on a busy machine where times cannot; PROXIES names the
# proxy binaries to compare (default: the one built); CALLGRIND_KEEP=DIR keeps the
# profiles (PAIR-BINARY-client.out, PAIR-BINARY-server.out).
#
# The Tandem proxies' log lines at WARN or ERROR, over every run, are counted in the
# report (and the first few printed on stderr).
#
# Targets (issue 26): the pair's CPU per request at most 0.8x HAProxy's pair's, p99 no
# worse than HAProxy's, peak RSS per proxy at most 20 MiB. Results are printed and
# written to bench/results/mesh-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
PAIRS=${PAIRS:-tandem-mtls haproxy-mtls haproxy-mtls-h1 tandem-plain}
CONNECTIONS=${CONNECTIONS:-64}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
BUILD=${BUILD:-1}
HANDSHAKE_SECONDS=${HANDSHAKE_SECONDS:-5}
CALLGRIND=${CALLGRIND:-0}
CALLGRIND_REQUESTS=${CALLGRIND_REQUESTS:-20000}
CERTIFY_REQUESTS=${CERTIFY_REQUESTS:-5000}
CERTIFY_CONCURRENCY=${CERTIFY_CONCURRENCY:-16}

PROXY_UID=2102
HOST_IP=10.78.0.1
NS_IP=10.78.0.2
APP_PORT=8080
HAPROXY_PORT=8443
INBOUND_PORT=4143
NS_ADMIN_PORT=4191
TRUST_DOMAIN=cluster.local
CLIENT_ID=spiffe://$TRUST_DOMAIN/ns/default/sa/bench-client
SERVER_ID=spiffe://$TRUST_DOMAIN/ns/default/sa/bench-server
NS=tandem-mesh-bench-$$
VETH_HOST=tmb$$h
VETH_NS=tmb$$n

[ "$(id -u)" = 0 ] || { echo "needs root: a network namespace and nat rules" >&2; exit 1; }
for p in $PAIRS; do
  case $p in tandem-mtls|tandem-plain|haproxy-mtls|haproxy-mtls-h1) ;;
    *) echo "PAIRS: unknown pair $p (tandem-mtls tandem-plain haproxy-mtls haproxy-mtls-h1)" >&2; exit 1 ;; esac
done

need() {
  local missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v h2load >/dev/null || missing+=(nghttp2-client)
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v curl >/dev/null || missing+=(curl)
  command -v python3 >/dev/null || missing+=(python3)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v ss >/dev/null || missing+=(iproute2)
  command -v taskset >/dev/null || missing+=(util-linux)
  command -v setpriv >/dev/null || missing+=(util-linux)
  [ "$CALLGRIND" = 0 ] || command -v valgrind >/dev/null || missing+=(valgrind)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
  fi
}
need
[ "$(nproc)" -ge 2 ] || { echo "needs at least 2 CPUs (proxies on one, load on the other)" >&2; exit 1; }

[ "$BUILD" = 0 ] || build_release
TARGET=${CARGO_TARGET_DIR:-target}
# What the binaries are: built now from this tree, or (BUILD=0) whenever they were.
BUILT="$(date -u -r "$TARGET/release/tandem-proxy" '+%Y-%m-%d %H:%M UTC'), tree $(git describe --always --dirty 2>/dev/null || echo '?') at start"

bench_workdir tandem-mesh-bench
CLUSTER_DIR=$WORK/cluster
CLUSTER_UP=0
CLIENT_PID=""
SERVER_PID=""
mesh_cleanup() {
  for pid in $CLIENT_PID $SERVER_PID; do kill "$pid" 2>/dev/null || true; done
  for pid in $CLIENT_PID $SERVER_PID; do wait "$pid" 2>/dev/null || true; done
  # The control planes and the backend (PIDS) before the cluster they talk to.
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
  [ "$CLUSTER_UP" = 0 ] || scripts/cluster.sh down --dir "$CLUSTER_DIR" >/dev/null 2>&1 || true
  ip netns del "$NS" 2>/dev/null || true
  ip link del "$VETH_HOST" 2>/dev/null || true
  bench_cleanup
}
trap mesh_cleanup EXIT
trap 'exit 130' INT TERM

# The binaries, where UID 2102 can run them, and fixed for the whole run.
chmod 755 "$WORK"
mkdir -p "$WORK/bin" "$WORK/secrets"
cp "$TARGET/release/tandem-proxy" "$TARGET/release/tandem" "$WORK/bin/"
PROXY_BIN=$WORK/bin/tandem-proxy
# What runs each Tandem proxy: nothing, or callgrind (CALLGRIND=1).
PROXY_WRAP=()
READY_SECONDS=20
TANDEM_BIN=$WORK/bin/tandem
# Keys and tokens: readable by the proxies' UID only.
chown "$PROXY_UID:$PROXY_UID" "$WORK/secrets"; chmod 700 "$WORK/secrets"
SECRETS=$WORK/secrets
AS_PROXY=(setpriv --reuid "$PROXY_UID" --regid "$PROXY_UID" --clear-groups)

in_ns() { ip netns exec "$NS" "$@"; }

# wait_listen [ns] PORT: until something listens on PORT (TCP), here or in the namespace.
wait_listen() {
  local run=() port=$1
  if [ "$1" = ns ]; then run=(ip netns exec "$NS"); port=$2; fi
  for _ in $(seq 1 200); do
    [ -n "$("${run[@]}" ss -Hltn "sport = :$port")" ] && return 0
    sleep 0.05
  done
  echo "nothing listens on port $port${run:+ in the namespace}" >&2; return 1
}

# wait_free [ns] PORT: until nothing listens on PORT.
wait_free() {
  local run=() port=$1
  if [ "$1" = ns ]; then run=(ip netns exec "$NS"); port=$2; fi
  for _ in $(seq 1 100); do
    [ -z "$("${run[@]}" ss -Hltn "sport = :$port")" ] && return 0
    sleep 0.05
  done
}

# wait_ready [ns] URL [SECONDS]: until URL answers 2xx (a proxy's or control plane's /ready).
wait_ready() {
  local run=()
  if [ "$1" = ns ]; then run=(ip netns exec "$NS"); shift; fi
  local url=$1 tries=$(( ${2:-20} * 20 ))
  for _ in $(seq 1 "$tries"); do
    "${run[@]}" curl -sf -o /dev/null --max-time 1 "$url" && return 0
    sleep 0.05
  done
  echo "not ready within ${2:-20}s: $url ($("${run[@]}" curl -s --max-time 1 "$url" || true))" >&2; return 1
}

# announced FILE NAME: the address a server announced on stdout as NAME.
announced() {
  for _ in $(seq 1 400); do
    local addr
    addr=$(python3 - "$1" "$2" <<'EOF' 2>/dev/null || true
import json, sys
for line in open(sys.argv[1]):
    try:
        print(json.loads(line)["listening"][sys.argv[2]]); break
    except Exception:
        pass
EOF
)
    [ -n "$addr" ] && { echo "$addr"; return 0; }
    sleep 0.05
  done
  echo "nothing announced as $2 in $1" >&2; return 1
}

# sum_series NAME [MATCH]: reads Prometheus text on stdin; the sum of the samples of
# NAME (with or without labels) whose line contains MATCH.
sum_series() {
  awk -v n="$1" -v m="${2:-}" '$1 !~ /^#/ && (index($1, n "{") == 1 || $1 == n) && index($0, m) > 0 { t += $NF } END { printf "%.0f\n", t }'
}
sum_series_f() {
  awk -v n="$1" '$1 !~ /^#/ && (index($1, n "{") == 1 || $1 == n) { t += $NF } END { printf "%.6f\n", t }'
}

# --- the pod: a network namespace, its nat rules, the backend --------------------------
ip netns add "$NS"
ip link add "$VETH_HOST" type veth peer name "$VETH_NS"
ip link set "$VETH_NS" netns "$NS"
ip addr add "$HOST_IP/30" dev "$VETH_HOST"
ip link set "$VETH_HOST" up
in_ns ip link set lo up
in_ns ip addr add "$NS_IP/30" dev "$VETH_NS"
in_ns ip link set "$VETH_NS" up
in_ns ip route add default via "$HOST_IP"
in_ns "$PROXY_BIN" init --inbound-port "$INBOUND_PORT" --admin-port "$NS_ADMIN_PORT" \
  --proxy-uid "$PROXY_UID" --skip-inbound-ports "$HAPROXY_PORT" --ipv6 off >"$WORK/init.log" 2>&1 ||
  { cat "$WORK/init.log" >&2; exit 1; }

taskset -c "$LOAD_CPU" ip netns exec "$NS" "$TANDEM_BIN" backend --name backend \
  --listen "127.0.0.1:$APP_PORT" --quiet >/dev/null 2>"$WORK/backend.log" &
PIDS+=($!)
wait_listen ns "$APP_PORT"

# --- the cluster, the ServiceAccounts, their tokens --------------------------------------
echo "starting the cluster control plane (scripts/cluster.sh up)" >&2
CLUSTER_UP=1
scripts/cluster.sh up --dir "$CLUSTER_DIR" --watch-pid $$ >&2
eval "$(scripts/cluster.sh env --dir "$CLUSTER_DIR")"
KC=$CLUSTER_DIR/admin.kubeconfig
kc() { kubectl --kubeconfig "$KC" -n default "$@"; }
kc create serviceaccount bench-client >/dev/null
kc create serviceaccount bench-server >/dev/null
for sa in bench-client bench-server; do
  kc create token "$sa" --audience tandem --duration 1h > "$SECRETS/$sa.token"
done
chown "$PROXY_UID:$PROXY_UID" "$SECRETS"/*.token; chmod 600 "$SECRETS"/*.token

# --- the control planes --------------------------------------------------------------------
"$TANDEM_BIN" control-plane --source kubernetes --kubeconfig "$KC" --namespace default \
  --listen 127.0.0.1:0 --admin 127.0.0.1:0 --webhook-listen off \
  --identity-listen "$HOST_IP:0" --identity-cert-san "$HOST_IP" \
  >"$WORK/issuer.out" 2>"$WORK/issuer.log" &
ISSUER_PID=$!; PIDS+=($!)
IDENTITY_ADDR=$(announced "$WORK/issuer.out" identity) || { cat "$WORK/issuer.log" >&2; exit 1; }
ISSUER_ADMIN=$(announced "$WORK/issuer.out" admin)
wait_ready "http://$ISSUER_ADMIN/ready" 60 || { tail -20 "$WORK/issuer.log" >&2; exit 1; }
for _ in $(seq 1 200); do
  kc get configmap tandem-trust-roots -o jsonpath='{.data.ca-bundle\.crt}' > "$WORK/roots.pem" 2>/dev/null || true
  [ -s "$WORK/roots.pem" ] && break
  sleep 0.1
done
[ -s "$WORK/roots.pem" ] || { echo "no ConfigMap tandem-trust-roots in namespace default" >&2; tail -20 "$WORK/issuer.log" >&2; exit 1; }
chmod 644 "$WORK/roots.pem"

cat > "$WORK/services.yaml" <<EOF
services:
  - name: bench-server
    namespace: default
    port: 80
    endpoints:
      - {address: "$NS_IP:$APP_PORT", identity: "$SERVER_ID"}
  - name: bench-server-plain
    namespace: default
    port: 80
    endpoints:
      - {address: "$NS_IP:$APP_PORT"}
EOF
# On the host side of the veth: the server proxy in the pod reaches it there.
"$TANDEM_BIN" control-plane --source "file:$WORK/services.yaml" --listen "$HOST_IP:0" \
  --admin 127.0.0.1:0 >"$WORK/discovery.out" 2>"$WORK/discovery.log" &
PIDS+=($!)
DISCOVERY_ADDR=$(announced "$WORK/discovery.out" discovery) || { cat "$WORK/discovery.log" >&2; exit 1; }
wait_ready "http://$(announced "$WORK/discovery.out" admin)/ready" 20

# --- HAProxy's certificates: a CA, a server and a client leaf, EC P-256 -------------------
HA=$SECRETS/haproxy
mkdir -p "$HA"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=bench-mesh-ca -keyout "$HA/ca.key" -out "$HA/ca.pem" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
# leaf NAME SUBJECT_ALT_NAMES SIGNER_CERT SIGNER_KEY DIR: NAME.key, NAME.crt (leaf + signer).
leaf() {
  local name=$1 san=$2 ca_cert=$3 ca_key=$4 dir=$5
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$name" \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=$san" > "$dir/$name.ext"
  openssl x509 -req -in "$dir/$name.csr" -CA "$ca_cert" -CAkey "$ca_key" -CAcreateserial -days 1 \
    -sha256 -extfile "$dir/$name.ext" -out "$dir/$name.leaf" 2>/dev/null
  cat "$dir/$name.leaf" "$ca_cert" > "$dir/$name.crt"
  rm -f "$dir/$name.csr" "$dir/$name.ext"
}
leaf server "DNS:bench-server,URI:$SERVER_ID" "$HA/ca.pem" "$HA/ca.key" "$HA"
leaf client "URI:$CLIENT_ID" "$HA/ca.pem" "$HA/ca.key" "$HA"
cat "$HA/server.leaf" "$HA/server.key" > "$HA/server.pem"
cat "$HA/client.leaf" "$HA/client.key" > "$HA/client.pem"
chown -R "$PROXY_UID:$PROXY_UID" "$HA"

haproxy_global() {
  cat <<EOF
global
  nbthread 1
  maxconn 4000
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
EOF
}
{
  haproxy_global
  echo "frontend mesh_in"
  echo "  bind :$HAPROXY_PORT ssl crt $HA/server.pem ca-file $HA/ca.pem verify required alpn h2,http/1.1"
  echo "  default_backend app"
  echo "backend app"
  echo "  server app 127.0.0.1:$APP_PORT"
} > "$WORK/haproxy-server.cfg"
# haproxy_client PAIR ALPN: the client side's config; its port in HAPROXY_CLIENT_PORT[PAIR].
declare -A HAPROXY_CLIENT_PORT
haproxy_client() {
  HAPROXY_CLIENT_PORT[$1]=$(free_port)
  {
    haproxy_global
    echo "frontend outbound"
    echo "  bind 127.0.0.1:${HAPROXY_CLIENT_PORT[$1]}"
    echo "  default_backend mesh_out"
    echo "backend mesh_out"
    echo "  server s1 $NS_IP:$HAPROXY_PORT ssl crt $HA/client.pem ca-file $HA/ca.pem verify required verifyhost bench-server $2"
  } > "$WORK/$1-client.cfg"
}
haproxy_client haproxy-mtls "alpn h2"
haproxy_client haproxy-mtls-h1 ""

# --- the pairs ---------------------------------------------------------------------------------
CLIENT_PORT=""; CLIENT_ADMIN=""; HOST_HEADER=""; READY_MS=0

identity_flags() { # SERVICEACCOUNT
  echo --identity-address "$IDENTITY_ADDR" --identity "spiffe://$TRUST_DOMAIN/ns/default/sa/$1" \
    --identity-server-name "$HOST_IP" --identity-token-file "$SECRETS/$1.token" \
    --trust-roots-file "$WORK/roots.pem"
}

# start_server PAIR: the pod's proxy, on CPU 0, as UID 2102; sets SERVER_PID.
start_server() {
  local log="$WORK/$1-server.log" flags=()
  case $1 in
    tandem-*)
      [ "$1" = tandem-plain ] || read -r -a flags <<<"$(identity_flags bench-server)"
      taskset -c "$PROXY_CPU" ip netns exec "$NS" "${AS_PROXY[@]}" "${PROXY_WRAP[@]}" "$PROXY_BIN" \
        --inbound-listen "0.0.0.0:$INBOUND_PORT" --admin "127.0.0.1:$NS_ADMIN_PORT" \
        --control-plane "$DISCOVERY_ADDR" --threads 1 --shutdown-grace 1s "${flags[@]}" \
        >/dev/null 2>>"$log" &
      SERVER_PID=$!
      wait_ready ns "http://127.0.0.1:$NS_ADMIN_PORT/ready" "$READY_SECONDS" || { tail -20 "$log" >&2; return 1; }
      ;;
    haproxy-*)
      taskset -c "$PROXY_CPU" ip netns exec "$NS" "${AS_PROXY[@]}" haproxy -db -f "$WORK/haproxy-server.cfg" \
        >/dev/null 2>>"$log" &
      SERVER_PID=$!
      wait_listen ns "$HAPROXY_PORT" || { tail -20 "$log" >&2; return 1; }
      ;;
  esac
}

# start_client PAIR: the client proxy on the host, on CPU 0, as UID 2102; sets
# CLIENT_PID, CLIENT_PORT, CLIENT_ADMIN, HOST_HEADER.
start_client() {
  local log="$WORK/$1-client.log" flags=()
  case $1 in
    tandem-*)
      CLIENT_PORT=$(free_port); CLIENT_ADMIN=$(free_port)
      HOST_HEADER=bench-server
      if [ "$1" = tandem-plain ]; then HOST_HEADER=bench-server-plain
      else read -r -a flags <<<"$(identity_flags bench-client)"; fi
      taskset -c "$PROXY_CPU" "${AS_PROXY[@]}" "${PROXY_WRAP[@]}" "$PROXY_BIN" --listen "127.0.0.1:$CLIENT_PORT" \
        --admin "127.0.0.1:$CLIENT_ADMIN" --control-plane "$DISCOVERY_ADDR" --namespace default \
        --threads 1 --shutdown-grace 1s "${flags[@]}" >/dev/null 2>>"$log" &
      CLIENT_PID=$!
      wait_ready "http://127.0.0.1:$CLIENT_ADMIN/ready" "$READY_SECONDS" || { tail -20 "$log" >&2; return 1; }
      ;;
    haproxy-*)
      CLIENT_PORT=${HAPROXY_CLIENT_PORT[$1]}; CLIENT_ADMIN=""; HOST_HEADER=bench-server
      taskset -c "$PROXY_CPU" "${AS_PROXY[@]}" haproxy -db -f "$WORK/$1-client.cfg" >/dev/null 2>>"$log" &
      CLIENT_PID=$!
      wait_listen "$CLIENT_PORT" || { tail -20 "$log" >&2; return 1; }
      ;;
  esac
}

start_pair() {
  local t0 t1
  t0=$(date +%s%N)
  start_server "$1" && start_client "$1" || return 1
  t1=$(date +%s%N)
  READY_MS=$(( (t1 - t0) / 1000000 ))
}

stop_pair() {
  for pid in $CLIENT_PID $SERVER_PID; do kill "$pid" 2>/dev/null || true; done
  for pid in $CLIENT_PID $SERVER_PID; do wait "$pid" 2>/dev/null || true; done
  CLIENT_PID=""; SERVER_PID=""
  wait_free ns "$INBOUND_PORT"; wait_free ns "$HAPROXY_PORT"; wait_free ns "$NS_ADMIN_PORT"
  [ -z "$CLIENT_PORT" ] || wait_free "$CLIENT_PORT"
}

client_metrics() { curl -s --max-time 2 "http://127.0.0.1:$CLIENT_ADMIN/metrics"; }
server_metrics() { in_ns curl -s --max-time 2 "http://127.0.0.1:$NS_ADMIN_PORT/metrics"; }

# The mesh hop's established TCP connections (client proxy -> pod).
hop_connections() {
  local port=$INBOUND_PORT
  [[ $1 == haproxy-* ]] && port=$HAPROXY_PORT
  in_ns ss -Htn state established "sport = :$port" | wc -l
}

to_ms() { # wrk prints 512.00us / 1.23ms / 1.01s
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}

# Every load is bounded: its own duration, and `timeout` in case it hangs.
wrk_run() { # SECONDS OUT
  timeout $(($1 + 30)) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"$1s" --latency \
    -H "Host: $HOST_HEADER" "http://127.0.0.1:$CLIENT_PORT/" >"$2"
}

# A first request through the pair, so a broken pair says why at once.
check_pair() {
  local out
  out=$(curl -s --max-time 5 -o /dev/null -w '%{http_code}' -H "Host: $HOST_HEADER" "http://127.0.0.1:$CLIENT_PORT/" || true)
  [ "$out" = 200 ] && return 0
  echo "$1: a request through the pair got '$out':" >&2
  curl -s --max-time 5 -i -H "Host: $HOST_HEADER" "http://127.0.0.1:$CLIENT_PORT/" >&2 || true
  echo >&2
  for side in client server; do
    echo "--- last lines of the $side proxy's log ($WORK/$1-$side.log):" >&2
    tail -15 "$WORK/$1-$side.log" >&2 || true
  done
  return 1
}

# --- CALLGRIND=1: instructions per request, then done ------------------------------------
# callgrind_pair PAIR NAME: "client server pair" instructions per request of PAIR's
# proxies; with CALLGRIND_KEEP=DIR, their profiles are kept there as PAIR-NAME-client.out
# and PAIR-NAME-server.out (for callgrind_annotate).
callgrind_pair() {
  local out=$WORK/cg h2 client_ir server_ir
  rm -rf "$out"; mkdir -p "$out"; chown "$PROXY_UID:$PROXY_UID" "$out"
  PROXY_WRAP=(valgrind --tool=callgrind --callgrind-out-file="$out/%p.out")
  start_pair "$1" && check_pair "$1" || { stop_pair; return 1; }
  h2=$(timeout 600 taskset -c "$LOAD_CPU" h2load --h1 -t1 -c"$CONNECTIONS" -n "$CALLGRIND_REQUESTS" \
    -H ":authority: $HOST_HEADER" "http://127.0.0.1:$CLIENT_PORT/" 2>&1 || true)
  local client=$CLIENT_PID server=$SERVER_PID
  stop_pair
  grep -q "$CALLGRIND_REQUESTS succeeded" <<<"$h2" || { echo "$1: h2load: $(grep -E 'requests:|status codes' <<<"$h2")" >&2; return 1; }
  # The pids valgrind ran as are the ones started (setpriv and ip netns exec exec).
  client_ir=$(awk '/^(summary|totals):/ { print $2; exit }' "$out/$client.out")
  server_ir=$(awk '/^(summary|totals):/ { print $2; exit }' "$out/$server.out")
  if [ -n "${CALLGRIND_KEEP:-}" ]; then
    mkdir -p "$CALLGRIND_KEEP"
    cp "$out/$client.out" "$CALLGRIND_KEEP/$1-$2-client.out"
    cp "$out/$server.out" "$CALLGRIND_KEEP/$1-$2-server.out"
  fi
  awk -v c="$client_ir" -v s="$server_ir" -v n="$CALLGRIND_REQUESTS" \
    'BEGIN { printf "%.0f %.0f %.0f\n", c / n, s / n, (c + s) / n }'
}
if [ "$CALLGRIND" != 0 ]; then
  READY_SECONDS=180
  read -r -a proxies <<<"${PROXIES:-$TARGET/release/tandem-proxy}"
  echo
  echo "| proxy binary | pair | client | server | pair |"
  echo "| --- | --- | ---: | ---: | ---: |"
  for bin in "${proxies[@]}"; do
    cp "$bin" "$WORK/bin/tandem-proxy"
    for pair in $PAIRS; do
      [[ $pair == tandem-* ]] || continue
      if read -r c s p < <(callgrind_pair "$pair" "$(basename "$bin")"); then
        echo "| $bin | $pair | $c | $s | $p |"
      else
        echo "| $bin | $pair | failed | | |"
      fi
    done
  done
  echo
  echo "instructions per request (callgrind; h2load --h1, $CONNECTIONS connections, $CALLGRIND_REQUESTS requests, start-up and shutdown included)"
  exit 0
fi

RESULTS=$WORK/results.tsv
: > "$RESULTS"
FAILED=""
for round in $(seq "$ROUNDS"); do
  for pair in $PAIRS; do
    if ! start_pair "$pair" || ! check_pair "$pair"; then
      FAILED="$FAILED $pair"
      echo "round $round: $pair failed to start or to serve; skipped" >&2
      stop_pair
      continue
    fi
    wrk_run "$WARMUP" /dev/null || true
    before=$(cpu_ticks "$CLIENT_PID" "$SERVER_PID"); cb=$(cpu_ticks "$CLIENT_PID"); sb=$(cpu_ticks "$SERVER_PID")
    kb=$(sys_ticks "$CLIENT_PID" "$SERVER_PID")
    pcb=$(core_ticks "$PROXY_CPU"); lcb=$(core_ticks "$LOAD_CPU")
    out=$WORK/wrk.out
    tracers=()
    if [ "${STRACE:-0}" != 0 ]; then
      # Diagnostic only (ptrace slows the proxies): syscalls by kind, per proxy.
      for side in client server; do
        pid=$CLIENT_PID; [ $side = server ] && pid=$SERVER_PID
        strace -c -f -p "$pid" -o "$WORK/strace-$pair-$side-$round.txt" 2>/dev/null & tracers+=($!)
      done
      sleep 0.5
    fi
    wrk_run "$DURATION" "$out" || echo "wrk failed" >&2
    for t in "${tracers[@]}"; do kill -INT "$t" 2>/dev/null || true; wait "$t" 2>/dev/null || true; done
    if [ "${STRACE:-0}" != 0 ]; then
      for side in client server; do
        echo "--- strace $pair $side round $round ($(awk '/requests in/ { print $1 }' "$out") requests):" >&2
        head -14 "$WORK/strace-$pair-$side-$round.txt" >&2
      done
    fi
    after=$(cpu_ticks "$CLIENT_PID" "$SERVER_PID"); ca=$(cpu_ticks "$CLIENT_PID"); sa=$(cpu_ticks "$SERVER_PID")
    ka=$(sys_ticks "$CLIENT_PID" "$SERVER_PID")
    pca=$(core_ticks "$PROXY_CPU"); lca=$(core_ticks "$LOAD_CPU")
    hwm_c=$(rss_kib "$CLIENT_PID" VmHWM); hwm_s=$(rss_kib "$SERVER_PID" VmHWM)
    conns=$(hop_connections "$pair")
    hs_c="-"; hs_s="-"; check=ok
    if [[ $pair == tandem-* ]]; then
      cm=$(client_metrics); sm=$(server_metrics)
      hs_c=$(sum_series tandem_proxy_mesh_tls_handshakes_total 'side="client"' <<<"$cm")
      hs_s=$(sum_series tandem_proxy_mesh_tls_handshakes_total 'side="server"' <<<"$sm")
      hs_fail=$(sum_series tandem_proxy_mesh_tls_handshakes_total 'result="error"' <<<"$cm"$'\n'"$sm")
      mtls=$(sum_series tandem_proxy_inbound_connections_total "client_id=\"$CLIENT_ID\"" <<<"$sm")
      plain=$(sum_series tandem_proxy_inbound_connections_total 'transport="plaintext"' <<<"$sm")
      case $pair in
        tandem-mtls) [ "$mtls" -gt 0 ] && [ "$plain" = 0 ] && [ "$hs_fail" = 0 ] || check="inbound mtls=$mtls plaintext=$plain failed handshakes=$hs_fail" ;;
        tandem-plain) [ "$plain" -gt 0 ] && [ "$mtls" = 0 ] || check="inbound mtls=$mtls plaintext=$plain" ;;
      esac
      [ "$check" = ok ] || echo "round $round: $pair: $check" >&2
    fi
    stop_pair
    reqs=$(awk '/requests in/ { print $1 }' "$out")
    rps=$(awk '/Requests\/sec/ { print $2 }' "$out")
    p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$out")")
    p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$out")")
    errors=$(awk '/Socket errors/ { gsub(",", ""); n = $4 + $6 + $8 + $10 } /Non-2xx/ { n += $NF } END { print n + 0 }' "$out")
    cpu=$(us_per_request "$before" "$after" "${reqs:-0}")
    cpu_c=$(us_per_request "$cb" "$ca" "${reqs:-0}"); cpu_s=$(us_per_request "$sb" "$sa" "${reqs:-0}")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$pair" "${rps:-0}" "$p50" "$p99" \
      "$cpu" "$cpu_c" "$cpu_s" "$(busy_pct "$pcb" "$pca")" "$(busy_pct "$lcb" "$lca")" "$errors" \
      "${hwm_c:-0}" "${hwm_s:-0}" "$conns" "$hs_c" "$hs_s" "$READY_MS" "$check" "$round" \
      "$(us_per_request "$kb" "$ka" "${reqs:-0}")" >> "$RESULTS"
    echo "done: round $round/$ROUNDS $pair (${rps:-0} req/s, p99 $p99 ms, pair CPU $cpu µs/req, errors $errors, $check)" >&2
  done
done

# --- handshakes at the server proxy ---------------------------------------------------------------
cat > "$WORK/handshake.py" <<'EOF'
# One client, one connection at a time: connect, TLS 1.3 handshake with a client
# certificate, wait for what the server sends after it (session tickets), close.
import select, socket, ssl, sys, time
host, port, chain, key, ca, alpn, mode, seconds = sys.argv[1:9]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.check_hostname = False  # Tandem's certificates name identities (URI SANs), not hosts
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.load_verify_locations(ca)
ctx.load_cert_chain(chain, key)
if alpn != "-":
    ctx.set_alpn_protocols([alpn])
session, done, reused, errors, times = None, 0, 0, 0, []
last_error = ""
end = time.monotonic() + float(seconds)
while time.monotonic() < end:
    try:
        t0 = time.perf_counter()
        raw = socket.create_connection((host, int(port)), timeout=5)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = ctx.wrap_socket(raw, session=session if mode == "resumed" else None)
        times.append(time.perf_counter() - t0)
        if alpn != "-" and tls.selected_alpn_protocol() != alpn:
            raise RuntimeError(f"ALPN {tls.selected_alpn_protocol()!r}, not {alpn!r}")
        tls.setblocking(False)
        select.select([tls], [], [], 0.2)
        try:
            tls.recv(65536)
        except ssl.SSLWantReadError:
            pass
        reused += tls.session_reused
        if mode == "resumed":
            session = tls.session
        tls.close()
        done += 1
    except Exception as e:  # counted, and the last one said
        errors += 1
        last_error = repr(e)
        time.sleep(0.01)
times.sort()
p50 = times[len(times) // 2] * 1e3 if times else 0
print(done, done / float(seconds), f"{p50:.3f}", reused, errors)
if last_error:
    print(f"handshake errors: {errors}, the last: {last_error}", file=sys.stderr)
EOF

HS_RESULTS=$WORK/handshakes.tsv
: > "$HS_RESULTS"
if [ "$HANDSHAKE_SECONDS" != 0 ]; then
  # A mesh certificate for the test client, signed by the mesh's issuer (its key from
  # the Secret the control plane keeps), for .../sa/bench-client.
  MESH_CLIENT=$SECRETS/mesh-client
  mkdir -p "$MESH_CLIENT"
  kc get secret tandem-identity-issuer -o jsonpath='{.data.tls\.crt}' | base64 -d > "$MESH_CLIENT/issuer.crt"
  kc get secret tandem-identity-issuer -o jsonpath='{.data.tls\.key}' | base64 -d > "$MESH_CLIENT/issuer.key"
  leaf client "URI:$CLIENT_ID" "$MESH_CLIENT/issuer.crt" "$MESH_CLIENT/issuer.key" "$MESH_CLIENT"
  rm -f "$MESH_CLIENT/issuer.key"
  # The HAProxy pairs share the server side (its bind offers h2 and http/1.1).
  for pair in tandem-mtls haproxy-mtls; do
    case $pair in
      tandem-mtls) [[ " $PAIRS " == *" tandem-mtls "* ]] || continue ;;
      haproxy-mtls) [[ " $PAIRS " == *" haproxy-mtls"* ]] || continue ;;
    esac
    if ! start_server "$pair"; then FAILED="$FAILED $pair-handshakes"; stop_pair; continue; fi
    for mode in fresh resumed; do
      case $pair in
        tandem-*) args=("$NS_IP" "$APP_PORT" "$MESH_CLIENT/client.crt" "$MESH_CLIENT/client.key" "$WORK/roots.pem" tandem.io/h2) ;;
        haproxy-*) args=("$NS_IP" "$HAPROXY_PORT" "$HA/client.crt" "$HA/client.key" "$HA/ca.pem" -) ;;
      esac
      # A second of warm-up, then the measured run.
      timeout 30 taskset -c "$LOAD_CPU" python3 "$WORK/handshake.py" "${args[@]}" "$mode" 1 >/dev/null 2>&1 || true
      before=$(cpu_ticks "$SERVER_PID")
      read -r n rate p50 reused errors < <(timeout $((HANDSHAKE_SECONDS + 30)) taskset -c "$LOAD_CPU" \
        python3 "$WORK/handshake.py" "${args[@]}" "$mode" "$HANDSHAKE_SECONDS" 2>>"$WORK/handshake.log" || echo 0 0 0 0 1)
      after=$(cpu_ticks "$SERVER_PID")
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$pair" "$mode" "$rate" "$p50" "$(us_per_request "$before" "$after" "$n")" "$reused/$n" "$errors" >> "$HS_RESULTS"
      echo "done: handshakes $pair $mode ($rate/s, server CPU $(us_per_request "$before" "$after" "$n") µs each, resumed $reused/$n, errors $errors)" >&2
    done
    stop_pair
  done
fi

# --- Certify: certificates per second from the issuer -----------------------------------------------
CERTIFY_LINE=""
if [ "$CERTIFY_REQUESTS" != 0 ]; then
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=bench-client \
    -addext "subjectAltName=URI:$CLIENT_ID" -keyout "$SECRETS/certify.key" -outform DER \
    -out "$WORK/certify.csr" 2>/dev/null
  python3 - "$CLIENT_ID" "$SECRETS/bench-client.token" "$WORK/certify.csr" "$WORK/certify.body" <<'EOF'
import struct, sys
identity, token_file, csr_file, out = sys.argv[1:]
def varint(n):
    b = bytearray()
    while True:
        x, n = n & 0x7F, n >> 7
        b.append(x | (0x80 if n else 0))
        if not n:
            return bytes(b)
def field(number, data):  # a length-delimited protobuf field
    return bytes([number << 3 | 2]) + varint(len(data)) + data
msg = field(1, identity.encode()) + field(2, open(token_file).read().strip().encode()) + field(3, open(csr_file, "rb").read())
open(out, "wb").write(b"\x00" + struct.pack(">I", len(msg)) + msg)  # gRPC framing
EOF
  certify_load() { # N OUT
    timeout 300 taskset -c "$LOAD_CPU" h2load -n "$1" -c "$CERTIFY_CONCURRENCY" -m 1 -t 1 \
      -d "$WORK/certify.body" -H 'content-type: application/grpc' -H 'te: trailers' \
      "https://$IDENTITY_ADDR/tandem.identity.v1.Identity/Certify" >"$2" 2>&1
  }
  certify_load 100 /dev/null || true
  APISERVER_PID=$(cat "$CLUSTER_DIR/kube-apiserver.pid")
  m0=$(curl -s "http://$ISSUER_ADMIN/metrics")
  cp0=$(cpu_ticks "$ISSUER_PID"); ap0=$(cpu_ticks "$APISERVER_PID")
  certify_load "$CERTIFY_REQUESTS" "$WORK/certify.out" || echo "h2load (Certify) failed: $(tail -3 "$WORK/certify.out")" >&2
  cp1=$(cpu_ticks "$ISSUER_PID"); ap1=$(cpu_ticks "$APISERVER_PID")
  m1=$(curl -s "http://$ISSUER_ADMIN/metrics")
  issued=$(( $(sum_series tandem_control_plane_certificates_issued_total <<<"$m1") - $(sum_series tandem_control_plane_certificates_issued_total <<<"$m0") ))
  refused=$(( $(sum_series tandem_control_plane_certificate_refusals_total <<<"$m1") - $(sum_series tandem_control_plane_certificate_refusals_total <<<"$m0") ))
  sign_ms=$(awk -v s0="$(sum_series_f tandem_control_plane_certificate_signing_seconds_sum <<<"$m0")" \
    -v s1="$(sum_series_f tandem_control_plane_certificate_signing_seconds_sum <<<"$m1")" \
    -v c0="$(sum_series_f tandem_control_plane_certificate_signing_seconds_count <<<"$m0")" \
    -v c1="$(sum_series_f tandem_control_plane_certificate_signing_seconds_count <<<"$m1")" \
    'BEGIN { printf "%.3f", (c1 > c0 ? (s1 - s0) / (c1 - c0) * 1e3 : 0) }')
  secs=$(awk '/^finished in/ { v = $3; sub(/,$/, "", v); n = v + 0; if (v ~ /ms$/) n /= 1000; print n }' "$WORK/certify.out")
  rate=$(awk -v i="$issued" -v s="${secs:-0}" 'BEGIN { printf "%.0f", (s > 0 ? i / s : 0) }')
  mean=$(awk '/^time for request:/ { print $6 }' "$WORK/certify.out")
  CERTIFY_LINE="$CERTIFY_REQUESTS	$CERTIFY_CONCURRENCY	$rate	$(to_ms "${mean:-0}")	$issued	$refused	$(us_per_request "$cp0" "$cp1" "$issued")	$(us_per_request "$ap0" "$ap1" "$issued")	$sign_ms	${secs:-0}"
  echo "done: Certify ($issued issued, $refused refused, $rate/s)" >&2
fi

# --- report ---------------------------------------------------------------------------------------------
# median PAIR COLUMN (1-based, of results.tsv)
median() {
  awk -F'\t' -v p="$1" -v c="$2" '$1 == p { print $c }' "$RESULTS" | sort -g |
    awk '{ v[NR] = $1 } END { print (NR == 0 ? 0 : NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
highest() { awk -F'\t' -v p="$1" -v c="$2" '$1 == p && $c > x { x = $c } END { print x + 0 }' "$RESULTS"; }
total() { awk -F'\t' -v p="$1" -v c="$2" '$1 == p { t += $c } END { print t + 0 }' "$RESULTS"; }
runs() { awk -F'\t' -v p="$1" '$1 == p { n++ } END { print n + 0 }' "$RESULTS"; }
checks() { awk -F'\t' -v p="$1" '$1 == p && $17 != "ok" { n++ } END { print n + 0 }' "$RESULTS"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0 && a > 0) printf "%.2f", a / b; else printf "–" }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
series() { awk -F'\t' -v p="$1" -v c="$2" '$1 == p { printf "%s%s", sep, $c; sep = ", " }' "$RESULTS"; }
has() { [ "$(runs "$1")" -gt 0 ]; }
# per_round A B COLUMN: A's value ÷ B's in each round both ran.
per_round() {
  awk -F'\t' -v a="$1" -v b="$2" -v c="$3" '$1 == a { x[$18] = $c } $1 == b { y[$18] = $c }
    END { for (r = 1; r <= 1000; r++) if ((r in x) && (r in y) && y[r] > 0) { printf "%s%.2f", sep, x[r] / y[r]; sep = ", " } }' "$RESULTS"
}

# CALLGRIND=1: instead of the rounds, handshakes and Certify, each Tandem pair (of
# PAIRS) runs both its proxies under callgrind while h2load (HTTP/1.1, 64 connections,
# CALLGRIND_REQUESTS requests, default 20000) sends through it; reported: instructions
# per request of the client proxy, the server proxy and the pair (start-up and
# shutdown included). Counted instructions do not move with what else the machine
# does, so two builds compare on a busy machine where times cannot; PROXIES names the
# proxy binaries to compare (default: the one built); CALLGRIND_KEEP=DIR keeps the
# profiles (PAIR-BINARY-client.out, PAIR-BINARY-server.out).
#
# The Tandem proxies' log lines at WARN or ERROR (colour codes taken out).
tandem_warnings() {
  cat "$WORK"/tandem-*.log 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' | grep -aE '^[^ ]+ +(WARN|ERROR) ' || true
}

report() {
  echo "# The mesh hop: Tandem's proxy pair against HAProxy's, mutual TLS"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M') UTC, $(nproc) CPUs ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), kernel $(uname -r);"
  echo "load (wrk, $CONNECTIONS connections, HTTP/1.1 keep-alive) -> client proxy (host, loopback) -> mutual TLS 1.3 over a veth -> server proxy (network namespace, \`tandem-proxy init\` rules, UID $PROXY_UID) -> \`tandem backend\` on the pod's loopback;"
  echo "both proxies of a pair on CPU $PROXY_CPU with one thread each, wrk and the backend on CPU $LOAD_CPU; ${DURATION}s per run after ${WARMUP}s of warm-up, medians of $ROUNDS interleaved rounds (peak RSS: the highest)."
  echo "$(haproxy -v | head -1 | cut -d' ' -f1-3) (haproxy-mtls: HTTP/2 on the hop, \`alpn h2\`; haproxy-mtls-h1: HTTP/1.1 keep-alive; both \`http-reuse always\`), $(openssl version | cut -d' ' -f1-2), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $("$PROXY_BIN" --version) (built $BUILT); certificates from Tandem's issuer (real TokenReview on the tests' kube-apiserver)."
  echo
  if [ -n "$FAILED" ]; then
    echo "**Failed:**$FAILED (see the log lines printed above the report)."
    echo
  fi
  # The baseline: the HAProxy pair that spent less CPU per request.
  local base="" hr=0 hp=0 hc=0
  for p in haproxy-mtls haproxy-mtls-h1; do
    has "$p" || continue
    if [ -z "$base" ] || awk -v a="$(median "$p" 5)" -v b="$hc" 'BEGIN { exit !(a < b) }'; then
      base=$p; hr=$(median "$p" 2); hp=$(median "$p" 4); hc=$(median "$p" 5)
    fi
  done
  [ -z "$base" ] || { echo "×HAProxy: against $base, the HAProxy pair with the lower CPU per request in this run."; echo; }
  echo "| pair | req/s | ×HAProxy | p50 ms | p99 ms | ×HAProxy | pair CPU µs/req | ×HAProxy | client / server µs/req | proxy core busy | load core busy | peak RSS client / server MiB | hop conns | mTLS handshakes client / server | errors | runs (checks failed) |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for p in $PAIRS; do
    has "$p" || { echo "| $p | failed | | | | | | | | | | | | | | 0 |"; continue; }
    local r p99 c hs
    r=$(median "$p" 2); p99=$(median "$p" 4); c=$(median "$p" 5)
    hs="–"; [[ $p == tandem-* ]] && hs="$(median "$p" 14) / $(median "$p" 15)"
    printf '| %s | %.0f | %s | %.3f | %.3f | %s | %.2f | %s | %.2f / %.2f | %s%% | %s%% | %s / %s | %s | %s | %s | %s (%s) |\n' \
      "$p" "$r" "$(ratio "$r" "$hr")" "$(median "$p" 3)" "$p99" "$(ratio "$p99" "$hp")" "$c" "$(ratio "$c" "$hc")" \
      "$(median "$p" 6)" "$(median "$p" 7)" "$(median "$p" 8)" "$(median "$p" 9)" \
      "$(mib "$(highest "$p" 11)")" "$(mib "$(highest "$p" 12)")" "$(median "$p" 13)" "$hs" \
      "$(total "$p" 10)" "$(runs "$p")" "$(checks "$p")"
  done
  echo
  local kernel="" kp
  for p in $PAIRS; do
    has "$p" || continue
    kp=$(median "$p" 19)
    kernel="$kernel${kernel:+; }$p $kp of $(median "$p" 5) ($(awk -v k="$kp" -v c="$(median "$p" 5)" 'BEGIN { printf "%.0f", (c > 0 ? k / c * 100 : 0) }')%)"
  done
  echo "Of the pair's CPU per request, in the kernel (system time, both proxies; µs/req): $kernel."
  echo
  if has tandem-mtls && has tandem-plain; then
    local mr pr mc pc
    mr=$(median tandem-mtls 2); pr=$(median tandem-plain 2); mc=$(median tandem-mtls 5); pc=$(median tandem-plain 5)
    echo "The price of mTLS (tandem-mtls against tandem-plain): $(ratio "$mr" "$pr")× the requests/s, $(ratio "$mc" "$pc")× the pair's CPU per request ($mc against $pc µs). Note the hop differs in more than TLS: with identities Tandem multiplexes over one HTTP/2 connection, without them it pools HTTP/1.1 connections."
    echo
  fi
  if has tandem-mtls; then
    echo "Tandem pair, start to both proxies ready (each with its first certificate from Certify): median $(median tandem-mtls 16) ms; plaintext pair $(median tandem-plain 16) ms."
    echo
  fi
  if has tandem-mtls && [ -n "$base" ]; then
    local tc tp th ts
    tc=$(median tandem-mtls 5); tp=$(median tandem-mtls 4)
    th=$(highest tandem-mtls 11); ts=$(highest tandem-mtls 12)
    [ "$(highest tandem-plain 11)" -gt "$th" ] && th=$(highest tandem-plain 11)
    [ "$(highest tandem-plain 12)" -gt "$ts" ] && ts=$(highest tandem-plain 12)
    echo "Targets (issue 26):"
    echo
    echo "- the pair's CPU per request at most 0.8× HAProxy's pair ($base): $(ratio "$tc" "$hc")× — $(awk -v a="$tc" -v b="$hc" 'BEGIN { print (b > 0 && a / b <= 0.8 ? "**met**" : "**not met**") }')"
    echo "- p99 no worse than HAProxy's: $tp against $hp ms ($(ratio "$tp" "$hp")×) — $(awk -v a="$tp" -v b="$hp" 'BEGIN { print (a <= b ? "**met**" : "**not met**") }')"
    echo "- peak RSS per proxy at most 20 MiB: client $(mib "$th"), server $(mib "$ts") MiB (highest of any Tandem run) — $(awk -v a="$th" -v b="$ts" 'BEGIN { print (a <= 20480 && b <= 20480 ? "**met**" : "**not met**") }')"
    echo
  fi
  if [ -s "$HS_RESULTS" ]; then
    echo "Handshakes at the server proxy: one Python ssl client on CPU $LOAD_CPU, a connection at a time for ${HANDSHAKE_SECONDS}s (TCP connect, TLS 1.3 with a client certificate, the server's tickets read, close); the server proxy alone on CPU $PROXY_CPU."
    echo
    echo "| server proxy | handshake | handshakes/s (one client) | p50 ms (client side) | server CPU µs/handshake | ×HAProxy | resumed | errors |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    # shellcheck disable=SC2094  # only read
    while IFS=$'\t' read -r p mode rate p50 cpu reused errors; do
      local h
      h=$(awk -F'\t' -v m="$mode" '$1 == "haproxy-mtls" && $2 == m { print $5 }' "$HS_RESULTS")
      printf '| %s | %s | %.0f | %s | %s | %s | %s | %s |\n' "${p%-mtls}" "$mode" "$rate" "$p50" "$cpu" "$(ratio "$cpu" "${h:-0}")" "$reused" "$errors"
    done < "$HS_RESULTS"
    echo
  fi
  if [ -n "$CERTIFY_LINE" ]; then
    IFS=$'\t' read -r n c rate mean issued refused cp ap sign secs <<<"$CERTIFY_LINE"
    echo "Certify: h2load on CPU $LOAD_CPU, $n calls, $c at a time, over ${secs}s (after 100 to warm up); the control plane and the cluster unpinned."
    echo
    echo "| certificates/s | mean ms per call | issued | refused | control plane CPU µs/cert | kube-apiserver CPU µs/cert (TokenReview) | signing ms (mean) |"
    echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    echo "| $rate | $mean | $issued | $refused | $cp | $ap | $sign |"
    echo
  fi
  local warn
  warn=$(tandem_warnings | wc -l)
  echo "Log lines at WARN or ERROR in the Tandem proxies' logs (every run): ${warn:-0}."
  echo
  if [ "$ROUNDS" -gt 1 ]; then
    echo "Each round: requests/s; pair CPU µs/req; p99 ms:"
    echo
    for p in $PAIRS; do
      has "$p" || continue
      echo "- $p: $(series "$p" 2); $(series "$p" 5); $(series "$p" 4)"
    done
    if has tandem-mtls && [ -n "$base" ]; then
      echo
      echo "tandem-mtls ÷ $base in each round: pair CPU per request $(per_round tandem-mtls "$base" 5); p99 $(per_round tandem-mtls "$base" 4)."
    fi
  fi
}
if [ -n "$(tandem_warnings)" ]; then
  echo "The Tandem proxies' first log lines at WARN or ERROR:" >&2
  tandem_warnings | head -10 >&2
fi
mkdir -p bench/results
OUT="bench/results/mesh-$(date -u +%Y%m%d-%H%M%S).md"
report | tee "$OUT"
echo >&2
echo "written to $OUT" >&2
[ -z "$FAILED" ] || exit 1
