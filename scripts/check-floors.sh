#!/usr/bin/env bash
# CI (issue 10): the dependency floors in pyproject.toml are real. Installs the LOWEST
# version every direct dependency allows (uv --resolution lowest-direct) into its own
# venv, .venv-floors/, and runs the tests of the code that leans on those APIs most:
# the relay-board drivers, the MQTT session and its backoff, command verification,
# the journal and its migrations, the Prometheus metrics. The venv is kept and reused while pyproject.toml is
# unchanged. Arguments pass through to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_venv
ensure_broker >/dev/null
FLOORS=${METALAV_FLOORS_VENV:-.venv-floors}
UV="$VENV/bin/uv"
[ -x "$UV" ] || "$VENV/bin/python" -m pip install -q "uv>=0.5,<1"
stamp=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x "$FLOORS/bin/python" ] || [ "$(cat "$FLOORS/.pyproject.sha256" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$FLOORS"
    "$UV" venv -q -p "$VENV/bin/python" "$FLOORS"
    # test extras included: they are direct dependencies too, and their floors count.
    "$UV" pip install -q -p "$FLOORS/bin/python" --resolution lowest-direct -e ".[test${BROKER_EXTRA:-}]"
    echo "$stamp" > "$FLOORS/.pyproject.sha256"
fi
echo "dependency floors: $("$UV" pip list -p "$FLOORS/bin/python" 2>/dev/null \
    | grep -i -E '^(aiomqtt|paho-mqtt|pymodbus|pyserial|sqlite-utils|pydantic|pyjwt|aiohttp|httpx|tenacity|prometheus-client) ' \
    | awk '{printf "%s %s, ", $1, $2}')"
exec "$FLOORS/bin/python" -m pytest -q -p no:cacheprovider \
    tests/firmware_bridge \
    tests/cloud_sync/test_mqtt_session.py tests/cloud_sync/test_aiomqtt_internals.py \
    tests/cloud_sync/test_backoff.py tests/cloud_sync/test_commands.py \
    tests/gateway/test_journal.py tests/gateway/test_schema_compat.py \
    tests/gateway/test_metrics_docs.py tests/gateway/test_health_levels.py \
    "$@"
