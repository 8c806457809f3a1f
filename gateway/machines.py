"""What the machines are doing, read from the board's inputs: pure logic, no I/O.

Start confirmation (confirmation.py) feeds it input snapshots; it answers with
changes worth acting on: a machine's busy signal settled to a new level (after its
debounce), or a relay contact found closed while nothing is driving it (a stuck
relay). What that means for the executions is confirmation.py's business.
"""

from __future__ import annotations

from dataclasses import dataclass

from firmware_bridge.driver import InputState

from .config import Machine

__all__ = ["BusyChange", "MachineMonitor", "StuckRelay"]


@dataclass(frozen=True)
class BusyChange:
    machine_id: str
    busy: bool
    previous: bool | None  # None: first settled reading since the daemon started
    at: float  # when the new level began (the debounce started), not when it settled


@dataclass(frozen=True)
class StuckRelay:
    machine_id: str
    channel: int
    stuck: bool  # True: closed while it should be open; False: back to normal


@dataclass
class _View:
    machine: Machine
    busy: bool | None = None
    candidate: bool | None = None
    candidate_since: float = 0.0
    stuck: bool = False


class MachineMonitor:
    def __init__(self, machines: list[Machine]) -> None:
        self._views = {m.id: _View(m) for m in machines}

    def busy(self, machine_id: str) -> bool | None:
        """The debounced busy level; None when unknown (no busy input, or no reading yet)."""
        view = self._views.get(machine_id)
        return None if view is None else view.busy

    def stuck(self, machine_id: str) -> bool:
        view = self._views.get(machine_id)
        return bool(view and view.stuck)

    def sample(
        self, state: InputState, now: float, driven: set[int]
    ) -> list[BusyChange | StuckRelay]:
        """Feed one snapshot. ``driven``: relay channels a program may be closing now."""
        changes: list[BusyChange | StuckRelay] = []
        for view in self._views.values():
            m = view.machine
            if m.busy_input is not None:
                level = bool(state.inputs >> (m.busy_input.input - 1) & 1)
                active = level if m.busy_input.active == "high" else not level
                if active != view.candidate:
                    view.candidate, view.candidate_since = active, now
                settled = now - view.candidate_since >= m.busy_input.debounce_ms / 1000
                if settled and view.candidate != view.busy:
                    changes.append(BusyChange(m.id, active, view.busy, view.candidate_since))
                    view.busy = active
            if state.relays is not None:
                closed = bool(state.relays >> (m.channel - 1) & 1)
                stuck = closed and m.channel not in driven
                if stuck != view.stuck:
                    view.stuck = stuck
                    changes.append(StuckRelay(m.id, m.channel, stuck))
        return changes

    def forget(self) -> None:
        """The board link was lost: debouncing starts over; a level that changed
        meanwhile is reported once it settles."""
        for view in self._views.values():
            view.candidate = None
