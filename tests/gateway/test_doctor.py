"""``metalavctl doctor`` (issue 12, item 4) on a real store: daemon, pty board, broker,
SQLite journal; and on the same store broken the ways a technician finds it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from gateway.doctor import check_clock

from .conftest import Store

ALWAYS = {"config", "daemon", "serial_port", "board", "broker", "clock", "disk", "journal"}


def doctor(store: Store, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.ctl", "doctor", "--config", str(store.daemon.config_path),
         *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def checks_of(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    data = json.loads(result.stdout)
    checks = {c["name"]: c for c in data["checks"]}
    assert data["ok"] == (result.returncode == 0)
    assert result.returncode == (1 if any(c["status"] == "fail" for c in checks.values()) else 0)
    return checks


def test_a_healthy_store_passes_every_check_that_can_fail(store: Store) -> None:
    result = doctor(store, "--json")
    checks = checks_of(result)
    assert ALWAYS <= set(checks)
    for name in ("config", "daemon", "serial_port", "board", "broker", "journal"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "íntegro" in checks["journal"]["detail"]
    assert "conectado" in checks["broker"]["detail"]
    assert checks["clock"]["status"] in ("ok", "warn")  # an unsynced clock is no failure

    text = doctor(store)
    assert "Relógio" in text.stdout and "Diário (integridade)" in text.stdout
    assert text.returncode == result.returncode


def test_a_broken_store_says_what_failed_and_what_to_do(store: Store) -> None:
    store.daemon.stop()
    # Daemon stopped, board there: doctor asks the board itself.
    checks = checks_of(doctor(store, "--json"))
    assert checks["daemon"]["status"] == "fail" and "systemctl start" in checks["daemon"]["fix"]
    assert checks["board"]["status"] == "ok" and "boot id" in checks["board"]["detail"]

    # Board unplugged, journal damaged, broker gone.
    store.sim.stop()
    journal = store.workdir / "journal.db"
    data = bytearray(journal.read_bytes())
    data[4096:8192] = b"\xa5" * 4096
    journal.write_bytes(bytes(data))
    config = store.daemon.config_path
    config.write_text(config.read_text().replace(f"port = {store.broker.port}", "port = 1"))

    result = doctor(store, "--json")
    assert result.returncode == 1
    checks = checks_of(result)
    assert checks["serial_port"]["status"] == "fail"
    assert "/dev/serial/by-id" in checks["serial_port"]["fix"]
    assert checks["board"]["status"] == "fail"
    assert checks["broker"]["status"] == "fail" and "internet" in checks["broker"]["fix"]
    assert checks["journal"]["status"] == "fail"
    assert "metalavctl restore" in checks["journal"]["fix"]

    text = doctor(store)
    assert text.returncode == 1 and "Traceback" not in text.stderr
    assert "FALHA" in text.stdout and "o que fazer:" in text.stdout


def test_an_invalid_config_is_one_failed_check(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[gateway\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway.ctl", "doctor", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert [c["name"] for c in json.loads(result.stdout)["checks"]] == ["config"]
    assert "check-config" in json.loads(result.stdout)["checks"][0]["fix"]


def test_an_unsynchronized_clock_is_a_warning_with_what_to_do() -> None:
    # The kernel's clock state cannot be changed from a test: the probe is the seam.
    assert check_clock(lambda: True).status == "ok"
    unsynced = check_clock(lambda: False)
    assert unsynced.status == "warn" and "timedatectl" in unsynced.fix
    assert check_clock(lambda: None).status == "warn"
