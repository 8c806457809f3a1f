"""The technician's toolbox (issue 12, items 1, 2, 3, 7): resolve, reprocess, lookups,
the store-wide pause and the operation record, through metalavctl against a running
daemon over its real socket, with the simulated board counting actuations."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from devtools.core_rig import CoreRig
from firmware_bridge.simulator import SimulatedBoard
from gateway.events import iso_utc
from gateway.journal import DispatchStamp, Journal, Refused
from gateway.lifecycle import ExecutionState
from tests.rows import new_execution

from .conftest import Store, ctl
from .test_api import ctl as ctl_as
from .test_api import operator_account  # noqa: F401


def ctl_json(store: Store, *args: str) -> Any:
    done = ctl(store, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _one_line_error(done: subprocess.CompletedProcess[str], code: int) -> None:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def _needs_review(store: Store) -> str:
    """A release in doubt the board cannot settle: the daemon is killed right after
    journaling ``dispatching`` and the board resets before it comes back."""
    store.daemon.start(METALAV_TEST_KILL_AT="after_dispatching_commit")
    store.daemon.wait_ready()
    key = store.new_key()
    token = store.cloud.sign(key, machine_id="W2", provider_ref=f"pi-{key}")
    store.cloud.publish(token)
    assert store.daemon.wait_exit() == -signal.SIGKILL
    store.sim.reboot()
    store.daemon.start()
    store.daemon.wait_ready()
    store.cloud.publish(token)
    store.cloud.wait_for(key, state="needs_review")
    return key


def test_resolve_and_reprocess_never_produce_a_second_actuation_whatever_the_state(
    store_factory,  # type: ignore[no-untyped-def]
) -> None:
    store: Store = store_factory()
    review = _needs_review(store)
    released = store.new_key()
    store.cloud.publish(store.cloud.sign(released, machine_id="W1"))
    store.cloud.wait_for(released, state="released")
    assert len(store.actuations()) == 1

    # A released execution: its result again, no pulse; nothing to resolve.
    done = ctl_json(store, "reprocess", released, "--reason", "cliente reclamou")
    assert (done["action"], done["state"]) == ("result_resent", "released")
    store.cloud.wait_for(released, state="released", count=2)
    _one_line_error(ctl(store, "resolve", released, "--decision", "released", "--reason", "x"), 4)

    # needs_review: reprocess only re-sends; resolve ends it, with compensation.
    human = ctl(store, "reprocess", review, "--reason", "suporte pediu")
    assert human.returncode == 0, human.stderr
    assert "metalavctl resolve" in human.stdout
    done = ctl_json(
        store, "resolve", review, "--decision", "not_released", "--reason", "máquina parada"
    )
    assert (done["state"], done["reason"]) == ("failed", "technician_not_released")
    result = store.cloud.wait_for(review, state="failed")[-1]
    assert result["final"] is True and result["compensation"] is True
    store.cloud.wait_event("compensation", execute_key=review)

    # Failed by a person's decision, not a NACK: never dispatched again.
    done = ctl_json(store, "reprocess", review, "--reason", "de novo")
    assert done["action"] == "result_resent"
    _one_line_error(
        ctl(store, "resolve", review, "--decision", "released", "--reason", "mudei de ideia"), 4
    )
    # Unknown key: one line, exit 1, in both modes.
    _one_line_error(ctl(store, "reprocess", "no-such-key", "--reason", "x"), 1)
    missing = ctl(
        store, "resolve", "no-such-key", "--decision", "released", "--reason", "x", "--json"
    )
    assert missing.returncode == 1 and json.loads(missing.stdout)["error"] == "not_found"

    time.sleep(0.5)  # room for a wrong pulse to show up at the board
    assert len(store.actuations()) == 1
    history = store.daemon.execution(review)["history"]  # type: ignore[index]
    assert [h["state"] for h in history][-2:] == ["needs_review", "failed"]

    # Every one of those decisions is in the operation record, with its decision.
    log = ctl_json(store, "log")["entries"]
    resolves = [e for e in log if e["action"] == "execution.resolve"]
    assert {e["outcome"] for e in resolves} == {"applied", "refused:not_needs_review"} | {
        "refused:not_found"
    }
    applied = next(e for e in resolves if e["outcome"] == "applied")
    assert applied["decision"] == "not_released"
    assert applied["before"] == {"state": "needs_review"}
    assert applied["config_version"].startswith("sha256:")
    human = ctl(store, "log")
    assert human.returncode == 0 and "decisão: not_released" in human.stdout


def test_a_needs_review_the_technician_saw_run_ends_released_without_compensation(
    store_factory,  # type: ignore[no-untyped-def]
) -> None:
    store: Store = store_factory()
    review = _needs_review(store)
    human = ctl(
        store, "resolve", review, "--decision", "released", "--reason", "girou", "--by", "Ana"
    )
    assert human.returncode == 0, human.stderr
    assert "liberada" in human.stdout
    result = store.cloud.wait_for(review, state="released")[-1]
    assert result["final"] is True and result["compensation"] is False
    assert store.cloud.events_of("compensation", execute_key=review) == []
    record = store.cloud.wait_event("operations", action="execution.resolve", actor="Ana")
    assert record["type"] == "operation.record" and record["decision"] == "released"
    assert store.actuations() == []
    # The audit tells the board's actuations from a technician's judgement.
    trail = ctl_json(store, "audit", "--provider-ref", f"pi-{review}")
    assert trail["actuations"] == 0
    assert [r["reason"] for r in trail["executions"][0]["results"]][-1] == "technician_released"


def test_lookups_by_payment_state_machine_and_provider_ref_and_the_duplicate_alert(
    store: Store,
) -> None:
    first, second = store.new_key(), store.new_key()
    claims = {"payment_id": "pay-dup-1", "provider_ref": "pi_123", "idempotency_key": "idem-9"}
    store.cloud.publish(store.cloud.sign(first, machine_id="W1", **claims))
    store.cloud.wait_for(first, state="released")
    store.cloud.publish(store.cloud.sign(second, machine_id="W2", **claims))
    store.cloud.wait_for(second, state="released")  # the release follows the command
    alert = store.cloud.wait_event("alerts", code="duplicate_payment")
    assert alert["execute_key"] == second and first in alert["detail"]

    by_payment = ctl_json(store, "execution", "--payment", "pay-dup-1")["executions"]
    assert [e["execute_key"] for e in by_payment] == [first, second]
    listed = ctl_json(store, "executions", "--state", "released", "--machine", "W2")
    assert [e["execute_key"] for e in listed["executions"]] == [second]
    page = ctl_json(store, "executions", "--limit", "1", "--since", "2000-01-01")
    assert page["total"] == 2 and len(page["executions"]) == 1
    assert ctl_json(store, "executions", "--until", "2000-01-01")["total"] == 0

    for flag, value in (("--provider-ref", "pi_123"), ("--idempotency-key", "idem-9")):
        trail = ctl_json(store, "audit", flag, value)
        assert trail["actuations"] == 2
        assert {r["state"] for e in trail["executions"] for r in e["results"]} >= {
            "accepted",
            "released",
        }
    human = ctl(store, "audit", "--provider-ref", "pi_123")
    assert human.returncode == 0 and "2 acionamento(s)" in human.stdout
    assert "ATENÇÃO" in human.stdout

    # Misuse: one line, non-zero, never a traceback; JSON with --json.
    _one_line_error(ctl(store, "executions", "--since", "ontem"), 2)
    bad = ctl(store, "executions", "--since", "31/12/2026", "--json")
    assert bad.returncode == 2 and json.loads(bad.stdout)["error"] == "bad_date"
    _one_line_error(ctl(store, "executions", "--state", "sumiu"), 2)
    _one_line_error(ctl(store, "execution", "--payment", "pay-none"), 1)
    _one_line_error(ctl(store, "audit", "--provider-ref", "pi_none"), 1)
    usage = ctl(store, "resolve", first, "--decision", "talvez", "--reason", "x", "--json")
    assert usage.returncode == 2 and json.loads(usage.stdout)["error"] == "usage"


def test_store_pause_refuses_new_releases_with_compensation_and_survives_a_restart(
    store: Store,
) -> None:
    done = ctl_json(store, "store", "pause", "--reason", "suspeita de duplicidade", "--by", "Ana")
    assert done["changed"] is True and done["paused"] is True
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key))
    result = store.cloud.wait_for(key, state="rejected")[-1]
    assert result["reason"] == "store_paused" and result["compensation"] is True
    store.cloud.wait_event("compensation", execute_key=key)
    store.cloud.wait_event("alerts", code="store_paused")

    store.daemon.stop()
    store.daemon.start()
    store.daemon.wait_ready()
    status = ctl(store, "status")
    assert "LOJA PAUSADA" in status.stdout and "suspeita de duplicidade" in status.stdout
    assert store.daemon.status()["store"]["paused"] is True  # type: ignore[index]
    assert ctl_json(store, "store", "pause", "--reason", "de novo")["changed"] is False

    ctl_json(store, "store", "resume", "--reason", "auditoria concluída")
    after = store.new_key()
    store.cloud.publish(store.cloud.sign(after))
    store.cloud.wait_for(after, state="released")
    assert len(store.actuations()) == 1
    records = [
        e["action"] for e in store.cloud.events_of("operations") if e["action"].startswith("store.")
    ]
    assert records == ["store.pause", "store.pause", "store.resume"]


def test_a_board_nack_the_cloud_has_not_heard_of_is_the_only_failure_sent_again(
    tmp_path: Path,
) -> None:
    """The rule of reprocess at the journal: a NACK proves nothing was pulsed, but once
    the cloud may have been told of the failure (compensation sent, or being sent) the
    release is never dispatched again; when it goes, the failure's events go with it."""
    journal = Journal(tmp_path / "j.db", "gw")
    now = time.time()
    audit = {"action": "execution.reprocess", "target": "", "actor": "Ana", "os_user": "root"}
    audit["reason"] = "placa voltou"
    keys = []
    for i in range(2):
        new = new_execution(f"k{i}", now=now, ttl_s=300, command_id=i + 1, payment_id=f"p{i}")
        journal.record(
            new, ExecutionState.DISPATCHING, reason=None, now=now, dispatch=DispatchStamp(7, 0, i)
        )
        assert journal.transition(
            new.execute_key,
            from_states=(ExecutionState.DISPATCHING,),
            to_state=ExecutionState.FAILED,
            reason="board_nack:channel_busy",
            now=now,
        )
        keys.append(new.execute_key)
    assert journal.never_reached_board("k0") == "board_nack:channel_busy"
    # k1's compensation reached the cloud: the customer is being refunded.
    journal._conn.execute(
        "UPDATE outbox SET state = 'sent', sent_at = ? WHERE stream = 'k1' AND topic = ?",
        (iso_utc(now), "compensation"),
    )
    try:
        journal.redispatch_failed("k1", DispatchStamp(7, 0, 5), now=now, audit=audit)
    except Refused as exc:
        assert exc.code == "cloud_already_told"
    else:
        raise AssertionError("a failure the cloud was told of was dispatched again")
    assert journal.get("k1").state == ExecutionState.FAILED  # type: ignore[union-attr]

    journal.redispatch_failed("k0", DispatchStamp(7, 0, 6), now=now, audit=audit)
    row = journal.get("k0")
    assert row is not None and row.state == ExecutionState.DISPATCHING and not row.in_doubt
    superseded = journal._conn.execute(
        "SELECT topic FROM outbox WHERE stream = 'k0' AND state = 'archived' ORDER BY id"
    ).fetchall()
    assert [r[0] for r in superseded] == ["results", "compensation"]
    # A second reprocess finds it dispatching: nothing more.
    assert journal.never_reached_board("k0") is None
    try:
        journal.redispatch_failed("k0", DispatchStamp(7, 0, 7), now=now, audit=audit)
    except Refused as exc:
        assert exc.code == "not_failed"
    outcomes = [e["outcome"] for e in journal.operation_log(since_iso=None, limit=10)]
    assert outcomes == ["refused:not_failed", "applied", "refused:cloud_already_told"]


def test_no_daemon_and_a_socket_without_permission_are_one_line_errors(
    tmp_path: Path,
    operator_account: str,  # noqa: F811  (the fixture of test_api)
) -> None:
    absent = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.ctl",
            "executions",
            "--json",
            "--socket",
            str(tmp_path / "absent.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert absent.returncode == 3 and json.loads(absent.stdout)["error"] == "unreachable"
    assert len(absent.stderr.strip().splitlines()) == 1

    # A live socket the account may not use (not in its group): said so, not "down".
    folder = Path(tempfile.mkdtemp(prefix="metalav-perm-"))
    listener = socket.socket(socket.AF_UNIX)
    try:
        folder.chmod(0o711)
        path = folder / "metalav.sock"
        listener.bind(str(path))
        listener.listen()
        path.chmod(0o660)
        refused = ctl_as(path, "status", "--json", user=operator_account)
        assert refused.returncode == 3, refused.stderr
        assert json.loads(refused.stdout)["error"] == "permission_denied"
        # That account runs without LANGUAGE: English, as it should.
        assert "no permission" in refused.stderr and "Traceback" not in refused.stderr
    finally:
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_dlq_retry_all_goes_in_small_batches_oldest_first(
    store_factory,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    journal_path = tmp_path / "journal.db"
    store: Store = store_factory(journal_path=journal_path)
    journal = Journal(journal_path, store.gateway_id)
    at = iso_utc(time.time())
    for i in range(5):
        journal._conn.execute(
            "INSERT INTO outbox(event_id, stream, topic, payload, state, attempts, created_at,"
            " updated_at, next_attempt_at) VALUES (?, 'alerts:board', 'alerts', '{}', 'dead',"
            " 10, ?, ?, 0)",
            (f"dead-{i}", at, at),
        )
    journal.close()
    store.daemon.start()
    store.daemon.wait_ready()
    dead = [i["id"] for i in ctl_json(store, "dlq", "list")["items"]]
    assert len(dead) == 5
    done = ctl_json(store, "dlq", "retry", "--all", "--limit", "2", "--reason", "lote 1")
    assert done["retried"] == dead[:2]
    assert [i["id"] for i in ctl_json(store, "dlq", "list")["items"]] == dead[2:]
    _one_line_error(ctl(store, "dlq", "retry", "--all", "--limit", "0", "--reason", "x"), 2)
    _one_line_error(ctl(store, "dlq", "retry", str(dead[2]), "--limit", "2", "--reason", "x"), 2)


def test_archived_items_refusals_and_audit_rows_are_pruned_by_age_never_what_is_owed(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    old, recent = "2020-01-01T00:00:00.000Z", iso_utc(time.time())
    for i, (state, archived_at) in enumerate(
        [("archived", old), ("archived", recent), ("dead", None), ("pending", None)]
    ):
        journal._conn.execute(
            "INSERT INTO outbox(event_id, stream, topic, payload, state, created_at, archived_at)"
            " VALUES (?, 's', 'alerts', '{}', ?, ?, ?)",
            (f"e{i}", state, old, archived_at),
        )
    journal._conn.execute(
        "INSERT INTO rejections(at, reason) VALUES (?, 'bad_signature'), (?, 'malformed')",
        (old, recent),
    )
    audit = {"target": "W1", "actor": "Ana", "os_user": "root", "reason": "teste"}
    journal.audit(action="relay.test", outcome="applied", now=1.6e9, **audit)  # 2020
    journal.audit(action="relay.test", outcome="applied", now=time.time(), **audit)
    cutoff = iso_utc(time.time() - 90 * 86400)

    # The 2020 audit row's operation record never reached the cloud: kept.
    removed = journal.prune_records(archived_before_iso=cutoff, records_before_iso=cutoff)
    assert removed == {"archived_events": 1, "refusals": 1, "audit_rows": 0}
    assert journal.rejection_count() == 1
    states = [r[0] for r in journal._conn.execute("SELECT state FROM outbox WHERE stream = 's'")]
    assert states == ["archived", "dead", "pending"]

    journal._conn.execute("UPDATE outbox SET state = 'sent' WHERE stream = 'operations'")
    removed = journal.prune_records(archived_before_iso=cutoff, records_before_iso=cutoff)
    assert removed["audit_rows"] == 1
    assert len(journal.operation_log(since_iso=None, limit=10)) == 1


def test_reprocess_sends_a_refused_release_once_when_the_cloud_was_not_told(
    tmp_path: Path,
) -> None:
    """In process, with no outbox dispatcher: the failure's events never leave, so the
    NACKed release may go to the board again, once, and its failure events go away."""
    machines = [
        {"id": "W1", "kind": "washer", "channel": 1, "cycles": {"normal": {"pulses": 1}}},
        {"id": "W3", "kind": "washer", "channel": 3, "cycles": {"normal": {"pulses": 1}}},
        {"id": "W4", "kind": "washer", "channel": 4, "cycles": {"normal": {"pulses": 1}}},
    ]
    board = SimulatedBoard(channels=2)

    async def scenario(rig: CoreRig) -> None:
        core = await rig.start()
        await rig.settle()
        await rig.command(rig.sign("k-nack", machine_id="W3"))
        await rig.settle()
        assert (rig.state("k-nack"), rig.reason("k-nack")) == ("failed", "board_nack:bad_channel")
        board.channels = 3  # the technician swapped the board for one with that relay

        who = {"actor": "Ana", "os_user": "root", "reason": "placa trocada"}
        assert core.operator.reprocess("k-nack", **who)["action"] == "redispatched"
        await rig.settle()
        assert rig.state("k-nack") == "released" and rig.pulses("k-nack") == 1
        for _ in range(2):  # idempotent: the stored result again, never the relay
            assert core.operator.reprocess("k-nack", **who)["action"] == "result_resent"
            await rig.settle()
        assert rig.pulses("k-nack") == 1
        events = rig._read(
            "SELECT group_concat(topic || ':' || state) FROM outbox WHERE stream = 'k-nack'"
        )[0].split(",")
        assert "compensation:archived" in events and "compensation:pending" not in events

        # Once the compensation went out, the refund stands: never sent to the board.
        await rig.command(rig.sign("k-told", machine_id="W4"))
        await rig.settle()
        assert rig.state("k-told") == "failed"
        core.journal._conn.execute(
            "UPDATE outbox SET state = 'sent' WHERE stream = 'k-told' AND topic = 'compensation'"
        )
        done = core.operator.reprocess("k-told", **who)
        assert (done["action"], done["not_redispatched"]) == ("result_resent", "cloud_already_told")
        await rig.settle()
        assert rig.state("k-told") == "failed" and rig.pulses("k-told") == 0

    run_rig(tmp_path, scenario, board=board, machines=machines)


def run_rig(tmp_path: Path, scenario: Any, **rig: Any) -> None:
    async def main() -> None:
        r = CoreRig(tmp_path, **rig)
        try:
            await scenario(r)
        finally:
            await r.stop()

    asyncio.run(asyncio.wait_for(main(), 30))
