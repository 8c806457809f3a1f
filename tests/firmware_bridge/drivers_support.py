"""The other side of each driver, for the driver conformance suite.

- ``FakeGpioChip``: stands in for a Raspberry Pi GPIO chip (none exists here) behind
  ``gpio_board.GpioChip``; one owner per line, like the kernel.
- ``ModbusPtyServer``: pymodbus' own RTU server in a thread of its own, on a real pty
  pair bridged byte for byte, with a datastore that timestamps every coil write.
- ``SimulatorEdges``: the simulator program's ``--edges`` file, and its ``--control``
  socket to set input levels.
- ``MemoryLinkObserver``: the simulated board on an in-memory link, read in process.

Each observer offers ``edges(channel) -> [(monotonic, on)]`` (level changes only,
logical level, starting from off) and ``set_input(n, level)``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import threading
import time
import tty
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

from pymodbus import FramerType
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from firmware_bridge.simulator import MemoryLink


class Observer(Protocol):
    def edges(self, channel: int) -> list[tuple[float, bool]]: ...

    def set_input(self, n: int, level: bool) -> None: ...


def transitions(writes: Sequence[tuple[float, bool]]) -> list[tuple[float, bool]]:
    """Level changes among timestamped writes, from an initial "off"."""
    out: list[tuple[float, bool]] = []
    level = False
    for t, on in writes:
        if on != level:
            out.append((t, on))
            level = on
    return out


# --- GPIO ------------------------------------------------------------------------


class FakeGpioChip:
    """A GPIO chip in memory: records every output set with ``time.monotonic()`` and
    lets the test drive input levels. A requested line cannot be requested again
    until released (EBUSY), as the kernel enforces."""

    def __init__(self, num_lines: int = 32) -> None:
        self.num_lines = num_lines
        self.levels: dict[int, bool] = dict.fromkeys(range(num_lines), False)
        self.sets: list[tuple[float, int, bool]] = []  # (monotonic, offset, high)
        # Raised (first to last) by the next set_value calls instead of setting the
        # line: e.g. a stray non-OSError such as gpiod's RequestReleasedError.
        self.set_failures: list[Exception] = []
        self._owned: set[int] = set()
        self._lock = threading.Lock()

    def request_lines(
        self, *, consumer: str, outputs: Mapping[int, bool], inputs: Collection[int]
    ) -> FakeGpioLines:
        offsets = set(outputs) | set(inputs)
        with self._lock:
            if any(not 0 <= o < self.num_lines for o in offsets):
                raise OSError(errno.EINVAL, "line offset out of range")
            if offsets & self._owned:
                raise OSError(errno.EBUSY, f"lines {sorted(offsets & self._owned)} busy")
            self._owned |= offsets
            now = time.monotonic()
            for offset, high in outputs.items():
                self.levels[offset] = high
                self.sets.append((now, offset, high))
        return FakeGpioLines(self, offsets, set(outputs))

    def set_input(self, offset: int, high: bool) -> None:
        self.levels[offset] = high

    def _free(self, offsets: set[int]) -> None:
        with self._lock:
            self._owned -= offsets


class FakeGpioLines:
    def __init__(self, chip: FakeGpioChip, offsets: set[int], outputs: set[int]) -> None:
        self._chip = chip
        self._offsets = offsets
        self._outputs = outputs
        self._released = False

    def _check(self, offsets: Collection[int]) -> None:
        if self._released:
            raise OSError(errno.EBADF, "request released")
        if not set(offsets) <= self._offsets:
            raise OSError(errno.EINVAL, "line not in this request")

    def set_value(self, offset: int, high: bool) -> None:
        self._check([offset])
        if offset not in self._outputs:
            raise OSError(errno.EPERM, "line is an input")
        if self._chip.set_failures:
            raise self._chip.set_failures.pop(0)
        self._chip.levels[offset] = high
        self._chip.sets.append((time.monotonic(), offset, high))

    def get_values(self, offsets: Sequence[int]) -> list[bool]:
        self._check(offsets)
        return [self._chip.levels[o] for o in offsets]

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._chip._free(self._offsets)


class GpioObserver:
    def __init__(
        self,
        chip: FakeGpioChip,
        outputs: dict[int, int],
        inputs: dict[int, int],
        active_low: frozenset[int] = frozenset(),
    ) -> None:
        self.chip, self.outputs, self.inputs, self.active_low = chip, outputs, inputs, active_low

    def edges(self, channel: int) -> list[tuple[float, bool]]:
        offset = self.outputs[channel]
        low = channel in self.active_low
        return transitions([(t, high != low) for t, o, high in list(self.chip.sets) if o == offset])

    def set_input(self, n: int, level: bool) -> None:
        self.chip.set_input(self.inputs[n], level)


# --- Modbus RTU ----------------------------------------------------------------------


def _raw_pty() -> tuple[int, int, str]:
    master, slave = os.openpty()
    tty.setraw(slave)  # no echo, no line discipline: bytes in, bytes out
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


class ModbusPtyServer:
    """pymodbus' RTU server on one pty, the client's port on another, and a bridge
    copying bytes between the two masters (a null-modem cable). The server runs its
    own event loop in a thread, like a separate device."""

    COILS = 32
    DISCRETE_INPUTS = 64

    def __init__(self, unit_id: int = 1) -> None:
        self.unit_id = unit_id
        self.coil_writes: list[tuple[float, int, bool]] = []  # (monotonic, address, value)
        self.refuse_coils: set[int] = set()  # addresses answered with ILLEGAL ADDRESS
        self.cut = False  # True: the bridge drops every byte (a cut RS-485 cable)
        # Per coil write, consumed first to last: "lost" = apply the write but lose
        # its reply on the way back; an ExcCodes = answer that, without applying.
        self.coil_script: list[Any] = []
        self._drop_replies_until = 0.0
        self.server_master, self._server_slave, self.server_port = _raw_pty()
        self.client_master, self._client_slave, self.port = _raw_pty()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="modbus-server")
        self._server: ModbusSerialServer | None = None

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> Any:
        if function_code in (5, 15) and set_values is not None:
            from pymodbus.constants import ExcCodes

            if address in self.refuse_coils:
                return ExcCodes.ILLEGAL_ADDRESS
            step = self.coil_script.pop(0) if self.coil_script else None
            if isinstance(step, ExcCodes):
                return step
            now = time.monotonic()
            if step == "lost":
                self._drop_replies_until = now + 0.05
            for i, value in enumerate(set_values):
                self.coil_writes.append((now, address + i, bool(value)))
        return None

    def _bridge(self, src: int, dst: int) -> None:
        try:
            data = os.read(src, 4096)
        except (BlockingIOError, OSError):
            return
        if self.cut:
            return
        if src == self.server_master and time.monotonic() < self._drop_replies_until:
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(dst, view) :]
            except BlockingIOError:
                time.sleep(0.0005)

    async def _start(self) -> None:
        device = SimDevice(
            id=self.unit_id,
            simdata=(
                [SimData(0, count=self.COILS, values=False, datatype=DataType.BITS)],
                [SimData(0, count=self.DISCRETE_INPUTS, values=False, datatype=DataType.BITS)],
                [SimData(0, count=1, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=1, values=0, datatype=DataType.REGISTERS)],
            ),
            action=self._action,
        )
        loop = asyncio.get_running_loop()
        loop.add_reader(self.server_master, self._bridge, self.server_master, self.client_master)
        loop.add_reader(self.client_master, self._bridge, self.client_master, self.server_master)
        self._server = ModbusSerialServer(
            device, framer=FramerType.RTU, port=self.server_port, baudrate=9600
        )
        await self._server.serve_forever(background=True)

    def _call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=5)

    def start(self) -> ModbusPtyServer:
        self._thread.start()
        self._call(self._start())
        return self

    def set_discrete_input(self, address: int, level: bool) -> None:
        assert self._server is not None
        self._call(self._server.async_setValues(self.unit_id, 2, address, [level]))

    def stop(self) -> None:
        async def shutdown() -> None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.server_master)
            loop.remove_reader(self.client_master)
            if self._server is not None:
                await self._server.shutdown()  # type: ignore[no-untyped-call]

        try:
            self._call(shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
            for fd in (
                self.server_master,
                self._server_slave,
                self.client_master,
                self._client_slave,
            ):
                os.close(fd)


class ModbusObserver:
    def __init__(
        self,
        server: ModbusPtyServer,
        *,
        coil_offset: int = 0,
        input_offset: int = 0,
        active_low: frozenset[int] = frozenset(),
    ) -> None:
        self.server = server
        self.coil_offset, self.input_offset, self.active_low = coil_offset, input_offset, active_low

    def edges(self, channel: int) -> list[tuple[float, bool]]:
        address = self.coil_offset + channel - 1
        low = channel in self.active_low
        return transitions(
            [(t, v != low) for t, a, v in list(self.server.coil_writes) if a == address]
        )

    def set_input(self, n: int, level: bool) -> None:
        self.server.set_discrete_input(self.input_offset + n - 1, level)


# --- the simulator program -------------------------------------------------------


class SimulatorEdges:
    """Edges the simulator writes to its ``--edges`` file: one JSON line per relay
    change, ``{"monotonic": t, "channel": c, "state": "on" | "off", ...}``; inputs
    are set through its ``--control`` socket (``input N high|low``, answered ``ok``
    once applied)."""

    def __init__(self, path: Path, control: Path | None = None) -> None:
        self.path = path
        self.control = control

    def edges(self, channel: int) -> list[tuple[float, bool]]:
        if not self.path.exists():
            return []
        writes: list[tuple[float, bool]] = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if int(record["channel"]) != channel:
                continue
            writes.append((float(record["monotonic"]), record["state"] == "on"))
        return transitions(writes)

    def set_input(self, n: int, level: bool) -> None:
        if self.control is None:
            raise RuntimeError("start the simulator with --control to set its inputs")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.control))
            sock.sendall(f"input {n} {'high' if level else 'low'}\n".encode())
            answer = sock.makefile("r", encoding="utf-8").readline().strip()
        if answer != "ok":
            raise RuntimeError(f"simulator control answered {answer!r}")


# --- the simulated board on an in-memory link --------------------------------------


class MemoryLinkObserver:
    """The edges the board of a ``MemoryLink`` switched, and its input lines forced
    the way the program's ``--control`` socket does."""

    def __init__(self, link: MemoryLink) -> None:
        self.link = link

    def edges(self, channel: int) -> list[tuple[float, bool]]:
        return transitions([(e.monotonic, e.on) for e in self.link.edges if e.channel == channel])

    def set_input(self, n: int, level: bool) -> None:
        self.link.board.force_input(n, level)
