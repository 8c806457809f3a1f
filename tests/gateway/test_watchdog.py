"""gateway.supervision in process: sd_notify datagrams on a real socket, the watchdog
environment, and what the watchdog calls "no progress" (with a real journal whose
commit hangs on a lock held by another connection)."""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest

from gateway.journal import Journal
from gateway.supervision import Notifier, Progress, Watchdog, watchdog_timeout
from tests.gateway.conftest import wait_until


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifier_sends_one_datagram_of_fields(tmp_path: Path, abstract: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        if abstract:
            name = f"metalav-test-{uuid.uuid4().hex}"
            server.bind("\0" + name)
            address = "@" + name
        else:
            address = f"/tmp/mlv-{uuid.uuid4().hex[:8]}.sock"
            server.bind(address)
        try:
            notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
            assert notifier.notify("READY=1", "STATUS=Loja 1: placa conectada")
            server.settimeout(5)
            assert server.recv(4096) == b"READY=1\nSTATUS=Loja 1: placa conectada"
            notifier.close()
        finally:
            if not abstract:
                os.unlink(address)


def test_notifier_without_notify_socket_sends_nothing_and_never_raises(tmp_path: Path) -> None:
    assert not Notifier.from_environ({}).notify("READY=1")
    # A socket that went away (systemd restarted): a warning, not a crash.
    gone = Notifier(str(tmp_path / "gone.sock"))
    assert gone.enabled and not gone.notify("WATCHDOG=1")
    gone.close()
    assert not Notifier("not-a-socket").enabled


def test_watchdog_timeout_is_read_from_systemds_variables() -> None:
    assert watchdog_timeout({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_timeout({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    # Meant for another process, absent, zero or garbage: no watchdog.
    assert watchdog_timeout({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_timeout({}) is None
    assert watchdog_timeout({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_timeout({"WATCHDOG_USEC": "soon"}) is None


def test_a_board_supervision_that_stops_ticking_withholds_the_pings() -> None:
    now = [100.0]
    ticked = [100.0]
    dog = Watchdog(
        Notifier(None),
        2.0,
        Progress(lambda: None, lambda: ticked[0], board_allowance_s=5.0),
        clock=lambda: now[0],
    )
    assert dog.stalled() is None
    now[0] = 105.9  # within the poll allowance plus half the watchdog
    assert dog.stalled() is None
    now[0] = 106.5
    assert dog.stalled() == "board supervision silent for 6 s"
    ticked[0] = 106.4
    assert dog.stalled() is None


def test_a_journal_commit_stuck_off_the_loop_withholds_the_pings(tmp_path: Path) -> None:
    """The daemon commits on its event loop today (a stuck commit blocks the pings with
    the loop, test_supervision.py); should commits move to a thread, the watchdog still
    sees one that hangs."""
    path = tmp_path / "journal.db"
    journal = Journal(path, "gw-test")
    dog = Watchdog(
        Notifier(None),
        0.2,
        Progress(lambda: journal.commit_since, time.monotonic, board_allowance_s=60.0),
    )
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock: the journal's commit waits on it
    writer = threading.Thread(target=journal.set_board_value, args=("boot_id", "0000abcd"))
    try:
        writer.start()
        problem = wait_until(dog.stalled, timeout=4.0, what="the stuck commit to be seen")
        assert problem.startswith("journal commit stuck for")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    writer.join()
    assert journal.commit_since is None and dog.stalled() is None
    assert journal.board_value("boot_id") == "0000abcd"
    journal.close()
