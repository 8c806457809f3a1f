"""Releases to the board, one at a time in decision order, and recovery of those in doubt.

A release decision is journaled ``dispatching`` (with its DispatchStamp) before this
module sends a byte. One worker writes the releases in stamp order and records each
outcome before the next goes out, so a release that may have reached the board is
always known: one marked in doubt, the one the worker holds, or, after a crash, the
first unsettled one (the "suspect"). Every other ``dispatching`` row provably never
left the gateway. Recovery asks the board about the ones in doubt and never guesses:

    executed                                -> released
    not executed, same boot, ring vouches   -> sent again (it provably never ran)
    not executed, the ring may have forgot  -> needs_review (never pulsed again)
    another boot                            -> needs_review

When the journal cannot write (disk full), the worker holds the board's answer in
memory and records it as soon as a commit succeeds; nothing new is sent meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import os
import signal
from collections import deque
from collections.abc import Callable
from functools import partial

from cloud_sync.backoff import Backoff
from firmware_bridge.driver import Program, ring_vouches
from firmware_bridge.exceptions import BoardError, BoardNack, BoardUnavailable
from firmware_bridge.frames import QueryReply

from .board_link import BoardLink
from .config import GatewayConfig
from .confirmation import StartConfirmation
from .journal import DispatchStamp, Execution, Journal, JournalUnwritable
from .lifecycle import ExecutionState
from .outcomes import Outcomes

__all__ = ["DOUBT_GRACE_S", "Dispatch", "Verdict", "command_id_for", "query_verdict"]

log = logging.getLogger(__name__)

# How often the board is asked again about a command in doubt when it stopped answering.
RECOVERY_RETRY_S = 1.0
# A release still in doubt this long after its command expired (the board never came
# back to answer, or asking it keeps failing) goes to needs_review: a person decides,
# rather than "unknown forever" (promise 2).
DOUBT_GRACE_S = 600.0
# While the journal cannot write, what must be recorded is tried again this often
# (doubling, capped): each try is a probe of the disk, cheap but not free. No jitter:
# one process retrying its own disk stampedes nobody.
JOURNAL_RETRY = Backoff(0.2, 10.0, jitter=False)

# Fault injection for the crash tests: the daemon SIGKILLs itself at the named point,
# the Nth time it gets there with ``point:N``. Read once at start-up; unset in production.
_KILL_AT, _, _KILL_NTH = os.environ.get("METALAV_TEST_KILL_AT", "").partition(":")
_kill_countdown = int(_KILL_NTH or 1)


def _crash_point(name: str) -> None:
    global _kill_countdown
    if _KILL_AT == name:
        _kill_countdown -= 1
        if _kill_countdown == 0:
            log.warning("test fault injection: SIGKILL at %s", name)
            os.kill(os.getpid(), signal.SIGKILL)


def command_id_for(execute_key: str) -> int:
    """The board's 64-bit command id for an execution: stable across restarts, so a
    re-sent release is recognised by the board's de-duplication ring."""
    return int.from_bytes(hashlib.sha256(execute_key.encode()).digest()[:8], "big")


class Verdict(enum.Enum):
    """What a QUERY answer proves about a release in doubt."""

    EXECUTED = "executed"  # the board acted, once: released
    NEVER_RAN = "never_ran"  # same boot, within what its ring remembers: send it now
    BOARD_RESET = "board_reset"  # the ring that could tell is gone: a person decides
    MAY_BE_FORGOTTEN = "may_be_forgotten"  # more releases since than the ring holds


def query_verdict(row: Execution, reply: QueryReply, *, ring_size: int | None) -> Verdict:
    """The rule of docs/firmware-protocol.md, "What 'not executed' proves"."""
    if reply.executed:
        return Verdict.EXECUTED
    if reply.boot_id != row.dispatch_boot_id:
        # The board reset since the release was written: it may or may not have
        # pulsed. Never pulse again automatically (runbook incident A).
        return Verdict.BOARD_RESET
    if not ring_vouches(
        reply_exec_count=reply.exec_count,
        dispatch_exec_count=row.dispatch_exec_count,
        ring_size=ring_size,
    ):
        # Same boot, but the board executed more releases since this one than its ring
        # of recent ids holds (or cannot say how many): "not executed" may mean
        # "forgotten".
        return Verdict.MAY_BE_FORGOTTEN
    return Verdict.NEVER_RAN


class Dispatch:
    def __init__(
        self,
        config: GatewayConfig,
        journal: Journal,
        link: BoardLink,
        confirmation: StartConfirmation,
        outcomes: Outcomes,
        *,
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._journal = journal
        self._link = link
        self._board = link.driver
        self._confirmation = confirmation
        self._outcomes = outcomes
        self._clock = clock
        # Keys whose release the worker holds (being written, or its outcome waiting
        # for the journal); recovery leaves them alone.
        self._inflight: set[str] = set()
        # Releases to write, in dispatch order; ``True`` marks a release in doubt that
        # recovery proved never ran (the only kind ever sent again).
        self._queue: deque[tuple[str, bool]] = deque()
        self._queue_changed = asyncio.Event()
        self._last_seq = journal.last_dispatch_seq()
        # After a crash, the first unsettled release may have been on the wire: it is
        # asked about like one in doubt, and nothing is sent before recovery ran once.
        rows = journal.dispatching_in_order()
        pending = [r for r in rows if not r.in_doubt]
        self._suspect: str | None = pending[0].execute_key if pending else None
        self._queue.extend((r.execute_key, False) for r in pending[1:])
        # Releases that may have reached the board and that the board has not been asked
        # about yet. No new release goes out while there is one: every release the
        # board executes after it would push its id further out of the ring that
        # recovery asks (and, with enough of them, out of it).
        self._doubt: set[str] = {r.execute_key for r in rows if r.in_doubt}
        if self._suspect is not None:
            self._doubt.add(self._suspect)
        self._doubt_settled = asyncio.Event()
        self._recovered = asyncio.Event()
        self._stopping = False
        self._idle = asyncio.Event()  # the worker holds no release
        # Cleared while a release is on the wire and its outcome not yet written.
        self._outcome_written = asyncio.Event()
        self._outcome_written.set()
        self._idle.set()

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing held, no question pending for the board."""
        return not (self._queue or self._inflight or self._link.recovery_wanted.is_set())

    @property
    def release_out(self) -> bool:
        """A release is on the wire: the board's answer is due within milliseconds."""
        return not self._outcome_written.is_set()

    async def until_outcome_written(self, timeout_s: float) -> None:
        """Until the release on the wire has its outcome written (not flushed), or
        ``timeout_s``. Intake waits here before flushing a decision, so that one flush
        covers both: the next release needs both durable anyway."""
        if not self._outcome_written.is_set():
            await _wait(self._outcome_written, timeout_s)

    @property
    def board_ready(self) -> bool:
        """A release decided now can be stamped and sent."""
        return self._link.connected and self._link.state.boot_id is not None

    def stamp(self) -> DispatchStamp | None:
        """A new dispatch decision for the board as known now; None while it is away."""
        state = self._link.state
        if not state.connected or state.boot_id is None:
            return None
        # The board's execution count belongs to the boot the driver last heard from;
        # recorded only when that is the boot this release is stamped with.
        count = self._board.exec_count if self._board.boot_id == state.boot_id else None
        self._last_seq += 1
        return DispatchStamp(state.boot_id, count, self._last_seq)

    def enqueue(self, execute_key: str) -> None:
        """Hand a journaled ``dispatching`` row to the worker (in stamp order)."""
        self._queue.append((execute_key, False))
        self._queue_changed.set()

    async def run(self) -> None:
        """The one writer of releases: each in dispatch order, each settled in the
        journal before the next goes out (the invariant recovery relies on)."""
        await self._recovered.wait()
        retry = JOURNAL_RETRY.delays()
        while not self._stopping:
            if not self._queue:
                self._queue_changed.clear()
                await self._queue_changed.wait()
                continue
            if not self._queue[0][1] and self._doubt_pending():
                # Recovery first; it wakes us when it has asked the board.
                self._link.recovery_wanted.set()
                self._doubt_settled.clear()
                await _wait(self._doubt_settled, self._config.board.health_ping_s)
                continue
            key, resend = self._queue.popleft()
            try:
                await self._dispatch(key, resend=resend)
            except JournalUnwritable:
                # Nothing was sent (the stamp could not be written): first in line again.
                self._queue.appendleft((key, resend))
                await asyncio.sleep(next(retry))
                continue
            retry = JOURNAL_RETRY.delays()

    def _doubt_pending(self) -> bool:
        """A release in doubt still waits for the board's answer (or a person's)."""
        for key in list(self._doubt):
            row = self._journal.get(key)
            if row is None or row.state != ExecutionState.DISPATCHING:
                self._doubt.discard(key)
        return bool(self._doubt)

    async def _dispatch(self, execute_key: str, *, resend: bool = False) -> None:
        """Write one release and record what the board said, however long the journal
        takes to accept it (the board's answer is never lost nor acted on twice)."""
        if execute_key in self._inflight:
            return
        self._inflight.add(execute_key)
        self._idle.clear()
        try:
            try:
                outcome = await self._send_release(execute_key, resend)
            except JournalUnwritable:
                raise
            except Exception:
                # A bug must not kill the worker: the row stays dispatching, in doubt,
                # and recovery / run_timers settle it by asking the board or a person.
                log.exception("execution %s: dispatch failed unexpectedly", execute_key)
                outcome = partial(self._mark_in_doubt, execute_key, "internal error while sending")
            if outcome is not None:
                await self._until_durable(outcome, execute_key)
        finally:
            self._inflight.discard(execute_key)
            self._outcome_written.set()
            self._idle.set()

    async def _until_durable(self, write: Callable[[], object], execute_key: str) -> None:
        retry = JOURNAL_RETRY.delays()
        while True:
            try:
                write()
                return
            except JournalUnwritable as exc:
                log.critical(
                    "execution %s: the board's answer cannot be journaled (%s); held until"
                    " the journal writes again, nothing else is sent meanwhile",
                    execute_key,
                    exc.reason,
                )
                await asyncio.sleep(next(retry))

    async def _send_release(self, execute_key: str, resend: bool) -> Callable[[], object] | None:
        """Send the release under the board lock; return the journal write that records
        its outcome (None when nothing was sent and nothing needs recording)."""
        _crash_point("after_dispatching_commit")
        async with self._link.lock:
            # Read under the lock: while this waited, recovery or a timer may have
            # settled the execution (needs_review, expired, released); then nothing is sent.
            row = self._journal.get(execute_key)
            if row is None or row.state != ExecutionState.DISPATCHING:
                return None
            if row.in_doubt and not resend:
                return None  # only recovery, having asked the board, may send it again
            now = self._clock()
            never_sent = not (row.in_doubt or execute_key == self._suspect)
            if row.expires_at <= now and (resend or never_sent):
                # Nothing of it reached the board (that is how it got here): too late.
                return partial(
                    self._outcomes.finish, row, ExecutionState.EXPIRED, "command_expired"
                )
            boot_id = self._link.state.boot_id
            if boot_id is None or not self._link.connected:
                self._link.recovery_wanted.set()
                return None if resend else self._back_to_accepted(execute_key)
            if not self._same_boot(row, boot_id):
                if resend:
                    # Cleared by recovery on another boot: ask again, never guess.
                    self._link.recovery_wanted.set()
                    return None
                stamp = self.stamp()
                assert stamp is not None
                self._journal.restamp(execute_key, stamp, now=now)  # may raise: nothing sent
                row = self._journal.get(execute_key)
                assert row is not None
            machine = self._config.machine(row.machine_id)
            assert machine is not None  # checked when accepted; config is frozen
            program: Program = machine.cycles[row.cycle].train()
            # Nothing reaches the board on a decision a power cut could take back: this
            # release's ``dispatching`` row and the outcome of the one before it (the
            # invariant recovery relies on: only the first unsettled row may have left).
            await self._journal.flushed()  # may raise JournalUnwritable: nothing sent
            self._confirmation.drive(machine.channel, program.duration_ms)
            try:
                self._outcome_written.clear()  # set again once _dispatch wrote it
                ack = await self._board.release(row.command_id, machine.channel, program)
            except BoardNack as exc:
                return partial(
                    self._outcomes.finish,
                    row,
                    ExecutionState.FAILED,
                    f"board_nack:{exc.reason.name.lower()}",
                )
            except BoardUnavailable as exc:
                # Proved not sent: the execution waits for the board (or its expiry).
                self._link.lost(str(exc))
                self._link.recovery_wanted.set()  # wakes run_board to reconnect now
                return None if (resend or row.in_doubt) else self._back_to_accepted(execute_key)
            except BoardError as exc:  # BoardNoReply, or anything the driver could not classify
                # Sent, outcome unknown: only the board can tell (recovery asks it).
                log.error("execution %s: board did not answer the release (%s)", execute_key, exc)
                self._link.recovery_wanted.set()
                return partial(
                    self._mark_in_doubt, execute_key, "no reply from board; outcome in doubt"
                )
        _crash_point("after_board_ack")
        reason = "board_duplicate_ack" if ack.duplicate else None
        released_at = self._clock()
        # Written, not flushed: the next release's flush (just above) or the outbox's,
        # before the cloud hears of it, makes it durable; a kill -9 does not lose it.
        return partial(
            self._outcomes.released,
            row,
            reason,
            ack.boot_id,
            ack.exec_count,
            released_at,
            durable=False,
        )

    @staticmethod
    def _same_boot(row: Execution, boot_id: int) -> bool:
        """The board has not reset since this release was decided (or cleared by
        recovery): a release in doubt is sent again only to the boot that said it
        never ran it."""
        return row.dispatch_boot_id == boot_id

    def _mark_in_doubt(self, execute_key: str, detail: str) -> None:
        self._journal.mark_in_doubt(execute_key, now=self._clock(), detail=detail)
        self._doubt.add(execute_key)
        # Recovery may have run while the worker still held it: ask the board now.
        self._link.recovery_wanted.set()

    def _back_to_accepted(self, execute_key: str) -> Callable[[], object]:
        return partial(
            self._journal.transition,
            execute_key,
            from_states=(ExecutionState.DISPATCHING,),
            to_state=ExecutionState.ACCEPTED,
            reason="board_unavailable",
            now=self._clock(),
            report=False,
        )

    def _in_doubt(self) -> list[Execution]:
        """Releases that may have reached the board and wait for its answer."""
        return [
            r
            for r in self._journal.dispatching_in_order()
            if (r.in_doubt or r.execute_key == self._suspect)
            and r.execute_key not in self._inflight
        ]

    async def recover(self) -> bool:
        """Settle every release in doubt: ask the board, never guess.

        Returns False if the board could not be asked (try again later)."""
        for row in self._in_doubt():
            try:
                async with self._link.lock:
                    reply = await self._board.query(row.command_id)
            except BoardError as exc:
                log.warning("recovery of %s postponed: %s", row.execute_key, exc)
                return False
            verdict = query_verdict(row, reply, ring_size=self._board.ring_size)
            if verdict is Verdict.EXECUTED:
                self._outcomes.released(
                    row, "confirmed_by_board_query", reply.boot_id, reply.exec_count
                )
            elif verdict is Verdict.BOARD_RESET:
                self._outcomes.needs_review(
                    row,
                    "board_reset_during_dispatch",
                    reply.boot_id,
                    "board reset while a release was in doubt; check the machine",
                )
            elif verdict is Verdict.MAY_BE_FORGOTTEN:
                self._outcomes.needs_review(
                    row,
                    "board_cannot_vouch",
                    reply.boot_id,
                    "the board no longer remembers enough releases to rule this one out",
                )
            elif row.expires_at <= self._clock():
                self._outcomes.finish(row, ExecutionState.EXPIRED, "command_expired")
            else:
                # Same boot, still within what the board remembers, never seen: nothing
                # was pulsed, so sending it now is the first and only release.
                self._journal.note(
                    row.execute_key,
                    now=self._clock(),
                    state=ExecutionState.DISPATCHING,
                    detail="board never received it (same boot, within its memory);"
                    " dispatching again",
                )
                self._queue.appendleft((row.execute_key, True))
                self._queue_changed.set()
        self._recovered.set()
        self._doubt_settled.set()
        return True

    async def run_recovery(self) -> None:
        """Ask the board about releases in doubt whenever the link says so (connect,
        boot id change, a release without a reply); dispatch what waited for the board."""
        retry = JOURNAL_RETRY.delays()
        while True:
            await _wait(self._link.recovery_wanted, self._config.board.health_ping_s)
            if not self._link.connected:
                self._link.recovery_wanted.clear()
                continue
            try:
                if self._link.recovery_wanted.is_set():
                    self._link.recovery_wanted.clear()
                    if not await self.recover():
                        self._link.recovery_wanted.set()
                        await self._link.drop("board did not answer recovery queries")
                        await asyncio.sleep(RECOVERY_RETRY_S)
                        continue
                self._dispatch_waiting()
            except JournalUnwritable:
                # Recovery and dispatch decisions wait for the journal: ask again later.
                self._link.recovery_wanted.set()
                await asyncio.sleep(next(retry))
                continue
            retry = JOURNAL_RETRY.delays()

    def _dispatch_waiting(self) -> None:
        """Executions accepted while the board was away: expire or dispatch them."""
        for row in self._journal.in_states((ExecutionState.ACCEPTED,)):
            now = self._clock()
            if row.expires_at <= now:
                self._outcomes.finish(
                    row,
                    ExecutionState.EXPIRED,
                    "command_expired",
                    from_states=(ExecutionState.ACCEPTED,),
                )
                continue
            stamp = self.stamp()
            if stamp is None:
                return
            if self._journal.transition(
                row.execute_key,
                from_states=(ExecutionState.ACCEPTED,),
                to_state=ExecutionState.DISPATCHING,
                now=now,
                dispatch=stamp,
                report=False,
            ):
                self.enqueue(row.execute_key)

    def sweep(self, now: float) -> None:
        """Deadlines of releases not yet settled (promise 2: never "unknown forever")."""
        for row in self._journal.in_states((ExecutionState.ACCEPTED,)):
            if row.expires_at <= now:
                self._outcomes.finish(
                    row,
                    ExecutionState.EXPIRED,
                    "command_expired",
                    from_states=(ExecutionState.ACCEPTED,),
                )
        for row in self._journal.dispatching_in_order():
            if row.execute_key in self._inflight:
                continue
            if not (row.in_doubt or row.execute_key == self._suspect):
                if row.expires_at <= now:  # waiting in line, never sent: too late now
                    self._outcomes.finish(row, ExecutionState.EXPIRED, "command_expired")
            elif row.expires_at + DOUBT_GRACE_S < now:
                self._outcomes.needs_review(
                    row,
                    "outcome_unknown_board_unreachable",
                    None,
                    "the board never confirmed or denied this release",
                )

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Clean shutdown: take no further release, let the one being written finish
        and be journaled (bounded: an outcome the journal refuses stays in doubt and
        recovery settles it at the next start)."""
        self._stopping = True
        await _wait(self._idle, timeout_s)


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    """Until ``event`` is set or ``timeout_s`` passed. Not ``asyncio.wait_for``: in
    Python 3.11 it swallows a cancellation that arrives as the event fires (gh-86296),
    and a loop waiting with it then never stops (a daemon that hangs on SIGTERM)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
