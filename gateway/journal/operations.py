"""What technicians need of the journal beyond one execution (issue 12).

- lookups: executions by state / machine / time, by payment_id, and the payment audit
  by ``provider_ref`` / ``idempotency_key`` (runbook: payments 4A, 4C);
- the decisions only a person may take: ``resolve`` of a ``needs_review``, the
  re-dispatch of a release the board provably never acted on, the re-send of a
  stored result; each in one commit with its operation record;
- store-wide state that survives restarts (the pause, the config version);
- bounded growth: archived DLQ items, refusals and audit rows pruned by age.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from ..config import GatewayConfig
from ..events import COMPENSATION_TOPIC, RESULTS_TOPIC, iso_utc, new_event_id
from ..lifecycle import COMPENSATED, ExecutionState, check_transition, ordered
from .database import Database, placeholders
from .executions import DispatchStamp, _compensation, _event, _result
from .outbox import append_payload
from .records import write_audit

__all__ = [
    "BOARD_NACK",
    "PAUSE_KEY",
    "Operations",
    "Refused",
    "StorePause",
    "record_cutoffs",
]

PAUSE_KEY = "pause"
TECHNICIAN_RELEASED = "technician_released"
TECHNICIAN_NOT_RELEASED = "technician_not_released"
CONFIG_VERSION_KEY = "config_version"
#: The reason of a ``failed`` execution the board refused: the only proof, besides a
#: row never dispatched, that a release never reached the relay.
BOARD_NACK = "board_nack:"
#: Executions that released a payment, or are on their way to (a second execute_key
#: for the same payment is a suspected duplicate, runbook 4C).
RELEASED_STATES = ordered(
    {
        ExecutionState.ACCEPTED,
        ExecutionState.DISPATCHING,
        ExecutionState.RELEASED,
        ExecutionState.STARTED,
        ExecutionState.NOT_STARTED,
        ExecutionState.COMPLETED,
    }
)


class Refused(Exception):
    """An operation the journal refuses, before writing anything but its record."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class StorePause:
    reason: str
    by: str
    since: str


def set_store_value(c: sqlite3.Connection, key: str, value: Any) -> None:
    c.execute(
        "INSERT INTO store_state(key, value) VALUES (?, ?)"
        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, json.dumps(value)),
    )


def record_cutoffs(config: GatewayConfig, now: float) -> dict[str, str]:
    """The ages :meth:`Operations.prune_records` prunes at, from the config."""
    return {
        "archived_before_iso": iso_utc(now - config.outbox.archived_retention_days * 86400),
        "records_before_iso": iso_utc(now - config.journal.records_retention_days * 86400),
    }


class Operations(Database):
    """Lookups, technician decisions, store-wide state and pruning."""

    _pause_cache: StorePause | None
    _pause_loaded: bool = False

    # -- store-wide state ---------------------------------------------------------------

    def store_value(self, key: str) -> Any:
        row = self._conn.execute("SELECT value FROM store_state WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def note_identity(self, *, gateway_id: str, config_version: str) -> None:
        """What every operation record carries: written once at start, and only when
        it changed (no fsync on an ordinary start)."""
        wanted = {"gateway_id": gateway_id, CONFIG_VERSION_KEY: config_version}
        if all(self.store_value(k) == v for k, v in wanted.items()):
            return
        with self._tx(label="store_state") as c:
            for key, value in wanted.items():
                set_store_value(c, key, value)

    def store_pause(self) -> StorePause | None:
        """The store-wide pause, from memory: intake asks on every command."""
        if not self._pause_loaded:
            value = self.store_value(PAUSE_KEY)
            self._pause_cache = None if not value else StorePause(**value)
            self._pause_loaded = True
        return self._pause_cache

    def set_store_pause(
        self, paused: bool, *, reason: str, actor: str, os_user: str, now: float
    ) -> bool:
        """Pause or resume the store (audited in the same commit); False if it already
        was so."""
        before = self.store_pause()
        changed = (before is not None) != paused
        at = iso_utc(now)
        after = StorePause(reason, actor, at) if paused and changed else before
        if not paused:
            after = None
        with self._tx(label="store_pause") as c:
            if changed:
                set_store_value(c, PAUSE_KEY, None if after is None else after.__dict__)
            write_audit(
                c,
                at=at,
                actor=actor,
                os_user=os_user,
                action="store.pause" if paused else "store.resume",
                target="store",
                before={"paused": before is not None},
                after={"paused": paused},
                reason=reason,
                outcome="applied" if changed else "unchanged",
            )
        if changed:
            self._pause_cache, self._pause_loaded = after, True
        return changed

    # -- lookups ------------------------------------------------------------------------

    def list_executions(
        self,
        *,
        state: str | None,
        machine_id: str | None,
        since_iso: str | None,
        until_iso: str | None,
        limit: int,
        offset: int,
    ) -> tuple[list[dict[str, Any]], int]:
        """One page of executions, newest first, and how many match in all."""
        where, values = ["1 = 1"], []  # type: list[str], list[Any]
        for clause, value in (
            ("state = ?", state),
            ("machine_id = ?", machine_id),
            ("received_at >= ?", since_iso),
            ("received_at < ?", until_iso),
        ):
            if value is not None:
                where.append(clause)
                values.append(value)
        condition = " AND ".join(where)
        total = self._conn.execute(
            f"SELECT count(*) FROM executions WHERE {condition}", values
        ).fetchone()[0]
        rows = self._conn.execute(
            "SELECT execute_key, kind, payment_id, machine_id, cycle, state, reason,"
            f" received_at, updated_at FROM executions WHERE {condition}"
            " ORDER BY received_at DESC, execute_key LIMIT ? OFFSET ?",
            (*values, limit, offset),
        ).fetchall()
        return [dict(r) for r in rows], int(total)

    def executions_of_payment(self, payment_id: str) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT execute_key, kind, payment_id, provider_ref, idempotency_key,"
            " amount_cents, machine_id, cycle, state, reason, received_at, updated_at"
            " FROM executions WHERE payment_id = ? ORDER BY received_at",
            (payment_id,),
        ).fetchall()
        return [dict(r) for r in rows]

    def payment_released_by_another_key(self, payment_id: str, execute_key: str) -> str | None:
        """An execution other than ``execute_key`` that already released this payment
        (indexed by payment_id: one lookup per command)."""
        row = self._conn.execute(
            "SELECT execute_key FROM executions WHERE payment_id = ? AND execute_key != ?"
            f" AND state IN ({placeholders(RELEASED_STATES)}) AND kind = 'payment' LIMIT 1",
            (payment_id, execute_key, *RELEASED_STATES),
        ).fetchone()
        return None if row is None else str(row[0])

    def payment_audit(
        self, *, provider_ref: str | None, idempotency_key: str | None
    ) -> list[dict[str, Any]]:
        """Runbook 4C, "confirm whether a physical effect was duplicated": every
        execution of the payment, every actuation the board reported for it (its
        history lines of ``released``, with the board's boot id) and every result sent."""
        column, value = (
            ("provider_ref", provider_ref)
            if provider_ref is not None
            else ("idempotency_key", idempotency_key)
        )
        rows = self._conn.execute(
            "SELECT execute_key, payment_id, provider_ref, idempotency_key, amount_cents,"
            " machine_id, cycle, state, reason, received_at, updated_at, released_at,"
            " board_boot_id FROM executions"
            f" WHERE {column} = ? ORDER BY received_at",
            (value,),
        ).fetchall()
        found = []
        for r in rows:
            key = r["execute_key"]
            item = dict(r)
            item["actuations"] = [
                dict(a)
                for a in self._conn.execute(
                    # A technician's "it ran" (resolve) is a judgement, not the board's.
                    "SELECT at, reason, detail FROM execution_events"
                    " WHERE execute_key = ? AND state = ? AND reason IS NOT ?"
                    " ORDER BY id",
                    (key, ExecutionState.RELEASED, TECHNICIAN_RELEASED),
                )
            ]
            item["results"] = [
                {
                    "id": o["id"],
                    "outbox_state": o["state"],
                    "created_at": o["created_at"],
                    "sent_at": o["sent_at"],
                    **{
                        k: v
                        for k, v in json.loads(o["payload"]).items()
                        if k in ("event_id", "state", "reason", "compensation", "seq")
                    },
                }
                for o in self._conn.execute(
                    "SELECT id, state, created_at, sent_at, payload FROM outbox"
                    " WHERE stream = ? AND topic = ? ORDER BY id",
                    (key, RESULTS_TOPIC),
                )
            ]
            found.append(item)
        return found

    def operation_log(self, *, since_iso: str | None, limit: int) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT * FROM audit_log WHERE at >= ? ORDER BY id DESC LIMIT ?",
            (since_iso or "", limit),
        ).fetchall()
        entries = []
        for r in rows:
            entry = dict(r)
            for k in ("before", "after", "params"):
                entry[k] = None if entry[k] is None else json.loads(entry[k])
            entries.append(entry)
        return entries

    # -- decisions ----------------------------------------------------------------------

    def resolve_review(
        self,
        execute_key: str,
        *,
        released: bool,
        now: float,
        audit: dict[str, Any],
    ) -> dict[str, Any]:
        """A technician looked at the machine of a ``needs_review`` execution: it ran
        (``released``, final, no compensation) or it did not (``failed``, compensated).
        Nothing is sent to the board. Raises :class:`Refused` (after recording the
        refusal) when the execution is not waiting for review."""
        to_state = ExecutionState.RELEASED if released else ExecutionState.FAILED
        check_transition((ExecutionState.NEEDS_REVIEW,), to_state)
        reason = TECHNICIAN_RELEASED if released else TECHNICIAN_NOT_RELEASED
        at = iso_utc(now)
        with self._tx(label=f"resolve:{to_state}") as c:
            row = c.execute(
                "SELECT state FROM executions WHERE execute_key = ?", (execute_key,)
            ).fetchone()
            if row is None or row["state"] != ExecutionState.NEEDS_REVIEW:
                code = "not_found" if row is None else "not_needs_review"
                write_audit(c, at=at, before=None, after=None, outcome=f"refused:{code}", **audit)
                refused: Refused | None = Refused(code)
            else:
                refused = None
                # A released row is final only without a start to await: the technician
                # saw it run, nothing more will be learned.
                c.execute(
                    "UPDATE executions SET state = ?, reason = ?, updated_at = ?,"
                    " awaits_start = 0, released_at = CASE WHEN ? THEN ? ELSE released_at END"
                    " WHERE execute_key = ?",
                    (to_state, reason, at, released, now, execute_key),
                )
                _event(c, execute_key, to_state, reason, at, f"resolved by {audit['actor']}")
                _result(c, self.gateway_id, execute_key, to_state, reason, at)
                if not released:
                    _compensation(c, self.gateway_id, execute_key, reason, at)
                write_audit(
                    c,
                    at=at,
                    before={"state": ExecutionState.NEEDS_REVIEW},
                    after={"state": to_state, "reason": reason},
                    outcome="applied",
                    **audit,
                )
        if refused is not None:
            raise refused
        return {"state": str(to_state), "reason": reason}

    def never_reached_board(self, execute_key: str) -> str | None:
        """Why a ``failed`` execution may be dispatched again, or None: the board
        NACKed it (a NACK always means it did not act) and it never was in doubt."""
        row = self._conn.execute(
            "SELECT state, reason FROM executions WHERE execute_key = ?", (execute_key,)
        ).fetchone()
        if row is None or row["state"] != ExecutionState.FAILED:
            return None
        if not (row["reason"] or "").startswith(BOARD_NACK):
            return None
        doubt = self._conn.execute(
            "SELECT 1 FROM execution_events WHERE execute_key = ? AND state = ? LIMIT 1",
            (execute_key, ExecutionState.NEEDS_REVIEW),
        ).fetchone()
        return None if doubt else str(row["reason"])

    def redispatch_failed(
        self,
        execute_key: str,
        stamp: DispatchStamp,
        *,
        now: float,
        audit: dict[str, Any],
    ) -> None:
        """``failed`` (board NACK) -> ``dispatching`` again, the first release that can
        reach the relay. Only while the cloud has not been told of the failure: its
        result and compensation events still wait in the outbox (never sent, not being
        sent); they are archived (superseded) in this same commit, so the customer never
        gets both the cycle and the refund. Raises :class:`Refused` otherwise."""
        check_transition((ExecutionState.FAILED,), ExecutionState.DISPATCHING)
        at = iso_utc(now)
        with self._tx(label="redispatch") as c:
            row = c.execute(
                "SELECT state, reason, last_result FROM executions WHERE execute_key = ?",
                (execute_key,),
            ).fetchone()
            refusal = None
            told: list[sqlite3.Row] = []
            if row is None or row["state"] != ExecutionState.FAILED:
                refusal = "not_failed"
            else:
                result_id = json.loads(row["last_result"])["event_id"]
                told = c.execute(
                    "SELECT id, state FROM outbox WHERE stream = ? AND (event_id = ? OR topic = ?)",
                    (execute_key, result_id, COMPENSATION_TOPIC),
                ).fetchall()
                if any(o["state"] in ("sent", "sending") for o in told):
                    refusal = "cloud_already_told"
            if refusal is not None:
                write_audit(
                    c, at=at, before=None, after=None, outcome=f"refused:{refusal}", **audit
                )
            else:
                ids = [o["id"] for o in told]
                c.execute(
                    "UPDATE outbox SET state = 'archived', archived_at = ?, updated_at = ?,"
                    f" last_error = 'superseded_by_reprocess' WHERE id IN ({placeholders(ids)})",
                    (at, at, *ids),
                )
                c.execute(
                    "UPDATE executions SET state = ?, reason = NULL, updated_at = ?,"
                    " in_doubt = 0, dispatch_boot_id = ?, dispatch_exec_count = ?,"
                    " dispatch_seq = ? WHERE execute_key = ?",
                    (
                        ExecutionState.DISPATCHING,
                        at,
                        stamp.boot_id,
                        stamp.exec_count,
                        stamp.seq,
                        execute_key,
                    ),
                )
                _event(
                    c,
                    execute_key,
                    ExecutionState.DISPATCHING,
                    None,
                    at,
                    f"reprocess by {audit['actor']}: the board refused it before"
                    f" ({row['reason']}), nothing was pulsed",
                )
                write_audit(
                    c,
                    at=at,
                    before={"state": ExecutionState.FAILED, "reason": row["reason"]},
                    after={"state": ExecutionState.DISPATCHING, "superseded_events": ids},
                    outcome="applied",
                    **audit,
                )
        if refusal is not None:
            raise Refused(refusal)

    def resend_result(
        self, execute_key: str, *, now: float, audit: dict[str, Any]
    ) -> dict[str, Any]:
        """Re-send the stored result of an execution (as a duplicate command gets it),
        under a new event_id with the same ``seq``, and put its dead events back in the
        outbox. Nothing reaches the board."""
        at = iso_utc(now)
        with self._tx(label="resend") as c:
            row = c.execute(
                "SELECT state, last_result FROM executions WHERE execute_key = ?",
                (execute_key,),
            ).fetchone()
            if row is None:
                write_audit(c, at=at, before=None, after=None, outcome="refused:not_found", **audit)
                refused = True
            else:
                refused = False
                result = json.loads(row["last_result"])
                event_id = new_event_id()
                result["event_id"] = event_id
                append_payload(
                    c,
                    event_id,
                    execute_key,
                    RESULTS_TOPIC,
                    json.dumps(result, separators=(",", ":")),
                    at,
                )
                revived = [
                    r[0]
                    for r in c.execute(
                        "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = 0,"
                        " last_error = NULL, updated_at = ? WHERE stream = ? AND state = 'dead'"
                        " RETURNING id",
                        (at, execute_key),
                    )
                ]
                write_audit(
                    c,
                    at=at,
                    before={"state": row["state"]},
                    after={"result_resent": event_id, "dead_events_retried": revived},
                    outcome="result_resent",
                    **audit,
                )
        if refused:
            raise Refused("not_found")
        return {
            "state": row["state"],
            "result_resent": True,
            "compensation": row["state"] in COMPENSATED,
            "dead_events_retried": revived,
        }

    # -- bounded growth -----------------------------------------------------------------

    def prune_records(self, *, archived_before_iso: str, records_before_iso: str) -> dict[str, int]:
        """Delete archived DLQ items older than ``archived_before_iso`` and refusals and
        audit rows older than ``records_before_iso``. Never an item still to deliver:
        pending, sending, failed and dead items are not archived; an audit row whose
        operation record the cloud has not acknowledged yet is kept (its event is in
        the outbox until sent)."""
        with self._tx(label="prune") as c:
            archived = c.execute(
                "DELETE FROM outbox WHERE state = 'archived' AND archived_at < ? RETURNING id",
                (archived_before_iso,),
            ).fetchall()
            c.executemany("DELETE FROM dispatch_log WHERE item_id = ?", [(r[0],) for r in archived])
            refusals = c.execute(
                "DELETE FROM rejections WHERE at < ?", (records_before_iso,)
            ).rowcount
            unsent = c.execute(
                "SELECT min(created_at) FROM outbox WHERE stream = 'operations' AND state != 'sent'"
            ).fetchone()[0]
            cutoff = min(records_before_iso, unsent) if unsent else records_before_iso
            audit = c.execute("DELETE FROM audit_log WHERE at < ?", (cutoff,)).rowcount
        return {"archived_events": len(archived), "refusals": refusals, "audit_rows": audit}
