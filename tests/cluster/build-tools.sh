#!/usr/bin/env bash
# Builds the real components the cluster tests use, from the pinned Go modules in
# tests/cluster/tools/<tool>/ (go.mod + go.sum, checked in), into a cache outside the
# repository keyed by tool and version:
#
#   ${TANDEM_TOOLS:-$HOME/.cache/tandem-tools}/<tool>-<version>/bin/
#
# A tool is rebuilt only when one of its binaries is missing or its go.mod/go.sum
# changed. Go's module cache stays where Go keeps it (GOMODCACHE, default ~/go/pkg/mod).
#
#   tests/cluster/build-tools.sh [TOOL...]          build (default: all tools)
#   tests/cluster/build-tools.sh --print-bin-dir TOOL   print TOOL's bin dir (no build)
#   tests/cluster/build-tools.sh --print-path [TOOL...] print bin dirs joined by ':' (no build)
#   tests/cluster/build-tools.sh --list             print tool, version, bin dir, built?
#
# Tools: kubernetes (kube-apiserver, kube-controller-manager, kubectl), etcd, h2spec,
# jaeger (the all-in-one Jaeger v2: OTLP in, query API out; tests/e2e/tracing.rs),
# prometheus (Prometheus and promtool, with Kubernetes discovery, which Debian's
# package is built without; tests/e2e/observe.rs), dashcheck (dashboard-check: Grafana dashboards against the Grafana Foundation SDK's
# schema; its main.go is ours, the schema the pinned SDK's).
# Needs Go >= 1.26 (the modules say `go 1.26.0`). The build output goes to stderr;
# stdout carries only what the --print options print and, after a build, one line
# per tool: "<tool> <version> <bin dir>".
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tools_src=$here/tools
cache=${TANDEM_TOOLS:-$HOME/.cache/tandem-tools}
all_tools=(kubernetes etcd h2spec jaeger prometheus dashcheck)

log() { printf '%s\n' "$*" >&2; }
die() { printf 'build-tools: error: %s\n' "$*" >&2; exit 1; }

# Per tool: the Go module that is pinned, the packages to build and the binary names.
tool_module() {
  case $1 in
    kubernetes) echo k8s.io/kubernetes ;;
    etcd) echo go.etcd.io/etcd/server/v3 ;;
    h2spec) echo github.com/summerwind/h2spec ;;
    jaeger) echo github.com/jaegertracing/jaeger ;;
    prometheus) echo github.com/prometheus/prometheus ;;
    dashcheck) echo github.com/grafana/grafana-foundation-sdk/go ;;
    *) die "unknown tool '$1' (known: ${all_tools[*]})" ;;
  esac
}
tool_bins() {
  case $1 in
    kubernetes) echo kube-apiserver kube-controller-manager kubectl ;;
    etcd) echo etcd ;;
    h2spec) echo h2spec ;;
    jaeger) echo jaeger ;;
    prometheus) echo prometheus promtool ;;
    dashcheck) echo dashboard-check ;;
  esac
}

# The pinned version, read from the checked-in go.mod (no network, no go command).
tool_version() {
  local mod; mod=$(tool_module "$1")
  local v
  v=$(awk -v m="$mod" '$1 == "require" { $1 = "" ; $0 = $0 } $1 == m && $2 ~ /^v/ { print $2; exit }' "$tools_src/$1/go.mod")
  [ -n "$v" ] || die "no version of $mod in $tools_src/$1/go.mod"
  echo "$v"
}

bin_dir() { echo "$cache/$1-$(tool_version "$1")/bin"; }

# The build recipe of a tool, one word per line: the -ldflags, then the packages.
recipe() {
  local t=$1 v; v=$(tool_version "$t")
  local ld="-s -w"
  case $t in
    kubernetes)
      # What hack/lib/version.sh stamps, so `kubectl version` and /version say v1.x.y
      # (otherwise v0.0.0-master+$Format:%H$). The commit hash is not known from the
      # module proxy, so gitCommit is left as is; buildDate stays 1970 (reproducible).
      local x=${v#v} maj min p
      maj=${x%%.*}; min=${x#*.}; min=${min%%.*}
      for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld+=" -X $p.gitVersion=$v -X $p.gitMajor=$maj -X $p.gitMinor=$min -X $p.gitTreeState=clean"
      done
      printf '%s\n' "$ld" k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl ;;
    etcd) printf '%s\n' "$ld" go.etcd.io/etcd/server/v3 ;;
    h2spec)
      v=${v#v}; printf '%s\n' "$ld -X main.VERSION=${v%+incompatible}" github.com/summerwind/h2spec/cmd/h2spec ;;
    jaeger) printf '%s\n' "$ld" github.com/jaegertracing/jaeger/cmd/jaeger ;;
    prometheus)
      # What `promu` stamps, so `prometheus --version` says 3.x.y.
      # (module v0.MNN.P is Prometheus M.NN.P)
      local x=${v#v0.} m; m=${x%%.*}
      ld+=" -X github.com/prometheus/common/version.Version=${m:0:1}.${m:1}.${x#*.}"
      printf '%s\n' "$ld" github.com/prometheus/prometheus/cmd/prometheus \
        github.com/prometheus/prometheus/cmd/promtool ;;
    dashcheck) printf '%s\n' "$ld" . ;;
  esac
}

# A digest of what goes into a build: go.mod, go.sum, the recipe and the Go version.
# When it changes, the tool is rebuilt into the same versioned directory.
stamp_of() {
  # shellcheck disable=SC2046 # a tool of ours has its sources beside go.mod
  cat "$tools_src/$1/go.mod" "$tools_src/$1/go.sum" $(find "$tools_src/$1" -maxdepth 1 -name '*.go' | sort) <(recipe "$1") \
    <(go env GOVERSION GOOS GOARCH 2>/dev/null) | sha256sum | cut -c1-16
}

is_built() {
  local t=$1 d; d=$(bin_dir "$t")
  for b in $(tool_bins "$t"); do [ -x "$d/$b" ] || return 1; done
  [ -f "$d/../stamp" ] && [ "$(cat "$d/../stamp")" = "$(stamp_of "$t")" ]
}

build_one() {
  local t=$1 v out tmp ld
  v=$(tool_version "$t")
  out=$(dirname "$(bin_dir "$t")")
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.$t-$v.XXXXXX")
  mkdir -p "$tmp/bin"; chmod 755 "$tmp"
  local r=(); mapfile -t r < <(recipe "$t")
  ld=${r[0]}; local pkgs=("${r[@]:1}")
  # Build inside the checked-in module: -mod=readonly makes a go.mod/go.sum that does
  # not pin everything an error instead of a silent re-resolution.
  (
    cd "$tools_src/$t"
    export CGO_ENABLED=0 GOWORK=off GOFLAGS=-buildvcs=false
    if [ "$t" = etcd ]; then
      # go build names a .../server/v3 main "server"; name it etcd.
      go build -mod=readonly -trimpath -ldflags "$ld" -o "$tmp/bin/etcd" "${pkgs[@]}"
    elif [ "$t" = dashcheck ]; then
      go build -mod=readonly -trimpath -ldflags "$ld" -o "$tmp/bin/dashboard-check" "${pkgs[@]}"
    elif [ "$t" = prometheus ]; then
      # Kubernetes discovery only: the other clouds' SDKs would triple the build.
      go build -mod=readonly -trimpath -tags remove_all_sd,enable_kubernetes_sd \
        -ldflags "$ld" -o "$tmp/bin/" "${pkgs[@]}"
    else
      go build -mod=readonly -trimpath -ldflags "$ld" -o "$tmp/bin/" "${pkgs[@]}"
    fi
  ) >&2 || { rm -rf "$tmp"; return 1; }
  stamp_of "$t" > "$tmp/stamp"
  # Swap in atomically-ish: a concurrent reader sees the old or the new directory.
  rm -rf "$out.old"; [ -e "$out" ] && mv "$out" "$out.old"
  mv "$tmp" "$out"; rm -rf "$out.old"
}

check_go() {
  command -v go >/dev/null || die "go not found: install Go >= 1.26 (the tool modules need it)"
  local gv; gv=$(go env GOVERSION); gv=${gv#go}
  local maj=${gv%%.*} min=${gv#*.}; min=${min%%.*}
  if [ "$maj" -lt 1 ] || { [ "$maj" -eq 1 ] && [ "$min" -lt 26 ]; }; then
    die "go $gv is too old: the tool modules need Go >= 1.26"
  fi
}

# --- options -------------------------------------------------------------------------
case ${1:-} in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  --print-bin-dir)
    [ $# -eq 2 ] || die "usage: $0 --print-bin-dir TOOL"
    bin_dir "$2"; exit 0 ;;
  --print-path)
    shift; [ $# -gt 0 ] || set -- "${all_tools[@]}"
    p=""; for t in "$@"; do p+="${p:+:}$(bin_dir "$t")"; done; echo "$p"; exit 0 ;;
  --list)
    check_go
    for t in "${all_tools[@]}"; do
      s=missing; is_built "$t" && s=built
      printf '%-10s %-22s %-7s %s\n' "$t" "$(tool_version "$t")" "$s" "$(bin_dir "$t")"
    done
    exit 0 ;;
  -*) die "unknown option $1 (see --help)" ;;
esac

[ $# -gt 0 ] || set -- "${all_tools[@]}"
for t in "$@"; do tool_module "$t" >/dev/null; done
check_go

for t in "$@"; do
  v=$(tool_version "$t")
  mkdir -p "$cache"
  exec 9>"$cache/.$t.lock"
  flock 9   # one build per tool at a time; a second caller waits, then finds it built
  if is_built "$t"; then
    log "build-tools: $t $v: up to date in $(bin_dir "$t")"
  else
    log "build-tools: building $t $v ($(tool_module "$t")@$v; $(tool_bins "$t")) ..."
    start=$(date +%s)
    if ! build_one "$t"; then
      die "building $t failed: module $(tool_module "$t")@$v (pinned in $tools_src/$t/go.mod)"
    fi
    log "build-tools: built $t $v in $(( $(date +%s) - start ))s -> $(bin_dir "$t")"
  fi
  exec 9>&-
  echo "$t $v $(bin_dir "$t")"
done
