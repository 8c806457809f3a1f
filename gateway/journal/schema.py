"""The journal's tables and their migrations (``PRAGMA user_version``).

Migrations are append-only: a released gateway's journal is migrated forward, never
rewritten, and a migration once released is never edited (its SQL, string states
included, is history).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import JournalError

if TYPE_CHECKING:
    import sqlite_utils

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]


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
# What start confirmation watches (Executions.awaiting_start). Final rows pile up for
# months (a store makes ~100k releases a year); this partial index holds only the
# few that are still watched, so the 4-per-second sweep never reads the others.
AWAITING_START_WHERE = "awaits_start = 1 AND state IN ('released', 'not_started', 'started')"


def _migration_5(db: sqlite_utils.Database) -> None:
    """Issue 9: start confirmation reads only what it watches."""
    db.execute(
        "CREATE INDEX idx_executions_awaiting_start ON executions(received_at)"
        f" WHERE {AWAITING_START_WHERE}"
    )


def _migration_6(db: sqlite_utils.Database) -> None:
    """Issue 12: the technician's toolbox.

    - lookups by payment_id / provider_ref / idempotency_key (runbook: payments 4A, 4C),
      and the duplicate-payment check of intake, an indexed lookup per command;
    - the operation record: the config version the action ran under, its parameters
      and the technician's decision, beside who / when / what / before / after;
    - store-wide state that survives restarts (the pause, the config version);
    - indexes for pruning by age (audit rows, refusals, archived DLQ items).
    """
    executions = db["executions"]
    executions.create_index(["payment_id"])  # type: ignore[union-attr]
    executions.create_index(["provider_ref"])  # type: ignore[union-attr]
    executions.create_index(["idempotency_key"])  # type: ignore[union-attr]
    audit = db["audit_log"]
    audit.add_column("config_version", str)  # type: ignore[union-attr]
    audit.add_column("params", str)  # type: ignore[union-attr]  # JSON
    audit.add_column("decision", str)  # type: ignore[union-attr]
    audit.create_index(["at"])  # type: ignore[union-attr]
    db["rejections"].create_index(["at"])  # type: ignore[union-attr]
    db.execute("CREATE INDEX idx_outbox_archived ON outbox(archived_at) WHERE state = 'archived'")
    # key -> JSON value: "pause" (the store-wide pause), "config_version".
    db["store_state"].create({"key": str, "value": str}, pk="key")  # type: ignore[union-attr]


MIGRATIONS = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(
    conn: sqlite3.Connection,
    path: Path,
    transaction: Callable[[], AbstractContextManager[sqlite3.Connection]],
) -> None:
    """Bring the file at ``path`` to :data:`SCHEMA_VERSION`, one migration per
    ``transaction``; refuse a file written by a newer gateway."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise JournalError(
            f"{path}: schema version {version} is newer than this gateway "
            f"({SCHEMA_VERSION}); refusing to touch it"
        )
    if version == SCHEMA_VERSION:
        return
    # Only a new or older journal loads sqlite-utils (~8 MB a daemon would keep for months).
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    for number in range(version + 1, SCHEMA_VERSION + 1):
        with transaction():
            MIGRATIONS[number - 1](db)
            conn.execute(f"PRAGMA user_version={number}")
