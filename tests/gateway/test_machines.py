"""Issue 3 end to end: start confirmation, machine availability, technician actions
and board health, with the simulated board's machines and faults (real processes)."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from .conftest import Store, ctl


def washer(
    mid: str, channel: int, *, window: float = 1.5, grace: float = 10.0, debounce_ms: int = 30
) -> dict[str, Any]:
    return {
        "id": mid,
        "kind": "washer",
        "channel": channel,
        "busy_input": {"input": channel, "debounce_ms": debounce_ms},
        "confirm_window_s": window,
        "late_start_grace_s": grace,
        "cycles": {"normal": {"pulses": 2, "on_ms": 50, "off_ms": 50}},
    }


def dryer(mid: str, channel: int) -> dict[str, Any]:
    return {
        "id": mid,
        "kind": "dryer",
        "channel": channel,
        "busy_input": {"input": channel, "debounce_ms": 30},
        "confirm_window_s": 1.5,
        "cycles": {
            "40min": {
                "type": "dryer_time",
                "minutes": 40,
                "minutes_per_pulse": 10,
                "on_ms": 50,
                "off_ms": 50,
                "top_up": True,
            }
        },
    }


FAST = {"poll_ms": 50}




def start(store: Store) -> Store:
    store.daemon.start()
    store.daemon.wait_ready()
    return store


def test_release_then_start_then_completion_with_duration(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = start(
        store_factory(
            "--machine",
            "channel=1,input=1,start_ms=200,run_ms=700",
            machines=[washer("W1", 1)],
            board=FAST,
        )
    )
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key, machine_id="W1"))
    results = store.cloud.wait_for(key, state="completed", timeout=15)
    assert [r["state"] for r in results] == ["accepted", "released", "started", "completed"]
    assert [r["final"] for r in results] == [False, False, True, True]
    started = store.cloud.wait_event("cycles", type="cycle.started", execute_key=key)
    done = store.cloud.wait_event("cycles", type="cycle.completed", execute_key=key)
    assert started["machine_id"] == "W1"
    assert 0.5 <= done["duration_s"] <= 1.5  # 700 ms cycle, 50 ms sampling and debounce
    assert not store.cloud.events_of("compensation")


def test_machine_that_never_starts_ends_not_started_with_alert_and_compensation(
    store_factory,  # type: ignore[no-untyped-def]
) -> None:
    store = start(
        store_factory(
            "--machine", "channel=1,input=1,never_starts", machines=[washer("W1", 1)], board=FAST
        )
    )
    key = store.new_key()
    store.cloud.publish(
        store.cloud.sign(
            key, machine_id="W1", payment_id="pay-42", amount_cents=1500, provider_ref="stone-9"
        )
    )
    result = store.cloud.wait_for(key, state="not_started", timeout=10)[-1]
    assert result["final"] is True and result["compensation"] is True
    comp = store.cloud.wait_event("compensation", execute_key=key)
    result_fields = (result["amount_cents"], result["provider_ref"])
    assert result_fields == (1500, "stone-9")  # payment fields synced with results
    assert (comp["payment_id"], comp["amount_cents"], comp["provider_ref"]) == (
        "pay-42",
        1500,
        "stone-9",
    )
    alert = store.cloud.wait_event("alerts", code="not_started", execute_key=key)
    assert alert["severity"] == "critical" and alert["machine_id"] == "W1"
    assert len(store.actuations()) == 1  # released once, never re-pulsed


def test_late_start_corrects_not_started_and_raises_an_alert(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = start(
        store_factory(
            "--machine",
            "channel=1,input=1,late_ms=2500,run_ms=500",
            machines=[washer("W1", 1, window=1.0)],
            board=FAST,
        )
    )
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key, machine_id="W1"))
    store.cloud.wait_for(key, state="not_started", timeout=10)
    late = store.cloud.wait_for(key, state="started", timeout=10)[-1]
    assert late["reason"] == "late_start"
    store.cloud.wait_event("alerts", code="late_start", execute_key=key)
    store.cloud.wait_for(key, state="completed", timeout=10)


def test_busy_and_out_of_service_machines_refuse_releases_and_actions_are_audited(
    store_factory,  # type: ignore[no-untyped-def]
) -> None:
    store = start(
        store_factory(
            "--machine",
            "channel=1,input=1,start_ms=100,run_ms=4000",
            machines=[washer("W1", 1)],
            board=FAST,
        )
    )
    first, second = store.new_key(), store.new_key()
    store.cloud.publish(store.cloud.sign(first, machine_id="W1"))
    store.cloud.wait_for(first, state="started")
    store.cloud.publish(store.cloud.sign(second, machine_id="W1"))
    assert store.cloud.wait_for(second, state="rejected")[-1]["reason"] == "machine_busy"

    refused = ctl(store, "relay", "test", "W1", "--reason", "cliente reclamou")
    assert refused.returncode == 4 and "ocupada" in refused.stderr

    out = ctl(store, "machine", "out-of-service", "W1", "--reason", "vazamento", "--by", "Ana")
    assert out.returncode == 0, out.stderr
    store.cloud.wait_event("alerts", code="out_of_service", machine_id="W1")
    store.cloud.wait_for(first, state="completed", timeout=10)
    third = store.new_key()
    store.cloud.publish(store.cloud.sign(third, machine_id="W1"))
    assert store.cloud.wait_for(third, state="rejected")[-1]["reason"] == "out_of_service"

    machines = json.loads(ctl(store, "machines", "--json").stdout)["machines"]
    assert machines[0]["state"] == "out_of_service"
    assert machines[0]["out_of_service"]["set_by"] == "Ana"
    assert ctl(store, "machine", "in-service", "W1", "--reason", "consertado").returncode == 0

    audit = json.loads(ctl(store, "audit", "--json").stdout)["entries"]
    actions = [(e["action"], e["actor"], e["reason"], e["outcome"]) for e in reversed(audit)]
    assert actions[0][:2] == ("relay.test", audit[-1]["os_user"])
    assert actions[0][3] == "refused:machine_busy"
    assert ("machine.out_of_service", "Ana", "vazamento", "applied") in actions
    assert actions[-1][0] == "machine.in_service" and actions[-1][3] == "applied"
    assert all(e["os_user"] and e["at"] for e in audit)
    assert len(store.actuations()) == 1


def test_relay_test_is_a_technical_service_turn(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = start(
        store_factory(
            "--machine",
            "channel=1,input=1,start_ms=100,run_ms=300",
            machines=[washer("W1", 1)],
            board=FAST,
        )
    )
    result = ctl(store, "relay", "test", "W1", "--reason", "manutenção preventiva", "--json")
    assert result.returncode == 0, result.stderr
    key = json.loads(result.stdout)["execute_key"]
    store.cloud.wait_for(key, state="completed", timeout=10)
    details = store.daemon.execution(key)
    assert details is not None
    assert details["kind"] == "technical_service"
    assert "manutenção preventiva" in details["requested_by"]
    assert not store.cloud.events_of("compensation")  # never paid, never compensated


def test_dryer_top_up_is_accepted_while_the_dryer_runs(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = start(
        store_factory(
            "--machine",
            "channel=1,input=1,start_ms=100,run_ms=3000,minutes_per_pulse=10",
            machines=[dryer("D1", 1)],
            board=FAST,
        )
    )
    first, top_up = store.new_key(), store.new_key()
    store.cloud.publish(store.cloud.sign(first, machine_id="D1", cycle="40min"))
    store.cloud.wait_for(first, state="started")
    store.cloud.publish(store.cloud.sign(top_up, machine_id="D1", cycle="40min"))
    released = store.cloud.wait_for(top_up, state="released")[-1]
    assert released["final"] is True  # no start to wait for: the dryer is running
    assert [a["pulse_count"] for a in store.actuations()] == [4, 4]


def test_stuck_relay_raises_an_alert(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = start(
        store_factory("--stuck-relay", "2", machines=[washer("W1", 1), washer("W2", 2)], board=FAST)
    )
    alert = store.cloud.wait_event("alerts", code="stuck_relay")
    assert alert["machine_id"] == "W2" and alert["severity"] == "critical"
    machines = json.loads(ctl(store, "machines", "--json").stdout)["machines"]
    assert [m["stuck_relay"] for m in machines] == [False, True]


def test_usb_unplugged_and_back_loses_and_duplicates_nothing(store_factory) -> None:  # type: ignore[no-untyped-def]
    store = start(
        store_factory(
            "--machine",
            "channel=1,input=1,start_ms=100,run_ms=300",
            machines=[washer("W1", 1)],
            board={**FAST, "reconnect_s": 0.2},
        )
    )
    assert store.sim.proc is not None
    os.kill(store.sim.proc.pid, signal.SIGUSR1)  # unplugged
    store.cloud.wait_event("alerts", code="board_link_lost")
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key, machine_id="W1"))
    store.cloud.wait_for(key, state="accepted", final=False)
    time.sleep(0.5)
    os.kill(store.sim.proc.pid, signal.SIGUSR2)  # plugged back: a power-cycled board
    store.cloud.wait_event("alerts", code="board_link_restored")
    store.cloud.wait_event("alerts", code="board_rebooted")
    store.cloud.wait_for(key, state="completed", timeout=15)
    assert len(store.actuations()) == 1


def test_outputs_are_released_at_start_up_before_any_command(store_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    edges = tmp_path / "edges.jsonl"
    level = {
        "id": "W1",
        "kind": "washer",
        "channel": 1,
        "cycles": {"enable": {"type": "level", "hold_ms": 4000}},
    }
    store = start(
        store_factory("--time-scale", "1", "--edges", str(edges), machines=[level], board=FAST)
    )
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key, machine_id="W1", cycle="enable"))
    store.cloud.wait_for(key, state="released")
    store.daemon.kill9()  # dies with the enable contact held closed

    store.daemon.start()
    store.daemon.wait_ready()
    lines = [json.loads(line) for line in edges.read_text().splitlines()]
    on = next(e for e in lines if e["channel"] == 1 and e["state"] == "on")
    off = next(e for e in lines if e["channel"] == 1 and e["state"] == "off")
    assert off["monotonic"] - on["monotonic"] < 3.0, "the new daemon opened the contact"
    assert len(store.actuations()) == 1
