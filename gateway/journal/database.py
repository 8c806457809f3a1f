"""The journal file: its SQLite connection, its transactions, and failed commits.

The journal file: one SQLite connection, its transactions, and what happens when a
commit fails.

The database runs in WAL mode with ``synchronous=FULL``: when a transaction opened
with :meth:`Database._tx` returns, its change survives ``kill -9`` and power loss. A
storage failure rolls the transaction back, raises :class:`JournalUnwritable` and
sets :attr:`Database.fault` until a commit succeeds again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import JournalError, JournalFault, JournalUnwritable
from .schema import migrate

__all__ = ["Database", "placeholders"]

log = logging.getLogger(__name__)

# Fault injection for the journal-failure tests: the path of a control file whose lines
# name commit labels (``transition:released``, ``record:``, ``*``) that fail as if the
# disk were full. Read once at start-up; unset in production, where it costs nothing.
_FAULTS_FILE = os.environ.get("METALAV_TEST_JOURNAL_FAULTS", "")


def placeholders(values: Sequence[object]) -> str:
    """The ``?,?,...`` of an ``IN (...)`` list of ``values``."""
    return ",".join("?" * len(values))


def _is_storage_error(exc: sqlite3.Error) -> bool:
    # OperationalError covers SQLITE_FULL, SQLITE_IOERR, SQLITE_READONLY, SQLITE_BUSY;
    # a bare DatabaseError is SQLITE_CORRUPT / SQLITE_NOTADB. IntegrityError and
    # ProgrammingError are bugs in a statement, not a sick disk.
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def _faults_from_file(label: str) -> bool:
    try:
        with open(_FAULTS_FILE) as f:
            patterns = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return False
    return any(p == "*" or label.startswith(p) for p in patterns)


class Database:
    """One open journal file, shared by the per-job stores of the package (each of them
    a subclass): the connection, the transaction helper and the fault state."""

    def __init__(self, path: Path, gateway_id: str) -> None:
        self.path = path
        self.gateway_id = gateway_id
        #: Set while commits fail; cleared by the next commit that succeeds.
        self.fault: JournalFault | None = None
        #: Called with the new fault (or None) whenever it appears or clears.
        self.on_fault_change: Callable[[JournalFault | None], None] | None = None
        #: Called with the seconds each durable COMMIT took (metrics; issue 11).
        self.on_commit: Callable[[float], None] | None = None
        #: Tests only: a commit whose label this answers True for fails as on a full
        #: disk (``METALAV_TEST_JOURNAL_FAULTS`` sets it for a whole process).
        self.fail_commit: Callable[[str], bool] | None = _faults_from_file if _FAULTS_FILE else None
        #: ``time.monotonic()`` when the transaction running now began (None between
        #: transactions): the watchdog stops its pings when one is stuck (supervision.py).
        self.commit_since: float | None = None
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
        migrate(self._conn, path, self._tx)

    def close(self) -> None:
        self._conn.close()

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
        self.commit_since = time.monotonic()
        try:
            if self.fail_commit is not None and self.fail_commit(label):
                raise sqlite3.OperationalError(f"database or disk is full (injected at {label})")
            if not durable:
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                self._rollback()
                raise
            started = time.perf_counter()
            conn.execute("COMMIT")
            if durable and self.on_commit is not None:
                self.on_commit(time.perf_counter() - started)
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
            self.commit_since = None
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
