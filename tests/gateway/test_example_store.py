"""Issue 3's "done means": the store of config.example.toml (4 washers, 4 dryers) runs
against the simulated board with faults enabled (scenarios/store-4x4.json), and every
paid cycle ends as started or as not_started with a compensation event."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .conftest import Store
from .test_machines import FAST, start

ROOT = Path(__file__).parents[2]


def example_machines() -> list[dict[str, Any]]:
    machines: list[dict[str, Any]] = tomllib.loads((ROOT / "config.example.toml").read_text())[
        "machines"
    ]
    for m in machines:
        m["confirm_window_s"] = 4.0  # the scenario runs machine time 400x faster
    return machines


def test_every_paid_cycle_of_the_example_store_starts_or_is_compensated(store_factory) -> None:  # type: ignore[no-untyped-def]
    machines = example_machines()
    store: Store = start(
        store_factory(
            "--scenario",
            str(ROOT / "scenarios" / "store-4x4.json"),
            machines=machines,
            board=FAST,
        )
    )
    keys = {}
    for m in machines:
        key = store.new_key()
        keys[key] = m["id"]
        store.cloud.publish(
            store.cloud.sign(key, machine_id=m["id"], cycle=next(iter(m["cycles"])))
        )

    outcomes = {}
    for key, machine_id in keys.items():
        final = store.cloud.wait_for(key, timeout=20)
        last = max(final, key=lambda r: r["seq"])
        outcomes[machine_id] = last["state"]
        if last["state"] == "not_started":
            comp = store.cloud.wait_event("compensation", execute_key=key)
            assert comp["machine_id"] == machine_id
        else:
            assert last["state"] in ("started", "completed"), (machine_id, final)
    assert outcomes["W2"] == "not_started"  # the scenario's machine that never starts
    assert sum(s in ("started", "completed") for s in outcomes.values()) == 7, outcomes
    command_ids = [a["command_id"] for a in store.actuations()]
    assert len(command_ids) == len(set(command_ids)) == 8
