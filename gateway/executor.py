"""The executor: the execution lifecycle of DESIGN.md, from a verified command to a
final state, and the recovery of executions a crash left half-done.

    received -> rejected(reason) | expired            (nothing reaches the board)
    received -> accepted -> dispatching                (durable before the first byte)
    dispatching -> released | failed(board_nack:...)   (board answered)
    dispatching -> accepted                             (board link down: nothing was sent)
    dispatching --no reply / crash--> recovery: query the board about the command id
        executed                 -> released
        not executed, same boot  -> dispatched again (the board de-duplicates anyway)
        not executed, new boot   -> needs_review (never pulsed again automatically)
    released -> started -> completed                    (machine's busy input, if wired)
    released -> not_started  (no start in the confirm window: alert + compensation)
    not_started -> started   (late start within the grace period: alert, the cloud
                              reverses the compensation)

Promise 1 rests on two locks: the journal row keyed by execute_key (a duplicate never
reaches the board; it gets the stored result) and the board's own de-duplication of
command ids within a boot. Promise 3 rests on ``handle_command`` returning only after
the journal commit; the MQTT session acknowledges the message after that.
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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from cloud_sync.commands import CommandRejected, CommandVerifier, ExecuteCommand
from firmware_bridge.driver import BoardDriver, Program
from firmware_bridge.exceptions import BoardError, BoardNack, BoardUnavailable
from firmware_bridge.host_timed import OutputFault

from .config import DryerTimeProgram, GatewayConfig, Machine
from .journal import Alert, Execution, Journal, iso_utc, result_payload
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

# Fault injection for the crash tests: the daemon SIGKILLs itself at the named point.
# Read once at start-up; unset in production.
_KILL_AT = os.environ.get("METALAV_TEST_KILL_AT", "")


def _crash_point(name: str) -> None:
    if _KILL_AT == name:
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
        # Keys whose release is being written right now; recovery leaves them alone.
        self._inflight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.monitor = MachineMonitor(list(config.machines))
        # Relay channel -> until when a program may legitimately keep it closed.
        self._driven_until: dict[int, float] = {}
        self._started_up = False  # outputs are forced off once, at the first connect
        self._sampled_at = 0.0  # clock time of the last input snapshot read from the board

    # -- commands in (cloud_sync.mqtt_session.CommandSink) -------------------------

    async def handle_command(self, payload: bytes) -> None:
        """Decide and journal the command; return once that decision is durable.

        Raises only when the journal itself fails (then the message is not acked and
        the broker delivers it again)."""
        now = self._clock()
        try:
            self._decide(payload, now)
        except sqlite3.Error:
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
        boot_id = self.board_link.boot_id if self.board_link.connected else None
        state = "dispatching" if boot_id is not None else "accepted"
        self._record(
            cmd,
            state=state,
            reason=None,
            now=now,
            dispatch_boot_id=boot_id,
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
        if state == "dispatching":
            self._spawn(self._dispatch(cmd.execute_key), f"dispatch-{cmd.execute_key}")
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
        dispatch_boot_id: int | None = None,
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
            dispatch_boot_id=dispatch_boot_id,
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
            dispatch_boot_id=self.board_link.boot_id,
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
        self._spawn(self._dispatch(key), f"dispatch-{key}")
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

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dispatch(self, execute_key: str) -> None:
        """Write the release of an execution already journaled as ``dispatching``."""
        if execute_key in self._inflight:
            return
        self._inflight.add(execute_key)
        try:
            await self._dispatch_inflight(execute_key)
        except Exception:
            # A bug must not kill run_board (recovery calls this) nor vanish in a task:
            # the row stays dispatching, and run_timers ends it in needs_review.
            log.exception("execution %s: dispatch failed unexpectedly", execute_key)
        finally:
            self._inflight.discard(execute_key)

    async def _dispatch_inflight(self, execute_key: str) -> None:
        _crash_point("after_dispatching_commit")
        row: Execution | None = None
        try:
            async with self._board_lock:
                # Read under the lock: while this task waited, recovery may have settled
                # the execution (needs_review, expired, released); then nothing is sent.
                row = self._journal.get(execute_key)
                if row is None or row.state != "dispatching":
                    return
                if row.expires_at <= self._clock():
                    # Nothing of it reached the board (that is how it got here): too late.
                    self._finish(row, "expired", "command_expired")
                    return
                machine = self._config.machine(row.machine_id)
                assert machine is not None  # checked when accepted; config is frozen
                program: Program = machine.cycles[row.cycle].train()
                self._drive(machine.channel, program.duration_ms)
                ack = await self._board.release(row.command_id, machine.channel, program)
        except BoardNack as exc:
            assert row is not None  # raised by release(), after the row was read
            self._finish(row, "failed", f"board_nack:{exc.reason.name.lower()}")
            return
        except BoardUnavailable as exc:
            # Proved not sent: the execution waits for the board (or its expiry).
            self._link_lost(str(exc))
            self._journal.transition(
                execute_key,
                from_states=("dispatching",),
                to_state="accepted",
                reason="board_unavailable",
                now=self._clock(),
                report=False,
            )
            self._recovery_wanted.set()  # wakes run_board to reconnect now
            return
        except BoardError as exc:  # BoardNoReply, or anything the driver could not classify
            # Sent, outcome unknown: only the board can tell (recovery asks it).
            log.error("execution %s: board did not answer the release (%s)", execute_key, exc)
            self._journal.note(
                execute_key,
                now=self._clock(),
                state="dispatching",
                detail="no reply from board; outcome in doubt",
            )
            self._recovery_wanted.set()
            return
        _crash_point("after_board_ack")
        self._released(row, "board_duplicate_ack" if ack.duplicate else None, ack.boot_id)

    def _drive(self, channel: int, duration_ms: int) -> None:
        until = self._clock() + duration_ms / 1000 + RELAY_SETTLE_S
        self._driven_until[channel] = max(until, self._driven_until.get(channel, 0.0))

    def _released(self, row: Execution, reason: str | None, boot_id: int) -> None:
        now = self._clock()
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
            times=times,
        ):
            self._outbox_changed()
            log.info("execution %s released%s", row.execute_key, f" ({reason})" if reason else "")

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
            self._outbox_changed()
            log.info("execution %s %s%s", row.execute_key, state, f" ({reason})" if reason else "")

    async def recover(self) -> bool:
        """Settle every execution left ``dispatching``: ask the board, never guess.

        Returns False if the board could not be asked (try again later)."""
        for row in self._journal.in_states(("dispatching",)):
            if row.execute_key in self._inflight:
                continue
            try:
                async with self._board_lock:
                    reply = await self._board.query(row.command_id)
            except BoardError as exc:
                log.warning("recovery of %s postponed: %s", row.execute_key, exc)
                return False
            if reply.executed:
                self._released(row, "confirmed_by_board_query", reply.boot_id)
            elif reply.boot_id == row.dispatch_boot_id:
                # Same boot and the board never saw it: nothing was pulsed, so sending
                # it now is the first and only release.
                if row.expires_at <= self._clock():
                    self._finish(row, "expired", "command_expired")
                    continue
                self._journal.note(
                    row.execute_key,
                    now=self._clock(),
                    state="dispatching",
                    detail="board never received it (same boot); dispatching again",
                )
                await self._dispatch(row.execute_key)
            else:
                # The board reset since the release was written: it may or may not have
                # pulsed. Never pulse again automatically (runbook incident A).
                self._finish(
                    row,
                    "needs_review",
                    "board_reset_during_dispatch",
                    board_boot_id=reply.boot_id,
                    alert=Alert(
                        "needs_review",
                        "critical",
                        row.machine_id,
                        row.execute_key,
                        "board reset while a release was in doubt; check the machine",
                    ),
                )
        return True

    async def _dispatch_waiting(self) -> None:
        """Executions accepted while the board was away: expire or dispatch them."""
        for row in self._journal.in_states(("accepted",)):
            now = self._clock()
            if row.expires_at <= now:
                self._finish(row, "expired", "command_expired", from_states=("accepted",))
                continue
            boot_id = self.board_link.boot_id
            if not self.board_link.connected or boot_id is None:
                return
            if self._journal.transition(
                row.execute_key,
                from_states=("accepted",),
                to_state="dispatching",
                now=now,
                detail=f"board boot {boot_id:08x}",
                dispatch_boot_id=boot_id,
                report=False,
            ):
                await self._dispatch(row.execute_key)

    def _link_lost(self, error: str) -> None:
        if self.board_link.connected:
            log.error("board link lost: %s", error)
            self._journal.raise_alert(
                Alert("board_link_lost", "critical", detail=error[:160]), now=self._clock()
            )
            self._outbox_changed()
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
            self._journal.set_board_value("boot_id", f"{boot_id:08x}")
        for alert in alerts:
            self._journal.raise_alert(alert, now=now)
        if alerts:
            self._outbox_changed()
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
        while True:
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
            await self._dispatch_waiting()
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
            for change in self.monitor.sample(state, now, driven):
                if isinstance(change, BusyChange):
                    self._on_busy_change(change)
                else:
                    self._on_stuck_relay(change)

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
        self._journal.raise_alert(
            Alert(
                "relay_write_failed",
                "critical",
                machine.id if machine else None,
                detail=f"channel {fault.channel}: {type(fault.error).__name__}",
            ),
            now=self._clock(),
        )
        self._outbox_changed()

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
        executions that wait for the board expire on time, even if it never comes back;
        releases in doubt long past their expiry go to needs_review; released ones past
        their confirm window end as not_started."""
        while True:
            await asyncio.sleep(EXPIRY_SWEEP_S)
            now = self._clock()
            for row in self._journal.in_states(("accepted",)):
                if row.expires_at <= now:
                    self._finish(row, "expired", "command_expired", from_states=("accepted",))
            for row in self._journal.in_states(("dispatching",)):
                if row.execute_key not in self._inflight and row.expires_at + DOUBT_GRACE_S < now:
                    self._finish(
                        row,
                        "needs_review",
                        "outcome_unknown_board_unreachable",
                        alert=Alert(
                            "needs_review",
                            "critical",
                            row.machine_id,
                            row.execute_key,
                            "the board never confirmed or denied this release",
                        ),
                    )
            for row in self._journal.in_states(("released",)):
                machine = self._config.machine(row.machine_id)
                if not (
                    row.awaits_start and row.confirm_deadline and machine and machine.busy_input
                ):
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

    async def drain(self) -> None:
        """Wait for in-flight dispatches (clean shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
