"""Host side of protocol v1 over a serial port (pyserial-asyncio-fast).

The codec is frames.py; this module only adds what needs I/O and time: one
request in flight, retransmission of the identical frame on ACK_TIMEOUT (never
for a release: QUERY first, see SerialBoard.release), and
the translation of link failures into the three outcomes the gateway acts on
(exceptions.py): not sent, refused, unknown. See docs/firmware-protocol.md
"Host behaviour".

The port is opened through a connector, injected like httpx's transports: by default
pyserial-asyncio-fast's serial connection; ``simulator.memory_link.MemoryLink.connect``
puts the simulated board at the other end in this same event loop instead, so
everything above the port is tested in process, through this very driver.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias, TypeVar

import serial  # type: ignore[import-untyped]  # no stubs; types-pyserial not a dependency
import serial_asyncio_fast

from firmware_bridge.driver import (
    BoardDriver,
    InputState,
    LevelHold,
    Program,
    PulseTrain,
    ring_vouches,
)
from firmware_bridge.exceptions import (
    BoardNack,
    BoardNoReply,
    BoardUnavailable,
    ProtocolError,
)
from firmware_bridge.frames import (
    AllOff,
    AllOffAck,
    Frame,
    FrameDecoder,
    Inputs,
    Message,
    Nack,
    Ping,
    Pong,
    Query,
    QueryReply,
    ReadInputs,
    Release,
    ReleaseAck,
    ReleaseLevel,
    decode,
    encode,
)

__all__ = ["ACK_TIMEOUT", "MAX_RETRIES", "Connector", "SerialBoard"]

LOGGER = logging.getLogger(__name__)

# "Host behaviour": wait this long for the reply carrying the request's SEQ ...
ACK_TIMEOUT = 0.25
# ... then retransmit the identical frame (same SEQ) up to this many times.
MAX_RETRIES = 3

_Reply = TypeVar("_Reply", Pong, ReleaseAck, QueryReply, AllOffAck, Inputs)
_BoardReply = Pong | ReleaseAck | QueryReply | AllOffAck | Inputs | Nack  # all carry boot_id

# Opens the link and returns its transport, calling the protocol factory once; an
# OSError (or serial.SerialException, ValueError) means the port could not be opened.
Connector: TypeAlias = Callable[[Callable[[], asyncio.Protocol]], Awaitable[asyncio.Transport]]


@dataclass
class _Pending:
    request: Message
    reply_type: type[Message]
    future: asyncio.Future[Message]


class _Link(asyncio.Protocol):
    """One open port. A fresh instance per open(), so a late connection_lost of
    an old port can never close the new one."""

    def __init__(self, board: SerialBoard) -> None:
        self._board = board
        self._decoder = FrameDecoder()
        self.lost = asyncio.get_running_loop().create_future()
        self._drained: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        for frame in self._decoder.feed(data):
            self._board._frame_received(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._board._link_lost(self, exc)

    # Flow control with a zero high-water mark: paused means "bytes still
    # buffered in the transport", so drain() waits until all reached the port.
    def pause_writing(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self) -> None:
        if self._drained is not None:
            await self._drained


class SerialBoard:
    """The relay MCU board on a serial port. Satisfies ``driver.BoardDriver``.

    One owner per bus: the port is opened with an exclusive ``flock`` (pyserial's
    ``exclusive=True``), so a second SerialBoard, in this process or another, on
    the same port fails to open with ``BoardUnavailable`` instead of interleaving
    its frames with ours. (flock is advisory: it keeps out cooperating programs,
    i.e. every pyserial user that asks for exclusivity.)

    ``connect`` replaces the serial port with another link (see ``Connector``);
    ``port`` then only names it in messages and logs.
    """

    def __init__(
        self,
        port: str,
        *,
        baudrate: int = 115200,
        ack_timeout: float = ACK_TIMEOUT,
        max_retries: int = MAX_RETRIES,
        connect: Connector | None = None,
    ) -> None:
        self.port = port
        self._baudrate = baudrate
        self._connect = connect if connect is not None else self._open_serial
        self._ack_timeout = ack_timeout
        self._max_retries = max_retries
        self._transport: asyncio.Transport | None = None
        self._link: _Link | None = None
        self._pending: dict[int, _Pending] = {}
        self._lock = asyncio.Lock()  # "Sequencing": one request in flight
        # The board's boot id from its last reply (any type); None until one came.
        self._boot_id: int | None = None
        # Of that boot (firmware 1.2): the latest execution count and the ring size
        # from PONG; None while unknown ("Host behaviour", "Boot id tracking").
        self._exec_count: int | None = None
        self._ring_size: int | None = None
        # A random start makes a late reply to a previous process unlikely to match.
        self._seq = random.randrange(256)

    def __repr__(self) -> str:
        return f"SerialBoard({self.port!r}, open={self.is_open})"

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    @property
    def boot_id(self) -> int | None:
        """The boot id of the board's latest reply; None before any."""
        return self._boot_id

    @property
    def exec_count(self) -> int | None:
        """The latest execution count the board reported in its current boot; None
        until one came (firmware <= 1.1 never sends one) or since the boot id changed."""
        return self._exec_count

    @property
    def ring_size(self) -> int | None:
        """How many command ids the board's ring holds, from a PONG of its current
        boot; None until then, or from firmware <= 1.1."""
        return self._ring_size

    async def open(self) -> None:
        if self.is_open:
            return
        link = _Link(self)
        try:
            transport = await self._connect(lambda: link)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise BoardUnavailable(f"cannot open {self.port}: {exc}") from exc
        transport.set_write_buffer_limits(high=0)  # see _Link.pause_writing
        self._transport, self._link = transport, link
        LOGGER.info("opened board port %s", self.port)

    async def _open_serial(
        self, protocol_factory: Callable[[], asyncio.Protocol]
    ) -> asyncio.Transport:
        """The default connector: the serial port, exclusively (see the class)."""
        transport, _ = await serial_asyncio_fast.create_serial_connection(
            asyncio.get_running_loop(),
            protocol_factory,
            self.port,
            baudrate=self._baudrate,
            exclusive=True,
        )
        return transport

    async def close(self) -> None:
        transport, link = self._transport, self._link
        if transport is None or link is None:
            return
        transport.close()
        await link.lost

    async def ping(self) -> Pong:
        return await self._request(Ping(), Pong)

    async def release(self, command_id: int, channel: int, program: Program) -> ReleaseAck:
        """PulseTrain -> RELEASE, LevelHold -> RELEASE_LEVEL. Limits are the
        board's to check (NACK bad_params); a value that does not even fit its
        field raises ``ProtocolError`` before anything is sent.

        A release is never retransmitted blindly: the board de-duplicates only
        within one boot, so a copy reaching a board that acted and then reset
        before its ACK would pulse again. On ACK timeout the host asks QUERY
        (docs/firmware-protocol.md "Host behaviour") and re-sends only when the
        same boot says "not executed" and, when the board has reported its ring
        size and a count before the first send, ``ring_vouches`` confirms it."""
        request: Release | ReleaseLevel
        if isinstance(program, PulseTrain):
            request = Release(command_id, channel, program.count, program.on_ms, program.off_ms)
        elif isinstance(program, LevelHold):
            request = ReleaseLevel(command_id, channel, program.hold_ms)
        else:
            raise TypeError(f"not a Program: {program!r}")
        encode(request, 0)  # ProtocolError before anything is sent
        async with self._lock:
            known_boot = self._boot_id  # None: conservative, see below
            known_count = self._exec_count  # of known_boot, before the first send
            for attempt in range(1 + self._max_retries):
                ack = await self._exchange(request, ReleaseAck, 1, written_before=attempt > 0)
                if ack is not None:
                    return ack
                LOGGER.warning(
                    "no ack to %s command_id=%016x on %s (attempt %d of %d); querying",
                    type(request).__name__, command_id, self.port, attempt + 1,
                    1 + self._max_retries,
                )
                try:
                    reply = await self._exchange(
                        Query(command_id), QueryReply, 1 + self._max_retries, written_before=True
                    )
                except BoardNack as exc:  # the QUERY was refused; the release is still unknown
                    raise BoardNoReply(
                        f"QUERY after an unacknowledged release refused: {exc}"
                    ) from exc
                if reply is None:
                    raise BoardNoReply(
                        f"no reply to {type(request).__name__} command_id={command_id:016x} "
                        "nor to its QUERY"
                    )
                if known_boot is not None and reply.boot_id != known_boot:
                    raise BoardNoReply(
                        "board reset while a release was unacknowledged; outcome unknown"
                    )
                if reply.executed:  # it acted once (in this boot); never send again
                    return ReleaseAck(reply.boot_id, command_id, True, reply.exec_count)
                if known_boot is None:
                    # Sent without a known boot id: "not executed" may mean lost on
                    # the wire or acted-then-reset; only a human can tell.
                    raise BoardNoReply(
                        "release unacknowledged and the board's boot id before it is "
                        "unknown; outcome unknown"
                    )
                # We held the link since the first send, so no other release could
                # push the id out of the ring; still, where the board gave us all
                # the rule needs, the one rule every caller uses must agree (belt
                # and braces). Without them (firmware <= 1.1, no count before the
                # send, no PONG in this boot) the held link alone decides, as before.
                if (
                    known_count is not None
                    and reply.exec_count is not None
                    and self._ring_size is not None
                    and not ring_vouches(
                        reply_exec_count=reply.exec_count,
                        dispatch_exec_count=known_count,
                        ring_size=self._ring_size,
                    )
                ):
                    raise BoardNoReply(
                        f"release unacknowledged and the board's ring cannot vouch that it "
                        f"never ran (count {known_count} -> {reply.exec_count}, ring "
                        f"{self._ring_size}); outcome unknown"
                    )
                # Same boot, not executed: the frame was lost; send it again.
            raise BoardNoReply(
                f"no ack to {type(request).__name__} command_id={command_id:016x} after "
                f"{1 + self._max_retries} attempts"
            )

    async def query(self, command_id: int) -> QueryReply:
        return await self._request(Query(command_id), QueryReply)

    async def read_inputs(self) -> InputState:
        reply = await self._request(ReadInputs(), Inputs)
        return InputState(
            boot_id=reply.boot_id,
            inputs=reply.inputs,
            relays=reply.relays if reply.relays_sensed else None,
        )

    async def all_off(self) -> None:
        await self._request(AllOff(), AllOffAck)

    async def _request(self, request: Message, reply_type: type[_Reply]) -> _Reply:
        """An idempotent request: retransmitted as the identical frame on timeout."""
        async with self._lock:
            reply = await self._exchange(
                request, reply_type, 1 + self._max_retries, written_before=False
            )
            if reply is None:
                raise BoardNoReply(
                    f"no reply to {type(request).__name__} after "
                    f"{1 + self._max_retries} attempts"
                )
            return reply

    async def _exchange(
        self, request: Message, reply_type: type[_Reply], attempts: int, *, written_before: bool
    ) -> _Reply | None:
        """Send ``request`` under a new SEQ, writing the identical frame up to
        ``attempts`` times; None when no reply came. The caller holds the lock.
        ``written_before``: an earlier request of the same operation already
        reached the port, so a failing write is BoardNoReply, not BoardUnavailable."""
        transport, link = self._transport, self._link
        if transport is None or link is None or transport.is_closing():
            if written_before:
                raise BoardNoReply(f"{self.port} lost after the request was written")
            raise BoardUnavailable(f"{self.port} is not open")
        seq = self._seq
        self._seq = (self._seq + 1) % 256
        data = encode(request, seq)  # ProtocolError before anything is sent
        try:
            for attempt in range(attempts):
                if transport.is_closing():
                    raise BoardNoReply(f"{self.port} closed after the request was written")
                # Register before the write, keyed by SEQ (STYLE.md, bellows).
                future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
                self._pending[seq] = _Pending(request, reply_type, future)
                # One synchronous write hands the whole frame to the transport,
                # so cancellation cannot split it; no sleeps (latency to first byte).
                transport.write(data)
                if transport.is_closing():
                    # Only a failed os.write of this very frame closes the
                    # transport inside write(): none of its bytes left the host.
                    if attempt == 0 and not written_before:
                        raise BoardUnavailable(f"{self.port} failed; request not sent")
                    raise BoardNoReply(f"{self.port} failed after the request was written")
                await asyncio.shield(link.drain())
                done, _ = await asyncio.wait((future,), timeout=self._ack_timeout)
                if done:
                    reply = future.result()  # BoardNoReply if the port died
                    if isinstance(reply, _BoardReply):
                        self._track(reply)
                    if isinstance(reply, Nack):
                        raise BoardNack(reply.reason, reply.request_type, reply.boot_id)
                    assert isinstance(reply, reply_type)
                    return reply
                LOGGER.warning(
                    "no reply to %s seq=%d on %s (attempt %d of %d)",
                    type(request).__name__, seq, self.port, attempt + 1, attempts,
                )
            return None
        finally:
            self._pending.pop(seq, None)

    def _track(self, reply: _BoardReply) -> None:
        """Boot id from every reply; within that boot the latest execution count
        and the ring size of its PONG, both forgotten when the boot id changes."""
        if reply.boot_id != self._boot_id:
            self._boot_id = reply.boot_id
            self._exec_count = self._ring_size = None
        if isinstance(reply, Pong):
            self._ring_size = reply.ring_size
        if isinstance(reply, Pong | ReleaseAck | QueryReply) and reply.exec_count is not None:
            self._exec_count = reply.exec_count

    def _frame_received(self, frame: Frame) -> None:
        pending = self._pending.get(frame.seq)
        if pending is None or pending.future.done():
            LOGGER.info("ignoring late or unexpected frame type=0x%02X seq=%d", frame.type,
                        frame.seq)
            return
        try:
            reply = decode(frame)
        except ProtocolError as exc:
            LOGGER.warning("ignoring undecodable reply seq=%d: %s", frame.seq, exc)
            return
        if not _answers(pending.request, pending.reply_type, reply):
            LOGGER.warning("ignoring reply %r that does not answer %r", reply, pending.request)
            return
        pending.future.set_result(reply)

    def _link_lost(self, link: _Link, exc: Exception | None) -> None:
        if link is not self._link:
            return
        LOGGER.warning("board port %s lost: %s", self.port, exc)
        self._transport = self._link = None
        # Every pending request was written before it could be pending.
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(
                    BoardNoReply(f"{self.port} lost after the request was written")
                )


def _answers(request: Message, reply_type: type[Message], reply: Message) -> bool:
    """Whether ``reply`` answers ``request`` (and is not a stale reply that happens
    to carry the same SEQ)."""
    if isinstance(reply, Nack):
        return reply.request_type == request.TYPE
    if not isinstance(reply, reply_type):
        return False
    if isinstance(request, Release | ReleaseLevel | Query) and isinstance(
        reply, ReleaseAck | QueryReply
    ):
        return reply.command_id == request.command_id
    return True


if TYPE_CHECKING:  # mypy proves SerialBoard structurally satisfies the driver interface
    _CONFORMS: BoardDriver = SerialBoard("")
