"""The systemd unit keeps its supervision promises (README, "Supervision"), and
scripts/check-unit.sh (systemd-analyze verify, exposure at most 2.0) accepts it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.credentials import CREDENTIALS

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "metalav-gateway.service"


def _service() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    # Repeated keys (DeviceAllow=, LoadCredential=) are kept, in order.
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_the_unit_is_supervised_and_never_gives_up() -> None:
    v = _service()
    assert v["Type"] == ["notify"]
    assert v["WatchdogSec"] and v["Restart"] == ["always"]
    assert v["StartLimitIntervalSec"] == ["0"]
    assert v["ExecStart"] == [
        "/opt/metalav/current/bin/metalav-gateway run --config /etc/metalav/gateway.toml"
    ]


def test_secrets_come_as_credentials_never_through_the_environment() -> None:
    v = _service()
    assert "EnvironmentFile" not in v and "Environment" not in v
    ids = {c.split(":", 1)[0] for c in v["LoadCredential"]}
    assert ids == {"mqtt-password", "mqtt-client-key", "cloud-token"}
    assert ids == set(CREDENTIALS)  # the names the daemon reads


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_check_unit_script_accepts_the_unit() -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "check-unit.sh")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "exposure" in result.stdout
