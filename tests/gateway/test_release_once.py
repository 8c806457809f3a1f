"""Promises 1-4 end to end: real daemon process, real pty board, real broker."""

from __future__ import annotations

import os
import signal
import time

import pytest

from cloud_sync.signing import generate_demo_keypair, sign_command

from .conftest import Store, wait_until


def test_one_command_releases_exactly_once_and_reports_it(store: Store) -> None:
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key, machine_id="W2", cycle="pesado"))

    results = store.cloud.wait_for(key, state="released")
    assert [r["state"] for r in results] == ["accepted", "released"]
    assert [r["seq"] for r in results] == [1, 2]
    assert results[-1]["final"] is True and results[-1]["compensation"] is False
    assert len({r["event_id"] for r in results}) == 2

    acts = store.actuations()
    assert len(acts) == 1
    assert (acts[0]["channel"], acts[0]["pulse_count"]) == (2, 2)  # W2's "pesado" program
    row = store.daemon.execution(key)
    assert row is not None and row["state"] == "released"
    assert [h["state"] for h in row["history"]] == ["accepted", "dispatching", "released"]
    # Every result event left the outbox only after the broker acknowledged it.
    wait_until(
        lambda: all(o["state"] == "sent" for o in store.daemon.execution(key)["outbox"]),
        what="outbox sent",
    )


def test_duplicate_command_never_pulses_twice_even_across_restart(store: Store) -> None:
    key = store.new_key()
    token = store.cloud.sign(key)
    store.cloud.publish(token)
    released = store.cloud.wait_for(key, state="released")[-1]

    for _ in range(20):
        store.cloud.publish(token)
    results = store.cloud.wait_for(key, state="released", count=21)
    duplicates = [r for r in results if r["state"] == "released"][1:]
    assert len(duplicates) == 20
    assert all(r == released for r in duplicates), "every duplicate gets the stored result"

    store.daemon.stop()
    store.daemon.start()
    store.daemon.wait_ready()
    store.cloud.publish(token)
    store.cloud.wait_for(key, state="released", count=22)
    assert len(store.actuations()) == 1


def test_bad_commands_never_release_and_daemon_keeps_running(store: Store) -> None:
    cloud = store.cloud
    other_private, _ = generate_demo_keypair()
    expired, forged, wrong_aud, unknown_machine, unknown_cycle = (store.new_key() for _ in range(5))
    cloud.publish(cloud.sign(expired, ttl_s=60, now=time.time() - 120))
    cloud.publish(
        sign_command(
            other_private,
            execute_key=forged,
            audience=store.gateway_id,
            payment_id="p",
            machine_id="W1",
            cycle="normal",
        )
    )
    cloud.publish(cloud.sign(wrong_aud, audience="some-other-gateway"))
    cloud.publish(cloud.sign(unknown_machine, machine_id="W99"))
    cloud.publish(cloud.sign(unknown_cycle, cycle="turbo"))
    cloud.publish(b'{"execute_key": "x", "machine_id": "W1"}')  # JSON, not a signed token
    cloud.publish(os.urandom(300))
    cloud.publish(b"")
    stale = store.new_key()  # expired before the retention period: maybe a replay
    cloud.publish(cloud.sign(stale, ttl_s=60, now=time.time() - 40 * 86400))

    expected = {
        expired: ("expired", "command_expired", True),
        forged: ("rejected", "bad_signature", False),
        wrong_aud: ("rejected", "wrong_audience", False),
        unknown_machine: ("rejected", "unknown_machine", True),
        unknown_cycle: ("rejected", "unknown_cycle", True),
        stale: ("rejected", "stale_command", False),
    }
    for key, (state, reason, final) in expected.items():
        r = cloud.wait_for(key, state=state, final=final)[-1]
        assert (r["reason"], r["final"]) == (reason, final), key

    # The unauthenticated ones are not journaled under their key (a forger must not be
    # able to block the real command); the authentic refusals are.
    assert store.daemon.execution(forged) is None
    assert store.daemon.execution(wrong_aud) is None
    assert store.daemon.execution(stale) is None  # never journaled, never compensated
    assert store.daemon.execution(unknown_machine)["state"] == "rejected"  # type: ignore[index]
    status = wait_until(
        lambda: (s := store.daemon.status()) and s["rejected_unauthenticated"] >= 5 and s
    )
    assert status["daemon"]["up"] is True

    # Still alive and still releasing.
    good = store.new_key()
    cloud.publish(cloud.sign(good))
    cloud.wait_for(good, state="released")
    assert [a["command_id"] for a in store.actuations()] == [store.actuations()[0]["command_id"]]
    assert len(store.actuations()) == 1


@pytest.mark.parametrize(
    ("kill_at", "reboot_board", "final_state", "pulses"),
    [
        ("after_dispatching_commit", False, "released", 1),  # (a)
        ("after_board_ack", False, "released", 1),  # (b)
        ("after_board_ack", True, "needs_review", 1),  # (c)
        ("after_dispatching_commit", True, "needs_review", 0),
    ],
)
def test_sigkill_during_dispatch_never_double_releases(
    store_factory,
    kill_at: str,
    reboot_board: bool,
    final_state: str,
    pulses: int,  # type: ignore[no-untyped-def]
) -> None:
    store: Store = store_factory()
    store.daemon.start(METALAV_TEST_KILL_AT=kill_at)
    store.daemon.wait_ready()
    key = store.new_key()
    token = store.cloud.sign(key)
    store.cloud.publish(token)
    assert store.daemon.wait_exit() == -signal.SIGKILL
    assert len(store.actuations()) == (1 if kill_at == "after_board_ack" else 0)

    if reboot_board:
        store.sim.reboot()
    store.daemon.start()  # no fault this time
    store.daemon.wait_ready()
    store.cloud.publish(token)  # the cloud keeps re-sending until it sees a result

    result = store.cloud.wait_for(key, state=final_state)[-1]
    assert result["final"] is True
    assert result["compensation"] is (final_state == "needs_review")
    time.sleep(0.5)  # give a wrong second release the chance to happen
    assert len(store.actuations()) == pulses
    assert store.daemon.execution(key)["state"] == final_state  # type: ignore[index]


def test_release_survives_a_lost_ack_on_the_serial_line(store_factory) -> None:  # type: ignore[no-untyped-def]
    store: Store = store_factory("--drop-release-acks", "1")
    store.daemon.start()
    store.daemon.wait_ready()
    key = store.new_key()
    store.cloud.publish(store.cloud.sign(key))
    result = store.cloud.wait_for(key, state="released")[-1]
    assert result["reason"] == "board_duplicate_ack"
    assert len(store.actuations()) == 1


@pytest.mark.broker_semantics
def test_commands_sent_while_offline_arrive_and_expired_ones_end_expired(store: Store) -> None:
    store.daemon.stop()
    short, long = store.new_key(), store.new_key()
    store.cloud.publish(store.cloud.sign(short, machine_id="W1", ttl_s=1))
    store.cloud.publish(store.cloud.sign(long, machine_id="W2", ttl_s=300))
    time.sleep(1.5)
    store.daemon.start()
    store.daemon.wait_ready()
    assert store.cloud.wait_for(short, state="expired")[-1]["compensation"] is True
    store.cloud.wait_for(long, state="released")
    assert [a["channel"] for a in store.actuations()] == [2]


def test_busy_machine_rejects_a_second_payment_while_the_first_is_open(store_factory) -> None:  # type: ignore[no-untyped-def]
    # The board is absent, so the first execution waits (accepted) for it.
    store: Store = store_factory()
    store.sim.stop()
    store.daemon.start()
    wait_until(
        lambda: (s := store.daemon.status()) and s["broker"]["connected"], what="broker link"
    )
    first, second = store.new_key(), store.new_key()
    store.cloud.publish(store.cloud.sign(first, machine_id="W1"))
    store.cloud.wait_for(first, state="accepted", final=False)
    store.cloud.publish(store.cloud.sign(second, machine_id="W1"))
    assert store.cloud.wait_for(second, state="rejected")[-1]["reason"] == "machine_busy"

    store.sim.start()  # the board comes back: the waiting execution is released
    store.cloud.wait_for(first, state="released", timeout=15)
    assert len(store.actuations()) == 1
