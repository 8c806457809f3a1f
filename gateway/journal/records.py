"""Records for the people who run the store: audit log, out-of-service flags, alerts.

What the gateway keeps for the people who run it: the audit log (the runbook's
"registro obrigatório de operação"), out-of-service flags, refused commands, alerts,
and the last known state of the board.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from ..events import (
    ALERTS_TOPIC,
    OPERATIONS_TOPIC,
    Alert,
    alert_event,
    iso_utc,
    operation_event,
)
from .database import Database
from .outbox import append_event

__all__ = ["OPERATIONS_STREAM", "OperatorRecords", "write_alert", "write_audit"]

#: Operation records reach the cloud in the order they were made: one stream.
OPERATIONS_STREAM = "operations"


def write_audit(
    c: sqlite3.Connection,
    *,
    at: str,
    actor: str,
    os_user: str,
    action: str,
    target: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    reason: str,
    outcome: str,
    params: dict[str, Any] | None = None,
    decision: str | None = None,
) -> None:
    """One line of the audit log (the runbook's operation record), in the transaction
    of the action it records, with the config version the gateway runs under; the same
    commit queues it for the cloud (``operation.record`` on ``P/operations``)."""
    state = dict(
        c.execute(
            "SELECT key, value FROM store_state WHERE key IN ('config_version', 'gateway_id')"
        ).fetchall()
    )
    config_version = json.loads(state["config_version"]) if "config_version" in state else None
    row = c.execute(
        "INSERT INTO audit_log(at, actor, os_user, action, target, before, after, reason,"
        " outcome, config_version, params, decision) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
        " RETURNING id",
        (
            at,
            actor,
            os_user,
            action,
            target,
            None if before is None else json.dumps(before),
            None if after is None else json.dumps(after),
            reason,
            outcome,
            config_version,
            None if params is None else json.dumps(params),
            decision,
        ),
    ).fetchone()
    body = operation_event(
        gateway_id=json.loads(state.get("gateway_id", '""')),
        record_id=int(row[0]),
        at=at,
        actor=actor,
        os_user=os_user,
        action=action,
        target=target,
        params=params,
        config_version=config_version,
        before=before,
        after=after,
        reason=reason,
        decision=decision,
        outcome=outcome,
    )
    append_event(c, OPERATIONS_STREAM, OPERATIONS_TOPIC, body, at)


def write_alert(c: sqlite3.Connection, gateway_id: str, alert: Alert, at: str) -> None:
    """Keep ``alert`` for ``metalavctl machines`` and queue it for the cloud, in the
    caller's transaction."""
    c.execute(
        "INSERT INTO alerts(at, code, severity, machine_id, execute_key, detail)"
        " VALUES (?,?,?,?,?,?)",
        (at, alert.code, alert.severity, alert.machine_id, alert.execute_key, alert.detail),
    )
    # Alerts of one machine (or of the board) form one ordered stream.
    stream = f"alerts:{alert.machine_id or 'board'}"
    append_event(c, stream, ALERTS_TOPIC, alert_event(gateway_id, alert, at), at)


class OperatorRecords(Database):
    """Operator actions (each audited in the commit that applies it), alerts, refusals
    and board state."""

    def audit(
        self,
        *,
        action: str,
        target: str,
        actor: str,
        os_user: str,
        reason: str,
        outcome: str,
        now: float,
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        decision: str | None = None,
    ) -> None:
        with self._tx() as c:
            write_audit(
                c,
                at=iso_utc(now),
                actor=actor,
                os_user=os_user,
                action=action,
                target=target,
                before=before,
                after=after,
                reason=reason,
                outcome=outcome,
                params=params,
                decision=decision,
            )

    def audit_entries(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT * FROM audit_log ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [dict(r) for r in rows]

    def set_out_of_service(
        self, machine_id: str, value: bool, *, reason: str, actor: str, os_user: str, now: float
    ) -> bool:
        """Set or clear a machine's out-of-service flag, audited in the same commit.
        Returns False (and audits a no-op) when the flag already had that value."""
        at = iso_utc(now)
        with self._tx() as c:
            row = c.execute(
                "SELECT out_of_service, reason FROM machine_state WHERE machine_id = ?",
                (machine_id,),
            ).fetchone()
            before = bool(row and row["out_of_service"])
            changed = before != value
            if changed:
                c.execute(
                    "INSERT INTO machine_state(machine_id, out_of_service, reason, set_by, set_at)"
                    " VALUES (?,?,?,?,?) ON CONFLICT(machine_id) DO UPDATE SET"
                    " out_of_service = excluded.out_of_service, reason = excluded.reason,"
                    " set_by = excluded.set_by, set_at = excluded.set_at",
                    (machine_id, int(value), reason, actor, at),
                )
            write_audit(
                c,
                at=at,
                actor=actor,
                os_user=os_user,
                action="machine.out_of_service" if value else "machine.in_service",
                target=machine_id,
                before={"out_of_service": before},
                after={"out_of_service": value},
                reason=reason,
                outcome="applied" if changed else "unchanged",
            )
        return changed

    def out_of_service(self) -> dict[str, dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT machine_id, reason, set_by, set_at FROM machine_state WHERE out_of_service = 1"
        ).fetchall()
        return {r["machine_id"]: dict(r) for r in rows}

    def log_rejection(
        self, *, execute_key: str | None, reason: str, detail: str, now: float
    ) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO rejections(at, execute_key, reason, detail) VALUES (?,?,?,?)",
                (iso_utc(now), execute_key, reason, detail[:200]),
            )

    def rejection_count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM rejections").fetchone()[0])

    def raise_alert(self, alert: Alert, *, now: float) -> None:
        with self._tx() as c:
            write_alert(c, self.gateway_id, alert, iso_utc(now))

    def recent_alerts(self, machine_id: str | None, limit: int = 5) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT at, code, severity, execute_key, detail FROM alerts"
            " WHERE machine_id IS ? ORDER BY id DESC LIMIT ?",
            (machine_id, limit),
        ).fetchall()
        return [dict(r) for r in rows]

    def board_value(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM board_state WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_board_value(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO board_state(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
