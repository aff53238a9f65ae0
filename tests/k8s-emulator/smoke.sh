#!/usr/bin/env bash
# Smoke test of the Kubernetes API emulator with kubectl and curl.
#
#   tests/k8s-emulator/smoke.sh      # exit 0 only if every check passed
#
# setup.sh → start emulator.py → kubectl apply (create, then unchanged) → kubectl get
# → curl list + watch that sees a MODIFIED event after `kubectl apply` of a changed
# EndpointSlice → kubectl delete (the watch sees DELETED) → stop by PID → restart on the
# same port and re-apply → selftest.py (protocol checks).  Bounded: every step has a
# timeout and the whole script is re-run under `timeout` ($SMOKE_TIMEOUT s, default 420).
# Needs: bash, coreutils, curl, kubectl (>= 1.2x; KUBECTL=... to choose one).
set -uo pipefail

if [ -z "${SMOKE_UNDER_TIMEOUT:-}" ]; then
    export SMOKE_UNDER_TIMEOUT=1
    exec timeout -k 10 "${SMOKE_TIMEOUT:-420}" bash "$0" "$@"
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENV=${EMULATOR_VENV:-$ROOT/.venv}
KUBECTL_BIN=${KUBECTL:-kubectl}
export PYTHONDONTWRITEBYTECODE=1

PASSED=0
FAILED=0
EMU_PID=''
WATCH_PID=''
mkdir -p "$HERE/.tmp"
WORK=$(mktemp -d "$HERE/.tmp/smoke.XXXXXX")

ok() { PASSED=$((PASSED + 1)); echo "ok   $*"; }
bad() { FAILED=$((FAILED + 1)); echo "FAIL $*"; }
check() {  # check "description" command...
    local what=$1; shift
    if "$@"; then ok "$what"; else bad "$what"; fi
}
finish() {
    echo "$PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ] && [ "$PASSED" -gt 0 ]
}
STOP_RC=''
stop_pid() {  # stop_pid PID: SIGTERM, wait up to 10 s, then SIGKILL; sets STOP_RC (not in a subshell!)
    local pid=$1
    STOP_RC=''
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    timeout 10 tail --pid="$pid" -s 0.1 -f /dev/null 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null
    STOP_RC=$?
}
wait_events() {  # wait_events TYPE COUNT: poll the watch output until it has COUNT events of TYPE (15 s)
    local end=$((SECONDS + 15))
    while [ "$(grep -c "\"type\": \"$1\"" "$WORK/watch.jsonl")" -lt "$2" ]; do
        [ "$SECONDS" -lt "$end" ] || return 1
        sleep 0.1
    done
}
cleanup() {
    [ -n "$WATCH_PID" ] && kill "$WATCH_PID" 2>/dev/null
    [ -n "$EMU_PID" ] && stop_pid "$EMU_PID"
    if [ "$FAILED" -eq 0 ] && [ -z "${SMOKE_KEEP:-}" ]; then
        rm -rf "$WORK"
    else
        echo "(logs kept in $WORK)"
    fi
}
trap cleanup EXIT
trap 'echo "smoke: interrupted"; exit 1' INT TERM

# ---------------------------------------------------------------------------
echo "== setup"
if ! timeout 300 "$HERE/setup.sh"; then
    bad "setup.sh"
    finish
    exit 1
fi
ok "setup.sh"
PY=$VENV/bin/python
command -v "$KUBECTL_BIN" >/dev/null || { bad "kubectl not found"; finish; exit 1; }
command -v curl >/dev/null || { bad "curl not found"; finish; exit 1; }
json() {  # json 'python expression over d' < document
    "$PY" -c "import json, sys; d = json.load(sys.stdin); print($1)"
}

# start_emulator LOGNAME [args...]: sets EMU_PID and API, or returns 1
start_emulator() {
    local name=$1 line=''; shift
    rm -f "$WORK/$name.out"
    mkfifo "$WORK/$name.out"
    "$PY" "$HERE/emulator.py" --kubeconfig "$WORK/kubeconfig" "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
    EMU_PID=$!
    exec 3<"$WORK/$name.out"           # stays open: the emulator's stdout never breaks
    if ! read -r -t 30 -u 3 line; then  # blocks until the ready line, at most 30 s
        echo "emulator did not become ready; its log:"; tail -20 "$WORK/$name.log"
        return 1
    fi
    echo "ready line: $line"
    API=$(printf '%s\n' "$line" | sed -n 's/^{"listening":{"api":"\(127\.0\.0\.1:[0-9]\{1,5\}\)"}}$/\1/p')
    [ -n "$API" ]
}

echo "== start"
if ! start_emulator emulator1; then bad "emulator.py prints {\"listening\":{\"api\":\"127.0.0.1:PORT\"}}"; finish; exit 1; fi
ok "emulator.py ready at $API (pid $EMU_PID)"
PORT=${API#*:}
URL=http://$API
KC=("$KUBECTL_BIN" --kubeconfig "$WORK/kubeconfig" --cache-dir "$WORK/kube-cache" --request-timeout 10s)
kc() { timeout 30 "${KC[@]}" "$@"; }
check "kubeconfig: context emulator, server $URL, namespace default" \
    test "$(kc config view -o jsonpath='{.current-context} {.clusters[0].cluster.server} {.contexts[0].context.namespace}')" = "emulator $URL default"

# ---------------------------------------------------------------------------
echo "== kubectl apply (create, then again: unchanged)"
kc apply -f "$HERE/manifests/" >"$WORK/apply1.txt" 2>&1
cat "$WORK/apply1.txt"
check "kubectl apply creates all 10 objects" test "$(grep -c ' created$' "$WORK/apply1.txt")" -eq 10
kc apply -f "$HERE/manifests/" >"$WORK/apply2.txt" 2>&1
check "kubectl apply again: all 10 unchanged" test "$(grep -c ' unchanged$' "$WORK/apply2.txt")" -eq 10

echo "== kubectl get"
kc get namespaces,nodes -L topology.kubernetes.io/region,topology.kubernetes.io/zone 2>&1
kc get services,pods,endpointslices -n default 2>&1
check "get namespace shop" kc get namespace shop -o name
check "get nodes: 3 zones in 2 regions" test "$(kc get nodes -o jsonpath='{range .items[*]}{.metadata.labels.topology\.kubernetes\.io/region}/{.metadata.labels.topology\.kubernetes\.io/zone}{"\n"}{end}' | sort -u | tr '\n' ' ')" = "eu-west/eu-west-1a eu-west/eu-west-1b us-east/us-east-1a "
check "get service web: clusterIP and port http 80->8080" \
    test "$(kc get service web -o jsonpath='{.spec.clusterIP} {.spec.ports[0].name} {.spec.ports[0].port} {.spec.ports[0].targetPort}')" = "10.96.0.10 http 80 8080"
check "get pods: 3 with weight annotations" \
    test "$(kc get pods -o jsonpath='{range .items[*]}{.metadata.annotations.tandem\.io/weight} {end}')" = "100 100 50 "
check "get endpointslices -l kubernetes.io/service-name=web: 2" \
    test "$(kc get endpointslices -l kubernetes.io/service-name=web -o name | wc -l)" -eq 2

# ---------------------------------------------------------------------------
echo "== curl list + watch"
SLICES="$URL/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
SEL='labelSelector=kubernetes.io%2Fservice-name%3Dweb'
timeout 10 curl -sf "$SLICES?$SEL&limit=500" >"$WORK/list.json"
LIST_RV=$(json 'd["metadata"]["resourceVersion"]' <"$WORK/list.json" 2>/dev/null)
check "curl list: EndpointSliceList, 2 items, resourceVersion=$LIST_RV" \
    test "$(json 'd["kind"], len(d["items"]), all(i["metadata"].get("resourceVersion") for i in d["items"])' <"$WORK/list.json")" = "EndpointSliceList 2 True"
# Exactly what kube-runtime's watcher sends after its list:
timeout 40 curl -sN "$SLICES?watch=true&timeoutSeconds=30&allowWatchBookmarks=true&$SEL&resourceVersion=$LIST_RV" >"$WORK/watch.jsonl" &
WATCH_PID=$!
kc apply -f "$HERE/manifests/updates/" >"$WORK/apply3.txt" 2>&1
cat "$WORK/apply3.txt"
check "kubectl apply of the changed slice: configured" grep -q 'web-abc12 configured' "$WORK/apply3.txt"
# Event-driven wait for the MODIFIED line (tail -f follows the file; grep exits on the match).
check "watch sees MODIFIED" wait_events MODIFIED 1
check "MODIFIED web-abc12: node-b endpoint not ready, terminating; resourceVersion > $LIST_RV" test "$(
    "$PY" - "$WORK/watch.jsonl" "$LIST_RV" <<'EOF'
import json, sys
events = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
mod = [e for e in events if e['type'] == 'MODIFIED']
o = mod[0]['object']
ep = [e for e in o['endpoints'] if e.get('nodeName') == 'node-b'][0]
print(o['metadata']['name'], ep['conditions'], int(o['metadata']['resourceVersion']) > int(sys.argv[2]))
EOF
)" = "web-abc12 {'ready': False, 'serving': True, 'terminating': True} True"

# ---------------------------------------------------------------------------
echo "== kubectl delete"
kc delete -f "$HERE/manifests/" >"$WORK/delete.txt" 2>&1
cat "$WORK/delete.txt"
check "kubectl delete: all 10 deleted" test "$(grep -c ' deleted' "$WORK/delete.txt")" -eq 10
check "watch sees DELETED for both slices" wait_events DELETED 2
check "kubectl get: nothing left" test -z "$(kc get namespaces,nodes,services,pods,endpointslices -A -o name 2>/dev/null)"
kill "$WATCH_PID" 2>/dev/null; wait "$WATCH_PID" 2>/dev/null; WATCH_PID=''
echo "watch events: $(cut -c1-40 "$WORK/watch.jsonl" | sed 's/"object".*//' | tr -d '{' | tr '\n' ' ')"

# ---------------------------------------------------------------------------
echo "== stop, restart on the same port, re-apply"
timeout 30 curl -sN "$URL/api/v1/pods?watch=true" >/dev/null &  # an open watch must not delay the stop
WATCH_PID=$!
stop_pid "$EMU_PID"
EMU_PID=''
check "emulator stops on SIGTERM with exit 0 (while a watch is open)" test "$STOP_RC" = 0
wait "$WATCH_PID" 2>/dev/null; WATCH_PID=''
if start_emulator emulator2 --port "$PORT"; then ok "restarted on the same port $PORT"; else bad "restart on port $PORT"; fi
kc apply -f "$HERE/manifests/" >"$WORK/apply4.txt" 2>&1
check "re-apply after restart: all 10 created" test "$(grep -c ' created$' "$WORK/apply4.txt")" -eq 10
echo "resourceVersions after restart: $(kc get namespaces,nodes,services,pods,endpointslices -A -o jsonpath='{range .items[*]}{.metadata.name}={.metadata.resourceVersion} {end}')"
stop_pid "$EMU_PID"
EMU_PID=''
check "emulator stops again with exit 0" test "$STOP_RC" = 0

# ---------------------------------------------------------------------------
echo "== selftest.py (protocol checks)"
if timeout 180 "$PY" "$HERE/selftest.py" >"$WORK/selftest.txt" 2>&1; then
    ok "selftest.py: $(tail -1 "$WORK/selftest.txt")"
else
    grep -v '^ok' "$WORK/selftest.txt"
    bad "selftest.py"
fi

finish
