"""What a power cut would leave: the journal's flushes, and nothing leaving before one.

SQLite runs with ``synchronous=NORMAL`` and the journal flushes the WAL itself
(gateway/journal/database.py), so that commands arriving together share one fdatasync.
These tests keep a copy of the journal's files as of each flush — the *durable image*,
what a power cut leaves at least (a real disk may keep more, never less) — and check
the promises against it rather than against the live file:

- a default (durable) commit is in the image when it returns;
- concurrent waiters share one flush; a failing flush is a journal fault;
- every RELEASE frame reaches the board only once its ``dispatching`` row, and the
  outcome of every release before it, are in the image (the invariant recovery relies
  on: after a power cut only the first unsettled release may have left);
- a duplicate's stored result and an acknowledgement never precede the image.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.core_rig import CoreRig
from firmware_bridge.frames import FrameDecoder, FrameType, Release, decode
from gateway.dispatch import command_id_for
from gateway.journal import DispatchStamp, Journal, JournalUnwritable, NewExecution
from gateway.lifecycle import ExecutionState
from tests.rows import new_execution

MACHINES = [
    {"id": f"W{i}", "kind": "washer", "channel": i, "cycles": {"normal": {"pulses": 1}}}
    for i in range(1, 7)
]


class DurableImage:
    """Copies of the journal's files taken right after each real fdatasync."""

    def __init__(self, journal_path: Path, image_dir: Path) -> None:
        self.journal_path = journal_path
        self.dir = image_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.flushes = 0

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)
        self.flushes += 1
        for suffix in ("", "-wal"):
            src = Path(f"{self.journal_path}{suffix}")
            if src.exists():
                shutil.copyfile(src, self.dir / f"journal.db{suffix}")

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """Run ``sql`` on a scratch copy of the image (opening it must not change it)."""
        with tempfile.TemporaryDirectory() as scratch:
            for f in self.dir.iterdir():
                shutil.copyfile(f, Path(scratch) / f.name)
            db = Path(scratch) / "journal.db"
            if not db.exists():
                return []
            conn = sqlite3.connect(db)
            try:
                return conn.execute(sql, args).fetchall()
            finally:
                conn.close()

    def state(self, execute_key: str) -> str | None:
        rows = self.query("SELECT state FROM executions WHERE execute_key = ?", execute_key)
        return rows[0][0] if rows else None


def _new(key: str, now: float) -> NewExecution:
    return new_execution(key, now=now)


def _open(tmp_path: Path) -> tuple[Journal, DurableImage]:
    path = tmp_path / "journal.db"
    journal = Journal(path, "gw")
    image = DurableImage(path, tmp_path / "image")
    journal.fdatasync = image.fdatasync
    return journal, image


def test_a_durable_commit_is_in_the_image_when_it_returns(tmp_path: Path) -> None:
    journal, image = _open(tmp_path)
    now = time.time()
    journal.record(_new("k1", now), ExecutionState.REJECTED, reason="unknown_machine", now=now)
    assert image.state("k1") == "rejected"
    assert journal.durable == journal.written
    journal.close()


def test_an_unflushed_commit_waits_for_flushed_and_waiters_share_one_flush(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        journal, image = _open(tmp_path)
        before = image.flushes
        now = time.time()
        for i in range(10):
            journal.record(
                _new(f"k{i}", now),
                ExecutionState.DISPATCHING,
                reason=None,
                now=now,
                dispatch=DispatchStamp(boot_id=7, exec_count=i, seq=i + 1),
                durable=False,
            )
        # Written (another connection sees it: it survives kill -9) but not flushed.
        assert journal.durable < journal.written
        assert image.flushes == before
        # Ten commands' waits for durability: one fdatasync for all of them.
        await asyncio.gather(*(journal.flushed() for _ in range(10)))
        assert image.flushes == before + 1
        assert {image.state(f"k{i}") for i in range(10)} == {"dispatching"}
        await journal.flushed()  # nothing new written: no flush at all
        assert image.flushes == before + 1
        journal.close()

    asyncio.run(main())


def test_a_failing_flush_is_a_journal_fault_until_one_succeeds(tmp_path: Path) -> None:
    async def main() -> None:
        journal, image = _open(tmp_path)
        faults: list[object] = []
        journal.on_fault_change = faults.append
        now = time.time()
        journal.record(
            _new("k1", now), ExecutionState.REJECTED, reason="x", now=now, durable=False
        )

        def broken(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        journal.fdatasync = broken
        with pytest.raises(JournalUnwritable):
            await journal.flushed()
        assert journal.fault is not None and "Input/output error" in journal.fault.reason
        assert image.state("k1") is None
        journal.fdatasync = image.fdatasync
        await journal.flushed()
        assert journal.fault is None and image.state("k1") == "rejected"
        assert [f is None for f in faults] == [False, True]
        journal.close()

    asyncio.run(main())


def test_nothing_reaches_the_board_or_the_cloud_before_the_image_holds_it(
    tmp_path: Path,
) -> None:
    """A burst of commands (handled concurrently, as the MQTT session does), releases
    in a row, duplicates: at every RELEASE frame the board receives, the image holds
    that release as ``dispatching`` (or later) and every release sent before it settled;
    every stored result re-sent to a duplicate is in the image in that state."""

    async def main() -> None:
        rig = CoreRig(tmp_path, machines=MACHINES)
        core = await rig.start()
        image = DurableImage(rig.config.journal.path, tmp_path / "image")
        core.journal.fdatasync = image.fdatasync
        await rig.settle()
        keys = {command_id_for(f"exec-{i}"): f"exec-{i}" for i in range(6)}
        sent: list[str] = []
        violations: list[str] = []
        decoder = FrameDecoder()

        def board_receives(data: bytes) -> None:
            for frame in decoder.feed(data):
                if frame.type != FrameType.RELEASE:
                    continue
                message = decode(frame)
                assert isinstance(message, Release)
                key = keys[message.command_id]
                if key in sent:
                    continue  # a retransmission of the same frame (same seq)
                if image.state(key) != "dispatching":
                    violations.append(f"{key} sent while the image has {image.state(key)}")
                for earlier in sent:
                    if image.state(earlier) == "dispatching":
                        violations.append(f"{key} sent before {earlier}'s outcome was durable")
                sent.append(key)

        rig.link.on_host_write = board_receives
        tokens = [rig.sign(f"exec-{i}", machine_id=f"W{i + 1}") for i in range(6)]
        # All at once, like commands arriving together: each returns when acknowledged.
        acked: list[str] = []

        async def command(i: int) -> None:
            await rig.command(tokens[i])
            if image.state(f"exec-{i}") is None:
                violations.append(f"exec-{i} acknowledged before it was durable")
            acked.append(f"exec-{i}")

        await asyncio.gather(*(command(i) for i in range(6)))
        await rig.settle(lambda: all(rig.state(k) == "released" for k in keys.values()))
        await rig.settle()
        assert sorted(sent) == sorted(keys.values()) and len(acked) == 6
        assert all(rig.pulses(k) == 1 for k in keys.values())

        # Duplicates, right behind a new command whose result is not flushed yet.
        rig.published.clear()
        fresh = rig.sign("exec-new", machine_id="W1")
        keys[command_id_for("exec-new")] = "exec-new"
        await asyncio.gather(rig.command(fresh), rig.command(fresh), rig.command(tokens[0]))
        for _topic, payload in rig.published:
            body = json.loads(payload)
            durable = image.state(body["execute_key"])
            # "accepted" is the stored result of a row now dispatching or later.
            if durable is None or (body["state"] == "released" and durable != "released"):
                violations.append(f"{body['execute_key']} answered {body['state']} before durable")
        assert len(rig.published) == 2
        await rig.settle(lambda: rig.state("exec-new") == "released")
        assert violations == []
        await rig.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_checkpoints_run_on_the_flush_thread_not_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copying the WAL into the database file costs two fsyncs: the loop's connection
    leaves it to the flush thread (its own automatic checkpoint is only a safety net
    far above what a flush thread's checkpoint lets the WAL reach)."""
    from gateway.journal import database

    async def main() -> None:
        journal, _image = _open(tmp_path)
        conn = journal._conn  # noqa: SLF001 - the setting of this very connection
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == (
            database.AUTOCHECKPOINT_PAGES
        )
        now = time.time()
        for i in range(20):
            journal.record(
                _new(f"k{i}", now), ExecutionState.REJECTED, reason="x", now=now, durable=False
            )
        threads: set[str] = set()
        checkpoint = journal._checkpoint  # noqa: SLF001

        def on_thread() -> None:
            threads.add(threading.current_thread().name)
            checkpoint()

        journal._checkpoint = on_thread  # type: ignore[method-assign]  # noqa: SLF001
        monkeypatch.setattr(database, "CHECKPOINT_EVERY_S", 0.0)
        await journal.flushed()
        assert len(threads) == 1 and next(iter(threads)).startswith("journal-flush")
        # The rows are in the database file itself now, not only in the WAL.
        copy = tmp_path / "main-file-only.db"
        shutil.copyfile(journal.path, copy)
        only_main = sqlite3.connect(copy)
        try:
            assert only_main.execute("SELECT count(*) FROM executions").fetchone()[0] == 20
        finally:
            only_main.close()
        journal.close()

    asyncio.run(main())
