#!/usr/bin/env bash
# The main job on a fresh machine: install what banger needs, build its
# Debian package and install it (both binaries, the guest agent, the
# systemd units, the group banger, completions, man pages), build the
# default image and run a command in a VM.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
deb=$(./scripts/package.sh)
# A daemon from an older install would keep serving the old code: stop it
# (its VMs keep running; the new daemon reconciles them). Waited for, not
# slept on: a draining daemon finishes its requests first.
if pkill -TERM -x bangerd; then
  for _ in $(seq 600); do pgrep -x bangerd >/dev/null || break; sleep 0.1; done
fi
# Earlier versions of this script installed into /usr/local, which PATH
# puts before the package's /usr/bin.
rm -f /usr/local/bin/banger /usr/local/bin/bangerd
rm -rf /usr/local/lib/banger
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$deb" >/dev/null
banger image build
banger vm run --rm -- cat /etc/os-release
# The VM is gone; wait for the daemon to release its tap and NAT rules too,
# so that the host is back to how it was when this script returns.
banger daemon settle
