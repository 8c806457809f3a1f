"""``metalav-release``: install, upgrade and roll back the gateway on a store box.

    metalav-release install [--source DIR] [--wheel FILE] [--wheelhouse DIR]
    metalav-release rollback [--to VERSION]
    metalav-release status

Layout (every path under ``--root``, default ``/``, so that tests install into a
temporary folder)::

    /opt/metalav/releases/<version>/   one venv per release, deps from constraints.txt
    /opt/metalav/current -> releases/<version>     what the unit runs
    /opt/metalav/previous -> releases/<version>    what a rollback goes back to
    /etc/metalav/gateway.toml          from config.example.toml if absent, never overwritten
    /etc/metalav/credentials/          secrets, root only (the unit's LoadCredential=)
    /var/lib/metalav/                  the journal
    /var/backups/metalav/              online copies of the journal, before each switch
    /etc/systemd/system/metalav-gateway.service
    /usr/local/bin/{metalavctl,metalav-release,metalav-gateway} -> current's

``install`` is idempotent: run again with the same release it only makes sure of the
accounts, folders, config, unit and service. With another release it is an upgrade:
an online backup of the journal (sqlite3's backup API, the daemon keeps running), the
new release installed beside the old, ``current`` switched, the service restarted,
and, unless the new release reaches READY (systemd says ``active``; ``Type=notify``
makes that READY) and stays healthy for ``--health-window`` seconds, ``current`` goes
back to the previous release by itself. Healthy: the unit stays active, the same
process keeps answering ``metalavctl status --json`` on the local socket with the
version installed. A rollback never restores the backup: the previous release runs on
the journal as the newer one left it, rows written since included, which the schema
allows when every newer migration is additive (gateway/journal/schema.py); the
previous release itself is asked first (``journal-check``), and a rollback it refuses
is not done.

This module imports only the standard library at the top: the first install runs it
with the system's python3 (``scripts/install.sh``), before any venv exists.

Messages to the person at the terminal are in Portuguese (the store's technicians);
``status --json`` and ``journal-check`` answer in JSON.

Exit status: 0 done (and healthy), 1 failed (after an upgrade that failed: rolled back),
2 bad usage, a config that check-config refuses, or a rollback the journal forbids.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Layout", "ReleaseError", "main"]

UNIT = "metalav-gateway.service"
SERVICE_USER = "metalav"
#: metalavctl users (the unit's Group=, the socket's group), and the permission
#: profiles Leitura / Operação / Gestor: gateway.profiles.DEFAULT_GROUPS, repeated
#: here because this module imports only the standard library (a test binds them).
GROUPS = ("metalav-tech", "metalav-leitura", "metalav-operacao", "metalav-gestor")
#: Serial adapters and the GPIO chip (the gpio group exists on Raspberry Pi OS only).
DEVICE_GROUPS = ("dialout", "gpio")
DEFAULT_HEALTH_WINDOW_S = 60.0
#: How long a restarted release may take to reach READY.
DEFAULT_READY_TIMEOUT_S = 90.0
POLL_S = 0.5
#: Status queries that may fail in a row (a busy daemon) before it counts as unhealthy.
STATUS_MISSES = 3
WHEEL_PREFIX = "metalav_gateway-"


class ReleaseError(Exception):
    """A step failed; the message is one line for the person at the terminal."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def opt(self) -> Path:
        return self.root / "opt/metalav"

    @property
    def releases(self) -> Path:
        return self.opt / "releases"

    @property
    def current(self) -> Path:
        return self.opt / "current"

    @property
    def previous(self) -> Path:
        return self.opt / "previous"

    @property
    def etc(self) -> Path:
        return self.root / "etc/metalav"

    @property
    def config(self) -> Path:
        return self.etc / "gateway.toml"

    @property
    def credentials(self) -> Path:
        return self.etc / "credentials"

    @property
    def state(self) -> Path:
        return self.root / "var/lib/metalav"

    @property
    def backups(self) -> Path:
        # Outside the daemon's state directory: its sandbox cannot write there, and
        # systemd does not hand it to the service user.
        return self.root / "var/backups/metalav"

    @property
    def bin(self) -> Path:
        return self.root / "usr/local/bin"

    @property
    def unit(self) -> Path:
        return self.root / "etc/systemd/system" / UNIT

    def release(self, version: str) -> Path:
        return self.releases / version

    def version_of(self, link: Path) -> str | None:
        if not link.is_symlink():
            return None
        return Path(os.readlink(link)).name

    @property
    def is_system(self) -> bool:
        return self.root.resolve() == Path("/")


def _say(message: str) -> None:
    print(f"metalav-release: {message}", flush=True)


def _run(cmd: list[str], what: str, *, quiet: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=quiet, text=True, check=False)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout or "").strip().splitlines()
        last = detail[-1] if detail else f"status {done.returncode}"
        raise ReleaseError(f"{what} falhou: {last}")
    return done


# -- the service manager ----------------------------------------------------------


class Systemctl:
    """systemd, through ``systemctl`` (or a stand-in with the same verbs: tests)."""

    def __init__(self, program: str) -> None:
        self.program = program

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.program, *args], capture_output=True, text=True, check=False)

    def must(self, *args: str) -> None:
        done = self(*args)
        if done.returncode != 0:
            raise ReleaseError(f"systemctl {' '.join(args)} falhou: {done.stderr.strip()}")

    def state(self) -> str:
        """``active``, ``activating`` (starting, or waiting to restart), ``failed``..."""
        return self("is-active", UNIT).stdout.strip() or "unknown"

    def is_active(self) -> bool:
        return self.state() == "active"


# -- steps ------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive(layout: Layout) -> Iterator[None]:
    """One release operation at a time on this box."""
    layout.opt.mkdir(parents=True, exist_ok=True)
    with open(layout.opt / ".release.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReleaseError("outro metalav-release está rodando; espere-o terminar", 2) from None
        yield


def _ensure_accounts(layout: Layout) -> None:
    if not layout.is_system:
        _say(f"raiz {layout.root}: usuário e grupos não alterados (as contas ficam em /)")
        return
    for group in GROUPS:
        if subprocess.run(["getent", "group", group], capture_output=True).returncode != 0:
            _run(["groupadd", "--system", group], f"groupadd {group}")
    extra = [
        g
        for g in DEVICE_GROUPS
        if subprocess.run(["getent", "group", g], capture_output=True).returncode == 0
    ]
    if subprocess.run(["getent", "passwd", SERVICE_USER], capture_output=True).returncode != 0:
        _run(
            [
                "useradd", "--system", "--home-dir", "/var/lib/metalav", "--no-create-home",
                "--shell", "/usr/sbin/nologin", "--gid", "metalav-tech",
                *(["--groups", ",".join(extra)] if extra else []), SERVICE_USER,
            ],
            f"useradd {SERVICE_USER}",
        )
    elif extra:
        _run(["usermod", "--append", "--groups", ",".join(extra), SERVICE_USER], "usermod")


def _chown(path: Path, user: str, group: str, mode: int, layout: Layout) -> None:
    path.chmod(mode)
    if layout.is_system:
        shutil.chown(path, user, group)


def _ensure_dirs_and_config(layout: Layout, source: Path) -> bool:
    """True when the config was just created (from the example: not this Loja's yet)."""
    for folder in (layout.releases, layout.etc, layout.state, layout.backups, layout.bin):
        folder.mkdir(parents=True, exist_ok=True)
    _chown(layout.etc, "root", "metalav-tech", 0o750, layout)
    _chown(layout.state, SERVICE_USER, "metalav-tech", 0o750, layout)
    _chown(layout.backups, "root", "root", 0o700, layout)
    # Secrets, one file each, handed to the daemon by the unit's LoadCredential=.
    layout.credentials.mkdir(exist_ok=True)
    _chown(layout.credentials, "root", "root", 0o700, layout)
    if layout.config.exists():
        _say(f"{layout.config} mantido como está")
        return False
    shutil.copyfile(source / "config.example.toml", layout.config)
    _chown(layout.config, "root", "metalav-tech", 0o640, layout)
    _say(f"{layout.config} criado a partir de config.example.toml")
    return True


def _ensure_commands(layout: Layout) -> None:
    """metalavctl and metalav-release on PATH, through ``current``."""
    for name in ("metalavctl", "metalav-release", "metalav-gateway"):
        link = layout.bin / name
        target = layout.current / "bin" / name
        if not (link.is_symlink() and Path(os.readlink(link)) == target):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(target)


def _ensure_unit(layout: Layout, source: Path, systemctl: Systemctl) -> None:
    shipped = (source / "systemd" / UNIT).read_bytes()
    layout.unit.parent.mkdir(parents=True, exist_ok=True)
    if not layout.unit.exists() or layout.unit.read_bytes() != shipped:
        layout.unit.write_bytes(shipped)
        layout.unit.chmod(0o644)
        systemctl.must("daemon-reload")
        _say(f"unit instalada: {layout.unit}")


def _build_wheel(source: Path, into: Path) -> Path:
    _say(f"construindo o wheel a partir de {source}")
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(into), str(source)],
        "construção do wheel",
    )
    wheels = sorted(into.glob(f"{WHEEL_PREFIX}*.whl"))
    if not wheels:
        raise ReleaseError(f"nenhum {WHEEL_PREFIX}*.whl construído a partir de {source}")
    return wheels[-1]


def _wheel_version(wheel: Path) -> str:
    name = wheel.name
    if not (name.startswith(WHEEL_PREFIX) and name.endswith(".whl")):
        raise ReleaseError(f"{wheel}: não é um wheel do metalav-gateway", 2)
    return name[len(WHEEL_PREFIX) :].split("-")[0]


def _install_release(
    layout: Layout, version: str, wheel: Path, constraints: Path, wheelhouse: Path | None
) -> Path:
    """The venv of ``version``; built once (a marker file says it is complete)."""
    target = layout.release(version)
    marker = target / ".installed"
    if marker.exists():
        _say(f"versão {version} já instalada em {target}")
        return target
    if target.exists():
        shutil.rmtree(target)  # a half-built venv from an interrupted install
    _say(f"instalando a versão {version} em {target}")
    # No pip inside: this pip installs into it (--python), which saves ensurepip's
    # seconds per release and keeps the release to what the lock names.
    _run([sys.executable, "-m", "venv", "--without-pip", str(target)], "criação do venv")
    pip = [sys.executable, "-m", "pip", "--python", str(target / "bin/python")]
    install = [*pip, "install", "-q", "--disable-pip-version-check"]
    source = ["--no-index", "--find-links", str(wheelhouse)] if wheelhouse else []
    # Exactly the locked versions, checked against their hashes; then the gateway
    # itself without resolving anything again.
    _run([*install, *source, "--require-hashes", "-r", str(constraints)], "instalação do lock")
    _run([*install, "--no-deps", str(wheel)], "instalação do gateway")
    _run([*pip, "check"], "pip check")
    shutil.copyfile(constraints, target / "constraints.txt")
    marker.write_text(json.dumps({"version": version, "installed_at": time.time()}) + "\n")
    return target


def _check_config(layout: Layout, release: Path) -> None:
    done = subprocess.run(
        [str(release / "bin/metalav-gateway"), "check-config", "--config", str(layout.config)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        for line in (done.stderr or done.stdout).strip().splitlines():
            print(f"  {line}", file=sys.stderr)
        raise ReleaseError(
            f"check-config recusou {layout.config}: corrija e rode o mesmo comando de novo", 2
        )
    _say(done.stdout.strip())


def _switch(link: Path, version: str) -> None:
    """Point ``link`` at releases/<version> atomically (a rename over the old link)."""
    tmp = link.with_name(f".{link.name}.new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(Path("releases") / version)
    os.replace(tmp, link)


def _journal_path(layout: Layout) -> Path:
    try:
        data = tomllib.loads(layout.config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ReleaseError(f"{layout.config}: não foi possível ler ({exc})", 2) from None
    raw = data.get("journal", {}).get("path", "/var/lib/metalav/journal.db")
    path = Path(raw)
    return path if path.is_absolute() else layout.config.parent / path


def backup_journal(journal: Path, backups: Path, label: str) -> Path | None:
    """An online copy of the journal (sqlite3's backup API: the daemon keeps writing)."""
    if not journal.exists():
        return None
    dest = backups / f"journal-{time.strftime('%Y%m%dT%H%M%S')}-{label}.db"
    src = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        out = sqlite3.connect(dest)
        try:
            src.backup(out)
        finally:
            out.close()
    finally:
        src.close()
    dest.chmod(0o600)
    _say(f"diário copiado para {dest}")
    return dest


def _can_run_journal(layout: Layout, version: str) -> tuple[bool, str]:
    journal = _journal_path(layout)
    if not journal.exists():
        return True, "no journal yet"
    python = layout.release(version) / "bin/python"
    done = subprocess.run(
        [str(python), "-m", "gateway.release", "journal-check", str(journal)],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode == 0, (done.stdout or done.stderr).strip()


def _status(layout: Layout, version: str) -> tuple[dict[str, object] | None, str]:
    """``metalavctl status --json`` of ``version``: its ``daemon`` part, or why not."""
    ctl = layout.release(version) / "bin/metalavctl"
    try:
        done = subprocess.run(
            [str(ctl), "status", "--json", "--config", str(layout.config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=15,
        )
    except subprocess.TimeoutExpired:
        return None, "metalavctl status: sem resposta em 15 s"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return None, f"metalavctl status: {lines[-1] if lines else done.returncode}"
    try:
        daemon = json.loads(done.stdout).get("daemon")
    except (ValueError, AttributeError):
        return None, "metalavctl status: resposta não é JSON"
    return (daemon, "") if isinstance(daemon, dict) else (None, "metalavctl status: sem daemon")


def _healthy(
    layout: Layout, version: str, systemctl: Systemctl, window: float, ready_timeout: float
) -> tuple[bool, str]:
    """Restarted ``version`` reaches READY and stays healthy for ``window`` seconds."""
    deadline = time.monotonic() + ready_timeout
    pid: object = None
    why = "não iniciado"
    while True:
        if time.monotonic() > deadline:
            return False, f"não ficou READY em {ready_timeout:.0f} s ({why})"
        state = systemctl.state()
        if state in ("inactive", "failed"):
            # Not on its way up (systemd says "activating" until READY, and while it
            # waits to restart a crashed daemon): no use waiting for it.
            return False, f"o serviço está {state} antes do READY ({why})"
        if state != "active":
            why = f"o serviço está {state}"
        else:
            daemon, why = _status(layout, version)
            if daemon is not None:
                if daemon.get("version") != version:
                    return False, f"rodando a versão {daemon.get('version')}, não {version}"
                pid = daemon.get("pid")
                break
        time.sleep(POLL_S)
    _say(f"versão {version} READY (pid {pid}); observando por {window:.0f} s")
    until = time.monotonic() + window
    misses = 0
    while time.monotonic() < until:
        time.sleep(POLL_S)
        if not systemctl.is_active():
            return False, "o serviço deixou de estar ativo"
        daemon, why = _status(layout, version)
        if daemon is None:
            misses += 1
            if misses >= STATUS_MISSES:
                return False, why
            continue
        misses = 0
        if daemon.get("pid") != pid:
            return False, f"o daemon reiniciou (pid {pid} -> {daemon.get('pid')})"
    return True, "saudável"


def _start_and_watch(
    layout: Layout, version: str, systemctl: Systemctl, window: float, ready_timeout: float
) -> tuple[bool, str]:
    # Enabled only once a checked config is there: a box must not boot into the example.
    systemctl.must("enable", UNIT)
    systemctl.must("restart", UNIT)
    return _healthy(layout, version, systemctl, window, ready_timeout)


# -- commands ---------------------------------------------------------------------


def _default_source() -> Path:
    return Path(__file__).resolve().parents[1]


def cmd_install(args: argparse.Namespace, layout: Layout, systemctl: Systemctl) -> int:
    source: Path = args.source or _default_source()
    constraints: Path = args.constraints or source / "constraints.txt"
    for needed in (constraints, source / "config.example.toml", source / "systemd" / UNIT):
        if not needed.exists():
            raise ReleaseError(
                f"{needed} não encontrado (--source é a pasta de uma versão do gateway)", 2
            )
    with _exclusive(layout):
        _ensure_accounts(layout)
        fresh_config = _ensure_dirs_and_config(layout, source)
        _ensure_unit(layout, source, systemctl)
        build = layout.opt / ".build"
        if args.wheel:
            wheel = Path(args.wheel)
        else:
            shutil.rmtree(build, ignore_errors=True)
            wheel = _build_wheel(source, build)
        version = _wheel_version(wheel)
        release = _install_release(layout, version, wheel, constraints, args.wheelhouse)
        shutil.rmtree(build, ignore_errors=True)
        if not fresh_config:  # the example is no store's config: checked on the next run
            _check_config(layout, release)
        running = layout.version_of(layout.current)
        if running is None:
            _switch(layout.current, version)
        _ensure_commands(layout)
        if fresh_config:
            _say(
                f"versão {version} instalada. Agora edite {layout.config} para esta Loja"
                " (id do gateway, broker, chaves, placa, máquinas) e rode o mesmo comando"
                " de novo para verificar a configuração e iniciar o serviço"
            )
            return 0
        if args.no_start:
            _say(f"versão {version} instalada; serviço não (re)iniciado (--no-start)")
            return 0
        if running == version:
            if not systemctl.is_active():
                ok, why = _start_and_watch(
                    layout, version, systemctl, args.health_window, args.ready_timeout
                )
                if not ok:
                    raise ReleaseError(f"versão {version} não está saudável: {why}")
            _say(f"versão {version} é a atual e está rodando")
            return 0
        if running is None:
            ok, why = _start_and_watch(
                layout, version, systemctl, args.health_window, args.ready_timeout
            )
            if not ok:
                raise ReleaseError(f"versão {version} não está saudável: {why}")
            _say(f"versão {version} instalada e rodando")
            return 0
        return _upgrade(args, layout, systemctl, running, version)


def _upgrade(
    args: argparse.Namespace, layout: Layout, systemctl: Systemctl, old: str, new: str
) -> int:
    _say(f"atualização {old} -> {new}")
    can, why = _can_run_journal(layout, new)
    if not can:  # e.g. "upgrading" to an older release than the journal allows
        raise ReleaseError(f"versão {new} não roda com este diário ({why}); nada mudou", 2)
    backup_journal(_journal_path(layout), layout.backups, f"before-{new}")
    _switch(layout.previous, old)
    _switch(layout.current, new)
    try:
        ok, why = _start_and_watch(layout, new, systemctl, args.health_window, args.ready_timeout)
    except ReleaseError as exc:
        ok, why = False, str(exc)
    if ok:
        _say(f"atualização para {new} concluída; `metalav-release rollback` volta para {old}")
        return 0
    _say(f"versão {new} falhou: {why}; voltando para {old}")
    _rollback_to(layout, systemctl, old, args.rollback_window, args.ready_timeout)
    raise ReleaseError(f"atualização para {new} falhou ({why}); voltou para {old}, que roda")


def _rollback_to(
    layout: Layout, systemctl: Systemctl, target: str, window: float, ready_timeout: float
) -> None:
    if not (layout.release(target) / ".installed").exists():
        raise ReleaseError(f"versão {target} não está instalada em {layout.releases}", 2)
    can, why = _can_run_journal(layout, target)
    if not can:
        raise ReleaseError(
            f"versão {target} não roda com este diário ({why}); rollback não feito", 2
        )
    current = layout.version_of(layout.current)
    if current and current != target:
        _switch(layout.previous, current)
    _switch(layout.current, target)
    ok, why = _start_and_watch(layout, target, systemctl, window, ready_timeout)
    if not ok:
        raise ReleaseError(f"voltou para {target}, mas ela não está saudável: {why}")
    _say(f"versão {target} é a atual e está rodando")


def cmd_rollback(args: argparse.Namespace, layout: Layout, systemctl: Systemctl) -> int:
    with _exclusive(layout):
        target = args.to or layout.version_of(layout.previous)
        if target is None:
            raise ReleaseError("não há versão anterior para voltar (indique uma com --to)", 2)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]*", target):
            raise ReleaseError(f"{target!r} não é uma versão (veja metalav-release status)", 2)
        current = layout.version_of(layout.current)
        if target == current:
            raise ReleaseError(f"versão {target} já é a atual", 2)
        if not (layout.release(target) / ".installed").exists():
            raise ReleaseError(f"versão {target} não está instalada em {layout.releases}", 2)
        backup_journal(_journal_path(layout), layout.backups, f"before-rollback-{target}")
        _rollback_to(layout, systemctl, target, args.health_window, args.ready_timeout)
    return 0


def cmd_status(args: argparse.Namespace, layout: Layout) -> int:
    installed = sorted(
        p.name for p in layout.releases.glob("*") if (p / ".installed").exists()
    ) if layout.releases.exists() else []
    info = {
        "current": layout.version_of(layout.current),
        "previous": layout.version_of(layout.previous),
        "installed": installed,
    }
    if args.json:
        print(json.dumps(info))
        return 0
    labels = {"current": "atual", "previous": "anterior", "installed": "instaladas"}
    for key, value in info.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        print(f"{labels[key]}: {shown or '-'}")
    return 0


def cmd_journal_check(args: argparse.Namespace) -> int:
    """Run by a release's own python: can THIS build run the journal? (read-only)."""
    from gateway.journal.schema import SCHEMA_VERSION, journal_compat

    try:
        conn = sqlite3.connect(f"file:{args.journal}?mode=ro", uri=True)
        try:
            compat = journal_compat(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        print(f"erro: {args.journal}: não foi possível ler o diário ({exc})", file=sys.stderr)
        return 2
    can_run = compat.runnable_by(SCHEMA_VERSION)
    print(
        json.dumps(
            {
                "journal_version": compat.version,
                "oldest_reader": compat.oldest_reader,
                "build_version": SCHEMA_VERSION,
                "can_run": can_run,
            }
        )
    )
    return 0 if can_run else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metalav-release", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(os.environ.get("METALAV_ROOT", "/")),
        help="install under this folder instead of / (env METALAV_ROOT)",
    )
    parser.add_argument(
        "--systemctl",
        default=os.environ.get("METALAV_SYSTEMCTL", "systemctl"),
        help="systemctl, or a program with the same verbs (env METALAV_SYSTEMCTL)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    watch = argparse.ArgumentParser(add_help=False)
    watch.add_argument(
        "--health-window",
        type=float,
        default=DEFAULT_HEALTH_WINDOW_S,
        help="seconds the new release must stay healthy after READY (default 60)",
    )
    watch.add_argument(
        "--ready-timeout",
        type=float,
        default=DEFAULT_READY_TIMEOUT_S,
        help="seconds a restarted release may take to reach READY (default 90)",
    )
    inst = sub.add_parser("install", parents=[watch], help="install, or upgrade to, a release")
    inst.add_argument("--source", type=Path, help="checkout or release folder (default: this one)")
    inst.add_argument("--wheel", type=Path, help="a built metalav_gateway wheel to install")
    inst.add_argument("--constraints", type=Path, help="the lock (default: SOURCE/constraints.txt)")
    inst.add_argument("--wheelhouse", type=Path, help="install offline from this folder of wheels")
    inst.add_argument(
        "--rollback-window",
        type=float,
        help="seconds the previous release must stay healthy after an automatic rollback"
        " (default: the health window)",
    )
    inst.add_argument("--no-start", action="store_true", help="install only; do not restart")
    back = sub.add_parser("rollback", parents=[watch], help="go back to the previous release")
    back.add_argument("--to", help="the release to go back to (default: the previous one)")
    st = sub.add_parser("status", help="current, previous and installed releases")
    st.add_argument("--json", action="store_true")
    jc = sub.add_parser("journal-check", help="can this release run the journal? (read-only)")
    jc.add_argument("journal", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    layout = Layout(args.root)
    systemctl = Systemctl(args.systemctl)
    if getattr(args, "rollback_window", 0) is None:
        args.rollback_window = args.health_window
    try:
        if args.command == "install":
            return cmd_install(args, layout, systemctl)
        if args.command == "rollback":
            return cmd_rollback(args, layout, systemctl)
        if args.command == "status":
            return cmd_status(args, layout)
        return cmd_journal_check(args)
    except ReleaseError as exc:
        print(f"metalav-release: erro: {exc}", file=sys.stderr)
        return exc.status
    except OSError as exc:
        print(f"metalav-release: erro: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
