"""A simulated relay board: the other side of protocol v1, shipped as a feature.

``SimulatedBoard`` is sans-I/O: bytes and a clock in, reply bytes out, plus
``advance(now)`` / ``next_deadline()`` for what happens with time (relay edges of
running programs, the machines wired to the relays, a scripted reboot). It
implements the board rules of docs/firmware-protocol.md, firmware 1.2: boot id,
the ring of recent command ids and the execution count, de-duplication by
command id, NACK reasons, busy channels, ALL_OFF, READ_INPUTS (``firmware="1.1"``
answers like an older board: no count, the short reply forms). Around it,
simulated washers and dryers raise their busy input when a release starts them,
and faults are injected (lost, corrupted and delayed frames, a stuck relay, a
reboot in the middle of a pulse train).

Running this module serves it on a pty so the real host driver, the gateway
and benchmarks talk to it exactly as to the MCU::

    python -m firmware_bridge.simulator --actuations FILE [--link PATH]
        [--scenario JSON] [--channels N] [--boot-id HEX] [--time-scale F]
        [--edges FILE] [--machine SPEC]... [--machine-time-scale K]
        [--stuck-relay CH]... [--no-relay-sense] [--drop-rate P] [--corrupt-rate P]
        [--delay-ms N] [--seed S] [--reboot-mid-train N] [--drop-release-acks N]
        [--ring-size N] [--firmware 1.1|1.2] [--control SOCKET]

stdout carries exactly one line, ``PTY <slave path>``. The actuations FILE gets
one JSON line per executed release, fsync'ed before the RELEASE_ACK leaves, so a
test can count physical releases even when acks are lost; the edges FILE one
JSON line per relay edge. stderr tells ``BOOT <id>``, ``REBOOT <id>``,
``UNPLUG`` and ``PLUG <pty path> <boot id>``.

Signals: SIGHUP resets the board (new boot id, ring cleared, outputs off);
SIGUSR1 is "USB unplugged" (the pty closes, the --link symlink disappears);
SIGUSR2 is "plugged back" (a new pty, the link re-created, a new boot id since a
replugged board power-cycles); SIGTERM/SIGINT exit cleanly.

``--control SOCKET`` listens on a Unix stream socket for line commands that act
on the board's input lines like a test clip on the wire: ``input N high``,
``input N low`` force input N's raw level whatever its machines do, ``input N
auto`` hands it back to them. Each line is answered ``ok`` once applied (a
READ_INPUTS sent afterwards sees it) or ``error <reason>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import signal
import sys
import time
import tty
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import IO, Any

from firmware_bridge.driver import (
    MAX_EDGE_MS,
    MAX_HOLD_MS,
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

__all__ = [
    "Actuation",
    "Edge",
    "Faults",
    "MachineSpec",
    "SimulatedBoard",
    "load_scenario",
    "main",
]

LOGGER = logging.getLogger(__name__)

# "Board behaviour": limits a v1 board enforces (shared with every driver).
# Recent command ids remembered per boot ("De-duplication"): 32 is the minimum
# real firmware may keep; --ring-size goes lower only to make forgetting testable.
RING_SIZE = 32
MAX_PULSE_COUNT = MAX_PULSES
MIN_PULSE_MS = MIN_EDGE_MS
MAX_PULSE_MS = MAX_EDGE_MS
FW_MAJOR, FW_MINOR = 1, 2  # 1.1: RELEASE_LEVEL, ALL_OFF, READ_INPUTS; 1.2: exec_count
FIRMWARES = ("1.1", "1.2")  # what --firmware can answer as
_HOST_TYPES = (
    FrameType.PING, FrameType.RELEASE, FrameType.QUERY,
    FrameType.RELEASE_LEVEL, FrameType.ALL_OFF, FrameType.READ_INPUTS,
)
# A "level" machine starts on an enable held at least this long.
LEVEL_START_MS = 100


@dataclass(frozen=True, slots=True)
class Actuation:
    """One physical release, as the board's relay would perform it."""

    rx_monotonic: float  # time.monotonic() of the read holding the frame's first byte
    boot_id: int
    command_id: int
    channel: int
    pulse_count: int  # 0 for a level hold
    on_ms: int
    off_ms: int
    kind: str = "pulses"  # "pulses" | "level"
    hold_ms: int = 0


@dataclass(frozen=True, slots=True)
class Edge:
    """A relay contact changing state, at the time the board switched it."""

    monotonic: float
    channel: int
    on: bool
    command_id: int | None  # None when no program drives it


@dataclass(frozen=True)
class MachineSpec:
    """A washer or dryer wired to relay ``channel``, busy on input ``input``.

    Timings are machine milliseconds, divided by the machine time scale.
    """

    channel: int
    input: int
    start_ms: int = 300  # from start condition to busy
    run_ms: int = 2000  # busy duration
    never_starts: bool = False
    late_ms: int | None = None  # start this long after the condition instead
    coins: int = 1  # pulses in one train needed to start
    level: bool = False  # starts on an enable held >= LEVEL_START_MS
    minutes_per_pulse: float = 0.0  # dryer top-up: run extended per pulse while busy
    active_low: bool = False  # busy input raw level 1 when idle, 0 while running

    @classmethod
    def parse(cls, spec: str) -> MachineSpec:
        """``channel=1,input=1,start_ms=300,run_ms=2000,never_starts,coins=2,active_low,...``"""
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            values[key.strip()] = value.strip() if sep else True
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MachineSpec:
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown machine option {key!r}")
            if key in ("never_starts", "level", "active_low"):
                kwargs[key] = value if isinstance(value, bool) else str(value).lower() in (
                    "1", "true", "yes"
                )
            elif key == "minutes_per_pulse":
                kwargs[key] = float(value)
            else:
                kwargs[key] = int(value)
        if "channel" not in kwargs or "input" not in kwargs:
            raise ValueError("a machine needs channel= and input=")
        spec = cls(**kwargs)
        if not (1 <= spec.channel <= 255 and 1 <= spec.input <= 64):
            raise ValueError("machine channel must be 1..255 and input 1..64")
        if spec.coins < 1 or min(spec.start_ms, spec.run_ms, spec.late_ms or 0) < 0:
            raise ValueError("machine coins must be >= 1 and timings >= 0")
        return spec


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


class _Machine:
    """Sans-I/O washer/dryer: relay edges in, busy level out."""

    def __init__(self, spec: MachineSpec, machine_time_scale: float) -> None:
        self.spec = spec
        self._scale = machine_time_scale
        self.state = "idle"  # idle | starting | running
        self._train: int | None = None  # command id of the train being counted
        self._pulses = 0
        self._on_since: float | None = None
        self._start_at = 0.0
        self._run_until = 0.0
        self._extra_s = 0.0  # top-up received while starting

    def _seconds(self, machine_ms: float) -> float:
        return machine_ms / 1000 / self._scale

    @property
    def busy(self) -> bool:
        return self.state == "running"

    @property
    def raw_level(self) -> bool:
        """The busy input's electrical level (1 = high)."""
        return self.busy != self.spec.active_low

    def next_deadline(self) -> float | None:
        if self.state == "starting":
            return self._start_at
        if self.state == "running":
            return self._run_until
        return None

    def advance(self, now: float) -> None:
        if self.state == "starting" and now >= self._start_at:
            self.state = "running"
            self._run_until = self._start_at + self._seconds(self.spec.run_ms) + self._extra_s
            self._extra_s = 0.0
        if self.state == "running" and now >= self._run_until:
            self.state = "idle"

    def edge(self, edge: Edge, held_ms: float) -> None:
        """``held_ms``: for an off edge, how long the contact was closed, in the
        program's own milliseconds (independent of the relay time scale)."""
        self.advance(edge.monotonic)
        if edge.on:
            return
        spec = self.spec
        if self.state != "idle":
            if spec.minutes_per_pulse > 0 and held_ms >= MIN_EDGE_MS:
                extra = self._seconds(spec.minutes_per_pulse * 60_000)
                if self.state == "running":
                    self._run_until += extra
                else:
                    self._extra_s += extra
            return
        if spec.level:
            met = held_ms >= LEVEL_START_MS
        else:
            if edge.command_id != self._train:
                self._train, self._pulses = edge.command_id, 0
            self._pulses += 1
            met = self._pulses >= spec.coins
        if not met or spec.never_starts:
            return
        self._train, self._pulses = None, 0
        delay_ms = spec.late_ms if spec.late_ms is not None else spec.start_ms
        self.state = "starting"
        self._start_at = edge.monotonic + self._seconds(delay_ms)


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
        self._on_actuation = on_actuation
        self._on_edge = on_edge
        self._on_reboot = on_reboot
        self._decoder = FrameDecoder()
        self._reads: deque[tuple[int, float]] = deque()  # (stream offset, read time)
        self._received = 0
        self._ring: deque[int] = deque(maxlen=ring_size)
        self._running: dict[int, _Running] = {}
        self._relays = 0  # actual contacts, bit n-1 = channel n closed
        self._machines = [_Machine(spec, machine_time_scale) for spec in machines]
        self._forced: dict[int, bool] = {}  # input -> raw level forced from outside

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
        if not 1 <= n <= 64:
            raise ValueError("input must be 1..64")
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
        if self._on_reboot is not None:
            self._on_reboot(self.boot_id)
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
        if self._on_edge is not None:
            self._on_edge(edge)
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
                1 <= release.pulse_count <= MAX_PULSE_COUNT
                and MIN_PULSE_MS <= release.on_ms <= MAX_PULSE_MS
                and MIN_PULSE_MS <= release.off_ms <= MAX_PULSE_MS
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
        if self._on_actuation is not None:
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
            self._on_actuation(actuation)
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


# --- scenario ------------------------------------------------------------------

_SCENARIO_KEYS = {
    "channels", "boot_id", "time_scale", "edges", "machine", "machines",
    "machine_time_scale", "stuck_relay", "no_relay_sense", "drop_rate", "corrupt_rate",
    "delay_ms", "seed", "reboot_mid_train", "drop_release_acks", "ring_size", "firmware",
}


def load_scenario(path: str) -> dict[str, Any]:
    """A scenario JSON object: the command-line options, dashes as underscores
    (``"machine"`` or ``"machines"``: a list of SPEC strings or objects;
    ``"stuck_relay"``: a channel or a list; ``"boot_id"``: hex string)."""
    with open(path, encoding="utf-8") as file:
        scenario = json.load(file)
    if not isinstance(scenario, dict):
        raise ValueError("a scenario is a JSON object")
    unknown = set(scenario) - _SCENARIO_KEYS
    if unknown:
        raise ValueError(f"unknown scenario keys: {sorted(unknown)}")
    return scenario


def _machine_spec(item: object) -> MachineSpec:
    if isinstance(item, str):
        return MachineSpec.parse(item)
    if isinstance(item, dict):
        return MachineSpec.from_dict(item)
    raise ValueError(f"a machine is a SPEC string or an object, not {item!r}")


# --- the program ---------------------------------------------------------------


class _JsonLines:
    """Append-only JSON lines; ``durable`` fsyncs each (actuations: before the ACK)."""

    def __init__(self, path: str, *, durable: bool) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")
        self._durable = durable

    def write(self, line: Mapping[str, object]) -> None:
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._durable:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _actuation_line(actuation: Actuation) -> dict[str, object]:
    line: dict[str, object] = {
        "time": time.time(),
        "rx_monotonic": actuation.rx_monotonic,
        "boot_id": f"{actuation.boot_id:08x}",
        "command_id": f"{actuation.command_id:016x}",
        "channel": actuation.channel,
        "kind": actuation.kind,
        "pulse_count": actuation.pulse_count,
        "on_ms": actuation.on_ms,
        "off_ms": actuation.off_ms,
    }
    if actuation.kind == "level":
        line["hold_ms"] = actuation.hold_ms
    return line


def _edge_line(edge: Edge) -> dict[str, object]:
    return {
        "monotonic": edge.monotonic,
        "channel": edge.channel,
        "state": "on" if edge.on else "off",
        "command_id": None if edge.command_id is None else f"{edge.command_id:016x}",
    }


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("a rate is 0..1")
    return value


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m firmware_bridge.simulator",
        description="Serve a simulated relay board (protocol v1) on a pty.",
        epilog="Options given on the command line override the scenario file; "
        "machines and stuck relays from both are combined.",
    )
    parser.add_argument("--actuations", required=True, metavar="FILE",
                        help="append one JSON line per executed release (fsync'ed)")
    parser.add_argument("--link", metavar="PATH",
                        help="create/replace a symlink PATH -> pty slave")
    parser.add_argument("--scenario", metavar="FILE",
                        help="JSON object with any of the options below (underscores)")
    parser.add_argument("--channels", type=int, metavar="N", help="relay channels (8)")
    parser.add_argument("--drop-release-acks", type=int, metavar="N",
                        help="act on the first N releases but do not send their ACK")
    parser.add_argument("--boot-id", type=lambda s: int(s, 16), metavar="HEX",
                        help="initial boot id (default random)")
    parser.add_argument("--time-scale", type=float, metavar="F",
                        help="relay timing factor; 1 = real time, 0 = instantaneous (default)")
    parser.add_argument("--edges", metavar="FILE", help="append one JSON line per relay edge")
    parser.add_argument("--machine", action="append", metavar="SPEC",
                        help="e.g. channel=1,input=1,start_ms=300,run_ms=2000[,never_starts]"
                        "[,late_ms=N][,coins=N][,level][,minutes_per_pulse=M][,active_low];"
                        " repeatable")
    parser.add_argument("--machine-time-scale", type=float, metavar="K",
                        help="machine timings are divided by K (default 1)")
    parser.add_argument("--stuck-relay", type=int, action="append", metavar="CH",
                        help="channel CH's contact is sensed closed always; repeatable")
    parser.add_argument("--no-relay-sense", action="store_true", default=None,
                        help="the board cannot sense its contacts (INPUTS flags bit0 = 0)")
    parser.add_argument("--drop-rate", type=_rate, metavar="P",
                        help="lose each received frame and each reply with probability P")
    parser.add_argument("--corrupt-rate", type=_rate, metavar="P",
                        help="flip a bit in a byte of each reply with probability P")
    parser.add_argument("--delay-ms", type=int, metavar="N", help="delay every reply by N ms")
    parser.add_argument("--seed", type=int, metavar="S", help="seed of the fault generator")
    parser.add_argument("--reboot-mid-train", type=int, metavar="N",
                        help="reboot in the middle of the Nth pulse train (after its ACK)")
    parser.add_argument("--ring-size", type=int, metavar="N",
                        help=f"command ids remembered per boot ({RING_SIZE}); real firmware "
                        "keeps >= 32, fewer only to test forgetting")
    parser.add_argument("--firmware", choices=FIRMWARES,
                        help="answer as this firmware (1.2); 1.1: no exec_count/ring_size, "
                        "the short PONG, RELEASE_ACK and QUERY_REPLY")
    parser.add_argument("--control", metavar="SOCKET",
                        help="Unix socket taking 'input N high|low|auto' lines (force an "
                        "input's raw level / give it back to its machines); answers 'ok'")
    args = parser.parse_args(argv)
    try:
        scenario = load_scenario(args.scenario) if args.scenario else {}
        defaults: dict[str, Any] = {
            "channels": 8, "drop_release_acks": 0, "boot_id": None, "time_scale": 0.0,
            "edges": None, "machine_time_scale": 1.0, "no_relay_sense": False,
            "drop_rate": 0.0, "corrupt_rate": 0.0, "delay_ms": 0, "seed": None,
            "reboot_mid_train": 0, "ring_size": RING_SIZE, "firmware": FIRMWARES[-1],
        }
        for key, default in defaults.items():
            if getattr(args, key) is None:
                value = scenario.get(key, default)
                if key == "boot_id" and isinstance(value, str):
                    value = int(value, 16)
                setattr(args, key, value)
        items = list(scenario.get("machine", [])) + list(scenario.get("machines", []))
        args.machines = [_machine_spec(m) for m in items + (args.machine or [])]
        stuck = scenario.get("stuck_relay", [])
        args.stuck_relays = frozenset(
            ([stuck] if isinstance(stuck, int) else list(stuck)) + (args.stuck_relay or [])
        )
    except (OSError, ValueError, TypeError) as exc:
        parser.error(str(exc))
    if not 1 <= args.channels <= 255:
        parser.error("--channels must be 1..255")
    if not 1 <= args.ring_size <= 0xFFFF or str(args.firmware) not in FIRMWARES:
        parser.error(f"--ring-size must be 1..65535 and --firmware one of {FIRMWARES}")
    args.firmware = str(args.firmware)
    if args.boot_id is not None and not 0 < args.boot_id <= 0xFFFFFFFF:
        parser.error("--boot-id must be a non-zero u32")
    if args.time_scale < 0 or args.machine_time_scale <= 0 or args.delay_ms < 0:
        parser.error("--time-scale and --delay-ms must be >= 0, --machine-time-scale > 0")
    if not all(0 <= r <= 1 for r in (args.drop_rate, args.corrupt_rate)):
        parser.error("rates are 0..1")
    if any(not 1 <= c <= args.channels for c in args.stuck_relays):
        parser.error("--stuck-relay must name a channel 1..N")
    if any(not 1 <= m.channel <= args.channels for m in args.machines):
        parser.error("a machine's channel must be 1..N")
    return args


def _replace_symlink(link: str, target: str) -> None:
    tmp = f"{link}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)  # atomic: a client never sees the link missing


class _Pty:
    """The board's end of the "USB cable": a pty pair that can be unplugged."""

    def __init__(self, link: str | None) -> None:
        self.link = link
        self.master = self.slave = -1
        self.path = ""

    @property
    def plugged(self) -> bool:
        return self.master >= 0

    def plug(self) -> None:
        self.master, self.slave = os.openpty()
        # Keep our own slave fd open while plugged: without it the master reads
        # EIO whenever the client closes the port, breaking reopen.
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        if self.link:
            _replace_symlink(self.link, self.path)

    def unplug(self) -> None:
        if self.link and os.path.realpath(self.link) == self.path:
            os.unlink(self.link)
        # Closing both ends hangs up the host's open slave: its reads and
        # writes fail, like a USB serial adapter that vanished.
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1


def _control_command(board: SimulatedBoard, line: str) -> str:
    """One ``--control`` line applied to ``board``; the answer line."""
    words = line.split()
    levels = {"high": True, "1": True, "low": False, "0": False, "auto": None}
    if len(words) != 3 or words[0] != "input" or words[2].lower() not in levels:
        return "error expected: input N high|low|auto"
    try:
        board.force_input(int(words[1]), levels[words[2].lower()])
    except ValueError as exc:
        return f"error {exc}"
    return "ok"


async def _serve(
    port: _Pty, board: SimulatedBoard, delay_s: float, control: str | None = None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    timer: asyncio.TimerHandle | None = None

    def reschedule() -> None:
        nonlocal timer
        if timer is not None:
            timer.cancel()
            timer = None
        deadline = board.next_deadline()
        if deadline is not None:
            # loop.time() is time.monotonic() on the default loop.
            timer = loop.call_at(deadline, tick)

    def tick() -> None:
        board.advance(time.monotonic())
        reschedule()

    def write(master: int, reply: bytes) -> None:
        if master != port.master:
            return  # unplugged (and maybe replugged) since: the bytes are gone
        try:
            os.write(master, reply)
        except BlockingIOError:
            # Nobody reads the slave and its queue is full: like a UART
            # transmitting into a cut cable, the reply is lost.
            LOGGER.warning("reply dropped: pty output queue full")

    def on_readable() -> None:
        master = port.master
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
            if delay_s > 0:
                loop.call_later(delay_s, write, master, reply)
            else:
                write(master, reply)
        board.advance(time.monotonic())
        reschedule()

    def on_hup() -> None:
        board.reboot(time.monotonic())  # prints REBOOT through on_reboot
        reschedule()

    def on_unplug() -> None:
        if not port.plugged:
            return
        loop.remove_reader(port.master)
        port.unplug()
        # The board loses power with its USB cable: outputs drop now.
        board.reboot(time.monotonic())
        reschedule()
        print("UNPLUG", file=sys.stderr, flush=True)

    def on_plug() -> None:
        if port.plugged:
            return
        port.plug()
        loop.add_reader(port.master, on_readable)
        print(f"PLUG {port.path} {board.boot_id:08x}", file=sys.stderr, flush=True)

    async def on_control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                answer = _control_command(board, line.decode("utf-8", "replace"))
                writer.write(answer.encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server: asyncio.AbstractServer | None = None
    if control is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        server = await asyncio.start_unix_server(on_control, path=control)
    loop.add_reader(port.master, on_readable)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGUSR1, on_unplug)
    loop.add_signal_handler(signal.SIGUSR2, on_plug)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await stop.wait()
    finally:
        if server is not None and control is not None:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control)
        if port.plugged:
            loop.remove_reader(port.master)
        if timer is not None:
            timer.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="simulator: %(levelname)s %(message)s")
    port = _Pty(args.link)
    port.plug()
    print(f"PTY {port.path}", flush=True)
    actuations = _JsonLines(args.actuations, durable=True)
    edges = _JsonLines(args.edges, durable=False) if args.edges else None
    board = SimulatedBoard(
        channels=args.channels,
        boot_id=args.boot_id,
        on_actuation=lambda a: actuations.write(_actuation_line(a)),
        on_edge=(lambda e: edges.write(_edge_line(e))) if edges else None,
        on_reboot=lambda b: print(f"REBOOT {b:08x}", file=sys.stderr, flush=True),
        drop_release_acks=args.drop_release_acks,
        time_scale=args.time_scale,
        machines=args.machines,
        machine_time_scale=args.machine_time_scale,
        faults=Faults(
            drop_rate=args.drop_rate,
            corrupt_rate=args.corrupt_rate,
            seed=args.seed,
            stuck_relays=args.stuck_relays,
            reboot_mid_train=args.reboot_mid_train,
        ),
        sense_relays=not args.no_relay_sense,
        ring_size=args.ring_size,
        firmware=args.firmware,
    )
    print(f"BOOT {board.boot_id:08x}", file=sys.stderr, flush=True)
    try:
        asyncio.run(_serve(port, board, args.delay_ms / 1000, args.control))
    finally:
        actuations.close()
        if edges is not None:
            edges.close()
        port.unplug()
    return 0


if __name__ == "__main__":
    sys.exit(main())
