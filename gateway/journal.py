"""The execution journal: one SQLite file, the gateway's memory across crashes.

One row per ``execute_key`` holds the lifecycle state (DESIGN.md, "The execution
lifecycle"); every state change appends a history row and, in the same transaction,
the outbox row that reports it to the cloud. The database runs in WAL mode with
``synchronous=FULL``: when a method here returns, its change survives ``kill -9`` and
power loss, so the caller may then acknowledge (promise 3) or drive the relay
(promise 1).

All methods are synchronous and meant to be called from the daemon's event-loop
thread only; a commit costs one fsync, which is the price of the promises.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from cloud_sync.outbox import OutboxItem

from . import events
from .events import (
    ALERTS_TOPIC,
    COMPENSATION_TOPIC,
    CYCLES_TOPIC,
    PAYMENT_FIELDS,
    RESULTS_TOPIC,
    Alert,
    alert_event,
    compensation_event,
    encode,
    iso_utc,
    new_event_id,
    result_payload,
)
from .lifecycle import (
    ACTIVE,
    AUTO_COMPENSATED,
    COMPENSATED,
    FINAL,
    PENDING_START,
    ExecutionState,
    IllegalTransition,
    check_initial,
    check_transition,
    ordered,
)

__all__ = [
    "ACTIVE_STATES",
    "AUTO_COMPENSATION_STATES",
    "Alert",
    "COMPENSATION_STATES",
    "DispatchStamp",
    "FINAL_STATES",
    "Execution",
    "IllegalTransition",
    "Journal",
    "JournalFault",
    "JournalUnwritable",
    "SCHEMA_VERSION",
    "alert_event",
    "iso_utc",
    "result_payload",
]

# The lifecycle's sets under their former names, for the callers that import them.
ACTIVE_STATES = ordered(ACTIVE)
#: Final for some machine: ``released`` only without a busy input (lifecycle.is_final).
FINAL_STATES = ordered(FINAL | PENDING_START)
COMPENSATION_STATES = ordered(COMPENSATED)
AUTO_COMPENSATION_STATES = ordered(AUTO_COMPENSATED)

# The dispatcher's states (cloud_sync.outbox.STATES); the journal adds "archived": a
# dead item a technician chose not to send, kept for the record.
OUTBOX_STATES = ("pending", "sending", "sent", "failed", "dead")

log = logging.getLogger(__name__)

# Fault injection for the journal-failure tests: the path of a control file whose lines
# name commit labels (``transition:released``, ``record:``, ``*``) that fail as if the
# disk were full. Read once at start-up; unset in production, where it costs nothing.
_FAULTS_FILE = os.environ.get("METALAV_TEST_JOURNAL_FAULTS", "")


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


@dataclass(frozen=True)
class Execution:
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


def _migration_1(db: sqlite_utils.Database) -> None:
    db["executions"].create(  # type: ignore[union-attr]
        {
            "execute_key": str,
            "command_id": str,  # hex u64 sent to the board (docs/firmware-protocol.md)
            "payment_id": str,
            "machine_id": str,
            "cycle": str,
            "provider_ref": str,
            "idempotency_key": str,
            "amount_cents": int,
            "issued_at": int,
            "expires_at": int,
            "state": str,
            "reason": str,
            "dispatch_boot_id": int,  # board boot id when the release was written
            "board_boot_id": int,  # boot id that acknowledged / answered
            "received_at": str,
            "updated_at": str,
            "result_seq": int,
            "last_result": str,  # JSON of the latest result event, re-sent to duplicates
        },
        pk="execute_key",
        not_null={"command_id", "payment_id", "machine_id", "cycle", "state", "expires_at"},
        defaults={"result_seq": 0},
    )
    db["executions"].create_index(["state"])  # type: ignore[union-attr]
    db["executions"].create_index(["machine_id", "state"])  # type: ignore[union-attr]
    db["execution_events"].create(  # type: ignore[union-attr]
        {"id": int, "execute_key": str, "at": str, "state": str, "reason": str, "detail": str},
        pk="id",
        not_null={"execute_key", "at", "state"},
        foreign_keys=[("execute_key", "executions", "execute_key")],
    )
    db["execution_events"].create_index(["execute_key", "id"])  # type: ignore[union-attr]
    db["outbox"].create(  # type: ignore[union-attr]
        {
            "id": int,
            "event_id": str,
            "stream": str,  # events of one stream are delivered in id order
            "topic": str,
            "payload": str,
            "state": str,  # pending -> sending -> sent | failed | dead
            "attempts": int,
            "last_error": str,
            "created_at": str,
            "updated_at": str,
            "sent_at": str,
        },
        pk="id",
        not_null={"event_id", "stream", "topic", "payload", "state", "created_at"},
        defaults={"state": "pending", "attempts": 0},
    )
    db["outbox"].create_index(["event_id"], unique=True)  # type: ignore[union-attr]
    db["outbox"].create_index(["state", "id"])  # type: ignore[union-attr]
    # Commands refused before they could be tied to a journal row (forged, malformed,
    # not ours): kept for the technician, never keyed by their (untrusted) execute_key.
    db["rejections"].create(  # type: ignore[union-attr]
        {"id": int, "at": str, "execute_key": str, "reason": str, "detail": str},
        pk="id",
        not_null={"at", "reason"},
    )
    db["board_state"].create({"key": str, "value": str}, pk="key")  # type: ignore[union-attr]


def _migration_2(db: sqlite_utils.Database) -> None:
    """Issue 3: start confirmation, machines, alerts, technician actions."""
    executions = db["executions"]
    for column, kind in (
        ("kind", str),  # payment | technical_service
        ("requested_by", str),  # technical service: who asked, and why
        ("awaits_start", int),  # 1: the machine has a busy input; released is not final
        ("released_at", float),
        ("confirm_deadline", float),
        ("started_at", float),
        ("completed_at", float),
    ):
        executions.add_column(column, kind)  # type: ignore[union-attr]
    db.execute("UPDATE executions SET kind = 'payment', awaits_start = 0")
    db["machine_state"].create(  # type: ignore[union-attr]
        {"machine_id": str, "out_of_service": int, "reason": str, "set_by": str, "set_at": str},
        pk="machine_id",
    )
    db["alerts"].create(  # type: ignore[union-attr]
        {
            "id": int,
            "at": str,
            "code": str,
            "severity": str,
            "machine_id": str,
            "execute_key": str,
            "detail": str,
        },
        pk="id",
        not_null={"at", "code", "severity"},
    )
    db["alerts"].create_index(["machine_id", "id"])  # type: ignore[union-attr]
    # The runbook's "registro obrigatório de operação": who, when, what, before/after.
    db["audit_log"].create(  # type: ignore[union-attr]
        {
            "id": int,
            "at": str,
            "actor": str,
            "os_user": str,
            "action": str,
            "target": str,
            "before": str,
            "after": str,
            "reason": str,
            "outcome": str,
        },
        pk="id",
        not_null={"at", "os_user", "action", "outcome"},
    )


def _migration_3(db: sqlite_utils.Database) -> None:
    """Issue 4: the dispatcher's outbox (cloud_sync.outbox.OutboxStore) and the DLQ."""
    outbox = db["outbox"]
    outbox.add_column("next_attempt_at", float)  # type: ignore[union-attr]
    outbox.add_column("sending_since", float)  # type: ignore[union-attr]
    outbox.add_column("archived_at", str)  # type: ignore[union-attr]  # DLQ items kept, not sent
    db.execute("UPDATE outbox SET next_attempt_at = 0")
    db["outbox"].create_index(["stream", "id"])  # type: ignore[union-attr]
    # Every attempt, whatever its outcome (DESIGN.md "Outbox").
    db["dispatch_log"].create(  # type: ignore[union-attr]
        {"id": int, "item_id": int, "at": float, "channel": str, "outcome": str, "error": str},
        pk="id",
        not_null={"item_id", "at", "outcome"},
    )
    db["dispatch_log"].create_index(["item_id"])  # type: ignore[union-attr]


def _migration_4(db: sqlite_utils.Database) -> None:
    """Issue 7: what recovery needs to never re-send a release the board forgot."""
    executions = db["executions"]
    executions.add_column("dispatch_seq", int)  # type: ignore[union-attr]
    executions.add_column("dispatch_exec_count", int)  # type: ignore[union-attr]
    executions.add_column("board_exec_count", int)  # type: ignore[union-attr]
    executions.add_column("in_doubt", int, not_null_default=0)  # type: ignore[union-attr]
    # Releases left dispatching by an older gateway: any of them may have reached the
    # board, and no execution count was recorded, so recovery must ask about each one
    # and cannot take "not executed" for proof (needs_review unless executed).
    db.execute(
        "UPDATE executions SET in_doubt = 1, dispatch_seq = rowid WHERE state = 'dispatching'"
    )
    executions.create_index(["dispatch_seq"])  # type: ignore[union-attr]


# Append-only: a released gateway's journal is migrated forward, never rewritten.
MIGRATIONS = [_migration_1, _migration_2, _migration_3, _migration_4]
SCHEMA_VERSION = len(MIGRATIONS)


class JournalError(Exception):
    """The journal file cannot be used (newer schema, not a database, ...)."""


class JournalUnwritable(Exception):
    """A commit failed for a reason of the storage (disk full, I/O error, read-only):
    nothing of that transaction was written. The caller must not act as if it had been
    (no PUBACK, no byte to the board) and tries again later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class JournalFault:
    """The journal has been failing to commit since ``since`` (wall clock)."""

    reason: str
    since: float


def _marks(values: Sequence[object]) -> str:
    """The placeholders of an ``IN (...)`` list of ``values``."""
    return ",".join("?" * len(values))


def _is_storage_error(exc: sqlite3.Error) -> bool:
    # OperationalError covers SQLITE_FULL, SQLITE_IOERR, SQLITE_READONLY, SQLITE_BUSY;
    # a bare DatabaseError is SQLITE_CORRUPT / SQLITE_NOTADB. IntegrityError and
    # ProgrammingError are bugs in a statement, not a sick disk.
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def _inject_fault(label: str) -> None:
    try:
        with open(_FAULTS_FILE) as f:
            patterns = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return
    if any(p == "*" or label.startswith(p) for p in patterns):
        raise sqlite3.OperationalError(f"database or disk is full (injected at {label})")


class Journal:
    def __init__(self, path: Path, gateway_id: str) -> None:
        self.path = path
        self.gateway_id = gateway_id
        #: Set while commits fail; cleared by the next commit that succeeds.
        self.fault: JournalFault | None = None
        #: Called with the new fault (or None) whenever it appears or clears.
        self.on_fault_change: Callable[[JournalFault | None], None] | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE in _tx),
            # so a commit point is visible in the code, not implied by the driver.
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._conn.row_factory = sqlite3.Row
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except OSError as exc:
            raise JournalError(f"{path}: cannot open the journal: {exc.strerror}") from None
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{path}: not a journal database ({exc})") from None
        if mode.lower() != "wal":
            raise JournalError(f"{path}: cannot enable WAL mode (got {mode})")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def close(self) -> None:
        self._conn.close()

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"{self.path}: schema version {version} is newer than this gateway "
                f"({SCHEMA_VERSION}); refusing to touch it"
            )
        db = sqlite_utils.Database(self._conn)
        for number in range(version + 1, SCHEMA_VERSION + 1):
            with self._tx():
                MIGRATIONS[number - 1](db)
                self._conn.execute(f"PRAGMA user_version={number}")

    @contextmanager
    def _tx(self, *, durable: bool = True, label: str = "write") -> Iterator[sqlite3.Connection]:
        """One transaction. ``durable=False`` skips the fsync of this commit (WAL with
        synchronous=NORMAL): for bookkeeping whose loss in a power cut only means work
        is redone, never undone (an outbox item re-sent, which the cloud de-duplicates).
        The next durable commit flushes it along with its own change.

        A failure of the storage rolls the transaction back and raises
        :class:`JournalUnwritable`; ``label`` names the commit for the fault-injection
        hook of the tests."""
        conn = self._conn
        try:
            if _FAULTS_FILE:
                _inject_fault(label)
            if not durable:
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                self._rollback()
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if not _is_storage_error(exc):
                raise
            # A failed COMMIT (SQLITE_FULL) leaves the transaction open: close it, or
            # every later BEGIN fails with "cannot start a transaction within a
            # transaction" and the journal never recovers by itself.
            self._rollback()
            self._set_fault(str(exc))
            raise JournalUnwritable(str(exc)) from exc
        finally:
            if not durable:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA synchronous=FULL")
        if self.fault is not None:
            self._set_fault(None)

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _set_fault(self, reason: str | None) -> None:
        if reason is None:
            self.fault = None
        elif self.fault is None:
            self.fault = JournalFault(reason, time.time())
        else:
            return  # still failing: one notice per episode
        if self.on_fault_change is not None:
            try:
                self.on_fault_change(self.fault)
            except Exception:
                log.exception("journal fault observer failed")

    # -- reads ---------------------------------------------------------------

    def get(self, execute_key: str) -> Execution | None:
        row = self._conn.execute(
            "SELECT * FROM executions WHERE execute_key = ?", (execute_key,)
        ).fetchone()
        return Execution.from_row(row) if row else None

    def in_states(self, states: Sequence[str]) -> list[Execution]:
        wanted = [ExecutionState(s) for s in states]  # a typo raises, never matches nothing
        marks = ",".join("?" * len(wanted))
        rows = self._conn.execute(
            f"SELECT * FROM executions WHERE state IN ({marks}) ORDER BY received_at",
            wanted,
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
            f"SELECT 1 FROM executions WHERE machine_id = ? AND (state IN ({_marks(active)})"
            f" OR (state IN ({_marks(pending)}) AND awaits_start = 1)) LIMIT 1",
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

    def outbox_depth(self) -> int:
        """Events still to deliver (pending, sending or failed; not the DLQ)."""
        row = self._conn.execute(
            "SELECT count(*) FROM outbox WHERE state IN ('pending', 'sending', 'failed')"
        ).fetchone()
        return int(row[0])

    def rejection_count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM rejections").fetchone()[0])

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

    # -- writes: every one is a single durable transaction ---------------------

    def record_new(
        self,
        *,
        execute_key: str,
        command_id: int,
        payment_id: str,
        machine_id: str,
        cycle: str,
        issued_at: int,
        expires_at: int,
        provider_ref: str | None,
        idempotency_key: str | None,
        amount_cents: int | None,
        state: str,
        reason: str | None,
        now: float,
        dispatch: DispatchStamp | None = None,
        kind: str = "payment",
        requested_by: str | None = None,
        awaits_start: bool = False,
        audit: dict[str, Any] | None = None,
    ) -> None:
        """Journal a verified command in its first state.

        ``state`` is one of lifecycle.INITIAL_STATES (else IllegalTransition): ``accepted``,
        ``dispatching`` (accepted and, in the same commit, about to be written to the
        board, which saves one fsync on the release path), or a final refusal
        (``rejected`` / ``expired``).
        """
        state = check_initial(state)
        at = iso_utc(now)
        if (state == ExecutionState.DISPATCHING) != (dispatch is not None):
            raise ValueError("a dispatching execution needs its DispatchStamp, and only it")
        with self._tx(label=f"record:{state}") as c:
            c.execute(
                "INSERT INTO executions(execute_key, command_id, payment_id, machine_id, cycle,"
                " provider_ref, idempotency_key, amount_cents, issued_at, expires_at, state,"
                " reason, dispatch_boot_id, received_at, updated_at, kind, requested_by,"
                " awaits_start, dispatch_exec_count, dispatch_seq)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    execute_key,
                    f"{command_id:016x}",
                    payment_id,
                    machine_id,
                    cycle,
                    provider_ref,
                    idempotency_key,
                    amount_cents,
                    issued_at,
                    expires_at,
                    state,
                    reason,
                    dispatch and dispatch.boot_id,
                    at,
                    at,
                    kind,
                    requested_by,
                    int(awaits_start),
                    dispatch and dispatch.exec_count,
                    dispatch and dispatch.seq,
                ),
            )
            if state in ACTIVE:
                # Dispatching is accepted and dispatched in one commit: two history lines,
                # one result (the cloud sees accepted until the outcome).
                self._event(c, execute_key, ExecutionState.ACCEPTED, None, at, None)
                self._result(c, execute_key, ExecutionState.ACCEPTED, None, at)
                if dispatch is not None:
                    self._event(c, execute_key, state, None, at, self._stamp(dispatch))
            else:
                self._event(c, execute_key, state, reason, at, None)
                self._result(c, execute_key, state, reason, at)
                if state in AUTO_COMPENSATED:
                    self._compensation(c, execute_key, reason, at)
            if audit is not None:  # an operator's action and its execution: one commit
                self._audit(c, at=at, before=None, **{"after": None, **audit})

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
    ) -> bool:
        """Move one execution to ``to_state`` if it is in one of ``from_states``.

        Returns False (and changes nothing) when the row is not in an expected state,
        so two paths racing for the same execution cannot both act on it. Raises
        IllegalTransition, before writing anything, if any ``from -> to_state`` is not a
        move of lifecycle.TRANSITIONS (or names no state at all). In the same
        transaction: the history line, the result event (``report``), the compensation
        event for states that need one, an optional alert and cycle event.
        ``times`` sets released_at / confirm_deadline / started_at / completed_at;
        ``dispatch`` stamps a move to ``dispatching``.
        """
        to_state = check_transition(from_states, to_state)
        if (to_state == ExecutionState.DISPATCHING) != (dispatch is not None):
            raise ValueError("a move to dispatching needs its DispatchStamp, and only it")
        at = iso_utc(now)
        marks = ",".join("?" * len(from_states))
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
            detail = detail or self._stamp(dispatch)
        with self._tx(label=f"transition:{to_state}") as c:
            cur = c.execute(
                f"UPDATE executions SET state = ?, reason = ?, updated_at = ?,"
                f" board_boot_id = coalesce(?, board_boot_id),"
                f" board_exec_count = coalesce(?, board_exec_count){sets}"
                f" WHERE execute_key = ? AND state IN ({marks})",
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
            self._event(c, execute_key, to_state, reason, at, detail)
            if report:
                self._result(c, execute_key, to_state, reason, at)
                if to_state in AUTO_COMPENSATED:
                    self._compensation(c, execute_key, reason, at)
            if alert is not None:
                self._alert(c, alert, at)
            if cycle_event is not None:
                body = events.cycle_event(
                    gateway_id=self.gateway_id,
                    state=to_state,
                    execute_key=execute_key,
                    at=at,
                    details=cycle_event,
                )
                self._outbox(c, execute_key, CYCLES_TOPIC, body, at)
        return True

    def note(self, execute_key: str, *, now: float, state: str, detail: str) -> None:
        """A history line that does not change the state (e.g. a re-dispatch)."""
        state = ExecutionState(state)
        with self._tx(label="note") as c:
            self._event(c, execute_key, state, None, iso_utc(now), detail)

    def mark_in_doubt(self, execute_key: str, *, now: float, detail: str) -> None:
        """A release frame went out and its outcome is unknown: from now on only an
        answer of the board settles it (or a person), never a blind re-send."""
        with self._tx(label="in_doubt") as c:
            c.execute("UPDATE executions SET in_doubt = 1 WHERE execute_key = ?", (execute_key,))
            self._event(c, execute_key, ExecutionState.DISPATCHING, None, iso_utc(now), detail)

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
            self._event(
                c,
                execute_key,
                ExecutionState.DISPATCHING,
                None,
                iso_utc(now),
                f"board rebooted before the release was sent; now {self._stamp(stamp)}",
            )
        return True

    def log_rejection(
        self, *, execute_key: str | None, reason: str, detail: str, now: float
    ) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO rejections(at, execute_key, reason, detail) VALUES (?,?,?,?)",
                (iso_utc(now), execute_key, reason, detail[:200]),
            )

    def raise_alert(self, alert: Alert, *, now: float) -> None:
        with self._tx() as c:
            self._alert(c, alert, iso_utc(now))

    def recent_alerts(self, machine_id: str | None, limit: int = 5) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT at, code, severity, execute_key, detail FROM alerts"
            " WHERE machine_id IS ? ORDER BY id DESC LIMIT ?",
            (machine_id, limit),
        ).fetchall()
        return [dict(r) for r in rows]

    def last_execution(self, machine_id: str) -> dict[str, Any] | None:
        row = self._conn.execute(
            "SELECT execute_key, kind, cycle, state, reason, received_at, updated_at,"
            " started_at, completed_at FROM executions WHERE machine_id = ?"
            " AND state != ? ORDER BY received_at DESC LIMIT 1",
            (machine_id, ExecutionState.REJECTED),
        ).fetchone()
        return None if row is None else dict(row)

    def out_of_service(self) -> dict[str, dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT machine_id, reason, set_by, set_at FROM machine_state WHERE out_of_service = 1"
        ).fetchall()
        return {r["machine_id"]: dict(r) for r in rows}

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
            self._audit(
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
    ) -> None:
        with self._tx() as c:
            self._audit(
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
            )

    @staticmethod
    def _audit(
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
    ) -> None:
        c.execute(
            "INSERT INTO audit_log(at, actor, os_user, action, target, before, after, reason,"
            " outcome) VALUES (?,?,?,?,?,?,?,?,?)",
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
            ),
        )

    def audit_entries(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT * FROM audit_log ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [dict(r) for r in rows]

    # -- outbox: cloud_sync.outbox.OutboxStore, as the dispatcher drives it ---------
    # "attempts" counts attempts that ended (sent, failed, timed out); a claim alone,
    # or a release because no channel was reachable, does not spend one, so a long
    # outage never pushes events into the dead-letter queue.

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
                " last_error = 'sending_timeout', next_attempt_at = ?, updated_at = ?"
                " WHERE state = 'sending' AND sending_since < ? RETURNING id",
                (now, iso_utc(now), now - older_than_s),
            ).fetchall()
            self._log_dispatch(c, [r["id"] for r in rows], now, None, "timeout", "sending_timeout")
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
            self._log_dispatch(c, ids, now, channel, "sent", None)

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
            self._log_dispatch(c, [item_id], now, channel, state, error[:300])
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
            self._log_dispatch(c, released, now, channel, "unreachable", error[:300])

    def depth(self) -> dict[str, int]:
        counts = {state: 0 for state in OUTBOX_STATES}
        for state, n in self._conn.execute("SELECT state, count(*) FROM outbox GROUP BY state"):
            counts[state] = n
        return counts

    @staticmethod
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

    # -- the dead-letter queue (metalavctl dlq ...) ----------------------------------

    def dlq(self, *, include_archived: bool = False) -> list[dict[str, Any]]:
        states = ("dead", "archived") if include_archived else ("dead",)
        rows = self._conn.execute(
            f"SELECT id, event_id, stream, topic, state, attempts, last_error, created_at,"
            f" updated_at, archived_at FROM outbox WHERE state IN ({','.join('?' * len(states))})"
            f" ORDER BY id",
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
            self._audit(
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
            self._audit(
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

    # -- reconciliation and retention ---------------------------------------------------

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
            "   AND o.topic = 'compensation' ORDER BY o.id DESC LIMIT 1) AS compensation_event"
            " FROM executions e WHERE e.received_at >= ?"
            f" AND e.state IN ({_marks(compensated)})"
            " AND e.kind = 'payment' ORDER BY e.received_at",
            (since_iso, *compensated),
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
                    f"SELECT execute_key FROM executions e"
                    f" WHERE updated_at < ? AND expires_at < ? AND (state IN ({_marks(finished)})"
                    f"   OR (state IN ({_marks(pending)}) AND e.awaits_start = 0))"
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

    # -- internals --------------------------------------------------------------

    @staticmethod
    def _stamp(stamp: DispatchStamp) -> str:
        count = "" if stamp.exec_count is None else f", executions {stamp.exec_count}"
        return f"board boot {stamp.boot_id:08x}{count}"

    @staticmethod
    def _event(
        c: sqlite3.Connection,
        key: str,
        state: str,
        reason: str | None,
        at: str,
        detail: str | None,
    ) -> None:
        c.execute(
            "INSERT INTO execution_events(execute_key, at, state, reason, detail)"
            " VALUES (?,?,?,?,?)",
            (key, at, state, reason, detail),
        )

    def _result(
        self, c: sqlite3.Connection, key: str, state: str, reason: str | None, at: str
    ) -> None:
        row = c.execute(
            "UPDATE executions SET result_seq = result_seq + 1 WHERE execute_key = ?"
            " RETURNING result_seq, payment_id, machine_id, awaits_start, provider_ref,"
            " idempotency_key, amount_cents, kind",
            (key,),
        ).fetchone()
        event_id = new_event_id()
        payload = result_payload(
            gateway_id=self.gateway_id,
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
        self._outbox_raw(c, event_id, key, RESULTS_TOPIC, payload, at)

    def _compensation(self, c: sqlite3.Connection, key: str, reason: str | None, at: str) -> None:
        """The runbook's compensation alert: the customer paid, the machine did not run."""
        row = c.execute(
            "SELECT payment_id, provider_ref, idempotency_key, amount_cents, machine_id, kind"
            " FROM executions WHERE execute_key = ?",
            (key,),
        ).fetchone()
        if row["kind"] != "payment":
            return  # a technician's test turn was never paid
        body = compensation_event(
            gateway_id=self.gateway_id,
            execute_key=key,
            payment_id=row["payment_id"],
            machine_id=row["machine_id"],
            payment={k: row[k] for k in PAYMENT_FIELDS},
            reason=reason,
            at=at,
        )
        self._outbox(c, key, COMPENSATION_TOPIC, body, at)

    def _alert(self, c: sqlite3.Connection, alert: Alert, at: str) -> None:
        c.execute(
            "INSERT INTO alerts(at, code, severity, machine_id, execute_key, detail)"
            " VALUES (?,?,?,?,?,?)",
            (at, alert.code, alert.severity, alert.machine_id, alert.execute_key, alert.detail),
        )
        # Alerts of one machine (or of the board) form one ordered stream.
        stream = f"alerts:{alert.machine_id or 'board'}"
        self._outbox(c, stream, ALERTS_TOPIC, alert_event(self.gateway_id, alert, at), at)

    def _outbox(
        self, c: sqlite3.Connection, stream: str, topic: str, body: dict[str, Any], at: str
    ) -> None:
        event_id = new_event_id()
        self._outbox_raw(c, event_id, stream, topic, encode(event_id, body), at)

    @staticmethod
    def _outbox_raw(
        c: sqlite3.Connection, event_id: str, stream: str, topic: str, payload: str, at: str
    ) -> None:
        c.execute(
            "INSERT INTO outbox(event_id, stream, topic, payload, created_at, updated_at)"
            " VALUES (?,?,?,?,?,?)",
            (event_id, stream, topic, payload, at, at),
        )
