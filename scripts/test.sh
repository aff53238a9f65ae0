#!/usr/bin/env bash
# Runs every Tandem test, after installing what the tests need on a Debian machine.
#
#   scripts/test.sh
#
# Needs: Debian (apt), root or sudo for the packages, and a Rust toolchain >= 1.88
# (rustup). Checks formatting and clippy, runs unit, property and end-to-end tests
# (real processes on loopback), and checks that the proxy binary does not link kube.
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

# Debian packages the tests use (procps: kill, for signalling processes by PID;
# python3-venv: the Kubernetes API emulator's virtualenv; gcc and make: the proxy's
# allocator, jemalloc, is C built by its -sys crate).
packages=(procps ca-certificates python3 python3-venv gcc make)
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

if ! command -v kubectl >/dev/null; then
  echo "error: kubectl not found: the Kubernetes tests apply manifests with it (it is on the machine image; elsewhere install it from https://kubernetes.io/docs/tasks/tools/)." >&2
  exit 1
fi

say "Kubernetes API emulator (kmock, in .venv)"
tests/k8s-emulator/setup.sh

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

# --- h2spec: the HTTP/2 conformance tool tests/e2e/h2spec.rs runs -------------------
# Built (Go >= 1.26, pinned in tests/cluster/tools/h2spec/go.mod) into the tool cache,
# or found there up to date; the e2e test fails, never skips, without it.
say "h2spec (tests/cluster/build-tools.sh h2spec)"
tests/cluster/build-tools.sh h2spec >/dev/null
TANDEM_H2SPEC="$(tests/cluster/build-tools.sh --print-bin-dir h2spec)/h2spec"
export TANDEM_H2SPEC
# --- end of h2spec --------------------------------------------------------------------

# --- cluster: the real control plane and node agent of tests/e2e/cluster.rs ----------
# etcd, kube-apiserver, kube-controller-manager and kubectl, built from pinned Go
# modules into the tool cache (cold: about 11 minutes on 2 cores; cached after). The
# node agent builds pod networks and runs pods' processes with iproute2 (ip netns) and
# util-linux (setpriv, mount), as root; scripts/cluster.sh needs openssl and curl. The
# tests start the cluster themselves (one per test process).
say "cluster tools (tests/cluster/build-tools.sh kubernetes etcd) and the node agent's packages"
cluster_missing=()
for p in iproute2 util-linux openssl curl; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || cluster_missing+=("$p")
done
if [ ${#cluster_missing[@]} -gt 0 ]; then
  say "installing ${cluster_missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${cluster_missing[@]}"
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "warning: not root: the node agent cannot make network namespaces, so the e2e tests of pods it runs will fail" >&2
fi
tests/cluster/build-tools.sh kubernetes etcd >/dev/null
# --- end of cluster -------------------------------------------------------------------

say "cargo test"
cargo test --workspace

say "all tests passed"
