"""A circuit breaker per remote endpoint (integrations runbook; DESIGN.md "Outbox").

Sans-I/O: the caller asks :meth:`CircuitBreaker.allow` before a call and reports the
outcome with :meth:`~CircuitBreaker.record_success` / :meth:`~CircuitBreaker.record_failure`.

- ``closed``: calls flow; ``failure_threshold`` consecutive failures open it.
- ``open``: calls are refused until ``reset_timeout_s`` has passed since it opened.
- ``half_open``: up to ``half_open_max_calls`` probe calls are let through; one success
  closes it, one failure opens it again for another ``reset_timeout_s``.

:meth:`~CircuitBreaker.allow` returning ``True`` is a commitment: in ``half_open`` it
takes one of the probe slots, so call it only right before the call it guards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "CLOSED",
    "FAILURE_THRESHOLD",
    "HALF_OPEN",
    "OPEN",
    "RESET_TIMEOUT_S",
    "CircuitBreaker",
]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
#: Failures in a row that open a breaker.
FAILURE_THRESHOLD = 5
#: Seconds an open breaker waits before it lets one probe through (half-open).
RESET_TIMEOUT_S = 30.0


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = FAILURE_THRESHOLD,
        reset_timeout_s: float = RESET_TIMEOUT_S,
        half_open_max_calls: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or half_open_max_calls < 1 or reset_timeout_s < 0:
            raise ValueError(
                "need failure_threshold >= 1, half_open_max_calls >= 1, reset_timeout_s >= 0"
            )
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self.half_open_max_calls = half_open_max_calls
        self._clock = clock
        self._state = CLOSED
        self._failures = 0
        self._opened_at: float | None = None
        self._probes = 0

    @property
    def state(self) -> str:
        """The state now (an ``open`` breaker whose timeout passed reads ``half_open``)."""
        self._advance()
        return self._state

    def allow(self) -> bool:
        self._advance()
        if self._state == CLOSED:
            return True
        if self._state == HALF_OPEN and self._probes < self.half_open_max_calls:
            self._probes += 1
            return True
        return False

    def record_success(self) -> None:
        self._state = CLOSED
        self._failures = 0
        self._opened_at = None
        self._probes = 0

    def cancel(self) -> None:
        """An allowed call did not happen after all: give its probe slot back."""
        if self._state == HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def record_failure(self) -> None:
        self._advance()
        self._failures += 1
        if self._state == HALF_OPEN or (
            self._state == CLOSED and self._failures >= self.failure_threshold
        ):
            self._open()

    def reset(self) -> None:
        """Manual reset (``metalavctl breakers reset NAME``): closed, counters cleared."""
        self.record_success()

    def status(self) -> dict[str, Any]:
        state = self.state
        return {
            "name": self.name,
            "state": state,
            "failures": self._failures,
            "opened_at": self._opened_at,
            "next_probe_at": (
                None if self._opened_at is None else self._opened_at + self.reset_timeout_s
            ),
        }

    def _open(self) -> None:
        self._state = OPEN
        self._opened_at = self._clock()
        self._probes = 0

    def _advance(self) -> None:
        if (
            self._state == OPEN
            and self._opened_at is not None
            and self._clock() >= self._opened_at + self.reset_timeout_s
        ):
            self._state = HALF_OPEN
            self._probes = 0
