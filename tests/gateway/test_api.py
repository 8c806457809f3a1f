"""The local API's socket: a daemon removes only the socket it created (issue 7,
item 5). Real daemon processes, real unix sockets."""

from __future__ import annotations

import time
from pathlib import Path

from gateway.devstack import DaemonProcess

from .conftest import Store


def _wait(predicate, timeout: float = 15.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_stopping_daemon_never_deletes_a_socket_it_did_not_create(
    store: Store, tmp_path: Path
) -> None:
    # The instance lock keeps two daemons off one journal; two journals with one
    # socket path can still meet, and the one stopping must leave the other's socket.
    first_inode = store.daemon.socket.stat().st_ino
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = DaemonProcess(
        other_dir,
        store.daemon.config_path,
        env={
            "METALAV_JOURNAL__PATH": str(other_dir / "journal.db"),
            "METALAV_GATEWAY__ID": store.gateway_id + "-other",
            "METALAV_BOARD__PORT": str(other_dir / "no-board"),
        },
    )
    other.socket = store.daemon.socket
    other.start()
    try:
        assert other.proc is not None
        pid = other.proc.pid
        _wait(
            lambda: (other.status() or {}).get("daemon", {}).get("pid") == pid,
            what=f"the second daemon on the shared socket\n{other.log_tail()}",
        )
        assert store.daemon.socket.stat().st_ino != first_inode

        assert store.daemon.stop() == 0
        assert store.daemon.socket.is_socket(), "the first daemon removed the other's socket"
        status = other.status()
        assert status is not None and status["daemon"]["pid"] == pid

        assert other.stop() == 0
        assert not store.daemon.socket.exists(), "a daemon removes its own socket"
    finally:
        other.stop()
