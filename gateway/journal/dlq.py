"""The dead-letter queue: events the dispatcher gave up on, for a technician to act on.

The dead-letter queue: outbox events the dispatcher gave up on, which a technician
lists, inspects, retries or archives (``metalavctl dlq``); every decision audited.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..events import iso_utc
from .database import Database, placeholders
from .records import write_audit

__all__ = ["DeadLetters"]


class DeadLetters(Database):
    """The outbox's ``dead`` and ``archived`` items. Archived: a dead item a technician
    chose not to send, kept (never deleted) for the record."""

    def dlq(self, *, include_archived: bool = False) -> list[dict[str, Any]]:
        states = ("dead", "archived") if include_archived else ("dead",)
        rows = self._conn.execute(
            "SELECT id, event_id, stream, topic, state, attempts, last_error, created_at,"
            f" updated_at, archived_at FROM outbox WHERE state IN ({placeholders(states)})"
            " ORDER BY id",
            states,
        ).fetchall()
        return [dict(r) for r in rows]

    def outbox_item(self, item_id: int) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT * FROM outbox WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            return None
        item = dict(row)
        item["payload"] = json.loads(item["payload"])
        item["attempts_log"] = [
            dict(r)
            for r in self._conn.execute(
                "SELECT at, channel, outcome, error FROM dispatch_log WHERE item_id = ?"
                " ORDER BY id",
                (item_id,),
            )
        ]
        return item

    def dlq_retry(
        self, ids: Sequence[int] | None, *, actor: str, os_user: str, reason: str, now: float
    ) -> list[int]:
        """Dead items (all when ``ids`` is None) back to pending with a fresh attempt
        budget; audited. Returns the ids moved."""
        with self._tx() as c:
            if ids is None:
                ids = [r["id"] for r in c.execute("SELECT id FROM outbox WHERE state = 'dead'")]
            moved = [
                r["id"]
                for i in ids
                for r in c.execute(
                    "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = 0,"
                    " updated_at = ? WHERE id = ? AND state = 'dead' RETURNING id",
                    (iso_utc(now), i),
                )
            ]
            write_audit(
                c,
                at=iso_utc(now),
                actor=actor,
                os_user=os_user,
                action="dlq.retry",
                target=",".join(map(str, ids))[:200],
                before={"state": "dead"},
                after={"state": "pending", "ids": moved},
                reason=reason,
                outcome="applied" if moved else "unchanged",
            )
        return moved

    def dlq_archive(
        self, item_id: int, *, actor: str, os_user: str, reason: str, now: float
    ) -> bool:
        """A dead item a technician decided not to send: kept (never deleted), audited."""
        with self._tx() as c:
            done = (
                c.execute(
                    "UPDATE outbox SET state = 'archived', archived_at = ?, updated_at = ?"
                    " WHERE id = ? AND state = 'dead' RETURNING id",
                    (iso_utc(now), iso_utc(now), item_id),
                ).fetchone()
                is not None
            )
            write_audit(
                c,
                at=iso_utc(now),
                actor=actor,
                os_user=os_user,
                action="dlq.archive",
                target=str(item_id),
                before={"state": "dead"},
                after={"state": "archived"} if done else None,
                reason=reason,
                outcome="applied" if done else "unchanged",
            )
        return done
