"""Store and forward, the gateway's side: outbox dispatcher, breakers, DLQ, retention.

Store and forward, the gateway's side: the outbox dispatcher over MQTT and HTTPS,
the circuit breakers, the dead-letter queue, outbox depth alerts and retention.

The dispatcher itself (cloud_sync.dispatcher) knows nothing of SQLite; the journal is
its OutboxStore. This module wires the two, and gives technicians their levers
(metalavctl breakers / dlq / reconcile / cleanup), each audited.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from cloud_sync.breaker import CircuitBreaker
from cloud_sync.dispatcher import (
    BREAKER_COMPENSATION,
    BREAKER_EVENTS,
    BREAKER_MQTT,
    MqttPublisher,
    OutboxDispatcher,
)
from cloud_sync.https_client import CloudHttpClient

from .config import GatewayConfig
from .journal import Alert, Journal, iso_utc
from .journal.operations import record_cutoffs

__all__ = ["CloudSync"]

log = logging.getLogger(__name__)

DEPTH_CHECK_S = 5.0
# Events are sent only once durable (a release's outcome is written without a flush,
# journal/database.py). The dispatcher first waits this long for a flush the release
# path does anyway (the next command's, the next release's), then flushes itself: in a
# busy store the events of a release share its fsync; alone, an event leaves at most
# this much later, which nobody waits for (the customer waits for the machine).
OUTBOX_FLUSH_GRACE_S = 0.05
# Woken by a new event, the dispatcher waits this long before claiming, so a release's
# "accepted" and outcome events (about a millisecond apart) go out in one round.
OUTBOX_COALESCE_S = 0.005
RETENTION_FIRST_S = 300.0
RETENTION_EVERY_S = 24 * 3600.0


class CloudSync:
    def __init__(
        self,
        config: GatewayConfig,
        journal: Journal,
        mqtt: MqttPublisher,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._journal = journal
        self._clock = clock
        cfg = config.breakers
        self.breakers = {
            name: CircuitBreaker(
                name, failure_threshold=cfg.failure_threshold, reset_timeout_s=cfg.reset_timeout_s
            )
            for name in (BREAKER_MQTT, BREAKER_EVENTS, BREAKER_COMPENSATION)
        }
        cloud = config.cloud
        self.http: CloudHttpClient | None = None
        if cloud.base_url:
            self.http = CloudHttpClient(
                cloud.base_url,
                config.gateway.id,
                token=cloud.token,
                timeout_s=cloud.timeout_s,
                verify=str(cloud.ca_file) if cloud.ca_file else True,
            )
        out = config.outbox
        self.dispatcher = OutboxDispatcher(
            journal,
            mqtt=mqtt,
            https=self.http,
            breakers=self.breakers,
            clock=clock,
            max_attempts=out.max_attempts,
            sending_timeout_s=out.sending_timeout_s,
            batch_size=out.batch_size,
            backoff_base_s=out.backoff_base_s,
            backoff_max_s=out.backoff_max_s,
            https_bulk_threshold=out.https_bulk_threshold,
            before_send=partial(journal.flushed, grace_s=OUTBOX_FLUSH_GRACE_S),
            coalesce_s=OUTBOX_COALESCE_S,
        )
        self._depth_level = "normal"

    def notify(self) -> None:
        self.dispatcher.notify()

    def apply_limits(self, config: GatewayConfig) -> None:
        """A SIGHUP reload (gateway/reload.py): the outbox and breaker limits that take
        effect live, each read at its next use."""
        self._config = config
        out, d = config.outbox, self.dispatcher
        d.max_attempts = out.max_attempts
        d.sending_timeout_s = out.sending_timeout_s
        d.batch_size = out.batch_size
        d.https_bulk_threshold = out.https_bulk_threshold
        for b in self.breakers.values():
            b.failure_threshold = config.breakers.failure_threshold
            b.reset_timeout_s = config.breakers.reset_timeout_s
        self.notify()

    async def run(self) -> None:
        # Items left "sending" by a previous process were in flight when it died: no
        # dispatcher is waiting for their PUBACK any more, so they are stale now rather
        # than after sending_timeout_s (which would hold their stream back that long).
        stale = self._journal.requeue_stale(0.0, self._clock())
        if stale:
            log.warning("outbox: %d item(s) in flight at the last stop requeued", stale)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.dispatcher.run(), name="outbox-dispatcher")
                tg.create_task(self._watch_depth(), name="outbox-depth")
                tg.create_task(self._retention(), name="retention")
        finally:
            if self.http is not None:
                await self.http.aclose()

    # -- long offline: the integrations runbook's thresholds -------------------------

    def depth_level(self, pending: int) -> str:
        out = self._config.outbox
        if pending > out.critical_depth:
            return "critical"
        return "warning" if pending >= out.warn_depth else "normal"

    async def _watch_depth(self) -> None:
        while True:
            await asyncio.sleep(DEPTH_CHECK_S)
            self.check_depth()

    def check_depth(self) -> None:
        """One alert per change of level (normal / warning / critical), not per check."""
        pending = self._journal.outbox_depth()
        level = self.depth_level(pending)
        if level == self._depth_level:
            return
        self._depth_level = level
        severity = {"normal": "info", "warning": "warning", "critical": "critical"}[level]
        log.log(
            logging.WARNING if level != "normal" else logging.INFO,
            "outbox depth %d: %s",
            pending,
            level,
        )
        self._journal.raise_alert(
            Alert(f"outbox_depth_{level}", severity, detail=f"{pending} events waiting"),
            now=self._clock(),
        )
        self.notify()

    async def _retention(self) -> None:
        # Shortly after start-up (a box that reboots daily still gets pruned), then daily.
        await asyncio.sleep(RETENTION_FIRST_S)
        while True:
            removed = self.cleanup(self._config.outbox.retention_days)
            log.info("retention: removed %s", removed)
            await asyncio.sleep(RETENTION_EVERY_S)

    def cleanup(self, days: int) -> dict[str, int]:
        now = self._clock()
        cutoff = datetime.fromtimestamp(now, UTC) - timedelta(days=days)
        # Executions stay as long as a replay of their command could still verify
        # (the verifier's max_age_s is the retention period; see daemon.py).
        horizon = now - self._config.outbox.retention_days * 86400
        removed = self._journal.cleanup(iso_utc(cutoff.timestamp()), replay_horizon=horizon)
        # Bounded growth of the technicians' records (issue 12), by their own ages.
        removed.update(self._journal.prune_records(**record_cutoffs(self._config, now)))
        return removed

    # -- technicians' levers ----------------------------------------------------------

    def breaker_status(self) -> list[dict[str, Any]]:
        return [b.status() for b in self.breakers.values()]

    def reset_breaker(self, name: str, *, actor: str, os_user: str, reason: str) -> bool:
        breaker = self.breakers.get(name)
        if breaker is None:
            self._journal.audit(
                action="breaker.reset",
                target=name,
                actor=actor,
                os_user=os_user,
                reason=reason,
                outcome="refused:unknown",
                now=self._clock(),
            )
            return False
        before = breaker.status()
        breaker.reset()
        self._journal.audit(
            action="breaker.reset",
            target=name,
            actor=actor,
            os_user=os_user,
            reason=reason,
            outcome="applied",
            now=self._clock(),
            before={"state": before["state"], "failures": before["failures"]},
            after={"state": breaker.status()["state"]},
        )
        self.notify()
        return True

    def manual_cleanup(self, days: int, *, actor: str, os_user: str, reason: str) -> dict[str, int]:
        removed = self.cleanup(days)
        self._journal.audit(
            action="journal.cleanup",
            target=f"older than {days} days",
            actor=actor,
            os_user=os_user,
            reason=reason,
            outcome="applied",
            now=self._clock(),
            after=dict(removed),
        )
        return removed
