"""The gateway's core assembled in dependency order, from a journal and a board driver.

The daemon builds it around the MQTT session and the outbox dispatcher; the
in-process tests build the very same core around an in-memory board and a clock they
move by hand. The path of an ``execute_key``: the session hands the message to
``intake``, which journals the decision and hands it to ``dispatch``, which writes the
release through the board ``link``'s driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from cloud_sync.commands import CommandVerifier
from firmware_bridge.driver import BoardDriver
from firmware_bridge.host_timed import OutputFault

from .board_link import BoardLink
from .clock import TimePolicy
from .config import GatewayConfig
from .confirmation import RELAY_SETTLE_S, StartConfirmation
from .dispatch import Dispatch
from .intake import Availability, Intake
from .journal import Journal, JournalUnwritable
from .metrics import GatewayMetrics
from .operator import OperatorActions
from .outcomes import Outcomes

__all__ = ["Core", "DEADLINE_SWEEP_S", "STOP_WAIT_MAX_S", "build_core", "verifier_for"]

log = logging.getLogger(__name__)

# A stop waits at most this long for relay programs still running (coin trains last
# seconds; a long "enable start" hold would otherwise hold a box's shutdown for as long).
STOP_WAIT_MAX_S = 120.0

# How often the deadlines of unsettled executions are checked.
DEADLINE_SWEEP_S = 0.25


@dataclass
class Core:
    journal: Journal
    outcomes: Outcomes
    confirmation: StartConfirmation
    link: BoardLink
    dispatch: Dispatch
    intake: Intake
    operator: OperatorActions
    clock: Callable[[], float]
    metrics: GatewayMetrics
    #: The longest relay program the config holds, in seconds (settling included).
    longest_program_s: float = 0.0

    async def run(self) -> None:
        """The core's loops; cancel to stop (after :meth:`drain`)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.link.run(), name="board-link")
            tg.create_task(self.link.run_inputs(), name="board-inputs")
            tg.create_task(self.dispatch.run_recovery(), name="recovery")
            tg.create_task(self.dispatch.run(), name="dispatch")
            tg.create_task(self.run_deadlines(), name="deadlines")

    async def run_deadlines(self) -> None:
        """Deadlines nobody else watches (promise 2: never "unknown forever"): releases
        waiting for the board expire on time even if it never comes back, releases in
        doubt go to needs_review in the end, released machines that never started end
        as not_started."""
        while True:
            await asyncio.sleep(DEADLINE_SWEEP_S)
            self.sweep()

    def sweep(self) -> None:
        # A sweep the journal cannot record is simply tried again next time.
        now = self.clock()
        with contextlib.suppress(JournalUnwritable):
            self.dispatch.sweep(now)
            self.confirmation.sweep(now)

    async def drain(self, on_wait: Callable[[float], None] | None = None) -> None:
        """Clean shutdown: let the release on its way finish and be journaled, then let
        the pulse trains the board is running end (the next start's ALL_OFF would cut
        their remaining pulses, which are never made up: a paid cycle half credited).
        ``on_wait(seconds)`` is told how long that wait will be (systemd is asked for
        that much more time)."""
        await self.dispatch.drain()
        # The program's own end (not the relay's settling time the input check allows),
        # bounded by the longest program of the config should the wall clock jump.
        ends = self.confirmation.driven_until() - RELAY_SETTLE_S
        remaining = min(ends - self.clock(), self.longest_program_s)
        if remaining > STOP_WAIT_MAX_S:
            log.warning(
                "stopping: a relay program runs %.0f s more; waiting %.0f s only, the rest"
                " is cut (check the machine)",
                remaining,
                STOP_WAIT_MAX_S,
            )
            remaining = STOP_WAIT_MAX_S
        if remaining > 0:
            log.info("stopping: waiting %.1f s for the relay programs running to end", remaining)
            if on_wait is not None:
                on_wait(remaining)
            await asyncio.sleep(remaining)


def verifier_for(config: GatewayConfig) -> CommandVerifier:
    return CommandVerifier(
        config.commands.public_keys,
        config.gateway.id,
        algorithms=config.commands.algorithms,
        leeway_s=config.commands.leeway_s,
        # Older tokens may replay a cycle whose execution retention already pruned.
        max_age_s=config.outbox.retention_days * 86400,
    )


def build_core(
    config: GatewayConfig,
    journal: Journal,
    make_driver: Callable[[Callable[[OutputFault], None]], BoardDriver],
    *,
    outbox_changed: Callable[[], None],
    publish_best_effort: Callable[[str, bytes], None],
    clock: Callable[[], float],
    metrics: GatewayMetrics | None = None,
    time_policy: TimePolicy | None = None,
) -> Core:
    """``make_driver(on_fault)`` builds the board driver; host-timed drivers report
    failed relay writes to ``on_fault`` (the start confirmation's)."""
    metrics = metrics or GatewayMetrics()
    outcomes = Outcomes(
        config, journal, outbox_changed=outbox_changed, clock=clock, metrics=metrics
    )
    confirmation = StartConfirmation(config, journal, outcomes, clock=clock)
    link = BoardLink(
        config, journal, make_driver(confirmation.output_fault), outcomes, confirmation, clock=clock
    )
    dispatch = Dispatch(config, journal, link, confirmation, outcomes, clock=clock)
    intake = Intake(
        config,
        journal,
        verifier_for(config),
        Availability(journal, confirmation),
        dispatch,
        outbox_changed=outbox_changed,
        publish_best_effort=publish_best_effort,
        clock=clock,
        metrics=metrics,
        time_policy=time_policy,
    )
    operator = OperatorActions(config, journal, confirmation, dispatch, outcomes, clock=clock)
    longest = max(
        (p.train().duration_ms / 1000 for m in config.machines for p in m.cycles.values()),
        default=0.0,
    )
    return Core(
        journal,
        outcomes,
        confirmation,
        link,
        dispatch,
        intake,
        operator,
        clock,
        metrics,
        longest_program_s=longest + RELAY_SETTLE_S,
    )
