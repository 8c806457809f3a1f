"""The interface the gateway core programs against, whatever moves the relay.

The serial MCU board (serial_board.SerialBoard) is the first implementation;
Modbus RTU and GPIO drivers will follow behind the same methods, and the
simulated board passes the same contract, so the executor never knows which
one it talks to. Errors are those of firmware_bridge.exceptions.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from firmware_bridge.frames import Pong, QueryReply, ReleaseAck

__all__ = ["BoardDriver"]


@runtime_checkable
class BoardDriver(Protocol):
    async def open(self) -> None:
        """Open the link; ``BoardUnavailable`` if it cannot be opened."""

    async def close(self) -> None:
        """Close the link; pending requests fail with ``BoardNoReply``."""

    @property
    def is_open(self) -> bool: ...

    async def ping(self) -> Pong: ...

    async def release(
        self, command_id: int, channel: int, pulse_count: int, on_ms: int, off_ms: int
    ) -> ReleaseAck:
        """Release ``channel`` once per ``command_id`` (the board de-duplicates).

        Raises ``BoardUnavailable`` (not sent), ``BoardNack`` (refused, did not
        act) or ``BoardNoReply`` (outcome unknown: recover with ``query``).
        """
        ...

    async def query(self, command_id: int) -> QueryReply: ...
