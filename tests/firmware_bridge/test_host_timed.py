"""HostTimedBoard's memory of command ids: a bounded ring with a count, like
firmware 1.2 (docs/firmware-protocol.md "Execution count"), on a fake GPIO chip."""

from __future__ import annotations

import asyncio
import errno

import pytest

from firmware_bridge.driver import PulseTrain, ring_vouches
from firmware_bridge.exceptions import BoardUnavailable
from firmware_bridge.gpio_board import GpioBoard
from firmware_bridge.host_timed import RING_SIZE

from .drivers_support import FakeGpioChip

TRAIN = PulseTrain(1, 10, 10)


def _board(chip: FakeGpioChip) -> GpioBoard:
    return GpioBoard(outputs={1: 5}, inputs={}, chip=chip)


def test_host_timed_ring_is_bounded_and_cannot_vouch_for_what_it_forgot() -> None:
    async def scenario() -> None:
        board = _board(FakeGpioChip())
        await board.open()
        pong = await board.ping()
        assert (pong.exec_count, pong.ring_size) == (0, RING_SIZE)
        for command_id in range(RING_SIZE + 1):
            ack = await board.release(command_id, 1, TRAIN)
            assert ack.exec_count == command_id + 1
            await board.all_off()  # frees the channel at once
        oldest, second = await board.query(0), await board.query(1)
        assert (oldest.executed, second.executed) == (False, True)
        assert oldest.exec_count == board.exec_count == RING_SIZE + 1
        assert not ring_vouches(
            reply_exec_count=oldest.exec_count,
            dispatch_exec_count=pong.exec_count,
            ring_size=board.ring_size,
        )
        await board.close()

    asyncio.run(scenario())


def test_a_session_starts_with_an_empty_ring_and_a_zero_count() -> None:
    chip = FakeGpioChip()

    async def scenario() -> None:
        board = _board(chip)
        await board.open()
        await board.release(7, 1, TRAIN)
        assert board.exec_count == 1
        await board.close()
        await board.open()
        assert board.exec_count == 0
        assert (await board.query(7)).executed is False
        await board.close()

    asyncio.run(scenario())


def test_a_release_that_provably_did_not_act_is_forgotten_but_stays_counted() -> None:
    # The count may run ahead of the ring's content, never behind: ring_vouches
    # can only become more cautious from it.
    chip = FakeGpioChip()

    async def scenario() -> None:
        board = _board(chip)
        await board.open()
        chip.set_failures.append(OSError(errno.EIO, "line gone"))
        with pytest.raises(BoardUnavailable):
            await board.release(5, 1, TRAIN)
        reply = await board.query(5)
        assert (reply.executed, reply.exec_count) == (False, 1)
        assert (await board.release(5, 1, TRAIN)).exec_count == 2
        await board.close()

    asyncio.run(scenario())
