"""What the journal raises and reports when it cannot do its job.

::

    JournalError          the file cannot be used at all (newer schema, not a database):
                          raised at start-up, the daemon refuses to run on it
    JournalUnwritable     one commit failed for a reason of the storage (disk full, I/O
                          error, read-only): nothing of it was written, try again later
    lifecycle.IllegalTransition (ValueError)
                          a move the lifecycle does not allow: a bug, nothing written

:class:`JournalFault` is not an exception: it is the journal's standing report that its
commits have been failing since a given time (``Journal.fault``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["JournalError", "JournalFault", "JournalUnwritable"]


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
