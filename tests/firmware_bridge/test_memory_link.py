"""SerialBoard, the real driver, against the simulated board on an in-memory link: in
process, no pty, no child process (simulator/memory_link.py)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from firmware_bridge.driver import PulseTrain
from firmware_bridge.exceptions import BoardNoReply, BoardUnavailable
from firmware_bridge.serial_board import SerialBoard
from firmware_bridge.simulator import Faults, MemoryLink, SimulatedBoard

T = TypeVar("T")
COMMAND = 0x0123456789ABCDEF
TRAIN = PulseTrain(count=1, on_ms=100, off_ms=100)


def run(link: MemoryLink, scenario: Callable[[SerialBoard], Awaitable[T]], **kwargs: float) -> T:
    async def main() -> T:
        board = SerialBoard("memory", connect=link.connect, **kwargs)  # type: ignore[arg-type]
        await board.open()
        try:
            return await scenario(board)
        finally:
            await board.close()

    return asyncio.run(main())


def test_a_release_over_the_memory_link_is_one_actuation() -> None:
    link = MemoryLink(SimulatedBoard(boot_id=0xB007))

    async def scenario(board: SerialBoard) -> None:
        ack = await board.release(COMMAND, 2, TRAIN)
        assert (ack.boot_id, ack.command_id, ack.exec_count) == (0xB007, COMMAND, 1)
        assert not ack.duplicate
        assert len(link.actuations) == 1  # reported before the ACK left the board
        again = await board.release(COMMAND, 2, TRAIN)
        assert again.duplicate

    run(link, scenario)
    (actuation,) = link.actuations
    assert (actuation.command_id, actuation.channel, actuation.pulse_count) == (COMMAND, 2, 1)
    assert [(e.channel, e.on) for e in link.edges] == [(2, True), (2, False)]


def test_a_lost_ack_is_recovered_by_query_without_a_second_pulse() -> None:
    link = MemoryLink(SimulatedBoard(drop_release_acks=1))
    ack = run(link, lambda b: b.release(COMMAND, 1, TRAIN), ack_timeout=0.05)
    assert ack.duplicate and ack.command_id == COMMAND  # QUERY said: executed, this boot
    assert len(link.actuations) == 1
    assert [e.on for e in link.edges if e.channel == 1] == [True, False]


def test_reset_gives_a_new_boot_id_and_clears_the_ring() -> None:
    link = MemoryLink()

    async def scenario(board: SerialBoard) -> None:
        ack = await board.release(COMMAND, 1, TRAIN)
        new_boot = link.reset()
        reply = await board.query(COMMAND)
        assert new_boot != ack.boot_id and reply.boot_id == new_boot
        assert not reply.executed and reply.exec_count == 0

    run(link, scenario)
    assert len(link.actuations) == 1


def test_the_link_takes_one_host_at_a_time_like_an_exclusive_port() -> None:
    link = MemoryLink()

    async def scenario(board: SerialBoard) -> None:
        second = SerialBoard("memory", connect=link.connect)
        with pytest.raises(BoardUnavailable):
            await second.open()
        await board.ping()

    run(link, scenario)
    assert not link.connected
    run(link, lambda b: b.ping())  # free again once the first host closed


def test_unplugging_fails_the_pending_request_and_the_board_comes_back_rebooted() -> None:
    link = MemoryLink(delay=0.2)

    async def scenario() -> None:
        board = SerialBoard("memory", connect=link.connect, ack_timeout=1.0)
        await board.open()
        boot_id = link.board.boot_id
        pending = asyncio.create_task(board.ping())
        await asyncio.sleep(0.05)  # written, reply still on its way
        link.unplug()
        with pytest.raises(BoardNoReply):
            await pending
        assert not board.is_open
        with pytest.raises(BoardUnavailable):
            await board.open()
        link.plug()
        await board.open()
        assert (await board.ping()).boot_id not in (boot_id, None)
        await board.close()

    asyncio.run(scenario())


def test_replies_arrive_after_the_link_delay() -> None:
    link = MemoryLink(delay=0.08)

    async def scenario(board: SerialBoard) -> float:
        started = time.monotonic()
        await board.ping()
        return time.monotonic() - started

    assert run(link, scenario) >= 0.08


def test_a_lossy_corrupting_link_never_pulses_a_command_twice() -> None:
    link = MemoryLink(
        SimulatedBoard(channels=4, faults=Faults(drop_rate=0.2, corrupt_rate=0.2, seed=7))
    )
    acked: list[int] = []

    async def scenario(board: SerialBoard) -> None:
        for command_id in range(1, 61):
            try:
                await board.release(command_id, 1 + command_id % 4, PulseTrain(1, 20, 20))
            except BoardNoReply:
                continue  # outcome unknown: the board decides, the count below checks
            acked.append(command_id)

    run(link, scenario, ack_timeout=0.02)
    counts = Counter(a.command_id for a in link.actuations)
    assert max(counts.values()) == 1
    assert all(counts[c] == 1 for c in acked)
    assert len(acked) >= 30  # the faults hurt, but the link still works
