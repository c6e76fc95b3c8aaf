#!/usr/bin/env bash
# Builds banger's Debian package and prints its path: both binaries,
# containerd's runtime (containerd-shim-banger-v2) and its config snippet,
# the guest agent, QEMU's agent channel (banger-vport) and vsock backend (in
# /usr/lib/banger), the systemd
# units, an example config, completions and man pages. dpkg-deb builds it
# (the package's tree is laid out here; nothing but Debian's own tools).
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
cargo build --release --locked -p banger -p bangerd -p banger-shim >&2
# (A target flag selects in every package given: its own build.)
cargo build --release --locked -p banger-agent --bin banger-vport >&2
agent=$(./scripts/build-agent.sh)
vsock=$(command -v vhost-device-vsock || true)
[ -n "$vsock" ] || { echo "package: vhost-device-vsock is not installed (scripts/install-deps.sh)" >&2; exit 1; }

out=target/deb
root=$out/banger_${version}_amd64
rm -rf "$root"
install -D -m 0755 target/release/banger "$root/usr/bin/banger"
install -D -m 0755 target/release/bangerd "$root/usr/bin/bangerd"
install -D -m 0755 target/release/containerd-shim-banger-v2 "$root/usr/bin/containerd-shim-banger-v2"
install -D -m 0755 "$agent" "$root/usr/lib/banger/banger-agent"
install -D -m 0755 "$vsock" "$root/usr/lib/banger/vhost-device-vsock"
install -D -m 0755 target/release/banger-vport "$root/usr/lib/banger/banger-vport"
# Debian's packages ship without debug info (dh_strip's habit).
strip --strip-debug "$root/usr/bin/banger" "$root/usr/bin/bangerd" \
  "$root/usr/bin/containerd-shim-banger-v2" \
  "$root/usr/lib/banger/vhost-device-vsock" "$root/usr/lib/banger/banger-vport"
install -D -m 0644 packaging/systemd/banger.socket "$root/lib/systemd/system/banger.socket"
install -D -m 0644 packaging/systemd/banger.service "$root/lib/systemd/system/banger.service"
install -D -m 0644 packaging/config.toml "$root/etc/banger/config.toml"
install -D -m 0644 README.md "$root/usr/share/doc/banger/README.md"
install -D -m 0644 packaging/containerd-banger.toml "$root/usr/share/doc/banger/containerd-banger.toml"

b=target/release/banger
mkdir -p "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
  "$root/usr/share/fish/vendor_completions.d" "$root/usr/share/man/man1" "$root/usr/share/man/man8"
"$b" completion bash > "$root/usr/share/bash-completion/completions/banger"
"$b" completion zsh > "$root/usr/share/zsh/vendor-completions/_banger"
"$b" completion fish > "$root/usr/share/fish/vendor_completions.d/banger.fish"
"$b" internal man "$root/usr/share/man/man1"
target/release/bangerd --print-man > "$root/usr/share/man/man8/bangerd.8"
gzip -9n "$root"/usr/share/man/man*/*

mkdir -p "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$size/" packaging/debian/control > "$root/DEBIAN/control"
install -m 0644 packaging/debian/conffiles "$root/DEBIAN/conffiles"
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$root/DEBIAN/"
dpkg-deb --build --root-owner-group -Zxz "$root" "$out/" >&2
echo "$PWD/$out/banger_${version}_amd64.deb"
