#!/usr/bin/env bash
# Discovery benchmarks: fan-out of one change to 1,000 subscribers, and services of
# 1,000 / 10,000 endpoints from Kubernetes (a real API server: the benchmark brings up
# a cluster control plane of its own with scripts/cluster.sh and takes it down at the
# end; the first run builds etcd and Kubernetes, about 11 minutes). Prints markdown.
#
#   bench/discovery.sh
#   FANOUT_ONLY=1 SUBSCRIBERS=500 ENDPOINTS=1000 bench/discovery.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p tandem --bin tandem --example discovery_bench >&2
TARGET=${CARGO_TARGET_DIR:-target}
echo "# Discovery benchmarks, $(date -u +%Y-%m-%d), $(nproc) CPUs"
echo
"$TARGET/release/examples/discovery_bench" "$TARGET/release/tandem" "$PWD/scripts/cluster.sh"
