#!/usr/bin/env bash
# Builds the guest agent as a static executable (glibc, statically linked:
# the guest may have no library the host has) and prints its path. The
# `agent` profile keeps it small (it rides in every VM's initramfs).
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --locked --profile agent -p banger-agent --bin banger-agent --target "$target" >&2
echo "$PWD/target/$target/agent/banger-agent"
