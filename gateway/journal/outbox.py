"""The outbox in the journal: events queued with the change they report, until delivered.

The outbox in the journal: events queued in the same transaction as the change they
report, and the dispatcher's side of it (cloud_sync.outbox.OutboxStore) with its
dispatch log.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from cloud_sync.outbox import SENDING_TIMEOUT_ERROR, STATES, OutboxItem

from ..events import encode, iso_utc, new_event_id
from .database import Database

__all__ = ["OUTBOX_STATES", "Outbox", "append_event", "append_payload"]

#: The dispatcher's states; the journal adds "archived" (dlq.DeadLetters), a
#: dead item a technician chose not to send, kept for the record.
OUTBOX_STATES = STATES


def append_event(
    c: sqlite3.Connection, stream: str, topic: str, body: dict[str, Any], at: str
) -> None:
    """Queue ``body`` (a contract event without its event_id) on ``stream``, in the
    caller's transaction: the event commits with the change it reports."""
    event_id = new_event_id()
    append_payload(c, event_id, stream, topic, encode(event_id, body), at)


def append_payload(
    c: sqlite3.Connection, event_id: str, stream: str, topic: str, payload: str, at: str
) -> None:
    """Queue an already encoded event (a result, whose payload is also kept on its
    execution row), in the caller's transaction."""
    c.execute(
        "INSERT INTO outbox(event_id, stream, topic, payload, created_at, updated_at)"
        " VALUES (?,?,?,?,?,?)",
        (event_id, stream, topic, payload, at, at),
    )


def _log_dispatch(
    c: sqlite3.Connection,
    ids: Sequence[int],
    at: float,
    channel: str | None,
    outcome: str,
    error: str | None,
) -> None:
    c.executemany(
        "INSERT INTO dispatch_log(item_id, at, channel, outcome, error) VALUES (?,?,?,?,?)",
        [(i, at, channel, outcome, error) for i in ids],
    )


class Outbox(Database):
    """cloud_sync.outbox.OutboxStore, as the dispatcher drives it.

    "attempts" counts attempts that ended (sent, failed, timed out); a claim alone,
    or a release because no channel was reachable, does not spend one, so a long
    outage never pushes events into the dead-letter queue."""

    def claim(self, limit: int, now: float) -> list[OutboxItem]:
        with self._tx(durable=False) as c:
            rows = c.execute(
                "WITH blocked AS (SELECT stream, MIN(id) AS first_blocked FROM outbox"
                "  WHERE state = 'sending' OR (state = 'failed' AND next_attempt_at > :now)"
                "  GROUP BY stream)"
                " SELECT o.id, o.event_id, o.stream, o.topic, o.payload, o.attempts"
                " FROM outbox o LEFT JOIN blocked b USING (stream)"
                " WHERE (o.state = 'pending' OR (o.state = 'failed' AND o.next_attempt_at <= :now))"
                "  AND (b.first_blocked IS NULL OR o.id < b.first_blocked)"
                " ORDER BY o.id LIMIT :limit",
                {"now": now, "limit": limit},
            ).fetchall()
            c.executemany(
                "UPDATE outbox SET state = 'sending', sending_since = ? WHERE id = ?",
                [(now, r["id"]) for r in rows],
            )
        return [
            OutboxItem(
                r["id"],
                r["event_id"],
                r["stream"],
                r["topic"],
                r["payload"].encode(),
                r["attempts"],
            )
            for r in rows
        ]

    def requeue_stale(self, older_than_s: float, now: float) -> int:
        # Called every dispatcher round: look before opening a write transaction, so
        # the common case (nothing stale) costs no fsync on the event loop.
        if not self._conn.execute(
            "SELECT 1 FROM outbox WHERE state = 'sending' AND sending_since < ? LIMIT 1",
            (now - older_than_s,),
        ).fetchone():
            return 0
        with self._tx() as c:
            rows = c.execute(
                "UPDATE outbox SET state = 'failed', attempts = attempts + 1,"
                " last_error = ?, next_attempt_at = ?, updated_at = ?"
                " WHERE state = 'sending' AND sending_since < ? RETURNING id",
                (SENDING_TIMEOUT_ERROR, now, iso_utc(now), now - older_than_s),
            ).fetchall()
            _log_dispatch(c, [r["id"] for r in rows], now, None, "timeout", SENDING_TIMEOUT_ERROR)
        return len(rows)

    def mark_sent(self, ids: Sequence[int], *, channel: str, now: float) -> None:
        # Not fsynced: a lost "sent" only means a re-send, which the cloud de-duplicates
        # by event_id; keeping fsyncs off this path keeps them off the release path.
        with self._tx(durable=False) as c:
            c.executemany(
                "UPDATE outbox SET state = 'sent', attempts = attempts + 1, sent_at = ?,"
                " updated_at = ? WHERE id = ? AND state NOT IN ('sent', 'dead')",
                [(iso_utc(now), iso_utc(now), i) for i in ids],
            )
            _log_dispatch(c, ids, now, channel, "sent", None)

    def mark_failed(
        self,
        item_id: int,
        *,
        error: str,
        retryable: bool,
        channel: str,
        now: float,
        next_attempt_at: float,
        max_attempts: int,
    ) -> str:
        with self._tx() as c:
            row = c.execute(
                "SELECT state, attempts FROM outbox WHERE id = ?", (item_id,)
            ).fetchone()
            if row is None:
                return "missing"
            if row["state"] != "sending":
                return str(row["state"])
            attempts = row["attempts"] + 1
            state = "dead" if not retryable or attempts >= max_attempts else "failed"
            c.execute(
                "UPDATE outbox SET state = ?, attempts = ?, last_error = ?, next_attempt_at = ?,"
                " updated_at = ? WHERE id = ?",
                (state, attempts, error[:300], next_attempt_at, iso_utc(now), item_id),
            )
            _log_dispatch(c, [item_id], now, channel, state, error[:300])
        return state

    def release(
        self, ids: Sequence[int], *, error: str, channel: str, now: float, next_attempt_at: float
    ) -> None:
        with self._tx(durable=False) as c:
            released = [
                r["id"]
                for i in ids
                for r in c.execute(
                    "UPDATE outbox SET state = 'failed', last_error = ?, next_attempt_at = ?,"
                    " updated_at = ? WHERE id = ? AND state = 'sending' RETURNING id",
                    (error[:300], next_attempt_at, iso_utc(now), i),
                )
            ]
            _log_dispatch(c, released, now, channel, "unreachable", error[:300])

    def depth(self) -> dict[str, int]:
        counts = {state: 0 for state in OUTBOX_STATES}
        for state, n in self._conn.execute("SELECT state, count(*) FROM outbox GROUP BY state"):
            counts[state] = n
        return counts

    def outbox_depth(self) -> int:
        """Events still to deliver (pending, sending or failed; not the DLQ)."""
        row = self._conn.execute(
            "SELECT count(*) FROM outbox WHERE state IN ('pending', 'sending', 'failed')"
        ).fetchone()
        return int(row[0])
