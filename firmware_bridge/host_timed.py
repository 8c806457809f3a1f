"""Drivers where the gateway times every edge (Modbus RTU relay boards, GPIO).

The MCU board of protocol v1 times its own pulses and remembers executed command ids
per boot. A Modbus relay board or a GPIO line knows neither, so ``HostTimedBoard``
plays that part on the host, on top of two primitives a subclass provides:

- ``_set_output(channel, on)``: drive one channel to a *logical* level (on = contact
  closed); the subclass inverts the channels in ``active_low``;
- ``_read_raw() -> (inputs, relays | None)``: one snapshot of the input lines and,
  where the board senses them, of the relay contacts.

Rules (the same contract as the MCU board, driver.BoardDriver):

- **Boot id = driver session.** A random non-zero 32-bit id is drawn at every
  ``open()``. The session is the memory of executed command ids, so a restarted
  gateway can never claim to know what an earlier process did: recovery then sees a
  new boot id and ends in ``needs_review`` (conservative on purpose, DESIGN.md).
- **At most once per command id** within the session: a repeat answers
  ``ReleaseAck(duplicate=True)`` and never runs again. The id is recorded *before*
  the first write; it is forgotten again only when that write provably did not act
  (``BoardUnavailable`` / ``BoardNack``). After ``BoardNoReply`` it stays recorded,
  so ``query`` answers "executed" and nothing can pulse it a second time.
- **A ring and a count, like firmware 1.2.** The ids live in a ring of the last
  ``RING_SIZE`` recorded (a box runs for months: memory stays bounded), and
  ``exec_count`` counts every id recorded this session. Replies carry both, so
  ``driver.ring_vouches`` judges a "not executed" here exactly as for the MCU
  board. An id forgotten again because its first write provably did not act
  stays counted: the count may run ahead, which only makes the rule more cautious.
- **Ack after the first edge.** ``release`` validates (``BoardNack`` bad_channel /
  bad_params / channel_busy, nothing written), writes the first "on" edge and returns
  once that write succeeded; the rest of the program runs as a background task. A
  failure later in the train is logged, the outputs are forced off and an
  ``OutputFault`` is appended to ``faults`` (and passed to ``on_fault``): the release
  was already acknowledged and must not be reported twice.
- **Timing** uses absolute monotonic deadlines from the moment the first write was
  issued, so neither sleep overshoot nor bus latency accumulates along a train.
- **One bus, one transaction at a time**: every primitive runs under ``_bus_lock``;
  a write in flight is shielded from cancellation so it is never half-done.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from firmware_bridge.driver import (
    MAX_EDGE_MS,
    MAX_HOLD_MS,
    MAX_PULSES,
    MIN_EDGE_MS,
    MIN_HOLD_MS,
    InputState,
    LevelHold,
    Program,
    PulseTrain,
)
from firmware_bridge.exceptions import BoardError, BoardNack, BoardNoReply, BoardUnavailable
from firmware_bridge.frames import FrameType, NackReason, Pong, QueryReply, ReleaseAck

__all__ = [
    "RING_SIZE",
    "HostTimedBoard",
    "OutputFault",
    "check_channels",
    "program_edges",
    "validate_program",
]

LOGGER = logging.getLogger(__name__)

# Command ids remembered per session, the host-side twin of the MCU board's ring
# (docs/firmware-protocol.md "De-duplication", at least 32): bounded, so a session
# up for months does not grow, and far larger than the releases a store makes
# while one of them is in doubt (1024 is days of a busy store's cycles).
RING_SIZE = 1024

T = TypeVar("T")


@dataclass(frozen=True)
class OutputFault:
    """A write that failed after the release was acknowledged (or while forcing
    outputs off). ``command_id`` is None for all_off/close."""

    monotonic: float
    channel: int
    command_id: int | None
    error: BaseException


def check_channels(channels: int, active_low: Iterable[int]) -> None:
    """Raise ``ValueError`` unless there is a channel and every active-low one exists.
    (The gateway's config asks too, so that a config check refuses what this would.)"""
    if channels < 1:
        raise ValueError("channels must be >= 1")
    bad = sorted(c for c in active_low if not 1 <= c <= channels)
    if bad:
        raise ValueError(f"active_low channels {bad} not in 1..{channels}")


def validate_program(program: Program) -> str | None:
    """Why ``program`` is outside the limits of driver.py, or None when it is fine."""
    if isinstance(program, PulseTrain):
        if not 1 <= program.count <= MAX_PULSES:
            return f"pulse count {program.count} not in 1..{MAX_PULSES}"
        for name, ms in (("on_ms", program.on_ms), ("off_ms", program.off_ms)):
            if not MIN_EDGE_MS <= ms <= MAX_EDGE_MS:
                return f"{name} {ms} not in {MIN_EDGE_MS}..{MAX_EDGE_MS}"
        return None
    if isinstance(program, LevelHold):
        if not MIN_HOLD_MS <= program.hold_ms <= MAX_HOLD_MS:
            return f"hold_ms {program.hold_ms} not in {MIN_HOLD_MS}..{MAX_HOLD_MS}"
        return None
    return f"unknown program {program!r}"


def program_edges(program: Program) -> tuple[list[tuple[float, bool]], float]:
    """Edges of ``program`` as (offset in s from the first edge, on) and the time the
    channel stays busy (a train keeps its trailing off gap, so a following release
    cannot merge with the last pulse)."""
    if isinstance(program, PulseTrain):
        period = (program.on_ms + program.off_ms) / 1000
        edges: list[tuple[float, bool]] = []
        for k in range(program.count):
            edges.append((k * period, True))
            edges.append((k * period + program.on_ms / 1000, False))
        return edges, program.count * period
    return [(0.0, True), (program.hold_ms / 1000, False)], program.hold_ms / 1000


def _log_orphan_error(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        LOGGER.debug("bus transaction ended with %r", task.exception())


def _log_task_outcome(task: asyncio.Task[None]) -> None:
    """Retrieve a program task's exception (none is expected: ``_run_program``
    reports its failures itself) so nothing ends silently or as "never retrieved"."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        LOGGER.error("program task %s ended with %r", task.get_name(), exc, exc_info=exc)


def _new_boot_id() -> int:
    while True:
        boot_id = secrets.randbits(32)
        if boot_id:
            return boot_id


class HostTimedBoard(abc.ABC):
    """Base of the host-timed drivers; satisfies ``driver.BoardDriver``."""

    FW_MAJOR = 0  # Pong fields: no firmware of ours runs on these boards
    FW_MINOR = 0

    def __init__(
        self,
        *,
        channels: int,
        active_low: frozenset[int] = frozenset(),
        on_fault: Callable[[OutputFault], None] | None = None,
    ) -> None:
        check_channels(channels, active_low)
        self.channels = channels
        self.active_low = frozenset(active_low)
        self.on_fault = on_fault
        self.faults: list[OutputFault] = []
        self._bus_lock = asyncio.Lock()  # one transaction on the bus at a time
        self._open = False
        self._boot_id = 0
        self._executed: deque[int] = deque(maxlen=RING_SIZE)
        self._exec_count = 0  # ids recorded this session ("Execution count")
        self._running: dict[int, asyncio.Task[None]] = {}  # channel -> program task
        self._starting: dict[int, asyncio.Future[None]] = {}  # command id -> first edge

    # --- what a subclass provides --------------------------------------------

    @abc.abstractmethod
    async def _connect(self) -> None:
        """Acquire the bus (exclusively); ``BoardUnavailable`` if impossible."""

    @abc.abstractmethod
    async def _disconnect(self) -> None:
        """Give the bus back. Must not raise."""

    @abc.abstractmethod
    async def _set_output(self, channel: int, on: bool) -> None:
        """Drive ``channel`` to the logical level ``on`` (apply ``active_low``).

        Raise ``BoardUnavailable`` (not written), ``BoardNack`` (refused) or
        ``BoardNoReply`` (may have been applied)."""

    @abc.abstractmethod
    async def _read_raw(self) -> tuple[int, int | None]:
        """(input lines, bit n-1 = input n high; sensed relays or None)."""

    def _is_low_active(self, channel: int) -> bool:
        return channel in self.active_low

    # --- BoardDriver -------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def boot_id(self) -> int:
        return self._boot_id

    @property
    def exec_count(self) -> int:
        """Command ids recorded in this session (0 at every ``open``)."""
        return self._exec_count

    @property
    def ring_size(self) -> int:
        return RING_SIZE

    async def open(self) -> None:
        if self._open:
            return
        await self._connect()
        self._boot_id = _new_boot_id()
        self._executed = deque(maxlen=RING_SIZE)
        self._exec_count = 0
        self.faults = []
        self._open = True
        LOGGER.info("%r opened, boot id %08x", self, self._boot_id)

    async def close(self) -> None:
        if not self._open:
            return
        try:
            await self._stop_programs()
            # Best effort: a relay left closed would keep feeding coins.
            await self._all_outputs_off(command_id=None)
        finally:
            self._open = False
            await self._disconnect()
            LOGGER.info("%r closed", self)

    async def ping(self) -> Pong:
        self._require_open()
        await self._bus(self._read_raw)  # proves the bus answers
        return Pong(
            self._boot_id, self.FW_MAJOR, self.FW_MINOR, self.channels,
            self._exec_count, RING_SIZE,
        )

    async def query(self, command_id: int) -> QueryReply:
        self._require_open()
        executed = command_id in self._executed
        return QueryReply(self._boot_id, command_id, executed, self._exec_count)

    async def read_inputs(self) -> InputState:
        self._require_open()
        inputs, relays = await self._bus(self._read_raw)
        return InputState(self._boot_id, inputs, relays)

    async def all_off(self) -> None:
        self._require_open()
        await self._stop_programs()
        errors = await self._all_outputs_off(command_id=None)
        if errors:
            # The caller must not take commands with a relay possibly closed.
            raise errors[0]

    async def release(self, command_id: int, channel: int, program: Program) -> ReleaseAck:
        self._require_open()
        boot_id = self._boot_id
        # The request type a NACK names: what an MCU board would have been sent.
        request_type = (
            FrameType.RELEASE_LEVEL if isinstance(program, LevelHold) else FrameType.RELEASE
        )
        if not 1 <= channel <= self.channels:
            raise BoardNack(NackReason.BAD_CHANNEL, request_type, boot_id)
        problem = validate_program(program)
        if problem is not None:
            LOGGER.warning("refusing command %016x: %s", command_id, problem)
            raise BoardNack(NackReason.BAD_PARAMS, request_type, boot_id)
        if command_id in self._executed:
            starting = self._starting.get(command_id)
            if starting is not None:
                # A repeat racing the first edge answers what the original learns:
                # never "duplicate" for a release that turns out not to have acted.
                await asyncio.shield(starting)
            # The session's current count (None if it was reopened meanwhile).
            count = self._exec_count if self._boot_id == boot_id else None
            return ReleaseAck(boot_id, command_id, duplicate=True, exec_count=count)
        task = self._running.get(channel)
        if task is not None and not task.done():
            raise BoardNack(NackReason.CHANNEL_BUSY, request_type, boot_id)

        edges, busy_s = program_edges(program)
        # Recorded before the first byte, like the board's ring (protocol "Board
        # behaviour"): a concurrent repeat of this id is a duplicate from here on.
        self._executed.append(command_id)
        self._exec_count += 1
        exec_count = self._exec_count
        started = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            self._run_program(command_id, channel, edges, busy_s, started),
            name=f"release-{command_id:016x}-ch{channel}",
        )
        task.add_done_callback(_log_task_outcome)
        self._running[channel] = task
        self._starting[command_id] = started
        try:
            await asyncio.shield(started)
        except BoardNack as exc:
            self._forget(command_id)  # provably did not act
            if exc.request_type != request_type:
                # The primitive does not know the program: name the release frame.
                raise BoardNack(exc.reason, request_type, exc.boot_id) from exc
            raise
        except BoardUnavailable:
            self._forget(command_id)  # provably did not act
            raise
        finally:
            self._starting.pop(command_id, None)
        return ReleaseAck(boot_id, command_id, duplicate=False, exec_count=exec_count)

    # --- internals --------------------------------------------------------------------

    def _forget(self, command_id: int) -> None:
        with contextlib.suppress(ValueError):  # already pushed out of the ring
            self._executed.remove(command_id)

    def _require_open(self) -> None:
        if not self._open:
            raise BoardUnavailable(f"{self!r} is not open")

    async def _bus(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one bus transaction under the lock, shielded so a cancelled caller
        never leaves a write half done on the bus."""

        async def locked() -> T:
            async with self._bus_lock:
                return await operation()

        inner = asyncio.ensure_future(locked())
        # If the caller is cancelled the transaction still completes; retrieve its
        # outcome so a late error is logged once instead of "never retrieved".
        inner.add_done_callback(_log_orphan_error)
        return await asyncio.shield(inner)

    async def _run_program(
        self,
        command_id: int,
        channel: int,
        edges: list[tuple[float, bool]],
        busy_s: float,
        started: asyncio.Future[None],
    ) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()  # monotonic; deadlines below are absolute
        index = 0
        try:
            try:
                await self._bus(functools.partial(self._set_output, channel, True))
            except BaseException as exc:
                if isinstance(exc, BoardNoReply) or (
                    isinstance(exc, Exception) and not isinstance(exc, BoardError)
                ):
                    # The "on" may have reached the relay: do not leave it closed.
                    await self._force_off(channel, command_id)
                if not started.done():
                    if isinstance(exc, BoardError):
                        started.set_exception(exc)
                    else:
                        started.set_exception(
                            BoardNoReply(f"first edge of {command_id:016x} interrupted: {exc!r}")
                        )
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            started.set_result(None)
            for offset, on in edges[1:]:
                index += 1
                delay = t0 + offset - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._bus(functools.partial(self._set_output, channel, on))
            delay = t0 + busy_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise  # all_off/close write every output off themselves
        except Exception as exc:  # BoardError, or a stray one (gpiod, pymodbus, a bug)
            log = LOGGER.error if isinstance(exc, BoardError) else LOGGER.exception
            log(
                "command %016x channel %d failed at edge %d of %d after the ack: %s",
                command_id, channel, index + 1, len(edges), exc,
            )
            self._report(OutputFault(time.monotonic(), channel, command_id, exc))
            await self._force_off(channel, command_id)
        finally:
            if self._running.get(channel) is asyncio.current_task():
                del self._running[channel]

    async def _force_off(self, channel: int, command_id: int | None) -> bool:
        """Best effort: never raises except ``CancelledError``."""
        try:
            await self._bus(functools.partial(self._set_output, channel, False))
        except Exception as exc:
            LOGGER.error("could not force channel %d off: %r", channel, exc)
            self._report(OutputFault(time.monotonic(), channel, command_id, exc))
            return False
        return True

    async def _all_outputs_off(self, command_id: int | None) -> list[BoardError]:
        errors: list[BoardError] = []
        for channel in range(1, self.channels + 1):
            try:
                await self._bus(functools.partial(self._set_output, channel, False))
            except BoardError as exc:
                LOGGER.error("could not switch channel %d off: %s", channel, exc)
                self._report(OutputFault(time.monotonic(), channel, command_id, exc))
                errors.append(exc)
                if isinstance(exc, BoardUnavailable):
                    break  # the bus is gone: every other channel would fail alike
        return errors

    async def _stop_programs(self) -> None:
        tasks = [task for task in self._running.values() if not task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _report(self, fault: OutputFault) -> None:
        self.faults.append(fault)
        if self.on_fault is not None:
            try:
                self.on_fault(fault)
            except Exception:  # a broken callback must not stop forcing outputs off
                LOGGER.exception("on_fault callback failed")
