"""Schema compatibility across releases (issue 10): the previous release runs on a
journal a newer one migrated, unless a breaking migration says it cannot.

A "newer build" here is the real ``migrate()`` with one more migration appended to
its list, as the next release's code would have it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlite_utils

from gateway.journal import Journal, JournalError, NewExecution
from gateway.journal import schema as schema_module
from gateway.journal.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    additive,
    breaking,
    compat_of,
    journal_compat,
    oldest_reader,
)
from gateway.lifecycle import ExecutionState
from tests.rows import new_execution


def _command(key: str, now: float) -> NewExecution:
    return new_execution(key, now=now)


@additive
def _next_additive(db: sqlite_utils.Database) -> None:
    db["loyalty_points"].create({"id": int, "execute_key": str}, pk="id")  # type: ignore[union-attr]
    db["executions"].add_column("loyalty_note", str)  # type: ignore[union-attr]


@breaking
def _next_breaking(db: sqlite_utils.Database) -> None:
    db.execute("UPDATE executions SET state = 'renamed_state' WHERE state = 'released'")


def _migrate_as_newer_build(path: Path, migration: object) -> None:
    """Open ``path`` with a build whose migrations end in ``migration``."""
    conn = sqlite3.connect(path, isolation_level=None)

    @contextmanager
    def tx() -> Iterator[sqlite3.Connection]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    newer = [*MIGRATIONS, migration]
    mp = pytest.MonkeyPatch()
    mp.setattr(schema_module, "MIGRATIONS", newer)
    mp.setattr(schema_module, "SCHEMA_VERSION", len(newer))
    try:
        schema_module.migrate(conn, path, tx)
    finally:
        mp.undo()
        conn.close()


def _rows(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("executions", "execution_events", "outbox")
        }
    finally:
        conn.close()


def test_every_migration_says_whether_older_builds_can_run_it() -> None:
    unmarked = [m.__name__ for m in MIGRATIONS if compat_of(m) is None]
    assert unmarked == [], f"mark @additive or @breaking (journal/schema.py): {unmarked}"


def test_a_new_journal_records_the_oldest_build_able_to_run_it(tmp_path: Path) -> None:
    Journal(tmp_path / "j.db", "gw").close()
    conn = sqlite3.connect(tmp_path / "j.db")
    compat = journal_compat(conn)
    conn.close()
    assert compat.version == SCHEMA_VERSION
    assert compat.oldest_reader == oldest_reader(SCHEMA_VERSION) <= SCHEMA_VERSION


def test_previous_build_runs_on_a_journal_an_additive_migration_moved_on(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    now = time.time()
    journal = Journal(path, "gw")
    journal.record(_command("before-upgrade", now), ExecutionState.ACCEPTED, reason=None, now=now)
    journal.close()

    _migrate_as_newer_build(path, _next_additive)
    # The newer build wrote a row of its own after migrating.
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO loyalty_points (execute_key) VALUES ('before-upgrade')")
    conn.commit()
    conn.close()
    rows_after_upgrade = _rows(path)

    # Rollback: this build opens it, leaves the newer schema as it is, and keeps writing.
    journal = Journal(path, "gw")
    assert journal.execution_details("before-upgrade") is not None
    journal.record(_command("after-rollback", now), ExecutionState.ACCEPTED, reason=None, now=now)
    journal.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    assert conn.execute("SELECT count(*) FROM loyalty_points").fetchone()[0] == 1
    assert journal_compat(conn).oldest_reader == oldest_reader(SCHEMA_VERSION)
    conn.close()
    assert _rows(path)["executions"] == rows_after_upgrade["executions"] + 1


def test_previous_build_refuses_a_journal_a_breaking_migration_moved_on(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    Journal(path, "gw").close()
    _migrate_as_newer_build(path, _next_breaking)
    with pytest.raises(JournalError, match=f"needs a gateway of schema {SCHEMA_VERSION + 1}"):
        Journal(path, "gw")


def test_a_journal_from_before_the_meta_table_gets_it_on_open(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    Journal(path, "gw").close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE schema_meta")
    conn.commit()
    assert journal_compat(conn).oldest_reader is None
    conn.close()
    Journal(path, "gw").close()
    conn = sqlite3.connect(path)
    assert journal_compat(conn).oldest_reader == oldest_reader(SCHEMA_VERSION)
    conn.close()


def test_an_unmarked_migration_counts_as_breaking() -> None:
    def unmarked(db: sqlite_utils.Database) -> None:
        pass

    assert compat_of(unmarked) is None
    mp = pytest.MonkeyPatch()
    mp.setattr(schema_module, "MIGRATIONS", [*MIGRATIONS, unmarked])
    try:
        assert schema_module.oldest_reader(SCHEMA_VERSION + 1) == SCHEMA_VERSION + 1
    finally:
        mp.undo()
