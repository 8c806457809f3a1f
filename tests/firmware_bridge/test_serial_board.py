"""SerialBoard against the simulator program over a real pty."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import tty
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from firmware_bridge.driver import BoardDriver, PulseTrain
from firmware_bridge.exceptions import BoardNack, BoardNoReply, BoardUnavailable
from firmware_bridge.frames import FrameDecoder, NackReason, Release, decode, encode
from firmware_bridge.serial_board import SerialBoard
from firmware_bridge.simulator import SimulatedBoard

from .conftest import SimulatorProcess

T = TypeVar("T")
Start = Callable[..., SimulatorProcess]
COMMAND = 0x0123456789ABCDEF
TRAIN = PulseTrain(count=1, on_ms=100, off_ms=100)


def run(coro_fn: Callable[[SerialBoard], Awaitable[T]], port: str, **kwargs: float) -> T:
    async def main() -> T:
        board = SerialBoard(port, **kwargs)  # type: ignore[arg-type]
        await board.open()
        try:
            return await coro_fn(board)
        finally:
            await board.close()

    return asyncio.run(main())


def test_serial_board_satisfies_the_driver_interface() -> None:
    assert isinstance(SerialBoard("/dev/null"), BoardDriver)


def test_ping_returns_boot_id(start_simulator: Start) -> None:
    sim = start_simulator("--boot-id", "DEADBEEF", "--channels", "4")
    pong = run(lambda b: b.ping(), sim.path)
    assert (pong.boot_id, pong.channels) == (0xDEADBEEF, 4)


def test_release_pulses_once_and_repeat_is_duplicate(start_simulator: Start) -> None:
    sim = start_simulator()

    async def scenario(board: SerialBoard) -> None:
        first = await board.release(COMMAND, 2, TRAIN)
        assert not first.duplicate and first.command_id == COMMAND
        assert len(sim.actuations()) == 1  # fsync'ed before the ack was written
        second = await board.release(COMMAND, 2, TRAIN)
        assert second.duplicate and second.boot_id == first.boot_id

    run(scenario, sim.path)
    (line,) = sim.actuations()
    assert line["command_id"] == f"{COMMAND:016x}"
    assert (line["channel"], line["pulse_count"], line["on_ms"], line["off_ms"]) == (2, 1, 100, 100)
    assert line["rx_monotonic"] <= time.monotonic()


def test_retransmitted_release_never_pulses_twice(start_simulator: Start) -> None:
    sim = start_simulator("--drop-release-acks", "1")
    ack = run(lambda b: b.release(COMMAND, 1, TRAIN), sim.path, ack_timeout=0.1)
    assert ack.duplicate
    assert len(sim.actuations()) == 1


def test_query_tells_executed_only_after_release(start_simulator: Start) -> None:
    sim = start_simulator()

    async def scenario(board: SerialBoard) -> tuple[bool, bool]:
        before = await board.query(COMMAND)
        await board.release(COMMAND, 1, TRAIN)
        after = await board.query(COMMAND)
        return before.executed, after.executed

    assert run(scenario, sim.path) == (False, True)


def test_reboot_changes_boot_id_and_forgets_commands(start_simulator: Start) -> None:
    sim = start_simulator()

    async def scenario(board: SerialBoard) -> None:
        ack = await board.release(COMMAND, 1, TRAIN)
        sim.send_signal(signal.SIGHUP)
        for _ in range(100):  # the signal is handled asynchronously
            reply = await board.query(COMMAND)
            if reply.boot_id != ack.boot_id:
                break
            await asyncio.sleep(0.02)
        assert reply.boot_id != ack.boot_id
        assert not reply.executed

    run(scenario, sim.path)


def test_bad_channel_is_refused_and_never_pulses(start_simulator: Start) -> None:
    sim = start_simulator("--channels", "4")
    with pytest.raises(BoardNack) as info:
        run(lambda b: b.release(COMMAND, 5, TRAIN), sim.path)
    assert info.value.reason is NackReason.BAD_CHANNEL
    assert sim.actuations() == []


def test_killed_simulator_fails_requests_fast_and_never_hangs(start_simulator: Start) -> None:
    sim = start_simulator()

    async def scenario(board: SerialBoard) -> None:
        await board.ping()
        sim.proc.send_signal(signal.SIGKILL)
        sim.proc.wait()
        started = time.monotonic()
        with pytest.raises((BoardNoReply, BoardUnavailable)):
            await board.release(COMMAND, 1, TRAIN)
        assert time.monotonic() - started < 2.0
        assert not board.is_open
        with pytest.raises(BoardUnavailable):
            await board.ping()

    run(scenario, sim.path)
    assert sim.actuations() == []


def test_lost_port_during_wait_gives_no_reply(start_simulator: Start) -> None:
    # The board swallows the first ACK, then dies while the host waits for it:
    # the release was written, so the outcome is unknown (BoardNoReply).
    sim = start_simulator("--drop-release-acks", "1")

    async def scenario(board: SerialBoard) -> None:
        async def kill_soon() -> None:
            for _ in range(1000):  # the actuation line lands before the (dropped) ack
                if sim.actuations():
                    break
                await asyncio.sleep(0.005)
            sim.proc.kill()

        killer = asyncio.create_task(kill_soon())
        with pytest.raises(BoardNoReply):
            await board.release(COMMAND, 1, TRAIN)
        await killer

    async def open_and_run() -> None:
        board = SerialBoard(sim.path, ack_timeout=1.0, max_retries=0)
        await board.open()
        try:
            await scenario(board)
        finally:
            await board.close()

    asyncio.run(open_and_run())
    assert len(sim.actuations()) == 1


def test_unopened_or_missing_port_is_unavailable(tmp_path: os.PathLike[str]) -> None:
    async def scenario() -> None:
        board = SerialBoard(os.path.join(tmp_path, "no-such-port"))
        with pytest.raises(BoardUnavailable):
            await board.ping()
        with pytest.raises(BoardUnavailable):
            await board.open()
        assert not board.is_open

    asyncio.run(scenario())


def test_close_and_reopen_through_stable_link(start_simulator: Start) -> None:
    sim = start_simulator()

    async def scenario() -> None:
        board = SerialBoard(str(sim.link))
        for _ in range(3):
            await board.open()
            assert board.is_open
            await board.ping()
            await board.close()
            assert not board.is_open

    asyncio.run(scenario())


def test_late_reply_from_earlier_request_is_ignored(start_simulator: Start) -> None:
    # A timeout shorter than the reply path makes late replies arrive while the
    # next request waits; they must be ignored and never answer the wrong request.
    sim = start_simulator()

    async def scenario(board: SerialBoard) -> None:
        for command_id in range(1, 6):
            ack = await board.release(command_id, 1, TRAIN)
            assert ack.command_id == command_id
            reply = await board.query(command_id)
            assert reply.command_id == command_id and reply.executed

    run(scenario, sim.path, ack_timeout=0.0003, max_retries=50)
    assert [int(a["command_id"], 16) for a in sim.actuations()] == [1, 2, 3, 4, 5]



async def _reboot_after_actuation(sim: SimulatorProcess) -> None:
    for _ in range(1000):  # the actuation line lands before the (dropped) ack
        if sim.actuations():
            break
        await asyncio.sleep(0.005)
    assert sim.actuations()
    sim.send_signal(signal.SIGHUP)
    for _ in range(1000):  # well before the host's 1 s ack timeout
        if "REBOOT " in sim.stderr_file.read_text():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("simulator did not reboot")


def test_lost_release_ack_is_resolved_by_query_not_by_resending(
    start_simulator: Start, caplog: pytest.LogCaptureFixture
) -> None:
    sim = start_simulator("--drop-release-acks", "1")

    async def scenario(board: SerialBoard) -> None:
        pong = await board.ping()
        ack = await board.release(COMMAND, 1, TRAIN)
        assert ack.duplicate and ack.command_id == COMMAND and ack.boot_id == pong.boot_id

    with caplog.at_level("WARNING", logger="firmware_bridge.serial_board"):
        run(scenario, sim.path, ack_timeout=0.1)
    assert len(sim.actuations()) == 1
    assert any("querying" in r.getMessage() for r in caplog.records)


def test_board_reset_before_release_ack_never_pulses_twice(start_simulator: Start) -> None:
    # THE double-pulse bug: the board executes the RELEASE, then browns out before
    # its ACK. A blind retransmission would reach an empty de-dup ring and pulse
    # again; the host must QUERY, see the new boot id and give up (BoardNoReply).
    sim = start_simulator("--drop-release-acks", "1")

    async def scenario(board: SerialBoard) -> None:
        await board.ping()  # the host knows the boot id before the release
        rebooter = asyncio.create_task(_reboot_after_actuation(sim))
        with pytest.raises(BoardNoReply, match="board reset"):
            await board.release(COMMAND, 1, TRAIN)
        await rebooter

    run(scenario, sim.path, ack_timeout=1.0)
    assert len(sim.actuations()) == 1


def test_reset_before_ack_without_known_boot_id_is_unknown(start_simulator: Start) -> None:
    # No reply seen before the release: "not executed" after the timeout cannot
    # tell a lost frame from act-then-reset, so the host must not re-send.
    sim = start_simulator("--drop-release-acks", "1")

    async def scenario(board: SerialBoard) -> None:
        rebooter = asyncio.create_task(_reboot_after_actuation(sim))
        with pytest.raises(BoardNoReply):
            await board.release(COMMAND, 1, TRAIN)
        await rebooter

    run(scenario, sim.path, ack_timeout=1.0)
    assert len(sim.actuations()) == 1


# --- firmware 1.2: execution count and ring size ------------------------------------


def test_driver_tracks_the_count_and_ring_of_the_current_boot(start_simulator: Start) -> None:
    sim = start_simulator("--ring-size", "40")

    async def scenario(board: SerialBoard) -> None:
        assert (board.exec_count, board.ring_size) == (None, None)  # nothing heard yet
        pong = await board.ping()
        assert (board.exec_count, board.ring_size) == (pong.exec_count, pong.ring_size) == (0, 40)
        ack = await board.release(COMMAND, 1, TRAIN)
        assert ack.exec_count == board.exec_count == 1
        assert (await board.release(COMMAND, 1, TRAIN)).exec_count == 1  # duplicate
        sim.send_signal(signal.SIGHUP)
        for _ in range(100):  # the signal is handled asynchronously
            reply = await board.query(COMMAND)
            if reply.boot_id != ack.boot_id:
                break
            await asyncio.sleep(0.02)
        # A new boot: its count is the reply's, its ring size unknown until a PONG.
        assert (reply.exec_count, board.exec_count, board.ring_size) == (0, 0, None)
        await board.ping()
        assert board.ring_size == 40

    run(scenario, sim.path)


def test_old_firmware_leaves_the_count_unknown_and_keeps_query_first(
    start_simulator: Start,
) -> None:
    sim = start_simulator("--firmware", "1.1", "--drop-release-acks", "1")

    async def scenario(board: SerialBoard) -> None:
        pong = await board.ping()
        assert (pong.fw_minor, pong.exec_count, pong.ring_size) == (1, None, None)
        ack = await board.release(COMMAND, 1, TRAIN)  # ACK lost: resolved by QUERY
        assert ack.duplicate and ack.exec_count is None
        assert (board.exec_count, board.ring_size) == (None, None)

    run(scenario, sim.path, ack_timeout=0.1)
    assert len(sim.actuations()) == 1


class LossyWire:
    """A simulated board in this process on a real pty, behind a wire that loses
    the first copy of every RELEASE for ``lose`` (the board never sees it)."""

    def __init__(self, board: SimulatedBoard, lose: int) -> None:
        self.board = board
        self._lose: int | None = lose
        self._decoder = FrameDecoder()
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)

    def __enter__(self) -> LossyWire:
        asyncio.get_running_loop().add_reader(self._master, self._readable)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.get_running_loop().remove_reader(self._master)
        os.close(self._master)
        os.close(self._slave)

    def _readable(self) -> None:
        for frame in self._decoder.feed(os.read(self._master, 4096)):
            message = decode(frame)
            if isinstance(message, Release) and message.command_id == self._lose:
                self._lose = None
                continue
            os.write(self._master, self.board.feed(frame.serialize(), time.monotonic()))


def _release_over_lossy_wire(
    others_unseen: int, *, ping: bool = True
) -> tuple[SimulatedBoard, BaseException | None]:
    """ping (or only a QUERY: a count but no ring size), then ``others_unseen``
    releases the driver never hears of, then a release of COMMAND whose first
    frame is lost."""
    board = SimulatedBoard(ring_size=4)

    async def main() -> BaseException | None:
        with LossyWire(board, lose=COMMAND) as wire:
            driver = SerialBoard(wire.path, ack_timeout=0.1)
            await driver.open()
            try:
                first = await (driver.ping() if ping else driver.query(COMMAND))
                assert first.exec_count == 0
                for command_id in range(1, 1 + others_unseen):
                    board.feed(encode(Release(command_id, 2, 1, 10, 10), 0), time.monotonic())
                    board.advance(time.monotonic() + 1)
                await driver.release(COMMAND, 1, TRAIN)
            except BoardNoReply as exc:
                return exc
            finally:
                await driver.close()
            return None

    return board, asyncio.run(main())


def test_lost_release_frame_is_resent_when_the_ring_vouches() -> None:
    board, error = _release_over_lossy_wire(others_unseen=0)
    assert error is None
    assert board.actuation_count == 1 and board.exec_count == 1


def test_release_is_never_resent_when_the_ring_cannot_vouch() -> None:
    # The driver's count is older than the ring: more releases ran than the ring
    # holds since it last heard one, so "not executed" no longer proves the lost
    # frame never arrived. Unknown, not a second send.
    board, error = _release_over_lossy_wire(others_unseen=5)
    assert isinstance(error, BoardNoReply) and "cannot vouch" in str(error)
    assert board.actuation_count == 5


def test_without_the_ring_size_the_held_link_alone_decides() -> None:
    # No PONG in this boot: the rule cannot be applied, and the driver falls back
    # to what made re-sending safe before counts existed - it held the link.
    board, error = _release_over_lossy_wire(others_unseen=5, ping=False)
    assert error is None
    assert board.actuation_count == 6
