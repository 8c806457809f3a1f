"""Journal backup and restore (issue 12, item 5): real daemon, real simulated board on
a pty, real broker, real SQLite files, metalavctl as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway.backup import BackupSchedule, scheduled_backups, take_backup, verify_backup
from gateway.ctl import main as ctl_main
from gateway.journal import Alert, Journal

from .conftest import Store, wait_until

MACHINES = ("W1", "W2", "D1", "D2")


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.ctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _keys_in(journal_file: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{journal_file}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT execute_key FROM executions")}
    finally:
        conn.close()


def test_a_backup_under_load_restores_a_journal_that_refuses_every_key_it_holds(
    store: Store, tmp_path: Path
) -> None:
    tokens: dict[str, bytes] = {}
    stop = threading.Event()

    def steady_stream() -> None:
        n = 0
        while not stop.is_set():
            key = store.new_key()
            tokens[key] = store.cloud.sign(key, machine_id=MACHINES[n % len(MACHINES)])
            store.cloud.publish(tokens[key])
            n += 1
            stop.wait(0.02)

    stream = threading.Thread(target=steady_stream, name="commands")
    stream.start()
    try:
        wait_until(lambda: len(store.actuations()) >= 10, what="releases under way")
        backup = tmp_path / "journal-backup.db"
        taken = ctl("backup", str(backup), "--config", str(store.daemon.config_path), "--json")
        assert taken.returncode == 0, taken.stderr
        released_during = len(store.actuations())
        wait_until(lambda: len(store.actuations()) >= released_during + 5, what="releases go on")
    finally:
        stop.set()
        stream.join()
    for key in list(tokens):
        store.cloud.wait_for(key, final=True, timeout=20)

    info = verify_backup(backup, store.gateway_id)  # integrity_check, schema, gateway id
    in_backup = _keys_in(backup)
    assert json.loads(taken.stdout)["executions"] == info.executions == len(in_backup) > 0
    assert in_backup < set(tokens), "a snapshot: some keys came after it"

    # Restore refuses while the daemon holds the journal, and changes nothing.
    journal = store.workdir / "journal.db"
    before = journal.stat().st_ino
    refused = ctl(
        "restore", str(backup), "--reason", "teste", "--config", str(store.daemon.config_path)
    )
    assert refused.returncode == 4 and "pare o serviço" in refused.stderr
    assert "Traceback" not in refused.stderr and journal.stat().st_ino == before

    assert store.daemon.stop() == 0
    restored = ctl(
        "restore", str(backup), "--reason", "diário corrompido", "--by", "Ana",
        "--config", str(store.daemon.config_path), "--json",
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    kept = [Path(p) for p in json.loads(restored.stdout)["replaced"]]
    assert kept and all(p.exists() for p in kept), "the replaced journal is kept beside it"
    assert _keys_in(kept[0]) == set(tokens), "the kept file is the whole replaced journal"
    check = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        audit = check.execute(
            "SELECT actor, action, reason FROM audit_log ORDER BY id DESC LIMIT 1"
        ).fetchone()
    finally:
        check.close()
    assert tuple(audit) == ("Ana", "journal.restore", "diário corrompido")

    # Every command the backup knew, sent again: answered from the journal, never
    # sent to the board.
    store.daemon.start()
    store.daemon.wait_ready()
    # The restored outbox re-sends what the snapshot had not yet sent (the cloud
    # de-duplicates by event_id); let it drain so the answers below are the replays'.
    wait_until(lambda: (store.daemon.status() or {}).get("outbox_depth") == 0, what="outbox")
    actuations = len(store.actuations())
    answered = {
        key: sum(1 for r in store.cloud.results_for(key) if r["final"]) for key in in_backup
    }
    for key in sorted(in_backup):
        store.cloud.publish(tokens[key])
    for key in in_backup:
        store.cloud.wait_for(key, final=True, count=answered[key] + 1, timeout=20)
    assert len(store.actuations()) == actuations, "a replayed key reached the board again"


def test_restore_refuses_a_damaged_or_foreign_backup_and_touches_nothing(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(store.daemon.config_path)
    good = tmp_path / "good.db"
    assert ctl("backup", str(good), "--config", config).returncode == 0
    again = ctl("backup", str(good), "--config", config)
    assert again.returncode == 4 and "já existe" in again.stderr, "never overwrites"
    store.daemon.stop()
    journal = store.workdir / "journal.db"
    original = journal.read_bytes()

    foreign = tmp_path / "foreign.db"
    take_backup(journal, foreign, "another-gateway", now=0.0)
    damaged = tmp_path / "damaged.db"
    data = bytearray(good.read_bytes())
    data[4096:8192] = b"\xff" * 4096  # the second page: a table's b-tree
    damaged.write_bytes(bytes(data))
    plain_copy = tmp_path / "copy.db"
    plain_copy.write_bytes(original)
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("não é um banco\n")

    for path, says in (
        (foreign, "another-gateway"),
        (damaged, "corrompido"),
        (plain_copy, "não é um backup feito pelo gateway"),
        (not_sqlite, "não é um banco SQLite"),
        (tmp_path / "missing.db", "não encontrado"),
    ):
        # In process (metalavctl's own main), to keep the test short.
        code = ctl_main(["restore", str(path), "--reason", "teste", "--config", config])
        err = capsys.readouterr().err
        assert code == 4, (path, err)
        assert says in err and "nada foi alterado" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert journal.read_bytes() == original
    assert not list(store.workdir.glob("journal.db.replaced-*"))

    # No daemon to ask for a backup: one line, exit 3, no file left behind. (A real
    # process: httpcore leaks the socket of a refused unix connection, which the
    # suite's ResourceWarning-as-error would blame on this test.)
    none = ctl("backup", str(tmp_path / "none.db"), "--config", config)
    assert none.returncode == 3 and "o gateway não responde" in none.stderr
    assert len(none.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("none.db*"))

    # A usage error: one line, exit 2 (metalavctl never ends in argparse's SystemExit).
    assert ctl_main(["restore", str(good), "--config", config]) == 2
    assert "--reason" in capsys.readouterr().err


def test_the_daily_backup_keeps_only_the_newest(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    Journal(journal, "gw-1").close()
    now = [1_800_000_000.0]
    schedule = BackupSchedule(
        journal,
        tmp_path / "backups",
        "gw-1",
        keep=3,
        interval_s=86400,
        on_failure=lambda alert: None,
        clock=lambda: now[0],
    )
    assert schedule.due_in() == 0
    for _ in range(5):
        schedule.run_once()
        assert schedule.due_in() == 86400
        now[0] += 86400
    kept = scheduled_backups(tmp_path / "backups")
    assert [p.name for p in kept] == [
        "journal-20270117T080000Z.db",
        "journal-20270118T080000Z.db",
        "journal-20270119T080000Z.db",
    ]
    assert all(verify_backup(p, "gw-1").executions == 0 for p in kept)


def test_a_failed_daily_backup_raises_an_alert_and_the_daemon_goes_on(tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    Journal(journal, "gw-1").close()
    blocked = tmp_path / "backups"
    blocked.write_text("a file where the backup folder should be\n")
    alerts: list[Alert] = []

    async def scenario() -> None:
        failed = asyncio.Event()

        def on_failure(alert: Alert) -> None:
            alerts.append(alert)
            failed.set()

        schedule = BackupSchedule(
            journal, blocked, "gw-1", keep=3, interval_s=86400, on_failure=on_failure
        )
        schedule.STARTUP_DELAY_S = 0.0
        task = asyncio.create_task(schedule.run())
        async with asyncio.timeout(10):
            await failed.wait()
        assert not task.done(), "the schedule keeps running (it retries in an hour)"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert [(a.code, a.severity) for a in alerts] == [("backup_failed", "warning")]
    assert alerts[0].detail
