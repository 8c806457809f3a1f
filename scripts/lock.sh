#!/usr/bin/env bash
# Regenerates constraints.txt, the lock the installer uses (gateway/release.py): every
# runtime dependency of the store build (with the gpio extra), pinned with hashes, for
# Python 3.11 on any platform (uv's universal resolution: markers where it matters).
# Re-run after changing dependencies in pyproject.toml, then scripts/check-wheels.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_venv
UV="$VENV/bin/uv"
[ -x "$UV" ] || "$VENV/bin/python" -m pip install -q "uv>=0.5,<1"
"$UV" pip compile pyproject.toml --extra gpio --universal --python-version 3.11 \
    --generate-hashes --custom-compile-command "scripts/lock.sh" -q -o constraints.txt "$@"
echo "constraints.txt: $(grep -c '^[a-z]' constraints.txt) pinned packages"
