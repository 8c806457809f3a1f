"""Long offline: the integrations runbook's thresholds on the outbox depth (pending
under 100 normal, 100-500 alert, over 500 critical) raise one alert per change."""

from __future__ import annotations

import time
from pathlib import Path

from cloud_sync.signing import generate_demo_keypair
from gateway.config import config_from_dict
from gateway.journal import Journal
from gateway.journal.outbox import append_event
from gateway.sync import CloudSync


class Offline:
    connected = False

    async def publish_many(self, items: object) -> list[BaseException | None]:
        raise AssertionError("offline: nothing is published")


def test_depth_thresholds_raise_one_alert_per_level_change(tmp_path: Path) -> None:
    config = config_from_dict(
        {
            "gateway": {"id": "gw"},
            "commands": {"public_keys": [generate_demo_keypair()[1]]},
            "machines": [
                {"id": "W1", "kind": "washer", "channel": 1, "cycles": {"normal": {"pulses": 1}}}
            ],
            "journal": {"path": str(tmp_path / "j.db")},
        }
    )
    journal = Journal(config.journal.path, "gw")
    sync = CloudSync(config, journal, Offline())

    def add(n: int) -> None:
        with journal._tx() as c:  # noqa: SLF001 - bulk producer for the test
            for i in range(n):
                append_event(c, f"s{i % 7}", "results", {"n": i}, "2026-01-01T00:00:00Z")

    def alerts() -> list[str]:
        return [a["code"] for a in reversed(journal.recent_alerts(None, limit=50))]

    add(99)
    sync.check_depth()
    assert alerts() == []
    add(1)  # 100 pending: the runbook's "alert" band
    sync.check_depth()
    sync.check_depth()
    assert alerts() == ["outbox_depth_warning"]
    add(401)
    sync.check_depth()
    assert alerts() == ["outbox_depth_warning", "outbox_depth_critical"]
    assert sync.depth_level(journal.outbox_depth()) == "critical"
    ids = [i.id for i in journal.claim(10_000, now=time.time())]
    journal.mark_sent(ids, channel="mqtt", now=time.time())
    sync.check_depth()
    # Alerts are outbox events themselves: the drain also delivered the first two.
    assert alerts()[-1] == "outbox_depth_normal"
