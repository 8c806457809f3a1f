"""Every interleaving of crash, failed write, board reset and lost frame: the model
(tests/model/release_model.py) in a short profile, plus the counterexamples it found."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings

from .mutants import MUTANTS
from .release_model import ReleaseModel

# The long profile (tens of thousands of steps) is scripts/model-check.sh.
TestReleaseModel = ReleaseModel.TestCase
TestReleaseModel.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# Counterexamples, each the shortest story of one fix the model guards: it passes as the
# code is, and fails with the fix reverted (tests/model/mutants.py).


def _ring_forgets_a_release_whose_outcome_was_not_journaled(m: ReleaseModel) -> None:
    m.journal_fails(label="transition:released")
    m.command(key="k1", machine="M1")
    m.real_time_passes(ms=30)  # released on the board; the commit failed; held
    m.crash_and_restart()  # the held answer is lost; k1 is the first unsettled release
    m.journal_heals()
    m.foreign_releases(n=4)  # the board's ring (3) moves past k1
    m.real_time_passes(ms=40)  # recovery asks: "not executed", same boot


def _board_resets_while_a_release_is_unjournaled(m: ReleaseModel) -> None:
    m.journal_fails(label="transition:released")
    m.command(key="k1", machine="M1")
    m.real_time_passes(ms=30)
    m.crash_and_restart()
    m.journal_heals()
    m.board_resets()  # the ring that could tell is gone
    m.real_time_passes(ms=40)


def _the_same_command_twice(m: ReleaseModel) -> None:
    m.command(key="k1", machine="M1")
    m.real_time_passes(ms=30)
    m.command(key="k1", machine="M1")
    m.real_time_passes(ms=30)


def _ack_lost_then_the_board_resets(m: ReleaseModel) -> None:
    m.frames_lost(n=1, towards_board=False)  # the RELEASE_ACK will be lost
    m.command(key="k1", machine="M1")
    m.core_steps(steps=6)  # the release reaches the board, which acts
    m.board_resets()
    m.real_time_passes(ms=40)  # the driver times out waiting for the ack


COUNTEREXAMPLES = {
    "ring_check_removed": _ring_forgets_a_release_whose_outcome_was_not_journaled,
    "resend_after_board_reset": _board_resets_while_a_release_is_unjournaled,
    "duplicate_check_removed": _the_same_command_twice,
    "blind_retransmit": _ack_lost_then_the_board_resets,
}


def _play(story: Callable[[ReleaseModel], None]) -> None:
    m = ReleaseModel()
    try:
        m.boot()
        story(m)
        m.never_twice()
        m.acknowledged_means_durable()
        m.outcomes_tell_the_truth()
    finally:
        m.teardown()


@pytest.mark.parametrize("fix", sorted(COUNTEREXAMPLES))
def test_counterexample_holds_with_the_fix(fix: str) -> None:
    _play(COUNTEREXAMPLES[fix])


@pytest.mark.parametrize("fix", sorted(COUNTEREXAMPLES))
def test_counterexample_breaks_a_promise_without_the_fix(fix: str) -> None:
    with MUTANTS[fix](), pytest.raises(Exception) as broken:  # noqa: PT011 - any promise
        _play(COUNTEREXAMPLES[fix])
    assert not isinstance(broken.value, pytest.skip.Exception)
