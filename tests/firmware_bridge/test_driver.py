"""driver.ring_vouches against a model of the board's ring (docs "Execution count")."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge.driver import ring_vouches

IN_DOUBT = 0  # the command id whose QUERY answer the host must judge


class RingModel:
    """The board's de-duplication ring and execution count, nothing else: an id in
    the ring is a duplicate; any other id is recorded (dropping the oldest when
    full), counted and executed - also one executed before and since forgotten."""

    def __init__(self, ring_size: int) -> None:
        self.ring: deque[int] = deque(maxlen=ring_size)
        self.exec_count = 0
        self.executions: list[int] = []

    def release(self, command_id: int) -> None:
        if command_id in self.ring:
            return
        self.ring.append(command_id)
        self.exec_count += 1
        self.executions.append(command_id)

    def query(self, command_id: int) -> tuple[bool, int]:
        return command_id in self.ring, self.exec_count


def vouches(board: RingModel, dispatch_exec_count: int, ring_size: int) -> bool:
    executed, count = board.query(IN_DOUBT)
    assert not executed, "ring_vouches judges only 'not executed' answers"
    return ring_vouches(
        reply_exec_count=count, dispatch_exec_count=dispatch_exec_count, ring_size=ring_size
    )


history = st.lists(st.integers(1, 12), max_size=30)  # other paid cycles, repeats included


@settings(max_examples=500, deadline=None)
@given(
    ring_size=st.integers(1, 8),
    before=history,
    known_at=st.integers(0, 30),
    after=st.lists(st.integers(IN_DOUBT, 12), max_size=40),
)
def test_ring_vouches_only_for_a_command_that_never_ran(
    ring_size: int, before: list[int], known_at: int, after: list[int]
) -> None:
    board = RingModel(ring_size)
    counts_seen = [board.exec_count]
    for command_id in before:
        board.release(command_id)
        counts_seen.append(board.exec_count)
    # Any count the host saw in this boot before it sent the command in doubt.
    dispatch_exec_count = counts_seen[min(known_at, len(counts_seen) - 1)]
    for command_id in after:  # the command in doubt may be among these, even twice
        board.release(command_id)
    executed, _ = board.query(IN_DOUBT)
    if not executed and vouches(board, dispatch_exec_count, ring_size):
        assert IN_DOUBT not in board.executions


@settings(max_examples=300, deadline=None)
@given(ring_size=st.integers(1, 8), before=history, after=history)
def test_ring_vouches_whenever_the_ring_covers_everything_since_dispatch(
    ring_size: int, before: list[int], after: list[int]
) -> None:
    # Not vacuous, and no more cautious than the ring: the command never ran, and
    # the rule says so exactly when at most ring_size commands ran since dispatch.
    board = RingModel(ring_size)
    for command_id in before:
        board.release(command_id)
    dispatch_exec_count = board.exec_count
    for command_id in after:
        board.release(command_id)
    covered = board.exec_count - dispatch_exec_count <= ring_size
    assert vouches(board, dispatch_exec_count, ring_size) is covered


def test_one_release_beyond_the_ring_is_enough_to_forget() -> None:
    # Issue 7 in miniature: the release ran (its journal write failed), then
    # ring_size others; "not executed" now is a forgotten id, not a lost frame.
    board = RingModel(4)
    board.release(IN_DOUBT)
    for command_id in range(1, 5):
        board.release(command_id)
    assert board.query(IN_DOUBT) == (False, 5)
    assert not vouches(board, dispatch_exec_count=0, ring_size=4)
    assert IN_DOUBT in board.executions
    assert ring_vouches(reply_exec_count=4, dispatch_exec_count=0, ring_size=4)


@pytest.mark.parametrize(
    ("reply", "dispatch", "ring_size"),
    [
        (None, 3, 32),  # firmware <= 1.1 in the reply
        (3, None, 32),  # no count seen in this boot before the release
        (3, 3, None),  # ring size unknown (no PONG in this boot)
        (None, None, None),
        (2, 3, 32),  # the count went backwards: not a board to believe
        (3, 3, 0),  # a ring that holds nothing
    ],
)
def test_ring_cannot_vouch_without_counts_it_can_believe(
    reply: int | None, dispatch: int | None, ring_size: int | None
) -> None:
    assert not ring_vouches(
        reply_exec_count=reply, dispatch_exec_count=dispatch, ring_size=ring_size
    )
