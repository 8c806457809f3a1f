"""The link to the relay board: connect, learn its boot id, watch its inputs, one request at a time.

The board link owns the driver's connection and the board lock (one writer on the
serial line: releases, queries, pings and input reads take turns). It tells the rest
of the core two things: whether the board is there now (``state``), and when the
board must be asked about releases in doubt (``recovery_wanted``: at every connect and
whenever the board's boot id changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from firmware_bridge.driver import BoardDriver, InputState
from firmware_bridge.exceptions import BoardError

from .config import GatewayConfig
from .journal import Alert, Journal, JournalUnwritable
from .outcomes import Outcomes

__all__ = ["BoardLink", "InputSink", "LinkState"]

log = logging.getLogger(__name__)


@dataclass
class LinkState:
    """What the daemon knows about the board right now (shown by metalavctl status)."""

    port: str
    connected: bool = False
    boot_id: int | None = None
    last_error: str | None = None
    since: float = 0.0


class InputSink(Protocol):
    """Who reads the machines from the board's input snapshots (start confirmation)."""

    def sample(self, state: InputState, now: float) -> None: ...

    def forget(self) -> None:
        """The link is gone: what the inputs said is no longer current."""


class BoardLink:
    def __init__(
        self,
        config: GatewayConfig,
        journal: Journal,
        driver: BoardDriver,
        outcomes: Outcomes,
        inputs: InputSink,
        *,
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._journal = journal
        self.driver = driver
        self._outcomes = outcomes
        self._inputs = inputs
        self._clock = clock
        self.state = LinkState(port=config.board.port)
        self.lock = asyncio.Lock()
        self.recovery_wanted = asyncio.Event()
        self._down = asyncio.Event()
        self._down.set()
        self._started_up = False  # outputs are forced off once, at the first connect
        #: ``time.monotonic()`` of the input poll's last round (the systemd watchdog
        #: stops its pings when the board supervision stops ticking; supervision.py).
        self.ticked_at = time.monotonic()
        #: Set once the first connect was tried, whatever came of it (READY=1 waits).
        self.tried = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self.state.connected

    @property
    def poll_period_s(self) -> float:
        # Busy inputs need fast sampling (start confirmation, debounce); without any,
        # the poll only watches relay contacts and the boot id, and a health-check pace
        # keeps the serial line free for releases.
        board = self._config.board
        wired = any(m.busy_input for m in self._config.machines)
        return board.poll_ms / 1000 if wired else board.health_ping_s

    @property
    def tick_allowance_s(self) -> float:
        """How long the input poll may go without a tick and still be healthy: its
        period, plus what it may wait for under the board lock (a release and a query
        with all their retries) and a reconnect."""
        board = self._config.board
        exchange_s = board.ack_timeout_s * (board.max_retries + 1)
        return self.poll_period_s + board.reconnect_s + 2 * exchange_s

    def lost(self, error: str) -> None:
        """The board stopped answering, or its port went away."""
        if self.state.connected:
            log.error("board link lost: %s", error)
            self._outcomes.raise_alert(Alert("board_link_lost", "critical", detail=error[:160]))
            self._inputs.forget()
        self.state.connected = False
        self.state.last_error = error
        self.state.since = self._clock()
        self._down.set()

    async def drop(self, error: str) -> None:
        """Lost, and the port closed: the next connect opens it afresh."""
        self.lost(error)
        await self.driver.close()

    async def run(self) -> None:
        """Keep the link up: connect, and connect again whenever it is lost."""
        while True:
            if self.state.connected:
                await self._down.wait()
                continue
            connected = await self._connect()
            self.tried.set()
            if not connected:
                await asyncio.sleep(self._config.board.reconnect_s)

    async def run_inputs(self) -> None:
        """Sample the board's inputs: busy signals (start confirmation, completion),
        sensed relay contacts (stuck relays), and the boot id (board resets)."""
        period = self.poll_period_s
        while True:
            await asyncio.sleep(period)
            self.ticked_at = time.monotonic()
            if not self.state.connected:
                continue
            try:
                async with self.lock:
                    snapshot = await self.driver.read_inputs()
            except BoardError as exc:
                await self.drop(str(exc))
                continue
            self.ticked_at = time.monotonic()
            if snapshot.boot_id != self.state.boot_id:
                self._up(snapshot.boot_id)
            self._inputs.sample(snapshot, self._clock())

    async def _connect(self) -> bool:
        try:
            if not self.driver.is_open:
                await self.driver.open()
            async with self.lock:
                pong = await self.driver.ping()
                if not self._started_up:
                    # Contacts open before any command is taken (a previous process
                    # may have died with a relay closed).
                    await self.driver.all_off()
        except BoardError as exc:
            self.lost(str(exc))
            await self.driver.close()
            return False
        self._started_up = True
        self._up(pong.boot_id)
        return True

    def _up(self, boot_id: int) -> None:
        """The board answers, from boot ``boot_id``: ask it about releases in doubt."""
        now = self._clock()
        previous = self._journal.board_value("boot_id")
        alerts = []
        if self.state.last_error is not None and self.state.since:
            alerts.append(Alert("board_link_restored", "info", detail=f"boot id {boot_id:08x}"))
        if previous is not None and int(previous, 16) != boot_id:
            log.warning("board rebooted: boot id %s -> %08x", previous, boot_id)
            alerts.append(
                Alert("board_rebooted", "warning", detail=f"boot id {previous} -> {boot_id:08x}")
            )
        if previous is None or int(previous, 16) != boot_id:
            # Only feeds the "board rebooted" alert: not worth stopping for.
            with contextlib.suppress(JournalUnwritable):
                self._journal.set_board_value("boot_id", f"{boot_id:08x}")
        for alert in alerts:
            self._outcomes.raise_alert(alert)
        self.state.connected = True
        self.state.boot_id = boot_id
        self.state.last_error = None
        self.state.since = now
        self._down.clear()
        self.recovery_wanted.set()
        log.info("board link up, boot id %08x", boot_id)
