"""Clock sanity: is the system clock synchronised, did it jump, and what the gateway does
with a command's ``iat``/``exp`` when it cannot trust it (README, "The gateway's clock").

A Raspberry Pi has no real-time clock: until NTP (systemd-timesyncd, chrony) has set
it, ``time.time()`` may be hours or years off. The kernel knows whether a time daemon
disciplines the clock: ``adjtimex(2)`` returns ``TIME_ERROR`` while ``STA_UNSYNC`` is
set, whatever daemon is in use, so that is the probe (no D-Bus, no subprocess).

Policy while the clock is not synchronised (:class:`TimePolicy`):

- ``iat``/``nbf`` in the future are not refused (the gateway's clock may be behind);
  the signature, audience and ``jti`` are checked as always, and a duplicate
  ``execute_key`` is still answered from the journal, so nothing runs twice.
- ``exp`` is not read against the wall clock: the command is given its own lifetime
  (``exp - iat``) from the moment the gateway received it, counted on the gateway's
  clock (consistent with itself even when offset). A command is never expired, and a
  customer never refunded, because of the gateway's own wrong time.
- The "older than the journal remembers" check is skipped too (it is a wall-clock
  comparison); replays of such old tokens are then only stopped by the journal.

Jumps are seen by comparing how far ``time.time()`` and ``time.monotonic()`` moved
between two checks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cloud_sync.commands import ExecuteCommand

from .events import Alert

__all__ = [
    "ClockProbe",
    "ClockState",
    "ClockWatch",
    "TimePolicy",
    "kernel_clock_synchronized",
    "test_clock_from_env",
]

log = logging.getLogger(__name__)

#: adjtimex(2) return value while the kernel's STA_UNSYNC flag is set.
TIME_ERROR = 5
#: The longest lifetime given to a command while the clock is not trusted.
MAX_UNTRUSTED_TTL_S = 3600

#: Tests only: a file whose lines say ``synced`` / ``unsynced`` and ``offset=SECONDS``
#: (added to the wall clock), read by a running daemon to simulate a bad clock.
TEST_CLOCK_ENV = "METALAV_TEST_CLOCK_FILE"


@functools.cache
def _adjtimex() -> Callable[[ctypes.Array[ctypes.c_char]], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return libc.adjtimex
    except (OSError, AttributeError):
        return None


def kernel_clock_synchronized() -> bool | None:
    """True/False from adjtimex(2); None where it cannot be asked (not Linux)."""
    adjtimex = _adjtimex()
    if adjtimex is None:
        return None
    # struct timex is ~208 bytes on 64-bit Linux; modes = 0 (the zeroed first field)
    # only reads.
    buf = ctypes.create_string_buffer(512)
    state = adjtimex(buf)
    if state < 0:
        return None
    return bool(state != TIME_ERROR)


ClockProbe = Callable[[], bool | None]


class _TestClock:
    """The test hook of ``METALAV_TEST_CLOCK_FILE``: a wall clock with an offset, and a
    synchronisation state, both read from the file (cheaply: on its mtime)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._mtime = -1.0
        self.offset = 0.0
        self.synced: bool | None = True

    def _read(self) -> None:
        try:
            mtime = self._path.stat().st_mtime
            if mtime == self._mtime:
                return
            text = self._path.read_text()
        except OSError:
            return
        self._mtime = mtime
        self.offset = 0.0
        self.synced = True
        for line in text.split():
            if line in ("synced", "unsynced"):
                self.synced = line == "synced"
            elif line.startswith("offset="):
                self.offset = float(line.removeprefix("offset="))

    def now(self) -> float:
        self._read()
        return time.time() + self.offset

    def probe(self) -> bool | None:
        self._read()
        return self.synced


def test_clock_from_env() -> tuple[Callable[[], float], ClockProbe] | None:
    path = os.environ.get(TEST_CLOCK_ENV)
    if not path:
        return None
    hook = _TestClock(Path(path))
    return hook.now, hook.probe


@dataclass(frozen=True)
class ClockState:
    synced: bool | None  # None: the kernel could not be asked
    checked: bool  # False when the check is off in the config (the clock is trusted)
    last_jump_s: float | None  # size of the last jump (signed), None if none seen
    last_jump_at: float | None  # monotonic time of it
    unsynced_since: float | None  # monotonic


class ClockWatch:
    """Checks the clock now and then: :meth:`check` returns the alerts to raise."""

    def __init__(
        self,
        *,
        probe: ClockProbe | None,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        jump_threshold_s: float = 5.0,
        unsynced_alert_after_s: float = 300.0,
    ) -> None:
        self._probe = probe  # None: checking is off (config clock.sync_check = "off")
        self._wall = wall
        self._mono = monotonic
        self._jump_threshold = jump_threshold_s
        self._alert_after = unsynced_alert_after_s
        self._last = (wall(), monotonic())
        self._synced: bool | None = True if probe is None else probe()
        self._unsynced_since: float | None = None if self._synced is not False else monotonic()
        self._alerted_unsynced = False
        self._last_jump: tuple[float, float] | None = None

    @property
    def trusted(self) -> bool:
        """Whether ``iat``/``exp`` may be read against the wall clock. An unknown state
        (no adjtimex) is trusted: refusing every command is not an option either."""
        return self._synced is not False

    def state(self) -> ClockState:
        return ClockState(
            synced=self._synced,
            checked=self._probe is not None,
            last_jump_s=None if self._last_jump is None else self._last_jump[0],
            last_jump_at=None if self._last_jump is None else self._last_jump[1],
            unsynced_since=self._unsynced_since,
        )

    def recent_jump(self, within_s: float) -> bool:
        return self._last_jump is not None and self._mono() - self._last_jump[1] <= within_s

    def check(self) -> list[Alert]:
        alerts: list[Alert] = []
        wall, mono = self._wall(), self._mono()
        last_wall, last_mono = self._last
        self._last = (wall, mono)
        drift = (wall - last_wall) - (mono - last_mono)
        if abs(drift) >= self._jump_threshold:
            self._last_jump = (drift, mono)
            log.warning("system clock jumped %+.0f s", drift)
            alerts.append(Alert("clock_jump", "warning", detail=f"wall clock moved {drift:+.0f} s"))
        if self._probe is None:
            return alerts
        synced = self._probe()
        if synced is False:
            if self._unsynced_since is None:
                self._unsynced_since = mono
                log.warning("system clock not synchronised: token times read leniently")
            if not self._alerted_unsynced and mono - self._unsynced_since >= self._alert_after:
                self._alerted_unsynced = True
                alerts.append(
                    Alert(
                        "clock_unsynchronized",
                        "warning",
                        detail=f"not synchronised for {mono - self._unsynced_since:.0f} s",
                    )
                )
        else:
            if self._unsynced_since is not None:
                log.info("system clock synchronised")
                if self._alerted_unsynced:
                    alerts.append(Alert("clock_synchronized", "info", detail="clock synchronised"))
            self._unsynced_since = None
            self._alerted_unsynced = False
        self._synced = synced
        return alerts


class TimePolicy:
    """What intake does with a command's times, given whether the clock is trusted."""

    def __init__(self, trusted: Callable[[], bool]) -> None:
        self._trusted = trusted

    @property
    def trusted(self) -> bool:
        return self._trusted()

    @staticmethod
    def own_lifetime(cmd: ExecuteCommand, now: float) -> ExecuteCommand:
        """The command with its deadline counted from its arrival on our own clock."""
        ttl = min(cmd.expires_at - cmd.issued_at, MAX_UNTRUSTED_TTL_S)
        return dataclasses.replace(cmd, expires_at=int(now) + max(ttl, 1))
