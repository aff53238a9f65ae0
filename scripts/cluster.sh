#!/usr/bin/env bash
# A real Kubernetes control plane on loopback, for tests and for people: etcd,
# kube-apiserver and kube-controller-manager built from pinned Go modules
# (tests/cluster/build-tools.sh). No Docker, no kubelet, no scheduler.
#
#   scripts/cluster.sh up [--dir DIR] [--watch-pid PID] [--keep-data]
#   scripts/cluster.sh down [--dir DIR]
#   scripts/cluster.sh env [--dir DIR]       # eval "$(scripts/cluster.sh env)"
#   scripts/cluster.sh status [--dir DIR]
#   scripts/cluster.sh stop|start kube-apiserver [--dir DIR]   # a restart, for tests
#
# State dir: --dir, else $TANDEM_CLUSTER_DIR, else <repo>/target/cluster. It holds
# pki/, the pid files (*.pid), logs (*.log), admin.kubeconfig, the etcd data and
# cluster.env (ports, URLs and paths, as shell assignments).
#
# up         builds etcd and kubernetes if needed, makes certificates (kept across runs),
#            starts etcd, kube-apiserver and kube-controller-manager on ports the OS
#            picks, waits until /readyz, the controller-manager's /healthz and the
#            `default` ServiceAccount are there. Starts from empty etcd data unless
#            --keep-data. --watch-pid PID: a detached watcher runs `down` once PID exits.
#            Already running: says so and exits 0.
# down       stops the processes it started, by their pid files (TERM, then KILL after
#            TANDEM_CLUSTER_STOP_TIMEOUT seconds, default 10); keeps logs and data.
# env        prints export lines: KUBECONFIG, PATH (built kubectl and etcd first),
#            TANDEM_CLUSTER_DIR.
# status     prints what runs, with pids and URLs; exit 0 only if all three run.
# stop kube-apiserver / start kube-apiserver
#            stops the running cluster's API server (KILL: as a crash would), or starts
#            it again on the same port with the same flags (waits for /readyz).
#
# Environment: TANDEM_CLUSTER_DIR, TANDEM_TOOLS (build cache, see build-tools.sh),
# TANDEM_CLUSTER_TIMEOUT (seconds to wait for readiness, default 180),
# TANDEM_APISERVER_FLAGS (more kube-apiserver flags for `up`, e.g. --watch-cache=false).
#
# Credentials in the state dir: admin.kubeconfig (client cert, O=system:masters),
# pki/admin-token (a bearer token of the same admin, for curl), pki/ca.crt (the CA
# of the apiserver's serving cert and of client certs), pki/sa.key + pki/sa.pub
# (ServiceAccount token signing; issuer https://kubernetes.default.svc.cluster.local).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_tools=$repo/tests/cluster/build-tools.sh
controllers=deployment-controller,replicaset-controller,endpointslice-controller,endpointslice-mirroring-controller,endpoints-controller,serviceaccount-controller,serviceaccount-token-controller,namespace-controller,garbage-collector-controller,root-ca-certificate-publisher-controller
components=(etcd kube-apiserver kube-controller-manager)
issuer=https://kubernetes.default.svc.cluster.local

say() { printf 'cluster: %s\n' "$*" >&2; }
die() { printf 'cluster: error: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

# --- arguments -----------------------------------------------------------------------
cmd=${1:-}; [ $# -gt 0 ] && shift
component=""
case $cmd in stop|start) component=${1:-}; [ $# -gt 0 ] && shift ;; esac
dir=${TANDEM_CLUSTER_DIR:-$repo/target/cluster}
watch_pid=""; keep_data=0
while [ $# -gt 0 ]; do
  case $1 in
    --dir) dir=$2; shift 2 ;;
    --dir=*) dir=${1#--dir=}; shift ;;
    --watch-pid) watch_pid=$2; shift 2 ;;
    --watch-pid=*) watch_pid=${1#--watch-pid=}; shift ;;
    --keep-data) keep_data=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
case $cmd in up|down|env|status) ;; stop|start) [ "$component" = kube-apiserver ] || die "$cmd: only kube-apiserver can be stopped and started alone" ;; -h|--help|help) usage; exit 0 ;; *) usage >&2; exit 2 ;; esac
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
pki=$dir/pki

# --- processes -----------------------------------------------------------------------
pid_of() { if [ -f "$dir/$1.pid" ]; then cat "$dir/$1.pid"; fi; }
# Alive and really ours: a recycled pid would not have our state dir in its command line.
ours() {
  local pid=$1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ -r "/proc/$pid/cmdline" ] &&
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir"
}
running() { ours "$(pid_of "$1")"; }
# Still there and not a zombie waiting to be reaped.
alive() { kill -0 "$1" 2>/dev/null && ! grep -qs '^[0-9]* ([^)]*) Z' "/proc/$1/stat"; }

tail_log() {
  local c=$1
  printf '\ncluster: ---- last 30 lines of %s ----\n' "$dir/$c.log" >&2
  tail -n 30 "$dir/$c.log" >&2 2>/dev/null || true
  printf 'cluster: ----\n' >&2
}

stop_all() {
  local deadline=${TANDEM_CLUSTER_STOP_TIMEOUT:-10} pids=() c pid
  # The watcher first (unless it is the one calling), then the components in reverse.
  for c in watcher kube-controller-manager kube-apiserver etcd; do
    pid=$(pid_of "$c")
    if [ "$c" = watcher ] && [ "${TANDEM_CLUSTER_WATCHER:-}" = "$pid" ]; then rm -f "$dir/$c.pid"; continue; fi
    if ours "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid:$c")
    fi
    rm -f "$dir/$c.pid"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  local end; end=$(( $(date +%s) + deadline ))
  local left=("${pids[@]}")
  while [ ${#left[@]} -gt 0 ] && [ "$(date +%s)" -lt "$end" ]; do
    local still=()
    for pc in "${left[@]}"; do alive "${pc%%:*}" && still+=("$pc"); done
    left=("${still[@]+"${still[@]}"}")
    [ ${#left[@]} -gt 0 ] && sleep 0.1
  done
  for pc in "${left[@]+"${left[@]}"}"; do
    say "${pc#*:} (pid ${pc%%:*}) did not stop within ${deadline}s: KILL"
    kill -KILL "${pc%%:*}" 2>/dev/null || true
  done
  for pc in "${pids[@]}"; do say "stopped ${pc#*:} (pid ${pc%%:*})"; done
}

# --- ports, certificates ---------------------------------------------------------------
free_ports() {  # N distinct ports the OS hands out on 127.0.0.1
  if command -v python3 >/dev/null; then
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
  else  # no python3: random ports in the ephemeral range that nothing listens on
    local out=() p
    while [ ${#out[@]} -lt "$1" ]; do
      p=$(( 20000 + RANDOM % 30000 ))
      ss -Htln "sport = :$p" | grep -q . || [[ " ${out[*]} " == *" $p "* ]] || out+=("$p")
    done
    echo "${out[*]}"
  fi
}

# cert NAME SUBJECT EXTENSIONS [CA]: key + cert signed by CA (default: ca).
cert() {
  local name=$1 subj=$2 ext=$3 ca=${4:-ca}
  openssl genrsa -out "$pki/$name.key" 2048 2>/dev/null
  openssl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "$ext" > "$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/$ca.crt" -CAkey "$pki/$ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$pki/$name.ext"
}
ca() {
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/$1.key" -out "$pki/$1.crt" -days 3650 \
    -sha256 -subj "/CN=$2" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
}

make_pki() {
  local all=(ca.crt apiserver.crt admin.crt kcm.crt front-proxy-ca.crt front-proxy-client.crt sa.key sa.pub admin-token)
  local ok=1 f
  for f in "${all[@]}"; do [ -s "$pki/$f" ] || ok=0; done
  if [ $ok = 1 ]; then
    for f in ca apiserver admin kcm front-proxy-ca front-proxy-client; do
      openssl x509 -checkend 86400 -noout -in "$pki/$f.crt" >/dev/null || ok=0
    done
  fi
  [ $ok = 1 ] && return 0
  say "making certificates in $pki"
  rm -rf "$pki"; mkdir -p "$pki"; chmod 700 "$pki"
  ca ca tandem-cluster-ca
  cert apiserver /CN=kube-apiserver "extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:::1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert admin "/O=system:masters/CN=tandem-admin" "extendedKeyUsage=clientAuth"
  cert kcm "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
  ca front-proxy-ca tandem-front-proxy-ca
  cert front-proxy-client /CN=front-proxy-client "extendedKeyUsage=clientAuth" front-proxy-ca
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  local token; token=$(openssl rand -hex 24)
  printf '%s\n' "$token" > "$pki/admin-token"
  printf '%s,tandem-admin-token,uid-tandem-admin-token,"system:masters"\n' "$token" > "$pki/tokens.csv"
  chmod 600 "$pki"/*.key "$pki/admin-token" "$pki/tokens.csv"
}

kubeconfig() {  # kubeconfig FILE USER CERT: a kubeconfig with embedded certs
  local b64="base64 -w0"
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tandem
  cluster:
    server: https://127.0.0.1:$apiserver_port
    certificate-authority-data: $($b64 < "$pki/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $($b64 < "$pki/$3.crt")
    client-key-data: $($b64 < "$pki/$3.key")
contexts:
- name: tandem
  context: {cluster: tandem, user: $2}
current-context: tandem
EOF
  chmod 600 "$1"
}

# --- waiting -------------------------------------------------------------------------
# wait_for COMPONENT WHAT CMD...: poll CMD until it succeeds; fail if the component
# dies or the deadline passes. `alive`, not `running`: this run started the pid, so it
# is ours, and while it execs its binary /proc/PID/cmdline can read empty, which
# `running` would take for an exit (seen on a loaded machine: a controller-manager
# "exited" with an empty log, then was found and stopped).
wait_for() {
  local c=$1 what=$2; shift 2
  while :; do
    "$@" >/dev/null 2>&1 && return 0
    if ! alive "$(pid_of "$c")"; then
      say "$c exited while waiting for $what"; tail_log "$c"; return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "timed out after ${TANDEM_CLUSTER_TIMEOUT:-180}s waiting for $what"; tail_log "$c"; return 1
    fi
    sleep 0.2
  done
}
api_get() {  # api_get PATH: GET on the apiserver as admin; fails unless 200
  curl -sf --max-time 5 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "https://127.0.0.1:$apiserver_port$1"
}
readyz() { [ "$(api_get /readyz)" = ok ]; }
kcm_healthz() { [ "$(curl -sf --max-time 5 -k "https://127.0.0.1:$kcm_port/healthz")" = ok ]; }
default_sa() { api_get /api/v1/namespaces/default/serviceaccounts/default; }

start() {  # start NAME BINARY ARGS...: detached, own session, pid in NAME.pid
  local name=$1; shift
  setsid "$@" </dev/null >>"$dir/$name.log" 2>&1 &
  echo $! > "$dir/$name.pid"
}

# start_apiserver: kube-apiserver on $apiserver_port over etcd at $etcd_port, with the
# extra flags `up` was given (kept in kube-apiserver.flags for a restart).
start_apiserver() {
  local kbin extra=()
  kbin=$("$build_tools" --print-bin-dir kubernetes)
  read -r -a extra < "$dir/kube-apiserver.flags" || true
  # --advertise-address=127.0.0.1 works on a box without a default route (the default
  # is the default route's interface address). A loopback address is not valid in
  # Endpoints/EndpointSlices, so the `kubernetes` Service gets no endpoints
  # (--endpoint-reconciler-type=none) instead of an error every 10s.
  start kube-apiserver "$kbin/kube-apiserver" "${extra[@]+"${extra[@]}"}" \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --bind-address=127.0.0.1 --secure-port="$apiserver_port" \
    --advertise-address=127.0.0.1 --endpoint-reconciler-type=none \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" --token-auth-file="$pki/tokens.csv" \
    --service-account-issuer="$issuer" \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --authorization-mode=Node,RBAC \
    --service-cluster-ip-range=10.96.0.0/12 \
    --requestheader-client-ca-file="$pki/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$pki/front-proxy-client.crt" --proxy-client-key-file="$pki/front-proxy-client.key" \
    --enable-priority-and-fairness=true \
    --profiling=false
}

# --- commands ------------------------------------------------------------------------
do_up() {
  local t0; t0=$(now)
  if running kube-apiserver && running etcd && running kube-controller-manager && [ -f "$dir/cluster.env" ]; then
    # shellcheck disable=SC1091
    . "$dir/cluster.env"
    say "already running in $dir (apiserver $TANDEM_CLUSTER_SERVER)"
    [ -z "$watch_pid" ] || start_watcher
    return 0
  fi
  if running kube-apiserver || running etcd || running kube-controller-manager; then
    say "partly running: stopping the rest first"; stop_all
  fi

  command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"
  command -v curl >/dev/null || die "curl not found (apt-get install curl)"
  local tb; tb=$(now)
  "$build_tools" etcd kubernetes >/dev/null || die "building the cluster tools failed (see above)"
  local build_s; build_s=$(since "$tb")
  local kbin ebin
  kbin=$("$build_tools" --print-bin-dir kubernetes); ebin=$("$build_tools" --print-bin-dir etcd)

  make_pki
  read -r etcd_port etcd_peer_port apiserver_port kcm_port <<<"$(free_ports 4)"
  : "${etcd_port:?}" "${kcm_port:?}"
  rm -f "$dir"/*.log
  [ $keep_data = 1 ] || rm -rf "$dir/etcd"
  deadline=$(( $(date +%s) + ${TANDEM_CLUSTER_TIMEOUT:-180} ))
  trap 'say "interrupted"; fail_up' INT TERM

  start etcd "$ebin/etcd" --name tandem --data-dir "$dir/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "tandem=http://127.0.0.1:$etcd_peer_port" --log-level warn
  wait_for etcd "etcd /health" curl -sf --max-time 2 "http://127.0.0.1:$etcd_port/health" || fail_up

  printf '%s\n' "${TANDEM_APISERVER_FLAGS:-}" > "$dir/kube-apiserver.flags"
  start_apiserver
  wait_for kube-apiserver "kube-apiserver /readyz" readyz || fail_up

  kubeconfig "$dir/admin.kubeconfig" tandem-admin admin
  kubeconfig "$dir/kube-controller-manager.kubeconfig" system:kube-controller-manager kcm
  # Only the controllers a control plane without kubelets can live with: no
  # node-lifecycle, taint-eviction or pod-garbage-collector (they would mark pods
  # NotReady, evict or delete them for want of kubelet heartbeats).
  local kc=$dir/kube-controller-manager.kubeconfig
  start kube-controller-manager "$kbin/kube-controller-manager" \
    --kubeconfig="$kc" --authentication-kubeconfig="$kc" --authorization-kubeconfig="$kc" \
    --bind-address=127.0.0.1 --secure-port="$kcm_port" \
    --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --controllers="$controllers" \
    --profiling=false
  wait_for kube-controller-manager "kube-controller-manager /healthz" kcm_healthz || fail_up
  wait_for kube-controller-manager "ServiceAccount default/default" default_sa || fail_up
  trap - INT TERM

  cat > "$dir/cluster.env" <<EOF
TANDEM_CLUSTER_DIR='$dir'
TANDEM_CLUSTER_SERVER='https://127.0.0.1:$apiserver_port'
TANDEM_CLUSTER_KUBECONFIG='$dir/admin.kubeconfig'
TANDEM_CLUSTER_CA='$pki/ca.crt'
TANDEM_CLUSTER_TOKEN_FILE='$pki/admin-token'
TANDEM_CLUSTER_ETCD='http://127.0.0.1:$etcd_port'
TANDEM_CLUSTER_KCM='https://127.0.0.1:$kcm_port'
TANDEM_CLUSTER_BIN='$kbin:$ebin'
EOF
  [ -z "$watch_pid" ] || start_watcher
  say "up in $(since "$t0")s (tool check/build ${build_s}s): apiserver https://127.0.0.1:$apiserver_port, etcd 127.0.0.1:$etcd_port"
  say "use it: eval \"\$($0 env${dir:+ --dir $dir})\""
}

fail_up() {
  say "startup failed: stopping what was started (logs stay in $dir)"
  stop_all
  exit 1
}

start_watcher() {
  kill -0 "$watch_pid" 2>/dev/null || die "--watch-pid $watch_pid: no such process"
  local old; old=$(pid_of watcher)
  if ours "$old"; then kill -TERM "$old" 2>/dev/null || true; fi
  # The watcher's command line names $dir, so `down` recognises it as ours.
  # shellcheck disable=SC2016  # expanded by the watcher's bash
  setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done
    echo "watcher: pid $1 exited: stopping the cluster"
    TANDEM_CLUSTER_WATCHER=$$ exec "$2" down --dir "$3"' \
    cluster-watcher "$watch_pid" "$repo/scripts/cluster.sh" "$dir" \
    </dev/null >>"$dir/watcher.log" 2>&1 &
  echo $! > "$dir/watcher.pid"
  say "watcher (pid $!) runs down when pid $watch_pid exits"
}

do_stop() {
  local pid; pid=$(pid_of kube-apiserver)
  ours "$pid" || die "kube-apiserver is not running in $dir"
  kill -KILL "$pid"
  while alive "$pid"; do sleep 0.05; done
  rm -f "$dir/kube-apiserver.pid"
  say "killed kube-apiserver (pid $pid)"
}

do_start() {
  running kube-apiserver && { say "kube-apiserver already runs"; return 0; }
  [ -f "$dir/cluster.env" ] || die "no cluster in $dir (scripts/cluster.sh up)"
  # shellcheck disable=SC1091
  . "$dir/cluster.env"
  apiserver_port=${TANDEM_CLUSTER_SERVER##*:}
  etcd_port=${TANDEM_CLUSTER_ETCD##*:}
  deadline=$(( $(date +%s) + ${TANDEM_CLUSTER_TIMEOUT:-180} ))
  local t0; t0=$(now)
  start_apiserver
  wait_for kube-apiserver "kube-apiserver /readyz" readyz || die "kube-apiserver did not come back"
  say "kube-apiserver back in $(since "$t0")s"
}

do_down() {
  stop_all
  rm -f "$dir/cluster.env"
}

do_env() {
  local p
  if [ -f "$dir/cluster.env" ]; then  # the bin dirs the running cluster was started from
    # shellcheck disable=SC1091
    p=$(. "$dir/cluster.env"; echo "$TANDEM_CLUSTER_BIN")
  else
    p=$("$build_tools" --print-path kubernetes etcd)
  fi
  local h; h=$("$build_tools" --print-bin-dir h2spec)
  [ -x "$h/h2spec" ] && p=$p:$h
  printf 'export TANDEM_CLUSTER_DIR=%q\n' "$dir"
  printf 'export KUBECONFIG=%q\n' "$dir/admin.kubeconfig"
  # shellcheck disable=SC2016  # $PATH is for the eval
  printf 'export PATH=%q:"$PATH"\n' "$p"
}

do_status() {
  local any=0 c pid
  for c in "${components[@]}" watcher; do
    pid=$(pid_of "$c")
    if ours "$pid"; then printf '%-24s running  pid %s\n' "$c" "$pid"; any=1
    elif [ -n "$pid" ]; then printf '%-24s dead     (pid file says %s)\n' "$c" "$pid"
    else printf '%-24s stopped\n' "$c"; fi
  done
  if [ $any = 1 ] && [ -f "$dir/cluster.env" ]; then
    # shellcheck disable=SC1091
    . "$dir/cluster.env"
    printf 'apiserver  %s\netcd       %s\nkubeconfig %s\nlogs       %s/*.log\n' \
      "$TANDEM_CLUSTER_SERVER" "$TANDEM_CLUSTER_ETCD" "$TANDEM_CLUSTER_KUBECONFIG" "$dir"
  fi
  running kube-apiserver && running etcd && running kube-controller-manager
}

case $cmd in
  up) do_up ;;
  down) do_down ;;
  env) do_env ;;
  status) do_status ;;
  stop) do_stop ;;
  start) do_start ;;
esac
