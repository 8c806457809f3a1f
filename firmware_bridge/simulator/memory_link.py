"""The simulated board on an in-memory serial link, in the host's own event loop.

``MemoryLink.connect`` is a ``serial_board.Connector``: ``SerialBoard(name,
connect=link.connect)`` talks to a ``SimulatedBoard`` through the real driver
(sequencing, retransmission, QUERY after a lost ACK, link loss) with no pty, no
process and no thread, so the gateway core can be tested in process. Bytes cross
the link as they would a wire: asynchronously (``loop.call_soon``), the replies
after ``delay`` seconds when one is given; lost and corrupted frames come from the
board's own ``Faults``. The link keeps what the board did (``actuations``,
``edges``), resets the board (``reset``) and pulls or plugs back the cable.

    link = MemoryLink(SimulatedBoard(channels=4, time_scale=1.0))
    board = SerialBoard("sim", connect=link.connect)
    await board.open()
    await board.release(0xC0FFEE, 1, PulseTrain(1, 60, 80))
    assert [a.command_id for a in link.actuations] == [0xC0FFEE]
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from typing import Any

from firmware_bridge.simulator.board import SimulatedBoard
from firmware_bridge.simulator.records import Actuation, Edge
from firmware_bridge.simulator.timer import BoardTimer

__all__ = ["MemoryLink"]


class MemoryLink:
    """A ``SimulatedBoard`` at the far end of an in-memory serial cable.

    One host at a time, like a serial port opened exclusively: a second ``connect``
    while one is open fails with ``OSError(EBUSY)``. The board lives as long as the
    link, across the hosts that connect to it and the event loops they run in; its
    timers run on the loop of the latest connection."""

    def __init__(self, board: SimulatedBoard | None = None, *, delay: float = 0.0) -> None:
        if delay < 0:
            raise ValueError("delay must be >= 0")
        self.board = board if board is not None else SimulatedBoard()
        self.delay = delay
        self._actuations: list[Actuation] = []
        self._edges: list[Edge] = []
        self.board.subscribe(on_actuation=self._actuations.append, on_edge=self._edges.append)
        self._host: _HostEnd | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: BoardTimer | None = None
        self._plugged = True
        #: Lose the next N writes of the host before the board reads them, and the next
        #: N replies of the board before the host reads them (a test's precise noise,
        #: beside the board's random ``Faults``).
        self.lose_to_board = 0
        self.lose_to_host = 0
        #: Told of every write of the host, lost or not (what may have reached the board).
        self.on_host_write: Callable[[bytes], None] | None = None

    @property
    def actuations(self) -> list[Actuation]:
        """Every release the board executed since the link was made, in order."""
        return list(self._actuations)

    @property
    def edges(self) -> list[Edge]:
        """Every relay edge the board switched since the link was made, in order."""
        return list(self._edges)

    @property
    def connected(self) -> bool:
        return self._host is not None

    async def connect(self, protocol_factory: Callable[[], asyncio.Protocol]) -> asyncio.Transport:
        """Open the host's end of the cable (a ``serial_board.Connector``)."""
        if not self._plugged:
            raise OSError(errno.ENOENT, "the in-memory serial link is unplugged")
        if self._host is not None:
            raise OSError(errno.EBUSY, "the in-memory serial link already has a host")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new loop (asyncio.run per test): the old one's timer is gone with it.
            if self._timer is not None:
                self._timer.cancel()
            self._loop, self._timer = loop, BoardTimer(self.board, loop)
        self._catch_up()
        protocol = protocol_factory()
        host = _HostEnd(self, protocol, loop)
        self._host = host
        protocol.connection_made(host)
        return host

    def reset(self) -> int:
        """Reset the board as its reset button would: outputs off, a new boot id, the
        ring of command ids and the execution count cleared. Returns the new boot id."""
        boot_id = self.board.reboot(self._now())
        self._reschedule()
        return boot_id

    def unplug(self) -> None:
        """Pull the cable: the host's link is lost (its pending requests fail), the
        board loses power (a reset), and ``connect`` fails until ``plug``."""
        if not self._plugged:
            return
        self._plugged = False
        if self._host is not None:
            self._host._lose(OSError(errno.EIO, "the in-memory serial link was unplugged"))
        self.reset()

    def plug(self) -> None:
        """Plug the cable back: the board powers up (already with a new boot id)."""
        self._plugged = True

    # --- the wire ------------------------------------------------------------

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    def _catch_up(self) -> None:
        self.board.advance(self._now())
        self._reschedule()

    def _reschedule(self) -> None:
        if self._timer is not None:
            self._timer.reschedule()

    def _board_receives(self, data: bytes) -> None:
        if self.on_host_write is not None:
            self.on_host_write(data)
        if not self._plugged or self._loop is None:
            return  # into a pulled cable: lost
        if self.lose_to_board > 0:
            self.lose_to_board -= 1
            return
        now = self._loop.time()
        reply = self.board.feed(data, now)
        if reply and self.lose_to_host > 0:
            self.lose_to_host -= 1
            reply = b""
        if reply and self._host is not None:
            host = self._host
            if self.delay > 0:
                self._loop.call_later(self.delay, host._receive, reply)
            else:
                self._loop.call_soon(host._receive, reply)
        self._catch_up()

    def _host_closed(self, host: _HostEnd) -> None:
        if self._host is host:
            self._host = None


class _HostEnd(asyncio.Transport):
    """The host's end of the cable, as the transport ``SerialBoard`` writes to. Nothing
    is buffered, so writing never pauses and a drain never waits."""

    def __init__(
        self, link: MemoryLink, protocol: asyncio.Protocol, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(extra={"link": link})
        self._link = link
        self._protocol = protocol
        self._loop = loop
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        if self._closing or not data:
            return  # asyncio's transports also drop writes after close()
        self._loop.call_soon(self._link._board_receives, bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._lose(None)

    def abort(self) -> None:
        self._lose(None)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # nothing is ever buffered

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)

    def can_write_eof(self) -> bool:
        return False

    def is_reading(self) -> bool:
        return not self._closing

    def _receive(self, data: bytes) -> None:
        if not self._closing:  # bytes reaching a closed port are lost
            self._protocol.data_received(data)

    def _lose(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        self._link._host_closed(self)
        self._loop.call_soon(self._protocol.connection_lost, exc)
