"""Install, upgrade and automatic rollback (issue 10) with the real installer
(``python -m gateway.release``) into a temporary root: real venvs built from wheels of
this checkout, the real daemon, a real broker and the simulated board.

The newer release is this checkout with another version and one more migration, an
additive one, as the next release would have it. It reaches READY, migrates the
journal, releases a machine, and then dies inside its health window: the installer
must go back to the old release by itself, and the old release must run on the
migrated journal with every row, the newer release's included. Then the same upgrade
again with a release that fails to start at all (back at once, rows intact), and the
manual rollback both ways.

systemd cannot run here: ``--systemctl`` points at a stand-in with the same verbs
(restart, stop, is-active, enable, daemon-reload) that runs ``current``'s
``metalav-gateway run`` as systemd's ExecStart would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.broker import LocalBroker
from devtools.stack import CloudStandIn, DaemonProcess, SimulatorProcess, demo_config
from gateway.journal.schema import SCHEMA_VERSION
from tests.gateway.conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (
    "pyproject.toml", "README.md", "constraints.txt", "config.example.toml",
    "systemd", "gateway", "firmware_bridge", "cloud_sync",
)
NEW_VERSION = "99.0.0"
# Appended to the newer release's gateway/journal/schema.py, before SCHEMA_VERSION.
ADDITIVE_MIGRATION = '''

@additive
def _migration_upgrade_probe(db: sqlite_utils.Database) -> None:
    """Test release only: a new table, and a row in it written by the migration."""
    db["upgrade_probe"].create({"id": int, "note": str}, pk="id")  # type: ignore[union-attr]
    db["upgrade_probe"].insert({"note": "written by the newer release"})  # type: ignore[union-attr]


MIGRATIONS.append(_migration_upgrade_probe)
'''

FAKE_SYSTEMCTL = '''#!{python}
"""systemctl's verbs for metalav-gateway.service, in a temporary root."""
import os, signal, subprocess, sys, time
from pathlib import Path

ROOT, CONFIG, STATE = Path({root!r}), {config!r}, Path({state!r})
PIDFILE = STATE / "daemon.pid"


def alive(pid):
    try:
        stat = Path(f"/proc/{{pid}}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def pid():
    try:
        return int(PIDFILE.read_text())
    except (OSError, ValueError):
        return None


def stop():
    p = pid()
    if p and alive(p):
        os.kill(p, signal.SIGTERM)
        for _ in range(300):
            if not alive(p):
                break
            time.sleep(0.05)
        else:
            os.kill(p, signal.SIGKILL)
    PIDFILE.unlink(missing_ok=True)


def start():
    # FAKE_BROKEN_RELEASE: that release fails to start (here: a config it cannot read).
    current = Path(os.readlink(ROOT / "opt/metalav/current")).name
    config = "/nonexistent.toml" if current == os.environ.get("FAKE_BROKEN_RELEASE") else CONFIG
    with open(STATE / "daemon.log", "ab") as log:
        proc = subprocess.Popen(
            [str(ROOT / "opt/metalav/current/bin/metalav-gateway"), "run", "--config", config],
            stdout=log, stderr=log, start_new_session=True,
        )
    PIDFILE.write_text(str(proc.pid))


verb = sys.argv[1]
with open(STATE / "systemctl.log", "a") as journal:
    journal.write(f"{{time.time():.1f}} " + " ".join(sys.argv[1:]) + "\\n")
if verb == "restart":
    stop()
    start()
elif verb == "stop":
    stop()
elif verb == "is-active":
    up = (p := pid()) is not None and alive(p)
    print("active" if up else "inactive")
    sys.exit(0 if up else 3)
'''


def _copy_checkout(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _build_wheel(source: Path, out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=110,
    )
    (wheel,) = out.glob("metalav_gateway-*.whl")
    return wheel


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two wheels of this checkout (as is, and newer with an additive migration) and a
    wheelhouse of the locked dependencies, so that the venvs build offline."""
    base = tmp_path_factory.mktemp("releases")
    old_src = _copy_checkout(base / "old")
    new_src = _copy_checkout(base / "new")
    pyproject = new_src / "pyproject.toml"
    pyproject.write_text(
        re.sub(r'^version = ".*"$', f'version = "{NEW_VERSION}"', pyproject.read_text(), count=1,
               flags=re.M)
    )
    schema = new_src / "gateway/journal/schema.py"
    text = schema.read_text()
    anchor = "\nSCHEMA_VERSION = len(MIGRATIONS)"
    assert anchor in text
    schema.write_text(text.replace(anchor, ADDITIVE_MIGRATION + anchor, 1))
    # Kept across runs (gitignored): PyPI once, then offline.
    lock = (ROOT / "constraints.txt").read_bytes()
    wheelhouse = ROOT / ".wheelhouse" / hashlib.sha256(lock).hexdigest()[:16]
    if not (wheelhouse / ".complete").exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
             "--require-hashes", "-r", str(ROOT / "constraints.txt"), "-d", str(wheelhouse)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        (wheelhouse / ".complete").touch()
    return {
        "old_src": old_src,
        "new_src": new_src,
        "old_wheel": _build_wheel(old_src, base / "old-wheel"),
        "new_wheel": _build_wheel(new_src, base / "new-wheel"),
        "wheelhouse": wheelhouse,
    }


class Box:
    """A store box under a temporary root, driven by the real installer."""

    def __init__(self, tmp: Path, broker: LocalBroker) -> None:
        self.root = tmp / "root"
        self.work = tmp / "store"
        self.work.mkdir()
        self.config = self.root / "etc/metalav/gateway.toml"
        self.config.parent.mkdir(parents=True)
        self.gateway_id = f"gw-release-{os.getpid()}"
        self.cloud = CloudStandIn(broker.host, broker.port, self.gateway_id)
        self.sim = SimulatorProcess(self.work)  # started last: nothing below can leak it
        self.journal = self.root / "var/lib/metalav/journal.db"
        # The operator's config, written before the install: never overwritten.
        self.config.write_text(
            demo_config(
                self.work,
                gateway_id=self.gateway_id,
                mqtt_port=broker.port,
                public_key_pem=self.cloud.public_key_pem,
                board_port=self.sim.link,
                journal_path=self.journal,
            )
        )
        self.api = DaemonProcess(self.work, self.config)  # only its socket client is used
        self.systemctl = self.work / "systemctl"
        self.systemctl.write_text(
            FAKE_SYSTEMCTL.format(
                python=sys.executable, root=str(self.root), config=str(self.config),
                state=str(self.work),
            )
        )
        self.systemctl.chmod(0o755)
        self.sim.start()

    def release(self, *args: str) -> list[str]:
        return [
            sys.executable, "-m", "gateway.release", "--root", str(self.root),
            "--systemctl", str(self.systemctl), *args,
        ]

    def version(self) -> str | None:
        status = self.api.status()
        return None if status is None else str(status["daemon"]["version"])

    def release_once(self, key: str) -> None:
        self.cloud.publish(self.cloud.sign(key, machine_id="W1"))
        self.cloud.wait_for(key, state="released", timeout=20)

    def close(self) -> None:
        subprocess.run([str(self.systemctl), "stop", "metalav-gateway.service"], check=False)
        self.sim.stop()
        self.cloud.close()


@pytest.fixture
def box(tmp_path: Path, mqtt_broker: LocalBroker) -> Iterator[Box]:
    store = Box(tmp_path, mqtt_broker)
    try:
        yield store
    finally:
        store.close()


@pytest.mark.build
@pytest.mark.timeout(300)  # the first run on a machine also fills the wheelhouse
def test_failed_upgrade_rolls_back_by_itself_and_keeps_every_journal_row(
    box: Box, releases: dict[str, Path]
) -> None:
    # 1. The first install: the release, the layout, the service running it.
    first = subprocess.run(
        box.release(
            "install", "--source", str(releases["old_src"]), "--wheel", str(releases["old_wheel"]),
            "--wheelhouse", str(releases["wheelhouse"]), "--health-window", "1",
        ),
        capture_output=True, text=True, timeout=180,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    old_version = box.version()
    assert old_version is not None and old_version != NEW_VERSION
    assert os.readlink(box.root / "opt/metalav/current") == f"releases/{old_version}"
    assert "gateway.toml mantido como está" in first.stdout
    box.release_once("before-upgrade")

    # Idempotent: the same command again changes nothing and rebuilds nothing.
    again = subprocess.run(
        box.release(
            "install", "--source", str(releases["old_src"]), "--wheel", str(releases["old_wheel"]),
            "--wheelhouse", str(releases["wheelhouse"]),
        ),
        capture_output=True, text=True, timeout=60,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "já instalada" in again.stdout and "é a atual e está rodando" in again.stdout

    # 2. The upgrade, with a long health window: the newer release comes up...
    upgrade = subprocess.Popen(
        box.release(
            "install", "--source", str(releases["new_src"]), "--wheel", str(releases["new_wheel"]),
            "--wheelhouse", str(releases["wheelhouse"]), "--health-window", "60",
            "--rollback-window", "1",
        ),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert upgrade.stdout is not None
        seen = []
        for line in upgrade.stdout:  # until the installer has seen the new release READY
            seen.append(line)
            if f"versão {NEW_VERSION} READY" in line:
                break
        else:
            pytest.fail("".join(seen))
        assert box.version() == NEW_VERSION
        # ... migrates the journal, and releases a machine: rows only it wrote.
        box.release_once("during-upgrade")
        new_pid = box.api.status()["daemon"]["pid"]  # type: ignore[index]
        # 3. ... then dies inside its health window.
        os.kill(new_pid, signal.SIGKILL)
        out, _ = upgrade.communicate(timeout=120)
    finally:
        if upgrade.poll() is None:
            upgrade.kill()
            upgrade.communicate()
    out = "".join(seen) + out
    assert upgrade.returncode == 1, out
    assert "o serviço deixou de estar ativo" in out
    assert f"voltou para {old_version}" in out

    # 4. The old release runs again, on the journal the newer one migrated.
    assert os.readlink(box.root / "opt/metalav/current") == f"releases/{old_version}"
    wait_until(lambda: box.version() == old_version, what="the old release answering")
    conn = sqlite3.connect(f"file:{box.journal}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert conn.execute("SELECT note FROM upgrade_probe").fetchall() == [
            ("written by the newer release",)
        ]
    finally:
        conn.close()
    during = box.api.execution("during-upgrade")
    assert during is not None and during["state"] == "released", during
    before = box.api.execution("before-upgrade")
    assert before is not None and before["state"] == "released", before
    box.release_once("after-rollback")
    # Each command pulsed its machine exactly once, across the upgrade and the rollback.
    ids = [a.get("command_id") for a in box.sim.actuation_records()]
    assert len(ids) == 3 and len(set(ids)) == 3, ids
    assert list((box.root / "var/backups/metalav").glob(f"journal-*-before-{NEW_VERSION}.db"))

    status = subprocess.run(
        box.release("status", "--json"), capture_output=True, text=True, timeout=30, check=True
    )
    assert json.loads(status.stdout) == {
        "current": old_version,
        "previous": NEW_VERSION,
        "installed": sorted([old_version, NEW_VERSION]),
    }

    # 5. An upgrade whose release fails to start at all: back by itself, at once.
    failed_start = subprocess.run(
        box.release(
            "install", "--source", str(releases["new_src"]), "--wheel", str(releases["new_wheel"]),
            "--wheelhouse", str(releases["wheelhouse"]), "--health-window", "60",
            "--rollback-window", "1",
        ),
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "FAKE_BROKEN_RELEASE": NEW_VERSION},
    )
    assert failed_start.returncode == 1, failed_start.stdout + failed_start.stderr
    assert "antes do READY" in failed_start.stderr
    assert f"voltou para {old_version}" in failed_start.stderr
    assert box.version() == old_version
    assert box.api.execution("during-upgrade")["state"] == "released"  # type: ignore[index]

    # 6. Manual rollback is one command, both ways: forward to the newer release (now
    # healthy), then back to the previous one, each on the same journal.
    for target in (NEW_VERSION, old_version):
        back = subprocess.run(
            box.release("rollback", "--health-window", "1"),
            capture_output=True, text=True, timeout=120,
        )
        assert back.returncode == 0, back.stdout + back.stderr
        assert box.version() == target
        assert os.readlink(box.root / "opt/metalav/current") == f"releases/{target}"
    final = box.api.execution("during-upgrade")
    assert final is not None and final["state"] == "released", final
