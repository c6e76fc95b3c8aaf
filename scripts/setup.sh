#!/usr/bin/env bash
# The main job on a fresh machine: install what banger needs, build it,
# install the binaries, build the default image and run a command in a VM.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo build --release --locked -p banger -p bangerd
install -m 0755 target/release/banger target/release/bangerd /usr/local/bin/
banger image build
banger vm run --rm -- cat /etc/os-release
