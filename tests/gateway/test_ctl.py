"""metalavctl against a running daemon over its unix socket, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gateway.ctl import STATE_TEXT
from gateway.i18n import for_accept_language
from gateway.lifecycle import ExecutionState

from .conftest import Store


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.ctl", *args], capture_output=True, text=True, timeout=30
    )


def test_every_execution_state_has_a_portuguese_name() -> None:
    portuguese = for_accept_language("pt-BR")
    assert set(STATE_TEXT) == set(ExecutionState)
    names = {state: portuguese.gettext(text) for state, text in STATE_TEXT.items()}
    assert all(name.strip() and name != STATE_TEXT[s] for s, name in names.items()), names
    assert names[ExecutionState.NOT_STARTED] == "não iniciou (compensar)"
    assert STATE_TEXT.get("not_started") == "did not start (compensate)"  # the daemon sends str


def test_status_shows_links_boot_id_counts_and_outbox(store: Store) -> None:
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key, machine_id="D1"))
    store.cloud.wait_for(key, state="released")

    result = ctl("status", "--socket", str(store.daemon.socket), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["daemon"]["gateway_id"] == store.gateway_id
    assert status["broker"]["connected"] is True
    assert status["board"]["connected"] is True
    assert status["board"]["boot_id"] == store.actuations()[0]["boot_id"]
    assert status["executions"] == {"released": 1}
    assert isinstance(status["outbox_depth"], int)

    human = ctl("status", "--config", str(store.daemon.config_path))
    assert human.returncode == 0, human.stderr
    assert "Loja loja-demo" in human.stdout and "liberada" in human.stdout
    assert status["board"]["boot_id"] in human.stdout


def test_execution_shows_the_whole_history(store: Store) -> None:
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key, payment_id="pay-777"))
    store.cloud.wait_for(key, state="released")
    result = ctl("execution", key, "--socket", str(store.daemon.socket), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["execute_key"], data["payment_id"], data["state"]) == (key, "pay-777", "released")
    assert [h["state"] for h in data["history"]] == ["accepted", "dispatching", "released"]
    human = ctl("execution", key, "--socket", str(store.daemon.socket))
    assert "liberada" in human.stdout and "pay-777" in human.stdout


def test_unknown_execution_is_exit_1_with_a_message(store: Store) -> None:
    result = ctl("execution", "no-such-key", "--socket", str(store.daemon.socket))
    assert result.returncode == 1
    assert "não encontrada" in result.stderr and "Traceback" not in result.stderr


def test_daemon_down_is_exit_3_with_a_hint_not_a_traceback(tmp_path: Path) -> None:
    result = ctl("status", "--socket", str(tmp_path / "absent.sock"))
    assert result.returncode == 3
    assert "o gateway não responde" in result.stderr and "Traceback" not in result.stderr


def test_usage_errors_are_exit_2() -> None:
    assert ctl().returncode == 2
    assert ctl("execution").returncode == 2
    bad = ctl("status", "--config", "/nonexistent.toml")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
