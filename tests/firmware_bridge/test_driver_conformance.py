"""One contract, every driver that can run here (driver.BoardDriver).

- serial: SerialBoard against the simulator program on a real pty;
- memory: SerialBoard against the same simulated board on an in-memory link, in process;
- modbus: ModbusBoard against pymodbus' own RTU server on a real pty pair;
- gpio: GpioBoard on a fake chip (no GPIO chip exists here).

Each test names the promise it checks; edges are observed on the far side of the
driver (simulator file, Modbus datastore, fake chip), not taken from the driver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from firmware_bridge.driver import (
    MAX_EDGE_MS,
    MAX_HOLD_MS,
    MAX_PULSES,
    BoardDriver,
    LevelHold,
    Program,
    PulseTrain,
    ring_vouches,
)
from firmware_bridge.exceptions import BoardNack, BoardUnavailable
from firmware_bridge.frames import NackReason
from firmware_bridge.gpio_board import GpioBoard
from firmware_bridge.modbus_board import ModbusBoard

from .drivers_support import (
    FakeGpioChip,
    GpioObserver,
    MemoryLinkObserver,
    ModbusObserver,
    ModbusPtyServer,
    Observer,
    SimulatorEdges,
)

T = TypeVar("T")

PULSE_TOL = 0.030  # s, pulse train edges
HOLD_TOL = 0.040  # s, level hold
CHANNELS = 4


@dataclass
class Rig:
    name: str
    make: Callable[[], Any]  # a new, unopened driver on the same board
    observer: Observer
    host_timed: bool

    def run(self, scenario: Callable[[Any], Awaitable[T]]) -> T:
        async def main() -> T:
            driver = self.make()
            await driver.open()
            try:
                await driver.all_off()
                return await scenario(driver)
            finally:
                await driver.close()

        return asyncio.run(main())

    def edges(self, channel: int) -> list[tuple[float, bool]]:
        return self.observer.edges(channel)


@pytest.fixture(params=["serial", "memory", "modbus", "gpio"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    if request.param == "serial":
        from firmware_bridge.serial_board import SerialBoard

        start = request.getfixturevalue("start_simulator")
        edges_file = tmp_path / "edges.jsonl"
        control = tmp_path / "control.sock"
        sim = start(
            "--channels",
            str(CHANNELS),
            "--time-scale",
            "1",
            "--edges",
            str(edges_file),
            "--control",
            str(control),
        )
        yield Rig(
            "serial", lambda: SerialBoard(sim.path), SimulatorEdges(edges_file, control), False
        )
    elif request.param == "memory":
        from firmware_bridge.serial_board import SerialBoard
        from firmware_bridge.simulator import MemoryLink, SimulatedBoard

        link = MemoryLink(SimulatedBoard(channels=CHANNELS, time_scale=1.0))
        yield Rig(
            "memory",
            lambda: SerialBoard("memory", connect=link.connect),
            MemoryLinkObserver(link),
            False,
        )
    elif request.param == "modbus":
        server = ModbusPtyServer().start()
        try:
            yield Rig(
                "modbus",
                lambda: ModbusBoard(server.port, channels=CHANNELS, inputs=8),
                ModbusObserver(server),
                True,
            )
        finally:
            server.stop()
    else:
        chip = FakeGpioChip()
        outputs = {c: 10 + c for c in range(1, CHANNELS + 1)}
        inputs = {n: 20 + n for n in range(1, 9)}
        yield Rig(
            "gpio",
            lambda: GpioBoard("/dev/gpiochip-fake", outputs=outputs, inputs=inputs, chip=chip),
            GpioObserver(chip, outputs, inputs),
            True,
        )


async def settle(program: Program, extra: float = 0.15) -> None:
    await asyncio.sleep(program.duration_ms / 1000 + extra)


def on_off_durations(edges: list[tuple[float, bool]]) -> tuple[list[float], list[float]]:
    """Durations of each closure and of each gap between closures."""
    ons: list[float] = []
    offs: list[float] = []
    for (t0, level), (t1, _) in zip(edges, edges[1:], strict=False):
        (ons if level else offs).append(t1 - t0)
    return ons, offs


def test_every_driver_satisfies_the_board_driver_interface(rig: Rig) -> None:
    assert isinstance(rig.make(), BoardDriver)


def test_ping_gives_a_boot_id(rig: Rig) -> None:
    async def scenario(driver: Any) -> tuple[int, int]:
        first, second = await driver.ping(), await driver.ping()
        assert first.boot_id == second.boot_id  # stable within a session
        return first.boot_id, first.channels

    boot_id, channels = rig.run(scenario)
    assert boot_id != 0 and channels >= 3
    if rig.host_timed:
        # A new driver session is a new "boot": its memory of command ids is empty.
        assert rig.run(scenario)[0] != boot_id


def test_all_off_leaves_every_output_off_and_stops_programs(rig: Rig) -> None:
    async def scenario(driver: Any) -> None:
        await driver.release(1, 1, LevelHold(2000))
        await driver.release(2, 2, PulseTrain(10, 100, 100))
        await asyncio.sleep(0.05)
        await driver.all_off()
        await asyncio.sleep(0.3)  # a stopped program would show edges here

    rig.run(scenario)
    for channel in range(1, CHANNELS + 1):
        edges = rig.edges(channel)
        assert not edges or edges[-1][1] is False, (channel, edges)
    assert len(rig.edges(1)) == 2 and len(rig.edges(2)) == 2  # one on, one off each


def test_pulse_train_produces_exactly_the_configured_pulses(rig: Rig) -> None:
    program = PulseTrain(3, 60, 80)

    async def scenario(driver: Any) -> None:
        ack = await driver.release(0xC0FFEE, 2, program)
        assert not ack.duplicate and ack.command_id == 0xC0FFEE
        await settle(program)

    rig.run(scenario)
    edges = rig.edges(2)
    assert [on for _, on in edges] == [True, False] * 3
    ons, offs = on_off_durations(edges)
    assert all(abs(d - 0.060) <= PULSE_TOL for d in ons), ons
    assert all(abs(d - 0.080) <= PULSE_TOL for d in offs), offs
    assert rig.edges(1) == [] and rig.edges(3) == []


def test_level_hold_closes_for_the_configured_time(rig: Rig) -> None:
    program = LevelHold(300)

    async def scenario(driver: Any) -> None:
        await driver.release(7, 3, program)
        await settle(program)

    rig.run(scenario)
    edges = rig.edges(3)
    assert [on for _, on in edges] == [True, False]
    assert abs(edges[1][0] - edges[0][0] - 0.300) <= HOLD_TOL


def test_duplicate_command_never_pulses_twice(rig: Rig) -> None:
    program = PulseTrain(1, 50, 50)

    async def scenario(driver: Any) -> None:
        first = await driver.release(42, 1, program)
        await settle(program)
        second = await driver.release(42, 1, program)
        third = await driver.release(42, 2, program)  # another channel: still the same id
        assert not first.duplicate and second.duplicate and third.duplicate
        assert second.boot_id == first.boot_id
        await settle(program)

    rig.run(scenario)
    assert len(rig.edges(1)) == 2 and rig.edges(2) == []


def test_query_tells_whether_this_boot_executed_the_command(rig: Rig) -> None:
    async def scenario(driver: Any) -> None:
        before = await driver.query(99)
        assert not before.executed and before.command_id == 99
        await driver.release(99, 1, PulseTrain(1, 30, 30))
        after = await driver.query(99)
        assert after.executed and after.boot_id == before.boot_id
        assert not (await driver.query(100)).executed

    rig.run(scenario)


def test_every_driver_counts_executions_and_reports_its_ring(rig: Rig) -> None:
    program = PulseTrain(1, 30, 30)

    async def scenario(driver: Any) -> None:
        pong = await driver.ping()
        assert pong.exec_count == 0 and pong.ring_size >= 32  # a fresh boot / session
        assert (driver.exec_count, driver.ring_size) == (pong.exec_count, pong.ring_size)
        first = await driver.release(11, 1, program)
        again = await driver.release(11, 1, program)  # duplicate: the current count
        other = await driver.release(12, 2, program)
        with pytest.raises(BoardNack):
            await driver.release(13, 0, program)  # refused: not recorded, not counted
        assert (first.exec_count, again.exec_count, other.exec_count) == (1, 1, 2)
        never = await driver.query(13)
        assert (never.executed, never.exec_count, driver.exec_count) == (False, 2, 2)
        # Two releases since the host's count: well inside the ring, so it vouches.
        assert ring_vouches(
            reply_exec_count=never.exec_count,
            dispatch_exec_count=pong.exec_count,
            ring_size=driver.ring_size,
        )
        await settle(program)

    rig.run(scenario)


BAD_PROGRAMS = [
    PulseTrain(0, 60, 80),
    PulseTrain(MAX_PULSES + 1, 60, 80),
    PulseTrain(1, 5, 80),
    PulseTrain(1, 60, MAX_EDGE_MS + 1),
    LevelHold(50),
    LevelHold(MAX_HOLD_MS + 1),
]


def test_bad_channel_and_out_of_limit_programs_are_refused_without_acting(rig: Rig) -> None:
    async def scenario(driver: Any) -> None:
        channels = (await driver.ping()).channels
        for channel in (0, channels + 1):
            with pytest.raises(BoardNack) as exc_info:
                await driver.release(5, channel, PulseTrain(1, 60, 80))
            assert exc_info.value.reason == NackReason.BAD_CHANNEL
        for program in BAD_PROGRAMS:
            with pytest.raises(BoardNack) as exc_info:
                await driver.release(5, 1, program)
            assert exc_info.value.reason == NackReason.BAD_PARAMS, program
        # Refused means not recorded: the id is still free for a valid release.
        assert not (await driver.query(5)).executed
        await asyncio.sleep(0.1)

    rig.run(scenario)
    assert all(rig.edges(c) == [] for c in range(1, CHANNELS + 1))


def test_busy_channel_is_refused_and_not_recorded(rig: Rig) -> None:
    async def scenario(driver: Any) -> None:
        await driver.release(1, 1, LevelHold(400))
        with pytest.raises(BoardNack) as exc_info:
            await driver.release(2, 1, PulseTrain(1, 60, 80))
        assert exc_info.value.reason == NackReason.CHANNEL_BUSY
        assert not (await driver.query(2)).executed
        await asyncio.sleep(0.5)

    rig.run(scenario)
    assert [on for _, on in rig.edges(1)] == [True, False]


def test_read_inputs_reflects_the_input_lines(rig: Rig) -> None:
    async def scenario(driver: Any) -> None:
        boot_id = (await driver.ping()).boot_id
        assert (await driver.read_inputs()).inputs == 0
        rig.observer.set_input(1, True)
        rig.observer.set_input(3, True)
        state = await driver.read_inputs()
        assert (state.boot_id, state.inputs) == (boot_id, 0b101)
        rig.observer.set_input(1, False)
        assert (await driver.read_inputs()).inputs == 0b100

    rig.run(scenario)


def test_concurrent_releases_on_three_channels_are_each_exact(rig: Rig) -> None:
    programs: dict[int, Program] = {
        1: PulseTrain(3, 60, 80),
        2: PulseTrain(2, 100, 50),
        3: LevelHold(250),
    }

    async def scenario(driver: Any) -> None:
        acks = await asyncio.gather(*(driver.release(100 + c, c, p) for c, p in programs.items()))
        assert [a.duplicate for a in acks] == [False] * 3
        await settle(PulseTrain(3, 60, 80), extra=0.2)

    rig.run(scenario)
    for channel, program in programs.items():
        edges = rig.edges(channel)
        ons, offs = on_off_durations(edges)
        if isinstance(program, PulseTrain):
            assert len(ons) == program.count and len(edges) == 2 * program.count, edges
            assert all(abs(d - program.on_ms / 1000) <= PULSE_TOL for d in ons), ons
            assert all(abs(d - program.off_ms / 1000) <= PULSE_TOL for d in offs), offs
        else:
            assert len(ons) == 1 and abs(ons[0] - program.hold_ms / 1000) <= HOLD_TOL


def test_a_closed_driver_is_unavailable_and_never_acts(rig: Rig) -> None:
    async def scenario() -> None:
        driver = rig.make()
        await driver.open()
        await driver.close()
        assert not driver.is_open
        calls: list[Callable[[], Awaitable[object]]] = [
            driver.ping,
            lambda: driver.release(1, 1, PulseTrain(1, 60, 80)),
            lambda: driver.query(1),
            driver.read_inputs,
            driver.all_off,
        ]
        for call in calls:
            with pytest.raises(BoardUnavailable):
                await call()

    asyncio.run(scenario())
    assert rig.edges(1) == []
