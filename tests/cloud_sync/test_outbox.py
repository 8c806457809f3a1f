"""The reference store passes the OutboxStore contract; per-stream order holds under any
interleaving of outcomes (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.outbox import MemoryOutboxStore
from tests.cloud_sync.outbox_contract import OutboxStoreContract, add


class TestMemoryOutboxStore(OutboxStoreContract):
    def make_store(self) -> MemoryOutboxStore:
        return MemoryOutboxStore()


@settings(max_examples=60, deadline=None)
@given(
    streams=st.lists(st.sampled_from("abc"), min_size=1, max_size=25),
    outcomes=st.lists(st.sampled_from(["sent", "failed", "dead", "release"]), max_size=200),
    limits=st.lists(st.integers(1, 6), min_size=1, max_size=10),
)
def test_delivery_order_within_a_stream_is_id_order(
    streams: list[str], outcomes: list[str], limits: list[int]
) -> None:
    store = MemoryOutboxStore()
    ids = {add(store, s): s for s in streams}
    delivered: list[int] = []
    now = 0.0
    steps = iter(outcomes)
    for round_no in range(60):
        now += 1
        stopped: set[str] = set()
        for item in store.claim(limits[round_no % len(limits)], now):
            # The dispatcher's half of the rule: within one claim, nothing of a stream
            # is delivered after an item of that stream was not (HTTPS batches are all
            # or nothing; MQTT keeps one client's QoS 1 messages in order).
            outcome = "release" if item.stream in stopped else next(steps, "sent")
            if outcome != "sent":
                stopped.add(item.stream)
            if outcome == "sent":
                store.mark_sent([item.id], channel="mqtt", now=now)
                delivered.append(item.id)
            elif outcome == "release":
                store.release([item.id], error="x", channel="mqtt", now=now, next_attempt_at=now)
            else:
                store.mark_failed(
                    item.id,
                    error="x",
                    retryable=outcome != "dead",
                    channel="mqtt",
                    now=now,
                    next_attempt_at=now + 1,
                    max_attempts=4,
                )
    # Every item ended sent or dead, and the sent ones of a stream went out in id order
    # (an item may be sent only once all older ones of its stream are sent or dead).
    assert store.depth()["pending"] == store.depth()["sending"] == store.depth()["failed"] == 0
    for stream in set(streams):
        mine = [i for i in delivered if ids[i] == stream]
        assert mine == sorted(mine)
