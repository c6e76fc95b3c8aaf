#!/usr/bin/env bash
# Builds (once) the default image the tests and the benchmark boot, and
# prints its directory. Cached under /var/cache/banger-test by the hash of
# everything that goes into the image, so a change to the guest rebuilds it.
# This is the only step that downloads (Debian packages, like apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
banger=${1:?usage: test-image.sh PATH-TO-BANGER}

recipe=$(cat crates/banger-guest/assets/* crates/banger-guest/src/image.rs \
  crates/banger-guest/src/initramfs.rs crates/banger-guest/src/tree.rs \
  crates/banger-guest/src/kernel.rs crates/banger-guest/src/cpio.rs | sha256sum | cut -c1-16)
cache=/var/cache/banger-test/$recipe
image=$cache/state/images/bookworm
if [ ! -f "$image/manifest.json" ]; then
  echo "building the test image into $cache (cached for later runs)" >&2
  rm -rf /var/cache/banger-test
  mkdir -p "$cache"
  b=("$banger" --state-dir "$cache/state" --runtime-dir "$cache/run")
  # The daemon the build starts goes with this script, however it ends (a
  # failed build included); `daemon stop` starts none.
  trap '"${b[@]}" daemon stop >/dev/null 2>&1 || true' EXIT
  "${b[@]}" image build >&2
fi
echo "$image"
