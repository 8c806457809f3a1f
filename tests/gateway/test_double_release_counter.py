"""metalav_board_unexpected_executions_total, the counter that must stay 0 (the payments
runbook's "duplicidade: 0"): the board's own execution count (firmware 1.2) against
the releases this gateway sent it. In process: the real core, the real serial driver,
the simulated board on an in-memory link (devtools/core_rig.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from devtools.core_rig import CoreRig
from firmware_bridge.frames import Release, encode
from firmware_bridge.simulator import SimulatedBoard
from gateway.metrics import GatewayMetrics

MACHINES = [
    {"id": f"W{n}", "kind": "washer", "channel": n, "cycles": {"normal": {"pulses": 1}}}
    for n in (1, 2, 3)
]


def _unexpected(rig: CoreRig) -> float:
    assert rig.core is not None
    value = rig.core.metrics.registry.get_sample_value("metalav_board_unexpected_executions_total")
    return 0.0 if value is None else value


def test_releases_and_a_retransmitted_one_count_no_unexpected_execution(tmp_path: Path) -> None:
    async def main() -> None:
        # The board drops the first RELEASE_ACK: the driver sends the release again and
        # the board answers "duplicate" (its ring), one physical release.
        rig = CoreRig(
            tmp_path, board=SimulatedBoard(channels=8, drop_release_acks=1), machines=MACHINES
        )
        try:
            await rig.start()
            await rig.settle()
            for n, key in enumerate(("exec-a", "exec-b", "exec-c"), start=1):
                await rig.command(rig.sign(key, machine_id=f"W{n}"))
                await rig.settle(lambda key=key: rig.state(key) == "released")
            assert [rig.pulses(k) for k in ("exec-a", "exec-b", "exec-c")] == [1, 1, 1]
            assert _unexpected(rig) == 0
        finally:
            await rig.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_execution_the_gateway_did_not_send_is_counted(tmp_path: Path) -> None:
    async def main() -> None:
        board = SimulatedBoard(channels=8)
        rig = CoreRig(tmp_path, board=board, machines=MACHINES)
        try:
            await rig.start()
            await rig.settle()
            await rig.command(rig.sign("exec-a", machine_id="W1"))
            await rig.settle(lambda: rig.state("exec-a") == "released")
            # Someone else drives the board (or it executed something twice).
            board.feed(
                encode(Release(0xDEAD, 3, 1, 50, 50), seq=99), asyncio.get_running_loop().time()
            )
            await rig.command(rig.sign("exec-b", machine_id="W2"))
            await rig.settle(lambda: rig.state("exec-b") == "released")
            assert _unexpected(rig) == 1
        finally:
            await rig.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_board_count_rules() -> None:
    m = GatewayMetrics()

    def unexpected() -> float:
        return m.registry.get_sample_value("metalav_board_unexpected_executions_total") or 0.0

    m.board_count(0xA, 5, new_release=True)  # first count seen in this boot: the baseline
    m.board_count(0xA, 6, new_release=True)
    m.board_count(0xA, 6, new_release=False)  # a duplicate ack: same count
    m.board_count(0xA, 7, new_release=False)  # a release in doubt found executed
    m.board_count(0xA, None, new_release=True)  # old firmware: no count, nothing known
    assert unexpected() == 0
    m.board_count(0xA, 10, new_release=True)  # 8 expected
    assert unexpected() == 2
    m.board_count(0xB, 1, new_release=True)  # the board rebooted: a new baseline
    m.board_count(0xB, 2, new_release=True)
    assert unexpected() == 2
