"""Relay board serial protocol v1: frames and messages, pure (no asyncio, no I/O).

Everything here turns bytes into values and back, so the host driver
(serial_board.py), the simulated board (simulator/board.py) and the tests share one
codec. The wire format is specified in docs/firmware-protocol.md; section
names in comments below refer to that page.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Self

from firmware_bridge.exceptions import IncompleteFrame, InvalidFrame, ProtocolError

__all__ = [
    "CRC_SIZE",
    "HEADER_SIZE",
    "MAX_BUFFER_SIZE",
    "MAX_FRAME_SIZE",
    "MAX_PAYLOAD",
    "SOF",
    "VERSION",
    "Frame",
    "FrameDecoder",
    "AllOff",
    "AllOffAck",
    "FrameType",
    "Inputs",
    "Message",
    "Nack",
    "NackReason",
    "Ping",
    "Pong",
    "Query",
    "QueryReply",
    "ReadInputs",
    "Release",
    "ReleaseAck",
    "ReleaseLevel",
    "crc16",
    "decode",
    "encode",
]

# "Framing"
SOF = 0x7E
VERSION = 0x01
HEADER_SIZE = 5  # SOF VER TYPE SEQ LEN
CRC_SIZE = 2
MAX_PAYLOAD = 64
MAX_FRAME_SIZE = HEADER_SIZE + MAX_PAYLOAD + CRC_SIZE
# "Receiving": garbage beyond this is discarded; a whole frame always fits.
MAX_BUFFER_SIZE = 512


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, xorout 0.

    Check value: ``crc16(b"123456789") == 0x29B1`` ("CRC"). The standard library's
    ``binascii.crc_hqx`` is this very CRC (the XMODEM polynomial, seeded here with
    0xFFFF), in C: ~0.2 us a frame instead of ~44 us for the bit loop in Python.
    """
    return binascii.crc_hqx(data, crc)


class FrameType(IntEnum):
    """TYPE byte. Host->board below 0x80, board->host at 0x80 and above."""

    PING = 0x01
    RELEASE = 0x02
    QUERY = 0x03
    RELEASE_LEVEL = 0x04
    ALL_OFF = 0x05
    READ_INPUTS = 0x06
    PONG = 0x81
    RELEASE_ACK = 0x82
    QUERY_REPLY = 0x83
    ALL_OFF_ACK = 0x85
    INPUTS = 0x86
    NACK = 0xFF


class NackReason(IntEnum):
    """NACK reason byte ("NACK"). Every NACK means the board did not act."""

    BAD_LENGTH = 0x01
    UNKNOWN_TYPE = 0x02
    BAD_CHANNEL = 0x03
    BAD_PARAMS = 0x04
    CHANNEL_BUSY = 0x05
    UNSUPPORTED_VERSION = 0x06


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame on the wire. ``type`` is an int so unknown types survive parsing
    (the board must answer them with NACK unknown_type)."""

    type: int
    seq: int
    payload: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.type <= 0xFF:
            raise ProtocolError(f"frame type {self.type} does not fit a byte")
        if not 0 <= self.seq <= 0xFF:
            raise ProtocolError(f"seq {self.seq} does not fit a byte")
        if len(self.payload) > MAX_PAYLOAD:
            raise ProtocolError(f"payload of {len(self.payload)} bytes exceeds {MAX_PAYLOAD}")

    def serialize(self) -> bytes:
        body = bytes((VERSION, self.type, self.seq, len(self.payload))) + self.payload
        return bytes((SOF,)) + body + crc16(body).to_bytes(2, "big")

    @classmethod
    def deserialize(cls, data: bytes) -> tuple[Self, bytes]:
        """Parse one frame at the very start of ``data``; return it and the rest.

        Raises ``InvalidFrame`` when ``data`` does not start with a frame (the
        caller drops one byte and rescans) and ``IncompleteFrame`` when it
        starts with a valid prefix that more bytes may complete. Nothing else.
        """
        if not data:
            raise IncompleteFrame(HEADER_SIZE + CRC_SIZE)
        if data[0] != SOF:
            raise InvalidFrame(f"expected SOF 0x7E, got 0x{data[0]:02X}")
        if len(data) >= 2 and data[1] != VERSION:
            raise InvalidFrame(f"unsupported version 0x{data[1]:02X}")
        if len(data) < HEADER_SIZE:
            raise IncompleteFrame(HEADER_SIZE + CRC_SIZE - len(data))
        length = data[4]
        if length > MAX_PAYLOAD:
            raise InvalidFrame(f"LEN {length} exceeds {MAX_PAYLOAD}")
        end = HEADER_SIZE + length + CRC_SIZE
        if len(data) < end:
            raise IncompleteFrame(end - len(data))
        expected = crc16(data[1 : HEADER_SIZE + length])
        received = int.from_bytes(data[HEADER_SIZE + length : end], "big")
        if expected != received:
            raise InvalidFrame(f"CRC 0x{received:04X} != computed 0x{expected:04X}")
        frame = cls(data[2], data[3], bytes(data[HEADER_SIZE : HEADER_SIZE + length]))
        return frame, bytes(data[end:])


class FrameDecoder:
    """Receive path: bytes in, frames out; garbage is skipped, never raised.

    No byte stuffing ("Receiving"): scan for SOF, and when a candidate has a
    bad VER/LEN/CRC drop ONE byte and rescan, so a 0x7E inside a payload
    cannot hide the real frame that follows it. The result does not depend on
    how the stream is chunked.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._offset = 0  # stream position of self._buffer[0]
        self.dropped_bytes = 0  # garbage skipped so far, for diagnostics

    def feed(self, data: bytes) -> list[Frame]:
        return [frame for _, frame in self.feed_positions(data)]

    def feed_positions(self, data: bytes) -> list[tuple[int, Frame]]:
        """Like ``feed`` but pair each frame with the stream offset of its SOF
        (bytes fed since construction), so a caller can time a frame's first byte."""
        self._buffer += data
        return list(self._extract())

    def _extract(self) -> Iterator[tuple[int, Frame]]:
        buf = self._buffer
        pos = 0
        try:
            while True:
                start = buf.find(SOF, pos)
                if start < 0:
                    self.dropped_bytes += len(buf) - pos
                    pos = len(buf)
                    return
                self.dropped_bytes += start - pos
                pos = start
                try:
                    frame, _ = Frame.deserialize(bytes(buf[pos : pos + MAX_FRAME_SIZE]))
                except IncompleteFrame:
                    return
                except InvalidFrame:
                    self.dropped_bytes += 1
                    pos += 1
                    continue
                yield self._offset + pos, frame
                pos += HEADER_SIZE + len(frame.payload) + CRC_SIZE
        finally:
            del buf[:pos]
            self._offset += pos
            if len(buf) > MAX_BUFFER_SIZE:  # cannot happen after a full scan; defence
                excess = len(buf) - MAX_BUFFER_SIZE
                del buf[:excess]
                self._offset += excess
                self.dropped_bytes += excess


# --- messages ("Messages") ---------------------------------------------------


def _unpack(fmt: str, payload: bytes, name: str) -> tuple[int, ...]:
    try:
        return struct.unpack(fmt, payload)
    except struct.error as exc:
        raise ProtocolError(
            f"{name} payload must be {struct.calcsize(fmt)} bytes, got {len(payload)}"
        ) from exc


def _unpack_forms(payload: bytes, name: str, *formats: str) -> tuple[int, ...]:
    """Unpack with whichever of ``formats`` has the payload's length (firmware 1.2
    appended fields to some replies; an older board sends the shorter form)."""
    for fmt in formats:
        if len(payload) == struct.calcsize(fmt):
            return _unpack(fmt, payload, name)
    sizes = " or ".join(str(struct.calcsize(fmt)) for fmt in formats)
    raise ProtocolError(f"{name} payload must be {sizes} bytes, got {len(payload)}")


def _pack(fmt: str, name: str, *values: int) -> bytes:
    try:
        return struct.pack(fmt, *values)
    except struct.error as exc:
        raise ProtocolError(f"{name} field out of range: {values}") from exc


def _status(value: int, name: str) -> bool:
    if value not in (0, 1):
        raise ProtocolError(f"{name} status 0x{value:02X} is not 0x00 or 0x01")
    return value == 1


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[FrameType] = FrameType.PING

    def to_payload(self) -> bytes:
        return b""

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        _unpack(">", payload, "PING")
        return cls()


@dataclass(frozen=True, slots=True)
class Release:
    """Start a pulse train. Semantic ranges (channel 1..N, and the limits of
    firmware_bridge.driver) are the board's to check; here only field widths."""

    TYPE: ClassVar[FrameType] = FrameType.RELEASE
    FORMAT: ClassVar[str] = ">QBBHH"

    command_id: int
    channel: int
    pulse_count: int
    on_ms: int
    off_ms: int

    def to_payload(self) -> bytes:
        return _pack(
            self.FORMAT, "RELEASE",
            self.command_id, self.channel, self.pulse_count, self.on_ms, self.off_ms,
        )

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_unpack(cls.FORMAT, payload, "RELEASE"))


@dataclass(frozen=True, slots=True)
class Query:
    TYPE: ClassVar[FrameType] = FrameType.QUERY
    FORMAT: ClassVar[str] = ">Q"

    command_id: int

    def to_payload(self) -> bytes:
        return _pack(self.FORMAT, "QUERY", self.command_id)

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_unpack(cls.FORMAT, payload, "QUERY"))


@dataclass(frozen=True, slots=True)
class ReleaseLevel:
    """Hold the contact closed for ``hold_ms`` ("RELEASE_LEVEL"); answered with
    RELEASE_ACK exactly like RELEASE. Its range (firmware_bridge.driver) is the board's
    to check."""

    TYPE: ClassVar[FrameType] = FrameType.RELEASE_LEVEL
    FORMAT: ClassVar[str] = ">QBI"

    command_id: int
    channel: int
    hold_ms: int

    def to_payload(self) -> bytes:
        return _pack(self.FORMAT, "RELEASE_LEVEL", self.command_id, self.channel, self.hold_ms)

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_unpack(cls.FORMAT, payload, "RELEASE_LEVEL"))


@dataclass(frozen=True, slots=True)
class AllOff:
    """Every output inactive, running programs cancelled ("ALL_OFF")."""

    TYPE: ClassVar[FrameType] = FrameType.ALL_OFF

    def to_payload(self) -> bytes:
        return b""

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        _unpack(">", payload, "ALL_OFF")
        return cls()


@dataclass(frozen=True, slots=True)
class ReadInputs:
    TYPE: ClassVar[FrameType] = FrameType.READ_INPUTS

    def to_payload(self) -> bytes:
        return b""

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        _unpack(">", payload, "READ_INPUTS")
        return cls()


@dataclass(frozen=True, slots=True)
class Pong:
    """``exec_count`` and ``ring_size`` come from firmware >= 1.2 ("Execution
    count") and are None from an older board (the 7-byte form)."""

    TYPE: ClassVar[FrameType] = FrameType.PONG
    FORMAT: ClassVar[str] = ">IBBBIH"  # firmware >= 1.2
    FORMAT_V11: ClassVar[str] = ">IBBB"  # firmware <= 1.1

    boot_id: int
    fw_major: int
    fw_minor: int
    channels: int
    exec_count: int | None = None
    ring_size: int | None = None

    def to_payload(self) -> bytes:
        head = (self.boot_id, self.fw_major, self.fw_minor, self.channels)
        if self.exec_count is None and self.ring_size is None:
            return _pack(self.FORMAT_V11, "PONG", *head)
        if self.exec_count is None or self.ring_size is None:
            raise ProtocolError("PONG carries exec_count and ring_size together or neither")
        return _pack(self.FORMAT, "PONG", *head, self.exec_count, self.ring_size)

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_unpack_forms(payload, "PONG", cls.FORMAT_V11, cls.FORMAT))


@dataclass(frozen=True, slots=True)
class ReleaseAck:
    """``duplicate`` False: recorded and pulse train started now (status 0x00);
    True: already executed in this boot, not pulsed again (status 0x01).
    ``exec_count`` (firmware >= 1.2, else None): the board's count once this
    command was recorded; for a duplicate, its current count."""

    TYPE: ClassVar[FrameType] = FrameType.RELEASE_ACK
    FORMAT: ClassVar[str] = ">IQBI"  # firmware >= 1.2
    FORMAT_V11: ClassVar[str] = ">IQB"  # firmware <= 1.1

    boot_id: int
    command_id: int
    duplicate: bool
    exec_count: int | None = None

    def to_payload(self) -> bytes:
        head = (self.boot_id, self.command_id, self.duplicate)
        if self.exec_count is None:
            return _pack(self.FORMAT_V11, "RELEASE_ACK", *head)
        return _pack(self.FORMAT, "RELEASE_ACK", *head, self.exec_count)

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        boot_id, command_id, status, *count = _unpack_forms(
            payload, "RELEASE_ACK", cls.FORMAT_V11, cls.FORMAT
        )
        return cls(boot_id, command_id, _status(status, "RELEASE_ACK"), *count)


@dataclass(frozen=True, slots=True)
class QueryReply:
    """``executed`` False: unknown in this boot (status 0x00); True: executed or
    executing (status 0x01). ``exec_count`` (firmware >= 1.2, else None): the
    board's current count; "not executed" proves "never executed" only as far as
    ``driver.ring_vouches`` says."""

    TYPE: ClassVar[FrameType] = FrameType.QUERY_REPLY
    FORMAT: ClassVar[str] = ">IQBI"  # firmware >= 1.2
    FORMAT_V11: ClassVar[str] = ">IQB"  # firmware <= 1.1

    boot_id: int
    command_id: int
    executed: bool
    exec_count: int | None = None

    def to_payload(self) -> bytes:
        head = (self.boot_id, self.command_id, self.executed)
        if self.exec_count is None:
            return _pack(self.FORMAT_V11, "QUERY_REPLY", *head)
        return _pack(self.FORMAT, "QUERY_REPLY", *head, self.exec_count)

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        boot_id, command_id, status, *count = _unpack_forms(
            payload, "QUERY_REPLY", cls.FORMAT_V11, cls.FORMAT
        )
        return cls(boot_id, command_id, _status(status, "QUERY_REPLY"), *count)


@dataclass(frozen=True, slots=True)
class AllOffAck:
    TYPE: ClassVar[FrameType] = FrameType.ALL_OFF_ACK
    FORMAT: ClassVar[str] = ">I"

    boot_id: int

    def to_payload(self) -> bytes:
        return _pack(self.FORMAT, "ALL_OFF_ACK", self.boot_id)

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        return cls(*_unpack(cls.FORMAT, payload, "ALL_OFF_ACK"))


@dataclass(frozen=True, slots=True)
class Inputs:
    """``inputs``: raw levels, bit n-1 = input n high. ``relays``: sensed contacts,
    bit n-1 = channel n closed, meaningful only when ``relays_sensed`` (FLAGS bit 0;
    the other FLAGS bits are reserved, sent as 0 and ignored on receipt)."""

    TYPE: ClassVar[FrameType] = FrameType.INPUTS
    FORMAT: ClassVar[str] = ">IQQB"

    boot_id: int
    inputs: int
    relays: int
    relays_sensed: bool

    def to_payload(self) -> bytes:
        return _pack(
            self.FORMAT, "INPUTS", self.boot_id, self.inputs, self.relays, self.relays_sensed
        )

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        boot_id, inputs, relays, flags = _unpack(cls.FORMAT, payload, "INPUTS")
        return cls(boot_id, inputs, relays, bool(flags & 0x01))


@dataclass(frozen=True, slots=True)
class Nack:
    TYPE: ClassVar[FrameType] = FrameType.NACK
    FORMAT: ClassVar[str] = ">IBB"

    boot_id: int
    request_type: int
    reason: NackReason

    def to_payload(self) -> bytes:
        return _pack(self.FORMAT, "NACK", self.boot_id, self.request_type, self.reason)

    @classmethod
    def from_payload(cls, payload: bytes) -> Self:
        boot_id, request_type, reason = _unpack(cls.FORMAT, payload, "NACK")
        try:
            return cls(boot_id, request_type, NackReason(reason))
        except ValueError as exc:
            raise ProtocolError(f"unknown NACK reason 0x{reason:02X}") from exc


Message = (
    Ping | Release | Query | ReleaseLevel | AllOff | ReadInputs
    | Pong | ReleaseAck | QueryReply | AllOffAck | Inputs | Nack
)

_MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Ping, Release, Query, ReleaseLevel, AllOff, ReadInputs,
        Pong, ReleaseAck, QueryReply, AllOffAck, Inputs, Nack,
    )
}


def encode(message: Message, seq: int) -> bytes:
    """Whole frame bytes for ``message`` with sequence number ``seq``."""
    return Frame(message.TYPE, seq, message.to_payload()).serialize()


def decode(frame: Frame) -> Message:
    """Typed message of a frame; ``ProtocolError`` for an unknown type or a bad payload."""
    cls = _MESSAGE_TYPES.get(frame.type)
    if cls is None:
        raise ProtocolError(f"unknown frame type 0x{frame.type:02X}")
    return cls.from_payload(frame.payload)
