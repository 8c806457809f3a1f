"""Journal backups and their verified restore (the shop-bot runbook's "Backups e
recovery"; issue 12, item 5).

The journal is not only the store's history: it is the memory that refuses an
``execute_key`` seen before (promise 1). A backup must therefore be consistent, and a
restore must never put in place a file that is damaged, from another gateway, or from
a newer release.

- :func:`take_backup` copies the journal with SQLite's online backup API, on a
  connection of its own: in WAL mode its read transaction sees one committed snapshot
  and blocks no writer, so the daemon keeps releasing meanwhile. The copy is a single
  self-contained file (``journal_mode=DELETE``, no ``-wal`` to lose) carrying a small
  ``metalav_backup`` table: gateway id, schema version, when it was taken.
- :func:`verify_backup` reads a backup read-only: ``PRAGMA integrity_check``, the
  schema version this gateway can migrate, the gateway's tables, this gateway's id.
- :func:`restore` refuses while a daemon holds the journal's instance lock, verifies
  first, and keeps the replaced journal (with its ``-wal`` / ``-shm``) beside it under
  ``<journal>.replaced-<UTC time>``.
- :class:`BackupSchedule` is the daemon's daily backup with a retention count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from . import instance_lock
from .events import Alert
from .i18n import N_
from .journal import SCHEMA_VERSION, Journal

__all__ = [
    "BackupError",
    "BackupInfo",
    "BackupSchedule",
    "backup_dir",
    "hold_journal_lock",
    "restore",
    "take_backup",
    "verify_backup",
]

log = logging.getLogger(__name__)

META_TABLE = "metalav_backup"
#: Tables every gateway journal has had since schema 3.
_REQUIRED_TABLES = ("executions", "execution_events", "outbox", "audit_log")
#: Scheduled backups: ``journal-20261128T031500Z.db``; the name sorts by time.
_SCHEDULED = re.compile(r"^journal-(\d{8}T\d{6}Z)\.db$")
_STAMP = "%Y%m%dT%H%M%SZ"
_SQLITE_HEADER = b"SQLite format 3\x00"
#: A temporary copy older than this is a leftover of a killed process.
LEFTOVER_AGE_S = 3600.0


class BackupError(Exception):
    """A backup or restore cannot be done. As :class:`gateway.operator.OperatorRefusal`:
    ``template`` is an English message of the catalog (gateway/i18n.py) and ``params``
    its fields; whoever shows it to a technician translates it (metalavctl to its own
    language, the local API to the request's ``Accept-Language``). ``str()`` is the
    English text, for the daemon's log and alerts."""

    def __init__(self, template: str, **params: object) -> None:
        super().__init__(template.format(**params))
        self.template = template
        self.params = params


@dataclass(frozen=True)
class BackupInfo:
    path: Path
    gateway_id: str
    schema_version: int
    taken_at: str
    executions: int
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "gateway_id": self.gateway_id,
            "schema_version": self.schema_version,
            "taken_at": self.taken_at,
            "executions": self.executions,
            "size": self.size,
        }


def _stamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime(_STAMP)


def backup_dir(journal: Path, configured: Path | None) -> Path:
    """Where scheduled backups go: the config's, else ``backups/`` beside the journal."""
    return configured if configured is not None else journal.parent / "backups"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def take_backup(journal: Path, dest: Path, gateway_id: str, *, now: float) -> BackupInfo:
    """Copy ``journal`` to ``dest`` (created; never overwritten), consistent while
    the daemon writes. Safe to run in a worker thread: it opens its own connections."""
    if dest.exists():
        raise BackupError(N_("{path} already exists; choose another name"), path=dest)
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        # mode=ro: a backup never writes to the journal it copies.
        src = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise BackupError(
            N_("cannot open the journal {path}: {error}"), path=journal, error=exc
        ) from None
    try:
        dst = sqlite3.connect(partial)
        try:
            # One step (pages=-1): one read transaction, so one committed snapshot.
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")
            schema = dst.execute("PRAGMA user_version").fetchone()[0]
            executions = dst.execute("SELECT count(*) FROM executions").fetchone()[0]
            taken_at = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
            with dst:
                dst.execute(f"CREATE TABLE {META_TABLE}(key TEXT PRIMARY KEY, value TEXT)")
                dst.executemany(
                    f"INSERT INTO {META_TABLE}(key, value) VALUES (?, ?)",
                    [
                        ("gateway_id", gateway_id),
                        ("schema_version", str(schema)),
                        ("taken_at", taken_at),
                        ("gateway_version", version("metalav-gateway")),
                    ],
                )
        finally:
            dst.close()
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise BackupError(N_("the journal's backup failed: {error}"), error=exc) from None
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise BackupError(
            N_("the journal's backup failed: {error}"), error=exc.strerror
        ) from None
    finally:
        src.close()
    _fsync_file(partial)
    os.rename(partial, dest)
    _fsync_dir(dest.parent)
    return BackupInfo(dest, gateway_id, schema, taken_at, executions, dest.stat().st_size)


def verify_backup(path: Path, gateway_id: str) -> BackupInfo:
    """Check a backup without changing it; raise BackupError saying what is wrong."""
    if not path.is_file():
        raise BackupError(N_("{path}: backup file not found"), path=path)
    try:
        with path.open("rb") as f:
            header = f.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise BackupError(
            N_("{path}: cannot read it ({error})"), path=path, error=exc.strerror
        ) from None
    if header != _SQLITE_HEADER:
        raise BackupError(N_("{path}: not an SQLite database"), path=path)
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise BackupError(
            N_("{path}: does not open as an SQLite database ({error})"), path=path, error=exc
        ) from None
    try:
        try:
            result = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        except sqlite3.DatabaseError as exc:
            raise BackupError(
                N_("{path}: corrupted file ({error})"), path=path, error=exc
            ) from None
        if result != ["ok"]:
            raise BackupError(
                N_("{path}: corrupted file (integrity_check: {result})"),
                path=path,
                result=result[0],
            )
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [t for t in _REQUIRED_TABLES if t not in tables]
        if missing:
            raise BackupError(
                N_("{path}: not a gateway journal (missing {tables})"),
                path=path,
                tables=", ".join(missing),
            )
        if META_TABLE not in tables:
            raise BackupError(
                N_(
                    "{path}: not a backup made by the gateway (metalavctl backup);"
                    " use a file it made"
                ),
                path=path,
            )
        meta = dict(conn.execute(f"SELECT key, value FROM {META_TABLE}").fetchall())
        schema = conn.execute("PRAGMA user_version").fetchone()[0]
        executions = conn.execute("SELECT count(*) FROM executions").fetchone()[0]
    finally:
        conn.close()
    if meta.get("gateway_id") != gateway_id:
        raise BackupError(
            N_("{path}: backup of gateway {other!r}, not of this one ({this!r})"),
            path=path,
            other=meta.get("gateway_id"),
            this=gateway_id,
        )
    if not 1 <= schema <= SCHEMA_VERSION:
        raise BackupError(
            N_(
                "{path}: schema version {version} is newer than this gateway's"
                " ({supported}); upgrade the gateway before restoring"
            ),
            path=path,
            version=schema,
            supported=SCHEMA_VERSION,
        )
    return BackupInfo(
        path, gateway_id, schema, str(meta.get("taken_at", "")), executions, path.stat().st_size
    )


@contextlib.contextmanager
def hold_journal_lock(journal: Path) -> Iterator[None]:
    """``instance_lock.hold`` for a tool run by root (restore, doctor): a lock file it
    had to create is handed to the owner of the journal's folder, so the daemon's own
    account can still open it afterwards."""
    lock = instance_lock.lock_path(journal)
    existed = lock.exists()
    with instance_lock.hold(journal):
        if not existed:
            with contextlib.suppress(OSError):
                folder = lock.parent.stat()
                os.chown(lock, folder.st_uid, folder.st_gid)
        yield


def restore(
    journal: Path,
    backup: Path,
    gateway_id: str,
    *,
    actor: str,
    os_user: str,
    reason: str,
    now: float,
) -> dict[str, Any]:
    """Put a verified backup in place of the journal, keeping the replaced files.

    Holds the journal's instance lock throughout: refuses while the daemon runs, and
    no daemon can start on a half-restored journal."""
    try:
        with hold_journal_lock(journal):
            return _restore_locked(
                journal, backup, gateway_id, actor=actor, os_user=os_user, reason=reason, now=now
            )
    except instance_lock.AlreadyRunning as exc:
        who = f" (pid {exc.pid})" if exc.pid else ""
        raise BackupError(
            N_(
                "the gateway is running{who} on {journal}: stop the service before"
                " restoring (systemctl stop metalav-gateway)"
            ),
            who=who,
            journal=journal,
        ) from None
    except instance_lock.InstanceLockError as exc:
        raise BackupError(N_("cannot lock the journal: {error}"), error=exc) from None


def _restore_locked(
    journal: Path,
    backup: Path,
    gateway_id: str,
    *,
    actor: str,
    os_user: str,
    reason: str,
    now: float,
) -> dict[str, Any]:
    info = verify_backup(backup, gateway_id)  # before anything is touched
    staging = journal.with_name(journal.name + ".restoring")
    staging.unlink(missing_ok=True)
    try:
        src = sqlite3.connect(f"file:{backup}?mode=ro", uri=True)
        dst = sqlite3.connect(staging)
        try:
            src.backup(dst)
            with dst:
                dst.execute(f"DROP TABLE {META_TABLE}")
        finally:
            src.close()
            dst.close()
        _fsync_file(staging)
    except (sqlite3.Error, OSError) as exc:
        staging.unlink(missing_ok=True)
        raise BackupError(N_("cannot prepare the restore: {error}"), error=exc) from None

    replaced: list[str] = []
    kept = journal.with_name(f"{journal.name}.replaced-{_stamp(now)}")
    if journal.exists():
        old = journal.stat()
        with contextlib.suppress(OSError):  # the daemon's account keeps owning its journal
            os.chown(staging, old.st_uid, old.st_gid)
            os.chmod(staging, old.st_mode & 0o7777)
        # Hard links first: the old journal, WAL included, is kept whole under the new
        # name before anything leaves its place. Its -wal and -shm then go before the
        # restored file arrives, so SQLite can never replay the old WAL onto it.
        for suffix in ("", "-wal", "-shm"):
            current = Path(f"{journal}{suffix}")
            if current.exists():
                os.link(current, f"{kept}{suffix}")
                replaced.append(f"{kept}{suffix}")
        for suffix in ("-wal", "-shm"):
            Path(f"{journal}{suffix}").unlink(missing_ok=True)
    os.rename(staging, journal)
    _fsync_dir(journal.parent)

    # The restore is an operator action: recorded in the restored journal itself
    # (which also migrates it forward to this gateway's schema).
    restored = Journal(journal, gateway_id)
    try:
        restored.audit(
            action="journal.restore",
            target=str(journal),
            actor=actor,
            os_user=os_user,
            reason=reason,
            outcome="restored",
            now=now,
            before={"replaced": replaced},
            after={"backup": str(backup), "taken_at": info.taken_at},
        )
    finally:
        restored.close()
    return {"restored": info.as_dict(), "journal": str(journal), "replaced": replaced}


def scheduled_backups(folder: Path) -> list[Path]:
    """The daemon's own backups in ``folder``, oldest first."""
    try:
        names = sorted(p.name for p in folder.iterdir() if _SCHEDULED.match(p.name))
    except OSError:  # missing, not a folder, not readable: no backups there
        return []
    return [folder / n for n in names]


def _taken_at(path: Path) -> float:
    match = _SCHEDULED.match(path.name)
    assert match is not None
    return datetime.strptime(match.group(1), _STAMP).replace(tzinfo=UTC).timestamp()


class BackupSchedule:
    """The daemon's periodic backup: one when the newest is older than ``interval_s``
    (checked from :attr:`STARTUP_DELAY_S` after start-up, so a box that reboots daily
    still gets them), then the oldest beyond ``keep`` deleted. A failure is logged,
    reported (alert ``backup_failed``) and retried in an hour."""

    RETRY_S = 3600.0
    #: Not in the first minutes after start-up: a restart (or an upgrade) is when the
    #: box is busiest, and a short-lived run (a test, a benchmark) needs no backup.
    STARTUP_DELAY_S = 600.0

    def __init__(
        self,
        journal: Path,
        folder: Path,
        gateway_id: str,
        *,
        keep: int,
        interval_s: float,
        on_failure: Callable[[Alert], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.journal = journal
        self.folder = folder
        self.gateway_id = gateway_id
        self.keep = keep
        self.interval_s = interval_s
        self._on_failure = on_failure
        self._clock = clock

    def due_in(self) -> float:
        existing = scheduled_backups(self.folder)
        if not existing:
            return 0.0
        return max(0.0, _taken_at(existing[-1]) + self.interval_s - self._clock())

    def run_once(self) -> BackupInfo:
        """Take one backup now and apply the retention count (blocking)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        now = self._clock()
        info = take_backup(
            self.journal, self.folder / f"journal-{_stamp(now)}.db", self.gateway_id, now=now
        )
        for old in scheduled_backups(self.folder)[: -self.keep]:
            old.unlink(missing_ok=True)
        self._remove_leftovers(now)
        return info

    def _remove_leftovers(self, now: float) -> None:
        """Copies a killed process left half-written (here, and the API's beside the
        journal), once they are clearly not in progress any more."""
        candidates = [
            *self.folder.glob("*.partial"),
            *self.journal.parent.glob(".backup-*.db"),
            *self.journal.parent.glob(".backup-*.db.partial"),
        ]
        for path in candidates:
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > LEFTOVER_AGE_S:
                    path.unlink()

    async def run(self) -> None:
        await asyncio.sleep(self.STARTUP_DELAY_S)
        while True:
            await asyncio.sleep(self.due_in())
            try:
                info = await asyncio.to_thread(self.run_once)
            except (BackupError, OSError, sqlite3.Error) as exc:
                message = str(exc.strerror) if isinstance(exc, OSError) else str(exc)
                log.error("scheduled journal backup failed: %s", message)
                self._on_failure(Alert("backup_failed", "warning", detail=message[:160]))
                await asyncio.sleep(self.RETRY_S)
                continue
            log.info(
                "journal backup %s (%d executions, %d bytes)",
                info.path,
                info.executions,
                info.size,
            )
