"""Never twice, never silent, when the journal cannot write (issue 7, items 1-4).

Real daemon, real pty board, real broker. Journal failures come from a full filesystem
(a small tmpfs) or from the journal's fault-injection hook, which fails the commits
named in a control file exactly as SQLite does on a full disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware_bridge.driver import PulseTrain
from firmware_bridge.serial_board import SerialBoard
from gateway.dispatch import command_id_for

from .conftest import Store, wait_until


def _pulses_by_key(store: Store, keys: list[str]) -> Counter[str]:
    by_id = {f"{command_id_for(k):016x}": k for k in keys}
    return Counter(by_id[a["command_id"]] for a in store.actuations() if a["command_id"] in by_id)


def _journal_status(store: Store) -> dict[str, Any]:
    status = store.daemon.status()
    assert status is not None
    return status["journal"]  # type: ignore[no-any-return]


@pytest.fixture
def faults(tmp_path: Path) -> Path:
    return tmp_path / "journal-faults"


def _start(store: Store, faults: Path, **env: str) -> None:
    store.daemon.start(METALAV_TEST_JOURNAL_FAULTS=str(faults), **env)
    store.daemon.wait_ready()


def test_a_release_the_journal_could_not_record_is_recorded_without_restart(
    store_factory, faults: Path
) -> None:  # type: ignore[no-untyped-def]
    store: Store = store_factory("--ring-size", "4")
    _start(store, faults)
    a, b = store.new_key(), store.new_key()
    token_a = store.cloud.sign(a, machine_id="W1")

    faults.write_text("transition:released\n")
    store.cloud.publish(token_a)
    wait_until(lambda: len(store.actuations()) == 1, what="A pulsed")
    faults.write_text("*\n")  # now the whole disk is full
    journal = wait_until(lambda: (j := _journal_status(store)) and not j["writable"] and j)
    assert "disk is full" in journal["error"]

    # Intake stopped: B is not taken (no PUBACK, no row, nothing to the board), and
    # A's duplicates never reach the board.
    store.cloud.publish(store.cloud.sign(b, machine_id="W2"))
    store.cloud.publish(token_a)
    time.sleep(1.5)
    assert len(store.actuations()) == 1
    assert store.daemon.execution(b) is None
    assert store.cloud.results_for(b) == []
    assert store.daemon.status()["broker"]["connected"] is True  # type: ignore[index]

    faults.unlink()  # space is back: no restart
    assert store.cloud.wait_for(a, state="released")[-1]["final"] is True
    store.cloud.wait_for(b, state="released")
    assert _journal_status(store)["writable"] is True
    alert = store.cloud.wait_event("alerts", code="journal_writable_again")
    assert "disk is full" in alert["detail"]

    # More releases than the board's ring holds, a restart, and A again: never twice.
    others = [store.new_key() for _ in range(6)]
    for key in others:
        store.cloud.publish(store.cloud.sign(key, machine_id="D1"))
        store.cloud.wait_for(key, state="released")
    store.daemon.stop()
    _start(store, faults)
    answered = sum(r["state"] == "released" for r in store.cloud.results_for(a))
    store.cloud.publish(token_a)
    store.cloud.wait_for(a, state="released", count=answered + 1)
    time.sleep(0.5)
    everyone = [a, b, *others]
    assert _pulses_by_key(store, everyone) == Counter(dict.fromkeys(everyone, 1))


@pytest.mark.parametrize("point", ["record:", "transition:failed", "in_doubt"])
def test_no_command_is_acknowledged_or_sent_before_its_decision_is_durable(
    store_factory, faults: Path, point: str
) -> None:  # type: ignore[no-untyped-def]
    """Commits of the release path, failed: nothing acts on an unwritten decision, an
    answer of the board is held until it is written, and everything ends in a final
    state once the journal writes again, without a restart."""
    # D1 is on channel 3: a board with 2 channels NACKs it (bad_channel).
    store: Store = store_factory(*(("--channels", "2") if point == "transition:failed" else ()))
    _start(store, faults)
    key = store.new_key()
    faults.write_text(point + "\n")
    if point == "in_doubt":
        assert store.sim.proc is not None
        store.sim.proc.send_signal(signal.SIGSTOP)  # the board stops answering
    store.cloud.publish(store.cloud.sign(key, machine_id="D1"))
    time.sleep(2.5)
    if point == "record:":
        assert store.daemon.execution(key) is None
        assert store.cloud.results_for(key) == []
    else:
        row = store.daemon.execution(key)
        assert row is not None and row["state"] == "dispatching"
        assert [r["state"] for r in store.cloud.results_for(key)] == ["accepted"]
    assert store.actuations() == []
    faults.unlink()
    if point == "in_doubt":
        store.sim.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    final = {"record:": ("released",), "transition:failed": ("failed",)}.get(
        point, ("released", "needs_review")
    )
    result = store.cloud.wait_for(key, final=True, timeout=20)[-1]
    assert result["state"] in final, result
    pulses = len(store.actuations())
    if result["state"] == "released":
        assert pulses == 1
    else:  # failed: the board refused; needs_review: it may have acted, once at most
        assert pulses <= (1 if point == "in_doubt" else 0)


def test_a_release_the_board_may_have_forgotten_is_never_sent_again(
    store_factory, faults: Path
) -> None:  # type: ignore[no-untyped-def]
    """The acceptance run's double release: the release's commit fails, the daemon
    dies, the board executes more releases than its ring holds, the daemon restarts.
    "Not executed, same boot" is then no proof: needs_review, never a second pulse."""
    store: Store = store_factory("--ring-size", "4")
    _start(store, faults)
    a = store.new_key()
    token = store.cloud.sign(a, machine_id="W1")
    faults.write_text("transition:released\n")
    store.cloud.publish(token)
    wait_until(lambda: len(store.actuations()) == 1, what="A pulsed")
    time.sleep(0.3)
    store.daemon.kill9()
    faults.unlink()

    # Five other releases reach the board while the gateway is down (its ring holds 4).
    asyncio.run(_release_directly(store.sim.link, [0xA000 + i for i in range(5)]))
    assert len(store.actuations()) == 6

    _start(store, faults)
    store.cloud.publish(token)
    result = store.cloud.wait_for(a, state="needs_review")[-1]
    assert result["reason"] == "board_cannot_vouch"
    assert result["compensation"] is True
    time.sleep(0.5)
    assert _pulses_by_key(store, [a]) == Counter({a: 1})
    store.cloud.wait_event("alerts", code="needs_review", execute_key=a)


def _crash_before_the_first_byte_and_restart(store: Store) -> str:
    """A paid command whose daemon dies between its dispatching commit and the first
    byte to the board; the daemon restarts and the cloud re-sends the command."""
    store.daemon.start(METALAV_TEST_KILL_AT="after_dispatching_commit")
    key = store.new_key()
    token = store.cloud.sign(key)
    wait_until(lambda: (s := store.daemon.status()) and s["board"]["connected"], what="ready")
    store.cloud.publish(token)
    assert store.daemon.wait_exit() == -signal.SIGKILL
    store.daemon.start()
    store.daemon.wait_ready()
    store.cloud.publish(token)
    return key


def test_old_firmware_without_a_count_cannot_vouch_for_an_unanswered_release(
    store_factory,
) -> None:  # type: ignore[no-untyped-def]
    """Firmware 1.1 reports no execution count: a release in doubt it says it never
    saw may have been forgotten, so it goes to needs_review rather than out again."""
    store: Store = store_factory("--firmware", "1.1")
    key = _crash_before_the_first_byte_and_restart(store)
    assert store.cloud.wait_for(key, state="needs_review")[-1]["reason"] == "board_cannot_vouch"
    assert store.actuations() == []


def test_with_a_count_a_release_that_never_reached_the_board_goes_out_once(
    store_factory,
) -> None:  # type: ignore[no-untyped-def]
    store: Store = store_factory()
    key = _crash_before_the_first_byte_and_restart(store)
    store.cloud.wait_for(key, state="released")
    time.sleep(0.5)
    assert _pulses_by_key(store, [key]) == Counter({key: 1})


EIGHT_MACHINES = [
    {"id": f"M{ch}", "kind": "washer", "channel": ch, "cycles": {"normal": {"pulses": 1}}}
    for ch in range(1, 9)
]


def test_crash_and_board_reset_send_only_the_release_on_the_wire_to_review(
    store_factory,
) -> None:  # type: ignore[no-untyped-def]
    """Issue 7 item 4: releases queued behind the one on the wire never reached the
    board; after a crash and a board reset they go out, they do not need a person."""
    store: Store = store_factory("--delay-ms", "60", machines=EIGHT_MACHINES)
    store.daemon.start(METALAV_TEST_KILL_AT="after_board_ack:3")
    store.daemon.wait_ready()
    keys = [store.new_key() for _ in EIGHT_MACHINES]
    tokens = [
        store.cloud.sign(k, machine_id=m["id"]) for k, m in zip(keys, EIGHT_MACHINES, strict=True)
    ]
    for token in tokens:
        store.cloud.publish(token)
    assert store.daemon.wait_exit() == -signal.SIGKILL
    assert len(store.actuations()) == 3

    store.sim.reboot()
    store.daemon.start()
    store.daemon.wait_ready()
    for token in tokens:  # the cloud re-sends until it sees results
        store.cloud.publish(token)
    finals = {}
    for key in keys:
        finals[key] = store.cloud.wait_for(key, final=True, timeout=20)[-1]["state"]
    time.sleep(0.5)
    states = Counter(finals.values())
    assert states["needs_review"] <= 1, finals
    assert states["released"] == len(keys) - states["needs_review"], finals
    assert all(n == 1 for n in _pulses_by_key(store, keys).values())


def test_a_full_disk_stops_intake_and_it_resumes_by_itself(store_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A real full filesystem under the journal (tmpfs): no PUBACK, nothing to the
    board, the status says why; freeing space resumes without a restart."""
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    with _tmpfs(mnt, "4m"):
        store: Store = store_factory(journal_path=mnt / "journal.db")
        store.daemon.start()
        store.daemon.wait_ready()
        warm = store.new_key()
        store.cloud.publish(store.cloud.sign(warm, machine_id="W2"))
        store.cloud.wait_for(warm, state="released")

        filler = mnt / "filler"
        _fill(filler)
        key = store.new_key()
        store.cloud.publish(store.cloud.sign(key, machine_id="W1"))
        journal = wait_until(lambda: (j := _journal_status(store)) and not j["writable"] and j)
        assert "full" in journal["error"]
        time.sleep(1.0)
        assert store.cloud.results_for(key) == []
        assert len(store.actuations()) == 1
        ctl = subprocess.run(
            [sys.executable, "-m", "gateway.ctl", "status", "--socket", str(store.daemon.socket)],
            capture_output=True,
            text=True,
            env={**os.environ, "LANG": "pt_BR.UTF-8"},
        )
        assert "NÃO GRAVÁVEL" in ctl.stdout, ctl.stdout + ctl.stderr

        filler.unlink()
        store.cloud.wait_for(key, state="released", timeout=20)
        assert len(store.actuations()) == 2
        store.daemon.stop()
        store.sim.stop()


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[None]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> None:
    # Unbuffered: a buffered file would raise ENOSPC again when closed if bytes were
    # left in its buffer, which depends on how much space the journal left free.
    with open(path, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                f.write(chunk)
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())


async def _release_directly(link: Path, command_ids: list[int]) -> None:
    """Releases sent to the board by something else than the gateway (here, the test)."""
    board = SerialBoard(str(link))
    await board.open()
    try:
        await board.ping()
        for command_id in command_ids:
            await board.release(command_id, 3, PulseTrain(1, 20, 20))
    finally:
        await board.close()
