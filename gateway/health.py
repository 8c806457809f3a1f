"""Health of a running gateway: each check with its value and level, and the loopback
HTTP site that serves it with the Prometheus metrics.

    GET /health            liveness: 200 {"status": "ok", "level": ...} while the loop runs
    GET /health/detailed   every check: value and level (normal / alert / critical);
                           HTTP 503 while any check is critical, else 200
    GET /metrics           Prometheus text exposition (docs/metrics.md)

Levels follow the thresholds in the config (``[health]``, ``[outbox]``) whose defaults
are the integrations runbook's SLA table. The site listens on loopback only (config
``health.host``/``health.port``; port 0 turns it off) and stays off the release path:
a snapshot is cheap indexed reads and stats, computed at most once a second and shared
by the site, the heartbeat and ``metalavctl status``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web

from .clock import ClockWatch
from .config import GatewayConfig
from .i18n import N_
from .journal import Journal
from .metrics import CONTENT_TYPE, GatewayMetrics, ReadingsCollector

__all__ = [
    "LEVELS",
    "Check",
    "HealthMonitor",
    "HealthServer",
    "HealthSnapshot",
    "config_version",
    "gateway_version",
]

log = logging.getLogger(__name__)

#: Levels in order of gravity; the overall level is the worst check's.
LEVELS = ("normal", "alert", "critical")
#: A snapshot younger than this is served again rather than read anew.
SNAPSHOT_MAX_AGE_S = 1.0
#: A clock jump counts against the clock check for this long.
JUMP_MEMORY_S = 600.0


def gateway_version() -> str:
    try:
        return version("metalav-gateway")
    except PackageNotFoundError:
        return "unknown"


def config_version(config: GatewayConfig) -> str:
    """A short digest of the validated config: changes whenever any key does."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]


def _level(value: float, alert: float, critical: float) -> str:
    """``value`` against thresholds where more is worse (alert <= value, critical < value)."""
    if value > critical:
        return "critical"
    return "alert" if value >= alert else "normal"


@dataclass(frozen=True)
class Check:
    name: str
    value: Any
    level: str
    #: English text with ``{name}`` fields (a gettext msgid: metalavctl shows it in the
    #: technician's language) and the values that fill them.
    detail_template: str = ""
    detail_params: dict[str, Any] = field(default_factory=dict)

    @property
    def detail(self) -> str:
        return self.detail_template.format(**self.detail_params)

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "level": self.level,
            "detail": self.detail,
            "detail_template": self.detail_template,
            "detail_params": self.detail_params,
        }


@dataclass(frozen=True)
class HealthSnapshot:
    at: float
    checks: dict[str, Check]
    readings: dict[str, Any] = field(default_factory=dict)

    @property
    def level(self) -> str:
        return max((c.level for c in self.checks.values()), key=LEVELS.index, default="normal")

    def as_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "at": self.at,
            "checks": {name: c.as_dict() for name, c in self.checks.items()},
        }


@dataclass
class Links:
    """What the daemon knows of its links, read when a snapshot is taken."""

    board_up: Callable[[], bool]
    broker_up: Callable[[], bool]
    journal_fault: Callable[[], str | None]
    breakers: Callable[[], dict[str, str]]
    https_configured: bool


class HealthMonitor:
    def __init__(
        self,
        config: GatewayConfig,
        journal: Journal,
        metrics: GatewayMetrics,
        clock_watch: ClockWatch,
        links: Links,
        *,
        started_at: float,
        disk_usage: Callable[[str], Any] = shutil.disk_usage,
    ) -> None:
        self._config = config
        self._journal = journal
        self._metrics = metrics
        self._clock = clock_watch
        self._links = links
        self._started_mono = time.monotonic()
        self.started_at = started_at
        self._disk_usage = disk_usage
        self.gateway_id = config.gateway.id
        self.version = gateway_version()
        self.config_version = config_version(config)
        self._last: HealthSnapshot | None = None
        metrics.registry.register(ReadingsCollector(lambda: self.snapshot().readings))

    def snapshot(self, *, fresh: bool = False) -> HealthSnapshot:
        last = self._last
        if not fresh and last is not None and time.monotonic() - last.at < SNAPSHOT_MAX_AGE_S:
            return last
        self._last = self._take()
        return self._last

    def _take(self) -> HealthSnapshot:
        cfg, h = self._config, self._config.health
        j = self._journal
        now = time.time()
        checks: dict[str, Check] = {}

        def add(name: str, value: Any, level: str, detail: str = "", **params: Any) -> None:
            checks[name] = Check(name, value, level, detail, params)

        fault = self._links.journal_fault()
        # The median of the recent commits: one slow fsync is not a slow disk.
        commits = self._metrics.recent_commits[-32:]
        latency_ms = round(statistics.median(commits) * 1000, 2) if commits else None
        if fault is not None:
            add("journal", latency_ms, "critical", N_("not writing: {fault}"), fault=fault[:160])
        else:
            level = (
                "normal"
                if latency_ms is None
                else _level(latency_ms, h.journal_latency_alert_ms, h.journal_latency_critical_ms)
            )
            add("journal", latency_ms, level, N_("ms, median of the latest writes"))
        board = self._links.board_up()
        add("board_link", board, "normal" if board else "critical")
        broker = self._links.broker_up()
        add("broker_link", broker, "normal" if broker else "alert")
        breakers = self._links.breakers()
        https = breakers.get("https_events", "closed")
        if not self._links.https_configured:
            add("https", "not_configured", "normal")
        else:
            add("https", https, "normal" if https == "closed" else "alert")
        by_state = j.outbox_counts()
        depth = by_state["pending"] + by_state["sending"] + by_state["failed"]
        depth_level = _level(depth, cfg.outbox.warn_depth, cfg.outbox.critical_depth)
        add("outbox_depth", depth, depth_level)
        oldest = j.oldest_undelivered_at()
        age = 0.0 if oldest is None else round(max(0.0, now - oldest), 1)
        add("outbox_oldest_age_s", age, _level(age, h.oldest_alert_s, h.oldest_critical_s))
        dlq = by_state.get("dead", 0)
        add("dlq", dlq, _level(dlq, h.dlq_alert, h.dlq_critical))
        opened = sorted(n for n, s in breakers.items() if s != "closed")
        add("breakers", breakers, "alert" if opened else "normal", "{open}", open=", ".join(opened))
        clock = self._clock.state()
        jumped = self._clock.recent_jump(JUMP_MEMORY_S)
        clock_level = "alert" if clock.synced is False or jumped else "normal"
        detail = "" if clock.checked else N_("check turned off (clock.sync_check = off)")
        params: dict[str, Any] = {}
        if jumped and clock.last_jump_s is not None:
            detail, params = N_("jumped by {seconds} s"), {"seconds": f"{clock.last_jump_s:+.0f}"}
        value = {"synced": clock.synced, "last_jump_s": clock.last_jump_s}
        add("clock", value, clock_level, detail, **params)
        try:
            free_mb = round(self._disk_usage(str(cfg.journal.path.parent)).free / 2**20, 1)
        except OSError:
            free_mb = 0.0
        # Less is worse: compare the shortfall.
        disk_level = (
            "critical"
            if free_mb < h.disk_free_critical_mb
            else "alert"
            if free_mb < h.disk_free_alert_mb
            else "normal"
        )
        add("disk_free_mb", free_mb, disk_level)

        breaker_states = {n: s for n, s in breakers.items()}
        readings = {
            "version": self.version,
            "config_version": self.config_version,
            "gateway_id": cfg.gateway.id,
            "uptime_s": round(time.monotonic() - self._started_mono, 1),
            "board_up": int(board),
            "broker_up": int(broker),
            "outbox_by_state": by_state,
            "outbox_oldest_age_s": age,
            "dlq": dlq,
            "breakers": breaker_states,
            "journal_bytes": j.file_bytes(),
            "journal_ok": int(fault is None),
            "clock_synced": int(clock.synced is not False),
            "disk_free": free_mb * 2**20,
            "levels": {name: LEVELS.index(c.level) for name, c in checks.items()},
        }
        return HealthSnapshot(time.monotonic(), checks, readings)


class HealthServer:
    """``/health``, ``/health/detailed`` and ``/metrics`` on a loopback TCP site."""

    def __init__(self, monitor: HealthMonitor, metrics: GatewayMetrics, host: str, port: int):
        self._monitor = monitor
        self._metrics = metrics
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port: int | None = None  # the bound port (``port = 0`` in tests: a free one)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/health/detailed", self._detailed)
        app.router.add_get("/metrics", self._scrape)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await site.start()
        except OSError as exc:
            # Monitoring is not worth a store that cannot sell: run without it.
            log.error(
                "health and metrics site cannot listen on %s:%s (%s); running without it",
                self._host,
                self._port,
                exc.strerror or exc,
            )
            await self.stop()
            return
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        log.info("health and metrics on http://%s:%s", self._host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "level": self._monitor.snapshot().level})

    async def _detailed(self, request: web.Request) -> web.Response:
        snap = self._monitor.snapshot()
        body = {
            "gateway_id": self._monitor.gateway_id,
            "version": self._monitor.version,
            "config_version": self._monitor.config_version,
            **snap.as_dict(),
        }
        return web.json_response(body, status=503 if snap.level == "critical" else 200)

    async def _scrape(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})
