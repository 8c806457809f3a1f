"""The journal is the dispatcher's OutboxStore: it passes the same contract suite as
cloud_sync's in-memory reference store, on a real SQLite file."""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path

import pytest

from cloud_sync.outbox import DispatchRecord
from devtools.broker import LocalBroker
from gateway.journal import Journal, iso_utc
from gateway.journal.outbox import append_payload
from tests.cloud_sync.outbox_contract import OutboxStoreContract
from tests.cloud_sync.test_dispatcher import (
    broker_down_with_1000_queued_then_delivered,
    seventy_two_hours_offline_then_drained,
)


class SqliteContractStore(Journal):
    """The journal plus the contract's producer/inspection helpers."""

    def add(self, event_id: str, stream: str, topic: str, payload: bytes) -> int:
        at = iso_utc(time.time())
        with self._tx() as c:
            append_payload(c, event_id, stream, topic, payload.decode(), at)
            return int(c.execute("SELECT last_insert_rowid()").fetchone()[0])

    def _col(self, item_id: int, column: str) -> object:
        return self._conn.execute(
            f"SELECT {column} FROM outbox WHERE id = ?", (item_id,)
        ).fetchone()[0]

    def state(self, item_id: int) -> str:
        return str(self._col(item_id, "state"))

    def attempts(self, item_id: int) -> int:
        return int(self._col(item_id, "attempts"))  # type: ignore[call-overload]

    def last_error(self, item_id: int) -> str | None:
        value = self._col(item_id, "last_error")
        return None if value is None else str(value)

    def dispatch_log(self) -> list[DispatchRecord]:
        rows = self._conn.execute(
            "SELECT item_id, at, channel, outcome, error FROM dispatch_log ORDER BY id"
        ).fetchall()
        return [DispatchRecord(r[0], r[1], r[2], r[3], r[4]) for r in rows]


class TestJournalOutboxStore(OutboxStoreContract):
    def make_store(self) -> SqliteContractStore:  # type: ignore[override]
        return SqliteContractStore(Path(tempfile.mkdtemp()) / "journal.db", "gw")


def test_claims_survive_a_crash_as_sending_and_time_out(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    store = SqliteContractStore(path, "gw")
    item = store.add("e1", "s", "results", b'{"event_id": "e1"}')
    assert [i.id for i in store.claim(10, now=100.0)] == [item]
    store._conn.close()  # noqa: SLF001 - the process dies with the item in flight
    reopened = SqliteContractStore(path, "gw")
    assert reopened.state(item) == "sending"
    assert reopened.requeue_stale(300, now=500.0) == 1
    assert (reopened.state(item), reopened.last_error(item)) == ("failed", "sending_timeout")
    assert [i.id for i in reopened.claim(10, now=500.0)] == [item]
    assert sqlite3.connect(path).execute("SELECT count(*) FROM dispatch_log").fetchone()[0] == 1


def test_72_hours_offline_then_drained_from_the_journal(tmp_path: Path) -> None:
    seventy_two_hours_offline_then_drained(SqliteContractStore(tmp_path / "journal.db", "gw"))


@pytest.mark.broker_semantics
def test_broker_down_with_1000_queued_in_the_journal_then_delivered_in_order_once(
    tmp_path: Path, fresh_broker: LocalBroker
) -> None:
    store = SqliteContractStore(tmp_path / "journal.db", "gw")
    broker_down_with_1000_queued_then_delivered(store, fresh_broker)
