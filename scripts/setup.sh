#!/usr/bin/env bash
# The main job on a fresh machine: install what banger needs, build it,
# install the binaries, build the default image and run a command in a VM.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo build --release --locked -p banger -p bangerd
# A daemon from an older install would keep serving the old code: stop it
# (its VMs keep running; the new daemon reconciles them).
# Waited for, not slept on: a draining daemon finishes its requests first.
if pkill -TERM -x bangerd; then
  for _ in $(seq 600); do pgrep -x bangerd >/dev/null || break; sleep 0.1; done
fi
agent=$(./scripts/build-agent.sh)
install -m 0755 target/release/banger target/release/bangerd /usr/local/bin/
install -D -m 0755 "$agent" /usr/local/lib/banger/banger-agent
banger image build
banger vm run --rm -- cat /etc/os-release
# The VM is gone; wait for the daemon to release its tap and NAT rules too,
# so that the host is back to how it was when this script returns.
banger daemon settle
