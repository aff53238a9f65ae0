#!/usr/bin/env bash
# Discovery benchmarks: fan-out of one change to 1,000 subscribers, and services of
# 1,000 / 10,000 endpoints from Kubernetes (the kmock emulator). Prints markdown.
#
#   bench/discovery.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tests/k8s-emulator/setup.sh >&2
cargo build --release -p tandem --bin tandem --example discovery_bench >&2
TARGET=${CARGO_TARGET_DIR:-target}
echo "# Discovery benchmarks, $(date -u +%Y-%m-%d), $(nproc) CPUs"
echo
"$TARGET/release/examples/discovery_bench" "$TARGET/release/tandem" "$PWD/.venv/bin/python" "$PWD/tests/k8s-emulator/emulator.py"
