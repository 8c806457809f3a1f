"""The busy-signal debounce and stuck-relay detection, as pure logic."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from firmware_bridge.driver import InputState
from gateway.config import Machine
from gateway.machines import BusyChange, MachineMonitor, StuckRelay


def machine(active: str = "high", debounce_ms: int = 200) -> Machine:
    return Machine.model_validate(
        {
            "id": "W1",
            "kind": "washer",
            "channel": 3,
            "busy_input": {"input": 2, "active": active, "debounce_ms": debounce_ms},
            "cycles": {"normal": {"pulses": 1}},
        }
    )


def snap(input2: bool, relay3: bool | None = None) -> InputState:
    relays = None if relay3 is None else (int(relay3) << 2)
    return InputState(boot_id=1, inputs=int(input2) << 1, relays=relays)


def test_a_glitch_shorter_than_the_debounce_is_not_a_start() -> None:
    monitor = MachineMonitor([machine()])
    assert monitor.sample(snap(False), 0.0, set()) == []  # the first level is debounced too
    assert monitor.sample(snap(False), 0.3, set()) == [BusyChange("W1", False, None, 0.0)]
    assert monitor.sample(snap(True), 1.0, set()) == []
    assert monitor.sample(snap(False), 1.1, set()) == []  # 100 ms blip
    assert monitor.sample(snap(False), 2.0, set()) == []
    assert monitor.busy("W1") is False


def test_a_level_held_past_the_debounce_is_reported_with_its_start_time() -> None:
    monitor = MachineMonitor([machine()])
    monitor.sample(snap(False), 0.0, set())
    monitor.sample(snap(False), 0.3, set())
    assert monitor.sample(snap(True), 1.0, set()) == []
    assert monitor.sample(snap(True), 1.25, set()) == [BusyChange("W1", True, False, 1.0)]
    assert monitor.busy("W1") is True


def test_active_low_inputs_are_inverted() -> None:
    monitor = MachineMonitor([machine(active="low", debounce_ms=0)])
    assert monitor.sample(snap(False), 0.0, set()) == [BusyChange("W1", True, None, 0.0)]


def test_a_closed_contact_is_stuck_only_when_nothing_drives_it() -> None:
    monitor = MachineMonitor([machine(debounce_ms=0)])
    monitor.sample(snap(False, relay3=False), 0.0, set())
    assert monitor.sample(snap(False, relay3=True), 0.1, {3}) == []  # a pulse train
    assert monitor.sample(snap(False, relay3=True), 0.5, set()) == [StuckRelay("W1", 3, True)]
    assert monitor.stuck("W1")
    assert monitor.sample(snap(False, relay3=False), 0.6, set()) == [StuckRelay("W1", 3, False)]


@given(st.lists(st.tuples(st.booleans(), st.floats(0.001, 0.5)), max_size=60))
def test_reported_changes_alternate_and_match_the_debounced_level(
    steps: list[tuple[bool, float]],
) -> None:
    monitor = MachineMonitor([machine(debounce_ms=200)])
    now, reported = 0.0, []
    for level, dt in steps:
        now += dt
        reported += [
            c.busy for c in monitor.sample(snap(level), now, set()) if isinstance(c, BusyChange)
        ]
    assert all(a != b for a, b in zip(reported, reported[1:], strict=False))
    assert monitor.busy("W1") == (reported[-1] if reported else None)
