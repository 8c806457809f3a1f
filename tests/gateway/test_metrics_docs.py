"""docs/metrics.md and docs/alerts.rules.yml against the code: every metric a daemon
exposes is documented, and the example rule file is valid YAML of Prometheus' rule
shape naming only documented metrics."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from gateway.metrics import GatewayMetrics, ReadingsCollector

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _documented() -> set[str]:
    text = (DOCS / "metrics.md").read_text()
    return set(re.findall(r"^\| `(metalav_[a-z_]+)`", text, re.M)) | set(
        re.findall(r" / `(metalav_[a-z_]+)`", text)
    )


def _exposed() -> set[str]:
    metrics = GatewayMetrics()
    readings = {
        "version": "0",
        "config_version": "0" * 12,
        "gateway_id": "gw",
        "uptime_s": 1,
        "board_up": 1,
        "broker_up": 1,
        "outbox_by_state": {"pending": 0},
        "outbox_oldest_age_s": 0,
        "dlq": 0,
        "breakers": {"mqtt": "closed"},
        "journal_bytes": 1,
        "journal_ok": 1,
        "clock_synced": 1,
        "disk_free": 1,
        "levels": {"journal": 0},
    }
    metrics.registry.register(ReadingsCollector(lambda: readings))
    return {family.name for family in metrics.registry.collect()}


def test_every_metric_is_documented() -> None:
    exposed = {name.removesuffix("_total") for name in _exposed()}
    documented = {name.removesuffix("_total") for name in _documented()}
    # prometheus_client names an Info "metalav_build" and exposes metalav_build_info.
    documented = {n.removesuffix("_info") for n in documented}
    assert exposed == documented


def test_alert_rules_file_is_valid_yaml_of_prometheus_rule_groups() -> None:
    rules = yaml.safe_load((DOCS / "alerts.rules.yml").read_text())
    documented = _documented()
    groups = rules["groups"]
    assert groups and all({"name", "rules"} <= set(g) for g in groups)
    for group in groups:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"]
            assert rule["labels"]["severity"] in ("warning", "critical")
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"])
            named = set(re.findall(r"metalav_[a-z_]+", rule["expr"]))
            assert named and named <= documented, (rule["alert"], named - documented)
