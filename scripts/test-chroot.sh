#!/usr/bin/env bash
# Builds (once) a fresh Debian bookworm tree holding what banger's package
# depends on, and prints its directory: the package test installs the
# .deb into a copy of it (dpkg -i needs no network then), runs banger
# doctor there and purges it. Cached under /var/cache/banger-test-chroot
# by the hash of the package's Depends and of this script; like
# test-image.sh, this step downloads (Debian packages, like apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
depends=$(sed -n 's/^Depends: //p' packaging/debian/control)
key=$( (echo "$depends"; cat "$0") | sha256sum | cut -c1-16)
cache=/var/cache/banger-test-chroot
tree=$cache/$key
if [ ! -f "$tree/.complete" ]; then
  echo "building the package test's Debian tree into $tree (cached for later runs)" >&2
  rm -rf "$cache"
  mkdir -p "$cache"
  mmdebstrap --mode=root --variant=minbase \
    --dpkgopt=path-exclude=/usr/share/locale/* \
    --include="$(echo "$depends" | tr -d ' ')" \
    bookworm "$tree" >&2
  touch "$tree/.complete"
fi
echo "$tree"
