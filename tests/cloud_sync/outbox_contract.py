"""The OutboxStore contract, reusable for every implementation.

Subclass :class:`OutboxStoreContract` in a ``Test*`` class and implement
``make_store()`` returning an object with the :class:`ContractStore` methods (the
store itself plus a few producer/inspection helpers); the journal's SQLite store runs
the same tests as ``cloud_sync.outbox.MemoryOutboxStore``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Protocol

from cloud_sync.outbox import STATES, DispatchRecord, OutboxItem


class ContractStore(Protocol):
    # OutboxStore
    def claim(self, limit: int, now: float) -> list[OutboxItem]: ...
    def requeue_stale(self, older_than_s: float, now: float) -> int: ...
    def mark_sent(self, ids: Sequence[int], *, channel: str, now: float) -> None: ...
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
    ) -> str: ...
    def release(
        self, ids: Sequence[int], *, error: str, channel: str, now: float, next_attempt_at: float
    ) -> None: ...
    def depth(self) -> dict[str, int]: ...

    # helpers for the tests
    def add(self, event_id: str, stream: str, topic: str, payload: bytes) -> int: ...
    def state(self, item_id: int) -> str: ...
    def attempts(self, item_id: int) -> int: ...
    def last_error(self, item_id: int) -> str | None: ...
    def dispatch_log(self) -> list[DispatchRecord]: ...


def add(store: ContractStore, stream: str, topic: str = "results") -> int:
    event_id = str(uuid.uuid4())
    payload = json.dumps({"event_id": event_id, "stream": stream}).encode()
    return store.add(event_id, stream, topic, payload)


def fail(
    store: ContractStore,
    item_id: int,
    now: float,
    *,
    due: float,
    max_attempts: int = 10,
    retryable: bool = True,
) -> str:
    return store.mark_failed(
        item_id,
        error="boom",
        retryable=retryable,
        channel="https",
        now=now,
        next_attempt_at=due,
        max_attempts=max_attempts,
    )


class OutboxStoreContract:
    def make_store(self) -> ContractStore:
        raise NotImplementedError

    def test_claim_is_oldest_first_and_marks_sending(self) -> None:
        store = self.make_store()
        ids = [add(store, f"s{n}") for n in range(5)]
        items = store.claim(3, now=100.0)
        assert [i.id for i in items] == ids[:3]
        assert all(store.state(i) == "sending" for i in ids[:3])
        assert store.state(ids[3]) == "pending"
        assert items[0].attempts == 0 and items[0].topic == "results"
        assert json.loads(items[0].payload)["event_id"] == items[0].event_id
        assert store.depth() == {**dict.fromkeys(STATES, 0), "sending": 3, "pending": 2}
        assert [i.id for i in store.claim(10, now=100.0)] == ids[3:]

    def test_a_stream_is_claimed_in_order_and_never_past_an_undelivered_item(self) -> None:
        store = self.make_store()
        a1, b1, a2, a3, b2 = (add(store, s) for s in ("a", "b", "a", "a", "b"))
        # Consecutive items of a stream may go together, in order.
        assert [i.id for i in store.claim(10, now=0)] == [a1, b1, a2, a3, b2]
        store.mark_sent([b1, b2], channel="mqtt", now=1)
        fail(store, a1, 1, due=50)
        store.mark_sent([a3], channel="mqtt", now=1)  # a late ack does not unblock a2
        fail(store, a2, 1, due=10)
        a4 = add(store, "a")
        c1 = add(store, "c")
        # a1 is failed and not due: nothing of stream "a" may overtake it.
        assert [i.id for i in store.claim(10, now=20)] == [c1]
        assert [i.id for i in store.claim(10, now=60)] == [a1, a2, a4]

    def test_the_limit_cuts_a_stream_at_a_prefix(self) -> None:
        store = self.make_store()
        a1, a2, b1, a3 = (add(store, s) for s in ("a", "a", "b", "a"))
        assert [i.id for i in store.claim(2, now=0)] == [a1, a2]
        # b1 is due and its stream free; a3 is next in "a", which has items in sending.
        assert [i.id for i in store.claim(10, now=0)] == [b1]
        store.mark_sent([a1, a2], channel="mqtt", now=1)
        assert [i.id for i in store.claim(10, now=1)] == [a3]

    def test_sending_blocks_its_stream(self) -> None:
        store = self.make_store()
        a1 = add(store, "a")
        store.claim(10, now=0)
        a2 = add(store, "a")
        assert store.claim(10, now=0) == []
        store.mark_sent([a1], channel="mqtt", now=1)
        assert [i.id for i in store.claim(10, now=1)] == [a2]

    def test_stale_sending_becomes_failed_with_sending_timeout_and_is_due_now(self) -> None:
        store = self.make_store()
        a1 = add(store, "a")
        store.claim(10, now=1000.0)
        assert store.requeue_stale(300, now=1200.0) == 0
        assert store.state(a1) == "sending"
        assert store.requeue_stale(300, now=1301.0) == 1
        assert store.state(a1) == "failed"
        assert store.last_error(a1) == "sending_timeout"
        assert store.attempts(a1) == 1  # the lost attempt counts
        [again] = store.claim(10, now=1301.0)
        assert (again.id, again.attempts) == (a1, 1)
        log = store.dispatch_log()
        assert [(r.item_id, r.outcome, r.error, r.channel) for r in log] == [
            (a1, "timeout", "sending_timeout", None)
        ]

    def test_failed_counts_an_attempt_and_waits_for_next_attempt_at(self) -> None:
        store = self.make_store()
        a1 = add(store, "a")
        store.claim(10, now=0)
        assert fail(store, a1, 5, due=65) == "failed"
        assert (store.attempts(a1), store.last_error(a1)) == (1, "boom")
        assert store.claim(10, now=64.9) == []
        [item] = store.claim(10, now=65)
        assert item.attempts == 1

    def test_max_attempts_makes_an_item_dead(self) -> None:
        store = self.make_store()
        a1 = add(store, "a")
        states = []
        for n in range(3):
            store.claim(10, now=n * 10)
            states.append(fail(store, a1, n * 10, due=n * 10 + 1, max_attempts=3))
        assert states == ["failed", "failed", "dead"]
        assert store.attempts(a1) == 3
        assert store.claim(10, now=1e9) == []
        assert store.depth()["dead"] == 1

    def test_not_retryable_is_dead_at_once_and_dead_does_not_block_its_stream(self) -> None:
        store = self.make_store()
        a1, a2 = add(store, "a"), add(store, "a")
        store.claim(1, now=0)
        assert fail(store, a1, 1, due=2, retryable=False) == "dead"
        assert [i.id for i in store.claim(10, now=1)] == [a2]

    def test_release_returns_items_without_counting_an_attempt(self) -> None:
        store = self.make_store()
        a1, a2 = add(store, "a"), add(store, "b")
        store.claim(10, now=0)
        store.release([a1, a2], error="unreachable", channel="https", now=1, next_attempt_at=5)
        assert {store.state(a1), store.state(a2)} == {"failed"}
        assert store.attempts(a1) == 0
        assert store.claim(10, now=4) == []
        assert [i.id for i in store.claim(10, now=5)] == [a1, a2]

    def test_late_ack_after_requeue_still_marks_sent_but_never_revives_dead(self) -> None:
        store = self.make_store()
        a1, b1 = add(store, "a"), add(store, "b")
        store.claim(10, now=0)
        store.requeue_stale(10, now=100)
        store.mark_sent([a1], channel="mqtt", now=101)
        assert store.state(a1) == "sent"
        [item] = store.claim(10, now=101)
        fail(store, b1, 102, due=0, retryable=False)
        store.mark_sent([b1], channel="mqtt", now=103)
        assert store.state(b1) == "dead"
        assert fail(store, a1, 104, due=0) == "sent"  # a late failure changes nothing

    def test_every_outcome_is_a_dispatch_log_row(self) -> None:
        store = self.make_store()
        ids = [add(store, f"s{n}") for n in range(4)]
        store.claim(10, now=0)
        store.mark_sent([ids[0]], channel="mqtt", now=1)
        fail(store, ids[1], 2, due=3)
        store.mark_failed(
            ids[2],
            error="rejected:422:invalid",
            retryable=False,
            channel="https",
            now=3,
            next_attempt_at=3,
            max_attempts=10,
        )
        store.release([ids[3]], error="down", channel="mqtt", now=4, next_attempt_at=4)
        rows = [(r.item_id, r.at, r.channel, r.outcome, r.error) for r in store.dispatch_log()]
        assert rows == [
            (ids[0], 1, "mqtt", "sent", None),
            (ids[1], 2, "https", "failed", "boom"),
            (ids[2], 3, "https", "dead", "rejected:422:invalid"),
            (ids[3], 4, "mqtt", "unreachable", "down"),
        ]
