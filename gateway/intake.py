"""Command intake: verify, answer duplicates, refuse, journal the decision (a CommandSink).

The path of a paid command: the MQTT session hands the payload to
:meth:`Intake.handle_command`; the token is verified (cloud_sync.commands); a known
``execute_key`` gets its stored result again and never reaches the board; an authentic
command the store cannot run is refused (journaled, answered, compensated); the others
are journaled ``dispatching`` with their DispatchStamp (or ``accepted`` while the board
is away) and handed to the dispatch worker. ``handle_command`` returns only once that
decision is durable; the session acknowledges the message after that (promise 3).

The decision is written without a flush and then awaited durable (journal/database.py):
commands that arrive together share one fdatasync, which runs off the event loop. The
dispatch worker flushes too before the first byte of a release, so no release, answer
or acknowledgement ever leaves on a decision a power cut could take back.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import OrderedDict
from collections.abc import Callable

from cloud_sync.commands import CommandRejected, CommandVerifier, ExecuteCommand

from .clock import TimePolicy
from .config import DryerTimeProgram, GatewayConfig, Machine
from .confirmation import StartConfirmation
from .dispatch import Dispatch, command_id_for
from .events import RESULTS_TOPIC
from .journal import (
    Alert,
    DispatchStamp,
    Execution,
    Journal,
    JournalUnwritable,
    NewExecution,
    iso_utc,
    result_payload,
)
from .lifecycle import ExecutionState
from .metrics import GatewayMetrics

__all__ = ["Availability", "Intake"]

log = logging.getLogger(__name__)

#: Tokens whose command is journaled, remembered (token -> execute_key) so that the
#: same token again — the cloud re-sends a command until it sees its result — is
#: answered from the journal without verifying the signature again (~0.2 ms each).
#: Only exact bytes that were verified once; any other token is verified in full.
KNOWN_TOKENS_MAX = 1024
#: How long a decision's flush waits for the outcome of the release on the wire, so one
#: flush covers both (the board answers in a few ms; its ACK timeout is longer).
OUTCOME_WAIT_S = 0.02


class Availability:
    """Whether a machine can take a release now (paid or a technician's test turn)."""

    def __init__(self, journal: Journal, confirmation: StartConfirmation) -> None:
        self._journal = journal
        self._confirmation = confirmation

    def is_top_up(self, machine: Machine, cycle: str) -> bool:
        """A dryer time credit bought while the dryer runs (its program allows it)."""
        program = machine.cycles[cycle]
        return (
            isinstance(program, DryerTimeProgram)
            and program.top_up
            and self._confirmation.busy(machine.id) is True
        )

    def unavailable(self, machine: Machine, cycle: str) -> str | None:
        """Why this machine cannot take a release now, or None."""
        if self._journal.store_pause() is not None:  # from memory (metalavctl store pause)
            return "store_paused"
        if machine.id in self._journal.out_of_service():
            return "out_of_service"
        if self._journal.machine_is_active(machine.id):
            return "machine_busy"
        if self._confirmation.busy(machine.id) and not self.is_top_up(machine, cycle):
            return "machine_busy"
        return None

    def awaits_start(self, machine: Machine, cycle: str) -> bool:
        # A top-up goes to a dryer already running: there is no start to wait for.
        return machine.busy_input is not None and not self.is_top_up(machine, cycle)


class Intake:
    def __init__(
        self,
        config: GatewayConfig,
        journal: Journal,
        verifier: CommandVerifier,
        availability: Availability,
        dispatch: Dispatch,
        *,
        outbox_changed: Callable[[], None],
        publish_best_effort: Callable[[str, bytes], None],
        clock: Callable[[], float],
        metrics: GatewayMetrics | None = None,
        time_policy: TimePolicy | None = None,
    ) -> None:
        self._config = config
        self._journal = journal
        self._verifier = verifier
        self._availability = availability
        self._dispatch = dispatch
        self._outbox_changed = outbox_changed
        self._publish = publish_best_effort
        self._clock = clock
        self._metrics = metrics or GatewayMetrics()
        self._time = time_policy or TimePolicy(lambda: True)
        self._known_tokens: OrderedDict[bytes, str] = OrderedDict()

    async def handle_command(self, payload: bytes) -> None:
        """Decide and journal the command; return once that decision is durable.

        Raises only when the journal itself fails (then the message is not acked and
        is offered again once the journal writes)."""
        now = self._clock()
        answer: bytes | None = None
        try:
            answer = self._decide(payload, now)
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
        # The decision (or the one a duplicate repeats, maybe written a moment ago by the
        # command it duplicates) is durable before it is acknowledged or answered. With
        # a release on the wire, its outcome is written within milliseconds and must be
        # durable before the next release anyway: one flush for both.
        await self._dispatch.until_outcome_written(OUTCOME_WAIT_S)
        await self._journal.flushed()
        if answer is not None:
            self._publish(RESULTS_TOPIC, answer)

    def _decide(self, payload: bytes, now: float) -> bytes | None:
        """Decide and write (unflushed); returns a stored result to re-send, if any."""
        self._metrics.received()  # the release latency starts here
        seen = self._known_tokens.get(payload)
        if seen is not None:
            stored = self._stored(seen)
            if stored is not None:  # else pruned by retention since: decide afresh
                log.info(
                    "execution %s duplicate; re-sending stored result (%s)", seen, stored.state
                )
                self._metrics.duplicate()
                return stored.last_result.encode()
        # An unsynchronised clock reads no token time (gateway/clock.py, README).
        trusted = self._time.trusted
        try:
            cmd = self._verifier.verify(payload, now=now, check_time=trusted)
        except CommandRejected as rej:
            self._reject_unjournaled(rej, now)
            return None
        if not trusted:
            cmd = TimePolicy.own_lifetime(cmd, now)

        known = self._stored(cmd.execute_key)
        if known is not None:
            self._remember(payload, cmd.execute_key)
            self._metrics.duplicate()
            return self._answer_duplicate(cmd, known)
        self._remember(payload, cmd.execute_key)
        machine = self._config.machine(cmd.machine_id)
        refusal: tuple[ExecutionState, str | None] | None = None
        if machine is None:
            refusal = (ExecutionState.REJECTED, "unknown_machine")
        elif cmd.cycle not in machine.cycles:
            refusal = (ExecutionState.REJECTED, "unknown_cycle")
        elif cmd.is_expired(now):
            refusal = (ExecutionState.EXPIRED, "command_expired")
        else:
            unavailable = self._availability.unavailable(machine, cmd.cycle)
            if unavailable is not None:
                refusal = (ExecutionState.REJECTED, unavailable)

        if refusal is not None:
            state, reason = refusal
            self._record(cmd, state=state, reason=reason, now=now)
            self._metrics.decided(cmd.execute_key, state, reason)
            log.info("execution %s %s (%s)", cmd.execute_key, state, reason)
            return None

        assert machine is not None  # no refusal: the machine exists
        stamp = self._dispatch.stamp()
        state = ExecutionState.DISPATCHING if stamp is not None else ExecutionState.ACCEPTED
        self._record(
            cmd,
            state=state,
            reason=None,
            now=now,
            dispatch=stamp,
            notify=False,
            awaits_start=self._availability.awaits_start(machine, cmd.cycle),
        )
        self._metrics.decided(cmd.execute_key, ExecutionState.ACCEPTED, None)
        log.info(
            "execution %s accepted: payment %s machine %s cycle %s",
            cmd.execute_key,
            cmd.payment_id,
            cmd.machine_id,
            cmd.cycle,
        )
        if stamp is not None:
            self._dispatch.enqueue(cmd.execute_key)
        else:
            log.warning("execution %s waits for the board link", cmd.execute_key)
        # After the dispatch task is queued, so the release goes out before the
        # "accepted" event: the customer waits on the first, nobody on the second.
        self._outbox_changed()
        self._alert_duplicate_payment(cmd, now)
        return None

    def _alert_duplicate_payment(self, cmd: ExecuteCommand, now: float) -> None:
        """Runbook 4C: a payment already released under another execute_key. The
        release still follows the cloud's command; people must know (one indexed
        lookup per command; a write only when it finds one)."""
        other = self._journal.payment_released_by_another_key(cmd.payment_id, cmd.execute_key)
        if other is None:
            return
        log.warning(
            "execution %s: payment %s was already released by %s",
            cmd.execute_key,
            cmd.payment_id,
            other,
        )
        try:
            self._journal.raise_alert(
                Alert(
                    "duplicate_payment",
                    "critical",
                    cmd.machine_id,
                    cmd.execute_key,
                    f"payment {cmd.payment_id} already released by {other}"[:160],
                ),
                now=now,
            )
        except JournalUnwritable:
            log.error("duplicate_payment alert for %s not journaled", cmd.execute_key)
            return
        self._outbox_changed()

    def _record(
        self,
        cmd: ExecuteCommand,
        *,
        state: ExecutionState,
        reason: str | None,
        now: float,
        dispatch: DispatchStamp | None = None,
        notify: bool = True,
        awaits_start: bool = False,
    ) -> None:
        new = NewExecution(
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
            awaits_start=awaits_start,
        )
        # Flushed by handle_command (and by the worker before the release's first byte);
        # the flush starts now, while the rest of the decision (logs, metrics) runs,
        # unless a release is out: then it waits for that release's outcome.
        self._journal.record(new, state, reason=reason, now=now, dispatch=dispatch, durable=False)
        if not self._dispatch.release_out:
            self._journal.flush_soon()
        if notify:
            self._outbox_changed()

    def _remember(self, token: bytes, execute_key: str) -> None:
        """This exact token is verified and (once this decision is written) journaled.
        A decision that fails to write leaves no row: the lookup then misses."""
        self._known_tokens[token] = execute_key
        self._known_tokens.move_to_end(token)
        if len(self._known_tokens) > KNOWN_TOKENS_MAX:
            self._known_tokens.popitem(last=False)

    def _stored(self, execute_key: str) -> Execution | None:
        """The journaled execution of this key: a duplicate never reaches the board."""
        return self._journal.get(execute_key)

    def _answer_duplicate(self, cmd: ExecuteCommand, known: Execution) -> bytes:
        if (cmd.payment_id, cmd.machine_id) != (known.payment_id, known.machine_id):
            # Same key, different content: the key wins, nothing is executed again.
            log.warning(
                "execution %s: duplicate key with different payment/machine; stored result kept",
                cmd.execute_key,
            )
        log.info(
            "execution %s duplicate; re-sending stored result (%s)", known.execute_key, known.state
        )
        return known.last_result.encode()

    def _reject_unjournaled(self, rej: CommandRejected, now: float) -> None:
        """A command we cannot tie to a journal row: forged, malformed or not ours.

        It is logged for the technician and answered, but never journaled under its
        execute_key: an unauthenticated message must not be able to block a real one.
        Without a readable jti the answer has ``execute_key: null``: the cloud still
        learns that something reached the gateway that it could not read."""
        log.warning(
            "command rejected: %s (%s)",
            rej.reason,
            rej.detail,
            extra={"execute_key": rej.execute_key},  # the correlation field (gateway/logs.py)
        )
        self._metrics.refused(rej.reason)
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
            state=ExecutionState.REJECTED,
            reason=rej.reason,
            at=iso_utc(now),
            seq=0,
            authentic=False,
        )
        self._publish(RESULTS_TOPIC, payload.encode())
