"""The local API: a daemon removes only the socket it created (issue 7, item 5), and
the audit log knows which OS account acted, from the kernel (issue 7, item 7).
Real daemon processes, real unix sockets, real OS accounts."""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import gateway
from devtools.stack import DaemonProcess
from gateway.profiles import DEFAULT_GROUPS, Profile

from .conftest import Store, wait_until

TEST_OPERATOR = "metalav-test-op"


def test_a_stopping_daemon_never_deletes_a_socket_it_did_not_create(
    store: Store, tmp_path: Path
) -> None:
    # The instance lock keeps two daemons off one journal; two journals with one
    # socket path can still meet, and the one stopping must leave the other's socket.
    first_inode = store.daemon.socket.stat().st_ino
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = DaemonProcess(
        other_dir,
        store.daemon.config_path,
        env={
            "METALAV_JOURNAL__PATH": str(other_dir / "journal.db"),
            "METALAV_GATEWAY__ID": store.gateway_id + "-other",
            "METALAV_BOARD__PORT": str(other_dir / "no-board"),
        },
    )
    other.socket = store.daemon.socket
    other.start()
    try:
        assert other.proc is not None
        pid = other.proc.pid
        wait_until(
            lambda: (other.status() or {}).get("daemon", {}).get("pid") == pid,
            what=f"the second daemon on the shared socket\n{other.log_tail()}",
        )
        assert store.daemon.socket.stat().st_ino != first_inode

        assert store.daemon.stop() == 0
        assert store.daemon.socket.is_socket(), "the first daemon removed the other's socket"
        status = other.status()
        assert status is not None and status["daemon"]["pid"] == pid

        assert other.stop() == 0
        assert not store.daemon.socket.exists(), "a daemon removes its own socket"
    finally:
        other.stop()


def ctl(socket_path: Path, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """metalavctl as this test's account, or as ``user`` with only that user's group
    (none of root's), the way a technician in the socket's group runs it."""
    command = [sys.executable, "-m", "gateway.ctl", *args, "--socket", str(socket_path)]
    if user is None:
        return subprocess.run(command, capture_output=True, text=True, timeout=30)
    account = pwd.getpwnam(user)
    return subprocess.run(
        [_interpreter_for(user), *command[1:]],
        capture_output=True,
        text=True,
        timeout=30,
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
        cwd="/",
        env=_env_for_other_account(),
    )


def _env_for_other_account() -> dict[str, str]:
    # This checkout and the venv's libraries on the path: the venv's own interpreter
    # may live where another account cannot reach it (pyenv under /root).
    libraries = Path(httpx.__file__).resolve().parent.parent
    checkout = Path(gateway.__file__).resolve().parent.parent
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/",
        "PYTHONPATH": f"{checkout}{os.pathsep}{libraries}",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


@functools.cache
def _interpreter_for(user: str) -> str:
    """A Python of this very version (so the venv's compiled wheels load) that ``user``
    can run: the venv's own, else the system's."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    account = pwd.getpwnam(user)
    for candidate in (os.path.realpath(sys.executable), f"/usr/bin/python{version}"):
        try:
            probe = subprocess.run(
                [candidate, "-c", "import gateway.ctl, pydantic_core, httpx"],
                capture_output=True,
                timeout=30,
                user=account.pw_uid,
                group=account.pw_gid,
                extra_groups=[],
                cwd="/",
                env=_env_for_other_account(),
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate
    pytest.skip(f"no Python {version} that the account {user} can run with this venv")


def audit_entry(socket_path: Path, action: str, reason: str) -> dict[str, Any]:
    result = ctl(socket_path, "audit", "--json")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)["entries"]
    found = [e for e in entries if e["action"] == action and e["reason"] == reason]
    assert len(found) == 1, entries
    return found[0]  # type: ignore[no-any-return]


def test_an_operator_action_records_the_callers_os_account(store: Store) -> None:
    me = pwd.getpwuid(os.geteuid()).pw_name  # "root" in CI
    sock = store.daemon.socket
    done = ctl(sock, "machine", "out-of-service", "W1", "--reason", "vazamento")
    assert done.returncode == 0, done.stderr
    entry = audit_entry(sock, "machine.out_of_service", "vazamento")
    assert (entry["os_user"], entry["actor"]) == (me, me)

    done = ctl(sock, "machine", "in-service", "W1", "--reason", "consertado", "--by", "Ana")
    assert done.returncode == 0, done.stderr
    entry = audit_entry(sock, "machine.in_service", "consertado")
    assert (entry["os_user"], entry["actor"]) == (me, "Ana")


@pytest.fixture
def operator_account() -> str:
    """A throwaway system account standing for a technician (not root)."""
    if os.geteuid() != 0:
        pytest.skip("creating an OS account and running metalavctl as it needs root")
    try:
        pwd.getpwnam(TEST_OPERATOR)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                TEST_OPERATOR,
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
    # A technician of daily operation (gateway/profiles.py: the Operação profile).
    operation = DEFAULT_GROUPS[Profile.OPERACAO]
    subprocess.run(["groupadd", "--system", "-f", operation], check=True, timeout=30)
    subprocess.run(["usermod", "-aG", operation, TEST_OPERATOR], check=True, timeout=30)
    return TEST_OPERATOR


def test_a_technicians_own_account_is_audited_not_unknown(
    store_factory: Callable[..., Store], operator_account: str
) -> None:
    # The socket in a folder the account can traverse (pytest's tmp folders are root's
    # alone), reachable only once its group is the account's group, as in a store
    # where the socket's group is metalav-tech.
    folder = Path(tempfile.mkdtemp(prefix="metalav-api-"))
    try:
        folder.chmod(0o711)
        store = store_factory()
        sock = folder / "metalav.sock"
        store.daemon.socket = sock
        store.daemon.start(METALAV_API__SOCKET=str(sock))
        store.daemon.wait_ready()

        refused = ctl(sock, "status", user=operator_account)
        assert refused.returncode == 3, "outside the socket's group, no access"
        os.chown(sock, -1, pwd.getpwnam(operator_account).pw_gid)

        done = ctl(
            sock, "machine", "out-of-service", "W2", "--reason", "sem água", user=operator_account
        )
        assert done.returncode == 0, done.stderr
        entry = audit_entry(sock, "machine.out_of_service", "sem água")
        assert (entry["os_user"], entry["actor"]) == (operator_account, operator_account)

        done = ctl(
            sock,
            "machine",
            "in-service",
            "W2",
            "--reason",
            "água voltou",
            "--by",
            "Bia",
            user=operator_account,
        )
        assert done.returncode == 0, done.stderr
        entry = audit_entry(sock, "machine.in_service", "água voltou")
        assert (entry["os_user"], entry["actor"]) == (operator_account, "Bia")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
