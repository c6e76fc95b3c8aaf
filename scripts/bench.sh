#!/usr/bin/env bash
# The benchmark: `vm run` latency (cold, 5 runs) against a plain QEMU command
# line, banger's own overhead by phase, and 10 VMs in parallel. Runs inside a
# network namespace it creates; prints a table and appends it to
# docs/BENCHMARKS.md. Options: --runs N, --parallel N, --vmm qemu|firecracker,
# --network-only (per-VM network setup and teardown, alone and among 100).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo build --release --locked -p banger -p bangerd -p test-infra
BANGER_TEST_IMAGE=$(./scripts/test-image.sh target/release/banger)
export BANGER_TEST_IMAGE
exec target/release/bench "$@"
