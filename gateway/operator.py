"""Technician actions on machines: test turns, out of service, what each machine is doing.

Each action is recorded in the audit log with who (OS account and ``--by``), why and
what changed, in the same commit as its effect; a refused action is audited too.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from .config import GatewayConfig
from .confirmation import StartConfirmation
from .dispatch import Dispatch, command_id_for
from .journal import Alert, Journal, NewExecution
from .lifecycle import ExecutionState
from .outcomes import Outcomes

__all__ = ["OperatorActions", "OperatorRefusal"]


class OperatorRefusal(Exception):
    """A technician's request the gateway refuses (machine busy, unknown, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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
        elif self._journal.machine_is_active(machine_id) or self._confirmation.busy(machine_id):
            refusal = ("machine_busy", f"máquina {machine_id} está ocupada")
        elif not self._dispatch.board_ready:
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
            raise OperatorRefusal(code, message)
        cycle = cycle or next(iter(machine.cycles))
        stamp = self._dispatch.stamp()
        if stamp is None:
            raise OperatorRefusal("board_unavailable", "placa desconectada")
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
