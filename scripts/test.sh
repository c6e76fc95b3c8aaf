#!/usr/bin/env bash
# The whole test suite: lints, unit tests, and the end-to-end tests that
# boot real guests inside network namespaces of their own.
#
# The tests never download anything; the default image they boot is built
# here first (packages from Debian's registry, like apt-get) and cached by
# the hash of what goes into it.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh

# A clean clone gains nothing from incremental builds, and their caches
# cost gigabytes of disk.
export CARGO_INCREMENTAL=0
df -h --output=avail,target . /var/tmp | sed 's/^/banger: free disk: /' || true

# The tests' daemon has failpoints compiled in (bangerd's `failpoints`
# feature); release builds have none. Both builds are linted.
features=(--features bangerd/failpoints)

cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo clippy --locked --workspace --all-targets "${features[@]}" -- -D warnings
cargo build --locked --workspace --bins "${features[@]}"

# The guest agent every test VM boots with (a static executable).
BANGER_AGENT=$(./scripts/build-agent.sh)
export BANGER_AGENT
BANGER_TEST_IMAGE=$(./scripts/test-image.sh target/debug/banger)
export BANGER_TEST_IMAGE
# E2B's own SDK, which the E2B-compatible API's tests drive it with.
BANGER_E2B_PYTHON=$(./scripts/e2b-sdk.sh)
export BANGER_E2B_PYTHON
# And its JavaScript SDK (empty where Node.js is too old: that test then
# says it did not run).
BANGER_E2B_JS=$(./scripts/e2b-js-sdk.sh)
export BANGER_E2B_JS
# The Debian package (a release build), and the fresh Debian tree the
# package test installs it into.
BANGER_TEST_DEB=$(./scripts/package.sh)
export BANGER_TEST_DEB
BANGER_TEST_CHROOT=$(./scripts/test-chroot.sh)
export BANGER_TEST_CHROOT

log=$(mktemp)
# Tests that cannot run on this host write why here; they are listed at
# the end, loudly, instead of passing in silence.
BANGER_TEST_NOT_RUN=$(mktemp)
export BANGER_TEST_NOT_RUN
trap 'rm -f "$log" "$BANGER_TEST_NOT_RUN"' EXIT
set +e
cargo test --locked --no-fail-fast --workspace --lib --bins --tests "${features[@]}" -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
df -h --output=avail,target . /var/tmp | sed 's/^/banger: free disk: /' || true
# One closing line for the whole suite.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "banger: %d passed, %d failed\n", p, f }' "$log"
if [ -s "$BANGER_TEST_NOT_RUN" ]; then
  echo "banger: NOT RUN on this host (they pass vacuously here; run them where the kernel has what they need):"
  sed 's/^/  - /' "$BANGER_TEST_NOT_RUN"
fi
exit "$status"
