"""The release protocol as a model: hypothesis explores interleavings of the real core.

The state machine drives the actual intake, dispatch and recovery code (the daemon's
own ``build_core``) with a real journal file, the real serial driver and the simulated
board on an in-memory link (devtools/core_rig.py), through every event the issue
names: commands (fresh, duplicate, same key with other claims, expired, forged),
journal commits failing at each commit point, crashes (every in-memory object dropped,
the journal file and the board kept) with restarts, board resets, frames lost both
ways, the board's ring overflowing with releases that are not ours, time passing, and
the event loop advancing by a chosen number of steps so that each of those can land
between any two of the core's own steps.

After every step it checks the promises as invariants (see ``ReleaseModel``); the
last step heals everything and checks that every authentic command reached a final
state. tests/model/test_release_model.py runs it in the suite (short profile) and
replays the shrunk counterexamples it found; ``scripts/model-check.sh`` runs the
long profile and prints what it explored.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cloud_sync.signing import generate_demo_keypair, sign_command
from devtools.core_rig import CoreRig
from firmware_bridge.frames import FrameDecoder, Release, ReleaseLevel, decode, encode
from firmware_bridge.simulator import SimulatedBoard
from gateway.dispatch import DOUBT_GRACE_S, command_id_for
from gateway.journal import JournalUnwritable

__all__ = ["COMMIT_LABELS", "KEYS", "ReleaseModel", "STATS"]

RING_SIZE = 3  # small, so that forgetting is a few releases away
MACHINES = [
    {"id": f"M{ch}", "kind": "washer", "channel": ch, "cycles": {"normal": {"pulses": 1}}}
    for ch in range(1, 7)
]
KEYS = [f"k{i}" for i in range(8)]
# Every commit of the release path, by the label the journal gives it.
COMMIT_LABELS = [
    "record:",
    "transition:dispatching",
    "transition:released",
    "transition:failed",
    "transition:accepted",
    "transition:expired",
    "transition:needs_review",
    "in_doubt",
    "restamp",
    "note",
    "*",
]
# States that say the machine did not run: a board that executed the key must never
# end in one of them (and accepted/rejected never reach the board at all).
NOT_RUN = {"accepted", "rejected", "expired", "failed"}
FINAL = {"released", "failed", "rejected", "expired", "needs_review"}
# What the explorer saw, over every run in this process (scripts/model-check.sh).
STATS: Counter[str] = Counter()


def _workdir() -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="metalav-model-", dir=shm if shm.is_dir() else None))


class ReleaseModel(RuleBasedStateMachine):
    """Invariants, after every step:

    - the board never pulsed a command id twice (promise 1);
    - a command the session acknowledged is in the journal (promise 3: no PUBACK
      before the decision is durable);
    - a key in a final state stays there;
    - a key the board executed never ends in a state that says it did not run, and a
      key journaled ``released`` was pulsed exactly once;
    - ``needs_review`` only for a key whose release frame was written to the board, or
      that was the first unsettled release when the gateway crashed;
    and at the end, with faults healed and time run out, every authentic key journaled
    is in a final state (promise 2: never "unknown forever").
    """

    def __init__(self) -> None:
        super().__init__()
        self.workdir = _workdir()
        self.loop = asyncio.new_event_loop()
        board = SimulatedBoard(channels=8, ring_size=RING_SIZE)
        self.rig = CoreRig(self.workdir, board=board, machines=MACHINES)
        self.failing: set[str] = set()
        self.tokens: dict[str, bytes] = {}
        self.acked: set[str] = set()  # authentic keys whose command was acknowledged
        self.written: set[int] = set()  # command ids of every release frame written
        # At each crash, the first unsettled release in line: the gateway cannot tell
        # whether its frame left before the crash (telling would cost a durable write
        # before every release), so it may end in needs_review even if it never did.
        self.crash_suspects: set[str] = set()
        self.final: dict[str, str] = {}
        self._decoder = FrameDecoder()
        self._foreign = 0xF0000000
        forger_private, _ = generate_demo_keypair()
        self._forger = forger_private
        self.rig.link.on_host_write = self._host_wrote

    # -- plumbing --------------------------------------------------------------------

    def _host_wrote(self, data: bytes) -> None:
        for frame in self._decoder.feed(data):
            with contextlib.suppress(Exception):
                message = decode(frame)
                if isinstance(message, Release | ReleaseLevel):
                    self.written.add(message.command_id)

    def _attach_faults(self) -> None:
        assert self.rig.core is not None
        self.rig.core.journal.fail_commit = lambda label: any(
            p == "*" or label.startswith(p) for p in self.failing
        )

    def _start(self) -> None:
        self.loop.run_until_complete(self.rig.start())
        self._attach_faults()

    def _spin(self, steps: int) -> None:
        for _ in range(steps):
            self.loop.run_until_complete(asyncio.sleep(0))

    def _offer(self, key: str | None, token: bytes) -> None:
        """The MQTT session's part: acknowledged only if handle_command returned."""
        assert self.rig.core is not None
        try:
            self.loop.run_until_complete(self.rig.core.intake.handle_command(token))
        except JournalUnwritable:
            STATS["command not durable, not acked"] += 1
            return
        if key is not None:
            self.acked.add(key)
        STATS["command acked"] += 1

    def _rows(self) -> dict[str, tuple[str, str | None]]:
        with contextlib.closing(sqlite3.connect(self.rig.config.journal.path)) as conn:
            rows = conn.execute("SELECT execute_key, state, reason FROM executions").fetchall()
        return {key: (state, reason) for key, state, reason in rows}

    def _pulses(self) -> Counter[int]:
        return Counter(a.command_id for a in self.rig.link.actuations)

    # -- the world -------------------------------------------------------------------

    @initialize()
    def boot(self) -> None:
        self._start()
        self.loop.run_until_complete(self.rig.settle(until=self.rig.quiet))

    @rule(key=st.sampled_from(KEYS), machine=st.sampled_from([m["id"] for m in MACHINES]))
    def command(self, key: str, machine: str) -> None:
        token = self.tokens.setdefault(key, self.rig.sign(key, machine_id=machine, ttl_s=120))
        self._offer(key, token)

    @rule(key=st.sampled_from(KEYS), machine=st.sampled_from([m["id"] for m in MACHINES]))
    def same_key_other_claims(self, key: str, machine: str) -> None:
        self._offer(key, self.rig.sign(key, machine_id=machine, payment_id=f"other-{key}"))

    @rule(key=st.sampled_from(KEYS))
    def expired_command(self, key: str) -> None:
        token = self.rig.sign(key, machine_id="M1", ttl_s=60, now=self.rig.clock() - 100)
        self._offer(key, token)

    @rule(key=st.sampled_from(KEYS))
    def forged_command(self, key: str) -> None:
        token = sign_command(
            self._forger,
            execute_key=key,
            audience=self.rig.gateway_id,
            payment_id="forged",
            machine_id="M1",
            cycle="normal",
            now=self.rig.clock(),
        )
        self._offer(None, token)  # never proof of anything: not tracked as acked

    @rule(label=st.sampled_from(COMMIT_LABELS))
    def journal_fails(self, label: str) -> None:
        self.failing.add(label)
        STATS[f"journal fails at {label}"] += 1

    @rule()
    def journal_heals(self) -> None:
        self.failing.clear()

    @precondition(lambda self: self.rig.core is not None)
    @rule()
    def crash_and_restart(self) -> None:
        self.loop.run_until_complete(self.rig.crash())
        with contextlib.closing(sqlite3.connect(self.rig.config.journal.path)) as conn:
            first = conn.execute(
                "SELECT execute_key FROM executions WHERE state = 'dispatching' AND in_doubt = 0"
                " ORDER BY dispatch_seq LIMIT 1"
            ).fetchone()
        if first is not None:
            self.crash_suspects.add(first[0])
        self._start()
        STATS["crash"] += 1

    @rule()
    def board_resets(self) -> None:
        self.rig.link.reset()
        STATS["board reset"] += 1

    @rule(n=st.integers(1, 4), towards_board=st.booleans())
    def frames_lost(self, n: int, towards_board: bool) -> None:
        if towards_board:
            self.rig.link.lose_to_board += n
        else:
            self.rig.link.lose_to_host += n
        STATS["frames lost"] += n

    @rule(n=st.integers(1, RING_SIZE + 2))
    def foreign_releases(self, n: int) -> None:
        """Releases the board executes that are not this gateway's (another process on
        the bus, a bench test): the ring of recent ids moves on."""
        board = self.rig.link.board
        for _ in range(n):
            self._foreign += 1
            frame = encode(Release(self._foreign, 8, 1, 20, 20), seq=0)
            board.feed(frame, self.loop.time())
        STATS["foreign releases"] += n

    @rule(steps=st.integers(1, 30))
    def core_steps(self, steps: int) -> None:
        self._spin(steps)

    @rule(ms=st.integers(1, 40))
    def real_time_passes(self, ms: int) -> None:
        """The driver's timeouts and retransmissions run on the loop's clock."""
        self.loop.run_until_complete(asyncio.sleep(ms / 1000))

    @precondition(lambda self: self.rig.core is not None)
    @rule(seconds=st.sampled_from([1.0, 30.0, 121.0, DOUBT_GRACE_S + 200]))
    def wall_time_passes(self, seconds: float) -> None:
        self.rig.clock.advance(seconds)
        assert self.rig.core is not None
        self.rig.core.sweep()

    # -- the promises ------------------------------------------------------------------

    @invariant()
    def never_twice(self) -> None:
        STATS["step"] += 1
        twice = {hex(cid): n for cid, n in self._pulses().items() if n > 1}
        assert not twice, f"pulsed more than once: {twice}"

    @invariant()
    def acknowledged_means_durable(self) -> None:
        missing = self.acked - set(self._rows())
        assert not missing, f"acknowledged but not journaled: {sorted(missing)}"

    @invariant()
    def outcomes_tell_the_truth(self) -> None:
        pulses = self._pulses()
        for key, (state, reason) in self._rows().items():
            cid = command_id_for(key)
            if pulses[cid]:
                assert state not in NOT_RUN, f"{key} was pulsed but is {state} ({reason})"
            if state == "released":
                assert pulses[cid] == 1, f"{key} is released but was pulsed {pulses[cid]}x"
            if state == "needs_review":
                assert cid in self.written or key in self.crash_suspects, (
                    f"{key} needs review but was never sent"
                )
            if state in FINAL:
                seen = self.final.setdefault(key, state)
                assert seen == state, f"{key} was final as {seen}, now {state}"

    def teardown(self) -> None:
        try:
            if self.rig.core is not None:
                self._everything_heals()
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.rig.stop())
            self.loop.close()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _everything_heals(self) -> None:
        """Promise 2: once the journal writes, the board answers and time runs out,
        every authentic command journaled reaches a final state."""
        self.failing.clear()
        link = self.rig.link
        link.lose_to_board = link.lose_to_host = 0
        assert self.rig.core is not None
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0.05))
            self.rig.clock.advance(DOUBT_GRACE_S + 200)
            self.rig.core.sweep()
        self.loop.run_until_complete(self.rig.settle(until=self._all_final))
        self.never_twice()
        self.outcomes_tell_the_truth()
        for state, reason in self._rows().values():
            STATS[f"final: {state} ({reason})"] += 1

    def _all_final(self) -> bool:
        return all(state in FINAL for state, _ in self._rows().values())
