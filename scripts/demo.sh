#!/usr/bin/env bash
# Quickstart, step 1: install into .venv and run the self-contained demo
# (local broker, simulated relay board, the real daemon, one paid cycle sent twice).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_venv
ensure_broker
"$VENV/bin/python" -m pip install -q -e ".[test${BROKER_EXTRA}]"
exec "$VENV/bin/metalav-gateway" demo "$@"
