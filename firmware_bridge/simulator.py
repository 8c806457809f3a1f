"""A simulated relay board: the other side of protocol v1, shipped as a feature.

``SimulatedBoard`` is sans-I/O (bytes and a clock in, reply bytes out) and
implements the board rules of docs/firmware-protocol.md: boot id, the ring of
recent command ids, de-duplication by command id, NACK reasons, busy channels.
Running this module serves it on a pty so the real host driver, the gateway
and benchmarks can talk to it exactly as to the MCU::

    python -m firmware_bridge.simulator --actuations FILE [--link PATH]
        [--channels N] [--drop-release-acks N] [--boot-id HEX] [--time-scale F]

stdout carries exactly one line, ``PTY <slave path>``; FILE gets one JSON line
per relay actuation, fsync'ed before the RELEASE_ACK leaves, so a test or
benchmark can count physical releases even when acks are lost. SIGHUP resets
the board (new boot id, ring cleared), SIGTERM/SIGINT exit cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import time
import tty
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import IO

from firmware_bridge.exceptions import ProtocolError
from firmware_bridge.frames import (
    Frame,
    FrameDecoder,
    FrameType,
    Message,
    Nack,
    NackReason,
    Ping,
    Pong,
    Query,
    QueryReply,
    Release,
    ReleaseAck,
    decode,
    encode,
)

__all__ = ["Actuation", "SimulatedBoard", "main"]

LOGGER = logging.getLogger(__name__)

# "Board behaviour": limits a v1 board enforces.
RING_SIZE = 32  # recent command ids remembered per boot (minimum allowed)
MAX_PULSE_COUNT = 50
MIN_PULSE_MS = 10
MAX_PULSE_MS = 5000
FW_MAJOR, FW_MINOR = 1, 0
_HOST_TYPES = (FrameType.PING, FrameType.RELEASE, FrameType.QUERY)


@dataclass(frozen=True, slots=True)
class Actuation:
    """One physical release, as the board's relay would perform it."""

    rx_monotonic: float  # time.monotonic() of the read holding the frame's first byte
    boot_id: int
    command_id: int
    channel: int
    pulse_count: int
    on_ms: int
    off_ms: int


def _new_boot_id(previous: int = 0) -> int:
    while True:
        boot_id = secrets.randbits(32)
        if boot_id not in (0, previous):  # "Boot id": random, non-zero, new each reset
            return boot_id


class SimulatedBoard:
    """The board's protocol logic. ``feed(data, now)`` returns the bytes to send back.

    ``now`` is the monotonic time at which ``data`` was read; it drives the busy
    channels and is reported as ``Actuation.rx_monotonic``. ``time_scale`` 0.0
    (default) makes pulse trains instantaneous; 1.0 is real time.
    """

    def __init__(
        self,
        *,
        channels: int = 8,
        boot_id: int | None = None,
        on_actuation: Callable[[Actuation], None] | None = None,
        drop_release_acks: int = 0,
        time_scale: float = 0.0,
    ) -> None:
        if not 1 <= channels <= 255:
            raise ValueError("channels must be 1..255")
        self.channels = channels
        self.boot_id = boot_id if boot_id else _new_boot_id()
        self.drop_release_acks = drop_release_acks
        self.time_scale = time_scale
        self.actuation_count = 0
        self._on_actuation = on_actuation
        self._decoder = FrameDecoder()
        self._reads: deque[tuple[int, float]] = deque()  # (stream offset, read time)
        self._received = 0
        self._ring: deque[int] = deque(maxlen=RING_SIZE)
        self._busy_until: dict[int, float] = {}

    def reboot(self) -> int:
        """Board reset: new boot id, ring and busy channels cleared, partial
        frames lost (RAM). Returns the new boot id."""
        self.boot_id = _new_boot_id(self.boot_id)
        self._ring.clear()
        self._busy_until.clear()
        self._decoder = FrameDecoder()
        self._reads.clear()
        self._received = 0
        return self.boot_id

    def feed(self, data: bytes, now: float) -> bytes:
        self._reads.append((self._received, now))
        self._received += len(data)
        out = bytearray()
        for offset, frame in self._decoder.feed_positions(data):
            out += self._handle(frame, self._read_time(offset), now)
        return bytes(out)

    def _read_time(self, offset: int) -> float:
        # Forget reads that ended before this frame began; the first one left
        # is the read that delivered the frame's first byte.
        while len(self._reads) > 1 and self._reads[1][0] <= offset:
            self._reads.popleft()
        return self._reads[0][1]

    def _handle(self, frame: Frame, rx_time: float, now: float) -> bytes:
        if frame.type not in _HOST_TYPES:
            return self._nack(frame, NackReason.UNKNOWN_TYPE)
        try:
            message = decode(frame)
        except ProtocolError:
            return self._nack(frame, NackReason.BAD_LENGTH)
        reply: Message
        if isinstance(message, Ping):
            reply = Pong(self.boot_id, FW_MAJOR, FW_MINOR, self.channels)
        elif isinstance(message, Query):
            reply = QueryReply(self.boot_id, message.command_id, message.command_id in self._ring)
        elif isinstance(message, Release):
            return self._release(frame, message, rx_time, now)
        else:  # pragma: no cover - _HOST_TYPES decodes to the three above
            return self._nack(frame, NackReason.UNKNOWN_TYPE)
        return encode(reply, frame.seq)

    def _release(self, frame: Frame, release: Release, rx_time: float, now: float) -> bytes:
        # "De-duplication": by command id, before anything else, so a
        # retransmission during its own pulse train is a duplicate, not busy.
        if release.command_id in self._ring:
            return encode(ReleaseAck(self.boot_id, release.command_id, True), frame.seq)
        if not 1 <= release.channel <= self.channels:
            return self._nack(frame, NackReason.BAD_CHANNEL)
        if not (
            1 <= release.pulse_count <= MAX_PULSE_COUNT
            and MIN_PULSE_MS <= release.on_ms <= MAX_PULSE_MS
            and MIN_PULSE_MS <= release.off_ms <= MAX_PULSE_MS
        ):
            return self._nack(frame, NackReason.BAD_PARAMS)
        if self._busy_until.get(release.channel, 0.0) > now:
            return self._nack(frame, NackReason.CHANNEL_BUSY)
        # Record the id, then start the pulse train, then ACK ("RELEASE").
        self._ring.append(release.command_id)
        train_s = release.pulse_count * (release.on_ms + release.off_ms) / 1000
        self._busy_until[release.channel] = now + train_s * self.time_scale
        self.actuation_count += 1
        if self._on_actuation is not None:
            self._on_actuation(
                Actuation(
                    rx_time, self.boot_id, release.command_id, release.channel,
                    release.pulse_count, release.on_ms, release.off_ms,
                )
            )
        if self.drop_release_acks > 0:  # simulate the ACK lost on the wire
            self.drop_release_acks -= 1
            return b""
        return encode(ReleaseAck(self.boot_id, release.command_id, False), frame.seq)

    def _nack(self, frame: Frame, reason: NackReason) -> bytes:
        return encode(Nack(self.boot_id, frame.type, reason), frame.seq)


# --- the program ---------------------------------------------------------------


class _ActuationLog:
    """Append-only JSON lines, durable before the ACK is written."""

    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")

    def __call__(self, actuation: Actuation) -> None:
        record = asdict(actuation)
        line = {
            "time": time.time(),
            "rx_monotonic": record["rx_monotonic"],
            "boot_id": f"{actuation.boot_id:08x}",
            "command_id": f"{actuation.command_id:016x}",
            "channel": actuation.channel,
            "pulse_count": actuation.pulse_count,
            "on_ms": actuation.on_ms,
            "off_ms": actuation.off_ms,
        }
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m firmware_bridge.simulator",
        description="Serve a simulated relay board (protocol v1) on a pty.",
    )
    parser.add_argument("--actuations", required=True, metavar="FILE",
                        help="append one JSON line per relay actuation")
    parser.add_argument("--link", metavar="PATH",
                        help="create/replace a symlink PATH -> pty slave")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--drop-release-acks", type=int, default=0, metavar="N",
                        help="act on the first N RELEASEs but do not send their ACK")
    parser.add_argument("--boot-id", type=lambda s: int(s, 16), metavar="HEX",
                        help="initial boot id (default random)")
    parser.add_argument("--time-scale", type=float, default=0.0, metavar="F",
                        help="pulse train duration factor; 0 = instantaneous (default)")
    args = parser.parse_args(argv)
    if not 1 <= args.channels <= 255:
        parser.error("--channels must be 1..255")
    if args.boot_id is not None and not 0 < args.boot_id <= 0xFFFFFFFF:
        parser.error("--boot-id must be a non-zero u32")
    return args


def _replace_symlink(link: str, target: str) -> None:
    tmp = f"{link}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic: a client never sees the link missing


async def _serve(master: int, board: SimulatedBoard) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_readable() -> None:
        try:
            data = os.read(master, 4096)
        except BlockingIOError:
            return
        except OSError as exc:  # cannot happen while we hold the slave open
            LOGGER.error("pty read failed: %s", exc)
            stop.set()
            return
        now = time.monotonic()  # as close to the read as possible (rx_monotonic)
        reply = board.feed(data, now)
        if reply:
            try:
                os.write(master, reply)
            except BlockingIOError:
                # Nobody reads the slave and its queue is full: like a UART
                # transmitting into a cut cable, the reply is lost.
                LOGGER.warning("reply dropped: pty output queue full")

    def on_hup() -> None:
        boot_id = board.reboot()
        print(f"REBOOT {boot_id:08x}", file=sys.stderr, flush=True)

    loop.add_reader(master, on_readable)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await stop.wait()
    finally:
        loop.remove_reader(master)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="simulator: %(levelname)s %(message)s")
    master, slave = os.openpty()
    # Keep our own slave fd open for the whole run: without it the master
    # reads EIO whenever the client closes the port, breaking reopen.
    tty.setraw(slave)
    os.set_blocking(master, False)
    slave_path = os.ttyname(slave)
    if args.link:
        _replace_symlink(args.link, slave_path)
    print(f"PTY {slave_path}", flush=True)
    log = _ActuationLog(args.actuations)
    board = SimulatedBoard(
        channels=args.channels,
        boot_id=args.boot_id,
        on_actuation=log,
        drop_release_acks=args.drop_release_acks,
        time_scale=args.time_scale,
    )
    print(f"BOOT {board.boot_id:08x}", file=sys.stderr, flush=True)
    try:
        asyncio.run(_serve(master, board))
    finally:
        log.close()
        os.close(master)
        os.close(slave)
        if args.link and os.path.realpath(args.link) == slave_path:
            os.unlink(args.link)
    return 0


if __name__ == "__main__":
    sys.exit(main())
