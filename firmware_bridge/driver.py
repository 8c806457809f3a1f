"""The interface the gateway core programs against, whatever moves the relay.

Three drivers sit behind it: the serial MCU board (serial_board.SerialBoard, protocol
v1, the board times the pulses and de-duplicates command ids itself), and two
"host-timed" drivers where the gateway times every edge: Modbus RTU relay boards and
Raspberry Pi GPIO. The simulated board passes the same contract, and one conformance
suite (tests/firmware_bridge/test_driver_conformance.py) runs against every driver
that can run here, so the executor never knows which one it talks to.

Levels are *logical* here: "on" means the relay contact is closed (the machine sees a
coin / enable). Relay polarity (active-low boards) is the driver's business: the MCU
board applies its own (firmware setting), host-timed drivers invert for the channels
they are told are active-low. Errors are those of firmware_bridge.exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from firmware_bridge.frames import Pong, QueryReply, ReleaseAck

__all__ = [
    "MAX_CHANNELS",
    "MAX_EDGE_MS",
    "MAX_HOLD_MS",
    "MAX_INPUTS",
    "MAX_PULSES",
    "MIN_EDGE_MS",
    "MIN_HOLD_MS",
    "BoardDriver",
    "InputState",
    "LevelHold",
    "Program",
    "PulseTrain",
    "ring_vouches",
]

# Limits every driver enforces (the MCU board NACKs with bad_params outside them,
# docs/firmware-protocol.md): the one source, for the drivers and the config's cycles.
MAX_PULSES = 50
MIN_EDGE_MS = 10
MAX_EDGE_MS = 5000
MIN_HOLD_MS = 100
MAX_HOLD_MS = 3_600_000
# InputState, like the INPUTS frame, has one bit per input and per relay channel in a
# u64 (docs/firmware-protocol.md, 0x86 INPUTS): inputs and channels are 1..64.
MAX_INPUTS = 64
MAX_CHANNELS = 64


@dataclass(frozen=True)
class PulseTrain:
    """``count`` closures of ``on_ms`` separated by ``off_ms`` (coin emulation: an
    Alliance control counts a 15-130 ms closure as one coin)."""

    count: int
    on_ms: int
    off_ms: int

    @property
    def duration_ms(self) -> int:
        return self.count * (self.on_ms + self.off_ms)


@dataclass(frozen=True)
class LevelHold:
    """Contact held closed for ``hold_ms`` ("enable start" inputs)."""

    hold_ms: int

    @property
    def duration_ms(self) -> int:
        return self.hold_ms


Program = PulseTrain | LevelHold


def ring_vouches(
    *, reply_exec_count: int | None, dispatch_exec_count: int | None, ring_size: int | None
) -> bool:
    """True when a "not executed" QUERY answer from the same boot proves the command never ran.

    ``dispatch_exec_count`` (c0) is any execution count the board reported in this
    boot before the release was first sent; ``reply_exec_count`` (c) the count in
    the QUERY_REPLY; ``ring_size`` (R) the ring size from a PONG of this boot. The
    caller has already checked that the reply's boot id is the dispatch's.

    The board numbers the commands it records 1, 2, 3, ... per boot, and its ring
    holds the ids numbered c-R+1 .. c (docs/firmware-protocol.md "Execution
    count"). Had the command run, it was recorded after the host learned c0, so
    with a number n >= c0+1. Every such n up to c is still in the ring exactly
    when c0+1 >= c-R+1, i.e. ``c - c0 <= R``: then "not in the ring" proves
    "never executed". Beyond that the ring may have forgotten it (c0=0, R=32,
    c=33: an execution numbered 1 is gone), and the answer proves nothing.

    Anything unknown (None: firmware <= 1.1, or no count seen in this boot before
    the release) -> False, as is a count that went backwards or a ring size below
    1 (not a board to believe). False means the outcome is unknown: the caller
    ends in needs_review and never re-sends.
    """
    if reply_exec_count is None or dispatch_exec_count is None or ring_size is None:
        return False
    if ring_size < 1 or reply_exec_count < dispatch_exec_count:
        return False
    return reply_exec_count - dispatch_exec_count <= ring_size


@dataclass(frozen=True)
class InputState:
    """A snapshot of the board's inputs.

    ``inputs``: raw electrical level of the input lines, bit n-1 for input n, 1 = high
    (the gateway applies each machine's active level and debounce).
    ``relays``: sensed relay contacts, bit n-1 for channel n, 1 = closed; None when the
    board cannot sense its contacts (then stuck relays cannot be detected).
    """

    boot_id: int
    inputs: int
    relays: int | None


@runtime_checkable
class BoardDriver(Protocol):
    async def open(self) -> None:
        """Open the link; ``BoardUnavailable`` if it cannot be opened. Never changes
        an output: the caller calls ``all_off`` right after."""

    async def close(self) -> None:
        """Close the link; pending requests fail with ``BoardNoReply``."""

    @property
    def is_open(self) -> bool: ...

    @property
    def boot_id(self) -> int | None:
        """The boot id of the board's latest reply (or the host-timed session's);
        None before any. ``exec_count`` belongs to this boot."""

    @property
    def exec_count(self) -> int | None:
        """The latest execution count of the board's current boot (firmware 1.2, or
        the host-timed session's); None while unknown (firmware <= 1.1, or nothing
        heard since the boot id changed). Read before a release, it is the
        ``dispatch_exec_count`` of ``ring_vouches``."""

    @property
    def ring_size(self) -> int | None:
        """How many command ids the board remembers per boot; None while unknown."""

    async def ping(self) -> Pong:
        """``boot_id`` changes whenever the board (or, for host-timed drivers, the
        driver session) lost its memory of executed command ids."""

    async def release(self, command_id: int, channel: int, program: Program) -> ReleaseAck:
        """Run ``program`` on ``channel`` once per ``command_id`` within one boot.

        Returns when the program has started (first edge done). Raises
        ``BoardUnavailable`` (not sent), ``BoardNack`` (refused, did not act) or
        ``BoardNoReply`` (outcome unknown: recover with ``query``).
        """

    async def query(self, command_id: int) -> QueryReply:
        """Did this boot execute ``command_id``?"""

    async def read_inputs(self) -> InputState: ...

    async def all_off(self) -> None:
        """Every output to its inactive level (contacts open), cancelling running
        programs. Called at start-up before any command is taken."""
