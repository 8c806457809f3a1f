"""The outbox store contract (DESIGN.md "Outbox"; payments runbook section 6).

The gateway's journal implements :class:`OutboxStore` in SQLite;
:class:`MemoryOutboxStore` is the executable reference, and
``tests/cloud_sync/outbox_contract.py`` is the test suite every implementation passes.

States::

    pending --claim--> sending --mark_sent--> sent
                          |  \\--mark_failed--> failed --(due)--claim--> sending ...
                          |   \\-mark_failed(not retryable | attempts >= max)--> dead (DLQ)
                          |--release--> failed       (channel unreachable: no attempt)
                          \\--requeue_stale--> failed (last_error='sending_timeout')

``attempts`` counts the delivery attempts that ended (sent, failed, dead, or timed out
in ``sending``); it is incremented when the outcome is recorded, not at claim, so that
a channel that was never reached (:meth:`OutboxStore.release`: MQTT down, cloud
unreachable, a breaker's probe refused) does not use up ``max_attempts`` during a long
outage. A dispatcher killed mid-send still counts: ``requeue_stale`` records the
attempt as ``sending_timeout``.

Every outcome is one row in the dispatch log (:class:`DispatchRecord`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

__all__ = [
    "CHANNELS",
    "OUTCOMES",
    "SENDING_TIMEOUT_ERROR",
    "STATES",
    "DispatchRecord",
    "MemoryOutboxStore",
    "OutboxItem",
    "OutboxStore",
]

#: The outbox states, in the order of the diagram above: the one list, for every
#: OutboxStore (the journal's included; it may keep more, e.g. "archived").
STATES = ("pending", "sending", "sent", "failed", "dead")
#: Dispatch log outcomes. ``unreachable`` is a :meth:`OutboxStore.release`.
OUTCOMES = ("sent", "failed", "dead", "timeout", "unreachable")
CHANNELS = ("mqtt", "https")
#: The runbook's rule: an item stuck in ``sending`` comes back with this error.
SENDING_TIMEOUT_ERROR = "sending_timeout"


@dataclass(frozen=True)
class OutboxItem:
    id: int
    event_id: str
    stream: str  # ordering domain: items of one stream are delivered in id order
    topic: str  # suffix under the gateway's MQTT prefix: one of mqtt_session.EVENT_TOPICS
    payload: bytes  # JSON object with an "event_id"
    attempts: int  # attempts that ended before this claim (0 on the first one)


@dataclass(frozen=True)
class DispatchRecord:
    item_id: int
    at: float
    channel: str | None  # 'mqtt' | 'https'; None for a 'timeout' (the channel is unknown)
    outcome: str  # one of OUTCOMES
    error: str | None


class OutboxStore(Protocol):
    def claim(self, limit: int, now: float) -> list[OutboxItem]:
        """Up to ``limit`` due items, oldest id first, now in ``sending``.

        Due: ``pending``, or ``failed`` with ``next_attempt_at <= now``. Per-stream
        order: an item is never claimed while an older item of its stream is
        ``sending``, ``failed`` and not due, or due but left out of this claim (the
        limit); ``sent`` and ``dead`` items do not block. So the items claimed for one
        stream are always the oldest undelivered ones of that stream, in order."""
        ...

    def requeue_stale(self, older_than_s: float, now: float) -> int:
        """``sending`` since before ``now - older_than_s`` -> ``failed``, ``last_error=
        'sending_timeout'``, ``attempts + 1``, due now; log ``timeout``. Returns the count."""
        ...

    def mark_sent(self, ids: Sequence[int], *, channel: str, now: float) -> None:
        """Delivered: -> ``sent`` (``attempts + 1``, ``sent_at``); log ``sent``.

        Also applies to an item that ``requeue_stale`` or ``release`` had put back to
        ``failed`` (a late acknowledgement is still a delivery); ignored for ``sent``
        and ``dead`` items."""
        ...

    def mark_failed(
        self,
        item_id: int,
        *,
        error: str,
        retryable: bool,
        channel: str,
        now: float,
        next_attempt_at: float,
        max_attempts: int,
    ) -> str:
        """A ``sending`` item's attempt failed: ``attempts + 1``, ``last_error = error``;
        -> ``dead`` when not ``retryable`` or ``attempts >= max_attempts`` (after the
        increment), else ``failed`` due at ``next_attempt_at``. Logs ``failed`` or
        ``dead``. Returns the new state; for an item not in ``sending`` nothing changes
        and its current state is returned."""
        ...

    def release(
        self, ids: Sequence[int], *, error: str, channel: str, now: float, next_attempt_at: float
    ) -> None:
        """The channel could not be reached, so no attempt happened: ``sending`` ->
        ``failed`` due at ``next_attempt_at``, ``last_error = error``, attempts
        unchanged; log ``unreachable``. Items not in ``sending`` are left alone."""
        ...

    def depth(self) -> dict[str, int]:
        """Item count per state, every state of :data:`STATES` present."""
        ...


@dataclass
class _Row:
    item: OutboxItem
    state: str = "pending"
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: float = 0.0
    sending_since: float | None = None
    sent_at: float | None = None


class MemoryOutboxStore:
    """The reference :class:`OutboxStore`, in memory (tests, benchmarks, docs)."""

    def __init__(self) -> None:
        self._rows: dict[int, _Row] = {}
        self._next_id = 1
        self.log: list[DispatchRecord] = []

    # -- the producer's side (the journal's outbox insert) ------------------------

    def add(self, event_id: str, stream: str, topic: str, payload: bytes) -> int:
        item_id = self._next_id
        self._next_id += 1
        self._rows[item_id] = _Row(OutboxItem(item_id, event_id, stream, topic, payload, 0))
        return item_id

    # -- inspection -----------------------------------------------------------------

    def state(self, item_id: int) -> str:
        return self._rows[item_id].state

    def attempts(self, item_id: int) -> int:
        return self._rows[item_id].attempts

    def last_error(self, item_id: int) -> str | None:
        return self._rows[item_id].last_error

    def next_attempt_at(self, item_id: int) -> float:
        return self._rows[item_id].next_attempt_at

    def dispatch_log(self) -> list[DispatchRecord]:
        return list(self.log)

    # -- OutboxStore ----------------------------------------------------------------

    def claim(self, limit: int, now: float) -> list[OutboxItem]:
        claimed: list[OutboxItem] = []
        blocked: set[str] = set()
        for item_id in sorted(self._rows):
            row = self._rows[item_id]
            stream = row.item.stream
            if row.state in ("sent", "dead") or stream in blocked:
                continue
            due = row.state == "pending" or (row.state == "failed" and row.next_attempt_at <= now)
            if not due or len(claimed) >= limit:
                blocked.add(stream)
                continue
            row.state = "sending"
            row.sending_since = now
            claimed.append(replace(row.item, attempts=row.attempts))
        return claimed

    def requeue_stale(self, older_than_s: float, now: float) -> int:
        count = 0
        for item_id in sorted(self._rows):
            row = self._rows[item_id]
            if row.state != "sending" or row.sending_since is None:
                continue
            if now - row.sending_since <= older_than_s:
                continue
            row.state = "failed"
            row.attempts += 1
            row.last_error = SENDING_TIMEOUT_ERROR
            row.next_attempt_at = now
            row.sending_since = None
            self.log.append(DispatchRecord(item_id, now, None, "timeout", SENDING_TIMEOUT_ERROR))
            count += 1
        return count

    def mark_sent(self, ids: Sequence[int], *, channel: str, now: float) -> None:
        for item_id in ids:
            row = self._rows[item_id]
            if row.state in ("sent", "dead"):
                continue
            row.state = "sent"
            row.attempts += 1
            row.sent_at = now
            row.sending_since = None
            self.log.append(DispatchRecord(item_id, now, channel, "sent", None))

    def mark_failed(
        self,
        item_id: int,
        *,
        error: str,
        retryable: bool,
        channel: str,
        now: float,
        next_attempt_at: float,
        max_attempts: int,
    ) -> str:
        row = self._rows[item_id]
        if row.state != "sending":
            return row.state
        row.attempts += 1
        row.last_error = error
        row.sending_since = None
        if not retryable or row.attempts >= max_attempts:
            row.state = "dead"
        else:
            row.state = "failed"
            row.next_attempt_at = next_attempt_at
        self.log.append(DispatchRecord(item_id, now, channel, row.state, error))
        return row.state

    def release(
        self, ids: Sequence[int], *, error: str, channel: str, now: float, next_attempt_at: float
    ) -> None:
        for item_id in ids:
            row = self._rows[item_id]
            if row.state != "sending":
                continue
            row.state = "failed"
            row.last_error = error
            row.next_attempt_at = next_attempt_at
            row.sending_since = None
            self.log.append(DispatchRecord(item_id, now, channel, "unreachable", error))

    def depth(self) -> dict[str, int]:
        counts = Counter(row.state for row in self._rows.values())
        return {state: counts.get(state, 0) for state in STATES}
