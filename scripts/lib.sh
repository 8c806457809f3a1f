# Shared by scripts/demo.sh and scripts/test.sh: a project virtualenv in .venv and a
# local MQTT broker (mosquitto; amqtt as the pure-Python fallback where it cannot be
# installed). Works on a fresh Debian 12 / Raspberry Pi OS bookworm with Python 3.11.

PY=${PYTHON:-python3}
VENV=${METALAV_VENV:-.venv}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi
}

apt_install() {
    command -v apt-get >/dev/null || return 1
    # apt-get update once per run: package lists may be missing on a fresh machine.
    if [ -z "${_APT_UPDATED:-}" ]; then
        as_root apt-get update -qq >/dev/null 2>&1 || true
        _APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

have_mosquitto() {
    command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]
}

ensure_python() {
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "error: Python 3.11 or newer is needed ($PY)" >&2
        exit 1
    fi
}

ensure_venv() {
    ensure_python
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$PY" -m venv "$VENV" 2>/dev/null; then
            # Debian ships venv separately.
            rm -rf "$VENV"
            apt_install python3-venv || { echo "error: cannot create a venv (install python3-venv)" >&2; exit 1; }
            "$PY" -m venv "$VENV"
        fi
        "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    fi
}

# Sets EXTRAS to what the broker needs: nothing with mosquitto, the amqtt fallback without.
ensure_broker() {
    if ! have_mosquitto; then
        echo "mosquitto not found: installing it (apt-get install mosquitto)..."
        apt_install mosquitto || true
        # The package enables a system broker on port 1883; ours run on their own ports.
        as_root systemctl disable --now mosquitto >/dev/null 2>&1 || true
    fi
    if have_mosquitto; then
        echo "MQTT broker: mosquitto"
        BROKER_EXTRA=""
    else
        echo "MQTT broker: mosquitto unavailable, falling back to the pure-Python amqtt"
        BROKER_EXTRA=",fallback-broker"
    fi
}
