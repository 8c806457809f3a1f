"""One daemon per journal: an exclusive ``flock`` on ``<journal path>.lock``.

A second ``metalav-gateway run`` on the same journal (a technician starting it by hand
while the service runs, or two configs naming one journal) would steal the first one's
MQTT client id, accept paid commands it cannot send (the serial port is busy) and remove
the first one's API socket when it stops. It must refuse before it touches the journal,
the socket, the broker or the board, so the lock is the first thing ``run`` takes.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on a file beside the journal, which holds the
owner's pid for the refusal message. The kernel drops the lock when the owning process
dies, SIGKILL and power loss included, so there is never a stale lock to clean up.
For the same reason the file is never deleted: unlinking it would let a process that
had opened the old file and one that creates a new one both hold "the" lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["AlreadyRunning", "InstanceLockError", "hold", "lock_path"]


class InstanceLockError(Exception):
    """The lock file cannot be opened (permissions, read-only disk, ...)."""


class AlreadyRunning(InstanceLockError):
    """Another process holds the lock: a daemon already runs on this journal."""

    def __init__(self, journal: Path, pid: int | None) -> None:
        self.journal = journal
        self.pid = pid
        who = "another metalav-gateway" + (f" (pid {pid})" if pid else "")
        super().__init__(
            f"{who} already runs on journal {journal}; "
            "stop it first (systemctl stop metalav-gateway)"
        )


def lock_path(journal: Path) -> Path:
    """The lock file of a journal; symlinks and relative paths resolved, so two
    spellings of one journal share one lock."""
    real = journal.resolve()
    return real.with_name(real.name + ".lock")


@contextlib.contextmanager
def hold(journal: Path) -> Iterator[Path]:
    """Hold the journal's instance lock for the ``with`` block; raise AlreadyRunning
    if another process holds it."""
    path = lock_path(journal)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # as the journal would
        # Not O_TRUNC: the pid in it belongs to the holder until we have the lock.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise InstanceLockError(f"{path}: cannot open the lock file: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise InstanceLockError(f"{path}: cannot lock: {exc.strerror}") from None
            raise AlreadyRunning(journal, _read_pid(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        # Closing the descriptor releases the lock; the file stays (see above).
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    """The holder's pid, or None if it has not written it yet (it locks, then writes)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
