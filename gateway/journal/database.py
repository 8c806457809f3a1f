"""The journal file: its SQLite connection, its transactions, and failed commits.

The database runs in WAL mode. SQLite itself runs with ``synchronous=NORMAL`` (a
commit writes its WAL frames, no fsync) and this module makes commits durable by
``fdatasync`` of the WAL file, which is exactly what ``synchronous=FULL`` does after
each commit — but at the moment the caller chooses:

- ``_tx()`` (durable, the default): the fdatasync runs before the transaction returns,
  on the calling thread. When it returns, its change survives ``kill -9`` and power loss.
- ``_tx(durable=False)``: the commit is written (it survives ``kill -9``: the frames are
  in the kernel's page cache) but not flushed; a power cut may lose it. The release
  path writes this way and then awaits :meth:`Database.flushed` before anything leaves
  the gateway (a PUBACK, a byte to the board, an event to the cloud): one fdatasync,
  run off the event loop in a thread, then covers every commit written so far — the
  commits of commands arriving together share it (group commit) and the event loop
  keeps reading the board and the broker while the disk works.

A storage failure (a commit, or a flush) raises :class:`JournalUnwritable` and sets
:attr:`Database.fault` until a write succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from .errors import JournalError, JournalFault, JournalUnwritable
from .schema import migrate

__all__ = ["Database", "placeholders"]

log = logging.getLogger(__name__)

# Checkpoints (copying the WAL into the database file, with two fsyncs) run on the flush
# thread, at most this often, so that the event loop never does one between two
# releases. SQLite's own automatic checkpoint on the loop stays as a safety net, at a
# WAL size the flush thread's checkpoints keep it well under.
CHECKPOINT_EVERY_S = 1.0
AUTOCHECKPOINT_PAGES = 10_000

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
        #: Called with the seconds each durable commit (its COMMIT and flush) or each
        #: flush of the release path took (metrics and health; issue 11).
        self.on_commit: Callable[[float], None] | None = None
        #: Tests only: a commit whose label this answers True for fails as on a full
        #: disk (``METALAV_TEST_JOURNAL_FAULTS`` sets it for a whole process).
        self.fail_commit: Callable[[str], bool] | None = _faults_from_file if _FAULTS_FILE else None
        #: ``time.monotonic()`` when the transaction running now began (None between
        #: transactions): the watchdog stops its pings when one is stuck (supervision.py).
        self.commit_since: float | None = None
        #: The same for a flush running on the flush thread (Database.flushed).
        self.flush_since: float | None = None
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
        # Durability is this module's fdatasync of the WAL (see the module docstring);
        # SQLite still syncs the WAL and the database file around each checkpoint.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
        #: Commits written so far, and how many of them are known durable.
        self.written = 0
        self.durable = 0
        self._flushing: asyncio.Future[None] | None = None
        # One thread of its own, started at the first flush: flushes never overlap, and
        # a disk that stalls holds up no other work of the loop's default executor.
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-flush")
        self._durable_changed: asyncio.Event | None = None
        self._checkpointer: sqlite3.Connection | None = None  # the flush thread's own
        self._checkpointed_at = time.monotonic()
        #: Tests only: called instead of os.fdatasync(fd) (e.g. to keep a copy of what
        #: a power cut would leave: the files as of each flush).
        self.fdatasync: Callable[[int], None] = os.fdatasync
        migrate(self._conn, path, self._tx)
        # The journal file may be new: its directory entry must survive a power cut too.
        self._sync_dir()

    def close(self) -> None:
        # A clean stop leaves nothing a power cut right after it could take back.
        with contextlib.suppress(JournalUnwritable):
            self._flush_now()
        self._flusher.shutdown(wait=True)  # its job is short: an fdatasync, a checkpoint
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._conn.close()

    # -- durability ------------------------------------------------------------

    def _wal_sync(self) -> None:
        """fdatasync of the WAL file (what synchronous=FULL does after a commit). A
        fresh descriptor each time: SQLite may truncate the WAL, never replaces it
        while this connection is open; fsync acts on the file, whichever descriptor."""
        fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.fdatasync(fd)
        finally:
            os.close(fd)

    def _flush_job(self) -> None:
        """The flush thread's work: the flush, then now and then a checkpoint."""
        self._wal_sync()
        if time.monotonic() - self._checkpointed_at >= CHECKPOINT_EVERY_S:
            self._checkpointed_at = time.monotonic()
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Copy what the WAL holds into the database file, on a connection of its own
        (WAL lets it run beside the loop's writes; PASSIVE never waits for them). A
        checkpoint that cannot run now is only tried again later: nothing depends on it
        but the WAL's size."""
        try:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
                self._checkpointer.execute("PRAGMA synchronous=NORMAL")
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.debug("journal checkpoint postponed: %s", exc)

    def _sync_dir(self) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _flush_now(self) -> None:
        """Make every commit written so far durable, on this thread."""
        if self.durable >= self.written:
            return
        mark = self.written
        try:
            self._wal_sync()
        except OSError as exc:
            self._set_fault(f"flush of the journal failed: {exc.strerror or exc}")
            raise JournalUnwritable(str(exc)) from exc
        self._flushed_to(mark)

    def _flushed_to(self, mark: int) -> None:
        if mark > self.durable:
            self.durable = mark
            if self._durable_changed is not None:
                self._durable_changed.set()
        if self.fault is not None:
            self._set_fault(None)

    async def flushed(self, upto: int | None = None, *, grace_s: float = 0.0) -> None:
        """Until every commit up to ``upto`` (default: all written so far) is durable.

        Concurrent callers share one fdatasync (group commit); it runs in a thread, so
        the event loop goes on meanwhile. With ``grace_s``, wait that long for someone
        else's flush first (for work that can wait: the outbox), then flush.
        Raises :class:`JournalUnwritable` if the flush fails (the commits stay written;
        a later flush may still make them durable)."""
        target = self.written if upto is None else upto
        if self.durable >= target:
            return
        if grace_s > 0:
            if self._durable_changed is None:
                self._durable_changed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    while self.durable < target:
                        self._durable_changed.clear()
                        await self._durable_changed.wait()
        while self.durable < target:
            await asyncio.shield(self.flush_soon())

    def flush_soon(self) -> asyncio.Future[None]:
        """Start a flush of everything written so far now, on the flush thread, unless
        one is running (its future is returned either way). The release path calls it
        right after its commit, so the disk works while the loop does the rest (logs,
        metrics, the next command); :meth:`flushed` then only waits."""
        if self._flushing is None:
            mark = self.written
            self.flush_since = time.monotonic()
            # Submitted to the thread here and now, not when a task first runs.
            sync = asyncio.get_running_loop().run_in_executor(self._flusher, self._flush_job)
            started = time.perf_counter()
            self._flushing = asyncio.ensure_future(self._flush_done(sync, mark, started))
        return self._flushing

    async def _flush_done(self, sync: asyncio.Future[None], mark: int, started: float) -> None:
        try:
            await sync
        except OSError as exc:
            self._set_fault(f"flush of the journal failed: {exc.strerror or exc}")
            raise JournalUnwritable(str(exc)) from exc
        finally:
            self._flushing = None
            self.flush_since = None
        self._flushed_to(mark)
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started)

    def stalled_since(self) -> float | None:
        """Since when (time.monotonic) a commit or a flush has been running, if one is:
        the supervisor stops the watchdog when that lasts too long (a stalled disk)."""
        running = [t for t in (self.commit_since, self.flush_since) if t is not None]
        return min(running) if running else None

    @contextmanager
    def _tx(self, *, durable: bool = True, label: str = "write") -> Iterator[sqlite3.Connection]:
        """One transaction, flushed to disk before it returns.

        ``durable=False`` only writes it: for bookkeeping whose loss in a power cut only
        means work is redone, never undone (an outbox item re-sent, which the cloud
        de-duplicates), and for the release path, which awaits :meth:`flushed` before
        anything depending on the commit leaves the gateway. The next flush makes it
        durable along with everything written before it.

        A failure of the storage rolls the transaction back and raises
        :class:`JournalUnwritable`; ``label`` names the commit for the fault-injection
        hook of the tests."""
        conn = self._conn
        self.commit_since = time.monotonic()
        try:
            if self.fail_commit is not None and self.fail_commit(label):
                raise sqlite3.OperationalError(f"database or disk is full (injected at {label})")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                self._rollback()
                raise
            started = time.perf_counter()
            conn.execute("COMMIT")
            self.written += 1
            if durable:
                self._flush_now()  # raises JournalUnwritable itself
                if self.on_commit is not None:
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
        if not durable and self.fault is not None:
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
