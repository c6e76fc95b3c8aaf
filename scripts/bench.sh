#!/usr/bin/env bash
# The benchmark: `vm run` latency (cold, 5 runs) against a plain QEMU command
# line, banger's own overhead by phase, 10 VMs in parallel, and the guest
# agent (exec round trips, 256 MiB copies against ssh). Runs inside a
# network namespace it creates; prints a table and appends it to
# docs/BENCHMARKS.md. Options: --runs N, --parallel N, --vmm qemu|firecracker,
# --network-only (per-VM network setup and teardown, alone and among 100),
# --agent-only (exec round trips and copies), --memory-only (the VMM's memory
# beyond the guest's, in its cgroup), --storage-only (root-disk
# preparation per strategy, 1 GiB and 8 GiB images, 20 VMs in a row),
# --snapshots-only (`vm run` cold against warm, `vm snapshot`, `vm fork`,
# ten clones' memory, a 4 GiB guest's restore against a 256 MiB one's; then
# cold, warm, snapshot and fork on a jailed Firecracker or its doubles),
# --e2b-only (E2B's Python SDK's create-and-run and command round trip
# against `vm run` and `vm exec`), --containerd-only (`ctr run --rm` through
# banger's containerd runtime against `vm run --rm` and against runc),
# --compare REV (`vm run --rm -- true` and `vm exec` of this tree against
# revision REV, built in a worktree of its own, taking turns in one run).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo build --release --locked -p banger -p bangerd -p banger-shim -p test-infra
# QEMU's agent channel (bangerd finds it beside itself).
cargo build --release --locked -p banger-agent --bin banger-vport
BANGER_AGENT=$(./scripts/build-agent.sh)
export BANGER_AGENT
BANGER_TEST_IMAGE=$(./scripts/test-image.sh target/release/banger)
export BANGER_TEST_IMAGE
# E2B's own SDK, for --e2b-only.
BANGER_E2B_PYTHON=$(./scripts/e2b-sdk.sh)
export BANGER_E2B_PYTHON

args=("$@")
runs=5
for i in "${!args[@]}"; do
  if [ "${args[$i]}" = --runs ]; then runs=${args[$((i + 1))]:-5}; fi
done
for i in "${!args[@]}"; do
  [ "${args[$i]}" = --compare ] || continue
  rev=${args[$((i + 1))]:?--compare takes a revision}
  sha=$(git rev-parse --verify "$rev^{commit}")
  tree=/var/tmp/banger-bench-$sha
  other=/var/tmp/banger-bench-target
  git worktree prune
  [ -d "$tree" ] || git worktree add --detach "$tree" "$sha" >/dev/null
  # Its own target dir, kept between runs (a rebuild is incremental). Its
  # agent is where build-agent.sh builds it under that dir (the script
  # prints the path of its own tree's target). Other flags are not passed on.
  (cd "$tree" && export CARGO_TARGET_DIR=$other &&
     cargo build --release --locked -p banger -p bangerd &&
     ./scripts/build-agent.sh >/dev/null)
  exec target/release/bench --runs "$runs" --compare "$other/release/banger" \
    "$other/x86_64-unknown-linux-gnu/agent/banger-agent" "$(git rev-parse --short "$sha")"
done
exec target/release/bench "$@"
