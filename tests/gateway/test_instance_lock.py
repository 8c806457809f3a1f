"""One daemon per journal (issue 7, item 5): a second ``metalav-gateway run`` refuses
before it touches anything, and the first one keeps its socket, its links and its
releases. Real processes throughout."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gateway.instance_lock import lock_path

from .conftest import Store, ctl


def run_second(config: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "gateway.daemon", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result, time.monotonic() - began


def status(store: Store) -> dict[str, Any]:
    result = ctl(store, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def assert_refused(result: subprocess.CompletedProcess[str], elapsed: float, store: Store) -> None:
    assert store.daemon.proc is not None
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert result.stderr.splitlines() == [
        f"error: another metalav-gateway (pid {store.daemon.proc.pid}) already runs on "
        f"journal {store.workdir / 'journal.db'}; stop it first (systemctl stop metalav-gateway)"
    ]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert elapsed < 10, f"refusing took {elapsed:.1f} s"


def test_second_daemon_on_the_same_config_refuses_and_the_first_keeps_working(
    store: Store,
) -> None:
    before = status(store)

    result, elapsed = run_second(store.daemon.config_path)
    assert_refused(result, elapsed, store)

    # The first one still has its socket, both links (no broker flap from a stolen
    # client id, the board port untouched) and still releases a paid cycle.
    after = status(store)
    assert after["daemon"]["pid"] == before["daemon"]["pid"]
    assert after["board"]["connected"] is True
    assert after["board"]["boot_id"] == before["board"]["boot_id"]
    assert after["broker"]["connected"] is True
    assert after["broker"]["since"] == before["broker"]["since"]
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key, machine_id="W2"))
    store.cloud.wait_for(key, state="released")
    assert [a["channel"] for a in store.actuations()] == [2]
    assert "broker link down" not in store.daemon.log_tail(200)


def test_another_config_naming_the_same_journal_refuses_too(store: Store, tmp_path: Path) -> None:
    # Its own socket and gateway id, and the journal spelled through a symlinked folder.
    alias = tmp_path / "alias"
    alias.symlink_to(tmp_path, target_is_directory=True)
    text = store.daemon.config_path.read_text()
    other = tmp_path / "other.toml"
    other.write_text(
        text.replace(str(tmp_path / "journal.db"), str(alias / "journal.db"))
        .replace(str(tmp_path / "metalav.sock"), str(tmp_path / "other.sock"))
        .replace(store.gateway_id, store.gateway_id + "-other")
    )
    assert str(alias / "journal.db") in other.read_text()

    result, elapsed = run_second(other)
    assert result.returncode == 3, result.stderr
    assert "already runs on journal" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "other.sock").exists()
    assert status(store)["board"]["connected"] is True


def test_after_sigkill_a_new_daemon_starts_on_the_same_journal(store: Store) -> None:
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key))
    store.cloud.wait_for(key, state="released")
    store.daemon.kill9()

    # No cleanup: the kernel released the lock with the killed process.
    store.daemon.start()
    store.daemon.wait_ready()
    assert store.daemon.proc is not None
    lock = lock_path(store.workdir / "journal.db")
    assert lock.read_text().strip() == str(store.daemon.proc.pid)
    second = store.new_key()
    store.cloud.publish(store.cloud.sign(second, machine_id="D1"))
    store.cloud.wait_for(second, state="released")
    assert len(store.actuations()) == 2
