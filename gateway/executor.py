"""The executor: the execution lifecycle of DESIGN.md, from a verified command to a
final state, and the recovery of executions a crash left half-done.

    received -> rejected(reason) | expired            (nothing reaches the board)
    received -> accepted -> dispatching                (durable before the first byte)
    dispatching -> released | failed(board_nack:...)   (board answered)
    dispatching -> accepted                             (board link down: nothing was sent)
    dispatching --no reply / crash--> in doubt; recovery queries the board about the id
        executed                                -> released
        not executed, same boot, ring vouches   -> sent again (it provably never ran)
        not executed, ring may have forgotten   -> needs_review (never pulsed again)
        new boot                                -> needs_review
    released -> started -> completed                    (machine's busy input, if wired)
    released -> not_started  (no start in the confirm window: alert + compensation)
    not_started -> started   (late start within the grace period: alert, the cloud
                              reverses the compensation)

Promise 1 rests on two locks: the journal row keyed by execute_key (a duplicate never
reaches the board; it gets the stored result) and the board's own de-duplication of
command ids within a boot. Promise 3 rests on ``handle_command`` returning only after
the journal commit; the MQTT session acknowledges the message after that.

Releases go to the board one at a time, in the order of their dispatch decisions
(``DispatchStamp.seq``), from one worker (:meth:`Executor.run_dispatch`); the next
is sent only once the outcome of the one before is in the journal. So a release that
may have reached the board is always known: one marked in doubt, the one the worker
holds, or, after a crash, the first unsettled one. Every other ``dispatching`` row
provably never left the gateway and is sent (or expires) normally, whatever the board
did meanwhile. When the journal cannot write (disk full), the worker keeps the board's
answer in memory and records it as soon as a commit succeeds; nothing new is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sqlite3
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import tenacity

from cloud_sync.commands import CommandRejected, CommandVerifier, ExecuteCommand
from firmware_bridge.driver import BoardDriver, Program, ring_vouches
from firmware_bridge.exceptions import BoardError, BoardNack, BoardUnavailable
from firmware_bridge.host_timed import OutputFault

from .config import DryerTimeProgram, GatewayConfig, Machine
from .journal import (
    Alert,
    DispatchStamp,
    Execution,
    Journal,
    JournalUnwritable,
    iso_utc,
    result_payload,
)
from .machines import BusyChange, MachineMonitor, StuckRelay

__all__ = ["Executor", "ExecutorRefusal", "command_id_for", "BoardLink"]

log = logging.getLogger(__name__)

# How often accepted-but-waiting executions are checked for expiry, and how often a
# board that stopped answering is asked again about a command in doubt.
EXPIRY_SWEEP_S = 0.25
RECOVERY_RETRY_S = 1.0
# A relay may still be closing this long after its program's nominal end (board
# latency) before a closed contact counts as stuck.
RELAY_SETTLE_S = 0.5
# A release still in doubt this long after its command expired (the board never came
# back to answer, or asking it keeps failing) goes to needs_review: a person decides,
# rather than "unknown forever" (promise 2).
DOUBT_GRACE_S = 600.0
# While the journal cannot write, what must be recorded is tried again this often
# (exponential, capped): each try is a probe of the disk, cheap but not free.
JOURNAL_RETRY_MIN_S = 0.2
JOURNAL_RETRY_MAX_S = 10.0
# Alerts raised while the journal cannot write wait in memory, at most this many.
UNSAVED_ALERTS_MAX = 200

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


class ExecutorRefusal(Exception):
    """An operator request the executor refuses (machine busy, unknown, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class BoardLink:
    """What the daemon knows about the board right now (shown by metalavctl status)."""

    port: str
    connected: bool = False
    boot_id: int | None = None
    last_error: str | None = None
    since: float = 0.0


class Executor:
    def __init__(
        self,
        config: GatewayConfig,
        journal: Journal,
        board: BoardDriver,
        verifier: CommandVerifier,
        *,
        outbox_changed: Callable[[], None],
        publish_best_effort: Callable[[str, bytes], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._journal = journal
        self._board = board
        self._verifier = verifier
        self._outbox_changed = outbox_changed
        self._publish = publish_best_effort
        self._clock = clock
        self.board_link = BoardLink(port=config.board.port)
        # One writer on the serial link: releases, queries and pings take turns.
        self._board_lock = asyncio.Lock()
        self._recovery_wanted = asyncio.Event()
        # Keys whose release the dispatch worker holds (being written, or its outcome
        # waiting for the journal); recovery leaves them alone.
        self._inflight: set[str] = set()
        # Releases to write, in dispatch order; ``True`` marks a release in doubt that
        # recovery proved never ran (the only kind ever sent again).
        self._queue: deque[tuple[str, bool]] = deque()
        self._queue_changed = asyncio.Event()
        self._last_seq = journal.last_dispatch_seq()
        # After a crash, the first unsettled release may have been on the wire: it is
        # asked about like one in doubt, and nothing is sent before recovery ran once.
        pending = [r for r in journal.dispatching_in_order() if not r.in_doubt]
        self._suspect: str | None = pending[0].execute_key if pending else None
        self._queue.extend((r.execute_key, False) for r in pending[1:])
        self._recovered = asyncio.Event()
        self._unsaved_alerts: deque[tuple[Alert, float]] = deque(maxlen=UNSAVED_ALERTS_MAX)
        self._unapplied: deque[BusyChange | StuckRelay] = deque()
        self._stopping = False
        self._idle = asyncio.Event()  # the worker holds no release
        self._idle.set()
        self.monitor = MachineMonitor(list(config.machines))
        # Relay channel -> until when a program may legitimately keep it closed.
        self._driven_until: dict[int, float] = {}
        self._started_up = False  # outputs are forced off once, at the first connect
        self._sampled_at = 0.0  # clock time of the last input snapshot read from the board

    # -- commands in (cloud_sync.mqtt_session.CommandSink) -------------------------

    async def handle_command(self, payload: bytes) -> None:
        """Decide and journal the command; return once that decision is durable.

        Raises only when the journal itself fails (then the message is not acked and
        is offered again once the journal writes)."""
        now = self._clock()
        try:
            self._decide(payload, now)
        except (JournalUnwritable, sqlite3.Error):
            # Not durable: no acknowledgement; the session offers it again later.
            raise
        except Exception as exc:
            # A bug must not turn one message into a poison pill: unacked, a persistent
            # session would redeliver it ahead of every later command, forever. It is
            # refused, logged for the technician (promise 6), and acknowledged.
            log.exception("command handling failed: refused")
            self._journal.log_rejection(
                execute_key=None, reason="internal_error", detail=type(exc).__name__, now=now
            )

    def _decide(self, payload: bytes, now: float) -> None:
        try:
            cmd = self._verifier.verify(payload)
        except CommandRejected as rej:
            self._reject_unjournaled(rej, now)
            return

        known = self._journal.get(cmd.execute_key)
        if known is not None:
            self._answer_duplicate(cmd, known)
            return
        machine = self._config.machine(cmd.machine_id)
        refusal: tuple[str, str | None] | None = None
        if machine is None:
            refusal = ("rejected", "unknown_machine")
        elif cmd.cycle not in machine.cycles:
            refusal = ("rejected", "unknown_cycle")
        elif cmd.is_expired(now):
            refusal = ("expired", "command_expired")
        else:
            unavailable = self._unavailable(machine, cmd.cycle)
            if unavailable is not None:
                refusal = ("rejected", unavailable)

        if refusal is not None:
            state, reason = refusal
            self._record(cmd, state=state, reason=reason, now=now)
            log.info("execution %s %s (%s)", cmd.execute_key, state, reason)
            return

        assert machine is not None  # no refusal: the machine exists
        stamp = self._stamp()
        state = "dispatching" if stamp is not None else "accepted"
        self._record(
            cmd,
            state=state,
            reason=None,
            now=now,
            dispatch=stamp,
            notify=False,
            awaits_start=self._awaits_start(machine, cmd.cycle),
        )
        log.info(
            "execution %s accepted: payment %s machine %s cycle %s",
            cmd.execute_key,
            cmd.payment_id,
            cmd.machine_id,
            cmd.cycle,
        )
        if stamp is not None:
            self._enqueue(cmd.execute_key, stamp)
        else:
            log.warning("execution %s waits for the board link", cmd.execute_key)
        # After the dispatch task is queued, so the release goes out before the
        # "accepted" event: the customer waits on the first, nobody on the second.
        self._outbox_changed()

    def _record(
        self,
        cmd: ExecuteCommand,
        *,
        state: str,
        reason: str | None,
        now: float,
        dispatch: DispatchStamp | None = None,
        notify: bool = True,
        awaits_start: bool = False,
    ) -> None:
        self._journal.record_new(
            execute_key=cmd.execute_key,
            command_id=command_id_for(cmd.execute_key),
            payment_id=cmd.payment_id,
            machine_id=cmd.machine_id,
            cycle=cmd.cycle,
            issued_at=cmd.issued_at,
            expires_at=cmd.expires_at,
            provider_ref=cmd.provider_ref,
            idempotency_key=cmd.idempotency_key,
            amount_cents=cmd.amount_cents,
            state=state,
            reason=reason,
            now=now,
            dispatch=dispatch,
            awaits_start=awaits_start,
        )
        if notify:
            self._outbox_changed()

    def _is_top_up(self, machine: Machine, cycle: str) -> bool:
        """A dryer time credit bought while the dryer runs (its program allows it)."""
        program = machine.cycles[cycle]
        return (
            isinstance(program, DryerTimeProgram)
            and program.top_up
            and self.monitor.busy(machine.id) is True
        )

    def _unavailable(self, machine: Machine, cycle: str) -> str | None:
        """Why this machine cannot take a release now, or None."""
        if machine.id in self._journal.out_of_service():
            return "out_of_service"
        if self._journal.machine_is_active(machine.id):
            return "machine_busy"
        if self.monitor.busy(machine.id) and not self._is_top_up(machine, cycle):
            return "machine_busy"
        return None

    def _awaits_start(self, machine: Machine, cycle: str) -> bool:
        # A top-up goes to a dryer already running: there is no start to wait for.
        return machine.busy_input is not None and not self._is_top_up(machine, cycle)

    # -- technician actions (each one audited) ------------------------------------

    def technical_release(
        self, machine_id: str, cycle: str | None, *, actor: str, os_user: str, reason: str
    ) -> str:
        """A technician's test turn ("technical service"): the same lifecycle as a paid
        release, journaled with who asked and why; refused while the machine is busy."""
        now = self._clock()
        machine = self._config.machine(machine_id)
        refusal: tuple[str, str] | None = None
        if machine is None:
            refusal = ("unknown_machine", f"máquina {machine_id!r} não existe nesta Loja")
        elif cycle is not None and cycle not in machine.cycles:
            refusal = ("unknown_cycle", f"ciclo {cycle!r} não existe para {machine_id}")
        elif self._journal.machine_is_active(machine_id) or self.monitor.busy(machine_id):
            refusal = ("machine_busy", f"máquina {machine_id} está ocupada")
        elif not self.board_link.connected or self.board_link.boot_id is None:
            refusal = ("board_unavailable", "placa desconectada")
        if refusal is not None or machine is None:
            code, message = refusal or ("unknown_machine", "")
            self._journal.audit(
                action="relay.test",
                target=machine_id,
                actor=actor,
                os_user=os_user,
                reason=reason,
                outcome=f"refused:{code}",
                now=now,
            )
            raise ExecutorRefusal(code, message)
        cycle = cycle or next(iter(machine.cycles))
        stamp = self._stamp()
        if stamp is None:
            raise ExecutorRefusal("board_unavailable", "placa desconectada")
        key = f"tech-{uuid.uuid4().hex[:16]}"
        self._journal.record_new(
            execute_key=key,
            command_id=command_id_for(key),
            payment_id="technical-service",
            machine_id=machine_id,
            cycle=cycle,
            issued_at=int(now),
            expires_at=int(now) + 60,
            provider_ref=None,
            idempotency_key=None,
            amount_cents=None,
            state="dispatching",
            reason=None,
            now=now,
            dispatch=stamp,
            kind="technical_service",
            requested_by=f"{actor} ({os_user}): {reason}",
            awaits_start=machine.busy_input is not None,
            audit={
                "action": "relay.test",
                "target": machine_id,
                "actor": actor,
                "os_user": os_user,
                "reason": reason,
                "outcome": "dispatched",
                "after": {"execute_key": key, "cycle": cycle},
            },
        )
        self._enqueue(key, stamp)
        self._outbox_changed()
        return key

    def set_out_of_service(
        self, machine_id: str, value: bool, *, actor: str, os_user: str, reason: str
    ) -> bool:
        now = self._clock()
        if self._config.machine(machine_id) is None:
            self._journal.audit(
                action="machine.out_of_service" if value else "machine.in_service",
                target=machine_id,
                actor=actor,
                os_user=os_user,
                reason=reason,
                outcome="refused:unknown_machine",
                now=now,
            )
            raise ExecutorRefusal(
                "unknown_machine", f"máquina {machine_id!r} não existe nesta Loja"
            )
        changed = self._journal.set_out_of_service(
            machine_id, value, reason=reason, actor=actor, os_user=os_user, now=now
        )
        if changed:
            # The cloud stops selling cycles of a machine out of service.
            self._journal.raise_alert(
                Alert(
                    "out_of_service" if value else "back_in_service",
                    "warning",
                    machine_id,
                    detail=f"by {actor}: {reason}"[:160],
                ),
                now=now,
            )
            self._outbox_changed()
        return changed

    def machines(self) -> list[dict[str, object]]:
        """Each machine as a technician sees it (metalavctl machines)."""
        out_of_service = self._journal.out_of_service()
        result = []
        for m in self._config.machines:
            busy = self.monitor.busy(m.id)
            if m.id in out_of_service:
                state = "out_of_service"
            elif self._journal.machine_is_active(m.id):
                state = "releasing"
            elif busy:
                state = "running"
            else:
                state = "free"
            result.append(
                {
                    "id": m.id,
                    "label": m.label,
                    "kind": m.kind,
                    "channel": m.channel,
                    "state": state,
                    "busy": busy,
                    "stuck_relay": self.monitor.stuck(m.id),
                    "out_of_service": out_of_service.get(m.id),
                    "last_execution": self._journal.last_execution(m.id),
                    "recent_alerts": self._journal.recent_alerts(m.id),
                }
            )
        return result

    def _answer_duplicate(self, cmd: ExecuteCommand, known: Execution) -> None:
        if (cmd.payment_id, cmd.machine_id) != (known.payment_id, known.machine_id):
            # Same key, different content: the key wins, nothing is executed again.
            log.warning(
                "execution %s: duplicate key with different payment/machine; stored result kept",
                cmd.execute_key,
            )
        log.info(
            "execution %s duplicate; re-sending stored result (%s)", known.execute_key, known.state
        )
        self._publish("results", known.last_result.encode())

    def _reject_unjournaled(self, rej: CommandRejected, now: float) -> None:
        """A command we cannot tie to a journal row: forged, malformed or not ours.

        It is logged for the technician and answered, but never journaled under its
        execute_key: an unauthenticated message must not be able to block a real one.
        Without a readable jti the answer has ``execute_key: null``: the cloud still
        learns that something reached the gateway that it could not read."""
        log.warning("command rejected: %s (%s) key=%s", rej.reason, rej.detail, rej.execute_key)
        self._journal.log_rejection(
            execute_key=rej.execute_key, reason=rej.reason, detail=rej.detail, now=now
        )
        # Not final and not compensated: an unauthenticated rejection says nothing about
        # the real command with this key (which the cloud keeps re-sending), nor proves
        # a payment.
        payload = result_payload(
            gateway_id=self._config.gateway.id,
            execute_key=rej.execute_key,
            payment_id=None,
            machine_id=None,
            state="rejected",
            reason=rej.reason,
            at=iso_utc(now),
            seq=0,
            authentic=False,
        )
        self._publish("results", payload.encode())

    # -- towards the board ---------------------------------------------------------

    def _stamp(self) -> DispatchStamp | None:
        """A new dispatch decision for the board as known now; None while it is away."""
        boot_id = self.board_link.boot_id if self.board_link.connected else None
        if boot_id is None:
            return None
        # The board's execution count belongs to the boot the driver last heard from;
        # recorded only when that is the boot this release is stamped with.
        count = self._board.exec_count if self._board.boot_id == boot_id else None
        self._last_seq += 1
        return DispatchStamp(boot_id, count, self._last_seq)

    def _enqueue(self, execute_key: str, stamp: DispatchStamp) -> None:
        """Hand a journaled ``dispatching`` row to the worker (in ``stamp.seq`` order)."""
        self._queue.append((execute_key, False))
        self._queue_changed.set()

    async def run_dispatch(self) -> None:
        """The one writer of releases: each in dispatch order, each settled in the
        journal before the next goes out (the invariant recovery relies on)."""
        await self._recovered.wait()
        retry = _journal_backoff()
        while not self._stopping:
            if not self._queue:
                self._queue_changed.clear()
                await self._queue_changed.wait()
                continue
            key, resend = self._queue.popleft()
            try:
                await self._dispatch(key, resend=resend)
            except JournalUnwritable:
                # Nothing was sent (the stamp could not be written): first in line again.
                self._queue.appendleft((key, resend))
                await asyncio.sleep(next(retry))
                continue
            retry = _journal_backoff()

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
            self._idle.set()

    async def _until_durable(self, write: Callable[[], object], execute_key: str) -> None:
        retry = _journal_backoff()
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
        async with self._board_lock:
            # Read under the lock: while this waited, recovery or a timer may have
            # settled the execution (needs_review, expired, released); then nothing is sent.
            row = self._journal.get(execute_key)
            if row is None or row.state != "dispatching":
                return None
            if row.in_doubt and not resend:
                return None  # only recovery, having asked the board, may send it again
            now = self._clock()
            never_sent = not (row.in_doubt or execute_key == self._suspect)
            if row.expires_at <= now and (resend or never_sent):
                # Nothing of it reached the board (that is how it got here): too late.
                return partial(self._finish, row, "expired", "command_expired")
            boot_id = self.board_link.boot_id
            if boot_id is None or not self.board_link.connected:
                self._recovery_wanted.set()
                return None if resend else self._back_to_accepted(execute_key)
            if row.dispatch_boot_id != boot_id:
                if resend:
                    # Cleared by recovery on another boot: ask again, never guess.
                    self._recovery_wanted.set()
                    return None
                stamp = self._stamp()
                assert stamp is not None
                self._journal.restamp(execute_key, stamp, now=now)  # may raise: nothing sent
                row = self._journal.get(execute_key)
                assert row is not None
            machine = self._config.machine(row.machine_id)
            assert machine is not None  # checked when accepted; config is frozen
            program: Program = machine.cycles[row.cycle].train()
            self._drive(machine.channel, program.duration_ms)
            try:
                ack = await self._board.release(row.command_id, machine.channel, program)
            except BoardNack as exc:
                return partial(self._finish, row, "failed", f"board_nack:{exc.reason.name.lower()}")
            except BoardUnavailable as exc:
                # Proved not sent: the execution waits for the board (or its expiry).
                self._link_lost(str(exc))
                self._recovery_wanted.set()  # wakes run_board to reconnect now
                return None if (resend or row.in_doubt) else self._back_to_accepted(execute_key)
            except BoardError as exc:  # BoardNoReply, or anything the driver could not classify
                # Sent, outcome unknown: only the board can tell (recovery asks it).
                log.error("execution %s: board did not answer the release (%s)", execute_key, exc)
                self._recovery_wanted.set()
                return partial(
                    self._mark_in_doubt, execute_key, "no reply from board; outcome in doubt"
                )
        _crash_point("after_board_ack")
        reason = "board_duplicate_ack" if ack.duplicate else None
        released_at = self._clock()
        return partial(self._released, row, reason, ack.boot_id, ack.exec_count, released_at)

    def _mark_in_doubt(self, execute_key: str, detail: str) -> None:
        self._journal.mark_in_doubt(execute_key, now=self._clock(), detail=detail)
        # Recovery may have run while the worker still held it: ask the board now.
        self._recovery_wanted.set()

    def _back_to_accepted(self, execute_key: str) -> Callable[[], object]:
        return partial(
            self._journal.transition,
            execute_key,
            from_states=("dispatching",),
            to_state="accepted",
            reason="board_unavailable",
            now=self._clock(),
            report=False,
        )

    def _drive(self, channel: int, duration_ms: int) -> None:
        until = self._clock() + duration_ms / 1000 + RELAY_SETTLE_S
        self._driven_until[channel] = max(until, self._driven_until.get(channel, 0.0))

    def _released(
        self,
        row: Execution,
        reason: str | None,
        boot_id: int,
        exec_count: int | None,
        now: float | None = None,
    ) -> None:
        now = self._clock() if now is None else now
        times = {"released_at": now}
        machine = self._config.machine(row.machine_id)
        if row.awaits_start and machine is not None:
            times["confirm_deadline"] = now + machine.confirm_window_s
        if self._journal.transition(
            row.execute_key,
            from_states=("dispatching",),
            to_state="released",
            reason=reason,
            now=now,
            board_boot_id=boot_id,
            board_exec_count=exec_count,
            times=times,
        ):
            self._settled(row.execute_key)
            self._outbox_changed()
            log.info("execution %s released%s", row.execute_key, f" ({reason})" if reason else "")

    def _settled(self, execute_key: str) -> None:
        if execute_key == self._suspect:
            self._suspect = None

    def _finish(
        self,
        row: Execution,
        state: str,
        reason: str | None,
        *,
        board_boot_id: int | None = None,
        from_states: tuple[str, ...] = ("dispatching",),
        alert: Alert | None = None,
        times: dict[str, float] | None = None,
        cycle_event: dict[str, object] | None = None,
    ) -> None:
        if self._journal.transition(
            row.execute_key,
            from_states=from_states,
            to_state=state,
            reason=reason,
            now=self._clock(),
            board_boot_id=board_boot_id,
            alert=alert,
            times=times,
            cycle_event=cycle_event,
        ):
            self._settled(row.execute_key)
            self._outbox_changed()
            log.info("execution %s %s%s", row.execute_key, state, f" ({reason})" if reason else "")

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
                async with self._board_lock:
                    reply = await self._board.query(row.command_id)
            except BoardError as exc:
                log.warning("recovery of %s postponed: %s", row.execute_key, exc)
                return False
            if reply.executed:
                self._released(row, "confirmed_by_board_query", reply.boot_id, reply.exec_count)
            elif reply.boot_id != row.dispatch_boot_id:
                # The board reset since the release was written: it may or may not have
                # pulsed. Never pulse again automatically (runbook incident A).
                self._needs_review(
                    row,
                    "board_reset_during_dispatch",
                    reply.boot_id,
                    "board reset while a release was in doubt; check the machine",
                )
            elif not ring_vouches(
                reply_exec_count=reply.exec_count,
                dispatch_exec_count=row.dispatch_exec_count,
                ring_size=self._board.ring_size,
            ):
                # Same boot, but the board executed more releases since this one than its
                # ring of recent ids holds (or cannot say how many): "not executed" may
                # mean "forgotten". A person decides.
                self._needs_review(
                    row,
                    "board_cannot_vouch",
                    reply.boot_id,
                    "the board no longer remembers enough releases to rule this one out",
                )
            elif row.expires_at <= self._clock():
                self._finish(row, "expired", "command_expired")
            else:
                # Same boot, still within what the board remembers, never seen: nothing
                # was pulsed, so sending it now is the first and only release.
                self._journal.note(
                    row.execute_key,
                    now=self._clock(),
                    state="dispatching",
                    detail="board never received it (same boot, within its memory);"
                    " dispatching again",
                )
                self._queue.appendleft((row.execute_key, True))
                self._queue_changed.set()
        self._recovered.set()
        return True

    def _needs_review(self, row: Execution, reason: str, boot_id: int, detail: str) -> None:
        self._finish(
            row,
            "needs_review",
            reason,
            board_boot_id=boot_id,
            alert=Alert("needs_review", "critical", row.machine_id, row.execute_key, detail),
        )

    def _dispatch_waiting(self) -> None:
        """Executions accepted while the board was away: expire or dispatch them."""
        for row in self._journal.in_states(("accepted",)):
            now = self._clock()
            if row.expires_at <= now:
                self._finish(row, "expired", "command_expired", from_states=("accepted",))
                continue
            stamp = self._stamp()
            if stamp is None:
                return
            if self._journal.transition(
                row.execute_key,
                from_states=("accepted",),
                to_state="dispatching",
                now=now,
                dispatch=stamp,
                report=False,
            ):
                self._enqueue(row.execute_key, stamp)

    def raise_alert(self, alert: Alert) -> None:
        """Journal an alert for the cloud; while the journal cannot write, keep it in
        memory (bounded) until it can."""
        now = self._clock()
        try:
            self._flush_alerts()
            self._journal.raise_alert(alert, now=now)
        except JournalUnwritable:
            self._unsaved_alerts.append((alert, now))
            return
        self._outbox_changed()

    def _flush_alerts(self) -> None:
        while self._unsaved_alerts:
            alert, at = self._unsaved_alerts[0]
            self._journal.raise_alert(alert, now=at)
            self._unsaved_alerts.popleft()

    def journal_writable_again(self) -> None:
        """The journal commits again: record what waited in memory."""
        with contextlib.suppress(JournalUnwritable):
            self._flush_alerts()
            self._outbox_changed()

    def _link_lost(self, error: str) -> None:
        if self.board_link.connected:
            log.error("board link lost: %s", error)
            self.raise_alert(Alert("board_link_lost", "critical", detail=error[:160]))
            self.monitor.forget()
        self.board_link.connected = False
        self.board_link.last_error = error
        self.board_link.since = self._clock()

    def _link_up(self, boot_id: int) -> None:
        now = self._clock()
        previous = self._journal.board_value("boot_id")
        alerts = []
        if self.board_link.last_error is not None and self.board_link.since:
            alerts.append(Alert("board_link_restored", "info", detail=f"boot id {boot_id:08x}"))
        if previous is not None and int(previous, 16) != boot_id:
            log.warning("board rebooted: boot id %s -> %08x", previous, boot_id)
            alerts.append(
                Alert("board_rebooted", "warning", detail=f"boot id {previous} -> {boot_id:08x}")
            )
        if previous is None or int(previous, 16) != boot_id:
            # Only feeds the "board rebooted" alert: not worth stopping for.
            with contextlib.suppress(JournalUnwritable):
                self._journal.set_board_value("boot_id", f"{boot_id:08x}")
        for alert in alerts:
            self.raise_alert(alert)
        self.board_link.connected = True
        self.board_link.boot_id = boot_id
        self.board_link.last_error = None
        self.board_link.since = now
        log.info("board link up, boot id %08x", boot_id)

    async def _connect(self) -> bool:
        try:
            if not self._board.is_open:
                await self._board.open()
            async with self._board_lock:
                pong = await self._board.ping()
                if not self._started_up:
                    # Contacts open before any command is taken (a previous process
                    # may have died with a relay closed).
                    await self._board.all_off()
                    self._driven_until.clear()
        except BoardError as exc:
            self._link_lost(str(exc))
            await self._board.close()
            return False
        self._started_up = True
        self._link_up(pong.boot_id)
        self._recovery_wanted.set()
        return True

    async def run_board(self) -> None:
        """Own the board link: open it, learn its boot id, recover, dispatch what waits."""
        cfg = self._config.board
        retry = _journal_backoff()
        while True:
            try:
                if not self.board_link.connected and not await self._connect():
                    await asyncio.sleep(cfg.reconnect_s)
                    continue
                if self._recovery_wanted.is_set():
                    self._recovery_wanted.clear()
                    if not await self.recover():
                        self._recovery_wanted.set()
                        self._link_lost("board did not answer recovery queries")
                        await self._board.close()
                        await asyncio.sleep(RECOVERY_RETRY_S)
                        continue
                self._dispatch_waiting()
            except JournalUnwritable:
                # Recovery and dispatch decisions wait for the journal: ask again later.
                self._recovery_wanted.set()
                await asyncio.sleep(next(retry))
                continue
            retry = _journal_backoff()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recovery_wanted.wait(), cfg.health_ping_s)

    async def run_inputs(self) -> None:
        """Sample the board's inputs: busy signals (start confirmation, completion),
        sensed relay contacts (stuck relays), and the boot id (board resets)."""
        # Busy inputs need fast sampling (start confirmation, debounce); without any,
        # the poll only watches relay contacts and the boot id, and a health-check pace
        # keeps the serial line free for releases.
        wired = any(m.busy_input for m in self._config.machines)
        period = self._config.board.poll_ms / 1000 if wired else self._config.board.health_ping_s
        while True:
            await asyncio.sleep(period)
            if not self.board_link.connected:
                continue
            try:
                async with self._board_lock:
                    state = await self._board.read_inputs()
            except BoardError as exc:
                self._link_lost(str(exc))
                await self._board.close()
                self._recovery_wanted.set()  # wakes run_board, which reconnects
                continue
            if state.boot_id != self.board_link.boot_id:
                self._link_up(state.boot_id)
                self._recovery_wanted.set()
            now = self._sampled_at = self._clock()
            driven = {ch for ch, until in self._driven_until.items() if until > now}
            self._unapplied.extend(self.monitor.sample(state, now, driven))
            self._apply_input_changes()

    def _apply_input_changes(self) -> None:
        """Journal what the inputs showed, oldest first. A change the journal cannot take
        yet waits (the not_started sweep waits with it: a start seen but not recorded
        must never turn into a compensation)."""
        try:
            while self._unapplied:
                change = self._unapplied[0]
                if isinstance(change, BusyChange):
                    self._on_busy_change(change)
                else:
                    self._on_stuck_relay(change)
                self._unapplied.popleft()
        except JournalUnwritable:
            log.warning("%d input change(s) wait for the journal", len(self._unapplied))

    def _on_busy_change(self, change: BusyChange) -> None:
        machine = self._config.machine(change.machine_id)
        assert machine is not None
        rows = [
            r
            for r in self._journal.in_states(("released", "not_started", "started"))
            if r.machine_id == machine.id
        ]
        if change.busy:
            waiting = [r for r in rows if r.state == "released" and r.awaits_start]
            late = [
                r
                for r in rows
                if r.state == "not_started"
                and r.confirm_deadline is not None
                and change.at <= r.confirm_deadline + machine.late_start_grace_s
            ]
            if waiting:
                row = waiting[-1]
                self._finish(
                    row,
                    "started",
                    None,
                    from_states=("released",),
                    times={"started_at": change.at},
                    cycle_event={"machine_id": machine.id, "cycle": row.cycle},
                )
            elif late:
                row = late[-1]
                self._finish(
                    row,
                    "started",
                    "late_start",
                    from_states=("not_started",),
                    times={"started_at": change.at},
                    cycle_event={"machine_id": machine.id, "cycle": row.cycle},
                    alert=Alert(
                        "late_start",
                        "warning",
                        machine.id,
                        row.execute_key,
                        "machine started after its confirm window; compensation "
                        "already requested must be reversed",
                    ),
                )
            elif change.previous is False:
                log.warning("machine %s started without a release from this gateway", machine.id)
                self._journal.raise_alert(
                    Alert("start_without_release", "info", machine.id), now=self._clock()
                )
                self._outbox_changed()
        else:
            for row in rows:
                if row.state == "started":
                    duration = change.at - (row.started_at or change.at)
                    self._finish(
                        row,
                        "completed",
                        None,
                        from_states=("started",),
                        times={"completed_at": change.at},
                        cycle_event={
                            "machine_id": machine.id,
                            "cycle": row.cycle,
                            "duration_s": round(duration, 3),
                        },
                    )

    def output_fault(self, fault: OutputFault) -> None:
        """A host-timed driver failed a write after the release was acknowledged: the
        train may be incomplete. The start confirmation decides the execution's fate;
        people are told now."""
        machine = next((m for m in self._config.machines if m.channel == fault.channel), None)
        log.error("relay write failed on channel %d: %s", fault.channel, fault.error)
        self.raise_alert(
            Alert(
                "relay_write_failed",
                "critical",
                machine.id if machine else None,
                detail=f"channel {fault.channel}: {type(fault.error).__name__}",
            )
        )

    def _on_stuck_relay(self, change: StuckRelay) -> None:
        if change.stuck:
            log.error(
                "relay of machine %s (channel %d) is closed while not driven",
                change.machine_id,
                change.channel,
            )
            alert = Alert(
                "stuck_relay",
                "critical",
                change.machine_id,
                detail=f"channel {change.channel} closed while not driven",
            )
        else:
            alert = Alert(
                "stuck_relay_cleared", "info", change.machine_id, detail=f"channel {change.channel}"
            )
        self._journal.raise_alert(alert, now=self._clock())
        self._outbox_changed()

    async def run_timers(self) -> None:
        """Deadlines nobody else watches (promise 2: never "unknown forever"): accepted
        executions, and dispatching ones that provably never left the gateway, expire on
        time even if the board never comes back; releases in doubt long past their
        expiry go to needs_review; released ones past their confirm window end as
        not_started."""
        while True:
            await asyncio.sleep(EXPIRY_SWEEP_S)
            # A sweep the journal cannot record is simply tried again next time.
            with contextlib.suppress(JournalUnwritable):
                self._sweep(self._clock())

    def _sweep(self, now: float) -> None:
        for row in self._journal.in_states(("accepted",)):
            if row.expires_at <= now:
                self._finish(row, "expired", "command_expired", from_states=("accepted",))
        for row in self._journal.dispatching_in_order():
            if row.execute_key in self._inflight:
                continue
            if not (row.in_doubt or row.execute_key == self._suspect):
                if row.expires_at <= now:  # waiting in line, never sent: too late now
                    self._finish(row, "expired", "command_expired")
            elif row.expires_at + DOUBT_GRACE_S < now:
                self._needs_review(
                    row,
                    "outcome_unknown_board_unreachable",
                    row.dispatch_boot_id or 0,
                    "the board never confirmed or denied this release",
                )
        if self._unapplied:
            return  # a start the journal has not taken yet must not read as "no start"
        for row in self._journal.in_states(("released",)):
            machine = self._config.machine(row.machine_id)
            if not (row.awaits_start and row.confirm_deadline and machine and machine.busy_input):
                continue
            # Judge only with a reading taken after the window closed plus the
            # debounce: after a link loss or a restart, silence is not evidence.
            settle = machine.busy_input.debounce_ms / 1000
            if (
                row.confirm_deadline + settle <= now
                and self._sampled_at >= row.confirm_deadline + settle
                and self.monitor.busy(machine.id) is not None
            ):
                self._finish(
                    row,
                    "not_started",
                    "no_start_in_confirm_window",
                    from_states=("released",),
                    alert=Alert(
                        "not_started",
                        "critical",
                        row.machine_id,
                        row.execute_key,
                        "machine did not start after its release",
                    ),
                )

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Clean shutdown: take no further release, let the one being written finish
        and be journaled (bounded: an outcome the journal refuses stays in doubt and
        recovery settles it at the next start)."""
        self._stopping = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)


def _journal_backoff() -> Iterator[float]:
    """Delays between tries of a journal write that failed: exponential with jitter,
    capped (tenacity's wait strategy, rather than one more hand-written formula)."""
    wait = tenacity.wait_exponential_jitter(
        initial=JOURNAL_RETRY_MIN_S, max=JOURNAL_RETRY_MAX_S, jitter=JOURNAL_RETRY_MIN_S
    )
    state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
    while True:
        yield wait(state)
        state.attempt_number += 1
