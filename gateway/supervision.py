"""Telling systemd how the daemon is: ``sd_notify`` and a watchdog fed only by progress.

The unit is ``Type=notify`` with ``WatchdogSec`` (systemd/metalav-gateway.service):

- ``READY=1`` once the journal is open and the board and the broker have each been
  tried once (connected or not): from then on the daemon takes commands as soon as
  the links allow;
- ``WATCHDOG=1`` every ``WatchdogSec / 2``, but only while the daemon makes progress
  (:class:`Watchdog`): the event loop runs (the pings come from a task on it, so a
  blocked loop stops them), no journal commit has been stuck longer than the watchdog
  (a dying SD card), and the board supervision keeps ticking. A journal that fails
  fast (disk full) is not stuck: the daemon handles it (alert, intake stopped) and a
  restart would not help, so it does not stop the pings;
- ``STATUS=`` one line for ``systemctl status``; ``RELOADING=1`` / ``READY=1`` around
  a SIGHUP reload; ``STOPPING=1`` as the shutdown starts, with
  ``EXTEND_TIMEOUT_USEC`` while a pulse train still runs.

The protocol is sd_notify(3): one datagram of ``KEY=VALUE`` lines to the unix socket
named by ``$NOTIFY_SOCKET`` (``@name`` is the abstract namespace). Without it (run by
hand, most tests) nothing is sent. ~30 lines: no library earns its place for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Notifier", "Progress", "Watchdog", "watchdog_timeout"]

log = logging.getLogger(__name__)

# Fault injection for the supervision tests: while the file this names exists, the
# daemon blocks its own event loop (as a hung call would). Read once at start-up;
# unset in production, where it costs nothing.
_STALL_FILE = os.environ.get("METALAV_TEST_STALL_LOOP", "")


class Notifier:
    """sd_notify(3) over a unix datagram socket; a no-op without ``NOTIFY_SOCKET``."""

    def __init__(self, address: str | None) -> None:
        self.address: str | None = None
        self._sock: socket.socket | None = None
        self._failing = False
        if not address:
            return
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        elif not address.startswith("/"):
            log.warning("NOTIFY_SOCKET %r is not a unix socket address: not notifying", address)
            return
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Never block the event loop on systemd: a full queue loses one notice.
        self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) in one datagram. Never raises:
        systemd being away must not stop the gateway."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failing:  # once per episode, not at every ping
                log.warning("sd_notify failed: %s", exc)
            self._failing = True
            return False
        if self._failing:
            log.info("sd_notify works again")
        self._failing = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_timeout(environ: Mapping[str, str] = os.environ) -> float | None:
    """The unit's ``WatchdogSec`` in seconds, if the watchdog is for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # set for another process (we were started by something else)
    return int(usec) / 1_000_000


@dataclass
class Progress:
    """Where the daemon's progress is read from; each returns a monotonic time."""

    #: Since when a journal commit has been running, None while none is.
    journal_commit_since: Callable[[], float | None]
    #: The board supervision's last tick.
    board_ticked_at: Callable[[], float]
    #: How long the board supervision may go without a tick (its poll period plus
    #: the longest exchange it may wait for under the board lock).
    board_allowance_s: float


class Watchdog:
    """Pings systemd every ``timeout_s / 2`` while :meth:`stalled` finds nothing."""

    def __init__(
        self,
        notifier: Notifier,
        timeout_s: float,
        progress: Progress,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._notifier = notifier
        self.timeout_s = timeout_s
        self._progress = progress
        self._clock = clock
        self._withheld: str | None = None

    def stalled(self) -> str | None:
        """What makes no progress, or None. Runs on the event loop, so a blocked loop
        never gets here (that is the loop's check)."""
        now = self._clock()
        since = self._progress.journal_commit_since()
        if since is not None and now - since > self.timeout_s / 2:
            return f"journal commit stuck for {now - since:.0f} s"
        quiet = now - self._progress.board_ticked_at()
        if quiet > self._progress.board_allowance_s + self.timeout_s / 2:
            return f"board supervision silent for {quiet:.0f} s"
        return None

    async def run(self) -> None:
        while True:
            problem = self.stalled()
            if problem is None:
                self._notifier.notify("WATCHDOG=1")
                if self._withheld is not None:
                    log.warning("watchdog: progress again (%s no longer)", self._withheld)
                    self._withheld = None
            elif problem != self._withheld:
                # systemd kills and restarts the daemon once WatchdogSec passes.
                log.critical("watchdog: pings withheld: %s", problem)
                self._withheld = problem
            await asyncio.sleep(self.timeout_s / 2)


async def run_stall_hook() -> None:
    """Tests only (``METALAV_TEST_STALL_LOOP``): block the event loop while the file exists."""
    if not _STALL_FILE:
        return
    while True:
        await asyncio.sleep(0.05)
        _stall_while_file_exists(_STALL_FILE)


def _stall_while_file_exists(path: str) -> None:
    """Blocking on purpose: this is what a hung call on the event loop does."""
    if not os.path.exists(path):
        return
    log.warning("test fault injection: event loop blocked while %s exists", path)
    while os.path.exists(path):
        time.sleep(0.05)
    log.warning("test fault injection: event loop released")
