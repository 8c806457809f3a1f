"""The journal's durability settings and schema guard (promise 3 rests on them)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gateway.journal import (
    SCHEMA_VERSION,
    DispatchStamp,
    Journal,
    JournalError,
    JournalFault,
    JournalUnwritable,
    NewExecution,
    iso_utc,
)
from gateway.lifecycle import ExecutionState
from tests.rows import new_execution

DISPATCHING = ExecutionState.DISPATCHING


def _command(key: str, now: float) -> NewExecution:
    return new_execution(key, now=now, command_id=1, payment_id="p")


def test_journal_runs_in_wal_and_flushes_every_default_commit(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    conn = journal._conn  # noqa: SLF001 - the settings of this very connection matter
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # SQLite does not fsync commits itself; the journal flushes the WAL (what FULL
    # would do), at once for a default commit (tests/gateway/test_durability.py).
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    now = time.time()
    journal.record(_command("k1", now), ExecutionState.REJECTED, reason="x", now=now)
    assert journal.durable == journal.written > 0
    journal.mark_sent([12345], channel="mqtt", now=0.0)  # bookkeeping: written, not flushed
    assert journal.durable == journal.written - 1


def test_state_change_and_its_outbox_event_commit_together(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    now = time.time()
    journal.record(
        _command("k1", now),
        DISPATCHING,
        reason=None,
        now=now,
        dispatch=DispatchStamp(boot_id=7, exec_count=0, seq=1),
    )
    assert journal.transition("k1", from_states=("dispatching",), to_state="released", now=now)
    # A second path racing for the same execution changes nothing.
    assert not journal.transition("k1", from_states=("dispatching",), to_state="failed", now=now)
    details = journal.execution_details("k1")
    assert details is not None and details["state"] == "released"
    assert len(details["outbox"]) == 2  # accepted, released
    other = sqlite3.connect(tmp_path / "j.db")  # visible to another connection: committed
    assert other.execute("SELECT count(*) FROM outbox").fetchone()[0] == 2


def test_a_journal_from_a_newer_gateway_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    Journal(path, "gw").close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(JournalError, match="newer than this gateway"):
        Journal(path, "gw")


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError, match="not a journal database"):
        Journal(path, "gw")


def _execution(journal: Journal, key: str, now: float) -> None:
    journal.record(
        _command(key, now),
        DISPATCHING,
        reason=None,
        now=now,
        dispatch=DispatchStamp(boot_id=1, exec_count=0, seq=1),
    )


def test_cleanup_never_deletes_what_the_cloud_has_not_acknowledged(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    long_ago = time.time() - 90 * 86400
    _execution(journal, "acked", long_ago)
    journal.transition("acked", from_states=("dispatching",), to_state="released", now=long_ago)
    _execution(journal, "unacked", long_ago)
    journal.transition("unacked", from_states=("dispatching",), to_state="released", now=long_ago)
    _execution(journal, "open", long_ago)  # still in doubt: never pruned
    acked_ids = [i.id for i in journal.claim(100, now=long_ago) if i.stream in ("acked", "open")]
    journal.mark_sent(acked_ids, channel="mqtt", now=long_ago)

    horizon = time.time() - 30 * 86400
    removed = journal.cleanup(iso_utc(horizon), replay_horizon=horizon)
    assert removed == {"executions": 1, "outbox_events": 3}  # acked: 2 events; open: 1
    assert journal.get("acked") is None
    assert journal.get("unacked") is not None  # its events never reached the cloud
    assert journal.get("open") is not None
    assert journal.depth()["sending"] == 2  # unacked's events, still to deliver


def test_cleanup_keeps_an_execution_while_a_replay_of_its_command_could_verify(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    long_ago = time.time() - 90 * 86400
    _execution(journal, "long-lived", long_ago)
    journal.transition(
        "long-lived", from_states=("dispatching",), to_state="released", now=long_ago
    )
    with journal._tx() as c:  # noqa: SLF001 - a token valid for a year
        c.execute("UPDATE executions SET expires_at = ?", (int(time.time()) + 86400,))
    journal.mark_sent(
        [i.id for i in journal.claim(100, now=long_ago)], channel="mqtt", now=long_ago
    )
    removed = journal.cleanup(iso_utc(time.time() - 86400), replay_horizon=time.time() - 86400)
    assert removed["executions"] == 0  # pruning it would let a replay release again
    assert journal.get("long-lived") is not None


def _record(
    journal: Journal, key: str, state: ExecutionState, dispatch: DispatchStamp | None = None
) -> None:
    now = time.time()
    journal.record(_command(key, now), state, reason=None, now=now, dispatch=dispatch)


def test_a_release_decision_without_its_dispatch_stamp_is_refused(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    with pytest.raises(ValueError, match="DispatchStamp"):
        _record(journal, "k1", DISPATCHING)
    _record(journal, "k2", ExecutionState.ACCEPTED)
    with pytest.raises(ValueError, match="DispatchStamp"):
        journal.transition("k2", from_states=("accepted",), to_state="dispatching", now=0.0)
    assert journal.get("k1") is None


def test_a_failed_commit_changes_nothing_and_the_journal_recovers_by_itself(
    tmp_path: Path,
) -> None:
    """SQLite leaves a transaction open when COMMIT fails on a full disk; the journal
    must roll it back, report the fault once, and clear it on the next good commit."""
    journal = Journal(tmp_path / "j.db", "gw")
    seen: list[JournalFault | None] = []
    journal.on_fault_change = seen.append
    _record(journal, "k1", DISPATCHING, dispatch=DispatchStamp(7, 3, 1))
    # A full disk, as SQLite reports it at COMMIT: make the commit itself fail.
    journal._conn.execute("PRAGMA max_page_count=1")  # noqa: SLF001
    big = "x" * 100_000
    for _ in range(2):
        with pytest.raises(JournalUnwritable, match="full"):
            journal.audit(
                action="a", target="t", actor=big, os_user="u", reason="r", outcome="o", now=0
            )
    assert journal.fault is not None and "full" in journal.fault.reason
    assert len(seen) == 1  # one notice per episode
    assert not journal._conn.in_transaction  # noqa: SLF001
    assert journal.audit_entries() == []
    journal._conn.execute("PRAGMA max_page_count=1073741823")  # noqa: SLF001
    assert journal.transition("k1", from_states=("dispatching",), to_state="released", now=0.0)
    assert journal.fault is None and seen[-1] is None
    row = journal.get("k1")
    assert row is not None and row.state == "released"
    assert (row.dispatch_boot_id, row.dispatch_exec_count, row.dispatch_seq) == (7, 3, 1)


def test_releases_left_dispatching_by_an_older_gateway_are_in_doubt(tmp_path: Path) -> None:
    """Schema 3 recorded no execution count: every release it left dispatching may have
    reached the board, and only the board's answer may settle it."""
    path = tmp_path / "j.db"
    Journal(path, "gw").close()
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO executions(execute_key, command_id, payment_id, machine_id, cycle,"
        " expires_at, state, dispatch_boot_id, received_at, updated_at, last_result)"
        " VALUES ('old', '01', 'p', 'W1', 'normal', 0, 'dispatching', 7, '', '', '')"
    )
    conn.execute("DROP INDEX idx_executions_dispatch_seq")
    conn.execute("DROP INDEX idx_executions_awaiting_start")  # schema 5
    for index in (  # schema 6
        "idx_executions_payment_id",
        "idx_executions_provider_ref",
        "idx_executions_idempotency_key",
        "idx_audit_log_at",
        "idx_rejections_at",
        "idx_outbox_archived",
    ):
        conn.execute(f"DROP INDEX {index}")
    conn.execute("DROP TABLE store_state")
    for column in ("config_version", "params", "decision"):
        conn.execute(f"ALTER TABLE audit_log DROP COLUMN {column}")
    for column in ("dispatch_seq", "dispatch_exec_count", "board_exec_count", "in_doubt"):
        conn.execute(f"ALTER TABLE executions DROP COLUMN {column}")
    conn.execute("PRAGMA user_version=3")
    conn.commit()
    conn.close()
    rows = Journal(path, "gw").dispatching_in_order()
    assert [(r.execute_key, r.in_doubt, r.dispatch_exec_count) for r in rows] == [
        ("old", True, None)
    ]


def test_start_confirmation_reads_only_what_it_watches(tmp_path: Path) -> None:
    """Final releases pile up for months; the sweep that runs four times a second must
    neither load them nor scan them (a partial index holds only the watched rows)."""
    journal = Journal(tmp_path / "j.db", "gw")
    for i, (state, awaits) in enumerate(
        [("released", False), ("released", True), ("released", True), ("expired", False)]
    ):
        new = new_execution(
            f"k{i}", command_id=i, machine_id="W1" if i != 2 else "W2", awaits_start=awaits
        )
        initial = "dispatching" if state == "released" else state
        stamp = DispatchStamp(1, 0, i + 1) if initial == "dispatching" else None
        journal.record(new, initial, reason=None, now=0.0, dispatch=stamp)  # type: ignore[arg-type]
        if state == "released":
            journal.transition(
                f"k{i}", from_states=("dispatching",), to_state="released", now=0.0
            )
    assert [r.execute_key for r in journal.awaiting_start()] == ["k1", "k2"]
    assert [r.execute_key for r in journal.awaiting_start("W1")] == ["k1"]
    plan = " ".join(
        str(row[-1])
        for row in journal._conn.execute(  # noqa: SLF001 - the plan of this very query
            "EXPLAIN QUERY PLAN SELECT * FROM executions"
            " INDEXED BY idx_executions_awaiting_start WHERE awaits_start = 1 AND"
            " state IN ('released', 'not_started', 'started') ORDER BY received_at"
        )
    )
    assert "idx_executions_awaiting_start" in plan, plan
