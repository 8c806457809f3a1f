"""cloud_sync.backoff: the one retry-delay formula of the gateway."""

from __future__ import annotations

from itertools import islice

import pytest
from tenacity import RetryCallState, Retrying

from cloud_sync.backoff import Backoff


def test_full_jitter_delays_stay_within_the_doubling_window_and_the_cap() -> None:
    backoff = Backoff(1.0, 60.0)
    for retry in range(1, 40):
        window = min(60.0, 2.0 ** (retry - 1))
        assert all(0.0 <= backoff.delay(retry) <= window for _ in range(50))
    assert max(backoff.delay(10_000) for _ in range(50)) <= 60.0  # no overflow, capped


def test_full_jitter_spreads_a_fleet_instead_of_retrying_in_step() -> None:
    draws = [Backoff(1.0, 60.0).delay(10) for _ in range(200)]
    assert len(set(draws)) > 150


def test_floor_holds_even_the_first_retry_back() -> None:
    backoff = Backoff(1.0, 60.0, floor_s=1.0)
    assert {backoff.delay(1) for _ in range(20)} == {1.0}
    assert all(backoff.delay(7) >= 1.0 for _ in range(200))


def test_without_jitter_the_delay_doubles_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 30.0, jitter=False)
    assert list(islice(backoff.delays(), 8)) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.delay(0) == backoff.delay(1) == 0.5


def test_a_new_generator_starts_over() -> None:
    backoff = Backoff(1.0, 100.0, jitter=False)
    first = backoff.delays()
    assert [next(first) for _ in range(3)] == [1.0, 2.0, 4.0]
    assert next(backoff.delays()) == 1.0


def test_the_tenacity_strategy_is_the_same_formula() -> None:
    backoff = Backoff(0.5, 5.0, jitter=False)
    state = RetryCallState(Retrying(), None, (), {})
    for retry in range(1, 10):
        state.attempt_number = retry
        assert backoff.wait(state) == backoff.delay(retry)


@pytest.mark.parametrize("args", [(0.0, 1.0), (1.0, 0.0), (1.0, 1.0, -0.1)])
def test_nonsense_parameters_are_refused(args: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        Backoff(*args)
