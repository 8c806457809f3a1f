"""Each health check crosses its thresholds (issue 11 item 1): a real journal filled
with real outbox events, real commit durations fed through the journal's commit hook,
and the links and disk as the daemon reads them."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.signing import generate_demo_keypair
from devtools.stack import demo_config
from gateway.clock import ClockWatch
from gateway.config import ConfigError, config_from_dict, load_config
from gateway.events import Alert
from gateway.health import HealthMonitor, HealthServer, Links
from gateway.journal import Journal
from gateway.metrics import GatewayMetrics

Usage = namedtuple("Usage", "total used free")
MB = 2**20


class Store:
    """The state a health snapshot reads, each part set by the test."""

    def __init__(self, tmp_path: Path) -> None:
        _, public_pem = generate_demo_keypair()
        path = tmp_path / "gateway.toml"
        path.write_text(
            demo_config(
                tmp_path,
                gateway_id="gw-health",
                mqtt_port=1883,
                public_key_pem=public_pem,
                board_port=tmp_path / "board",
                sections={
                    "outbox": {"warn_depth": 4, "critical_depth": 8},
                    "health": {"dlq_alert": 2, "dlq_critical": 4},
                    "cloud": {"base_url": "https://cloud.example"},
                },
            )
        )
        self.config = load_config(path)
        self.journal = Journal(self.config.journal.path, "gw-health")
        self.metrics = GatewayMetrics()
        self.journal.on_commit = self.metrics.commit
        self.board = self.broker = True
        self.breakers = {"mqtt": "closed", "https_events": "closed", "https_compensation": "closed"}
        self.free_mb = 10_000.0
        self.synced: bool | None = True
        self.wall = time.time()
        self.clock = ClockWatch(probe=lambda: self.synced, wall=lambda: self.wall)
        self.monitor = HealthMonitor(
            self.config,
            self.journal,
            self.metrics,
            self.clock,
            Links(
                board_up=lambda: self.board,
                broker_up=lambda: self.broker,
                journal_fault=lambda: self.journal.fault and self.journal.fault.reason,
                breakers=lambda: dict(self.breakers),
                https_configured=True,
            ),
            started_at=time.time(),
            disk_usage=lambda path: Usage(0, 0, self.free_mb * MB),
        )

    def levels(self) -> dict[str, str]:
        snap = self.monitor.snapshot(fresh=True)
        return {name: c.level for name, c in snap.checks.items()}

    def level(self, check: str) -> str:
        return self.levels()[check]

    def events(self, n: int, *, age_s: float = 0.0) -> list[int]:
        ids = []
        for _ in range(n):
            self.journal.raise_alert(Alert("stuck_relay", "critical"), now=time.time() - age_s)
        for item in self.journal.claim(1000, time.time()):
            ids.append(item.id)
        self.journal.release(ids, error="test", channel="mqtt", now=time.time(), next_attempt_at=0)
        return ids


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store(tmp_path)
    yield s
    s.journal.close()


def test_a_healthy_store_is_normal_everywhere(store: Store) -> None:
    assert set(store.levels().values()) == {"normal"}
    assert store.monitor.snapshot(fresh=True).level == "normal"


def test_outbox_depth_crosses_the_runbook_thresholds(store: Store) -> None:
    store.events(3)
    assert store.level("outbox_depth") == "normal"
    store.events(1)  # 4: at the alert threshold
    assert store.level("outbox_depth") == "alert"
    store.events(4)  # 8: still alert (critical is above it)
    assert store.level("outbox_depth") == "alert"
    store.events(1)
    assert store.level("outbox_depth") == "critical"
    assert store.monitor.snapshot(fresh=True).level == "critical"


def test_oldest_event_age_crosses_30_and_60_seconds(store: Store) -> None:
    # Events are created in time order: each older one is alone in the outbox (the
    # one before was delivered).
    def deliver(ids: list[int]) -> None:
        store.journal.claim(1000, time.time())
        store.journal.mark_sent(ids, channel="mqtt", now=time.time())

    ids = store.events(1, age_s=10)
    assert store.level("outbox_oldest_age_s") == "normal"
    deliver(ids)
    ids = store.events(1, age_s=45)
    assert store.level("outbox_oldest_age_s") == "alert"
    deliver(ids)
    store.events(1, age_s=90)
    snap = store.monitor.snapshot(fresh=True)
    assert snap.checks["outbox_oldest_age_s"].level == "critical"
    assert snap.checks["outbox_oldest_age_s"].value >= 90


def test_dlq_size_crosses_its_thresholds(store: Store) -> None:
    def kill(n: int) -> None:
        for item_id in store.events(n):
            store.journal.claim(1000, time.time())
            store.journal.mark_failed(
                item_id,
                error="422",
                retryable=False,
                max_attempts=10,
                channel="https",
                now=time.time(),
                next_attempt_at=0,
            )

    kill(1)
    assert store.level("dlq") == "normal"
    kill(1)
    assert store.level("dlq") == "alert"
    kill(3)
    assert store.level("dlq") == "critical"


def test_journal_latency_crosses_50_and_100_ms_and_a_fault_is_critical(store: Store) -> None:
    for seconds, level in ((0.01, "normal"), (0.07, "alert"), (0.2, "critical")):
        for _ in range(40):
            store.metrics.commit(seconds)
        assert store.level("journal") == level
    store.journal.fail_commit = lambda label: True
    with pytest.raises(Exception, match="disk is full"):
        store.journal.raise_alert(Alert("stuck_relay", "critical"), now=time.time())
    store.metrics.recent_commits.clear()
    snap = store.monitor.snapshot(fresh=True)
    assert snap.checks["journal"].level == "critical" and "disk" in snap.checks["journal"].detail


def test_links_breakers_clock_and_disk(store: Store) -> None:
    store.broker = False
    assert store.level("broker_link") == "alert"
    store.board = False
    assert store.level("board_link") == "critical"
    store.breakers["https_events"] = "open"
    levels = store.levels()
    assert (levels["https"], levels["breakers"]) == ("alert", "alert")
    store.synced = False
    store.clock.check()
    assert store.level("clock") == "alert"
    store.synced = True
    store.clock.check()
    assert store.level("clock") == "normal"
    store.wall += 3600  # a jump counts for ten minutes
    store.clock.check()
    assert store.level("clock") == "alert"
    for free, level in ((600.0, "normal"), (500.0, "alert"), (100.0, "critical")):
        store.free_mb = free
        assert store.level("disk_free_mb") == level


def test_a_snapshot_is_served_from_cache_within_a_second(store: Store) -> None:
    first = store.monitor.snapshot()
    store.board = False
    assert store.monitor.snapshot() is first  # cheap: nothing read again
    assert store.monitor.snapshot(fresh=True).checks["board_link"].level == "critical"


def test_a_taken_port_leaves_the_daemon_running_without_the_site(store: Store) -> None:
    async def main() -> int | None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            server = HealthServer(store.monitor, store.metrics, "127.0.0.1", taken.getsockname()[1])
            await server.start()  # logged, not raised: monitoring never stops a store
            await server.stop()
            return server.port

    assert asyncio.run(main()) is None


def test_thresholds_out_of_order_are_a_config_error(tmp_path: Path) -> None:
    base = Store(tmp_path).config.model_dump(mode="json")
    for bad, line in (
        ({"dlq_alert": 60, "dlq_critical": 50}, "health.dlq_alert: must be at most dlq_critical"),
        (
            {"disk_free_alert_mb": 100, "disk_free_critical_mb": 200},
            "health.disk_free_alert_mb: must be at least disk_free_critical_mb",
        ),
    ):
        with pytest.raises(ConfigError) as err:
            config_from_dict({**base, "health": {**base["health"], **bad}})
        assert err.value.lines[0].startswith(line), err.value.lines
