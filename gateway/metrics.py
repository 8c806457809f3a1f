"""Prometheus metrics of one daemon (docs/metrics.md): events counted by hooks, the rest
read at scrape time.

Counters are incremented where the event happens (intake, outcomes, the board's
answers, the journal's commits) and live in this process: they start at 0 on every
restart, which Prometheus' ``rate()``/``increase()`` handle as a counter reset. What is
state rather than event (outbox depth, DLQ, breakers, links, the journal's size, the
health levels) is read when ``/metrics`` is scraped, by :class:`ReadingsCollector`,
from the health monitor's cached snapshot: a scrape never touches the release path.

Each daemon has its own :class:`CollectorRegistry` (never the library's global one),
so two cores in one test process, or a test, never share a counter.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from .lifecycle import ExecutionState

__all__ = [
    "CONTENT_TYPE",
    "GatewayMetrics",
    "ReadingsCollector",
    "TIME_REJECTIONS",
    "rejection_kind",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Verifier refusals caused by time (the token's or the gateway's clock), counted apart
#: from forged or malformed ones (issue 11 item 5).
TIME_REJECTIONS = frozenset({"not_yet_valid", "stale_command"})
#: The verifier's refusals that say the signature (or its key) is wrong.
SIGNATURE_REJECTIONS = frozenset({"bad_signature", "unsupported_algorithm"})
#: Refusals of an authentic command by the gateway (journaled, compensated).
GATEWAY_REFUSALS = frozenset({"unknown_machine", "unknown_cycle", "machine_busy", "out_of_service"})

# Release latency, command received -> board ack: a few ms on a quiet store, up to the
# board's retries (seconds) and the wait for a board that was away.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Releases waiting for their board ack whose start time is kept (bounded memory).
MAX_TIMED = 10_000


def rejection_kind(reason: str) -> str:
    """``time``, ``signature``, ``gateway`` or ``invalid`` (malformed, not ours, bad claims)."""
    if reason in TIME_REJECTIONS:
        return "time"
    if reason in SIGNATURE_REJECTIONS:
        return "signature"
    if reason in GATEWAY_REFUSALS:
        return "gateway"
    return "invalid"


class GatewayMetrics:
    """The daemon's counters and histograms, and the hooks that move them."""

    def __init__(self, *, process: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.executions = Counter(
            "metalav_executions",
            "Executions that entered each lifecycle state (accepted, released, started, "
            "not_started, completed, failed, rejected, expired, needs_review)",
            ["state"],
            registry=r,
        )
        self.duplicates = Counter(
            "metalav_duplicate_commands",
            "Commands whose execute_key was already journaled: answered with the stored "
            "result, never sent to the board",
            registry=r,
        )
        self.rejections = Counter(
            "metalav_command_rejections",
            "Commands refused, by reason and kind (time, signature, invalid: the "
            "verifier's; gateway: an authentic command the store cannot run)",
            ["reason", "kind"],
            registry=r,
        )
        self.unexpected_executions = Counter(
            "metalav_board_unexpected_executions",
            "Executions the board counted beyond the releases this gateway sent it in "
            "the same boot (a physical double release, or another host): must stay 0",
            registry=r,
        )
        self.release_latency = Histogram(
            "metalav_release_latency_seconds",
            "From the command's arrival to the board's acknowledgement of its release",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.alerts = Counter(
            "metalav_alerts",
            "Alerts raised for people, by code and severity",
            ["code", "severity"],
            registry=r,
        )
        self.board_reboots = Counter(
            "metalav_board_reboots", "Board resets seen (boot id changed)", registry=r
        )
        self.journal_commit = Histogram(
            "metalav_journal_commit_seconds",
            "Duration of each durable journal write: a COMMIT with its flush, or a flush",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.clock_jumps = Counter(
            "metalav_clock_jumps",
            "Jumps of the system clock seen against the monotonic clock",
            registry=r,
        )
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        #: Told of every refusal (the signature watch of gateway/alerting.py).
        self.on_refused: Callable[[str], None] | None = None
        self._received: OrderedDict[str, float] = OrderedDict()
        self._received_at: float | None = None
        # Per board boot: the execution count after the last release we accounted for.
        self._board_boot: int | None = None
        self._board_count: int | None = None
        # Recent commit durations, for the health check (no histogram arithmetic).
        self.recent_commits: list[float] = []

    # -- hooks ------------------------------------------------------------------------

    def received(self) -> None:
        """A command arrived (intake takes them one at a time, in order)."""
        self._received_at = time.monotonic()

    def refused(self, reason: str) -> None:
        """A command the verifier refused (not journaled), or the gateway refused."""
        self.rejections.labels(reason, rejection_kind(reason)).inc()
        if self.on_refused is not None:
            self.on_refused(reason)

    def duplicate(self) -> None:
        self.duplicates.inc()

    def decided(self, execute_key: str, state: str, reason: str | None) -> None:
        """Intake journaled a new execution in ``state``."""
        self.executions.labels(state).inc()
        if state == ExecutionState.REJECTED and reason is not None:
            self.refused(reason)
        if state in (ExecutionState.ACCEPTED, ExecutionState.DISPATCHING):
            self._received[execute_key] = self._received_at or time.monotonic()
            while len(self._received) > MAX_TIMED:
                self._received.popitem(last=False)

    def entered(self, execute_key: str, state: str) -> None:
        """An execution moved to ``state`` (released and the outcomes after it)."""
        self.executions.labels(state).inc()
        if state != ExecutionState.RELEASED:
            self._received.pop(execute_key, None)

    def released(
        self, execute_key: str, *, duplicate_ack: bool, boot_id: int, exec_count: int | None
    ) -> None:
        """The board acknowledged a release (or said it had executed it)."""
        self.entered(execute_key, ExecutionState.RELEASED)
        started = self._received.pop(execute_key, None)
        if started is not None:
            self.release_latency.observe(time.monotonic() - started)
        self.board_count(boot_id, exec_count, new_release=not duplicate_ack)

    def board_count(self, boot_id: int, exec_count: int | None, *, new_release: bool) -> None:
        """The board's execution count (firmware 1.2) after a release of ours.

        Within one boot, each new release this gateway sends adds exactly one to the
        count; anything more is an execution nobody here asked for. A duplicate ack or
        a recovery query answers for a release already counted on the board side."""
        if exec_count is None:
            return
        if boot_id != self._board_boot or self._board_count is None:
            self._board_boot, self._board_count = boot_id, exec_count
            return
        expected = self._board_count + (1 if new_release else 0)
        if new_release and exec_count > expected:
            self.unexpected_executions.inc(exec_count - expected)
        self._board_count = max(self._board_count, exec_count)

    def alert(self, code: str, severity: str) -> None:
        self.alerts.labels(code, severity).inc()
        if code == "board_rebooted":
            self.board_reboots.inc()

    def commit(self, seconds: float) -> None:
        self.journal_commit.observe(seconds)
        self.recent_commits.append(seconds)
        if len(self.recent_commits) > 64:
            del self.recent_commits[:32]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ReadingsCollector(Collector):
    """Gauges read at scrape time from ``readings()`` (the health snapshot as a dict)."""

    def __init__(self, readings: Callable[[], dict[str, Any]]) -> None:
        self._readings = readings

    def describe(self) -> Iterable[Metric]:
        return []  # no fixed description: read only when scraped

    def collect(self) -> Iterable[Metric]:
        r = self._readings()
        info = InfoMetricFamily("metalav_build", "Version of the gateway and of its config")
        info.add_metric(
            [],
            {
                "version": r["version"],
                "config_version": r["config_version"],
                "gateway_id": r["gateway_id"],
            },
        )
        yield info
        yield _gauge("metalav_uptime_seconds", "Seconds since the daemon started", r["uptime_s"])
        yield _gauge("metalav_board_link_up", "1 while the relay board answers", r["board_up"])
        yield _gauge("metalav_broker_link_up", "1 while the MQTT session serves", r["broker_up"])
        depth = GaugeMetricFamily(
            "metalav_outbox_events",
            "Outbox events by state: pending, sending, failed, dead (the DLQ)",
            labels=["state"],
        )
        for state, n in sorted(r["outbox_by_state"].items()):
            depth.add_metric([state], n)
        yield depth
        yield _gauge(
            "metalav_outbox_oldest_pending_age_seconds",
            "Age of the oldest event not yet delivered (0 when none waits)",
            r["outbox_oldest_age_s"],
        )
        yield _gauge("metalav_dlq_events", "Dead events waiting for a technician", r["dlq"])
        breakers = GaugeMetricFamily(
            "metalav_circuit_breaker_state",
            "1 for the state each circuit breaker is in",
            labels=["breaker", "state"],
        )
        for name, state in sorted(r["breakers"].items()):
            for candidate in ("closed", "open", "half_open"):
                breakers.add_metric([name, candidate], 1.0 if state == candidate else 0.0)
        yield breakers
        yield _gauge("metalav_journal_size_bytes", "Journal file with its WAL", r["journal_bytes"])
        yield _gauge("metalav_journal_writable", "0 while journal commits fail", r["journal_ok"])
        yield _gauge(
            "metalav_clock_synchronized",
            "1 while the kernel says the clock is synchronised",
            r["clock_synced"],
        )
        yield _gauge(
            "metalav_disk_free_bytes", "Free space where the journal lives", r["disk_free"]
        )
        levels = GaugeMetricFamily(
            "metalav_health_level",
            "Level of each health check: 0 normal, 1 alert, 2 critical",
            labels=["check"],
        )
        for check, level in sorted(r["levels"].items()):
            levels.add_metric([check], level)
        yield levels


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))
