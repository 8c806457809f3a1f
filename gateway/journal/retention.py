"""Reconciliation and retention: what awaits the cloud, and deleting only what is done.

Reconciliation and retention: the runbooks' diagnostic queries, and the cleanup
that deletes only what is old, done and acknowledged by the cloud.
"""

from __future__ import annotations

from typing import Any

from ..events import COMPENSATION_TOPIC
from ..lifecycle import COMPENSATED, FINAL, PENDING_START, ExecutionState, ordered
from .database import Database, placeholders

__all__ = ["Retention"]


class Retention(Database):
    """What may be forgotten, and what is still owed to the cloud or a customer."""

    def reconcile(self, since_iso: str) -> dict[str, list[dict[str, Any]]]:
        """The runbooks' diagnostic queries, for executions received since ``since_iso``:
        results the cloud has not acknowledged yet, and executions waiting for a
        compensation or a technician."""
        compensated = ordered(COMPENSATED)
        unacked = self._conn.execute(
            "SELECT e.execute_key, e.payment_id, e.machine_id, e.state, e.received_at,"
            " count(o.id) AS events_not_acked, group_concat(DISTINCT o.state) AS outbox_states"
            " FROM executions e JOIN outbox o ON o.stream = e.execute_key"
            " WHERE e.received_at >= ? AND o.state NOT IN ('sent')"
            " GROUP BY e.execute_key ORDER BY e.received_at",
            (since_iso,),
        ).fetchall()
        waiting = self._conn.execute(
            "SELECT e.execute_key, e.payment_id, e.provider_ref, e.idempotency_key,"
            " e.amount_cents, e.machine_id, e.state, e.reason, e.updated_at,"
            " (SELECT o.state FROM outbox o WHERE o.stream = e.execute_key"
            "   AND o.topic = ? ORDER BY o.id DESC LIMIT 1) AS compensation_event"
            " FROM executions e WHERE e.received_at >= ?"
            f" AND e.state IN ({placeholders(compensated)})"
            " AND e.kind = 'payment' ORDER BY e.received_at",
            (COMPENSATION_TOPIC, since_iso, *compensated),
        ).fetchall()
        return {
            "not_acknowledged": [dict(r) for r in unacked],
            "awaiting_compensation": [dict(r) for r in waiting],
        }

    def cleanup(self, older_than_iso: str, *, replay_horizon: float) -> dict[str, int]:
        """Delete what is old AND done: sent outbox items, and finished executions whose
        every event the cloud acknowledged. Anything not yet acknowledged is kept.

        An execution row is also the memory that makes a replayed command a duplicate,
        so it is kept until its command expired before ``replay_horizon`` (epoch): the
        verifier refuses any token that expired before that same horizon as stale."""
        # Final states a technician no longer needs; needs_review waits for a person.
        finished = ordered(FINAL - {ExecutionState.NEEDS_REVIEW})
        pending = ordered(PENDING_START)  # final once nothing awaits the start
        with self._tx() as c:
            keys = [
                r[0]
                for r in c.execute(
                    "SELECT execute_key FROM executions e"
                    " WHERE updated_at < ? AND expires_at < ?"
                    f" AND (state IN ({placeholders(finished)})"
                    f"   OR (state IN ({placeholders(pending)}) AND e.awaits_start = 0))"
                    " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.stream = e.execute_key"
                    "   AND o.state != 'sent')",
                    (older_than_iso, replay_horizon, *finished, *pending),
                )
            ]
            c.executemany(
                "DELETE FROM execution_events WHERE execute_key = ?", [(k,) for k in keys]
            )
            c.executemany("DELETE FROM executions WHERE execute_key = ?", [(k,) for k in keys])
            gone = c.execute(
                "DELETE FROM outbox WHERE state = 'sent' AND sent_at < ? RETURNING id",
                (older_than_iso,),
            ).fetchall()
            c.executemany("DELETE FROM dispatch_log WHERE item_id = ?", [(r[0],) for r in gone])
        return {"executions": len(keys), "outbox_events": len(gone)}
