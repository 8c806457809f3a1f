"""The installer's steps one by one, in process (tests/test_release.py runs the whole
installer through an upgrade and a rollback): what a rerun keeps, the online backup,
the journal check a rollback asks the previous release for, and refusals."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import pytest

from gateway import release
from gateway.journal import Journal
from gateway.journal.schema import SCHEMA_VERSION
from gateway.lifecycle import ExecutionState
from tests.rows import new_execution

ROOT = Path(__file__).resolve().parents[1]


def _record(journal: Journal, key: str) -> None:
    now = time.time()
    journal.record(
        new_execution(key, now=now),
        ExecutionState.ACCEPTED,
        reason=None,
        now=now,
    )


def test_the_config_is_written_once_and_never_overwritten(tmp_path: Path) -> None:
    layout = release.Layout(tmp_path)
    assert release._ensure_dirs_and_config(layout, ROOT) is True  # noqa: SLF001
    assert layout.config.read_text() == (ROOT / "config.example.toml").read_text()
    layout.config.write_text("# this Loja's own config\n")
    assert release._ensure_dirs_and_config(layout, ROOT) is False  # noqa: SLF001
    assert layout.config.read_text() == "# this Loja's own config\n"
    assert layout.config.stat().st_mode & 0o777 == 0o640
    assert layout.state.is_dir() and layout.backups.is_dir() and layout.releases.is_dir()


def test_the_journal_backup_is_taken_while_the_daemon_holds_it_open(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db", "gw")
    for n in range(20):
        _record(journal, f"k{n}")
    backup = release.backup_journal(journal.path, tmp_path, "before-9.9.9")
    assert backup is not None and "before-9.9.9" in backup.name
    _record(journal, "after-the-backup")  # the journal still writes
    journal.close()
    copy = sqlite3.connect(backup)
    try:
        assert copy.execute("SELECT count(*) FROM executions").fetchone()[0] == 20
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        copy.close()
    assert backup.stat().st_mode & 0o777 == 0o600


def test_no_journal_yet_means_no_backup(tmp_path: Path) -> None:
    assert release.backup_journal(tmp_path / "absent.db", tmp_path, "x") is None


def _journal_moved_on(path: Path, *, oldest_reader: int) -> None:
    """As a newer build would leave it: one version ahead, and its meta."""
    Journal(path, "gw").close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.execute("UPDATE schema_meta SET value = ? WHERE key = 'schema_version'",
                 (SCHEMA_VERSION + 1,))
    conn.execute("UPDATE schema_meta SET value = ? WHERE key = 'oldest_reader'", (oldest_reader,))
    conn.commit()
    conn.close()


def test_journal_check_lets_a_rollback_through_after_additive_migrations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "journal.db"
    _journal_moved_on(path, oldest_reader=SCHEMA_VERSION)
    assert release.main(["journal-check", str(path)]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer == {
        "journal_version": SCHEMA_VERSION + 1,
        "oldest_reader": SCHEMA_VERSION,
        "build_version": SCHEMA_VERSION,
        "can_run": True,
    }


def test_journal_check_stops_a_rollback_after_a_breaking_migration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "journal.db"
    _journal_moved_on(path, oldest_reader=SCHEMA_VERSION + 1)
    assert release.main(["journal-check", str(path)]) == 1
    assert json.loads(capsys.readouterr().out)["can_run"] is False


def test_rollback_without_a_previous_release_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert release.main(["--root", str(tmp_path), "rollback"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "não há versão anterior" in err and "Traceback" not in err


def test_install_from_a_folder_that_is_no_release_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = release.main(["--root", str(tmp_path / "root"), "install", "--source", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "constraints.txt não encontrado" in err
    assert not (tmp_path / "root").exists()  # refused before touching anything


def test_the_current_link_is_replaced_in_one_rename(tmp_path: Path) -> None:
    layout = release.Layout(tmp_path)
    layout.releases.mkdir(parents=True)
    release._switch(layout.current, "1.0.0")  # noqa: SLF001
    release._switch(layout.current, "1.1.0")  # noqa: SLF001
    assert layout.version_of(layout.current) == "1.1.0"
    assert sorted(p.name for p in layout.opt.iterdir()) == ["current", "releases"]  # no leftovers


def _systemctl_saying(tmp_path: Path, state: str) -> release.Systemctl:
    """A systemctl whose is-active always answers ``state``."""
    program = tmp_path / "systemctl"
    program.write_text(f"#!/bin/sh\necho {state}\n")
    program.chmod(0o755)
    return release.Systemctl(str(program))


def test_a_release_whose_unit_fails_before_ready_is_unhealthy_at_once(tmp_path: Path) -> None:
    layout = release.Layout(tmp_path)
    ok, why = release._healthy(  # noqa: SLF001
        layout, "9.9.9", _systemctl_saying(tmp_path, "failed"), window=60, ready_timeout=600
    )
    # Not "não ficou READY em 600 s": it did not sit out the timeout.
    assert not ok and why == "o serviço está failed antes do READY (não iniciado)"


def test_a_release_that_never_reaches_ready_is_unhealthy(tmp_path: Path) -> None:
    layout = release.Layout(tmp_path)
    ok, why = release._healthy(  # noqa: SLF001
        layout, "9.9.9", _systemctl_saying(tmp_path, "activating"), window=60, ready_timeout=1
    )
    assert not ok and why == "não ficou READY em 1 s (o serviço está activating)"


def test_the_lock_pins_every_dependency_within_what_pyproject_allows() -> None:
    # A dependency added to pyproject.toml without `scripts/lock.sh` fails here, not
    # in a store's `pip check` halfway through an upgrade.
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {
        canonicalize_name(name): version
        for name, version in re.findall(
            r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", (ROOT / "constraints.txt").read_text(), re.M
        )
    }
    wanted = [*project["dependencies"], *project["optional-dependencies"]["gpio"]]
    wrong = []
    for line in wanted:
        req = Requirement(line)
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None or not req.specifier.contains(pinned, prereleases=True):
            wrong.append(f"{req}: locked {pinned}")
    assert wrong == [], f"run scripts/lock.sh: {wrong}"


@pytest.mark.parametrize("target", ["../../etc", "9.9.9"])
def test_rollback_to_a_release_that_is_not_installed_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    assert release.main(["--root", str(tmp_path), "rollback", "--to", target]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ("não é uma versão" in err) if "/" in target else ("não está instalada" in err)


def test_the_installer_creates_the_groups_the_profiles_default_to() -> None:
    # release.py runs on the system's python3 before any venv: it cannot import
    # gateway.profiles (aiohttp), so the names are repeated there and bound here.
    from gateway.profiles import DEFAULT_GROUPS

    assert set(DEFAULT_GROUPS.values()) <= set(release.GROUPS)
    assert "metalav-tech" in release.GROUPS  # the unit's Group=, the socket's group
