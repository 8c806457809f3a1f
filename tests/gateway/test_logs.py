"""Logs made for journald (issue 11 item 6): priorities, no timestamp of our own, the
execute_key on every line about an execution, and no personal data (promise 7)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from typing import Any

from cloud_sync.signing import generate_demo_keypair, sign_command
from gateway.logs import HumanFormatter, JournaldFormatter, redact, syslog_priority

from .conftest import Store

NAME = "Maria da Silva Souza"
PHONES = ("+55 11 98765-4321", "(11) 98765-4321", "11987654321")
CARDS = ("4111 1111 1111 1111", "5500-0000-0000-0004", "4111111111111111")
EMAIL = "maria.souza@example.com"
CPF = "123.456.789-09"
#: What must never reach a log line, in any form the inputs above could take.
NEEDLES = (
    "Silva",
    "Souza",
    "maria.souza",
    "example.com",
    "98765-4321",
    "987654321",
    "1111 1111",
    "4111111111111111",
    "0000-0000",
    "456.789",
)
FREE_TEXT = f"{NAME} {PHONES[0]} {CARDS[0]} {EMAIL} {CPF}"


def _record(msg: str, *args: Any, level: int = logging.INFO, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("gateway.intake", level, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_each_kind_of_personal_data_is_redacted() -> None:
    for text in (NAME, *PHONES, *CARDS, EMAIL, CPF, FREE_TEXT):
        out = redact(f"payment {text} refused")
        assert not any(n in out for n in NEEDLES), out
    # What the gateway logs stays readable: keys, ids, codes, counts, boot ids, times.
    for text in (
        "execution exec-7f3a9c2e01b84d55 accepted: payment pay-20261123-0042 machine W1",
        "board link up, boot id 1a2b3c4d",
        "board rebooted: boot id 12345678 -> 87654321",
        "command mid=12 not durable (JournalUnwritable); offered again in 0.5 s",
        "gateway gw-loja-042 started (journal /var/lib/metalav/journal.db, broker 10.0.0.5:1883)",
        "iat 1795456500 exp 1795456800",
    ):
        assert redact(text) == text


def test_journald_lines_carry_a_priority_and_no_timestamp_and_the_execute_key() -> None:
    fmt = JournaldFormatter()
    line = fmt.format(_record("execution %s released", "exec-1", level=logging.WARNING))
    assert line == "<4>gateway.intake: execution exec-1 released execute_key=exec-1"
    assert fmt.format(_record("link lost", level=logging.CRITICAL)).startswith("<2>")
    assert [syslog_priority(lv) for lv in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]
    keyed = fmt.format(_record("board did not answer", execute_key="exec-2", level=logging.ERROR))
    assert keyed == "<3>gateway.intake: board did not answer execute_key=exec-2"
    human = HumanFormatter().format(_record("execution %s started", "exec-3"))
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO gateway.intake: ", human)
    assert human.endswith("execute_key=exec-3")


def _ctl(store: Store, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.ctl", *args, "--socket", str(store.daemon.socket)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_no_personal_data_reaches_the_logs_of_a_real_daemon_run(store_factory: Any) -> None:
    store: Store = store_factory()
    log_file = store.daemon.log_path
    log_file.touch()
    st = os.stat(log_file)
    # stderr is "the journald stream": the daemon writes journald's format to it.
    store.daemon.start(METALAV_LOG_LEVEL="DEBUG", JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    store.daemon.wait_ready()
    cloud = store.cloud

    # Every free-text claim of a command, accepted, refused by the gateway, forged.
    paid = store.new_key()
    claims = {
        "payment_id": f"pay {NAME} {CPF}",
        "provider_ref": f"{PHONES[0]} {CARDS[0]}",
        "idempotency_key": EMAIL,
        "store_id": f"{NAME} {PHONES[1]}",
    }
    cloud.publish(cloud.sign(paid, machine_id="W1", **claims))
    cloud.wait_for(paid, state="released")
    unknown = store.new_key()
    cloud.publish(cloud.sign(unknown, machine_id=f"{NAME} {PHONES[2]}", **claims))
    cloud.wait_for(unknown, state="rejected")
    no_cycle = store.new_key()
    cloud.publish(cloud.sign(no_cycle, machine_id="W2", cycle=f"{CARDS[1]} {EMAIL}"))
    cloud.wait_for(no_cycle, state="rejected")
    forger, _ = generate_demo_keypair()
    forged = store.new_key()
    cloud.publish(
        sign_command(
            forger,
            execute_key=forged,
            audience=store.gateway_id,
            machine_id=FREE_TEXT,
            cycle=FREE_TEXT,
            **claims,
        )
    )
    cloud.wait_for(forged, state="rejected", final=False)
    garbage = f"{FREE_TEXT}.{FREE_TEXT}.{FREE_TEXT}".encode()
    cloud.publish(garbage)
    # The local API: reasons, names, machine ids.
    for args in (
        ("relay", "test", "W2", "--reason", FREE_TEXT, "--by", NAME),
        ("relay", "test", FREE_TEXT, "--reason", FREE_TEXT, "--by", EMAIL),
        ("relay", "test", "W1", "--cycle", FREE_TEXT, "--reason", NAME, "--by", NAME),
        ("machine", "out-of-service", "D1", "--reason", FREE_TEXT, "--by", PHONES[2]),
        ("machine", "in-service", NAME, "--reason", CARDS[2], "--by", CPF),
        ("breakers", "reset", NAME, "--reason", FREE_TEXT, "--by", NAME),
        ("dlq", "retry", "--all", "--reason", FREE_TEXT, "--by", NAME),
        ("dlq", "archive", "1", "--reason", FREE_TEXT, "--by", EMAIL),
        ("cleanup", "--days", "30", "--reason", FREE_TEXT, "--by", PHONES[1]),
        ("execution", FREE_TEXT),
    ):
        _ctl(store, *args)
    last = store.new_key()
    cloud.publish(cloud.sign(last, machine_id="D2"))
    cloud.wait_for(last, state="released")  # everything before it was handled
    assert store.daemon.stop() == 0

    text = log_file.read_text()
    lines = text.splitlines()
    assert len(lines) > 10
    leaks = [line for line in lines if any(n in line for n in NEEDLES)]
    assert not leaks, leaks
    # journald's format: a priority on every line, no timestamp of our own.
    assert all(re.match(r"^<[0-7]>", line) for line in lines), lines[:5]
    assert not [line for line in lines if re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line)]
    assert any(line.startswith("<4>") for line in lines)  # the warnings show with -p warning
    # Every line about an execution names its key as a field.
    about = [line for line in lines if f"execution {paid}" in line]
    assert about and all(line.endswith(f"execute_key={paid}") for line in about)
