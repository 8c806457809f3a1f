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

Promise 1 rests on two locks: the journal row keyed by execute_key (a duplicate never
reaches the board; it gets the stored result) and the board's own de-duplication of
command ids within a boot. Promise 3 rests on ``handle_command`` returning only after
the journal commit; the MQTT session acknowledges the message after that.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from cloud_sync.commands import CommandRejected, CommandVerifier, ExecuteCommand
from firmware_bridge.driver import BoardDriver
from firmware_bridge.exceptions import BoardError, BoardNack, BoardNoReply, BoardUnavailable

from .config import GatewayConfig
from .journal import Execution, Journal, iso_utc, result_payload

__all__ = ["Executor", "command_id_for", "BoardLink"]

log = logging.getLogger(__name__)

# How often accepted-but-waiting executions are checked for expiry, and how often a
# board that stopped answering is asked again about a command in doubt.
EXPIRY_SWEEP_S = 1.0
RECOVERY_RETRY_S = 1.0
BOARD_HEALTH_PING_S = 5.0

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

    # -- commands in (cloud_sync.mqtt_session.CommandSink) -------------------------

    async def handle_command(self, payload: bytes) -> None:
        """Decide and journal the command; return once that decision is durable.

        Raises only when the journal itself fails (then the message is not acked and
        the broker delivers it again)."""
        now = self._clock()
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
        elif self._journal.machine_is_active(cmd.machine_id):
            refusal = ("rejected", "machine_busy")

        if refusal is not None:
            state, reason = refusal
            self._record(cmd, state=state, reason=reason, now=now)
            log.info("execution %s %s (%s)", cmd.execute_key, state, reason)
            return

        boot_id = self.board_link.boot_id if self.board_link.connected else None
        state = "dispatching" if boot_id is not None else "accepted"
        self._record(cmd, state=state, reason=None, now=now, dispatch_boot_id=boot_id, notify=False)
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
    ) -> Execution:
        row = self._journal.record_new(
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
        )
        if notify:
            self._outbox_changed()
        return row

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
        execute_key: an unauthenticated message must not be able to block a real one."""
        log.warning("command rejected: %s (%s) key=%s", rej.reason, rej.detail, rej.execute_key)
        self._journal.log_rejection(
            execute_key=rej.execute_key, reason=rej.reason, detail=rej.detail, now=now
        )
        if rej.execute_key is not None:
            # Not final: an unauthenticated rejection says nothing about the real
            # command with this key, which the cloud keeps re-sending.
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

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dispatch(self, execute_key: str) -> None:
        """Write the release of an execution already journaled as ``dispatching``."""
        if execute_key in self._inflight:
            return
        self._inflight.add(execute_key)
        try:
            await self._dispatch_inflight(execute_key)
        finally:
            self._inflight.discard(execute_key)

    async def _dispatch_inflight(self, execute_key: str) -> None:
        row = self._journal.get(execute_key)
        if row is None or row.state != "dispatching":
            return
        machine = self._config.machine(row.machine_id)
        assert machine is not None  # checked when accepted; config is frozen
        program = machine.cycles[row.cycle]
        _crash_point("after_dispatching_commit")
        try:
            async with self._board_lock:
                ack = await self._board.release(
                    row.command_id, machine.channel, program.pulses, program.on_ms, program.off_ms
                )
        except BoardNack as exc:
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
            return
        except BoardNoReply as exc:
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
        self._finish(
            row,
            "released",
            "board_duplicate_ack" if ack.duplicate else None,
            board_boot_id=ack.boot_id,
        )

    def _finish(
        self,
        row: Execution,
        state: str,
        reason: str | None,
        *,
        board_boot_id: int | None = None,
        from_states: tuple[str, ...] = ("dispatching",),
    ) -> None:
        if self._journal.transition(
            row.execute_key,
            from_states=from_states,
            to_state=state,
            reason=reason,
            now=self._clock(),
            board_boot_id=board_boot_id,
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
                self._finish(
                    row, "released", "confirmed_by_board_query", board_boot_id=reply.boot_id
                )
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
                    row, "needs_review", "board_reset_during_dispatch", board_boot_id=reply.boot_id
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
        self.board_link.connected = False
        self.board_link.last_error = error
        self.board_link.since = self._clock()

    async def run_board(self) -> None:
        """Own the board link: open it, learn its boot id, recover, keep it healthy."""
        cfg = self._config.board
        while True:
            if not self.board_link.connected:
                try:
                    if not self._board.is_open:
                        await self._board.open()
                    async with self._board_lock:
                        pong = await self._board.ping()
                except BoardError as exc:
                    self._link_lost(str(exc))
                    await self._board.close()
                    await asyncio.sleep(cfg.reconnect_s)
                    continue
                self._link_up(pong.boot_id)
                self._recovery_wanted.set()

            if self._recovery_wanted.is_set():
                self._recovery_wanted.clear()
                if not await self.recover():
                    self._recovery_wanted.set()
                    self._link_lost("board did not answer recovery queries")
                    await self._board.close()
                    await asyncio.sleep(RECOVERY_RETRY_S)
                    continue
            await self._dispatch_waiting()

            try:
                await asyncio.wait_for(self._recovery_wanted.wait(), BOARD_HEALTH_PING_S)
                continue
            except TimeoutError:
                pass
            try:
                async with self._board_lock:
                    pong = await self._board.ping()
            except BoardError as exc:
                self._link_lost(str(exc))
                await self._board.close()
                continue
            if pong.boot_id != self.board_link.boot_id:
                self._link_up(pong.boot_id)
                self._recovery_wanted.set()

    def _link_up(self, boot_id: int) -> None:
        previous = self._journal.board_value("boot_id")
        if previous is not None and int(previous, 16) != boot_id:
            log.warning("board rebooted: boot id %s -> %08x", previous, boot_id)
        if previous is None or int(previous, 16) != boot_id:
            self._journal.set_board_value("boot_id", f"{boot_id:08x}")
        self.board_link.connected = True
        self.board_link.boot_id = boot_id
        self.board_link.last_error = None
        self.board_link.since = self._clock()
        log.info("board link up, boot id %08x", boot_id)

    async def run_expiry(self) -> None:
        """Accepted executions that wait for the board expire on time, even if the board
        never comes back (promise 2: never "unknown forever")."""
        while True:
            await asyncio.sleep(EXPIRY_SWEEP_S)
            now = self._clock()
            for row in self._journal.in_states(("accepted",)):
                if row.expires_at <= now:
                    self._finish(row, "expired", "command_expired", from_states=("accepted",))

    async def drain(self) -> None:
        """Wait for in-flight dispatches (clean shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
