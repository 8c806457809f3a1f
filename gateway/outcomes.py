"""Lifecycle outcomes written to the journal: one commit per state change, the outbox woken.

Every part of the core that ends or advances an execution (dispatch, recovery, start
confirmation, the deadlines) records it here, so "what a state change writes" is in
one place: the journal's transition (state, history, result event, compensation event,
alert, cycle event, in one commit) and a nudge to the outbox dispatcher. Alerts that
are not tied to a state change wait in memory while the journal cannot write.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable

from .config import GatewayConfig
from .journal import Alert, Execution, Journal, JournalUnwritable
from .lifecycle import ExecutionState
from .metrics import GatewayMetrics

__all__ = ["Outcomes", "UNSAVED_ALERTS_MAX"]

log = logging.getLogger(__name__)

# Alerts raised while the journal cannot write wait in memory, at most this many.
UNSAVED_ALERTS_MAX = 200


class Outcomes:
    def __init__(
        self,
        config: GatewayConfig,
        journal: Journal,
        *,
        outbox_changed: Callable[[], None],
        clock: Callable[[], float],
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._config = config
        self.metrics = metrics or GatewayMetrics()
        self._journal = journal
        self.outbox_changed = outbox_changed
        self._clock = clock
        self._unsaved_alerts: deque[tuple[Alert, float]] = deque(maxlen=UNSAVED_ALERTS_MAX)

    def finish(
        self,
        row: Execution,
        state: str,
        reason: str | None,
        *,
        board_boot_id: int | None = None,
        from_states: tuple[str, ...] = (ExecutionState.DISPATCHING,),
        alert: Alert | None = None,
        times: dict[str, float] | None = None,
        cycle_event: dict[str, object] | None = None,
    ) -> bool:
        """Move ``row`` to ``state`` if it still is in one of ``from_states``."""
        if not self._journal.transition(
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
            return False
        self.outbox_changed()
        self.metrics.entered(row.execute_key, state)
        if alert is not None:
            self.metrics.alert(alert.code, alert.severity)
        log.info("execution %s %s%s", row.execute_key, state, f" ({reason})" if reason else "")
        return True

    def released(
        self,
        row: Execution,
        reason: str | None,
        boot_id: int,
        exec_count: int | None,
        now: float | None = None,
        *,
        durable: bool = True,
    ) -> None:
        """The board acted (or said it had): ``dispatching -> released``, with the start
        confirmation's deadline for machines that have a busy input. ``durable=False``
        for the dispatch worker, which flushes before its next release."""
        now = self._clock() if now is None else now
        times = {"released_at": now}
        machine = self._config.machine(row.machine_id)
        if row.awaits_start and machine is not None:
            times["confirm_deadline"] = now + machine.confirm_window_s
        if self._journal.transition(
            row.execute_key,
            from_states=(ExecutionState.DISPATCHING,),
            to_state=ExecutionState.RELEASED,
            reason=reason,
            now=now,
            board_boot_id=boot_id,
            board_exec_count=exec_count,
            times=times,
            durable=durable,
        ):
            self.outbox_changed()
            self.metrics.released(
                row.execute_key,
                duplicate_ack=reason is not None,
                boot_id=boot_id,
                exec_count=exec_count,
            )
            log.info("execution %s released%s", row.execute_key, f" ({reason})" if reason else "")

    def needs_review(self, row: Execution, reason: str, boot_id: int | None, detail: str) -> None:
        """A release whose outcome nobody can tell: a person decides (runbook incident A)."""
        self.finish(
            row,
            ExecutionState.NEEDS_REVIEW,
            reason,
            board_boot_id=boot_id,
            alert=Alert("needs_review", "critical", row.machine_id, row.execute_key, detail),
        )

    def raise_alert(self, alert: Alert) -> None:
        """Journal an alert for the cloud; while the journal cannot write, keep it in
        memory (bounded) until it can."""
        now = self._clock()
        self.metrics.alert(alert.code, alert.severity)
        try:
            self._flush_alerts()
            self._journal.raise_alert(alert, now=now)
        except JournalUnwritable:
            self._unsaved_alerts.append((alert, now))
            return
        self.outbox_changed()

    def journal_writable_again(self) -> None:
        """The journal commits again: record the alerts that waited in memory."""
        with contextlib.suppress(JournalUnwritable):
            self._flush_alerts()
            self.outbox_changed()

    def _flush_alerts(self) -> None:
        while self._unsaved_alerts:
            alert, at = self._unsaved_alerts[0]
            self._journal.raise_alert(alert, now=at)
            self._unsaved_alerts.popleft()
