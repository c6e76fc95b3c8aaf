#!/usr/bin/env bash
# The benchmark: `vm run` latency (cold, 5 runs) against a plain QEMU command
# line, banger's own overhead by phase, 10 VMs in parallel, and the guest
# agent (exec round trips, 256 MiB copies against ssh). Runs inside a
# network namespace it creates; prints a table and appends it to
# docs/BENCHMARKS.md. Options: --runs N, --parallel N, --vmm qemu|firecracker,
# --network-only (per-VM network setup and teardown, alone and among 100),
# --agent-only (exec round trips and copies), --memory-only (the VMM's memory
# beyond the guest's, in its cgroup), --storage-only (root-disk
# preparation per strategy, 1 GiB and 8 GiB images, 20 VMs in a row).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo build --release --locked -p banger -p bangerd -p test-infra
BANGER_AGENT=$(./scripts/build-agent.sh)
export BANGER_AGENT
BANGER_TEST_IMAGE=$(./scripts/test-image.sh target/release/banger)
export BANGER_TEST_IMAGE
exec target/release/bench "$@"
