#!/usr/bin/env bash
# Installs (once) E2B's JavaScript SDK, at the version the tests of
# banger's E2B-compatible API target, into a directory of its own, and
# prints that directory (its node_modules holds `e2b`). Like e2b-sdk.sh
# this downloads (from the npm registry, as npm does); the tests
# themselves send nothing off the machine.
#
# The SDK needs Node.js >= 20.18.1. A machine without Node.js gets
# Debian's (apt-get); if what it has is older than that, this prints
# nothing and says why on stderr, and the test that would use it says
# loudly that it did not run.
set -euo pipefail
version=2.51.0
dir=/var/cache/banger-e2b/js-$version
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "installing Node.js and npm (Debian's) for E2B's JavaScript SDK" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
# >= 20.18.1 (and not 21, which the SDK leaves out).
if ! node -e '
  const [a, b, c] = process.versions.node.split(".").map(Number);
  const ok = (a === 20 && (b > 18 || (b === 18 && c >= 1))) || a >= 22;
  process.exit(ok ? 0 : 1);
'; then
  echo "e2b-js-sdk: Node.js $(node --version) is older than E2B's JavaScript SDK $version needs (>= 20.18.1)" >&2
  exit 0
fi
if ! (cd "$dir" 2>/dev/null && node -e 'require("e2b")' 2>/dev/null); then
  echo "installing E2B's JavaScript SDK $version into $dir" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  (cd "$dir" && npm install --silent --no-audit --no-fund --prefix "$dir" "e2b@$version" >&2)
fi
echo "$dir"
