"""The simulated board's protocol logic, sans-I/O: received bytes and a clock in, reply bytes out.

``SimulatedBoard`` implements the board rules of docs/firmware-protocol.md, firmware
1.2: boot id, the ring of recent command ids and the execution count, de-duplication
by command id, NACK reasons, busy channels, ALL_OFF, READ_INPUTS (``firmware="1.1"``
answers like an older board: no count, the short reply forms). ``feed(data, now)``
returns the reply bytes; ``advance(now)`` / ``next_deadline()`` carry what happens
with time (relay edges of running programs, the machines wired to the relays, a
scripted reboot). What it did is reported as it happens, before ``feed`` or
``advance`` returns: every executed release (``Actuation``), every relay edge
(``Edge``) and every reboot, to the listeners given to the constructor or to
``subscribe``. Faults are injected here too (lost, corrupted frames, lost release
ACKs, a stuck relay, a reboot in the middle of a pulse train), so every way of
connecting the board (a pty, an in-memory link) gets them.

No asyncio, no file descriptors: the callers (``pty_link``, ``memory_link``) do I/O.
"""

from __future__ import annotations

import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from firmware_bridge.driver import (
    MAX_EDGE_MS,
    MAX_HOLD_MS,
    MAX_INPUTS,
    MAX_PULSES,
    MIN_EDGE_MS,
    MIN_HOLD_MS,
)
from firmware_bridge.exceptions import ProtocolError
from firmware_bridge.frames import (
    AllOff,
    AllOffAck,
    Frame,
    FrameDecoder,
    FrameType,
    Inputs,
    Message,
    Nack,
    NackReason,
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
from firmware_bridge.simulator.machines import MachineSpec, SimulatedMachine
from firmware_bridge.simulator.records import Actuation, Edge

__all__ = [
    "FIRMWARES",
    "FW_MAJOR",
    "FW_MINOR",
    "RING_SIZE",
    "Faults",
    "SimulatedBoard",
]

# Recent command ids remembered per boot ("De-duplication"): 32 is the minimum
# real firmware may keep; --ring-size goes lower only to make forgetting testable.
RING_SIZE = 32
FW_MAJOR, FW_MINOR = 1, 2  # 1.1: RELEASE_LEVEL, ALL_OFF, READ_INPUTS; 1.2: exec_count
FIRMWARES = ("1.1", "1.2")  # what --firmware can answer as
_HOST_TYPES = (
    FrameType.PING, FrameType.RELEASE, FrameType.QUERY,
    FrameType.RELEASE_LEVEL, FrameType.ALL_OFF, FrameType.READ_INPUTS,
)


@dataclass
class Faults:
    """Faults the board injects. Rates are probabilities per frame: ``drop_rate``
    loses a received request or a reply (each independently), ``corrupt_rate``
    flips one byte of a reply. ``stuck_relays``: channels whose contact is sensed
    closed whatever is commanded. ``reboot_mid_train``: reboot in the middle of
    the Nth accepted pulse train (1-based), after its ACK was sent."""

    drop_rate: float = 0.0
    corrupt_rate: float = 0.0
    seed: int | None = None
    stuck_relays: frozenset[int] = field(default_factory=frozenset)
    reboot_mid_train: int = 0



@dataclass
class _Running:
    """A program running on one channel: its remaining scheduled edges."""

    command_id: int
    started: float  # time of the first edge
    busy_until: float
    edges: deque[tuple[float, bool, float]]  # (time, on, program ms)
    closed_at_ms: float = 0.0  # program ms of the last on edge
    reboot_at: tuple[float, float] | None = None  # (time, program ms)


def _new_boot_id(previous: int = 0) -> int:
    while True:
        boot_id = secrets.randbits(32)
        if boot_id not in (0, previous):  # "Boot id": random, non-zero, new each reset
            return boot_id


class SimulatedBoard:
    """The board's protocol logic. ``feed(data, now)`` returns the bytes to send back.

    ``now`` is the monotonic time at which ``data`` was read; it is reported as
    ``Actuation.rx_monotonic``. ``time_scale`` 0.0 (default) makes programs
    instantaneous (their later edges happen at the next ``advance``); 1.0 is real
    time. Call ``advance(now)`` whenever ``next_deadline()`` is reached.
    """

    def __init__(
        self,
        *,
        channels: int = 8,
        boot_id: int | None = None,
        on_actuation: Callable[[Actuation], None] | None = None,
        on_edge: Callable[[Edge], None] | None = None,
        on_reboot: Callable[[int], None] | None = None,
        drop_release_acks: int = 0,
        time_scale: float = 0.0,
        machines: Sequence[MachineSpec] = (),
        machine_time_scale: float = 1.0,
        faults: Faults | None = None,
        sense_relays: bool = True,
        ring_size: int = RING_SIZE,
        firmware: str = FIRMWARES[-1],
    ) -> None:
        if not 1 <= channels <= 255:
            raise ValueError("channels must be 1..255")
        if not 1 <= ring_size <= 0xFFFF or firmware not in FIRMWARES:
            raise ValueError(f"ring_size must be 1..65535 and firmware one of {FIRMWARES}")
        if time_scale < 0 or machine_time_scale <= 0:
            raise ValueError("time_scale must be >= 0 and machine_time_scale > 0")
        self.channels = channels
        self.boot_id = boot_id if boot_id else _new_boot_id()
        self.drop_release_acks = drop_release_acks
        self.time_scale = time_scale
        self.faults = faults or Faults()
        self.sense_relays = sense_relays
        self.actuation_count = 0
        self.ring_size = ring_size
        self.fw_minor = int(firmware.split(".")[1])
        self.exec_count = 0  # ids recorded in the ring this boot ("Execution count")
        self.pulse_trains = 0  # accepted pulse trains, for reboot_mid_train
        self._rng = random.Random(self.faults.seed)
        self._actuation_listeners: list[Callable[[Actuation], None]] = []
        self._edge_listeners: list[Callable[[Edge], None]] = []
        self._reboot_listeners: list[Callable[[int], None]] = []
        self.subscribe(on_actuation=on_actuation, on_edge=on_edge, on_reboot=on_reboot)
        self._decoder = FrameDecoder()
        self._reads: deque[tuple[int, float]] = deque()  # (stream offset, read time)
        self._received = 0
        self._ring: deque[int] = deque(maxlen=ring_size)
        self._running: dict[int, _Running] = {}
        self._relays = 0  # actual contacts, bit n-1 = channel n closed
        self._machines = [SimulatedMachine(spec, machine_time_scale) for spec in machines]
        self._forced: dict[int, bool] = {}  # input -> raw level forced from outside

    def subscribe(
        self,
        *,
        on_actuation: Callable[[Actuation], None] | None = None,
        on_edge: Callable[[Edge], None] | None = None,
        on_reboot: Callable[[int], None] | None = None,
    ) -> None:
        """Also report what the board does to these. Each is called synchronously,
        before the ``feed`` / ``advance`` / ``reboot`` that caused it returns, so an
        actuation is reported before the bytes of its RELEASE_ACK are handed back."""
        if on_actuation is not None:
            self._actuation_listeners.append(on_actuation)
        if on_edge is not None:
            self._edge_listeners.append(on_edge)
        if on_reboot is not None:
            self._reboot_listeners.append(on_reboot)

    # --- state -------------------------------------------------------------

    @property
    def relays(self) -> int:
        """Contacts as switched by the board (not as sensed)."""
        return self._relays

    def inputs(self, now: float) -> int:
        """Raw levels of the input lines, bit n-1 = input n high: each machine's
        busy signal (inverted for an ``active_low`` machine), then forced levels."""
        self.advance(now)
        level = 0
        for machine in self._machines:
            if machine.raw_level:
                level |= 1 << (machine.spec.input - 1)
        for n, high in self._forced.items():
            level = level | (1 << (n - 1)) if high else level & ~(1 << (n - 1))
        return level

    def force_input(self, n: int, level: bool | None) -> None:
        """Force input ``n``'s raw level (True = high) whatever its machines do,
        or hand it back to them (None). A forced level survives a reboot: it is
        the wire, not the board."""
        if not 1 <= n <= MAX_INPUTS:
            raise ValueError(f"input must be 1..{MAX_INPUTS}")
        if level is None:
            self._forced.pop(n, None)
        else:
            self._forced[n] = level

    def reboot(self, now: float | None = None) -> int:
        """Board reset: outputs off, new boot id, ring and programs cleared,
        partial frames lost (RAM). Returns the new boot id."""
        now = time.monotonic() if now is None else now
        self.advance(now)
        return self._reset(now)

    def _reset(self, now: float) -> int:
        self._cancel_all(now)
        self.boot_id = _new_boot_id(self.boot_id)
        self._ring.clear()
        self.exec_count = 0
        self._decoder = FrameDecoder()
        self._reads.clear()
        self._received = 0
        for on_reboot in self._reboot_listeners:
            on_reboot(self.boot_id)
        return self.boot_id

    # --- time --------------------------------------------------------------

    def next_deadline(self) -> float | None:
        times: list[float] = []
        for running in self._running.values():
            if running.edges:
                times.append(running.edges[0][0])
            if running.reboot_at is not None:
                times.append(running.reboot_at[0])
            times.append(running.busy_until)
        times.extend(t for m in self._machines if (t := m.next_deadline()) is not None)
        return min(times, default=None)

    def advance(self, now: float) -> None:
        """Apply everything due at ``now``: relay edges in time order, a scripted
        reboot at its place among them, machine transitions."""
        while True:
            due: list[tuple[float, float, int, str]] = []
            for channel, running in self._running.items():
                if running.edges and running.edges[0][0] <= now:
                    due.append((running.edges[0][0], running.edges[0][2], channel, "edge"))
                if running.reboot_at is not None and running.reboot_at[0] <= now:
                    due.append((running.reboot_at[0], running.reboot_at[1], channel, "reboot"))
            if not due:
                break
            _, _, channel, kind = min(due)
            running = self._running[channel]
            if kind == "reboot":
                running.reboot_at = None
                self._reset(now)
                continue
            _, on, program_ms = running.edges.popleft()
            self._switch(channel, on, running, program_ms, now)
        for channel in [c for c, r in self._running.items() if not r.edges
                        and r.reboot_at is None and r.busy_until <= now]:
            del self._running[channel]
        for machine in self._machines:
            machine.advance(now)

    def _switch(
        self, channel: int, on: bool, running: _Running | None, program_ms: float, now: float
    ) -> None:
        bit = 1 << (channel - 1)
        if bool(self._relays & bit) == on:
            return
        self._relays = self._relays | bit if on else self._relays & ~bit
        held_ms = 0.0
        if running is not None:
            if on:
                running.closed_at_ms = program_ms
            else:
                held_ms = program_ms - running.closed_at_ms
        edge = Edge(now, channel, on, running.command_id if running else None)
        for on_edge in self._edge_listeners:
            on_edge(edge)
        for machine in self._machines:
            if machine.spec.channel == channel:
                machine.edge(edge, held_ms)

    def _cancel_all(self, now: float) -> None:
        """Outputs off, programs cancelled (ALL_OFF, reset); the caller advanced
        to ``now`` first."""
        for channel, running in sorted(self._running.items()):
            # Program ms reached so far; at time scale 0 everything was due already.
            elapsed_ms = (now - running.started) * 1000 / self.time_scale if self.time_scale else 0
            self._switch(channel, False, running, elapsed_ms, now)
        self._running.clear()
        for channel in range(1, self.channels + 1):
            self._switch(channel, False, None, 0.0, now)

    # --- bytes -------------------------------------------------------------

    def feed(self, data: bytes, now: float) -> bytes:
        self.advance(now)
        self._reads.append((self._received, now))
        self._received += len(data)
        out = bytearray()
        for offset, frame in self._decoder.feed_positions(data):
            if self._chance(self.faults.drop_rate):
                continue  # request lost on the wire
            reply = self._handle(frame, self._read_time(offset), now)
            if not reply or self._chance(self.faults.drop_rate):
                continue  # reply lost on the wire
            if self._chance(self.faults.corrupt_rate):
                corrupt = bytearray(reply)
                corrupt[self._rng.randrange(len(corrupt))] ^= 1 << self._rng.randrange(8)
                reply = bytes(corrupt)
            out += reply
        return bytes(out)

    def _chance(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

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
            ring_size = self.ring_size if self._count() is not None else None
            reply = Pong(
                self.boot_id, FW_MAJOR, self.fw_minor, self.channels, self._count(), ring_size
            )
        elif isinstance(message, Query):
            executed = message.command_id in self._ring
            reply = QueryReply(self.boot_id, message.command_id, executed, self._count())
        elif isinstance(message, Release | ReleaseLevel):
            return self._release(frame, message, rx_time, now)
        elif isinstance(message, AllOff):
            self._cancel_all(now)
            reply = AllOffAck(self.boot_id)
        elif isinstance(message, ReadInputs):
            inputs = self.inputs(now)
            sensed = self._relays | sum(1 << (c - 1) for c in self.faults.stuck_relays)
            reply = Inputs(
                self.boot_id, inputs, sensed if self.sense_relays else 0, self.sense_relays
            )
        else:  # pragma: no cover - _HOST_TYPES decodes to the types above
            return self._nack(frame, NackReason.UNKNOWN_TYPE)
        return encode(reply, frame.seq)

    def _release(
        self, frame: Frame, release: Release | ReleaseLevel, rx_time: float, now: float
    ) -> bytes:
        # "De-duplication": by command id, before anything else, so a
        # retransmission during its own program is a duplicate, not busy.
        if release.command_id in self._ring:
            ack = ReleaseAck(self.boot_id, release.command_id, True, self._count())
            return encode(ack, frame.seq)
        if not 1 <= release.channel <= self.channels:
            return self._nack(frame, NackReason.BAD_CHANNEL)
        if isinstance(release, Release):
            valid = (
                1 <= release.pulse_count <= MAX_PULSES
                and MIN_EDGE_MS <= release.on_ms <= MAX_EDGE_MS
                and MIN_EDGE_MS <= release.off_ms <= MAX_EDGE_MS
            )
        else:
            valid = MIN_HOLD_MS <= release.hold_ms <= MAX_HOLD_MS
        if not valid:
            return self._nack(frame, NackReason.BAD_PARAMS)
        if release.channel in self._running:
            return self._nack(frame, NackReason.CHANNEL_BUSY)
        # Record the id, then start the program (first edge now), then ACK.
        self._ring.append(release.command_id)
        self.exec_count += 1
        running = self._schedule(release, now)
        self._running[release.channel] = running
        self.actuation_count += 1
        if self._actuation_listeners:
            if isinstance(release, Release):
                actuation = Actuation(
                    rx_time, self.boot_id, release.command_id, release.channel,
                    release.pulse_count, release.on_ms, release.off_ms,
                )
            else:
                actuation = Actuation(
                    rx_time, self.boot_id, release.command_id, release.channel,
                    0, 0, 0, kind="level", hold_ms=release.hold_ms,
                )
            for on_actuation in self._actuation_listeners:
                on_actuation(actuation)
        _, on, program_ms = running.edges.popleft()
        self._switch(release.channel, on, running, program_ms, now)
        if self.drop_release_acks > 0:  # simulate the ACK lost on the wire
            self.drop_release_acks -= 1
            return b""
        return encode(ReleaseAck(self.boot_id, release.command_id, False, self._count()), frame.seq)

    def _schedule(self, release: Release | ReleaseLevel, now: float) -> _Running:
        scale = self.time_scale / 1000  # program ms -> seconds

        edges: deque[tuple[float, bool, float]] = deque()
        reboot_at: tuple[float, float] | None = None
        if isinstance(release, Release):
            period = release.on_ms + release.off_ms
            for i in range(release.pulse_count):
                edges.append((now + i * period * scale, True, i * period))
                off_ms = i * period + release.on_ms
                edges.append((now + off_ms * scale, False, off_ms))
            total_ms = release.pulse_count * period
            self.pulse_trains += 1
            if self.pulse_trains == self.faults.reboot_mid_train:
                # In the middle of the middle pulse: some edges done, some not.
                mid_ms = (release.pulse_count // 2) * period + release.on_ms / 2
                reboot_at = (now + mid_ms * scale, mid_ms)
        else:
            edges.append((now, True, 0))
            edges.append((now + release.hold_ms * scale, False, release.hold_ms))
            total_ms = release.hold_ms
        return _Running(release.command_id, now, now + total_ms * scale, edges,
                        reboot_at=reboot_at)

    def _count(self) -> int | None:
        """exec_count as the replies carry it: None (short forms) for firmware 1.1."""
        return self.exec_count if self.fw_minor >= 2 else None

    def _nack(self, frame: Frame, reason: NackReason) -> bytes:
        return encode(Nack(self.boot_id, frame.type, reason), frame.seq)

