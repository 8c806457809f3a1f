"""The gateway's own clock is not trusted blindly (issue 11 item 5): a Raspberry Pi has
no real-time clock. A real daemon runs with a simulated bad clock (the
``METALAV_TEST_CLOCK_FILE`` hook: the wall clock's offset and the kernel's sync flag)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cloud_sync.commands import ExecuteCommand
from gateway.clock import ClockWatch, TimePolicy, kernel_clock_synchronized

from .conftest import Store, wait_until
from .test_observability import OBSERVE_FAST, sample, scrape

HOUR = 3600


def _set_clock(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: the daemon never reads half a file


def test_an_unsynchronised_clock_never_expires_nor_refuses_and_jumps_raise_alerts(
    store_factory: Any, tmp_path: Path
) -> None:
    clock_file = tmp_path / "clock"
    _set_clock(clock_file, f"unsynced offset={2 * HOUR}")  # two hours ahead
    store: Store = store_factory(
        sections={
            **OBSERVE_FAST,
            "clock": {**OBSERVE_FAST["clock"], "sync_check": "kernel", "unsynced_alert_after_s": 0},
        }
    )
    store.daemon.start(METALAV_TEST_CLOCK_FILE=str(clock_file))
    store.daemon.wait_ready()
    cloud = store.cloud

    # Ahead: a trusted clock would find this fresh command expired and refund it.
    ahead = store.new_key()
    cloud.publish(cloud.sign(ahead, machine_id="W1"))
    cloud.wait_for(ahead, state="released")
    alert = cloud.wait_event("alerts", code="clock_unsynchronized")
    assert alert["severity"] == "warning"

    # Two hours behind now: a jump, and a trusted clock would refuse the command as
    # issued in the future.
    _set_clock(clock_file, f"unsynced offset={-2 * HOUR}")
    jump = cloud.wait_event("alerts", code="clock_jump")
    assert "-14400 s" in jump["detail"]
    behind = store.new_key()
    cloud.publish(cloud.sign(behind, machine_id="W2"))
    cloud.wait_for(behind, state="released")

    # Synchronised (the gateway trusts its clock again) yet still behind: the command
    # is refused as not yet valid, counted as time-related and never compensated.
    _set_clock(clock_file, f"synced offset={-2 * HOUR}")
    cloud.wait_event("alerts", code="clock_synchronized")
    refused = store.new_key()
    cloud.publish(cloud.sign(refused, machine_id="D1"))
    answer = cloud.wait_for(refused, state="rejected", final=False)[-1]
    assert (answer["reason"], answer["authentic"], answer["compensation"]) == (
        "not_yet_valid",
        False,
        False,
    )

    m = wait_until(lambda: (s := scrape(store)) and s, what="metrics")
    assert sample(m, "metalav_command_rejections_total", reason="not_yet_valid", kind="time") == 1
    assert not [
        k
        for k in m
        if k[0] == "metalav_command_rejections_total" and m[k] and (dict(k[1])["kind"] != "time")
    ]
    assert sample(m, "metalav_clock_jumps_total") >= 1
    assert sample(m, "metalav_executions_total", state="expired") == 0
    # Nothing was compensated because of the gateway's own clock.
    time.sleep(0.5)  # give a wrong compensation the chance to go out
    assert not cloud.events_of("compensation")
    assert len(store.actuations()) == 2  # the two commands an unsynced clock let through


def _command(iat: int, exp: int) -> ExecuteCommand:
    return ExecuteCommand("exec-1", "pay-1", "W1", "normal", issued_at=iat, expires_at=exp)


def test_untrusted_clock_gives_a_command_its_own_lifetime_from_arrival() -> None:
    cmd = _command(1_000, 1_300)  # a five-minute token, whatever our clock says
    own = TimePolicy.own_lifetime(cmd, now=50_000.0)
    assert own.expires_at == 50_300 and not own.is_expired(50_299.0)
    # A token with an absurd lifetime is held to an hour.
    assert TimePolicy.own_lifetime(_command(0, 10**9), now=10.0).expires_at == 10 + HOUR


class _Clocks:
    def __init__(self) -> None:
        self.wall, self.mono, self.synced = 1_000_000.0, 50.0, True

    def tick(self, seconds: float, *, wall_extra: float = 0.0) -> None:
        self.mono += seconds
        self.wall += seconds + wall_extra


def test_clock_watch_sees_jumps_both_ways_and_a_lasting_loss_of_sync() -> None:
    c = _Clocks()
    watch = ClockWatch(
        probe=lambda: c.synced,
        wall=lambda: c.wall,
        monotonic=lambda: c.mono,
        jump_threshold_s=5,
        unsynced_alert_after_s=60,
    )
    c.tick(5)
    assert watch.check() == [] and watch.trusted
    c.tick(5, wall_extra=4)  # NTP slewing a few seconds: not a jump
    assert watch.check() == []
    c.tick(5, wall_extra=-HOUR)
    [jump] = watch.check()
    assert (jump.code, jump.detail) == ("clock_jump", "wall clock moved -3600 s")
    assert watch.recent_jump(600) and watch.state().last_jump_s == -HOUR
    c.tick(5, wall_extra=30)
    assert [a.code for a in watch.check()] == ["clock_jump"]

    c.synced = False
    c.tick(5)
    assert watch.check() == [] and not watch.trusted  # lenient at once, alert later
    c.tick(61)
    assert [a.code for a in watch.check()] == ["clock_unsynchronized"]
    c.tick(5)
    assert watch.check() == []  # once
    c.synced = True
    c.tick(5)
    assert [a.code for a in watch.check()] == ["clock_synchronized"] and watch.trusted


def test_sync_check_off_trusts_the_clock_and_the_kernel_probe_answers() -> None:
    watch = ClockWatch(probe=None)
    assert watch.trusted and watch.check() == [] and watch.state().checked is False
    assert kernel_clock_synchronized() in (True, False)  # Linux: adjtimex(2) answers
