#!/usr/bin/env bash
# The one command that installs or upgrades the gateway on a store box (README
# "Running it in a store"), run as root from a checkout or an unpacked release:
#
#   sudo ./scripts/install.sh                  install, or upgrade to, this release
#   sudo ./scripts/install.sh rollback         back to the previous release
#   sudo ./scripts/install.sh status           current, previous, installed releases
#
# Other arguments pass through to metalav-release (gateway/release.py), e.g.
# `install --health-window 120` or `install --wheelhouse DIR` to install offline.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_python
# The first install runs on the system's python3: it needs venv (and pip to build the
# wheel from this folder), which Debian ships apart.
if ! "$PY" -c 'import ensurepip' 2>/dev/null || ! "$PY" -m pip --version >/dev/null 2>&1; then
    apt_install python3-venv python3-pip || { echo "erro: instale python3-venv e python3-pip (apt-get install python3-venv python3-pip)" >&2; exit 1; }
fi
[ $# -gt 0 ] || set -- install
exec "$PY" -m gateway.release "$@"
