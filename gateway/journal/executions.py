"""Executions: one row per execute_key, moved along the lifecycle one commit at a time.

Executions: one row per ``execute_key`` and its history, moved along the lifecycle
(gateway/lifecycle.py), each move committed with the result, compensation, alert and
cycle events that report it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import events
from ..events import (
    COMPENSATION_TOPIC,
    CYCLES_TOPIC,
    PAYMENT_FIELDS,
    RESULTS_TOPIC,
    Alert,
    compensation_event,
    iso_utc,
    new_event_id,
    result_payload,
)
from ..lifecycle import (
    ACTIVE,
    AUTO_COMPENSATED,
    PENDING_START,
    ExecutionState,
    check_initial,
    check_transition,
    ordered,
)
from .database import Database, placeholders
from .outbox import append_event, append_payload
from .records import write_alert, write_audit
from .schema import AWAITING_START_WHERE

__all__ = ["DispatchStamp", "Execution", "Executions", "NewExecution"]

_TIME_COLUMNS = ("released_at", "confirm_deadline", "started_at", "completed_at")


@dataclass(frozen=True)
class DispatchStamp:
    """What the gateway knew about the board when it decided to send a release, written
    in the same commit as ``dispatching`` (docs/firmware-protocol.md, "Recovery"):

    - ``boot_id``: a QUERY answer from another boot cannot tell what happened;
    - ``exec_count``: the board's execution counter then (firmware 1.2; None before),
      so recovery knows whether the board's ring of recent ids still covers this one;
    - ``seq``: the order of dispatch decisions. Releases are written to the board one
      at a time in this order, each only once the one before is settled in the journal,
      so after a crash only the lowest unsettled one may have reached the board.
    """

    boot_id: int
    exec_count: int | None
    seq: int


@dataclass(frozen=True, kw_only=True)
class NewExecution:
    """A verified command (or a technician's test turn) as the journal first records
    it: what it asks for, before anything happened to it."""

    execute_key: str
    command_id: int  # u64 sent to the board (docs/firmware-protocol.md)
    payment_id: str
    machine_id: str
    cycle: str
    issued_at: int
    expires_at: int
    provider_ref: str | None
    idempotency_key: str | None
    amount_cents: int | None
    kind: str = "payment"  # payment | technical_service
    requested_by: str | None = None  # technical service: who asked, and why
    awaits_start: bool = False  # the machine has a busy input: released is not final


@dataclass(frozen=True)
class Execution:
    """One journal row, as read."""

    execute_key: str
    command_id: int
    payment_id: str
    machine_id: str
    cycle: str
    state: ExecutionState
    reason: str | None
    expires_at: int
    dispatch_boot_id: int | None
    board_boot_id: int | None
    received_at: str
    updated_at: str
    last_result: str
    kind: str = "payment"
    awaits_start: bool = False
    released_at: float | None = None
    confirm_deadline: float | None = None
    started_at: float | None = None
    dispatch_exec_count: int | None = None
    dispatch_seq: int | None = None
    # A release frame was written and its outcome is unknown (no reply, or found so by
    # recovery): only asking the board may settle it, never re-sending blindly.
    in_doubt: bool = False

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Execution:
        return cls(
            execute_key=row["execute_key"],
            command_id=int(row["command_id"], 16),
            payment_id=row["payment_id"],
            machine_id=row["machine_id"],
            cycle=row["cycle"],
            state=ExecutionState(row["state"]),
            reason=row["reason"],
            expires_at=row["expires_at"],
            dispatch_boot_id=row["dispatch_boot_id"],
            board_boot_id=row["board_boot_id"],
            received_at=row["received_at"],
            updated_at=row["updated_at"],
            last_result=row["last_result"],
            kind=row["kind"] or "payment",
            awaits_start=bool(row["awaits_start"]),
            released_at=row["released_at"],
            confirm_deadline=row["confirm_deadline"],
            started_at=row["started_at"],
            dispatch_exec_count=row["dispatch_exec_count"],
            dispatch_seq=row["dispatch_seq"],
            in_doubt=bool(row["in_doubt"]),
        )


class Executions(Database):
    """The executions table and its history; every write is one durable transaction."""

    # -- reads ---------------------------------------------------------------

    def get(self, execute_key: str) -> Execution | None:
        row = self._conn.execute(
            "SELECT * FROM executions WHERE execute_key = ?", (execute_key,)
        ).fetchone()
        return Execution.from_row(row) if row else None

    def in_states(self, states: Sequence[str]) -> list[Execution]:
        wanted = [ExecutionState(s) for s in states]  # a typo raises, never matches nothing
        rows = self._conn.execute(
            f"SELECT * FROM executions WHERE state IN ({placeholders(wanted)})"
            " ORDER BY received_at",
            wanted,
        ).fetchall()
        return [Execution.from_row(r) for r in rows]

    def awaiting_start(self, machine_id: str | None = None) -> list[Execution]:
        """Executions start confirmation still watches (released, not_started and
        started, on machines with a busy input), oldest first. Served by a partial
        index: the cost does not grow with the journal's final rows."""
        machine = "" if machine_id is None else " AND machine_id = ?"
        rows = self._conn.execute(
            # INDEXED BY: never a scan of the state index, whatever the planner guesses.
            "SELECT * FROM executions INDEXED BY idx_executions_awaiting_start"
            f" WHERE {AWAITING_START_WHERE}{machine} ORDER BY received_at",
            () if machine_id is None else (machine_id,),
        ).fetchall()
        return [Execution.from_row(r) for r in rows]

    def dispatching_in_order(self) -> list[Execution]:
        """Executions left ``dispatching``, in the order their releases were decided."""
        rows = self._conn.execute(
            "SELECT * FROM executions WHERE state = ? ORDER BY dispatch_seq",
            (ExecutionState.DISPATCHING,),
        ).fetchall()
        return [Execution.from_row(r) for r in rows]

    def last_dispatch_seq(self) -> int:
        row = self._conn.execute("SELECT max(dispatch_seq) FROM executions").fetchone()
        return int(row[0] or 0)

    def machine_is_active(self, machine_id: str) -> bool:
        """An execution of this machine is still on its way: accepted, being sent, or
        released and waiting for the machine to confirm its start
        (lifecycle.keeps_machine_busy)."""
        active, pending = ordered(ACTIVE), ordered(PENDING_START)
        row = self._conn.execute(
            f"SELECT 1 FROM executions WHERE machine_id = ? AND (state IN ({placeholders(active)})"
            f" OR (state IN ({placeholders(pending)}) AND awaits_start = 1)) LIMIT 1",
            (machine_id, *active, *pending),
        ).fetchone()
        return row is not None

    def history(self, execute_key: str) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT at, state, reason, detail FROM execution_events "
            "WHERE execute_key = ? ORDER BY id",
            (execute_key,),
        ).fetchall()
        return [dict(r) for r in rows]

    def execution_details(self, execute_key: str) -> dict[str, Any] | None:
        row = self._conn.execute(
            "SELECT * FROM executions WHERE execute_key = ?", (execute_key,)
        ).fetchone()
        if row is None:
            return None
        details = {k: row[k] for k in row.keys() if k != "last_result"}
        details["history"] = self.history(execute_key)
        details["outbox"] = [
            dict(r)
            for r in self._conn.execute(
                "SELECT id, event_id, state, attempts, last_error, created_at, sent_at "
                "FROM outbox WHERE stream = ? ORDER BY id",
                (execute_key,),
            )
        ]
        return details

    def counts_by_state(self) -> dict[str, int]:
        rows = self._conn.execute("SELECT state, count(*) FROM executions GROUP BY state")
        return {state: n for state, n in rows}

    def last_execution(self, machine_id: str) -> dict[str, Any] | None:
        row = self._conn.execute(
            "SELECT execute_key, kind, cycle, state, reason, received_at, updated_at,"
            " started_at, completed_at FROM executions WHERE machine_id = ?"
            " AND state != ? ORDER BY received_at DESC LIMIT 1",
            (machine_id, ExecutionState.REJECTED),
        ).fetchone()
        return None if row is None else dict(row)

    # -- writes: every one is a single durable transaction ---------------------

    def record(
        self,
        new: NewExecution,
        state: ExecutionState,
        *,
        reason: str | None,
        now: float,
        dispatch: DispatchStamp | None = None,
        audit: dict[str, Any] | None = None,
        durable: bool = True,
    ) -> None:
        """Journal a verified command in its first state.

        ``state`` is one of lifecycle.INITIAL_STATES (else IllegalTransition): ``accepted``,
        ``dispatching`` (accepted and, in the same commit, about to be written to the
        board, which saves one fsync on the release path), or a final refusal
        (``rejected`` / ``expired``). ``audit`` (the audit_log fields: action, target,
        actor, os_user, reason, outcome, after) records the operator's action that asked
        for it, in the same commit. ``durable=False``: written, not flushed (the caller
        awaits ``flushed()`` before acting on it; see database.py).
        """
        state = check_initial(state)
        at = iso_utc(now)
        if (state == ExecutionState.DISPATCHING) != (dispatch is not None):
            raise ValueError("a dispatching execution needs its DispatchStamp, and only it")
        with self._tx(label=f"record:{state}", durable=durable) as c:
            c.execute(
                "INSERT INTO executions(execute_key, command_id, payment_id, machine_id, cycle,"
                " provider_ref, idempotency_key, amount_cents, issued_at, expires_at, state,"
                " reason, dispatch_boot_id, received_at, updated_at, kind, requested_by,"
                " awaits_start, dispatch_exec_count, dispatch_seq)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    new.execute_key,
                    f"{new.command_id:016x}",
                    new.payment_id,
                    new.machine_id,
                    new.cycle,
                    new.provider_ref,
                    new.idempotency_key,
                    new.amount_cents,
                    new.issued_at,
                    new.expires_at,
                    state,
                    reason,
                    dispatch and dispatch.boot_id,
                    at,
                    at,
                    new.kind,
                    new.requested_by,
                    int(new.awaits_start),
                    dispatch and dispatch.exec_count,
                    dispatch and dispatch.seq,
                ),
            )
            key = new.execute_key
            if state in ACTIVE:
                # Dispatching is accepted and dispatched in one commit: two history lines,
                # one result (the cloud sees accepted until the outcome).
                _event(c, key, ExecutionState.ACCEPTED, None, at, None)
                _result(c, self.gateway_id, key, ExecutionState.ACCEPTED, None, at)
                if dispatch is not None:
                    _event(c, key, state, None, at, _stamp(dispatch))
            else:
                _event(c, key, state, reason, at, None)
                _result(c, self.gateway_id, key, state, reason, at)
                if state in AUTO_COMPENSATED:
                    _compensation(c, self.gateway_id, key, reason, at)
            if audit is not None:  # an operator's action and its execution: one commit
                write_audit(c, at=at, before=None, **{"after": None, **audit})

    def transition(
        self,
        execute_key: str,
        *,
        from_states: Sequence[str],
        to_state: str,
        reason: str | None = None,
        now: float,
        detail: str | None = None,
        dispatch: DispatchStamp | None = None,
        board_boot_id: int | None = None,
        board_exec_count: int | None = None,
        report: bool = True,
        times: dict[str, float] | None = None,
        alert: Alert | None = None,
        cycle_event: dict[str, Any] | None = None,
        durable: bool = True,
    ) -> bool:
        """Move one execution to ``to_state`` if it is in one of ``from_states``.

        Returns False (and changes nothing) when the row is not in an expected state,
        so two paths racing for the same execution cannot both act on it. Raises
        IllegalTransition, before writing anything, if any ``from -> to_state`` is not a
        move of lifecycle.TRANSITIONS (or names no state at all). In the same
        transaction: the history line, the result event (``report``), the compensation
        event for states that need one, an optional alert and cycle event.
        ``times`` sets released_at / confirm_deadline / started_at / completed_at;
        ``dispatch`` stamps a move to ``dispatching``. ``durable=False``: written, not
        flushed (see database.py).
        """
        to_state = check_transition(from_states, to_state)
        if (to_state == ExecutionState.DISPATCHING) != (dispatch is not None):
            raise ValueError("a move to dispatching needs its DispatchStamp, and only it")
        at = iso_utc(now)
        sets = ""
        values: list[Any] = []
        for column, value in (times or {}).items():
            if column not in _TIME_COLUMNS:
                raise ValueError(f"not a time column: {column}")
            sets += f", {column} = ?"
            values.append(value)
        if dispatch is not None:
            sets += ", dispatch_boot_id = ?, dispatch_exec_count = ?, dispatch_seq = ?"
            values += [dispatch.boot_id, dispatch.exec_count, dispatch.seq]
            detail = detail or _stamp(dispatch)
        with self._tx(label=f"transition:{to_state}", durable=durable) as c:
            cur = c.execute(
                f"UPDATE executions SET state = ?, reason = ?, updated_at = ?,"
                f" board_boot_id = coalesce(?, board_boot_id),"
                f" board_exec_count = coalesce(?, board_exec_count){sets}"
                f" WHERE execute_key = ? AND state IN ({placeholders(from_states)})",
                (
                    to_state,
                    reason,
                    at,
                    board_boot_id,
                    board_exec_count,
                    *values,
                    execute_key,
                    *from_states,
                ),
            )
            if cur.rowcount != 1:
                return False
            _event(c, execute_key, to_state, reason, at, detail)
            if report:
                _result(c, self.gateway_id, execute_key, to_state, reason, at)
                if to_state in AUTO_COMPENSATED:
                    _compensation(c, self.gateway_id, execute_key, reason, at)
            if alert is not None:
                write_alert(c, self.gateway_id, alert, at)
            if cycle_event is not None:
                body = events.cycle_event(
                    gateway_id=self.gateway_id,
                    state=to_state,
                    execute_key=execute_key,
                    at=at,
                    details=cycle_event,
                )
                append_event(c, execute_key, CYCLES_TOPIC, body, at)
        return True

    def note(self, execute_key: str, *, now: float, state: str, detail: str) -> None:
        """A history line that does not change the state (e.g. a re-dispatch)."""
        state = ExecutionState(state)
        with self._tx(label="note") as c:
            _event(c, execute_key, state, None, iso_utc(now), detail)

    def mark_in_doubt(self, execute_key: str, *, now: float, detail: str) -> None:
        """A release frame went out and its outcome is unknown: from now on only an
        answer of the board settles it (or a person), never a blind re-send."""
        with self._tx(label="in_doubt") as c:
            c.execute("UPDATE executions SET in_doubt = 1 WHERE execute_key = ?", (execute_key,))
            _event(c, execute_key, ExecutionState.DISPATCHING, None, iso_utc(now), detail)

    def restamp(self, execute_key: str, stamp: DispatchStamp, *, now: float) -> bool:
        """The board rebooted between the decision and the send of a release that never
        went out: record the board it now goes to, before its first byte."""
        with self._tx(label="restamp") as c:
            cur = c.execute(
                "UPDATE executions SET dispatch_boot_id = ?, dispatch_exec_count = ?"
                " WHERE execute_key = ? AND state = ? AND in_doubt = 0",
                (stamp.boot_id, stamp.exec_count, execute_key, ExecutionState.DISPATCHING),
            )
            if cur.rowcount != 1:
                return False
            _event(
                c,
                execute_key,
                ExecutionState.DISPATCHING,
                None,
                iso_utc(now),
                f"board rebooted before the release was sent; now {_stamp(stamp)}",
            )
        return True


# -- writes inside the caller's transaction -------------------------------------------


def _stamp(stamp: DispatchStamp) -> str:
    count = "" if stamp.exec_count is None else f", executions {stamp.exec_count}"
    return f"board boot {stamp.boot_id:08x}{count}"


def _event(
    c: sqlite3.Connection,
    key: str,
    state: str,
    reason: str | None,
    at: str,
    detail: str | None,
) -> None:
    c.execute(
        "INSERT INTO execution_events(execute_key, at, state, reason, detail) VALUES (?,?,?,?,?)",
        (key, at, state, reason, detail),
    )


def _result(
    c: sqlite3.Connection, gateway_id: str, key: str, state: str, reason: str | None, at: str
) -> None:
    row = c.execute(
        "UPDATE executions SET result_seq = result_seq + 1 WHERE execute_key = ?"
        " RETURNING result_seq, payment_id, machine_id, awaits_start, provider_ref,"
        " idempotency_key, amount_cents, kind",
        (key,),
    ).fetchone()
    event_id = new_event_id()
    payload = result_payload(
        gateway_id=gateway_id,
        execute_key=key,
        payment_id=row["payment_id"],
        machine_id=row["machine_id"],
        state=state,
        reason=reason,
        at=at,
        seq=row["result_seq"],
        event_id=event_id,
        paid=row["kind"] == "payment",  # as _compensation decides
        awaits_start=bool(row["awaits_start"]),
        payment={k: row[k] for k in PAYMENT_FIELDS},
    )
    c.execute("UPDATE executions SET last_result = ? WHERE execute_key = ?", (payload, key))
    append_payload(c, event_id, key, RESULTS_TOPIC, payload, at)


def _compensation(
    c: sqlite3.Connection, gateway_id: str, key: str, reason: str | None, at: str
) -> None:
    """The runbook's compensation alert: the customer paid, the machine did not run."""
    row = c.execute(
        "SELECT payment_id, provider_ref, idempotency_key, amount_cents, machine_id, kind"
        " FROM executions WHERE execute_key = ?",
        (key,),
    ).fetchone()
    if row["kind"] != "payment":
        return  # a technician's test turn was never paid
    body = compensation_event(
        gateway_id=gateway_id,
        execute_key=key,
        payment_id=row["payment_id"],
        machine_id=row["machine_id"],
        payment={k: row[k] for k in PAYMENT_FIELDS},
        reason=reason,
        at=at,
    )
    append_event(c, key, COMPENSATION_TOPIC, body, at)
