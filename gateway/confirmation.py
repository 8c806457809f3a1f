"""Start confirmation: busy inputs and relay contacts turned into started, completed, not_started.

The board link hands every input snapshot here. The machine monitor (machines.py,
pure) settles each machine's busy signal and spots relays closed while nothing drives
them; this module journals what that means for the executions: a released machine that
started (or started late, reversing a compensation), a cycle that completed, one that
never started in its confirm window, and the alerts that go with them.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from firmware_bridge.driver import InputState
from firmware_bridge.host_timed import OutputFault

from .config import GatewayConfig
from .journal import Alert, Journal, JournalUnwritable
from .lifecycle import ExecutionState
from .machines import BusyChange, MachineMonitor, StuckRelay
from .outcomes import Outcomes

__all__ = ["RELAY_SETTLE_S", "StartConfirmation"]

log = logging.getLogger(__name__)

# A relay may still be closing this long after its program's nominal end (board
# latency) before a closed contact counts as stuck.
RELAY_SETTLE_S = 0.5


class StartConfirmation:
    def __init__(
        self,
        config: GatewayConfig,
        journal: Journal,
        outcomes: Outcomes,
        *,
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._journal = journal
        self._outcomes = outcomes
        self._clock = clock
        self.monitor = MachineMonitor(list(config.machines))
        # Relay channel -> until when a program may legitimately keep it closed.
        self._driven_until: dict[int, float] = {}
        self.sampled_at = 0.0  # clock time of the last input snapshot read from the board
        self._unapplied: deque[BusyChange | StuckRelay] = deque()

    def busy(self, machine_id: str) -> bool | None:
        """The machine's settled busy signal; None when unknown or not wired."""
        return self.monitor.busy(machine_id)

    def drive(self, channel: int, duration_ms: int) -> None:
        """A program is about to drive ``channel`` for ``duration_ms``: its contact may be
        closed until then (plus the relay's settling time) without being stuck."""
        until = self._clock() + duration_ms / 1000 + RELAY_SETTLE_S
        self._driven_until[channel] = max(until, self._driven_until.get(channel, 0.0))

    def driven_until(self) -> float:
        """When the last program driving a relay ends (0 if none ever ran)."""
        return max(self._driven_until.values(), default=0.0)

    # -- board_link.InputSink ----------------------------------------------------

    def sample(self, state: InputState, now: float) -> None:
        self.sampled_at = now
        driven = {ch for ch, until in self._driven_until.items() if until > now}
        self._unapplied.extend(self.monitor.sample(state, now, driven))
        self._apply_input_changes()

    def forget(self) -> None:
        self.monitor.forget()

    def _apply_input_changes(self) -> None:
        """Journal what the inputs showed, oldest first. A change the journal cannot take
        yet waits (the not_started sweep waits with it: a start seen but not recorded
        must never turn into a compensation)."""
        try:
            while self._unapplied:
                change = self._unapplied[0]
                if isinstance(change, BusyChange):
                    self._on_busy_change(change)
                else:
                    self._on_stuck_relay(change)
                self._unapplied.popleft()
        except JournalUnwritable:
            log.warning("%d input change(s) wait for the journal", len(self._unapplied))

    def _on_busy_change(self, change: BusyChange) -> None:
        machine = self._config.machine(change.machine_id)
        assert machine is not None
        rows = self._journal.awaiting_start(machine.id)
        if change.busy:
            waiting = [r for r in rows if r.state == ExecutionState.RELEASED and r.awaits_start]
            late = [
                r
                for r in rows
                if r.state == ExecutionState.NOT_STARTED
                and r.confirm_deadline is not None
                and change.at <= r.confirm_deadline + machine.late_start_grace_s
            ]
            if waiting:
                row = waiting[-1]
                self._outcomes.finish(
                    row,
                    ExecutionState.STARTED,
                    None,
                    from_states=(ExecutionState.RELEASED,),
                    times={"started_at": change.at},
                    cycle_event={"machine_id": machine.id, "cycle": row.cycle},
                )
            elif late:
                row = late[-1]
                self._outcomes.finish(
                    row,
                    ExecutionState.STARTED,
                    "late_start",
                    from_states=(ExecutionState.NOT_STARTED,),
                    times={"started_at": change.at},
                    cycle_event={"machine_id": machine.id, "cycle": row.cycle},
                    alert=Alert(
                        "late_start",
                        "warning",
                        machine.id,
                        row.execute_key,
                        "machine started after its confirm window; compensation "
                        "already requested must be reversed",
                    ),
                )
            elif change.previous is False:
                log.warning("machine %s started without a release from this gateway", machine.id)
                self._journal.raise_alert(
                    Alert("start_without_release", "info", machine.id), now=self._clock()
                )
                self._outcomes.outbox_changed()
                self._outcomes.metrics.alert("start_without_release", "info")
        else:
            for row in rows:
                if row.state == ExecutionState.STARTED:
                    duration = change.at - (row.started_at or change.at)
                    self._outcomes.finish(
                        row,
                        ExecutionState.COMPLETED,
                        None,
                        from_states=(ExecutionState.STARTED,),
                        times={"completed_at": change.at},
                        cycle_event={
                            "machine_id": machine.id,
                            "cycle": row.cycle,
                            "duration_s": round(duration, 3),
                        },
                    )

    def output_fault(self, fault: OutputFault) -> None:
        """A host-timed driver failed a write after the release was acknowledged: the
        train may be incomplete. The start confirmation decides the execution's fate;
        people are told now."""
        machine = next((m for m in self._config.machines if m.channel == fault.channel), None)
        log.error("relay write failed on channel %d: %s", fault.channel, fault.error)
        self._outcomes.raise_alert(
            Alert(
                "relay_write_failed",
                "critical",
                machine.id if machine else None,
                detail=f"channel {fault.channel}: {type(fault.error).__name__}",
            )
        )

    def _on_stuck_relay(self, change: StuckRelay) -> None:
        if change.stuck:
            log.error(
                "relay of machine %s (channel %d) is closed while not driven",
                change.machine_id,
                change.channel,
            )
            alert = Alert(
                "stuck_relay",
                "critical",
                change.machine_id,
                detail=f"channel {change.channel} closed while not driven",
            )
        else:
            alert = Alert(
                "stuck_relay_cleared", "info", change.machine_id, detail=f"channel {change.channel}"
            )
        self._journal.raise_alert(alert, now=self._clock())
        self._outcomes.outbox_changed()
        self._outcomes.metrics.alert(alert.code, alert.severity)

    def sweep(self, now: float) -> None:
        """Released executions past their confirm window, judged on fresh readings."""
        if self._unapplied:
            return  # a start the journal has not taken yet must not read as "no start"
        for row in self._journal.awaiting_start():
            if row.state != ExecutionState.RELEASED:
                continue
            machine = self._config.machine(row.machine_id)
            if not (row.awaits_start and row.confirm_deadline and machine and machine.busy_input):
                continue
            # Judge only with a reading taken after the window closed plus the
            # debounce: after a link loss or a restart, silence is not evidence.
            settle = machine.busy_input.debounce_ms / 1000
            if (
                row.confirm_deadline + settle <= now
                and self.sampled_at >= row.confirm_deadline + settle
                and self.monitor.busy(machine.id) is not None
            ):
                self._outcomes.finish(
                    row,
                    ExecutionState.NOT_STARTED,
                    "no_start_in_confirm_window",
                    from_states=(ExecutionState.RELEASED,),
                    alert=Alert(
                        "not_started",
                        "critical",
                        row.machine_id,
                        row.execute_key,
                        "machine did not start after its release",
                    ),
                )
