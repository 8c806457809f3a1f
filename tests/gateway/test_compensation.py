"""Promise 2, compensation: every authentic command is a confirmed payment, so every
authentic outcome in which the machine did not run carries compensation, on the wire
(the result's ``compensation`` flag) and as a ``payment.compensation`` event; a
technician's test turn and an unauthenticated message never do. Real daemon, real
board on a pty, real broker, a real HTTP server standing in for the cloud API."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cloud_sync.cloud_server import CloudServer

from .conftest import Store, wait_until
from .test_machines import FAST, ctl, start, washer

COMPENSATION_ALERT_PATH = "/api/payments/compensation/alert"


@pytest.fixture
def cloud_api() -> Iterator[CloudServer]:
    with CloudServer() as server:
        yield server


def _journal_rows(store: Store, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """Read the daemon's journal file as it is on disk (another connection: committed)."""
    db = sqlite3.connect(f"file:{store.workdir / 'journal.db'}?mode=ro", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def _compensation_alerts(cloud_api: CloudServer, key: str) -> list[dict[str, Any]]:
    return [
        r.body
        for r in list(cloud_api.requests)
        if r.path.endswith(COMPENSATION_ALERT_PATH) and r.body.get("execute_key") == key
    ]


def test_paid_rejection_is_compensated(store_factory, cloud_api: CloudServer) -> None:  # type: ignore[no-untyped-def]
    store: Store = start(
        store_factory(
            "--machine",
            "channel=1,input=1,start_ms=100,run_ms=30000",
            machines=[washer("W1", 1), washer("W2", 2)],
            board=FAST,
            sections={"cloud": {"base_url": cloud_api.base_url, "token": "t0k3n"}},
        )
    )
    cloud = store.cloud
    running = store.new_key()
    cloud.publish(cloud.sign(running, machine_id="W1"))
    cloud.wait_for(running, state="started")  # W1 is busy from now on
    out = ctl(store, "machine", "out-of-service", "W2", "--reason", "vazamento")
    assert out.returncode == 0, out.stderr

    refused = {  # reason -> (key, claims)
        "unknown_machine": (store.new_key(), {"machine_id": "W99"}),
        "unknown_cycle": (store.new_key(), {"machine_id": "W1", "cycle": "turbo"}),
        "machine_busy": (store.new_key(), {"machine_id": "W1"}),
        "out_of_service": (store.new_key(), {"machine_id": "W2"}),
    }
    tokens = {}
    for n, (reason, (key, claims)) in enumerate(refused.items()):
        tokens[key] = cloud.sign(
            key,
            payment_id=f"pay-{reason}",
            amount_cents=1000 + n,
            provider_ref=f"stone-{n}",
            idempotency_key=f"idem-{n}",
            **claims,
        )
        cloud.publish(tokens[key])

    for n, (reason, (key, claims)) in enumerate(refused.items()):
        result = cloud.wait_for(key, state="rejected")[-1]
        assert (result["reason"], result["final"], result["compensation"]) == (reason, True, True)
        assert result["authentic"] is True
        assert (result["payment_id"], result["amount_cents"], result["provider_ref"]) == (
            f"pay-{reason}",
            1000 + n,
            f"stone-{n}",
        )
        event = cloud.wait_event("compensation", execute_key=key)
        assert event["type"] == "payment.compensation"
        assert (event["reason"], event["payment_id"], event["machine_id"]) == (
            reason,
            f"pay-{reason}",
            claims["machine_id"],
        )
        assert (event["amount_cents"], event["provider_ref"], event["idempotency_key"]) == (
            1000 + n,
            f"stone-{n}",
            f"idem-{n}",
        )
        # The payments runbook's alert endpoint gets the very same event.
        alert = wait_until(lambda key=key: _compensation_alerts(cloud_api, key), what="HTTPS alert")
        assert alert[0]["event_id"] == event["event_id"]

    # A duplicate gets the stored result again, and no second compensation.
    for key in tokens:
        cloud.publish(tokens[key])
    for key in tokens:
        results = cloud.wait_for(key, state="rejected", count=2)
        assert results[-1] == results[-2], "the stored result, event_id and all"
    time.sleep(1.0)  # give a wrong second compensation the chance to go out
    for key in tokens:
        assert len(cloud.events_of("compensation", execute_key=key)) == 1
        assert len({a["event_id"] for a in _compensation_alerts(cloud_api, key)}) == 1
        assert _journal_rows(
            store, "SELECT count(*) FROM outbox WHERE stream = ? AND topic = 'compensation'", key
        ) == [(1,)]
    # The technician's reconciliation lists them as paid cycles that did not run.
    report = json.loads(ctl(store, "reconcile", "--since", "2020-01-01", "--json").stdout)
    waiting = {r["execute_key"]: r["state"] for r in report["awaiting_compensation"]}
    assert {k: waiting.get(k) for k in tokens} == dict.fromkeys(tokens, "rejected")
    assert running not in waiting
    assert len(store.actuations()) == 1  # only the first, paid and run, cycle


def test_technician_test_turn_is_never_compensated(store_factory) -> None:  # type: ignore[no-untyped-def]
    store: Store = start(
        store_factory(
            "--machine",
            "channel=1,input=1,never_starts",
            "--machine",
            "channel=2,input=2,start_ms=100,run_ms=30000",
            machines=[washer("W1", 1, window=0.5), washer("W2", 2)],
            board=FAST,
        )
    )
    # Run, and the machine never starts: for a paid cycle that is a compensation.
    ran = ctl(store, "relay", "test", "W1", "--reason", "não liga", "--json")
    assert ran.returncode == 0, ran.stderr
    not_started = json.loads(ran.stdout)["execute_key"]
    result = store.cloud.wait_for(not_started, state="not_started")[-1]
    assert (result["final"], result["compensation"]) == (True, False)
    assert result["payment_id"] == "technical-service"
    store.cloud.wait_event("alerts", code="not_started", execute_key=not_started)

    # Run, and the machine starts.
    ran = ctl(store, "relay", "test", "W2", "--reason", "preventiva", "--json")
    assert ran.returncode == 0, ran.stderr
    started = json.loads(ran.stdout)["execute_key"]
    store.cloud.wait_for(started, state="started")

    # Refused: nothing is journaled, nothing is reported, nothing is compensated.
    for args, code in (
        (("W2",), "machine_busy"),
        (("W9",), "unknown_machine"),
        (("W1", "--cycle", "turbo"), "unknown_cycle"),
    ):
        refused = ctl(store, "relay", "test", *args, "--reason", "teste")
        assert refused.returncode != 0, code
    audit = json.loads(ctl(store, "audit", "--json").stdout)["entries"]
    outcomes = [e["outcome"] for e in reversed(audit) if e["action"] == "relay.test"]
    assert outcomes == [
        "dispatched",
        "dispatched",
        "refused:machine_busy",
        "refused:unknown_machine",
        "refused:unknown_cycle",
    ]

    time.sleep(0.5)  # give a wrong compensation the chance to go out
    assert {r["execute_key"] for r in store.cloud.results} == {not_started, started}
    assert all(r["compensation"] is False for r in store.cloud.results)
    assert not store.cloud.events_of("compensation")
    assert _journal_rows(store, "SELECT count(*) FROM outbox WHERE topic = 'compensation'") == [
        (0,)
    ]
    report = json.loads(ctl(store, "reconcile", "--since", "2020-01-01", "--json").stdout)
    assert report["awaiting_compensation"] == []


def test_unreadable_token_is_answered_without_a_key_and_never_compensated(store: Store) -> None:
    unreadable = [
        b"",
        os.urandom(300),
        b'{"execute_key": "x", "machine_id": "W1"}',  # JSON, not a signed token
        b"eyJhbGciOiJFZERTQSJ9.bm90IGpzb24.c2ln",  # a JWS whose claims are not JSON
    ]
    for payload in unreadable:
        store.cloud.publish(payload)

    answers = store.cloud.wait_for(None, state="rejected", final=False, count=len(unreadable))  # type: ignore[arg-type]
    assert len(answers) == len(unreadable)
    for answer in answers:
        assert answer["type"] == "execution.result"
        assert answer["execute_key"] is None and answer["payment_id"] is None
        assert (answer["authentic"], answer["final"], answer["compensation"]) == (
            False,
            False,
            False,
        )
        assert (answer["reason"], answer["seq"]) == ("malformed", 0)
    assert len({a["event_id"] for a in answers}) == len(unreadable)

    # Logged for the technician, never journaled as an execution nor sent from the outbox.
    status = wait_until(
        lambda: (s := store.daemon.status()) and s["rejected_unauthenticated"] >= 4 and s
    )
    assert status["rejected_unauthenticated"] == len(unreadable)
    assert _journal_rows(store, "SELECT count(*) FROM executions") == [(0,)]
    assert _journal_rows(
        store, "SELECT count(*) FROM outbox WHERE topic IN ('results', 'compensation')"
    ) == [(0,)]
    assert not store.cloud.events_of("compensation")
    assert not store.actuations()
