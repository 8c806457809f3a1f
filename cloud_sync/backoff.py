"""Retry delays: capped exponential backoff, with full jitter, on tenacity's wait strategies.

One helper for every retry loop of the gateway, so that the formula is written once:
before retry ``n`` (1, 2, ...) the window is ``base_s * 2**(n-1)`` capped at ``max_s``;
with jitter (the default) the delay is drawn uniformly between ``floor_s`` and that
window ("full jitter", AWS architecture blog "Exponential Backoff And Jitter", which
is what keeps a fleet of gateways from stampeding a broker after an outage); without,
it is the window itself.

    Backoff(base_s, max_s).delay(n)       one delay (the outbox: n = the item's attempts)
    Backoff(base_s, max_s).delays()       an endless generator of delays (a retry loop)
    Backoff(base_s, max_s).wait           the tenacity wait strategy (AsyncRetrying)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tenacity import RetryCallState, Retrying, wait_exponential, wait_random_exponential
from tenacity.wait import wait_base

__all__ = ["Backoff"]

# Only the attempt number of a call state matters to the exponential strategies.
_RETRYING = Retrying()


@dataclass(frozen=True)
class Backoff:
    """``base_s``: the first window; ``max_s``: the cap; ``floor_s``: the shortest
    delay (so one client never hammers a server either); ``jitter``: full jitter."""

    base_s: float
    max_s: float
    floor_s: float = 0.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.max_s <= 0 or self.floor_s < 0:
            raise ValueError("need base_s > 0, max_s > 0 and floor_s >= 0")

    @property
    def wait(self) -> wait_base:
        """The tenacity wait strategy (``AsyncRetrying(wait=...)``)."""
        if self.jitter:
            return wait_random_exponential(multiplier=self.base_s, max=self.max_s, min=self.floor_s)
        return wait_exponential(multiplier=self.base_s, max=self.max_s, min=self.floor_s)

    def delay(self, retry: int) -> float:
        """The delay before retry number ``retry`` (1 for the first; below 1 counts as 1)."""
        state = RetryCallState(_RETRYING, None, (), {})
        state.attempt_number = max(retry, 1)
        return float(self.wait(state))

    def delays(self) -> Iterator[float]:
        """The delays before retry 1, 2, 3, ...; start a new generator to start over."""
        wait = self.wait
        state = RetryCallState(_RETRYING, None, (), {})
        while True:
            yield float(wait(state))
            state.attempt_number += 1
