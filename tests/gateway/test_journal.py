"""The journal's durability settings and schema guard (promise 3 rests on them)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gateway.journal import SCHEMA_VERSION, Journal, JournalError


def test_journal_runs_in_wal_with_synchronous_full(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    conn = journal._conn  # noqa: SLF001 - the settings of this very connection matter
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    journal.mark_sent(12345)  # a non-durable bookkeeping commit ...
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # ... restores FULL


def test_state_change_and_its_outbox_event_commit_together(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    now = time.time()
    journal.record_new(
        execute_key="k1",
        command_id=1,
        payment_id="p",
        machine_id="W1",
        cycle="normal",
        issued_at=int(now),
        expires_at=int(now) + 60,
        provider_ref=None,
        idempotency_key=None,
        amount_cents=None,
        state="dispatching",
        reason=None,
        now=now,
        dispatch_boot_id=7,
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
