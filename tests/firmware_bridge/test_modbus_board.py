"""ModbusBoard specifics against pymodbus' own RTU server on a real pty pair: what
each pymodbus outcome means for "did the board act?", bus ownership, polarity."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from firmware_bridge.driver import LevelHold, PulseTrain
from firmware_bridge.exceptions import BoardNack, BoardNoReply, BoardUnavailable
from firmware_bridge.frames import FrameType, NackReason
from firmware_bridge.host_timed import OutputFault
from firmware_bridge.modbus_board import ModbusBoard

from .drivers_support import ModbusObserver, ModbusPtyServer

T = TypeVar("T")


@pytest.fixture
def server() -> Iterator[ModbusPtyServer]:
    server = ModbusPtyServer().start()
    try:
        yield server
    finally:
        server.stop()


def run(board: ModbusBoard, scenario: Callable[[ModbusBoard], Awaitable[T]]) -> T:
    async def main() -> T:
        await board.open()
        try:
            return await scenario(board)
        finally:
            await board.close()

    return asyncio.run(main())


def test_one_owner_per_port(server: ModbusPtyServer) -> None:
    async def scenario(board: ModbusBoard) -> None:
        with pytest.raises(BoardUnavailable):
            await ModbusBoard(server.port).open()
        await board.ping()  # the first owner is unaffected

    run(ModbusBoard(server.port), scenario)


def test_missing_port_is_unavailable() -> None:
    with pytest.raises(BoardUnavailable):
        asyncio.run(ModbusBoard("/dev/does-not-exist-metalav").open())


def test_exception_response_on_first_write_is_a_nack_and_not_recorded(
    server: ModbusPtyServer,
) -> None:
    server.refuse_coils.add(0)

    async def scenario(board: ModbusBoard) -> None:
        with pytest.raises(BoardNack) as exc_info:
            await board.release(1, 1, PulseTrain(1, 60, 80))
        assert exc_info.value.reason == NackReason.BAD_CHANNEL
        assert not (await board.query(1)).executed

    run(ModbusBoard(server.port), scenario)
    assert ModbusObserver(server).edges(1) == []


def test_timeout_on_first_write_is_no_reply_and_never_pulses_again(
    server: ModbusPtyServer,
) -> None:
    async def scenario(board: ModbusBoard) -> None:
        server.cut = True  # the request leaves the host; nothing comes back
        with pytest.raises(BoardNoReply):
            await board.release(1, 1, PulseTrain(1, 60, 80))
        server.cut = False
        # The relay may have closed: the id stays executed, a repeat is a duplicate.
        assert (await board.query(1)).executed
        assert (await board.release(1, 1, PulseTrain(1, 60, 80))).duplicate

    run(ModbusBoard(server.port, timeout_s=0.1, retries=0), scenario)
    assert ModbusObserver(server).edges(1) == []  # the cut cable ate the write


def test_failure_after_the_ack_is_reported_as_a_fault(server: ModbusPtyServer) -> None:
    seen: list[OutputFault] = []

    async def scenario(board: ModbusBoard) -> None:
        await board.release(77, 2, LevelHold(200))
        server.cut = True
        await asyncio.sleep(0.6)  # the "off" edge and the forced off both time out
        server.cut = False
        assert board.faults and board.faults[0].command_id == 77
        assert isinstance(board.faults[0].error, BoardNoReply)
        assert not (await board.query(78)).executed
        await board.all_off()  # the link is back: the relay is opened

    run(ModbusBoard(server.port, timeout_s=0.1, retries=0, on_fault=seen.append), scenario)
    assert seen and seen[0].channel == 2
    assert [on for _, on in ModbusObserver(server).edges(2)] == [True, False]


def test_active_low_channels_are_written_inverted(server: ModbusPtyServer) -> None:
    async def scenario(board: ModbusBoard) -> None:
        await board.all_off()
        await board.release(5, 2, LevelHold(150))
        await asyncio.sleep(0.3)

    run(ModbusBoard(server.port, channels=4, active_low=frozenset({2})), scenario)
    coil_1 = [value for _, address, value in server.coil_writes if address == 1]
    assert coil_1[0] is True  # all_off: contact open = coil energised on this board
    assert coil_1[-3:] == [False, True, True]  # on, off (hold end), off (close)
    edges = ModbusObserver(server, active_low=frozenset({2})).edges(2)
    assert [on for _, on in edges] == [True, False]


def test_offsets_and_sensed_relays_are_read(server: ModbusPtyServer) -> None:
    server.set_discrete_input(8 + 1, True)  # input 2 at input_offset 8
    server.set_discrete_input(32 + 2, True)  # channel 3's contact sensed closed

    async def scenario(board: ModbusBoard) -> Any:
        await board.release(1, 1, PulseTrain(1, 30, 30))
        await asyncio.sleep(0.1)
        return await board.read_inputs()

    state = run(
        ModbusBoard(
            server.port, channels=4, inputs=4, coil_offset=16, input_offset=8, relay_sense_offset=32
        ),
        scenario,
    )
    assert (state.inputs, state.relays) == (0b10, 0b100)
    assert ModbusObserver(server, coil_offset=16).edges(1) != []


def test_close_forces_a_running_hold_off(server: ModbusPtyServer) -> None:
    async def scenario(board: ModbusBoard) -> None:
        await board.release(1, 1, LevelHold(5000))

    run(ModbusBoard(server.port), scenario)
    assert [on for _, on in ModbusObserver(server).edges(1)] == [True, False]


def test_refusal_of_a_retransmission_is_no_reply_not_a_nack(server: ModbusPtyServer) -> None:
    from pymodbus.constants import ExcCodes

    # Attempt 1 switches the coil but its reply is lost; the retransmission is
    # answered "device busy": the relay may well be closed, so never a NACK.
    server.coil_script = ["lost", ExcCodes.DEVICE_BUSY]

    async def scenario(board: ModbusBoard) -> None:
        with pytest.raises(BoardNoReply):
            await board.release(1, 1, LevelHold(500))
        assert (await board.query(1)).executed  # the id stays recorded
        assert (await board.release(1, 1, LevelHold(500))).duplicate

    run(ModbusBoard(server.port, timeout_s=0.2, retries=1), scenario)
    # The lost-reply write closed the relay; it was forced off right away.
    assert [on for _, on in ModbusObserver(server).edges(1)] == [True, False]


def test_refusal_of_the_first_transmission_is_still_a_nack(server: ModbusPtyServer) -> None:
    from pymodbus.constants import ExcCodes

    server.coil_script = [ExcCodes.DEVICE_BUSY]

    async def scenario(board: ModbusBoard) -> None:
        with pytest.raises(BoardNack) as exc_info:
            await board.release(1, 1, LevelHold(100))
        assert exc_info.value.reason == NackReason.CHANNEL_BUSY
        assert exc_info.value.request_type == FrameType.RELEASE_LEVEL
        assert not (await board.query(1)).executed

    run(ModbusBoard(server.port, timeout_s=0.2, retries=1), scenario)
    assert ModbusObserver(server).edges(1) == []


def test_a_lost_reply_is_retransmitted(server: ModbusPtyServer) -> None:
    server.coil_script = ["lost"]

    async def scenario(board: ModbusBoard) -> None:
        assert not (await board.release(1, 1, PulseTrain(1, 60, 60))).duplicate
        await asyncio.sleep(0.2)
        assert not board.faults

    run(ModbusBoard(server.port, timeout_s=0.2, retries=1), scenario)
    assert [on for _, on in ModbusObserver(server).edges(1)] == [True, False]


def test_nacks_name_the_request_type(server: ModbusPtyServer) -> None:
    async def scenario(board: ModbusBoard) -> None:
        with pytest.raises(BoardNack) as hold:
            await board.release(1, 99, LevelHold(100))
        assert hold.value.request_type == FrameType.RELEASE_LEVEL
        with pytest.raises(BoardNack) as train:
            await board.release(2, 99, PulseTrain(1, 60, 60))
        assert train.value.request_type == FrameType.RELEASE

    run(ModbusBoard(server.port), scenario)


def test_refused_input_read_names_read_inputs() -> None:
    board = ModbusBoard("/dev/null")
    from pymodbus.pdu import ExceptionResponse

    response = ExceptionResponse(2, 0x02)
    with pytest.raises(BoardNack) as exc_info:
        board._check(response, FrameType.READ_INPUTS, "read inputs 0+8", retried=0)
    assert exc_info.value.request_type == FrameType.READ_INPUTS
    with pytest.raises(BoardNoReply):
        board._check(response, FrameType.READ_INPUTS, "read inputs 0+8", retried=1)
