"""The simulator program's machines, timing and faults, seen through SerialBoard
over a real pty (issue 3 item 5)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from firmware_bridge.driver import InputState, LevelHold, PulseTrain, ring_vouches
from firmware_bridge.exceptions import BoardNoReply, BoardUnavailable
from firmware_bridge.serial_board import SerialBoard
from firmware_bridge.simulator import MachineSpec, load_scenario

from .conftest import SimulatorProcess

T = TypeVar("T")
Start = Callable[..., SimulatorProcess]
TRAIN = PulseTrain(count=1, on_ms=50, off_ms=50)


def run(coro_fn: Callable[[SerialBoard], Awaitable[T]], port: str, **kwargs: Any) -> T:
    async def main() -> T:
        board = SerialBoard(port, **kwargs)
        await board.open()
        try:
            return await coro_fn(board)
        finally:
            await board.close()

    return asyncio.run(main())


def _closures(edges: list[dict[str, Any]], channel: int) -> list[tuple[float, float]]:
    """(on time, off time) of each closure of ``channel``."""
    mine = [e for e in edges if e["channel"] == channel]
    assert [e["state"] for e in mine] == ["on", "off"] * (len(mine) // 2)
    pairs = zip(mine[::2], mine[1::2], strict=True)
    return [(on["monotonic"], off["monotonic"]) for on, off in pairs]


async def _wait_inputs(
    board: SerialBoard, predicate: Callable[[InputState], bool], within: float = 5.0
) -> float:
    deadline = time.monotonic() + within
    while True:
        state = await board.read_inputs()
        if predicate(state):
            return time.monotonic()
        assert time.monotonic() < deadline, f"inputs never matched; last {state}"
        await asyncio.sleep(0.01)


# --- program timing ------------------------------------------------------------


def test_pulse_train_produces_exactly_the_configured_edges(start_simulator: Start) -> None:
    sim = start_simulator("--time-scale", "1")
    train = PulseTrain(count=4, on_ms=60, off_ms=90)

    async def scenario(board: SerialBoard) -> None:
        ack = await board.release(0xA1, 3, train)
        assert not ack.duplicate
        await asyncio.sleep(train.duration_ms / 1000 + 0.2)

    run(scenario, sim.path)
    closures = _closures(sim.edges(), 3)
    assert len(closures) == train.count
    assert all(e["command_id"] == f"{0xA1:016x}" for e in sim.edges())
    for on, off in closures:
        assert abs((off - on) * 1000 - train.on_ms) <= 25
    for (_, off), (next_on, _) in zip(closures, closures[1:], strict=False):
        assert abs((next_on - off) * 1000 - train.off_ms) <= 25
    (line,) = sim.actuations()
    assert (line["kind"], line["pulse_count"], line["on_ms"], line["off_ms"]) == (
        "pulses",
        4,
        60,
        90,
    )


def test_level_hold_keeps_the_contact_closed_for_hold_ms(start_simulator: Start) -> None:
    sim = start_simulator("--time-scale", "1")

    async def scenario(board: SerialBoard) -> None:
        await board.release(0xB2, 2, LevelHold(hold_ms=300))
        # Busy while held: another command on the channel is refused, and the
        # contact is sensed closed.
        state = await board.read_inputs()
        assert state.relays == 0b10
        await asyncio.sleep(0.45)
        assert (await board.read_inputs()).relays == 0

    run(scenario, sim.path)
    ((on, off),) = _closures(sim.edges(), 2)
    assert abs((off - on) * 1000 - 300) <= 40
    (line,) = sim.actuations()
    assert (line["kind"], line["hold_ms"], line["pulse_count"]) == ("level", 300, 0)


def test_all_off_cancels_a_running_program(start_simulator: Start) -> None:
    sim = start_simulator("--time-scale", "1")

    async def scenario(board: SerialBoard) -> None:
        await board.release(0xC3, 1, LevelHold(hold_ms=5000))
        await board.all_off()
        assert (await board.read_inputs()).relays == 0
        # The channel is free again; the cancelled command stays executed.
        assert (await board.query(0xC3)).executed
        await board.release(0xC4, 1, TRAIN)
        await asyncio.sleep(TRAIN.duration_ms / 1000 + 0.1)

    run(scenario, sim.path)
    assert len(_closures(sim.edges(), 1)) == 2


# --- machines --------------------------------------------------------------------


def test_machine_goes_busy_after_the_train_and_idle_after_its_run(start_simulator: Start) -> None:
    # A 40-minute cycle (4-minute start) compressed 1200 times: 2 s (0.2 s).
    sim = start_simulator(
        "--machine",
        "channel=1,input=2,start_ms=240000,run_ms=2400000",
        "--machine-time-scale",
        "1200",
    )

    async def scenario(board: SerialBoard) -> None:
        assert (await board.read_inputs()).inputs == 0
        released = time.monotonic()
        await board.release(1, 1, TRAIN)
        rose = await _wait_inputs(board, lambda s: s.inputs == 0b10)
        fell = await _wait_inputs(board, lambda s: s.inputs == 0)
        assert 0.15 <= rose - released <= 0.4  # 240 s / 1200 = 0.2 s
        assert 1.8 <= fell - rose <= 2.3  # 40 min / 1200 = 2 s

    run(scenario, sim.path)


def test_never_starts_late_start_and_coins(tmp_path: Path, start_simulator: Start) -> None:
    scenario_file = tmp_path / "store.json"
    scenario_file.write_text(
        json.dumps(
            {
                "machine_time_scale": 10,
                "machines": [
                    "channel=1,input=1,start_ms=500,run_ms=3000",
                    {"channel": 2, "input": 2, "never_starts": True},
                    {"channel": 3, "input": 3, "late_ms": 6000, "run_ms": 3000},
                    "channel=4,input=4,coins=3,start_ms=500,run_ms=3000",
                ],
            }
        )
    )
    sim = start_simulator("--scenario", str(scenario_file))

    async def scenario(board: SerialBoard) -> None:
        for channel in (1, 2, 3):
            await board.release(channel, channel, TRAIN)
        await board.release(4, 4, PulseTrain(2, 50, 50))  # not enough coins
        await _wait_inputs(board, lambda s: s.inputs == 0b0001)  # ch1 after 50 ms
        await asyncio.sleep(0.2)
        assert (await board.read_inputs()).inputs == 0b0001
        await _wait_inputs(board, lambda s: s.inputs & 0b0100 != 0)  # late: 600 ms
        await board.release(5, 4, PulseTrain(3, 50, 50))  # enough coins now
        await _wait_inputs(board, lambda s: s.inputs & 0b1000 != 0)
        await _wait_inputs(board, lambda s: s.inputs == 0)
        assert (await board.read_inputs()).inputs & 0b0010 == 0  # never started

    run(scenario, sim.path)


def test_level_machine_starts_on_enable_and_dryer_top_up_extends_run(
    start_simulator: Start,
) -> None:
    sim = start_simulator(
        "--machine",
        "channel=1,input=1,level,start_ms=0,run_ms=2000",
        "--machine",
        "channel=2,input=2,start_ms=0,run_ms=3000,minutes_per_pulse=0.05",
        "--machine-time-scale",
        "10",
    )

    async def scenario(board: SerialBoard) -> None:
        await board.release(1, 1, LevelHold(hold_ms=150))
        await board.release(2, 2, TRAIN)  # dryer runs 300 ms
        started = await _wait_inputs(board, lambda s: s.inputs == 0b11)
        await board.release(3, 2, PulseTrain(2, 20, 20))  # + 2 x 3 s machine = 600 ms
        await _wait_inputs(board, lambda s: s.inputs & 0b01 == 0)  # level: 200 ms
        ended = await _wait_inputs(board, lambda s: s.inputs == 0)
        assert 0.8 <= ended - started <= 1.2

    run(scenario, sim.path)


# --- faults ----------------------------------------------------------------------


def test_stuck_relay_is_sensed_closed(start_simulator: Start) -> None:
    sim = start_simulator("--stuck-relay", "3")
    state = run(lambda b: b.read_inputs(), sim.path)
    assert state.relays == 0b100
    unsensed = start_simulator("--stuck-relay", "3", "--no-relay-sense")
    assert run(lambda b: b.read_inputs(), unsensed.path).relays is None


def test_lossy_corrupt_delayed_link_never_double_actuates(start_simulator: Start) -> None:
    sim = start_simulator(
        "--drop-rate",
        "0.1",
        "--corrupt-rate",
        "0.1",
        "--delay-ms",
        "20",
        "--seed",
        "7",
    )
    releases = 50

    async def scenario(board: SerialBoard) -> int:
        duplicates = 0
        for command_id in range(1, releases + 1):
            ack = await board.release(command_id, command_id % 4 + 1, TRAIN)
            assert ack.command_id == command_id
            duplicates += ack.duplicate
        return duplicates

    duplicates = run(scenario, sim.path, ack_timeout=0.08, max_retries=10)
    ids = [a["command_id"] for a in sim.actuations()]
    assert sorted(ids) == [f"{i:016x}" for i in range(1, releases + 1)]  # each exactly once
    assert duplicates > 0  # the faults really hit some acks


def test_reboot_mid_train_loses_the_ring_and_cuts_the_train(start_simulator: Start) -> None:
    sim = start_simulator("--time-scale", "1", "--reboot-mid-train", "2")
    train = PulseTrain(count=3, on_ms=100, off_ms=100)

    async def scenario(board: SerialBoard) -> None:
        first = await board.release(1, 1, TRAIN)
        ack = await board.release(2, 2, train)
        assert not ack.duplicate and ack.boot_id == first.boot_id
        await asyncio.sleep(train.duration_ms / 1000)
        reply = await board.query(2)
        assert reply.boot_id != ack.boot_id and not reply.executed
        assert (await board.read_inputs()).relays == 0

    run(scenario, sim.path)
    assert len(_closures(sim.edges(), 2)) == 2  # cut in the middle of the 2nd pulse
    sim.wait_stderr("REBOOT ")


def test_usb_unplug_and_replug(start_simulator: Start) -> None:
    sim = start_simulator()

    async def scenario() -> None:
        board = SerialBoard(str(sim.link), ack_timeout=0.1, max_retries=1)
        await board.open()
        before = await board.ping()
        sim.send_signal(signal.SIGUSR1)
        await asyncio.to_thread(sim.wait_stderr, "UNPLUG")
        with pytest.raises((BoardUnavailable, BoardNoReply)):
            await board.release(9, 1, TRAIN)
        await board.close()
        assert not sim.link.exists()
        with pytest.raises(BoardUnavailable):
            await board.open()
        sim.send_signal(signal.SIGUSR2)
        plug = await asyncio.to_thread(sim.wait_stderr, "PLUG ")
        await board.open()
        after = await board.ping()
        assert after.boot_id != before.boot_id
        assert plug.split() == ["PLUG", str(sim.link.resolve()), f"{after.boot_id:08x}"]
        assert (await board.release(9, 1, TRAIN)).boot_id == after.boot_id
        await board.close()

    asyncio.run(scenario())
    assert len(sim.actuations()) == 1


# --- ring and execution count (firmware 1.2) ----------------------------------------


def test_ring_size_option_forgets_ids_beyond_the_ring(start_simulator: Start) -> None:
    sim = start_simulator("--ring-size", "4")

    async def scenario(board: SerialBoard) -> None:
        pong = await board.ping()
        assert (pong.fw_minor, pong.exec_count, pong.ring_size) == (2, 0, 4)
        for command_id in range(1, 6):
            assert (await board.release(command_id, 1, TRAIN)).exec_count == command_id
        first = await board.query(1)
        assert (first.executed, first.exec_count) == (False, 5)
        assert not ring_vouches(
            reply_exec_count=first.exec_count,
            dispatch_exec_count=pong.exec_count,
            ring_size=pong.ring_size,
        )

    run(scenario, sim.path)
    assert len(sim.actuations()) == 5


def test_firmware_option_answers_like_an_older_board(start_simulator: Start) -> None:
    sim = start_simulator("--firmware", "1.1")

    async def scenario(board: SerialBoard) -> None:
        pong = await board.ping()
        assert (pong.fw_minor, pong.exec_count, pong.ring_size) == (1, None, None)
        assert (await board.release(1, 1, TRAIN)).exec_count is None
        assert (await board.query(1)).exec_count is None

    run(scenario, sim.path)


def test_scenario_sets_ring_size_and_firmware_and_the_command_line_wins(
    tmp_path: Path, start_simulator: Start
) -> None:
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps({"ring_size": 4, "firmware": "1.1"}))
    old = start_simulator("--scenario", str(path))
    new = start_simulator("--scenario", str(path), "--firmware", "1.2")

    async def pong_fields(board: SerialBoard) -> tuple[int, int | None, int | None]:
        pong = await board.ping()
        return pong.fw_minor, pong.exec_count, pong.ring_size

    assert run(pong_fields, old.path) == (1, None, None)
    assert run(pong_fields, new.path) == (2, 0, 4)


# --- one owner per bus ----------------------------------------------------------------


def test_second_owner_of_a_port_is_refused(start_simulator: Start) -> None:
    sim = start_simulator()

    async def scenario() -> None:
        first = SerialBoard(sim.path)
        await first.open()
        second = SerialBoard(str(sim.link))  # same device through the link
        with pytest.raises(BoardUnavailable):
            await second.open()
        assert not second.is_open
        await first.ping()
        await first.close()
        await second.open()  # free again once the owner closed it
        await second.ping()
        await second.close()

    asyncio.run(scenario())


def test_active_low_machine_over_the_pty(start_simulator: Start) -> None:
    sim = start_simulator(
        "--machine",
        "channel=4,input=4,start_ms=0,run_ms=3000,active_low",
        "--machine-time-scale",
        "10",
    )

    async def scenario(board: SerialBoard) -> None:
        assert (await board.read_inputs()).inputs == 0b1000  # idle: high
        released = time.monotonic()
        await board.release(1, 4, TRAIN)
        fell = await _wait_inputs(board, lambda s: s.inputs == 0)  # running: low
        rose = await _wait_inputs(board, lambda s: s.inputs == 0b1000)
        assert fell - released <= 0.2
        assert 0.2 <= rose - fell <= 0.45  # 3 s / 10

    run(scenario, sim.path)


def _control(path: Path, *lines: str) -> list[str]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        reader = sock.makefile("r", encoding="utf-8")
        answers = []
        for line in lines:
            sock.sendall(line.encode() + b"\n")
            answers.append(reader.readline().strip())
        return answers


def test_control_socket_forces_inputs(tmp_path: Path, start_simulator: Start) -> None:
    control = tmp_path / "ctl.sock"
    sim = start_simulator(
        "--control", str(control), "--machine", "channel=1,input=2,start_ms=0,run_ms=60000"
    )

    async def scenario(board: SerialBoard) -> None:
        assert (await board.read_inputs()).inputs == 0  # answered: the socket listens
        assert _control(control, "input 1 high", "input 3 high") == ["ok", "ok"]
        assert (await board.read_inputs()).inputs == 0b101
        await board.release(1, 1, TRAIN)
        await _wait_inputs(board, lambda s: s.inputs == 0b111)
        assert _control(
            control, "input 2 low", "input 9 sideways", "input 65 high", "input 1 auto"
        ) == ["ok", "error expected: input N high|low|auto", "error input must be 1..64", "ok"]
        assert (await board.read_inputs()).inputs == 0b100
        assert _control(control, "input 2 auto") == ["ok"]
        assert (await board.read_inputs()).inputs == 0b110

    run(scenario, sim.path)
    sim.stop()
    assert not control.exists()  # removed on exit


STORE_SCENARIO = Path(__file__).resolve().parents[2] / "scenarios" / "store-4x4.json"


def test_store_4x4_scenario_matches_the_example_store_and_serves(start_simulator: Start) -> None:
    # The scenario wires the machines of config.example.toml the same way.
    config = tomllib.loads((STORE_SCENARIO.parents[1] / "config.example.toml").read_text())
    specs = {
        m.channel: m
        for m in (
            MachineSpec.from_dict(item) for item in load_scenario(str(STORE_SCENARIO))["machines"]
        )
    }
    for machine in config["machines"]:
        spec = specs[machine["channel"]]
        busy = machine["busy_input"]
        assert spec.input == busy["input"], machine["id"]
        assert spec.active_low == (busy.get("active", "high") == "low"), machine["id"]
        programs = list(machine["cycles"].values())
        assert spec.level == any(p.get("type") == "level" for p in programs), machine["id"]
        if machine["kind"] == "dryer":
            assert spec.minutes_per_pulse == programs[0]["minutes_per_pulse"]
            assert spec.run_ms == programs[0]["minutes_per_pulse"] * 60_000  # one pulse

    sim = start_simulator("--scenario", str(STORE_SCENARIO))  # asserts the PTY line

    async def scenario(board: SerialBoard) -> None:
        pong = await board.ping()  # through 5 % loss and corruption: retried
        assert pong.channels == 8
        assert (await board.read_inputs()).inputs == 0b1000  # W4 idles high
        released = time.monotonic()
        await board.release(1, 1, TRAIN)  # W1: 6 machine minutes = 0.3 s to start
        rose = await _wait_inputs(board, lambda s: s.inputs & 1 != 0)
        assert 0.25 <= rose - released <= 1.5

    run(scenario, sim.path, ack_timeout=0.1, max_retries=8)
