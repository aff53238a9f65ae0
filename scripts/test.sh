#!/usr/bin/env bash
# Runs every Tandem test, after installing what the tests need on a Debian machine.
#
#   scripts/test.sh
#
# Needs: Debian (apt), root (the node agent makes network namespaces), Go >= 1.26 and a
# Rust toolchain >= 1.88 (rustup). Checks formatting and clippy, runs unit, property and
# end-to-end tests (real processes on loopback, a real Kubernetes control plane), and
# checks that the proxy binary does not link kube.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

# --- what the tests need -------------------------------------------------------------
if ! command -v cargo >/dev/null; then
  echo "error: cargo not found. Install Rust >= 1.88 with rustup (https://rustup.rs); Debian's cargo is too old for edition 2024." >&2
  exit 1
fi
rust_minor=$(rustc --version | awk '{ split($2, v, "."); print v[2] }')
if [ "$rust_minor" -lt 88 ]; then
  echo "error: $(rustc --version) is too old: Tandem needs Rust >= 1.88 (edition 2024, let-chains)." >&2
  exit 1
fi

# Debian packages the tests use: procps (kill, signalling processes by PID), gcc and
# make (the proxy's allocator, jemalloc, is C built by its -sys crate), python3 (free
# ports in the shell scripts), iproute2 and util-linux (the node agent's pod network
# namespaces, setpriv and mounts), openssl and curl (scripts/cluster.sh), iptables
# (`tandem-proxy init` in the pods' namespaces), curl and nghttp2-client (unmodified
# HTTP/1 and HTTP/2 clients inside meshed pods), tcpdump (what crosses the pods' bridge
# between meshed pods: TLS, never plaintext).
packages=(procps ca-certificates python3 gcc make iproute2 util-linux openssl curl iptables nghttp2-client tcpdump)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi
if ! command -v go >/dev/null; then
  echo "error: go not found: the tests build etcd, Kubernetes and h2spec from their Go modules (Go >= 1.26)." >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "warning: not root: the node agent cannot make network namespaces, so the tests of pods it runs will fail" >&2
fi

# --- tools built from pinned Go modules -----------------------------------------------
# etcd, kube-apiserver, kube-controller-manager and kubectl (the real cluster of
# tests/e2e/cluster.rs, which the tests start themselves, one per test process),
# h2spec (tests/e2e/h2spec.rs), Jaeger (tests/e2e/tracing.rs), Prometheus and promtool
# and the dashboard checker (tests/e2e/observe.rs), into a cache outside the repository
# keyed by version: about 25 minutes cold on 2 cores, nothing once cached. Built in the
# background while the checks and the tests below compile (rustc and the linker leave
# cores idle), and waited for before the tests run.
say "tools from Go modules (tests/cluster/build-tools.sh), in the background"
tools_log=$(mktemp)
# In a process group of its own, so that an early exit stops the Go builds with it.
setsid tests/cluster/build-tools.sh kubernetes etcd h2spec jaeger prometheus dashcheck >/dev/null 2>"$tools_log" &
tools_pid=$!
trap 'kill -- "-$tools_pid" 2>/dev/null || true; rm -f "$tools_log"' EXIT

# --- checks ---------------------------------------------------------------------------
say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

say "the benchmark scripts parse"
for script in bench/*.sh; do bash -n "$script"; done

say "the proxy binary does not link kube"
if cargo tree -p tandem-proxy -e normal --prefix none | grep -E '^(kube|k8s-openapi)' ; then
  echo "error: tandem-proxy depends on kube/k8s-openapi; the sidecar must stay small" >&2
  exit 1
fi

say "no import cycles between the modules of any crate (scripts/module-cycles.sh)"
# cargo-modules 0.27 needs Rust >= 1.95 (0.28: 1.98); about 15 minutes to build, once.
command -v cargo-modules >/dev/null || cargo install cargo-modules --version 0.27.0 --locked
scripts/module-cycles.sh

say "building the tests (while the tools build)"
cargo test --workspace --no-run

say "waiting for the tools from Go modules"
if ! wait "$tools_pid"; then
  cat "$tools_log" >&2
  echo "error: building the tools from their Go modules failed (above)" >&2
  exit 1
fi
grep -E 'built|up to date' "$tools_log" || true
bin() { echo "$(tests/cluster/build-tools.sh --print-bin-dir "$1")/$2"; }
TANDEM_H2SPEC=$(bin h2spec h2spec)
TANDEM_JAEGER=$(bin jaeger jaeger)
TANDEM_PROMETHEUS=$(bin prometheus prometheus)
TANDEM_PROMTOOL=$(bin prometheus promtool)
TANDEM_DASHBOARD_CHECK=$(bin dashcheck dashboard-check)
export TANDEM_H2SPEC TANDEM_JAEGER TANDEM_PROMETHEUS TANDEM_PROMTOOL TANDEM_DASHBOARD_CHECK

say "cargo test"
cargo test --workspace

say "all tests passed"
