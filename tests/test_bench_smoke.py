"""bench/store_view.py at its smallest size: it runs, both gateways release every command
exactly once, and the JSON carries a number for every figure. No timing is asserted:
the figures belong to docs/performance.md, not to a test on a shared machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FIGURES = [
    "ready_s",
    *(f"{mode}_{p}_ms" for mode in ("isolated", "b2b", "burst") for p in ("p50", "p90", "p99")),
    "burst_releases_per_s",
    "duplicate_decisions_per_s",
    *(f"cpu_ms_per_command_{mode}" for mode in ("isolated", "b2b", "burst", "duplicates")),
    *(f"fsyncs_per_release_{mode}" for mode in ("isolated", "b2b", "burst")),
    "fsyncs_per_duplicate",
    "rss_mb_after_run",
    "idle_cpu_pct_of_core",
]
BIG_JOURNAL = ["big_journal_ready_s", "big_journal_rss_mb", "big_journal_idle_cpu_pct_of_core"]


@pytest.mark.bench
@pytest.mark.timeout(90)
def test_store_view_measures_both_gateways_and_each_releases_every_command_once(
    tmp_path: Path,
) -> None:
    out = tmp_path / "store_view.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "store_view.py"),
            "--quick",
            "--isolated", "3",
            "--b2b", "3",
            "--idle-s", "0.5",
            "--drain-n", "200",
            "--big-journal",
            "--big-journal-rows", "500",
            "--out", str(out),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=80,
    )  # fmt: skip
    report = json.loads(out.read_text())
    counted_fsyncs = report["method"]["fsyncs"].startswith("perf stat")

    for name in ("daemon", "reference"):
        figures = report[name]
        for key in FIGURES + (BIG_JOURNAL if name == "daemon" else []):
            value = figures[key]["median"]
            if key.startswith("fsyncs") and not counted_fsyncs:
                assert value is None, key  # no perf here: unknown, never a made-up number
                continue
            assert isinstance(value, int | float), (name, key, value)
            assert figures[key]["min"] <= value <= figures[key]["max"], (name, key)
        for checks in report["checks"][name]:
            assert checks["released_each_command_once"], name
            assert checks["extra_actuations_from_duplicates"] == 0, name
    for checks in report["checks"]["daemon"]:
        for mode in ("isolated", "b2b", "burst"):
            assert set(checks[f"{mode}_outcomes"]) == {"released"}, (mode, checks)
        assert set(checks["big_journal_burst_outcomes"]) == {"released"}, checks
        assert "big_journal_error" not in checks
    for ratio in ("isolated_p50_ms", "b2b_p99_ms", "burst_releases_per_s"):
        assert isinstance(report["ratios_daemon_over_reference"][ratio], float), ratio
    assert isinstance(report["outbox_drain_mqtt"]["events_per_s"]["median"], int | float)
    assert len(report["targets"]) == 10
