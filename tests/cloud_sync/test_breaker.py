"""The circuit breaker: closed -> open after N failures, half-open probes after the
reset timeout, closed again on a good probe; manual reset; status."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.breaker import CircuitBreaker


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_consecutive_failures_and_refuses_calls() -> None:
    clock = FakeClock()
    b = CircuitBreaker("https_events", failure_threshold=3, reset_timeout_s=30, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.state == "closed"
    b.record_success()  # consecutive failures only
    for _ in range(3):
        assert b.allow()
        b.record_failure()
    assert b.state == "open"
    assert not b.allow()
    assert b.status() == {
        "name": "https_events",
        "state": "open",
        "failures": 3,
        "opened_at": 1000.0,
        "next_probe_at": 1030.0,
    }


def test_half_open_lets_a_limited_number_of_probes_through() -> None:
    clock = FakeClock()
    b = CircuitBreaker(
        "mqtt", failure_threshold=1, reset_timeout_s=30, half_open_max_calls=2, clock=clock
    )
    b.record_failure()
    clock.now += 29.9
    assert not b.allow()
    clock.now += 0.1
    assert b.state == "half_open"
    assert b.allow() and b.allow()
    assert not b.allow()
    b.cancel()  # a probe that did not happen gives its slot back
    assert b.allow()


def test_failed_probe_reopens_for_another_timeout_and_good_probe_closes() -> None:
    clock = FakeClock()
    b = CircuitBreaker("x", failure_threshold=2, reset_timeout_s=10, clock=clock)
    b.record_failure()
    b.record_failure()
    clock.now += 10
    assert b.allow()
    b.record_failure()
    assert b.state == "open"
    assert b.status()["opened_at"] == clock.now
    clock.now += 10
    assert b.allow()
    b.record_success()
    assert b.status()["state"] == "closed"
    assert b.status()["failures"] == 0
    assert b.status()["next_probe_at"] is None


def test_manual_reset_closes_an_open_breaker() -> None:
    b = CircuitBreaker("x", failure_threshold=1, reset_timeout_s=3600, clock=FakeClock())
    b.record_failure()
    assert not b.allow()
    b.reset()
    assert b.allow()
    assert b.state == "closed"


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", failure_threshold=0)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(["ok", "fail", "tick"]), st.floats(0, 20))),
    threshold=st.integers(1, 5),
)
def test_never_more_calls_than_allowed_while_not_closed(
    ops: list[tuple[str, float]], threshold: int
) -> None:
    clock = FakeClock()
    b = CircuitBreaker("x", failure_threshold=threshold, reset_timeout_s=10, clock=clock)
    in_flight_probe = False
    for op, dt in ops:
        if op == "tick":
            clock.now += dt
            continue
        state = b.state
        allowed = b.allow()
        if state == "open":
            assert not allowed
        if state == "half_open":
            assert allowed != in_flight_probe
            in_flight_probe = allowed or in_flight_probe
        if allowed:
            if op == "ok":
                b.record_success()
                in_flight_probe = False
                assert b.state == "closed"
            else:
                b.record_failure()
                if state == "half_open":
                    in_flight_probe = False
                    assert b.status()["state"] in ("open", "half_open")
