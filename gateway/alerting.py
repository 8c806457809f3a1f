"""Alerts raised from what the gateway observes over time, rather than from one state
change: events that went dead, repeated signature failures (issue 11 item 4).

Both go through ``Outcomes.raise_alert`` (journaled, sent through the outbox). A dead
event's alert may itself fail to get through, so the DLQ size is also in the retained
heartbeat (gateway/heartbeat.py).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from .events import Alert

__all__ = ["DeadLetterWatch", "SignatureWatch"]

log = logging.getLogger(__name__)


class DeadLetterWatch:
    """One alert each time the DLQ grew since the last check."""

    def __init__(
        self,
        dlq_size: Callable[[], int],
        raise_alert: Callable[[Alert], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._size = dlq_size
        self._raise = raise_alert
        self._clock = clock
        # Dead before this start: already in the DLQ (and in the heartbeat), not news.
        self._seen = dlq_size()
        self.last_dead_at: float | None = None

    def check(self) -> None:
        size = self._size()
        if size > self._seen:
            new = size - self._seen
            self.last_dead_at = self._clock()
            log.error(
                "%d outbox event(s) went dead; %d in the DLQ (metalavctl dlq list)", new, size
            )
            self._raise(
                Alert(
                    "outbox_event_dead",
                    "critical",
                    detail=f"{new} event(s) dead, {size} in the DLQ: metalavctl dlq list",
                )
            )
        self._seen = size


class SignatureWatch:
    """``threshold`` signature failures within ``window_s``: the cloud may sign with a key
    this gateway does not have (a key rotation done in the wrong order), and every real
    command is being refused. One alert per window."""

    REASONS = frozenset({"bad_signature", "unsupported_algorithm"})

    def __init__(
        self,
        raise_alert: Callable[[Alert], None],
        *,
        threshold: int,
        window_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._raise = raise_alert
        self._threshold = threshold
        self._window = window_s
        self._mono = monotonic
        self._failures: deque[float] = deque(maxlen=threshold)
        self._alerted_at: float | None = None

    def refused(self, reason: str) -> None:
        if reason not in self.REASONS:
            return
        now = self._mono()
        self._failures.append(now)
        if len(self._failures) < self._threshold or now - self._failures[0] > self._window:
            return
        if self._alerted_at is not None and now - self._alerted_at < self._window:
            return
        self._alerted_at = now
        log.error(
            "%d command signatures failed within %.0f s: possible key rotation problem",
            self._threshold,
            self._window,
        )
        self._raise(
            Alert(
                "command_signature_failures",
                "critical",
                detail=(
                    f"{self._threshold} commands with an invalid signature within"
                    f" {self._window:.0f} s: possible key rotation problem"
                ),
            )
        )
