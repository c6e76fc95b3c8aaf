#!/usr/bin/env bash
# Installs every Debian package banger and its tests use. Idempotent; run as
# root on a Debian bookworm machine (the Rust toolchain is expected present).
set -euo pipefail

packages=(
  qemu-system-x86   # the VMM (TCG here, KVM where hardware virtualisation exists); brings virtiofsd (--mount)
  qemu-utils        # qemu-img: vm commit flattens qcow2 roots; qemu-io: the tests check overlays
  mmdebstrap        # builds the guest root filesystem from Debian's packages
  e2fsprogs         # mkfs.ext4 (images, work disks), e2fsck + debugfs (image import, vm commit)
  xfsprogs          # mkfs.xfs: the tests' reflink state dir (a real XFS on a loop device)
  dmsetup           # device-mapper's tool: the dm-snapshot root disks, where the kernel has it
  busybox-static    # the initramfs' only program; also the tests' HTTP server
  iproute2          # ip: taps, namespaces, veths
  nftables          # per-VM NAT in banger's own table
  openssh-client    # ssh: banger reaches guests over SSH (ssh-keygen checks keys in tests)
  ca-certificates
  zsh fish          # the tests parse banger's completion scripts for them (bash is always there)
  systemd           # systemd-analyze verify checks banger's units; systemd-socket-activate hands bangerd its socket in the tests
  man-db            # man -l: the tests render banger's man pages
  passwd            # useradd/groupadd: the socket-group test's accounts
  binutils          # strip: the Debian package's binaries ship without debug info
  socat             # the socket-group test speaks raw JSON to bangerd as a member (what a client that skips the CLI sends)
  curl patch        # vhost-device-vsock's source from crates.io, and banger's fix to it
  python3 python3-venv  # the tests drive the E2B-compatible API with E2B's own Python SDK (scripts/e2b-sdk.sh)
  containerd        # the tests run containers through containerd-shim-banger-v2 (a containerd of their own; brings ctr and runc)
  containernetworking-plugins  # CNI plugins for the containerd tests' pods
  protobuf-compiler  # protoc: the containerd tests' CRI client is built from Kubernetes' CRI protos (k8s-cri)
)

# Two passes: installing one package can make apt remove another that was
# there (a machine image with a newer backported qemu-utils loses it to
# qemu-system-x86's Breaks); the second pass installs the matching version.
updated=
for pass in 1 2; do
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -gt 0 ] || break
  echo "installing (pass $pass): ${missing[*]}"
  [ -n "$updated" ] || { apt-get update -qq; updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
done
# Verified, not assumed: a package that is still missing is named.
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || {
    echo "install-deps: $p is still not installed after apt-get install" >&2
    exit 1
  }
done
command -v cargo >/dev/null || { echo "cargo not found: install the Rust toolchain (rustup) first" >&2; exit 1; }

# QEMU's vsock backend: vhost-device-vsock from the rust-vmm project
# (crates.io; Debian does not package it). It serves a guest's
# vhost-user-vsock device with Firecracker's hybrid-vsock interface on a
# Unix socket, and needs no vhost-vsock kernel module. Built from the
# published crate (checked against its checksum) with banger's fix for a
# stall of full-duplex connections (scripts/patches/, which says why); a
# copy of the patch beside the binary says which build is installed.
vsock_version=0.3.0
vsock_sha256=52ce95d81af89ad693d067c650e42df0f217addfbc96cc4820f7c62eb4a28b13
vsock_patch=$(dirname "$0")/patches/vhost-device-vsock-$vsock_version-flush.patch
vsock_built=/usr/local/share/banger-deps/vhost-device-vsock.patch
if ! /usr/local/bin/vhost-device-vsock --version 2>/dev/null | grep -q "$vsock_version" ||
   ! cmp -s "$vsock_patch" "$vsock_built"; then
  echo "building vhost-device-vsock $vsock_version (crates.io) with $vsock_patch"
  src=$(mktemp -d)
  trap 'rm -rf "$src"' EXIT
  curl -fsSL --retry 3 -o "$src/crate.tar.gz" \
    "https://static.crates.io/crates/vhost-device-vsock/vhost-device-vsock-$vsock_version.crate"
  echo "$vsock_sha256  $src/crate.tar.gz" | sha256sum --check --quiet
  tar -xzf "$src/crate.tar.gz" -C "$src"
  patch --quiet -d "$src/vhost-device-vsock-$vsock_version" -p1 <"$vsock_patch"
  cargo install --quiet --locked --force --root /usr/local --path "$src/vhost-device-vsock-$vsock_version"
  install -D -m 0644 "$vsock_patch" "$vsock_built"
  rm -rf "$src"
  trap - EXIT
fi
/usr/local/bin/vhost-device-vsock --version >/dev/null
