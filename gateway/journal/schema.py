"""The journal's tables and their migrations (``PRAGMA user_version``).

Migrations are append-only: a released gateway's journal is migrated forward, never
rewritten, and a migration once released is never edited (its SQL, string states
included, is history).

Rollback (issue 10): an upgrade that goes wrong switches back to the previous release,
which must then run on the journal the newer one migrated, without losing a row written
since. So every migration says what it does to older builds:

- ``@additive``: a build that does not know it keeps running correctly on the journal:
  new tables, new nullable (or defaulted) columns, new indexes that constrain nothing
  an older build writes. Nothing an older build reads changes meaning (no new states
  in an existing column, no new NOT NULL column without a default, no new UNIQUE or
  CHECK on an existing table), and the newer build reads NULL in its new columns, on
  rows an older build wrote meanwhile, as "not known".
- ``@breaking``: anything else; builds older than it refuse the journal.

An unmarked migration counts as breaking (tests/gateway/test_schema_compat.py fails on
it, so the choice is made on purpose). ``migrate()`` records, in the ``schema_meta``
table beside the numbered migrations, the schema version it wrote and the oldest schema
version able to run the journal; a build whose :data:`SCHEMA_VERSION` is older than
the journal's runs on it unmigrated if it is at least that oldest version, and refuses
it otherwise. The installer asks the previous release the same question before a
rollback (``metalav-release`` in gateway/release.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import JournalError

if TYPE_CHECKING:
    import sqlite_utils

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "JournalCompat",
    "additive",
    "breaking",
    "compat_of",
    "journal_compat",
    "migrate",
    "oldest_reader",
]

Migration = Callable[["sqlite_utils.Database"], None]

ADDITIVE = "additive"
BREAKING = "breaking"
#: Outside the numbered migrations, so that every build (older or newer) finds it:
#: ``schema_version`` (the user_version it describes) and ``oldest_reader``.
META_TABLE = "schema_meta"


def additive(migration: Migration) -> Migration:
    """Older builds can keep running on a journal this migration brought forward."""
    migration.compat = ADDITIVE  # type: ignore[attr-defined]
    return migration


def breaking(migration: Migration) -> Migration:
    """Builds older than this migration must refuse the journal."""
    migration.compat = BREAKING  # type: ignore[attr-defined]
    return migration


def compat_of(migration: Migration) -> str | None:
    """``additive``, ``breaking``, or None when unmarked (then treated as breaking)."""
    value = getattr(migration, "compat", None)
    return value if isinstance(value, str) else None


@breaking
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


@breaking
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


@breaking
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


@breaking
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


@additive
def _migration_5(db: sqlite_utils.Database) -> None:
    """Issue 9: start confirmation reads only what it watches."""
    db.execute(
        "CREATE INDEX idx_executions_awaiting_start ON executions(received_at)"
        f" WHERE {AWAITING_START_WHERE}"
    )


# Additive: indexes that constrain nothing, new nullable audit columns, a new table.
# An older build ignores them; it also ignores a store pause a newer build recorded in
# store_state (it has no pause), which a rollback leaves to the technician.
@additive
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


def oldest_reader(version: int) -> int:
    """The oldest schema version whose build can run a journal at ``version``: the
    newest breaking (or unmarked) migration up to it."""
    floor = 1
    for number in range(1, version + 1):
        if compat_of(MIGRATIONS[number - 1]) != ADDITIVE:
            floor = number
    return floor


@dataclass(frozen=True)
class JournalCompat:
    """What a journal file says about the builds able to run it."""

    version: int  # PRAGMA user_version
    #: From schema_meta, when it describes ``version``; None when absent or stale
    #: (written for another version: nothing vouches for older builds then).
    oldest_reader: int | None

    def runnable_by(self, schema_version: int) -> bool:
        if self.version <= schema_version:
            return True  # older or equal: migrated forward
        return self.oldest_reader is not None and self.oldest_reader <= schema_version


def journal_compat(conn: sqlite3.Connection) -> JournalCompat:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (META_TABLE,)
    ).fetchone()
    if not has_meta:
        return JournalCompat(version, None)
    meta = dict(conn.execute(f"SELECT key, value FROM {META_TABLE}").fetchall())
    if meta.get("schema_version") != version or not isinstance(meta.get("oldest_reader"), int):
        return JournalCompat(version, None)
    return JournalCompat(version, meta["oldest_reader"])


def _write_meta(conn: sqlite3.Connection, version: int) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {META_TABLE} (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
    )
    conn.executemany(
        f"INSERT INTO {META_TABLE} (key, value) VALUES (?, ?)"
        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [("schema_version", version), ("oldest_reader", oldest_reader(version))],
    )


def migrate(
    conn: sqlite3.Connection,
    path: Path,
    transaction: Callable[[], AbstractContextManager[sqlite3.Connection]],
) -> None:
    """Bring the file at ``path`` to :data:`SCHEMA_VERSION`, one migration per
    ``transaction`` (the meta table in the same one); run unmigrated on a journal a
    newer build migrated when its meta says this build can, else refuse it."""
    compat = journal_compat(conn)
    if compat.version > SCHEMA_VERSION:
        if not compat.runnable_by(SCHEMA_VERSION):
            needs = compat.oldest_reader or compat.version
            raise JournalError(
                f"{path}: schema version {compat.version} is newer than this gateway "
                f"({SCHEMA_VERSION}) and needs a gateway of schema {needs} or newer; "
                "refusing to touch it"
            )
        # A rollback: the newer build's additions are ignored, never undone, and the
        # meta stays the newer build's (it describes the file's real version).
        return
    if compat.version == SCHEMA_VERSION:
        if compat.oldest_reader != oldest_reader(SCHEMA_VERSION):
            # A journal from before schema_meta existed, or whose meta went stale.
            with transaction():
                _write_meta(conn, SCHEMA_VERSION)
        return
    # Only a new or older journal loads sqlite-utils (~8 MB a daemon would keep for months).
    import sqlite_utils

    db = sqlite_utils.Database(conn)
    for number in range(compat.version + 1, SCHEMA_VERSION + 1):
        with transaction():
            MIGRATIONS[number - 1](db)
            conn.execute(f"PRAGMA user_version={number}")
            _write_meta(conn, number)

