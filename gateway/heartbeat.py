"""The retained heartbeat ``P/status`` (docs/mqtt-contract.md, "Heartbeat"): what the
fleet sees of a store without asking it.

Published retained (a subscriber arriving later gets the last one at once) every
``health.heartbeat_s`` seconds, at every change of the overall level, and after every
(re)connect of the broker link. Best effort: a lost heartbeat is replaced by the next.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from cloud_sync.mqtt_session import STATUS_TOPIC

from .alerting import DeadLetterWatch
from .events import iso_utc
from .health import HealthMonitor, HealthSnapshot

__all__ = ["Heartbeat", "heartbeat_payload"]

log = logging.getLogger(__name__)


def heartbeat_payload(
    monitor: HealthMonitor,
    snap: HealthSnapshot,
    *,
    gateway_id: str,
    store_id: str,
    now: float,
    last_dead_at: float | None,
) -> dict[str, Any]:
    c = snap.checks
    r = snap.readings
    breakers = r["breakers"]
    clock = c["clock"].value
    return {
        "type": "gateway.status",
        "gateway_id": gateway_id,
        "store_id": store_id or None,
        "at": iso_utc(now),
        "version": monitor.version,
        "config_version": monitor.config_version,
        "uptime_s": r["uptime_s"],
        "level": snap.level,
        "links": {"broker": bool(c["broker_link"].value), "board": bool(c["board_link"].value)},
        "outbox": {
            "depth": c["outbox_depth"].value,
            "oldest_age_s": c["outbox_oldest_age_s"].value,
        },
        "dlq": {
            "size": c["dlq"].value,
            "last_dead_at": None if last_dead_at is None else iso_utc(last_dead_at),
        },
        "open_breakers": sorted(n for n, s in breakers.items() if s != "closed"),
        "clock": {"synced": clock["synced"], "last_jump_s": clock["last_jump_s"]},
        "disk_free_mb": c["disk_free_mb"].value,
        "checks": {name: check.level for name, check in c.items()},
    }


class Heartbeat:
    def __init__(
        self,
        monitor: HealthMonitor,
        publish: Callable[[str, bytes], None],
        dead: DeadLetterWatch,
        *,
        gateway_id: str,
        store_id: str,
        every_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._monitor = monitor
        self._publish = publish
        self._dead = dead
        self._gateway_id = gateway_id
        self._store_id = store_id
        self._every = every_s
        self._clock = clock
        self._last_level: str | None = None
        self._last_at = float("-inf")  # monotonic
        self.due = True  # the next tick publishes (start, reconnect)

    def tick(self) -> dict[str, Any] | None:
        """Publish if due or if the level changed; return what was published."""
        snap = self._monitor.snapshot(fresh=True)
        changed = snap.level != self._last_level
        if not (self.due or changed or time.monotonic() - self._last_at >= self._every):
            return None
        payload = heartbeat_payload(
            self._monitor,
            snap,
            gateway_id=self._gateway_id,
            store_id=self._store_id,
            now=self._clock(),
            last_dead_at=self._dead.last_dead_at,
        )
        if changed and self._last_level is not None:
            log.log(
                logging.WARNING if snap.level != "normal" else logging.INFO,
                "health level %s -> %s",
                self._last_level,
                snap.level,
            )
        self._publish(STATUS_TOPIC, json.dumps(payload).encode())
        self._last_level = snap.level
        self._last_at = time.monotonic()
        self.due = False
        return payload
