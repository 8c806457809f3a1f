"""The daemon under systemd's eye, with the real daemon process: sd_notify to a real unix
datagram socket bound here (what systemd does), SIGTERM in the middle of a pulse train,
and SIGHUP with a valid and an invalid config file."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.conftest import Store, wait_until

# WATCHDOG_USEC the tests give the daemon: it pings every half of it.
WATCHDOG_S = 1.0


class NotifySocket:
    """systemd's side of sd_notify: a unix datagram socket, and what arrived on it."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir: str | None = None
        if abstract:
            name = f"metalav-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            # A short path: sun_path holds 108 bytes, pytest's tmp_path can be longer.
            self._dir = tempfile.mkdtemp(prefix="mlv-", dir="/tmp")
            self.address = f"{self._dir}/notify"
            self.sock.bind(self.address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))}

    def all(self) -> list[dict[str, str]]:
        with self._lock:
            return [m for _, m in self.messages]

    def with_field(self, key: str, value: str | None = None) -> list[dict[str, str]]:
        return [m for m in self.all() if key in m and (value is None or m[key] == value)]

    def pings(self) -> list[float]:
        with self._lock:
            return [t for t, m in self.messages if m.get("WATCHDOG") == "1"]

    def silent_for(self) -> float:
        """Seconds since the last watchdog ping."""
        pings = self.pings()
        return time.monotonic() - pings[-1] if pings else 0.0

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self.sock.close()
        if self._dir is not None:
            Path(self.address).unlink(missing_ok=True)
            Path(self._dir).rmdir()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    s = NotifySocket()
    yield s
    s.close()


def _start(store: Store, notify: NotifySocket, **env: str) -> None:
    store.daemon.start(**notify.env(), **env)
    wait_until(lambda: notify.with_field("READY", "1"), what="READY=1")


def _journal_rows(store: Store, sql: str, *args: object) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{store.workdir / 'journal.db'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


# -- sd_notify: READY, STATUS, WATCHDOG, STOPPING ----------------------------------------


def test_ready_comes_after_start_up_then_watchdog_pings_and_stopping(store_factory) -> None:  # type: ignore[no-untyped-def]
    s: Store = store_factory()
    # The notify socket in the abstract namespace this time (NOTIFY_SOCKET=@name).
    with NotifySocket(abstract=True) as notify:
        _start(s, notify)
        first = notify.all()[0]
        # READY is the first thing said, with the STATUS line, once the journal is open
        # and the board was tried (here the simulated board answers at once).
        assert first["READY"] == "1"
        assert first["STATUS"].startswith("Loja loja-demo (")
        assert "diário gravável" in first["STATUS"]
        assert (s.workdir / "journal.db").exists()
        status = s.daemon.status()
        assert status is not None
        assert status["board"]["connected"] or status["board"]["last_error"]
        wait_until(lambda: len(notify.pings()) >= 3, what="watchdog pings")
        said = notify.all()
        first_ping = next(i for i, m in enumerate(said) if m.get("WATCHDOG") == "1")
        assert said.index(first) == 0 < first_ping  # no ping came before READY
        s.daemon.send_signal(signal.SIGTERM)
        assert s.daemon.wait_exit() == 0
        assert notify.with_field("STOPPING", "1")


def test_ready_does_not_wait_for_a_broker_that_is_down(store_factory, notify) -> None:  # type: ignore[no-untyped-def]
    s: Store = store_factory()
    with socket.socket() as probe:  # a loopback port where nobody listens
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    config = s.daemon.config_path
    text = config.read_text().replace(f"port = {s.broker.port}", f"port = {closed_port}")
    config.write_text(text)
    _start(s, notify)
    ready = notify.with_field("READY", "1")[0]
    assert "broker DESCONECTADO" in ready["STATUS"]
    wait_until(lambda: notify.pings(), what="watchdog pings with the broker down")


def test_watchdog_stops_while_the_event_loop_is_blocked(store_factory, notify, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s: Store = store_factory()
    stall = tmp_path / "stall-loop"
    _start(s, notify, METALAV_TEST_STALL_LOOP=str(stall))
    wait_until(lambda: len(notify.pings()) >= 2, what="watchdog pings")
    stall.touch()
    # Longer than WatchdogSec without a ping: systemd would kill and restart it now.
    wait_until(lambda: notify.silent_for() > WATCHDOG_S * 1.5, what="pings to stop")
    assert s.daemon.proc is not None and s.daemon.proc.poll() is None
    before = len(notify.pings())
    stall.unlink()
    wait_until(lambda: len(notify.pings()) > before, what="pings once the loop runs again")


def test_watchdog_stops_while_a_journal_write_hangs(store_factory, notify) -> None:  # type: ignore[no-untyped-def]
    s: Store = store_factory()
    _start(s, notify)
    s.daemon.wait_ready()
    wait_until(lambda: len(notify.pings()) >= 2, what="watchdog pings")
    # Another connection holds the journal's write lock: the daemon's next commit
    # waits on it (up to its busy timeout of 5 s) as on a stalling SD card.
    holder = sqlite3.connect(s.workdir / "journal.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        key = s.new_key()
        s.cloud.publish(s.cloud.sign(key))
        wait_until(lambda: notify.silent_for() > WATCHDOG_S * 1.5, what="pings to stop")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    before = len(notify.pings())
    wait_until(lambda: len(notify.pings()) > before, what="pings once the journal writes")
    # The command was not lost to the stall, nor released twice.
    s.cloud.wait_for(key, state="released", timeout=20)
    assert len(s.actuations()) == 1


# -- SIGTERM in the middle of a pulse train ----------------------------------------------

SLOW = [
    {
        "id": "W1",
        "kind": "washer",
        "channel": 1,
        # Three coin pulses of 0.5 s: a train of about 2.5 s.
        "cycles": {"normal": {"pulses": 3, "on_ms": 500, "off_ms": 500}},
    }
]


def _edges(edges_file: Path, channel: int) -> list[dict[str, Any]]:
    """The simulated board's relay edges on ``channel`` (its ``--edges`` file)."""
    if not edges_file.exists():
        return []
    records = [json.loads(line) for line in edges_file.read_text().splitlines() if line]
    return [r for r in records if r["channel"] == channel and r["command_id"] is not None]


def _on_edges(edges_file: Path, channel: int) -> int:
    return sum(1 for r in _edges(edges_file, channel) if r["state"] == "on")


def test_sigterm_mid_pulse_train_neither_cuts_nor_repeats_the_release(
    store_factory, notify, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    edges = tmp_path / "edges.jsonl"
    # Real-time relay timing on the board (the simulator's default is instantaneous).
    s: Store = store_factory("--edges", str(edges), "--time-scale", "1", machines=SLOW)
    _start(s, notify)
    s.daemon.wait_ready()
    key = s.new_key()
    token = s.cloud.sign(key)
    s.cloud.publish(token)
    wait_until(lambda: _on_edges(edges, 1) >= 1, what="the pulse train to start")
    terminated = time.monotonic()
    s.daemon.send_signal(signal.SIGTERM)
    assert s.daemon.wait_exit(timeout=20) == 0
    exited = time.monotonic()  # the board's edge times are on this same clock
    # The watchdog kept being fed while it waited.
    assert any(terminated < t < exited for t in notify.pings())
    # It waited for the train: all three pulses were made, the last one ended before
    # it exited, and it asked systemd for that time.
    train = _edges(edges, 1)
    assert [r["state"] for r in train] == ["on", "off"] * 3
    assert train[-1]["monotonic"] < exited
    assert notify.with_field("EXTEND_TIMEOUT_USEC")
    rows = _journal_rows(s, "SELECT state FROM executions WHERE execute_key = ?", key)
    assert [r["state"] for r in rows] == ["released"]

    # The next start (its ALL_OFF, its recovery) neither cuts nor repeats anything, and
    # the cloud re-sending the command gets the stored result.
    s.daemon.start()
    s.daemon.wait_ready()
    s.cloud.publish(token)
    s.cloud.wait_for(key, state="released", count=2)
    assert len(s.actuations()) == 1
    assert _on_edges(edges, 1) == 3


# -- SIGHUP: reload ----------------------------------------------------------------------


def _append(config: Path, section: str, body: str) -> None:
    text = config.read_text()
    head, sep, machines = text.partition("[[machines]]")
    config.write_text(f"{head}[{section}]\n{body}\n{sep}{machines}")


def _audits(s: Store) -> list[dict[str, Any]]:
    rows = _journal_rows(s, "SELECT * FROM audit_log WHERE action = 'config.reload' ORDER BY id")
    return [dict(r) for r in rows]


def test_sighup_applies_live_keys_and_names_those_that_need_a_restart(
    store_factory, notify
) -> None:  # type: ignore[no-untyped-def]
    s: Store = store_factory()
    _start(s, notify)
    s.daemon.wait_ready()
    config = s.daemon.config_path
    _append(config, "outbox", "warn_depth = 7\ncritical_depth = 9")
    _append(config, "logging", 'level = "WARNING"')
    config.write_text(config.read_text().replace("reconnect_s = 0.3", "reconnect_s = 0.4"))
    s.daemon.send_signal(signal.SIGHUP)

    wait_until(lambda: _audits(s), what="the reload's audit record")
    audit = _audits(s)[-1]
    assert audit["outcome"] == "applied"
    after = json.loads(audit["after"])
    assert after["outbox.warn_depth"] == 7 and after["logging.level"] == "WARNING"
    assert after["restart_needed"] == ["board.reconnect_s"]
    log = s.daemon.log_tail(200)
    assert "config reload: applied" in log and "outbox.warn_depth 100 -> 7" in log
    assert (
        "needs a restart to take effect (systemctl restart metalav-gateway): board.reconnect_s"
        in log
    )
    assert notify.with_field("RELOADING", "1")
    # It still releases; at level WARNING its INFO lines ("execution ... released")
    # are no longer written.
    assert "board link up" in log
    key = s.new_key()
    s.cloud.publish(s.cloud.sign(key))
    s.cloud.wait_for(key, state="released")
    assert f"execution {key}" not in s.daemon.log_tail(400)


def test_sighup_with_an_invalid_config_changes_nothing(store_factory, notify) -> None:  # type: ignore[no-untyped-def]
    s: Store = store_factory()
    _start(s, notify)
    s.daemon.wait_ready()
    config = s.daemon.config_path
    good = config.read_text()
    _append(config, "outbox", "warn_depth = -1")
    s.daemon.send_signal(signal.SIGHUP)
    wait_until(lambda: _audits(s), what="the refused reload's audit record")
    assert _audits(s)[-1]["outcome"] == "refused:invalid_config"
    log = s.daemon.log_tail(200)
    refused = "config reload refused: outbox.warn_depth: Input should be greater than or equal to 1"
    assert refused in log
    assert "Traceback" not in log
    # Still running on what it had: a command is released as before; and READY=1
    # follows the RELOADING=1 (systemd would otherwise wait for the reload to end).
    key = s.new_key()
    s.cloud.publish(s.cloud.sign(key))
    s.cloud.wait_for(key, state="released")
    assert len(notify.with_field("READY", "1")) == 2

    config.write_text("not [valid toml")
    s.daemon.send_signal(signal.SIGHUP)
    wait_until(lambda: len(_audits(s)) == 2, what="the second refused reload")
    assert "not valid TOML" in s.daemon.log_tail(50)
    config.write_text(good)
    assert s.daemon.proc is not None and s.daemon.proc.poll() is None
