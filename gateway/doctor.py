"""``metalavctl doctor``: is this box fit to release machines? (issue 12, item 4)

Each check answers with a status (``ok``, ``warn``, ``fail``, ``skip``), what it saw,
and, when it is not ok, what to do — in the technician's language, as the rest of
metalavctl (gateway/i18n.py: pt_BR for the store's technicians, English otherwise).
``name`` and ``status`` are the stable codes for scripts; ``title``, ``detail`` and
``fix`` are text for people.
The checks only read: the journal is opened read-only, and the board is asked for a
ping only when no daemon runs (and then under the journal's instance lock, so the
daemon cannot start and find its port taken); with a daemon running, its own status
tells how the board and the broker are.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import grp
import os
import pwd
import shutil
import socket
import sqlite3
import ssl
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from . import instance_lock
from .backup import backup_dir, hold_journal_lock, scheduled_backups
from .boards import build_driver
from .config import ConfigError, GatewayConfig, load_config
from .i18n import N_, cli_translation
from .journal import SCHEMA_VERSION

__all__ = ["Check", "run_checks"]

#: The account the systemd unit runs the daemon as (systemd/metalav-gateway.service).
SERVICE_ACCOUNT = "metalav"
DISK_FAIL_BYTES = 100 * 1024 * 1024
DISK_WARN_BYTES = 500 * 1024 * 1024
CERT_WARN_DAYS = 30
NET_TIMEOUT_S = 3.0
BOARD_TIMEOUT_S = 3.0
# adjtimex(2): the clock state TIME_ERROR means "not synchronized".
_TIME_ERROR = 5

_translation = cli_translation()
_ = _translation.gettext


@dataclass(frozen=True)
class Check:
    name: str  # stable id for scripts
    title: str  # what a technician reads (in their language, as detail and fix)
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _ok(name: str, title: str, detail: str) -> Check:
    return Check(name, title, "ok", detail)


def _daemon_status(config: GatewayConfig) -> tuple[dict[str, Any] | None, str]:
    """The running daemon's status, or None and why not."""
    transport = httpx.HTTPTransport(uds=str(config.api.socket))
    try:
        with httpx.Client(transport=transport, base_url="http://gateway", timeout=5.0) as c:
            resp = c.get("/v1/status")
    except httpx.TransportError:
        return None, "unreachable"
    if resp.status_code == 403:
        return None, "forbidden"
    try:
        return resp.json(), ""
    except ValueError:
        return None, "bad answer"


def check_config(path: Path) -> tuple[Check, GatewayConfig | None]:
    title = _("Configuration")
    try:
        config = load_config(path)
    except ConfigError as exc:
        return (
            Check(
                "config",
                title,
                "fail",
                "; ".join(exc.lines),
                _(
                    "fix {path} and check it with: metalav-gateway check-config --config {path}"
                ).format(path=path),
            ),
            None,
        )
    detail = _("{path}: gateway {gateway}, {count} machine(s)").format(
        path=path, gateway=config.gateway.id, count=len(config.machines)
    )
    return _ok("config", title, detail), config


def check_daemon(config: GatewayConfig, status: dict[str, Any] | None, why: str) -> Check:
    title = _("Gateway service")
    if status is not None:
        d = status.get("daemon", {})
        detail = _("running (pid {pid}, version {version})").format(
            pid=d.get("pid"), version=d.get("version")
        )
        return _ok("daemon", title, detail)
    if why == "forbidden":
        return Check(
            "daemon",
            title,
            "warn",
            _("running, but your account has no profile to read its status"),
            _("ask the manager to add your account to the group of the Read profile"),
        )
    holder = _lock_holder(config.journal.path)
    if holder:
        return Check(
            "daemon",
            title,
            "fail",
            _("the process {holder} holds the journal, but does not answer at {socket}").format(
                holder=holder, socket=config.api.socket
            ),
            _(
                "restart the service: systemctl restart metalav-gateway;"
                " see the log: journalctl -u metalav-gateway -n 100"
            ),
        )
    return Check(
        "daemon",
        title,
        "fail",
        _("stopped: no paid command is released"),
        _(
            "start it: systemctl start metalav-gateway; if it does not come up:"
            " journalctl -u metalav-gateway -n 100"
        ),
    )


def _lock_holder(journal: Path) -> str:
    """'pid N' when a process holds the journal's instance lock, else ''."""
    if not instance_lock.lock_path(journal).exists():
        return ""  # no daemon ever ran on this journal
    try:
        with hold_journal_lock(journal):
            return ""
    except instance_lock.AlreadyRunning as exc:
        return f"pid {exc.pid}" if exc.pid else _("another process")
    except instance_lock.InstanceLockError:
        return ""


def check_port(config: GatewayConfig) -> Check:
    board = config.board
    title = _("Relay board port")
    target = board.gpio.chip if board.driver == "gpio" else board.port
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return Check(
            "serial_port",
            title,
            "fail",
            _("{target} does not exist").format(target=target),
            _(
                "check the USB cable and the board's power; see the ports with:"
                " ls -l /dev/serial/by-id/; set [board] port in the configuration"
            ),
        )
    except OSError as exc:
        return Check(
            "serial_port",
            title,
            "fail",
            f"{target}: {exc.strerror}",
            _("check the port in [board] port"),
        )
    if not stat.S_ISCHR(st.st_mode):
        return Check(
            "serial_port",
            title,
            "fail",
            _("{target} is not a serial device").format(target=target),
            _("set [board] port to the board's port (e.g. /dev/ttyACM0)"),
        )
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    mode = stat.filemode(st.st_mode)
    detail = _("{target} ({mode}, group {group})").format(target=target, mode=mode, group=group)
    try:
        account = pwd.getpwnam(SERVICE_ACCOUNT)
    except KeyError:
        return _ok("serial_port", title, detail)
    groups = {g for g in os.getgrouplist(account.pw_name, account.pw_gid)}
    can = (
        account.pw_uid == 0
        or (account.pw_uid == st.st_uid and st.st_mode & 0o600 == 0o600)
        or (st.st_gid in groups and st.st_mode & 0o060 == 0o060)
        or st.st_mode & 0o006 == 0o006
    )
    if not can:
        return Check(
            "serial_port",
            title,
            "fail",
            _("{detail}: the account {account} cannot read and write it").format(
                detail=detail, account=SERVICE_ACCOUNT
            ),
            _(
                "add the account to the port's group: usermod -aG {group} {account};"
                " then: systemctl restart metalav-gateway"
            ).format(group=group, account=SERVICE_ACCOUNT),
        )
    return _ok("serial_port", title, detail)


def check_board(config: GatewayConfig, status: dict[str, Any] | None) -> Check:
    title = _("Board answer")
    fix = _(
        "check the USB cable and the board's power; if the board hung, switch the board"
        " off and on; then: metalavctl status"
    )
    if status is not None:
        b = status.get("board", {})
        if b.get("connected"):
            detail = _("answering on {port} (boot id {boot_id})").format(
                port=b.get("port"), boot_id=b.get("boot_id")
            )
            return _ok("board", title, detail)
        return Check(
            "board",
            title,
            "fail",
            _("the gateway does not talk to the board on {port}: {error}").format(
                port=b.get("port"), error=b.get("last_error") or _("no answer")
            ),
            fix,
        )
    try:
        with hold_journal_lock(config.journal.path):
            pong = asyncio.run(_ping_board(config))
    except instance_lock.AlreadyRunning:
        return Check(
            "board", title, "skip", _("the gateway is running; ask with metalavctl status")
        )
    except instance_lock.InstanceLockError as exc:
        return Check(
            "board",
            title,
            "skip",
            _("could not test without the service: {error}").format(error=exc),
        )
    except Exception as exc:  # the driver's errors, whatever the driver
        error = str(exc) or type(exc).__name__
        return Check("board", title, "fail", _("no answer: {error}").format(error=error), fix)
    return _ok("board", title, _("answered (boot id {boot_id})").format(boot_id=pong))


async def _ping_board(config: GatewayConfig) -> str:
    driver = build_driver(config, lambda fault: None)
    try:
        async with asyncio.timeout(BOARD_TIMEOUT_S):
            await driver.open()
            pong = await driver.ping()
    finally:
        with contextlib.suppress(Exception):
            await driver.close()
    return f"{pong.boot_id:08x}"


def check_broker(config: GatewayConfig, status: dict[str, Any] | None) -> Check:
    title = _("MQTT broker")
    m = config.mqtt
    where = f"{m.host}:{m.port}"
    try:
        sock = socket.create_connection((m.host, m.port), timeout=NET_TIMEOUT_S)
    except OSError as exc:
        return Check(
            "broker",
            title,
            "fail",
            _("{where} unreachable: {error}").format(where=where, error=exc.strerror or exc),
            _(
                "check the store's internet (ping 8.8.8.8) and [mqtt] host/port; the commands"
                " are kept in the cloud and arrive when the connection is back"
            ),
        )
    notes: list[str] = []  # after "reachable", each after a "; "
    with sock:
        if m.tls_ca_file or m.tls_cert_file:
            try:
                context = ssl.create_default_context(
                    cafile=str(m.tls_ca_file) if m.tls_ca_file else None
                )
                if m.tls_cert_file:
                    context.load_cert_chain(
                        str(m.tls_cert_file), str(m.tls_key_file) if m.tls_key_file else None
                    )
                with context.wrap_socket(sock, server_hostname=m.host) as tls:
                    cert = tls.getpeercert() or {}
            except (ssl.SSLError, OSError) as exc:
                return Check(
                    "broker",
                    title,
                    "fail",
                    _("{where}: TLS refused: {error}").format(where=where, error=exc),
                    _(
                        "check [mqtt] tls_ca_file, tls_cert_file and tls_key_file and the"
                        " box's clock (certificates depend on the date)"
                    ),
                )
            days = _days_left(cert.get("notAfter"))
            if days is not None:
                notes.append(
                    _("the broker's certificate expires in {days} day(s)").format(days=days)
                )
                if days < 0:
                    return Check(
                        "broker",
                        title,
                        "fail",
                        _("{where}: certificate expired").format(where=where),
                        _("tell support: the broker's certificate has expired"),
                    )
            client_days = _client_cert_days(m.tls_cert_file)
            if client_days is not None:
                notes.append(
                    _("this box's certificate expires in {days} day(s)").format(days=client_days)
                )
                if client_days < 0:
                    return Check(
                        "broker",
                        title,
                        "fail",
                        _("{where}: this box's certificate expired").format(where=where),
                        _("ask support for a new certificate for this gateway"),
                    )
                days = client_days if days is None else min(days, client_days)
            if days is not None and days < CERT_WARN_DAYS:
                return Check(
                    "broker",
                    title,
                    "warn",
                    "; ".join([_("{where} reachable").format(where=where), *notes]),
                    _("ask support to renew the certificate before it expires"),
                )
    if status is not None:
        notes.append(
            _("gateway connected")
            if status.get("broker", {}).get("connected")
            else _("the gateway is NOT connected yet")
        )
    return _ok("broker", title, "; ".join([_("{where} reachable").format(where=where), *notes]))


def _days_left(not_after: object) -> int | None:
    if not isinstance(not_after, str):
        return None
    expires = ssl.cert_time_to_seconds(not_after)
    return int((expires - time.time()) // 86400)


def _client_cert_days(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError, ImportError):
        return None
    return int((cert.not_valid_after_utc - datetime.now(UTC)).total_seconds() // 86400)


def _clock_synchronized() -> bool | None:
    """True / False when the system can tell, None when it cannot."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip() in ("yes", "no"):
            return out.stdout.strip() == "yes"
    # No systemd to ask (a container): the kernel's own flag, adjtimex(2) read-only.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct timex, zeroed: modes = 0 (read)
        state = int(libc.adjtimex(buf))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR


def check_clock(sync: Callable[[], bool | None] = _clock_synchronized) -> Check:
    title = _("Clock")
    # The date layout is the language's (metalavctl's own): 28/11/2026 for pt_BR.
    now = datetime.now().astimezone().strftime(_("%Y-%m-%d %H:%M:%S") + " %Z")
    synced = sync()
    if synced:
        return _ok("clock", title, _("synchronized ({now})").format(now=now))
    fix = _(
        "check the internet and NTP: timedatectl status; systemctl restart"
        " systemd-timesyncd. The gateway neither refunds nor refuses commands because of"
        " its own clock, but the journal's times are wrong"
    )
    if synced is None:
        detail = _("cannot tell whether it synchronizes ({now})").format(now=now)
        return Check("clock", title, "warn", detail, fix)
    return Check("clock", title, "warn", _("NOT synchronized ({now})").format(now=now), fix)


def check_disk(config: GatewayConfig) -> Check:
    title = _("Disk space")
    folder = config.journal.path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    usage = shutil.disk_usage(folder)
    detail = _("{free} MB free of {total} MB in {folder}").format(
        free=usage.free // (1024 * 1024), total=usage.total // (1024 * 1024), folder=folder
    )
    fix = _(
        'free some space: metalavctl cleanup --days 30 --reason "disk full"; delete old'
        " backups in {folder}; see: df -h"
    ).format(folder=backup_dir(config.journal.path, config.backup.dir))
    if usage.free < DISK_FAIL_BYTES:
        detail = _("{detail} — the journal may stop writing").format(detail=detail)
        return Check("disk", title, "fail", detail, fix)
    if usage.free < DISK_WARN_BYTES or usage.free < usage.total * 0.10:
        return Check("disk", title, "warn", detail, fix)
    return _ok("disk", title, detail)


def check_journal(config: GatewayConfig) -> Check:
    title = _("Journal (integrity)")
    path = config.journal.path
    if not path.exists():
        return Check(
            "journal",
            title,
            "warn",
            _("{path} does not exist yet").format(path=path),
            _("the gateway creates the journal when it starts: systemctl start metalav-gateway"),
        )
    restore_fix = _(
        "stop the service (systemctl stop metalav-gateway), restore the latest backup"
        ' (metalavctl restore {folder}/journal-....db --reason "journal corrupted") and'
        " start it again; tell support"
    ).format(folder=backup_dir(path, config.backup.dir))
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        detail = _("{path}: does not open ({error})").format(path=path, error=exc)
        return Check("journal", title, "fail", detail, restore_fix)
    try:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        return Check("journal", title, "fail", f"{path}: {exc}", restore_fix)
    finally:
        conn.close()
    if rows != ["ok"]:
        detail = _("{path}: corrupted ({error})").format(path=path, error=rows[0])
        return Check("journal", title, "fail", detail, restore_fix)
    if version > SCHEMA_VERSION:
        return Check(
            "journal",
            title,
            "fail",
            _("{path}: schema {version}, newer than this gateway's ({supported})").format(
                path=path, version=version, supported=SCHEMA_VERSION
            ),
            _("install the gateway version that wrote this journal"),
        )
    return _ok(
        "journal",
        title,
        _("{path}: intact (schema {version})").format(path=path, version=version),
    )


def check_backups(config: GatewayConfig, now: float | None = None) -> Check:
    title = _("Journal backups")
    folder = backup_dir(config.journal.path, config.backup.dir)
    if not config.backup.enabled:
        return Check(
            "backups",
            title,
            "warn",
            _("daily backup turned off ([backup] enabled)"),
            _("turn the daily backup on or make one now: metalavctl backup FILE"),
        )
    found = scheduled_backups(folder)
    if not found:
        return Check(
            "backups",
            title,
            "warn",
            _("no backup in {folder}").format(folder=folder),
            _("make one now: metalavctl backup FILE (the gateway makes one a day)"),
        )
    newest = found[-1]
    age_h = ((now or time.time()) - newest.stat().st_mtime) / 3600
    detail = _("{count} in {folder}; the newest {hours} h ago ({name})").format(
        count=len(found), folder=folder, hours=f"{age_h:.0f}", name=newest.name
    )
    if age_h > 2 * config.backup.interval_h:
        return Check(
            "backups",
            title,
            "warn",
            detail,
            _("see the service's log (journalctl -u metalav-gateway | grep backup)"),
        )
    return _ok("backups", title, detail)


def run_checks(config_path: Path) -> list[Check]:
    first, config = check_config(config_path)
    if config is None:
        return [first]
    status, why = _daemon_status(config)
    return [
        first,
        check_daemon(config, status, why),
        check_port(config),
        check_board(config, status),
        check_broker(config, status),
        check_clock(),
        check_disk(config),
        check_journal(config),
        check_backups(config),
    ]


#: What a technician reads for each status (the pt_BR catalog translates each).
STATUS_TEXT = {"ok": N_("ok"), "warn": N_("WARN"), "fail": N_("FAIL"), "skip": N_("not tested")}


def print_checks(checks: list[Check]) -> None:
    for c in checks:
        print(f"[{_(STATUS_TEXT[c.status]):^11}] {c.title}: {c.detail}")
        if c.fix and c.status in ("warn", "fail"):
            print(f"{'':14}" + _("what to do: {fix}").format(fix=c.fix))
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    if failed:
        print(_("{failed} failure(s), {warned} warning(s)").format(failed=failed, warned=warned))
    elif warned:
        print(_("all good ({warned} warning(s))").format(warned=warned))
    else:
        print(_("all good"))
