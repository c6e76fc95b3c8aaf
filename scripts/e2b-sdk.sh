#!/usr/bin/env bash
# Installs (once) E2B's Python SDK, at the version the tests of banger's
# E2B-compatible API target, into a venv of its own, and prints its
# python. Like test-image.sh this downloads (from PyPI, as pip does); the
# tests themselves send nothing off the machine.
set -euo pipefail
version=2.63.0
venv=/var/cache/banger-e2b/venv-$version
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import e2b" 2>/dev/null; then
  echo "installing E2B's Python SDK $version into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "e2b==$version" >&2
fi
echo "$venv/bin/python"
