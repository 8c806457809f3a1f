"""Technician actions on machines: test turns, out of service, what each machine is doing.

Each action is recorded in the audit log with who (OS account and ``--by``), why and
what changed, in the same commit as its effect; a refused action is audited too.

Beside the machines: the decisions only a person may take about an execution
(``resolve`` a ``needs_review``, ``reprocess``), and the store-wide pause. None of them
ever sends a release the board may already have acted on (promise 1): ``resolve``
never reaches the board, and ``reprocess`` re-dispatches only what provably never
reached the relay (a row still ``accepted``, which the dispatcher sends by itself once
the board is there, or a board NACK the cloud was not told of yet).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from .config import GatewayConfig, config_version
from .confirmation import StartConfirmation
from .dispatch import Dispatch, command_id_for
from .i18n import N_
from .journal import Alert, Journal, NewExecution, Refused
from .lifecycle import ExecutionState
from .outcomes import Outcomes

__all__ = ["NOT_FOUND", "OperatorActions", "OperatorRefusal"]

NOT_FOUND = N_("execution {key!r} not found in the journal")


class OperatorRefusal(Exception):
    """A technician's request the gateway refuses (machine busy, unknown, ...).

    ``template`` is an English message of the catalog (gateway/i18n.py) and
    ``params`` its fields: the local API translates it to the technician's language."""

    def __init__(self, code: str, template: str, **params: object) -> None:
        super().__init__(template.format(**params))
        self.code = code
        self.template = template
        self.params = params


class OperatorActions:
    def __init__(
        self,
        config: GatewayConfig,
        journal: Journal,
        confirmation: StartConfirmation,
        dispatch: Dispatch,
        outcomes: Outcomes,
        *,
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._journal = journal
        self._confirmation = confirmation
        self._dispatch = dispatch
        self._outcomes = outcomes
        self._clock = clock
        self.config_version = config_version(config)
        journal.note_identity(gateway_id=config.gateway.id, config_version=self.config_version)

    def technical_release(
        self, machine_id: str, cycle: str | None, *, actor: str, os_user: str, reason: str
    ) -> str:
        """A technician's test turn ("technical service"): the same lifecycle as a paid
        release, journaled with who asked and why; refused while the machine is busy."""
        now = self._clock()
        machine = self._config.machine(machine_id)
        refusal: tuple[str, str] | None = None
        if machine is None:
            refusal = ("unknown_machine", N_("machine {machine!r} does not exist in this store"))
        elif cycle is not None and cycle not in machine.cycles:
            refusal = ("unknown_cycle", N_("cycle {cycle!r} does not exist for {machine}"))
        elif self._journal.machine_is_active(machine_id) or self._confirmation.busy(machine_id):
            refusal = ("machine_busy", N_("machine {machine} is busy"))
        elif not self._dispatch.board_ready:
            refusal = ("board_unavailable", N_("board disconnected"))
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
            raise OperatorRefusal(code, message, machine=machine_id, cycle=cycle)
        cycle = cycle or next(iter(machine.cycles))
        stamp = self._dispatch.stamp()
        if stamp is None:
            raise OperatorRefusal("board_unavailable", N_("board disconnected"))
        key = f"tech-{uuid.uuid4().hex[:16]}"
        new = NewExecution(
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
            kind="technical_service",
            requested_by=f"{actor} ({os_user}): {reason}",
            awaits_start=machine.busy_input is not None,
        )
        self._journal.record(
            new,
            ExecutionState.DISPATCHING,
            reason=None,
            now=now,
            dispatch=stamp,
            audit={
                "action": "relay.test",
                "target": machine_id,
                "actor": actor,
                "os_user": os_user,
                "reason": reason,
                "outcome": "dispatched",
                "after": {"execute_key": key, "cycle": cycle},
                "params": {"machine": machine_id, "cycle": cycle},
            },
        )
        self._dispatch.enqueue(key)
        self._outcomes.outbox_changed()
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
            raise OperatorRefusal(
                "unknown_machine",
                N_("machine {machine!r} does not exist in this store"),
                machine=machine_id,
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
            self._outcomes.outbox_changed()
        return changed

    def machines(self) -> list[dict[str, object]]:
        """Each machine as a technician sees it (metalavctl machines)."""
        out_of_service = self._journal.out_of_service()
        result = []
        for m in self._config.machines:
            busy = self._confirmation.busy(m.id)
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
                    "stuck_relay": self._confirmation.monitor.stuck(m.id),
                    "out_of_service": out_of_service.get(m.id),
                    "last_execution": self._journal.last_execution(m.id),
                    "recent_alerts": self._journal.recent_alerts(m.id),
                }
            )
        return result

    # -- executions: the decisions only a person may take -------------------------------

    def resolve(
        self, execute_key: str, released: bool, *, actor: str, os_user: str, reason: str
    ) -> dict[str, Any]:
        """Runbook incident A: the technician checked the machine of a ``needs_review``
        execution. Ends it (released: no compensation; not released: failed with
        compensation) and reports it; never pulses."""
        decision = "released" if released else "not_released"
        try:
            done = self._journal.resolve_review(
                execute_key,
                released=released,
                now=self._clock(),
                audit=_audit(
                    "execution.resolve", execute_key, actor, os_user, reason, decision=decision
                ),
            )
        except Refused as exc:
            if exc.code == "not_found":
                raise OperatorRefusal("not_found", NOT_FOUND, key=execute_key) from None
            row = self._journal.get(execute_key)
            state = row.state if row is not None else "?"
            raise OperatorRefusal(
                "not_needs_review",
                N_(
                    "execution {key} is {state!r}, not waiting for manual review"
                    " (needs_review): nothing to resolve"
                ),
                key=execute_key,
                state=str(state),
            ) from None
        self._outcomes.outbox_changed()
        return done

    def reprocess(
        self, execute_key: str, *, actor: str, os_user: str, reason: str
    ) -> dict[str, Any]:
        """Idempotent: whatever the state, never a second release. A board NACK the
        cloud has not heard of yet goes to the board again (nothing was pulsed); any
        other execution gets its stored result re-sent."""
        now = self._clock()
        row = self._journal.get(execute_key)
        audit = _audit("execution.reprocess", execute_key, actor, os_user, reason)
        if row is None:
            self._journal.audit(now=now, outcome="refused:not_found", **audit)
            raise OperatorRefusal("not_found", NOT_FOUND, key=execute_key)
        nack = self._journal.never_reached_board(execute_key)
        # Why a NACKed release is not sent again (shown to the technician), or None.
        held: str | None = None
        if nack is not None and row.expires_at <= now:
            held = "command_expired"
        if nack is not None and row.expires_at > now and row.kind == "payment":
            machine = self._config.machine(row.machine_id)
            unavailable = None
            if machine is None:
                unavailable = "unknown_machine"
            elif self._journal.store_pause() is not None:
                unavailable = "store_paused"
            elif row.machine_id in self._journal.out_of_service():
                unavailable = "out_of_service"
            elif self._journal.machine_is_active(row.machine_id) or self._confirmation.busy(
                row.machine_id
            ):
                unavailable = "machine_busy"
            stamp = None if unavailable else self._dispatch.stamp()
            held = unavailable or (None if stamp is not None else "board_unavailable")
            if stamp is not None:
                try:
                    self._journal.redispatch_failed(
                        execute_key, stamp, now=now, audit={**audit, "decision": "redispatch"}
                    )
                except Refused as exc:
                    held = exc.code  # the cloud already knows it failed: re-send that
                else:
                    self._dispatch.enqueue(execute_key)
                    self._outcomes.outbox_changed()
                    return {"action": "redispatched", "state": "dispatching", "previous": nack}
        if row.state == ExecutionState.ACCEPTED:
            # Never written to the board: the dispatcher sends it as soon as the board
            # answers (or it expires); a reprocess must not race it.
            hint = "waiting_for_board"
        else:
            hint = None
        done = self._journal.resend_result(
            execute_key, now=now, audit={**audit, "decision": "resend_result"}
        )
        self._outcomes.outbox_changed()
        return {"action": "result_resent", "waiting": hint, "not_redispatched": held, **done}

    # -- the store ----------------------------------------------------------------------

    def set_store_paused(self, paused: bool, *, actor: str, os_user: str, reason: str) -> bool:
        """Runbook 4C, "freeze": new paid commands are refused (``store_paused``, with
        compensation); everything else keeps running. Persists across restarts."""
        now = self._clock()
        changed = self._journal.set_store_pause(
            paused, reason=reason, actor=actor, os_user=os_user, now=now
        )
        if changed:
            self._journal.raise_alert(
                Alert(
                    "store_paused" if paused else "store_resumed",
                    "warning",
                    detail=f"by {actor}: {reason}"[:160],
                ),
                now=now,
            )
            self._outcomes.outbox_changed()
        return changed

    def store_status(self) -> dict[str, Any]:
        """For ``Daemon.status()`` (and the heartbeat)."""
        pause = self._journal.store_pause()
        return {
            "paused": pause is not None,
            "reason": pause and pause.reason,
            "by": pause and pause.by,
            "since": pause and pause.since,
            "config_version": self.config_version,
        }


def _audit(
    action: str,
    target: str,
    actor: str,
    os_user: str,
    reason: str,
    *,
    decision: str | None = None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "action": action,
        "target": target,
        "actor": actor,
        "os_user": os_user,
        "reason": reason,
        "decision": decision,
        "params": params,
    }
