"""The core in process: real journal, real serial driver, the simulated board on an
in-memory link, and a clock the test moves, so the timer branches run in milliseconds
(devtools/core_rig.py). The promises' end-to-end tests with real processes stay in
test_release_once.py and test_journal_failures.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from devtools.core_rig import CoreRig
from gateway.dispatch import DOUBT_GRACE_S

WIRED = [
    {
        "id": "W1",
        "kind": "washer",
        "channel": 1,
        "cycles": {"normal": {"pulses": 1}},
        "busy_input": {"input": 1, "debounce_ms": 100},
        "confirm_window_s": 60,
        "late_start_grace_s": 600,
    },
    {"id": "W2", "kind": "washer", "channel": 2, "cycles": {"normal": {"pulses": 1}}},
]


def run(tmp_path: Path, scenario: Callable[[CoreRig], Awaitable[None]], **rig: Any) -> None:
    async def main() -> None:
        r = CoreRig(tmp_path, **rig)
        try:
            await scenario(r)
        finally:
            await r.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_release_goes_out_once_and_a_duplicate_gets_the_stored_result(tmp_path: Path) -> None:
    async def scenario(rig: CoreRig) -> None:
        await rig.start()
        await rig.settle()
        token = rig.sign("exec-1", machine_id="W2")
        await rig.command(token)
        await rig.settle()
        assert rig.state("exec-1") == "released" and rig.pulses("exec-1") == 1
        await rig.command(token)
        await rig.settle()
        assert rig.pulses("exec-1") == 1
        assert [topic for topic, _ in rig.published] == ["results"]

    run(tmp_path, scenario, machines=WIRED)


def test_a_command_waiting_for_an_absent_board_expires_with_compensation(tmp_path: Path) -> None:
    async def scenario(rig: CoreRig) -> None:
        rig.link.unplug()
        core = await rig.start()
        await rig.command(rig.sign("exec-1", machine_id="W2", ttl_s=120))
        assert rig.state("exec-1") == "accepted"
        rig.clock.advance(121)
        core.sweep()
        assert (rig.state("exec-1"), rig.reason("exec-1")) == ("expired", "command_expired")
        rig.link.plug()  # the board comes back: nothing of it is sent any more
        await rig.settle()
        assert rig.pulses("exec-1") == 0

    run(tmp_path, scenario, machines=WIRED)


def test_a_release_the_board_never_answers_for_ends_in_needs_review(tmp_path: Path) -> None:
    async def scenario(rig: CoreRig) -> None:
        core = await rig.start()
        await rig.settle()
        rig.link.lose_to_host = 10**9  # the board acts, but nothing it says gets back
        await rig.command(rig.sign("exec-1", machine_id="W2", ttl_s=60))
        await rig.settle(until=lambda: not core.link.connected)
        assert rig.state("exec-1") == "dispatching" and rig.pulses("exec-1") == 1
        rig.clock.advance(60 + DOUBT_GRACE_S - 1)
        core.sweep()
        assert rig.state("exec-1") == "dispatching"  # still within the grace
        rig.clock.advance(2)
        core.sweep()
        assert rig.state("exec-1") == "needs_review"
        assert rig.reason("exec-1") == "outcome_unknown_board_unreachable"
        rig.link.lose_to_host = 0  # the board answers again: nothing is re-sent
        await rig.settle()
        assert rig.pulses("exec-1") == 1

    run(tmp_path, scenario, machines=WIRED)


def test_no_start_in_the_confirm_window_then_a_late_start(tmp_path: Path) -> None:
    async def scenario(rig: CoreRig) -> None:
        core = await rig.start()
        await rig.settle()
        await rig.command(rig.sign("exec-1", machine_id="W1"))
        await rig.settle(until=lambda: rig.state("exec-1") == "released")
        await asyncio.sleep(0.1)  # readings of the idle machine
        core.sweep()
        assert rig.state("exec-1") == "released"  # the window is still open

        rig.clock.advance(60.2)
        sampled = rig.clock.now
        await rig.settle(until=lambda: core.confirmation.sampled_at >= sampled)
        core.sweep()
        assert (rig.state("exec-1"), rig.reason("exec-1")) == (
            "not_started",
            "no_start_in_confirm_window",
        )

        rig.link.board.force_input(1, True)  # it starts after all, within the grace
        await asyncio.sleep(0.1)
        rig.clock.advance(0.2)  # past the debounce
        await rig.settle(until=lambda: rig.state("exec-1") == "started")
        assert rig.reason("exec-1") == "late_start"
        assert rig.pulses("exec-1") == 1

    run(tmp_path, scenario, machines=WIRED)


def test_the_core_stops_when_cancelled_even_as_it_is_woken(tmp_path: Path) -> None:
    """Python 3.11's asyncio.wait_for swallows a cancellation that arrives as the
    awaited event fires (gh-86296): a loop waiting that way never stops, and the daemon
    hangs on SIGTERM. Found by the model (tests/model): a crash that never finished."""

    async def scenario(rig: CoreRig) -> None:
        core = await rig.start()
        await rig.settle()
        for _ in range(20):
            core.link.recovery_wanted.set()  # wakes run_recovery ...
            task = asyncio.get_running_loop().create_task(core.dispatch.run_recovery())
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            core.link.recovery_wanted.set()
            task.cancel()  # ... in the same turn as it is cancelled
            done, _ = await asyncio.wait({task}, timeout=1.0)
            assert done, "run_recovery ignored its cancellation"

    run(tmp_path, scenario, machines=WIRED)


def test_the_same_token_again_is_answered_without_verifying_it_again(tmp_path: Path) -> None:
    """The cloud re-sends a command until it sees its result: the exact bytes of a token
    already verified and journaled are answered from the journal. Any other token for
    the same key (re-signed, or forged) is verified in full."""

    async def scenario(rig: CoreRig) -> None:
        core = await rig.start()
        await rig.settle()
        verified: list[bytes] = []
        verify = core.intake._verifier.verify  # noqa: SLF001 - counting the real verifier

        def counting(payload: bytes, **kw: Any) -> Any:
            verified.append(payload)
            return verify(payload, **kw)

        core.intake._verifier.verify = counting  # type: ignore[method-assign]  # noqa: SLF001
        token = rig.sign("exec-1", machine_id="W2")
        await rig.command(token)
        await rig.settle()
        for _ in range(3):
            await rig.command(token)
        assert verified == [token] and rig.pulses("exec-1") == 1
        assert len(rig.published) == 3
        resigned = rig.sign("exec-1", machine_id="W2", now=rig.clock() + 1)
        assert resigned != token
        forged = token[:-4] + (b"AAAA" if token[-4:] != b"AAAA" else b"BBBB")
        await rig.command(resigned)
        await rig.command(forged)
        assert verified == [token, resigned, forged]
        assert len(rig.published) == 5 and rig.pulses("exec-1") == 1
        assert b'"bad_signature"' in rig.published[-1][1]

    run(tmp_path, scenario, machines=WIRED)
