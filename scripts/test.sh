#!/usr/bin/env bash
# Quickstart, step 2 (and CI): install into .venv, make sure a broker exists
# (mosquitto, else amqtt), lint, check the systemd unit, and run the whole test suite;
# without arguments also scripts/check-floors.sh (the driver and session tests on the
# lowest allowed versions).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_venv
ensure_broker
"$VENV/bin/python" -m pip install -q -e ".[dev${BROKER_EXTRA}]"
"$VENV/bin/ruff" check gateway firmware_bridge cloud_sync devtools tests bench
"$VENV/bin/mypy"
./scripts/check-unit.sh
# The whole suite (CI): also the lowest allowed dependency versions (issue 10).
if [ $# -eq 0 ]; then ./scripts/check-floors.sh; fi
exec "$VENV/bin/python" -m pytest "$@"
