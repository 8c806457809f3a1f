"""Keeps a simulated board's time moving on an asyncio loop: ``advance`` at each deadline."""

from __future__ import annotations

import asyncio

from firmware_bridge.simulator.board import SimulatedBoard

__all__ = ["BoardTimer"]


class BoardTimer:
    """One timer armed at ``board.next_deadline()``, on the loop's clock.

    The board's times are the loop's: ``loop.time()``, which is ``time.monotonic()``
    on the default loop (what the pty program stamps its reads with). Call
    ``reschedule()`` after anything that may start a program or move a deadline
    (bytes fed, a reboot, a forced input)."""

    def __init__(self, board: SimulatedBoard, loop: asyncio.AbstractEventLoop) -> None:
        self._board = board
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None

    def reschedule(self) -> None:
        self.cancel()
        deadline = self._board.next_deadline()
        if deadline is not None:
            self._handle = self._loop.call_at(deadline, self._tick)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self._handle = None
        self._board.advance(self._loop.time())
        self.reschedule()
