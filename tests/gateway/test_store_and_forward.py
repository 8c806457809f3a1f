"""Issue 4 at the gateway: the journal-backed dispatcher with a real HTTP cloud on
loopback, the dead-letter queue, breakers, reconciliation and retention, driven
through metalavctl like a technician would."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cloud_sync.cloud_server import CloudServer

from .conftest import Store
from .test_machines import FAST, ctl, start, washer


@pytest.fixture
def cloud_api() -> Iterator[CloudServer]:
    with CloudServer() as server:
        yield server


def _never_starting_store(store_factory: Any, cloud_api: CloudServer) -> Store:
    store: Store = start(
        store_factory(
            "--machine",
            "channel=1,input=1,never_starts",
            "--machine",
            "channel=2,input=2,never_starts",
            machines=[washer("W1", 1, window=0.5), washer("W2", 2, window=0.5)],
            board=FAST,
            sections={
                "cloud": {"base_url": cloud_api.base_url, "token": "t0k3n"},
                "outbox": {"max_attempts": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.2},
            },
        )
    )
    return store


def _dead_items(store: Store, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        items = json.loads(ctl(store, "dlq", "list", "--json").stdout)["items"]
        if len(items) >= n:
            return items  # type: ignore[no-any-return]
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} dead items")


def test_a_rejected_compensation_goes_to_the_dlq_then_retry_delivers_and_archive_keeps(
    store_factory,
    cloud_api: CloudServer,  # type: ignore[no-untyped-def]
) -> None:
    cloud_api.mode = 422  # the cloud refuses: a 4xx is never retried
    cloud_api.error_body = {"error": "unknown_payment"}
    store = _never_starting_store(store_factory, cloud_api)
    first, second = store.new_key(), store.new_key()
    store.cloud.publish(store.cloud.sign(first, machine_id="W1"))
    store.cloud.publish(store.cloud.sign(second, machine_id="W2"))
    store.cloud.wait_for(first, state="not_started")
    store.cloud.wait_for(second, state="not_started")

    dead = _dead_items(store, 2)
    assert {d["topic"] for d in dead} == {"compensation"}
    assert all("422" in d["last_error"] for d in dead)
    assert "fila de mortos (DLQ): 2 evento(s)" in ctl(store, "status").stdout
    requests_while_dead = cloud_api.count("/compensation/alert")
    time.sleep(0.5)
    assert cloud_api.count("/compensation/alert") == requests_while_dead  # no retry storm

    by_stream = {d["stream"]: d["id"] for d in dead}
    shown = json.loads(ctl(store, "dlq", "show", str(by_stream[first]), "--json").stdout)
    assert shown["payload"]["payment_id"] == f"pay-{first}"
    assert shown["attempts_log"][-1]["outcome"] == "dead"

    archived = ctl(store, "dlq", "archive", str(by_stream[second]), "--reason", "pago em dinheiro")
    assert archived.returncode == 0, archived.stderr
    cloud_api.mode = "ok"
    retried = ctl(store, "dlq", "retry", "--all", "--reason", "nuvem corrigida", "--by", "Ana")
    assert retried.returncode == 0, retried.stderr

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alerts = [
            r.body
            for r in cloud_api.requests
            if r.path.endswith("/compensation/alert") and r.method == "POST"
        ]
        if any(b.get("execute_key") == first for b in alerts) and not _dead_or_pending(store):
            break
        time.sleep(0.1)
    delivered = {
        b.get("execute_key")
        for r in cloud_api.requests
        if r.path.endswith("/compensation/alert")
        for b in [r.body]
    }
    assert first in delivered
    listing = json.loads(ctl(store, "dlq", "list", "--archived", "--json").stdout)["items"]
    assert [(i["stream"], i["state"]) for i in listing] == [(second, "archived")]
    audit = json.loads(ctl(store, "audit", "--json").stdout)["entries"]
    assert {(e["action"], e["reason"]) for e in audit} >= {
        ("dlq.archive", "pago em dinheiro"),
        ("dlq.retry", "nuvem corrigida"),
    }


def _dead_or_pending(store: Store) -> int:
    status = store.daemon.status() or {}
    by_state = status.get("outbox", {}).get("by_state", {})
    return int(by_state.get("dead", 0) + by_state.get("pending", 0) + by_state.get("failed", 0))


def test_breakers_are_visible_and_a_reset_is_audited(
    store_factory,
    cloud_api: CloudServer,  # type: ignore[no-untyped-def]
) -> None:
    store = _never_starting_store(store_factory, cloud_api)
    listing = json.loads(ctl(store, "breakers", "--json").stdout)["breakers"]
    assert {b["name"]: b["state"] for b in listing} == {
        "mqtt": "closed",
        "https_events": "closed",
        "https_compensation": "closed",
    }
    reset = ctl(store, "breakers", "reset", "https_events", "--reason", "teste")
    assert reset.returncode == 0, reset.stderr
    unknown = ctl(store, "breakers", "reset", "nope", "--reason", "teste")
    assert unknown.returncode == 1 and "não existe" in unknown.stderr
    audit = json.loads(ctl(store, "audit", "--json").stdout)["entries"]
    entries = [(e["action"], e["target"], e["outcome"]) for e in reversed(audit)]
    assert entries[-2:] == [
        ("breaker.reset", "https_events", "applied"),
        ("breaker.reset", "nope", "refused:unknown"),  # refusals are recorded too
    ]


def test_reconcile_lists_what_awaits_compensation_and_cleanup_keeps_unacknowledged(
    store_factory,
    cloud_api: CloudServer,  # type: ignore[no-untyped-def]
) -> None:
    cloud_api.mode = 503  # the compensation endpoint is down: retried, not dead
    store = _never_starting_store(store_factory, cloud_api)
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key, machine_id="W1", payment_id="pay-rec"))
    store.cloud.wait_for(key, state="not_started")

    report = json.loads(ctl(store, "reconcile", "--since", "2020-01-01", "--json").stdout)
    waiting = {r["execute_key"]: r for r in report["awaiting_compensation"]}
    assert waiting[key]["payment_id"] == "pay-rec"
    assert waiting[key]["compensation_event"] in ("pending", "sending", "failed")
    assert key in {r["execute_key"] for r in report["not_acknowledged"]}
    human = ctl(store, "reconcile", "--since", "2020-01-01")
    assert "pay-rec" in human.stdout

    bad = ctl(store, "reconcile", "--since", "ontem")
    assert bad.returncode == 2 and "data inválida" in bad.stderr  # bad input: usage

    # Everything counts as "old" with --days 1 once the clock moves; here nothing is
    # older than a day, so cleanup removes nothing, and never the unacknowledged row.
    removed = json.loads(
        ctl(store, "cleanup", "--days", "1", "--reason", "rotina", "--json").stdout
    )["removed"]
    assert removed == {
        "executions": 0,
        "outbox_events": 0,
        "archived_events": 0,
        "refusals": 0,
        "audit_rows": 0,
    }
    assert store.daemon.execution(key) is not None


def test_an_event_in_flight_when_the_daemon_died_is_sent_again_at_once(store: Store) -> None:
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key))
    released = store.cloud.wait_for(key, state="released")[-1]
    store.daemon.stop()
    # As if the daemon had died between handing the event to the broker and its PUBACK.
    db = sqlite3.connect(store.workdir / "journal.db")
    with db:
        db.execute(
            "UPDATE outbox SET state = 'sending', sending_since = ? WHERE event_id = ?",
            (time.time(), released["event_id"]),
        )
    db.close()
    store.daemon.start()
    store.daemon.wait_ready()
    # Long before sending_timeout_s (300 s): nobody waits for that PUBACK any more.
    again = store.cloud.wait_for(key, state="released", count=2, timeout=10)
    assert [r["event_id"] for r in again if r["state"] == "released"] == [released["event_id"]] * 2
