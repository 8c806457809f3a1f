"""GpioBoard specifics: one owner per line, polarity, the real libgpiod adapter."""

from __future__ import annotations

import asyncio

import pytest

from firmware_bridge.driver import LevelHold, PulseTrain
from firmware_bridge.exceptions import BoardNoReply, BoardUnavailable
from firmware_bridge.gpio_board import GpioBoard, GpiodChip
from firmware_bridge.host_timed import OutputFault

from .drivers_support import FakeGpioChip, GpioObserver

OUTPUTS = {1: 5, 2: 6}
INPUTS = {1: 12}


def test_a_requested_line_has_one_owner() -> None:
    chip = FakeGpioChip()

    async def scenario() -> None:
        first = GpioBoard(outputs=OUTPUTS, inputs=INPUTS, chip=chip)
        await first.open()
        with pytest.raises(BoardUnavailable):
            await GpioBoard(outputs={1: 6}, inputs={}, chip=chip).open()
        other_lines = GpioBoard(outputs={1: 7}, inputs={}, chip=chip)
        await other_lines.open()  # other lines of the same chip are free
        await first.close()
        second = GpioBoard(outputs=OUTPUTS, inputs=INPUTS, chip=chip)
        await second.open()  # released on close
        await second.close()
        await other_lines.close()

    asyncio.run(scenario())


def test_open_requests_outputs_at_their_inactive_level() -> None:
    chip = FakeGpioChip()

    async def scenario() -> None:
        board = GpioBoard(outputs=OUTPUTS, inputs=INPUTS, active_low=frozenset({2}), chip=chip)
        await board.open()
        assert chip.sets[:2] == [(chip.sets[0][0], 5, False), (chip.sets[0][0], 6, True)]
        await board.release(1, 2, LevelHold(100))
        assert chip.levels[6] is False  # active-low: closed contact = low line
        await asyncio.sleep(0.2)
        assert chip.levels[6] is True
        await board.close()

    asyncio.run(scenario())
    observer = GpioObserver(chip, OUTPUTS, INPUTS, frozenset({2}))
    assert [on for _, on in observer.edges(2)] == [True, False]
    assert observer.edges(1) == []


def test_invalid_layouts_are_rejected_at_construction() -> None:
    with pytest.raises(ValueError):
        GpioBoard(outputs={1: 5, 3: 6}, inputs={})
    with pytest.raises(ValueError):
        GpioBoard(outputs={1: 5}, inputs={1: 5})
    with pytest.raises(ValueError):
        GpioBoard(outputs={1: 5}, inputs={}, active_low=frozenset({2}))


def test_real_adapter_without_a_chip_is_unavailable() -> None:
    pytest.importorskip("gpiod")
    board = GpioBoard("/dev/gpiochip-metalav-missing", outputs=OUTPUTS, inputs=INPUTS)
    assert isinstance(board._chip, GpiodChip)
    with pytest.raises(BoardUnavailable):
        asyncio.run(board.open())


def test_a_repeat_racing_the_first_edge_is_duplicate_only_if_the_original_acted() -> None:
    chip = FakeGpioChip()

    async def scenario() -> None:
        board = GpioBoard(outputs=OUTPUTS, inputs=INPUTS, chip=chip)
        await board.open()
        first, second = await asyncio.gather(
            board.release(9, 1, LevelHold(100)), board.release(9, 1, LevelHold(100))
        )
        assert (first.duplicate, second.duplicate) == (False, True)
        await asyncio.sleep(0.15)
        await board.close()

    asyncio.run(scenario())
    assert len(GpioObserver(chip, OUTPUTS, INPUTS).edges(1)) == 2


class _RequestReleasedError(Exception):
    """Stands in for gpiod's RequestReleasedError: not an OSError, not a BoardError."""


def test_a_stray_error_after_the_ack_forces_the_output_off_and_is_a_fault(
    caplog: pytest.LogCaptureFixture,
) -> None:
    chip = FakeGpioChip()
    seen: list[OutputFault] = []

    async def scenario() -> None:
        board = GpioBoard(outputs=OUTPUTS, inputs=INPUTS, chip=chip, on_fault=seen.append)
        await board.open()
        await board.release(3, 1, PulseTrain(3, 50, 50))
        assert chip.levels[5] is True
        chip.set_failures.append(_RequestReleasedError("request released"))
        await asyncio.sleep(0.15)  # the "off" edge raises; the forced off succeeds
        assert chip.levels[5] is False
        assert [type(f.error) for f in board.faults] == [_RequestReleasedError]
        assert board.faults[0].command_id == 3 and board.faults[0].channel == 1
        assert not board._running  # the task ended, the channel is free again
        assert not (await board.release(4, 1, LevelHold(100))).duplicate
        await asyncio.sleep(0.15)
        await board.close()

    asyncio.run(scenario())
    assert seen and isinstance(seen[0].error, _RequestReleasedError)
    edges = GpioObserver(chip, OUTPUTS, INPUTS).edges(1)
    assert [on for _, on in edges] == [True, False, True, False]  # no 2nd/3rd pulse
    assert "never retrieved" not in caplog.text


def test_a_stray_error_on_the_first_edge_is_no_reply_and_forces_off() -> None:
    chip = FakeGpioChip()

    async def scenario() -> None:
        board = GpioBoard(outputs=OUTPUTS, inputs=INPUTS, chip=chip)
        await board.open()
        chip.set_failures.append(_RequestReleasedError("request released"))
        with pytest.raises(BoardNoReply):
            await board.release(7, 1, LevelHold(100))
        assert (await board.query(7)).executed  # outcome unknown: never run again
        assert chip.levels[5] is False
        await board.close()

    asyncio.run(scenario())
