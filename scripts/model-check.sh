#!/usr/bin/env bash
# The release protocol's model, long profile (issue 13): tens of thousands of steps of
# crashes, failed commits, board resets and lost frames against the real core; prints
# what it explored as JSON. Arguments pass through, e.g. --examples 5000 --steps 80.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_venv
"$VENV/bin/python" -m pip install -q -e ".[test]"
exec "$VENV/bin/python" -m tests.model.explore "$@"
